"""Random masks for fine-tuning the conditional (masked-input) STUNet, and its input.

Lumiere's conditional variant of image-to-video and inpainting gives the model the masked
video and the mask as extra input channels and fine-tunes it on random masks, so that one model
serves every application. The mask is 1 where the pixel is known, 0 where it is to be
generated. The kinds, each the training counterpart of an application:

  none            nothing known: plain text-to-video (keeps the unconditional ability)
  first_frame     frame 0 known: image-to-video
  box             everything but a random box, in every frame: inpainting, cinemagraphs
  spatiotemporal  everything but a random box over a random run of frames
  border          a random inner rectangle known, its border not: outpainting
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

MASK_KINDS = ("none", "first_frame", "box", "spatiotemporal", "border")


def check_mask_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in MASK_KINDS]
    if not kinds or unknown:
        raise ValueError(f"mask kinds must be a non-empty list of {MASK_KINDS}, got "
                         f"{list(kinds)}" + (f" ({unknown} unknown)" if unknown else ""))
    return kinds


def _interval(rng: jax.Array, batch: int, size: int, lo: float, hi: float):
    """Per example a random [start, stop) covering a fraction in [lo, hi] of `size`."""
    length_rng, start_rng = jax.random.split(rng)
    length = jnp.round(jax.random.uniform(length_rng, (batch,), minval=lo, maxval=hi) * size)
    length = jnp.clip(length, 1, size).astype(jnp.int32)
    start = jax.random.randint(start_rng, (batch,), 0, size - length + 1)
    return start, start + length


def _inside(start: jax.Array, stop: jax.Array, size: int) -> jax.Array:
    """[b, size] booleans: index in [start, stop)."""
    i = jnp.arange(size)
    return (i >= start[:, None]) & (i < stop[:, None])


def random_masks(rng: jax.Array, shape: Sequence[int], kinds: Sequence[str] = MASK_KINDS
                 ) -> jax.Array:
    """float32 masks [b, t, h, w, 1] (1 = known), each example's kind drawn uniformly from
    `kinds` and its box, frame run or border drawn at random."""
    kinds = check_mask_kinds(kinds)
    b, t, h, w = shape
    kind_rng, y_rng, x_rng, t_rng = jax.random.split(rng, 4)
    kind = jax.random.randint(kind_rng, (b,), 0, len(kinds))
    rows = _inside(*_interval(y_rng, b, h, 0.3, 0.6), h)  # [b, h]
    cols = _inside(*_interval(x_rng, b, w, 0.3, 0.6), w)
    frames = _inside(*_interval(t_rng, b, t, 0.25, 0.75), t)
    box = rows[:, None, :, None] & cols[:, None, None, :]  # [b, 1, h, w]
    # Outpainting keeps a larger inner rectangle (60-85% of each side).
    inner_rows = _inside(*_interval(y_rng, b, h, 0.6, 0.85), h)
    inner_cols = _inside(*_interval(x_rng, b, w, 0.6, 0.85), w)
    inner = inner_rows[:, None, :, None] & inner_cols[:, None, None, :]
    first = (jnp.arange(t) == 0)[None, :, None, None]
    every = {
        "none": jnp.zeros((b, t, h, w), bool),
        "first_frame": jnp.broadcast_to(first, (b, t, h, w)),
        "box": jnp.broadcast_to(~box, (b, t, h, w)),
        "spatiotemporal": ~(box & frames[:, :, None, None]),
        "border": jnp.broadcast_to(inner, (b, t, h, w)),
    }
    chosen = jnp.stack([every[k] for k in kinds])  # [kinds, b, t, h, w]
    mask = jnp.take_along_axis(chosen, kind[None, :, None, None, None], axis=0)[0]
    return mask[..., None].astype(jnp.float32)


def masked_video(known: jax.Array, mask: jax.Array) -> jax.Array:
    """The conditional STUNet's extra input [b, t, h, w, 4]: the known pixels (in [-1, 1],
    zero where unknown) and the mask."""
    mask = jnp.broadcast_to(jnp.asarray(mask, known.dtype), (*known.shape[:-1], 1))
    return jnp.concatenate([known * mask, mask], axis=-1)
