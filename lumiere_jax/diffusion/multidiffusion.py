"""MultiDiffusion (Bar-Tal et al., 2023) over temporal windows, as in Lumiere's SSR.

A denoiser that only sees `window` frames is run on overlapping windows of the clip
(stride window - overlap; Lumiere uses a 2-frame overlap). At every sampling step the
per-window predictions are reconciled by least squares,

    argmin_x  sum_i || sqrt(w) * (P_i x - pred_i) ||^2,

with P_i the frame selection of window i and w the per-frame weights of a window. The normal
equations are diagonal (each frame is its own unknown), so the solution is, per frame,

    x[f] = sum_{i covers f} w[f - s_i] pred_i[f - s_i] / sum_{i covers f} w[f - s_i].

The sampler's prediction (eps or v) is, for a fixed z, an affine function of the x0 estimate
with the same coefficients in every window, so averaging predictions averages the x0
estimates: reconciling the prediction is exactly MultiDiffusion's reconciliation of x0.

Per-frame conditioning (the SSR's low-resolution video, whose frame f is the high-resolution
frame f) is cut into the same windows and handed to the denoiser with its window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PredictionFn = Callable[[jax.Array, jax.Array], jax.Array]
# fn(z_window, logsnr, frame_cond_window) for a denoiser with per-frame conditioning.
FrameCondPredictionFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
WEIGHTS = ("uniform", "tapered")


def _check_window(window: int, overlap: int) -> None:
    if window < 1:
        raise ValueError(f"MultiDiffusion: window must be >= 1 frame, got window={window}.")
    if not 0 <= overlap < window:
        raise ValueError(
            f"MultiDiffusion: overlap must be in [0, window), got overlap={overlap} for "
            f"window={window} (Lumiere uses overlap=2)."
        )


def window_starts(num_frames: int, window: int, overlap: int) -> tuple[int, ...]:
    """Start frames of windows of `window` frames, stride window - overlap, covering the clip.

    When the stride does not land on the end, one more window is added ending exactly at
    num_frames (it overlaps its neighbour by more than `overlap`); every window is full.
    """
    _check_window(window, overlap)
    if window > num_frames:
        raise ValueError(
            f"MultiDiffusion: window={window} exceeds the clip's num_frames={num_frames}; a "
            f"window must not exceed the clip (use window={num_frames} for the whole clip)."
        )
    starts = list(range(0, num_frames - window + 1, window - overlap))
    if starts[-1] + window < num_frames:
        starts.append(num_frames - window)
    return tuple(starts)


def window_weights(window: int, overlap: int, kind: str = "uniform") -> np.ndarray:
    """Per-frame weights [window] of one window: 'uniform' (ones) or 'tapered'.

    'tapered' ramps linearly over the `overlap` frames at each end, (k + 1) / (overlap + 1)
    for the k-th frame from an edge, and is 1 inside: a frame near a window's border, where
    the denoiser saw the least temporal context, counts less. Strictly positive, so a frame
    covered by one window only still gets that window's prediction.
    """
    _check_window(window, overlap)
    if kind not in WEIGHTS:
        raise ValueError(f"MultiDiffusion: unknown weights {kind!r}; expected one of {WEIGHTS}.")
    if kind == "uniform":
        return np.ones(window, np.float32)
    k = np.arange(window)
    ramp = np.minimum(k + 1, window - k) / (overlap + 1)
    return np.minimum(ramp, 1.0).astype(np.float32)


def split_windows(x: jax.Array, starts: Sequence[int], window: int) -> jax.Array:
    """x [b, f, ...] -> windows [n, b, window, ...], window i = frames starts[i]:+window."""
    return jnp.stack([x[:, s : s + window] for s in starts])


def merge_windows(
    windows: jax.Array,
    starts: Sequence[int],
    num_frames: int,
    weights: np.ndarray | Sequence[float] | None = None,
) -> jax.Array:
    """The least-squares merge: windows [n, b, window, ...] -> [b, num_frames, ...].

    Per frame, the weighted average of the windows covering it. weights: static per-frame
    weights [window] (default uniform). Accumulates in at least float32; returns the
    windows' dtype.
    """
    n, window = windows.shape[0], windows.shape[2]
    weights = np.ones(window) if weights is None else np.asarray(weights, np.float64)
    if len(starts) != n or weights.shape != (window,):
        raise ValueError(
            f"merge_windows: got {n} windows of {window} frames, {len(starts)} starts and "
            f"weights of shape {weights.shape}; need one start per window and [window] weights."
        )
    total = np.zeros(num_frames)
    for s in starts:
        total[s : s + window] += weights
    if not np.all(total > 0):
        raise ValueError(
            f"merge_windows: frames {np.flatnonzero(total <= 0).tolist()} of {num_frames} have "
            f"no window with positive weight; use window_starts() to cover the clip."
        )
    # Normalise in float64 on the host: a frame seen by one window gets coefficient exactly
    # 1, so the merge is then bitwise the prediction itself.
    coef = np.stack([weights / total[s : s + window] for s in starts]).astype(np.float32)
    acc_dtype = jnp.promote_types(windows.dtype, jnp.float32)
    feature_dims = (1,) * (windows.ndim - 3)
    out = None
    for i, s in enumerate(starts):
        # Elementwise scale and pad (not a [f, n * window] matmul): exact in any precision
        # mode, and f times less work on 1024x1024 SSR frames.
        part = windows[i].astype(acc_dtype) * coef[i].reshape((1, window) + feature_dims)
        pad = [(0, 0), (s, num_frames - s - window)] + [(0, 0)] * len(feature_dims)
        part = jnp.pad(part, pad)
        out = part if out is None else out + part
    return out.astype(windows.dtype)


def _check_frame_cond(frame_cond: Any, num_frames: int) -> None:
    leaves = jax.tree_util.tree_leaves(frame_cond)
    shapes = [jnp.shape(leaf) for leaf in leaves]
    if not leaves or any(len(s) < 2 or s[1] != num_frames for s in shapes):
        raise ValueError(
            f"multidiffusion: every frame_cond leaf must be [b, {num_frames}, ...] with frames "
            f"on axis 1 (the clip's frame count), got leaf shapes {shapes}."
        )


def multidiffusion(
    fn: PredictionFn | FrameCondPredictionFn,
    num_frames: int,
    window: int,
    overlap: int = 2,
    weights: str = "uniform",
    frame_cond: Any = None,
) -> PredictionFn:
    """Wrap fn(z [b, window, ...], logsnr [b]) into fn'(z [b, num_frames, ...], logsnr [b]).

    All windows go through fn in one vmapped call over a new window axis (not concatenated
    into the batch: fn typically closes over per-example conditioning of batch b, e.g. text
    embeddings or classifier_free_guidance's condition), then merge_windows reconciles them.
    If the window is the whole clip, fn' returns fn(z, logsnr) unchanged.

    frame_cond: optional pytree of per-frame conditioning, leaves [b, num_frames, ...] (e.g.
    the SSR's low-resolution video [b, f, h, w, 3]; its frame axis is z's, whatever its
    spatial size). It is split into the same windows once, here, and fn is then called as
    fn(z_window, logsnr, frame_cond_window); for the whole clip, fn(z, logsnr, frame_cond).
    fn' still takes (z, logsnr), so it drops into any sampler.
    """
    starts = window_starts(num_frames, window, overlap)
    frame_weights = window_weights(window, overlap, weights)
    if frame_cond is not None:
        _check_frame_cond(frame_cond, num_frames)
        cond_windows = jax.tree_util.tree_map(
            lambda c: split_windows(c, starts, window), frame_cond)

    def windowed(z: jax.Array, logsnr: jax.Array) -> jax.Array:
        if z.ndim < 2 or z.shape[1] != num_frames:
            raise ValueError(
                f"multidiffusion: z has shape {z.shape}, expected [b, {num_frames}, ...] with "
                f"frames on axis 1; build the wrapper with the clip's frame count."
            )
        if frame_cond is not None:
            cond_batch = {jnp.shape(c)[0] for c in jax.tree_util.tree_leaves(frame_cond)}
            if cond_batch != {z.shape[0]}:
                raise ValueError(
                    f"multidiffusion: frame_cond has batch {sorted(cond_batch)} but z has "
                    f"batch {z.shape[0]}; build the wrapper with this batch's condition."
                )
        if starts == (0,):  # the window is the whole clip: nothing to reconcile
            return fn(z, logsnr) if frame_cond is None else fn(z, logsnr, frame_cond)
        z_windows = split_windows(z, starts, window)
        if frame_cond is None:
            preds = jax.vmap(lambda zw: fn(zw, logsnr))(z_windows)
        else:
            preds = jax.vmap(lambda zw, cw: fn(zw, logsnr, cw))(z_windows, cond_windows)
        return merge_windows(preds, starts, num_frames, frame_weights)

    return windowed
