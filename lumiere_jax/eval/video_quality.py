"""Reference metrics of the SSR stage: PSNR/SSIM against ground truth and the window seam ratio.

The seam ratio measures what MultiDiffusion is for. A video sampled window by window can
jump where one window's frames end and the next one's begin; the ratio compares the mean
frame-to-frame change across those window edges with the mean change between the other
neighbouring frames:

    seam_ratio = mean_{f in edges} |x_f - x_{f-1}| / mean_{f not in edges} |x_f - x_{f-1}|,

pooled over a batch of videos (so clips that barely move do not dominate). A video without
seams (and moving at a steady pace, as the built-in world's shapes do) scores about 1; one
whose other frames do not change at all scores NaN (there is no pace to compare with).
"""

from __future__ import annotations

from collections.abc import Sequence

import dm_pix as pix
import jax
import numpy as np

from lumiere_jax.diffusion.multidiffusion import window_starts


def _as_float(videos: np.ndarray) -> np.ndarray:
    return np.asarray(videos, np.float64) / (255.0 if np.asarray(videos).dtype == np.uint8 else 1.0)


def _check_pair(a: np.ndarray, b: np.ndarray, where: str) -> None:
    if np.shape(a) != np.shape(b) or np.ndim(a) < 3:
        raise ValueError(f"{where}: expected two arrays of the same shape [..., H, W, C], got "
                         f"{np.shape(a)} and {np.shape(b)}")


def psnr(videos: np.ndarray, reference: np.ndarray) -> float:
    """Mean PSNR (dB) over the videos (first axis) of uint8 videos [n, t, H, W, 3] against the
    reference; each video's PSNR is computed from its mean squared error over all its pixels.
    Identical videos score +inf."""
    _check_pair(videos, reference, "psnr")
    diff = _as_float(videos) - _as_float(reference)
    mse = np.mean(diff.reshape(len(diff), -1) ** 2, axis=1)
    with np.errstate(divide="ignore"):
        return float(np.mean(10.0 * np.log10(1.0 / mse)))


def ssim(videos: np.ndarray, reference: np.ndarray) -> float:
    """Mean SSIM (dm_pix: 11x11 Gaussian window, sigma 1.5) over all frames, in [0, 1] pixels."""
    _check_pair(videos, reference, "ssim")
    a = _as_float(videos).astype(np.float32)
    b = _as_float(reference).astype(np.float32)
    frames = (-1,) + a.shape[-3:]
    return float(np.mean(jax.device_get(pix.ssim(a.reshape(frames), b.reshape(frames)))))


def window_edges(num_frames: int, window: int, overlap: int) -> tuple[int, ...]:
    """Frames f whose step from f-1 crosses the start or end of one of the MultiDiffusion
    windows (diffusion.multidiffusion.window_starts) that cover the clip."""
    starts = window_starts(num_frames, window, overlap)
    ends = [s + window for s in starts]
    return tuple(sorted({f for f in (*starts, *ends) if 0 < f < num_frames}))


def seam_ratio(videos: np.ndarray, edges: Sequence[int]) -> float:
    """The seam ratio (module docstring) of videos [n, t, H, W, C] at the given edge frames."""
    v = _as_float(videos)
    if v.ndim != 5 or v.shape[1] < 3:
        raise ValueError(f"seam_ratio: expected videos [n, t >= 3, H, W, C], got {v.shape}")
    steps = np.abs(np.diff(v, axis=1)).mean(axis=(0, 2, 3, 4))  # [t - 1]: step f-1 -> f
    at_edge = np.zeros(len(steps), bool)
    for f in edges:
        if not 0 < f < v.shape[1]:
            raise ValueError(f"seam_ratio: edge frame {f} is not in 1..{v.shape[1] - 1}")
        at_edge[f - 1] = True
    if at_edge.all() or not at_edge.any():
        raise ValueError(f"seam_ratio: edges {list(edges)} must mark some but not all of the "
                         f"{len(steps)} frame steps")
    interior = steps[~at_edge].mean()
    if interior < 1e-6:  # nothing moves between the other frames: no pace to compare with
        return float("nan")
    return float(steps[at_edge].mean() / interior)
