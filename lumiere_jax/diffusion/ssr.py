"""Training the spatial super-resolution (SSR) stage: low-res inputs and their augmentation.

An SSR example is one high-resolution clip window; its condition is made from it:
  1. `downsample_video`: the low-resolution window, each pixel the exact mean of a
     scale x scale block (a box filter: what a camera sensor at the lower resolution records,
     and free of aliasing for the hard-edged shapes world);
  2. `augment_condition`: Imagen's noise conditioning augmentation (Saharia et al., 2022;
     Ho et al., 2022 "Cascaded Diffusion Models"), Gaussian variant: the low-res video is
     noised to a random level, low' = alpha * low + sigma * noise, with the same
     variance-preserving alpha/sigma as the diffusion itself, and the model is told the level
     (`aug_logsnr`). At sampling time the low-res input comes from the base model, not from
     downsampled ground truth; a model trained only on clean conditions copies its artifacts,
     one trained on noised ones learns to regenerate the detail the noise hides.
  3. `ssr_loss`: the ordinary denoising loss (losses.diffusion_loss) on the high-res clip, with
     the condition pytree extended by 'low_res' and 'aug_logsnr' (what models.denoiser's SSR
     kind reads).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lumiere_jax.diffusion import schedules
from lumiere_jax.diffusion.losses import ModelFn, diffusion_loss
from lumiere_jax.diffusion.schedules import Diffusion
from lumiere_jax.models.ssr import upsample_video


def downsample_video(x: jax.Array, scale: int) -> jax.Array:
    """x: [..., H, W, C] -> [..., H/scale, W/scale, C], each pixel the mean of its block.

    Accumulates in at least float32; returns x's dtype. Works on videos [b, t, H, W, C] and
    images [b, H, W, C] alike (only the last three axes are read).
    """
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise ValueError(f"downsample_video: scale is a positive integer factor, got {scale!r}")
    if x.ndim < 3:
        raise ValueError(f"downsample_video: expected [..., H, W, C], got shape {x.shape}")
    *lead, h, w, c = x.shape
    if h % scale or w % scale:
        raise ValueError(f"downsample_video: frame size {h}x{w} is not divisible by "
                         f"scale={scale}; crop the frames to a multiple of {scale}")
    blocks = x.astype(jnp.promote_types(x.dtype, jnp.float32)).reshape(
        *lead, h // scale, scale, w // scale, scale, c)
    return blocks.mean(axis=(-4, -2)).astype(x.dtype)


def project_to_low_res(x: jax.Array, low_res: jax.Array, scale: int) -> jax.Array:
    """The video nearest to x (least squares) whose scale x scale block means are low_res.

    x: [..., H, W, C]; low_res: [..., H/scale, W/scale, C]. Each block is shifted by its
    mean's error, the orthogonal projection onto {v : downsample_video(v) = low_res}. The
    ground truth lies in that set (the low-res video is its downsampling), and a projection
    onto a convex set moves no point further from any member: the error to the truth never
    grows.
    """
    error = low_res.astype(x.dtype) - downsample_video(x, scale)
    return x + jnp.repeat(jnp.repeat(error, scale, axis=-3), scale, axis=-2)


def augment_condition(low_res: jax.Array, aug_logsnr: jax.Array, rng: jax.Array) -> jax.Array:
    """alpha * low_res + sigma * noise, per example at log-SNR aug_logsnr ([b] or scalar).

    aug_logsnr = +inf returns low_res exactly (alpha = 1, sigma = 0); very negative values
    return nearly pure N(0, I) noise.
    """
    alpha, sigma = schedules.alpha_sigma(schedules.per_example(aug_logsnr, low_res))
    noise = schedules.gaussian_noise(rng, low_res.shape)
    return (alpha * low_res + sigma * noise).astype(low_res.dtype)


def sample_aug_logsnr(rng: jax.Array, batch: int, diffusion: Diffusion,
                      aug_range: tuple[float, float]) -> jax.Array:
    """Per-example augmentation levels [batch]: t ~ U(aug_range) in diffusion time, mapped
    through the diffusion's own schedule (so (0, 0.5) spans clean to half-way noised)."""
    lo, hi = aug_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"aug_range is an interval (lo, hi) of diffusion time with "
                         f"0 <= lo <= hi <= 1 (e.g. (0.0, 0.5)), got {aug_range}")
    t = jax.random.uniform(rng, (batch,), jnp.float32, lo, hi)
    return diffusion.logsnr(t)


def ssr_condition(cond: Mapping[str, Any], low_res: jax.Array,
                  aug_logsnr: jax.Array) -> dict[str, Any]:
    """cond (the text condition) extended by the SSR's 'low_res' and 'aug_logsnr'."""
    if not isinstance(cond, Mapping):
        raise ValueError(f"the SSR condition is a dict (text, text_mask, ...), got "
                         f"{type(cond).__name__}")
    clash = [k for k in ("low_res", "aug_logsnr") if k in cond]
    if clash:
        raise ValueError(f"cond already holds {clash}; the SSR adds those itself (pass the "
                         f"text condition only)")
    return {**cond, "low_res": low_res, "aug_logsnr": aug_logsnr}


def ssr_loss(
    model_fn: ModelFn,
    x_high: jax.Array,
    cond: Mapping[str, Any],
    rng: jax.Array,
    diffusion: Diffusion,
    *,
    scale: int,
    aug_range: tuple[float, float] = (0.0, 0.5),
    residual: bool = False,
    residual_base: str = "bilinear",
    mask: jax.Array | None = None,
    example_weight: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Denoising loss of an SSR model on high-resolution clips.

    Args:
      model_fn: (z [b, t, H, W, c], logsnr [b], cond) -> prediction, reading cond['low_res']
        [b, t, H/scale, W/scale, c] and cond['aug_logsnr'] [b] (e.g. an SSR Denoiser).
      x_high: clean high-resolution clips [b, t, H, W, c] in [-1, 1].
      cond: the text condition {'text', 'text_mask'} (after any caption dropout).
      rng: PRNG key; the loss is a deterministic function of it.
      diffusion: the diffusion settings; its schedule also maps augmentation times to logsnr.
      scale: the SSR's upsampling factor (the model's SSRConfig.scale).
      aug_range: augmentation time interval, uniform per example.
      residual: denoise x_high - upsample_video(low-res, residual_base) instead of x_high
        (SSRConfig.residual and .residual_base); the residual is taken from the clean low-res
        video, the one sampling starts from.
      mask, example_weight: as in losses.diffusion_loss.
    Returns:
      (scalar loss, aux): diffusion_loss's aux plus 'aug_logsnr' [b].
    """
    aug_rng, noise_rng, loss_rng = jax.random.split(rng, 3)
    low_res = downsample_video(x_high, scale)
    target = x_high
    if residual:
        base = upsample_video(low_res, x_high.shape[-3:-1], residual_base)
        target = x_high - base.astype(x_high.dtype)
    aug_logsnr = sample_aug_logsnr(aug_rng, x_high.shape[0], diffusion, aug_range)
    low_res = augment_condition(low_res, aug_logsnr, noise_rng)
    loss, aux = diffusion_loss(model_fn, target, ssr_condition(cond, low_res, aug_logsnr),
                               loss_rng, diffusion, mask=mask, example_weight=example_weight)
    return loss, {**aux, "aug_logsnr": aug_logsnr}


def one_step_estimates(
    model_fn: ModelFn,
    x_high: jax.Array,
    cond: Mapping[str, Any],
    rng: jax.Array,
    diffusion: Diffusion,
    times: tuple[float, ...],
    *,
    scale: int,
    residual: bool = False,
    residual_base: str = "bilinear",
) -> dict[float, jax.Array]:
    """{t: the model's one-step estimate of x_high from x_high noised to diffusion time t}, the
    low-res condition clean; the same noise at every t.

    A diagnostic of what an SSR has learned. At small t the noisy clip itself carries most of
    the detail and the estimate only has to clean it; at t = 1 nothing but the low-res video
    is left, so that estimate is the model's regression of the clip on the low-res video,
    which every sample starts from. Arguments as in ssr_loss.
    """
    low_res = downsample_video(x_high, scale)
    base = (upsample_video(low_res, x_high.shape[-3:-1], residual_base).astype(x_high.dtype)
            if residual else jnp.zeros_like(x_high))
    target = x_high - base
    noise = jax.random.normal(rng, target.shape, target.dtype)
    batch = x_high.shape[0]
    cond = ssr_condition(cond, low_res, jnp.full((batch,), jnp.inf, jnp.float32))
    estimates = {}
    for t in times:
        logsnr = jnp.full((batch,), diffusion.logsnr(t), jnp.float32)
        alpha, sigma = schedules.alpha_sigma(schedules.per_example(logsnr, target))
        z = alpha * target + sigma * noise
        x0, _ = schedules.x0_eps_from_prediction(diffusion.prediction, model_fn(z, logsnr, cond),
                                                 z, logsnr)
        estimates[t] = base + x0
    return estimates
