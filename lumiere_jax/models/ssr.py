"""Spatial super-resolution (SSR): a video diffusion U-Net on high-resolution frame windows.

Lumiere's last stage turns the base model's low-resolution clip into the full-resolution one,
window by window (MultiDiffusion reconciles the overlaps). The SSR network is a denoiser of
the HIGH-resolution window `x: [b, t, H, W, 3]`, conditioned on
  - the low-resolution window `low_res: [b, t, H/scale, W/scale, 3]` (same frames): upsampled
    to H x W with fixed bilinear interpolation and concatenated to x on channels, so the
    U-Net's first convolution sees 6 channels (UNetConfig.extra_in_channels = 3) and every
    pixel sees its own low-res neighbourhood;
  - the noise level of that conditioning, `aug_logsnr: [b]`: in training the low-res video is
    noised (Imagen's noise conditioning augmentation, diffusion/ssr.py) so the model learns
    not to trust it blindly, and it is told how much noise was added. The level is embedded
    like the diffusion log-SNR (sinusoidal features, two-layer MLP) and added to the U-Net's
    per-example embedding, so it reaches every res block through FiLM;
  - the text, exactly as in the base model.
The spatial U-Net and the STUNet's temporal layers are reused unchanged: temporal convolutions
after the fine levels' blocks and temporal attention at the coarsest level, inserted through
the U-Net's hooks, but no temporal down/up-sampling (the SSR keeps every frame, and a window
is only a few frames long). Parameter paths are `unet/...`, `temporal/...` (as in the STUNet,
so the same freezing regexes apply) and `aug_mlp1/...`, `aug_mlp2/...`.

Why bilinear: its weights are non-negative, so the upsampled condition is a convex
combination of low-res pixels and never leaves their value range (cubic interpolation rings
past [-1, 1] at the hard edges of the shapes world); and the network only needs the
condition aligned with x, not sharp: the detail is what it generates. The resize has no
parameters and, for integer scales, is a fixed linear map (a matmul per spatial axis).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lumiere_jax.models import layers
from lumiere_jax.models.stunet import STUNetConfig, TemporalLayers
from lumiere_jax.models.unet import UNet, UNetConfig

Array = jax.Array

UPSAMPLE_METHOD = "bilinear"
RESIDUAL_BASES = ("bilinear", "bicubic")


@dataclasses.dataclass(frozen=True)
class SSRConfig:
    """stunet: the U-Net and its temporal layers; temporal sampling must be off
    (temporal_sampling_levels=()) and the U-Net must take the upsampled low-res video as
    extra input channels (unet.extra_in_channels = unet.in_channels).
    scale: the upsampling factor per spatial axis (e.g. 4: 128x128 -> 512x512).
    residual: the diffusion runs on the residual x - upsample_video(low_res, residual_base)
    instead of x (as in SRDiff, Li et al. 2022): the network only has to generate the detail
    the interpolation lacks, and a residual of 0, its easiest output, is already the
    interpolation. ssr_loss and the Generator read it; the network itself is the same.
    residual_base: the interpolation the residual is taken over, 'bilinear' or 'bicubic'
    (clipped to [-1, 1]); the closer it is to the truth, the less the network must add. The
    network's own condition input stays bilinear (see the module docstring)."""

    stunet: STUNetConfig = STUNetConfig(unet=UNetConfig(extra_in_channels=3),
                                        temporal_sampling_levels=())
    scale: int = 4
    residual: bool = False
    residual_base: str = UPSAMPLE_METHOD

    def __post_init__(self):
        if self.stunet.sampling_levels:
            raise ValueError(
                f"SSR: temporal_sampling_levels={self.stunet.temporal_sampling_levels} asks for "
                f"temporal down/up-sampling, but the SSR keeps every frame of its window: set "
                f"model.temporal.temporal_sampling_levels=() (None means every level)")
        unet = self.stunet.unet
        if unet.extra_in_channels != unet.in_channels:
            raise ValueError(
                f"SSR: the U-Net takes the upsampled low-res video ({unet.in_channels} channels) "
                f"as extra input channels, but unet.extra_in_channels="
                f"{unet.extra_in_channels}: set extra_in_channels={unet.in_channels}")
        if not isinstance(self.scale, int) or isinstance(self.scale, bool) or self.scale < 1:
            raise ValueError(f"SSR: scale is the integer upsampling factor per spatial axis "
                             f"(e.g. 2 or 4), got {self.scale!r}")
        if self.residual_base not in RESIDUAL_BASES:
            raise ValueError(f"SSR: residual_base must be one of {RESIDUAL_BASES}, got "
                             f"{self.residual_base!r}")

    @property
    def unet(self) -> UNetConfig:
        return self.stunet.unet


def upsample_video(low_res: Array, size: tuple[int, int],
                   method: str = UPSAMPLE_METHOD) -> Array:
    """[..., h, w, c] -> [..., *size, c] by bilinear (default) or bicubic interpolation (no
    parameters); bicubic is clipped to [-1, 1], the range it overshoots at hard edges.

    Half-pixel centres, matching diffusion.ssr.downsample_video's box average: low-res pixel
    i sits at the centre of high-res block i, so the condition is not shifted. Only the two
    spatial axes are resized (jax.image.resize leaves axes of unchanged size alone).
    """
    up = jax.image.resize(low_res, (*low_res.shape[:-3], *size, low_res.shape[-1]), method)
    return up if method == "bilinear" else jnp.clip(up, -1.0, 1.0)


class SSR(nnx.Module):
    """(x [b, t, H, W, 3], logsnr [b], text [b, L, D], text_mask [b, L],
    low_res [b, t, H/scale, W/scale, 3], aug_logsnr [b]) -> prediction [b, t, H, W, 3]."""

    def __init__(self, cfg: SSRConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        ucfg = cfg.unet
        dtype = jnp.dtype(ucfg.dtype)
        self.unet = UNet(ucfg, rngs=rngs)
        self.temporal = TemporalLayers(cfg.stunet, rngs=rngs)
        emb = ucfg.emb_dim
        self.aug_mlp1 = layers.Dense(ucfg.channels, emb, ("embed", "mlp"), dtype=dtype,
                                     rngs=rngs)
        # Zero-initialised: the augmentation embedding starts as exactly nothing, so a U-Net
        # initialised from a trained model keeps that model's embedding at step 0.
        self.aug_mlp2 = layers.Dense(emb, emb, ("mlp", "embed"), zero_init=True, dtype=dtype,
                                     rngs=rngs)

    def embed_aug(self, aug_logsnr: Array) -> Array:
        """[b] -> [b, emb_dim], added to the U-Net's per-example embedding."""
        h = layers.logsnr_features(aug_logsnr, self.cfg.unet.channels)
        return self.aug_mlp2(jax.nn.silu(self.aug_mlp1(h)))

    def _check(self, x: Array, logsnr: Array, low_res: Array, aug_logsnr: Array) -> None:
        s, ucfg = self.cfg.scale, self.cfg.unet
        if x.ndim != 5 or x.shape[-1] != ucfg.in_channels:
            raise ValueError(f"SSR: x must be a video [b, t, H, W, {ucfg.in_channels}], got "
                             f"shape {x.shape}")
        b, t, hh, ww, _ = x.shape
        if hh % s or ww % s:
            raise ValueError(f"SSR: frame size {hh}x{ww} must be divisible by scale={s}; crop "
                             f"or pad the high-resolution frames to a multiple of {s}")
        want = (b, t, hh // s, ww // s, ucfg.extra_in_channels)
        if low_res.shape != want:
            raise ValueError(
                f"SSR: low_res has shape {low_res.shape}, expected {want}: the same videos and "
                f"frames as x {x.shape}, each side {s}x smaller (scale={s})")
        for name, v in (("logsnr", logsnr), ("aug_logsnr", aug_logsnr)):
            if v.shape != (b,):
                raise ValueError(f"SSR: {name} must have shape [{b}] (one level per video), "
                                 f"got {v.shape}")

    def __call__(self, x: Array, logsnr: Array, text: Array, text_mask: Array,
                 low_res: Array, aug_logsnr: Array) -> Array:
        self._check(x, logsnr, low_res, aug_logsnr)
        b, t, hh, ww, _ = x.shape
        cond = upsample_video(low_res, (hh, ww)).astype(x.dtype)
        h = jnp.concatenate([x, cond], axis=-1).reshape(b * t, hh, ww, -1)
        out = self.unet(h, logsnr, text, text_mask, hooks=self.temporal,
                        extra_emb=self.embed_aug(aug_logsnr))
        return out.reshape(b, t, *out.shape[1:])
