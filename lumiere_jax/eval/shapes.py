"""Score videos of the shapes world against their captions, analytically (no learned network).

For one video uint8 [t, h, w, 3] and a caption (or attribute dict), `score_video`:

1. Background: per frame, a robust least-squares plane (per channel, in x and y) fitted to the
   border ring; this covers constant backgrounds and linear gradients, and follows flicker.
2. Colour: pixels far (> 50 RGB units) from the background are foreground; the median colour
   of their most distinct quarter is snapped to the nearest palette colour, or "unknown" when
   more than 100 units from every palette colour.
3. Opacity map: each pixel's (pixel - background) projected onto (object colour - background),
   where the object colour is the mean of the frame's most distinct tenth of foreground
   pixels, clipped to [0, 1], and kept only in a disc around the object's core (>= 0.5), so
   stray noise elsewhere does not count. A frame "has the object" when its core is object-sized
   (0.3x the smallest object's area up to 4x the largest's).
4. Shape: template matching. For up to 8 frames, each candidate shape is rendered with the
   generator's anti-aliased renderer at the opacity map's centroid and at the radius its area
   implies (x 0.9, 1, 1.1; offsets of +-0.5 px), and compared with the soft IoU
   sum(min(a, b)) / sum(max(a, b)). The shape with the best mean IoU wins if that IoU reaches
   SHAPE_IOU_GATE (0.7); otherwise "unknown". A soft IoU also sees edge sharpness: Gaussian
   blobs of the right colour score 0.51-0.65 against every template (the disc included),
   clean renders >= 0.97, renders blurred by 0.7 px >= 0.78 (measured on 100 clips each).
   Opacity below 2.5x the pixel noise (estimated from the border) is cut first.
5. Motion (t > 1): least-squares velocity of the centroid trajectory; "still" when the fitted
   displacement over the clip is under 10% of the short side, else the nearest of 8 directions,
   or "erratic" when a straight line explains < 60% of the trajectory's variance (R^2).
6. Size: radius from the median area and the detected shape; small/large split at the geometric
   mean of the two generator radii.

Stability (t > 1; 1.0 for a single frame) = 1 - flicker, where flicker is the mean of three
frame-to-frame changes, each in [0, 1] and averaged over consecutive frame pairs:
  background change: mean |frame_t - frame_t+1| / 255 over pixels that are background in both;
  object colour change: mean |core colour_t - core colour_t+1| / 255 over pairs with the object;
  object area change: |A_t - A_t+1| / max(A_t, A_t+1), with A = 0 where the object is missing.
A clean clip scores ~0.99; frame-wise brightness flicker or popping objects lower it.
Persistence = fraction of frames that have the object.

Frames with a short side of 128 pixels or more are first area-averaged down by the integer
factor short_side // 64, which keeps the cost flat; thresholds are relative to the short side.
Cost: ~10 ms per 16x32x32 clip, ~35 ms at 64x64, on one CPU core.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lumiere_jax.data import synthetic

FOREGROUND_DISTANCE = 50.0  # RGB distance from the background that marks foreground
COLOUR_GATE = 100.0  # max RGB distance to the nearest palette colour
SHAPE_IOU_GATE = 0.7  # min mean soft IoU of the best template
STILL_DISPLACEMENT = 0.10  # fitted travel / short side below which an object is still
LINE_FIT_GATE = 0.6  # min R^2 of a straight-line trajectory for a moving object
MAX_SHAPE_FRAMES = 8  # frames used for template matching
WORKING_SIZE = 64  # frames are reduced to about this short side

_DIRECTIONS = {  # image coordinates (y down)
    "right": (1.0, 0.0),
    "up-right": (2**-0.5, -(2**-0.5)),
    "up": (0.0, -1.0),
    "up-left": (-(2**-0.5), -(2**-0.5)),
    "left": (-1.0, 0.0),
    "down-left": (-(2**-0.5), 2**-0.5),
    "down": (0.0, 1.0),
    "down-right": (2**-0.5, 2**-0.5),
}
_SCALES = np.array([0.9, 1.0, 1.1], np.float32)
_OFFSETS = np.array([(0, 0), (0.5, 0), (-0.5, 0), (0, 0.5), (0, -0.5)], np.float32)


def score_video(video: np.ndarray, caption_or_attrs: str | dict[str, Any]) -> dict[str, Any]:
    """Score one video uint8 [t, h, w, 3] (or one image [h, w, 3]) against its caption.

    Returns everything `detect` returns, plus '<attribute>_ok' for shape, colour, size,
    motion, background: None when the caption does not name it (motion_ok also when t == 1),
    else whether the detection equals it ("unknown"/"erratic" detections count as wrong).
    """
    target = _target_attributes(caption_or_attrs)
    result = detect(video)
    single_frame = result["motion"] is None
    for key in synthetic.SEMANTIC_KEYS:
        wanted = target[key]
        if wanted is None or (key == "motion" and single_frame):
            result[f"{key}_ok"] = None
        else:
            result[f"{key}_ok"] = bool(result[key] == wanted)
    return result


def detect(video: np.ndarray) -> dict[str, Any]:
    """What one video uint8 [t, h, w, 3] (or image [h, w, 3]) shows, with no caption.

    Returns 'colour', 'shape', 'size', 'background' (a name or "unknown"); 'motion' (a
    direction, "still", "erratic" or "unknown"; None for t == 1); 'shape_iou' (best mean soft
    IoU); 'stability', 'flicker' and its parts 'flicker_background', 'flicker_colour',
    'flicker_area'; 'persistence'; 'trajectory' float32 [t, 2] of (x / width, y / height) of
    the object's centroid, NaN where it is missing.
    """
    frames = _check_video(video)
    _, h, w, _ = frames.shape
    frames, factor = _reduce(frames.astype(np.float32))
    # Channels first: numpy reduces over a leading axis of 3 much faster than a trailing one.
    result = _analyse(np.ascontiguousarray(frames.transpose(3, 0, 1, 2)))
    trajectory = result.pop("trajectory_px") * factor / np.array([w, h], np.float32)
    result["trajectory"] = trajectory.astype(np.float32)
    return result


def score_batch(
    videos: np.ndarray | Sequence[np.ndarray], captions: Sequence[str | dict[str, Any]]
) -> dict[str, Any]:
    """Mean scores over many videos ([n, t, h, w, 3] or a list) and their captions.

    Returns 'n'; '<attribute>_acc' for colour, shape, size, motion, background (the fraction
    correct among videos whose caption names that attribute; None if none does); 'all_acc'
    (colour, shape and, where scored, motion all correct); mean 'stability', 'flicker',
    'persistence' and 'shape_iou'; 'motion_by_size' (`motion_outcomes`).
    """
    if len(videos) != len(captions):
        raise ValueError(f"score_batch got {len(videos)} videos but {len(captions)} captions")
    if len(videos) == 0:
        raise ValueError("score_batch needs at least one video")
    targets = [_target_attributes(c) for c in captions]  # parsed once, for both uses
    scores = [score_video(v, t) for v, t in zip(videos, targets)]
    out: dict[str, Any] = {"n": len(scores)}
    for key in synthetic.SEMANTIC_KEYS:
        marks = [s[f"{key}_ok"] for s in scores if s[f"{key}_ok"] is not None]
        out[f"{key}_acc"] = float(np.mean(marks)) if marks else None
    out["all_acc"] = float(
        np.mean(
            [
                all(s[f"{k}_ok"] is not False for k in ("colour", "shape", "motion"))
                for s in scores
            ]
        )
    )
    for key in ("stability", "flicker", "persistence", "shape_iou"):
        out[key] = float(np.mean([s[key] for s in scores]))
    out["motion_by_size"] = motion_outcomes(scores, targets)
    return out


MOTION_OUTCOMES = ("right", "neighbour", "opposite", "other", "still", "erratic", "unknown")


def motion_outcomes(scores: Sequence[dict[str, Any]],
                    targets: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """How each captioned motion came out, counted per captioned size: {size: {outcome: n}}.

    Outcomes (MOTION_OUTCOMES): 'right'; for a moving caption, a detected direction 45 degrees
    off ('neighbour'), reversed ('opposite') or otherwise ('other'); a still caption detected
    moving is 'other'; 'still', 'erratic' (no straight path) and 'unknown' (no object) as
    detected. Small objects fail far more often than large ones (README Stage 1), and these
    counts say how. Videos whose caption names no size or motion are left out.
    """
    out: dict[str, dict[str, int]] = {}
    for score, target in zip(scores, targets):
        size, wanted, got = target["size"], target["motion"], score["motion"]
        if size is None or wanted is None or got is None:
            continue
        if got == wanted:
            outcome = "right"
        elif got in ("still", "erratic", "unknown"):
            outcome = got
        elif wanted == "still":
            outcome = "other"
        else:
            cosine = float(np.dot(_DIRECTIONS[got], _DIRECTIONS[wanted]))
            outcome = "neighbour" if cosine > 0.5 else "opposite" if cosine < -0.9 else "other"
        counts = out.setdefault(size, dict.fromkeys(MOTION_OUTCOMES, 0))
        counts[outcome] += 1
    return out


def _analyse(planes: np.ndarray) -> dict[str, Any]:
    """Detect everything in float32 channel-first frames [3, t, h, w] (at working size)."""
    _, t, h, w = planes.shape
    short = float(min(h, w))
    background, noise = _fit_background(planes)  # [3, t, h, w], [t]
    offset = planes - background
    distance = np.sqrt(np.sum(offset * offset, axis=0))  # [t, h, w]

    colour, solid_rgb = _detect_colour(planes, distance)
    reference = solid_rgb[:, :, None, None] - background  # [3, t, h, w]
    contrast = np.maximum(np.sum(reference * reference, 0), 1.0)  # [t, h, w]
    alpha = np.sum(offset * reference, 0) / contrast
    # Pixel noise leaks into the opacity map with std noise / sqrt(contrast); cut it at 2.5 std.
    floor = np.minimum(2.5 * noise[:, None, None] / np.sqrt(contrast), 0.5)
    alpha = np.clip((alpha - floor) / (1.0 - floor), 0.0, 1.0)  # [t, h, w]

    min_radius = min(synthetic.SIZES.values()) * short
    max_radius = max(synthetic.SIZES.values()) * short
    min_area = 0.3 * np.pi * min_radius**2
    max_area = 4.0 * np.pi * max_radius**2
    local_alpha, found = _isolate_object(alpha, min_area, max_area)
    area = local_alpha.sum(axis=(1, 2))  # [t]
    trajectory = _centroids(local_alpha)  # [t, 2], NaN where not found
    trajectory[~found] = np.nan

    shape, shape_iou = _detect_shape(local_alpha, trajectory, area, found)
    size = _detect_size(shape, area, found, short)
    motion = _detect_motion(trajectory, found, short) if t > 1 else None
    flicker_parts = _flicker(planes, alpha, local_alpha, area, found)
    flicker = float(np.mean(flicker_parts))
    return {
        "colour": colour,
        "shape": shape,
        "size": size,
        "motion": motion,
        "background": _detect_background(background),
        "shape_iou": shape_iou,
        "stability": 1.0 - flicker,
        "flicker": flicker,
        "flicker_background": flicker_parts[0],
        "flicker_colour": flicker_parts[1],
        "flicker_area": flicker_parts[2],
        "persistence": float(found.mean()),
        "trajectory_px": trajectory,
    }


# ----------------------------------------------------------------------------------------------
# Steps.


def _fit_background(planes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame plane a + b*x + c*y per channel, fitted robustly to the border ring.

    Returns the background [3, t, h, w] and each frame's pixel noise [t] (per-channel std,
    from the median residual norm of the border: that of 3 unit normals is 1.54).
    """
    _, t, h, w = planes.shape
    ring = max(1, min(h, w) // 16)
    border = np.zeros((h, w), bool)
    border[:ring] = border[-ring:] = True
    border[:, :ring] = border[:, -ring:] = True
    ys, xs = np.nonzero(border)
    # Design columns (1, x, y) of the border pixels, coordinates centred for conditioning.
    design = np.stack([np.ones(len(xs)), xs / w - 0.5, ys / h - 0.5]).astype(np.float32)  # [3, n]
    values = planes[:, :, ys, xs]  # [3 channels, t, n]
    weights = np.ones(values.shape[1:], np.float32)  # [t, n]
    for _ in range(3):  # refit without the outliers (object pixels touching the border)
        weighted = weights[:, None, :] * design[None]  # [t, 3, n]
        gram = np.sum(weighted[:, :, None, :] * design[None, None], -1)  # [t, 3, 3]
        rhs = np.stack([np.sum(weighted * channel[:, None, :], -1) for channel in values], -1)
        coef = np.linalg.solve(gram + 1e-3 * np.eye(3, dtype=np.float32), rhs)  # [t, 3, 3 ch]
        fitted = coef.transpose(2, 0, 1) @ design  # [3, t, n]
        residual = np.sqrt(np.sum((values - fitted) ** 2, axis=0))  # [t, n]
        limit = np.maximum(15.0, 3.0 * np.median(residual, axis=1, keepdims=True))
        weights = (residual < limit).astype(np.float32)
    coef = coef.transpose(2, 0, 1)[..., None, None]  # [3 ch, t, 3, 1, 1]
    x = (np.arange(w, dtype=np.float32) / w - 0.5)[None, None, :]
    y = (np.arange(h, dtype=np.float32) / h - 0.5)[None, :, None]
    background = (coef[:, :, 0] + coef[:, :, 1] * x + coef[:, :, 2] * y).astype(np.float32)
    return background, np.median(residual, axis=1) / 1.54


def _detect_colour(planes: np.ndarray, distance: np.ndarray) -> tuple[str, np.ndarray]:
    """Palette name of the foreground's colour, and each frame's full-opacity colour [3, t].

    The name comes from the median of the most distinct quarter of all foreground pixels. The
    full-opacity colour (the reference for the opacity map) is the mean of each frame's most
    distinct tenth, so dim, off-palette or flickering objects still reach opacity 1 inside,
    while a soft blob stays soft.
    """
    t = planes.shape[1]
    foreground = distance > FOREGROUND_DISTANCE  # [t, h, w]
    if not foreground.any():
        return "unknown", np.full((3, t), 255.0, np.float32)
    strong = foreground & (distance >= np.percentile(distance[foreground], 75))
    measured = np.median(planes[:, strong], axis=1)  # [3]

    # Per frame, the k-th largest foreground distance with k = a tenth of its foreground.
    ranked = np.sort(np.where(foreground, distance, -np.inf).reshape(t, -1), axis=1)
    counts = foreground.reshape(t, -1).sum(axis=1)
    tenth = np.maximum(1, np.ceil(0.1 * counts)).astype(int)
    threshold = ranked[np.arange(t), ranked.shape[1] - tenth]  # -inf where nothing is found
    peak = foreground & (distance >= threshold[:, None, None])  # [t, h, w]
    peak_count = peak.sum(axis=(1, 2))
    solid = (planes * peak).sum(axis=(2, 3)) / np.maximum(peak_count, 1)  # [3, t]
    solid[:, peak_count == 0] = measured[:, None]

    names = list(synthetic.COLOURS)
    palette = np.array([synthetic.COLOURS[n] for n in names], np.float32)
    gaps = np.linalg.norm(palette - measured, axis=-1)
    best = int(np.argmin(gaps))
    return (names[best] if gaps[best] <= COLOUR_GATE else "unknown"), solid.astype(np.float32)


def _isolate_object(
    alpha: np.ndarray, min_area: float, max_area: float
) -> tuple[np.ndarray, np.ndarray]:
    """Opacity kept only near each frame's core, and which frames hold an object-sized core."""
    t, h, w = alpha.shape
    core = alpha >= 0.5
    core_area = core.sum(axis=(1, 2)).astype(np.float32)
    found = (core_area >= min_area) & (core_area <= max_area)
    grid_y, grid_x = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    safe_area = np.maximum(core_area, 1.0)
    cx = (core * grid_x).sum(axis=(1, 2)) / safe_area
    cy = (core * grid_y).sum(axis=(1, 2)) / safe_area
    # A disc a little wider than the largest shape of this core area (triangles reach 1.45 r).
    reach = 2.2 * np.sqrt(safe_area / np.pi) + 1.5
    near = (grid_x - cx[:, None, None]) ** 2 + (grid_y - cy[:, None, None]) ** 2
    near = near <= reach[:, None, None] ** 2
    local = np.where(near & found[:, None, None], alpha, 0.0).astype(np.float32)
    return local, found


def _centroids(alpha: np.ndarray) -> np.ndarray:
    """Opacity-weighted centroids [t, 2] (x, y) in pixels."""
    t, h, w = alpha.shape
    grid_y, grid_x = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    mass = np.maximum(alpha.sum(axis=(1, 2)), 1e-6)
    cx = (alpha * grid_x).sum(axis=(1, 2)) / mass
    cy = (alpha * grid_y).sum(axis=(1, 2)) / mass
    return np.stack([cx, cy], -1).astype(np.float32)


def _detect_shape(
    alpha: np.ndarray, trajectory: np.ndarray, area: np.ndarray, found: np.ndarray
) -> tuple[str, float]:
    """Best-matching template shape by mean soft IoU over up to 8 frames, with a gate."""
    indices = np.nonzero(found)[0]
    if len(indices) == 0:
        return "unknown", 0.0
    indices = indices[np.round(np.linspace(0, len(indices) - 1, MAX_SHAPE_FRAMES)).astype(int)]
    indices = np.unique(indices)
    # Triangles reach 1.55x the equal-area circle's radius; leave room for the 1.1 scale.
    half = int(np.ceil(1.8 * np.sqrt(area[indices].max() / np.pi))) + 2
    size = 2 * half
    padded = np.pad(alpha[indices], ((0, 0), (half, half), (half, half)))
    crops, grid_x, grid_y = [], [], []
    for k, frame in enumerate(indices):
        x0 = int(np.floor(trajectory[frame, 0])) - half  # crop origin, unpadded coordinates
        y0 = int(np.floor(trajectory[frame, 1])) - half
        crops.append(padded[k, y0 + half : y0 + half + size, x0 + half : x0 + half + size])
        coords = np.arange(size, dtype=np.float32) + 0.5
        grid_x.append(x0 + coords - trajectory[frame, 0])
        grid_y.append(y0 + coords - trajectory[frame, 1])
    crops = np.stack(crops)[:, None]  # [f, 1, s, s]
    # Candidate grid over (scale, offset): [f, k, s, s] relative coordinates.
    offsets = _OFFSETS[None, :, :]  # [1, o, 2]
    dx = np.stack(grid_x)[:, None, None, :] - offsets[..., 0, None, None]  # [f, o, 1, s]
    dy = np.stack(grid_y)[:, None, :, None] - offsets[..., 1, None, None]  # [f, o, s, 1]
    dx = np.repeat(dx, len(_SCALES), axis=1)  # [f, o*n, 1, s]
    dy = np.repeat(dy, len(_SCALES), axis=1)
    scales = np.tile(_SCALES, len(_OFFSETS))[None, :, None, None]  # [1, o*n, 1, 1]

    mean_iou = {}
    for shape in synthetic.SHAPES:
        radius = np.sqrt(area[indices] / synthetic.shape_area_factor(shape))
        template = synthetic.shape_coverage(shape, dx, dy, radius[:, None, None, None] * scales)
        inter = np.minimum(crops, template).sum(axis=(2, 3))
        union = np.maximum(crops, template).sum(axis=(2, 3))
        iou = inter / np.maximum(union, 1e-6)  # [f, candidates]
        mean_iou[shape] = float(iou.max(axis=1).mean())
    best = max(mean_iou, key=mean_iou.get)
    if mean_iou[best] < SHAPE_IOU_GATE:
        return "unknown", mean_iou[best]
    return best, mean_iou[best]


def _detect_size(shape: str, area: np.ndarray, found: np.ndarray, short: float) -> str:
    if not found.any():
        return "unknown"
    factor = synthetic.shape_area_factor(shape if shape in synthetic.SHAPES else "circle")
    radius = np.sqrt(float(np.median(area[found])) / factor) / short
    split = np.sqrt(synthetic.SIZES["small"] * synthetic.SIZES["large"])
    return "small" if radius < split else "large"


def _detect_motion(trajectory: np.ndarray, found: np.ndarray, short: float) -> str:
    t = trajectory.shape[0]
    frames = np.nonzero(found)[0].astype(np.float32)
    if len(frames) < 2:
        return "unknown"
    points = trajectory[found]  # [n, 2]
    centred_t = frames - frames.mean()
    velocity = (centred_t[:, None] * (points - points.mean(0))).sum(0) / np.sum(centred_t**2)
    displacement = velocity * (t - 1) / short  # fitted travel over the clip / short side
    if np.linalg.norm(displacement) < STILL_DISPLACEMENT:
        return "still"
    if len(frames) >= 3:
        fitted = points.mean(0) + centred_t[:, None] * velocity
        total = np.sum((points - points.mean(0)) ** 2)
        r_squared = 1.0 - np.sum((points - fitted) ** 2) / max(total, 1e-6)
        if r_squared < LINE_FIT_GATE:
            return "erratic"
    unit = displacement / np.linalg.norm(displacement)
    names = list(_DIRECTIONS)
    return names[int(np.argmax([unit @ np.array(_DIRECTIONS[n]) for n in names]))]


def _detect_background(background: np.ndarray) -> str:
    """Nearest background name from the fitted planes' gray levels (and their spread)."""
    gray = background.mean(axis=(0, 1))  # [h, w]
    if float(gray.max() - gray.min()) > 40.0:
        return "gradient"
    mean = background.mean(axis=(1, 2, 3))  # [3]
    if float(mean.max() - mean.min()) > 40.0:
        return "unknown"  # coloured, not one of the neutral backgrounds
    levels = {n: v[0] for n, v in synthetic.BACKGROUNDS.items() if v[0] == v[1]}
    return min(levels, key=lambda n: abs(levels[n] - float(mean.mean())))


def _flicker(
    planes: np.ndarray, alpha: np.ndarray, local: np.ndarray, area: np.ndarray, found: np.ndarray
) -> tuple[float, float, float]:
    """(background change, object colour change, object area change), each in [0, 1]."""
    if planes.shape[1] == 1:
        return (0.0, 0.0, 0.0)
    still_background = (alpha < 0.02)[:-1] & (alpha < 0.02)[1:]  # [t-1, h, w]
    change = np.abs(planes[:, 1:] - planes[:, :-1]).mean(0) / 255.0  # [t-1, h, w]
    counts = still_background.sum(axis=(1, 2))
    per_pair = (change * still_background).sum(axis=(1, 2)) / np.maximum(counts, 1)
    background_change = float(per_pair[counts > 0].mean()) if (counts > 0).any() else 1.0

    core = local >= 0.9
    core_count = core.sum(axis=(1, 2))
    colours = (planes * core).sum(axis=(2, 3)).T / np.maximum(core_count, 1)[:, None]  # [t, 3]
    both = found[:-1] & found[1:] & (core_count[:-1] > 0) & (core_count[1:] > 0)
    colour_steps = np.abs(colours[1:] - colours[:-1]).mean(-1) / 255.0
    colour_change = float(colour_steps[both].mean()) if both.any() else 0.0

    kept = np.where(found, area, 0.0)
    larger = np.maximum(kept[1:], kept[:-1])
    area_steps = np.abs(kept[1:] - kept[:-1]) / np.maximum(larger, 1e-6)
    area_change = float(area_steps.mean())
    return (background_change, colour_change, area_change)


# ----------------------------------------------------------------------------------------------
# Input handling.


def _target_attributes(caption_or_attrs: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(caption_or_attrs, str):
        return synthetic.parse_caption(caption_or_attrs)
    if isinstance(caption_or_attrs, dict):
        synthetic.check_attributes(caption_or_attrs)
        return {key: caption_or_attrs.get(key) for key in synthetic.SEMANTIC_KEYS}
    raise TypeError(
        "score_video expects a caption str or an attribute dict, got "
        f"{type(caption_or_attrs).__name__}"
    )


def _check_video(video: np.ndarray) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim == 3:
        video = video[None]  # one image
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(
            f"expected a video uint8 [t, h, w, 3] (or an image [h, w, 3]), got shape {video.shape}"
        )
    if video.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 pixels in [0, 255], got dtype {video.dtype}; convert with "
            "np.clip(np.round(x * 255), 0, 255).astype(np.uint8) for [0, 1] floats"
        )
    if min(video.shape[1:3]) < 8 or video.shape[0] < 1:
        raise ValueError(f"video {video.shape} is too small to score (need h, w >= 8, t >= 1)")
    return video


def _reduce(frames: np.ndarray) -> tuple[np.ndarray, int]:
    """Area-average [t, h, w, 3] by the integer factor that brings the short side near 64."""
    factor = max(1, min(frames.shape[1:3]) // WORKING_SIZE)
    if factor == 1:
        return frames, 1
    t, h, w, c = frames.shape
    h2, w2 = h // factor, w // factor
    cropped = frames[:, : h2 * factor, : w2 * factor]
    return cropped.reshape(t, h2, factor, w2, factor, c).mean(axis=(2, 4)), factor
