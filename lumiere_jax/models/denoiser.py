"""The text-conditioned denoiser: T5 encoder + a U-Net (image), STUNet (video) or SSR network.

Parameter paths are `text_encoder/...` and `net/...` (for the STUNet `net/unet/...` and
`net/temporal/...`; the SSR adds `net/aug_mlp1/...`, `net/aug_mlp2/...`), so freezing is a regex
over paths and a stage-0 checkpoint's `net` is the STUNet's `net/unet` unchanged.

`config.model` (kind 'unet', 'stunet' or 'ssr'):
  unet:      UNetConfig fields (text_dim comes from the T5 preset).
  temporal:  STUNetConfig fields besides `unet` (kinds 'stunet' and 'ssr'). For 'ssr',
             temporal_sampling_levels defaults to () (the SSR keeps every frame); anything
             else is an error.
  ssr:       kind 'ssr' only: `scale`, the integer upsampling factor per spatial axis
             (low-res frames are H/scale x W/scale). unet.extra_in_channels defaults to
             unet.in_channels (the upsampled low-res video is concatenated to the input).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from lumiere_jax.models.ssr import SSR, SSRConfig
from lumiere_jax.models.stunet import STUNet, STUNetConfig
from lumiere_jax.models.unet import UNet, UNetConfig
from lumiere_jax.text.t5 import T5Encoder, get_preset

Array = jax.Array
MODEL_KINDS = ("unet", "stunet", "ssr")
SSR_COND_KEYS = ("low_res", "aug_logsnr")


class Denoiser(nnx.Module):
    """(z, logsnr, cond) -> prediction, with cond = {'text': [b, L, d], 'text_mask': [b, L]}
    (and 'ids': [b, L] for a STUNet whose temporal_text="tokens" reads them).

    For the SSR, cond also holds 'low_res': [b, t, H/scale, W/scale, 3], the (augmented)
    low-resolution video, and 'aug_logsnr': [b], the log-SNR of its augmentation noise
    (+inf for none); diffusion.ssr.ssr_loss adds both in training.

    For a STUNet with conditioning channels (the masked-input variant), cond may hold
    'masked': [b, t, H, W, 4], the known pixels (zero elsewhere) and the mask (1 = known);
    absent means nothing is known (diffusion.masks.masked_video builds it).
    """

    def __init__(self, text_encoder: T5Encoder, net: UNet | STUNet | SSR):
        self.text_encoder = text_encoder
        self.net = net

    def encode_text(self, ids: Array, mask: Array) -> dict[str, Array]:
        """Token ids [b, L] and mask [b, L] -> the condition pytree (padding zeroed)."""
        emb = self.text_encoder(ids, mask).astype(jnp.float32)
        cond = {"text": jnp.where(mask[..., None], emb, 0.0), "text_mask": mask}
        if isinstance(self.net, STUNet) and self.net.cfg.temporal_text == "tokens":
            cond["ids"] = jnp.where(mask, ids, 0)  # this reader reads the words themselves
        return cond

    def __call__(self, z: Array, logsnr: Array, cond: dict[str, Array]) -> Array:
        if isinstance(self.net, SSR):
            missing = [k for k in SSR_COND_KEYS if k not in cond]
            if missing:
                raise ValueError(f"the SSR denoiser needs cond keys {list(SSR_COND_KEYS)} "
                                 f"besides the text; {missing} missing (got {sorted(cond)})")
            return self.net(z, logsnr, cond["text"], cond["text_mask"], cond["low_res"],
                            cond["aug_logsnr"])
        is_stunet = isinstance(self.net, STUNet)
        if "masked" in cond and not (is_stunet and self.net.cfg.cond_channels):
            raise ValueError("cond has 'masked' (a masked video to condition on) but this model "
                             "has no conditioning input: use model.temporal.cond_channels=4 and "
                             "fine-tune it with masks (configs/shapes_stunet.py:masked)")
        if is_stunet:
            return self.net(z, logsnr, cond["text"], cond["text_mask"], cond.get("masked"),
                            cond.get("ids"))
        return self.net(z, logsnr, cond["text"], cond["text_mask"])


def net_config(model: ConfigDict, text_dim: int, text_vocab: int = 0
               ) -> UNetConfig | STUNetConfig | SSRConfig:
    """The network config of `config.model` (kind 'unet', 'stunet' or 'ssr'); text_dim and
    text_vocab are the text encoder's width and vocabulary size."""
    if model.kind not in MODEL_KINDS:
        raise ValueError(f"model.kind must be one of {MODEL_KINDS}, got {model.kind!r}")
    if model.kind == "ssr":
        return _ssr_config(model, text_dim)
    unet = UNetConfig.from_dict({**model.unet.to_dict(), "text_dim": text_dim})
    if model.kind == "unet":
        return unet
    return STUNetConfig(unet=unet, **{"text_vocab": text_vocab, **model.temporal.to_dict()})


def _ssr_config(model: ConfigDict, text_dim: int) -> SSRConfig:
    if "ssr" not in model:
        raise ValueError("model.kind='ssr' needs model.ssr = dict(scale=...), the upsampling "
                         "factor per spatial axis")
    unet = {**model.unet.to_dict(), "text_dim": text_dim}
    unet.setdefault("extra_in_channels", unet.get("in_channels", 3))
    temporal = {"temporal_sampling_levels": (),
                **(model.temporal.to_dict() if "temporal" in model else {})}
    ssr = model.ssr.to_dict()
    fields = {f.name for f in dataclasses.fields(SSRConfig)} - {"stunet"}
    unknown = sorted(set(ssr) - fields)
    if unknown:
        raise ValueError(f"unknown model.ssr keys {unknown}; valid keys: {sorted(fields)}")
    stunet = STUNetConfig(unet=UNetConfig.from_dict(unet), **temporal)
    return SSRConfig(stunet=stunet, **ssr)


def build_denoiser(config: ConfigDict, rngs: nnx.Rngs) -> Denoiser:
    """The denoiser described by `config.text` and `config.model`, randomly initialised."""
    t5 = get_preset(config.text.preset)
    text_encoder = T5Encoder(t5, rngs=rngs)
    cfg = net_config(config.model, t5.d_model, t5.vocab_size)
    if isinstance(cfg, UNetConfig):
        net = UNet(cfg, rngs=rngs)
    elif isinstance(cfg, SSRConfig):
        net = SSR(cfg, rngs=rngs)
    else:
        net = STUNet(cfg, rngs=rngs)
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
