"""The text-conditioned denoiser: T5 encoder + a U-Net (image), STUNet (video) or SSR network.

Parameter paths are `text_encoder/...` and `net/...` (for the STUNet `net/unet/...` and
`net/temporal/...`), so freezing is a regex over paths and a stage-0 checkpoint's `net` is the
STUNet's `net/unet` unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from lumiere_jax.models.stunet import STUNet, STUNetConfig
from lumiere_jax.models.unet import UNet, UNetConfig
from lumiere_jax.text.t5 import T5Encoder, get_preset

Array = jax.Array
MODEL_KINDS = ("unet", "stunet")


class Denoiser(nnx.Module):
    """(z, logsnr, cond) -> prediction, with cond = {'text': [b, L, d], 'text_mask': [b, L]}."""

    def __init__(self, text_encoder: T5Encoder, net: UNet | STUNet):
        self.text_encoder = text_encoder
        self.net = net

    def encode_text(self, ids: Array, mask: Array) -> dict[str, Array]:
        """Token ids [b, L] and mask [b, L] -> the condition pytree (padding zeroed)."""
        emb = self.text_encoder(ids, mask).astype(jnp.float32)
        return {"text": jnp.where(mask[..., None], emb, 0.0), "text_mask": mask}

    def __call__(self, z: Array, logsnr: Array, cond: dict[str, Array]) -> Array:
        return self.net(z, logsnr, cond["text"], cond["text_mask"])


def net_config(model: ConfigDict, text_dim: int) -> UNetConfig | STUNetConfig:
    """The network config of `config.model` (kind 'unet' or 'stunet')."""
    if model.kind not in MODEL_KINDS:
        raise ValueError(f"model.kind must be one of {MODEL_KINDS}, got {model.kind!r}")
    unet = UNetConfig.from_dict({**model.unet.to_dict(), "text_dim": text_dim})
    if model.kind == "unet":
        return unet
    return STUNetConfig(unet=unet, **model.temporal.to_dict())


def build_denoiser(config: ConfigDict, rngs: nnx.Rngs) -> Denoiser:
    """The denoiser described by `config.text` and `config.model`, randomly initialised."""
    t5 = get_preset(config.text.preset)
    text_encoder = T5Encoder(t5, rngs=rngs)
    cfg = net_config(config.model, t5.d_model)
    net = UNet(cfg, rngs=rngs) if isinstance(cfg, UNetConfig) else STUNet(cfg, rngs=rngs)
    return Denoiser(text_encoder, net)


def denoiser_builder(config: ConfigDict):
    """() -> the config's Denoiser, for `nnx.eval_shape` and for initialising under `jax.jit`.

    Its Rngs counter is an array ref: updating a plain traced counter makes flax 0.12 ask each
    tracer for its sharding, which on jax 0.10 scans the whole jaxpr every time (56 s instead
    of 2.5 s to trace the paper STUNet). The values equal build_denoiser's.
    """

    def build() -> Denoiser:
        with nnx.var_defaults(ref=True):
            rngs = nnx.Rngs(config.seed)
        return build_denoiser(config, rngs)

    return build


def abstract_denoiser(config: ConfigDict) -> Denoiser:
    """The config's Denoiser with ShapeDtypeStruct parameters: nothing is allocated."""
    return nnx.eval_shape(denoiser_builder(config))
