"""How strongly a video of the shapes world shows the "stripes" style, analytically.

`style_score(video)`: per frame, the object's interior (pixels more than FOREGROUND_DISTANCE
RGB units from the background plane fitted to the border, as in eval.shapes, eroded by one
pixel so anti-aliased edges do not count) is fitted per channel with a constant plus a cosine
and a sine across the diagonal at the style's period, phase free (so it follows the object
wherever it is); the score is the amplitude of that wave, the RGB norm of the per-channel
(cos, sin) coefficients, in RGB units, averaged over the frames that hold an interior of at
least MIN_INTERIOR pixels (0 if none does).

Measured on ground truth (32x32, 16 frames, the first 200 clips of the 'test' split): plain
clips score 0.004 on average (at most 0.19: flat interiors); styled clips 26-40, mean 31.5
(26-30 for yellow, magenta and cyan, 35-40 for red, green and blue: the tint's contrast,
STRIPE_TINT * |white - colour|, is smaller for the light colours). A blurred or half-learned
texture scores in between, so the score measures how much of the style a model reproduces;
samples of the plain STUNet score about 7 (their fills are not perfectly flat). ~2 ms a clip.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lumiere_jax.data import synthetic
from lumiere_jax.eval import shapes

MIN_INTERIOR = 6  # pixels of eroded object interior a frame needs to be scored


def style_score(video: np.ndarray, style: str = "stripes") -> float:
    """Stripe amplitude (RGB units) inside the object of one video uint8 [t, h, w, 3] (or an
    image [h, w, 3]); see the module docstring."""
    if style not in synthetic.STYLES:
        raise ValueError(f"unknown style {style!r}; styles: {', '.join(synthetic.STYLES)}")
    frames = shapes._check_video(video).astype(np.float32)  # [t, h, w, 3]
    t, h, w, _ = frames.shape
    planes = np.ascontiguousarray(frames.transpose(3, 0, 1, 2))  # [3, t, h, w]
    background, _ = shapes._fit_background(planes)
    distance = np.sqrt(np.sum((planes - background) ** 2, axis=0))  # [t, h, w]
    inside = distance > shapes.FOREGROUND_DISTANCE
    interior = inside.copy()  # eroded by one pixel (4-neighbourhood)
    interior[:, 1:] &= inside[:, :-1]
    interior[:, :-1] &= inside[:, 1:]
    interior[:, :, 1:] &= inside[:, :, :-1]
    interior[:, :, :-1] &= inside[:, :, 1:]
    interior[:, [0, -1]] = False
    interior[:, :, [0, -1]] = False

    short = float(min(h, w))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    phase = (2 * np.pi / (synthetic.STRIPE_PERIOD * short)) * (xs + ys) * 2**-0.5  # [h, w]
    design = np.stack([np.ones_like(phase), np.cos(phase), np.sin(phase)], -1)  # [h, w, 3]
    amplitudes = []
    for k in range(t):
        mask = interior[k]
        if mask.sum() < MIN_INTERIOR:
            continue
        a = design[mask]  # [n, 3]
        b = frames[k][mask]  # [n, 3 channels]
        coef, *_ = np.linalg.lstsq(a.astype(np.float64), b.astype(np.float64), rcond=None)
        amplitudes.append(float(np.sqrt(np.sum(coef[1:] ** 2))))
    return float(np.mean(amplitudes)) if amplitudes else 0.0


def style_scores(videos: np.ndarray | Sequence[np.ndarray], style: str = "stripes"
                 ) -> dict[str, float]:
    """Mean, median and min `style_score` over many videos ([n, t, h, w, 3] or a list)."""
    if len(videos) == 0:
        raise ValueError("style_scores needs at least one video")
    scores = np.array([style_score(v, style) for v in videos])
    return {"n": int(len(scores)), "style_mean": float(scores.mean()),
            "style_median": float(np.median(scores)), "style_min": float(scores.min())}
