"""The built-in world: procedurally generated, captioned videos of one moving shape.

No pretrained weights or web video exist here, so the project trains and evaluates on its own
deterministic world. Each clip shows one anti-aliased shape on a neutral background, moving at
constant velocity, with a caption that says what it is:

    "a small red circle moving left on a gray background"
    "a large cyan triangle standing still on a gradient background"

Attributes (the caption grammar is `a <size> <colour> <shape> <motion> on a <background>
background`, see `caption_for` / `parse_caption`):

    shape       circle, square, triangle            (fixed orientation; triangle points up)
    colour      red, green, blue, yellow, magenta, cyan   (saturated, >= 130 apart in RGB)
    size        small (radius 0.13 of the short side), large (0.21)
    motion      left, right, up, down, up-right, down-left, still
    background  black, gray, white, gradient        (neutral grays, never object colours)

Geometry. Positions are in pixels with pixel (row i, col j) centred at (x, y) = (j + 0.5, i + 0.5);
"up" is towards row 0. A moving object travels 30-45% of the short side over the whole clip
(whatever the frame count or fps: fps is only metadata for writing files), and stays fully in
frame with a small margin. Shapes are rendered with analytic anti-aliasing: pixel coverage =
clip(0.5 - signed_distance, 0, 1), exact for axis-aligned edges.

Splits. The (colour, shape) pairs in `HELDOUT_COMBINATIONS` (4 of the 18) never appear in 'train'
or 'test' and are the only ones in 'heldout', so compositional generalisation can be measured.
Each split draws from its own seed stream, so 'train' and 'test' share no clip.

Style (off by default; `render(..., style=...)`, `ShapesSource(..., style=...)`): "stripes"
fills the object with diagonal stripes, a cosine wave between its colour and a lighter tint of
it (STRIPE_TINT of the way to white, period STRIPE_PERIOD of the short side, fixed to the
object so it moves with it). It draws no random numbers, so a styled clip has exactly the
layout, caption and colour of the plain one. The style images of stylised generation
(configs/shapes_style.py); `lumiere_jax.eval.style.style_score` measures it.

Everything is numpy and deterministic in (world.seed, split, index); one 16x32x32 clip takes
well under a millisecond to a few milliseconds.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 50),
    "blue": (40, 60, 235),
    "yellow": (230, 210, 40),
    "magenta": (205, 45, 205),
    "cyan": (35, 195, 210),
}
SIZES: dict[str, float] = {"small": 0.13, "large": 0.21}  # radius / short side of the frame
MOTIONS = ("left", "right", "up", "down", "up-right", "down-left", "still")
# Gray levels (start, end) of each background's linear ramp; only "gradient" varies.
BACKGROUNDS: dict[str, tuple[float, float]] = {
    "black": (14.0, 14.0),
    "gray": (128.0, 128.0),
    "white": (238.0, 238.0),
    "gradient": (70.0, 180.0),
}
# Unit direction of each motion in image coordinates (x right, y down).
MOTION_DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up-right": (2**-0.5, -(2**-0.5)),
    "down-left": (-(2**-0.5), 2**-0.5),
    "still": (0.0, 0.0),
}

# Held out of 'train' and 'test'; the only pairs in 'heldout'. Every colour and every shape still
# appears in training (each shape with >= 4 colours, each colour with >= 2 shapes).
HELDOUT_COMBINATIONS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "square"), ("blue", "circle"), ("cyan", "triangle")}
)
SPLITS = ("train", "test", "heldout")
_SPLIT_STREAM = {"train": 0, "test": 1, "heldout": 2}  # separate seed streams per split

MIN_TRAVEL, MAX_TRAVEL = 0.30, 0.45  # total displacement of a moving object / short side
COLOUR_JITTER = 10.0  # max per-channel offset of the object colour
BACKGROUND_JITTER = 8.0  # max offset of the background gray level
STYLES = ("stripes",)  # render(..., style=...); None: plain flat colour
STRIPE_PERIOD = 0.18  # stripe wavelength / short side (5.8 px at 32x32), across the diagonal
STRIPE_TINT = 0.25  # the stripes' light phase: this far from the object colour to white
_TRIANGLE_CIRCUMRADIUS = 1.45  # x radius: the triangle's area is close to the circle's
_SQUARE_HALF_SIDE = 0.9  # x radius

ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "motion": MOTIONS,
    "background": tuple(BACKGROUNDS),
}
SEMANTIC_KEYS = tuple(ATTRIBUTE_VALUES)


@dataclasses.dataclass(frozen=True)
class ShapesWorld:
    """Clip format of the world. fps only travels with the clip (e.g. into mp4 files)."""

    num_frames: int = 16
    height: int = 32
    width: int = 32
    fps: float = 8.0
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.num_frames, int) and self.num_frames >= 1):
            raise ValueError(f"ShapesWorld.num_frames must be an int >= 1, got {self.num_frames!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 16):
                raise ValueError(
                    f"ShapesWorld.{name} must be an int >= 16 (smaller frames cannot show the "
                    f"shapes apart), got {value!r}"
                )
        if not self.fps > 0:
            raise ValueError(f"ShapesWorld.fps must be > 0, got {self.fps!r}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"ShapesWorld.seed must be an int >= 0, got {self.seed!r}")


# ----------------------------------------------------------------------------------------------
# Geometry shared with the evaluator (lumiere_jax/eval/shapes.py renders its templates with it).


def shape_signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, radius) -> np.ndarray:
    """Signed distance in pixels (negative inside) to `shape` of `radius`, centred at dx=dy=0.

    dx, dy: offsets of the query points from the shape's area centroid (broadcastable); radius
    broadcasts with them. Squares use the Chebyshev distance and triangles the largest
    edge-plane distance: exact inside and near edges, which is all anti-aliasing needs.
    """
    radius = np.asarray(radius, dtype=np.float32)
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - radius
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - _SQUARE_HALF_SIDE * radius
    if shape == "triangle":
        # Equilateral, pointing up (y down). Outward edge normals: down, up-right, up-left; the
        # inradius is half the circumradius.
        inradius = 0.5 * _TRIANGLE_CIRCUMRADIUS * radius
        bottom = dy
        upper_right = 0.8660254 * dx - 0.5 * dy
        upper_left = -0.8660254 * dx - 0.5 * dy
        return np.maximum(np.maximum(bottom, upper_right), upper_left) - inradius
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def shape_coverage(shape: str, dx: np.ndarray, dy: np.ndarray, radius) -> np.ndarray:
    """Anti-aliased pixel coverage in [0, 1] (see `shape_signed_distance` for the arguments)."""
    return np.clip(0.5 - shape_signed_distance(shape, dx, dy, radius), 0.0, 1.0)


def shape_area(shape: str, radius: float) -> float:
    """Area in square pixels of `shape` with `radius` (inverse: radius = sqrt(area / factor))."""
    return shape_area_factor(shape) * radius * radius


def shape_area_factor(shape: str) -> float:
    """area / radius**2 for each shape."""
    factors = {
        "circle": np.pi,
        "square": 4.0 * _SQUARE_HALF_SIDE**2,
        "triangle": 3.0 * np.sqrt(3.0) / 4.0 * _TRIANGLE_CIRCUMRADIUS**2,
    }
    if shape not in factors:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    return float(factors[shape])


def shape_extent(shape: str, radius: float) -> tuple[float, float, float, float]:
    """(left, right, up, down) reach of the shape from its centroid, in pixels."""
    if shape == "circle":
        return (radius,) * 4
    if shape == "square":
        return (_SQUARE_HALF_SIDE * radius,) * 4
    if shape == "triangle":
        circumradius = _TRIANGLE_CIRCUMRADIUS * radius
        half_width = 0.8660254 * circumradius
        return (half_width, half_width, circumradius, 0.5 * circumradius)
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


# ----------------------------------------------------------------------------------------------
# Attributes and splits.


def combinations(split: str) -> tuple[tuple[str, str], ...]:
    """The (colour, shape) pairs a split draws from, in a fixed order."""
    _check_split(split)
    every = [(c, s) for c in COLOURS for s in SHAPES]
    if split == "heldout":
        return tuple(pair for pair in every if pair in HELDOUT_COMBINATIONS)
    return tuple(pair for pair in every if pair not in HELDOUT_COMBINATIONS)


def sample_attributes(
    rng: np.random.Generator, split: str = "train", *, with_motion: bool = True,
    size_probs: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    """Draw the semantic attributes (shape, colour, size, motion, background) for `split`.

    with_motion=False leaves motion None (single images: their captions name no motion).
    size_probs: probability of each of SIZES (`size_probabilities`); None draws them uniformly
    with the stream every config so far used.
    """
    pairs = combinations(split)
    colour, shape = pairs[rng.integers(len(pairs))]
    sizes = tuple(SIZES)
    return {
        "shape": shape,
        "colour": colour,
        "size": (_choice(rng, sizes) if size_probs is None
                 else sizes[int(rng.choice(len(sizes), p=size_probs))]),
        "motion": _choice(rng, MOTIONS) if with_motion else None,
        "background": _choice(rng, tuple(BACKGROUNDS)),
    }


def size_probabilities(size_weights: dict[str, float] | None) -> tuple[float, ...] | None:
    """{size: weight} (unnamed sizes weigh 0) -> a probability per SIZES, in its order.

    Equal weights (or None) give None: the uniform draw, so such a config keeps its clips.
    Oversampling small objects ({'small': 3, 'large': 1}) gives their smaller share of the
    loss more of the batches (README Stage 1, session 31).
    """
    if size_weights is None:
        return None
    unknown = sorted(set(size_weights) - set(SIZES))
    if unknown:
        raise ValueError(f"size_weights names unknown sizes {unknown}; sizes are {list(SIZES)}")
    weights = np.array([float(size_weights.get(size, 0.0)) for size in SIZES])
    if not (np.all(np.isfinite(weights)) and np.all(weights >= 0) and weights.sum() > 0):
        raise ValueError(f"size_weights must be finite, >= 0 and not all 0, got {size_weights}")
    if np.all(weights == weights[0]):
        return None
    return tuple(float(w) for w in weights / weights.sum())


def complete_attributes(attrs: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Copy of `attrs` with every missing (None) semantic attribute drawn uniformly."""
    check_attributes(attrs)
    out = dict(attrs)
    for key, values in ATTRIBUTE_VALUES.items():
        if out.get(key) is None:
            out[key] = _choice(rng, values)
    return out


def place(attrs: dict[str, Any], world: ShapesWorld, rng: np.random.Generator) -> dict[str, Any]:
    """Copy of `attrs` with the layout drawn: everything `render` needs besides the semantics.

    Adds 'radius' (pixels / short side), 'trajectory' (float32 [t, 2]: per-frame (x / width,
    y / height) of the shape's area centroid), 'rgb' (uint8 [3]: jittered object colour),
    'background_levels' (float32 [2]: gray level at the ramp's start and end),
    'background_axis' (0: ramp along y, 1: along x) and integer ids '<attribute>_id' (-1 for
    None). A None motion is treated as 'still' (the trajectory is then constant).
    """
    check_attributes(attrs)
    missing = [key for key in ("shape", "colour", "size", "background") if attrs.get(key) is None]
    if missing:
        raise ValueError(
            f"place() needs shape, colour, size and background; {missing} are None. Fill them "
            "with complete_attributes(attrs, rng) first."
        )
    t, h, w = world.num_frames, world.height, world.width
    short = float(min(h, w))
    radius = SIZES[attrs["size"]] * short * (1.0 + rng.uniform(-0.05, 0.05))
    left, right, up, down = shape_extent(attrs["shape"], radius)
    margin = max(1.5, 0.04 * short)  # pixels between the shape and the frame edge
    x_lo, x_hi = left + margin, w - right - margin
    y_lo, y_hi = up + margin, h - down - margin

    direction = np.array(MOTION_DIRECTIONS[attrs.get("motion") or "still"])
    travel = rng.uniform(MIN_TRAVEL, MAX_TRAVEL) * short if t > 1 else 0.0
    # Keep the whole path inside the frame: binds only for wide shapes (large triangles moving
    # sideways travel >= 0.36 of the short side, or 0.26 on 16-pixel frames).
    for component, room in zip(np.abs(direction), (x_hi - x_lo, y_hi - y_lo)):
        if component > 0:
            travel = min(travel, room / component)
    shift = direction * travel  # (dx, dy) over the clip
    start_x = rng.uniform(x_lo - min(0.0, shift[0]), x_hi - max(0.0, shift[0]))
    start_y = rng.uniform(y_lo - min(0.0, shift[1]), y_hi - max(0.0, shift[1]))
    progress = np.linspace(0.0, 1.0, t) if t > 1 else np.zeros(1)
    path_x = start_x + progress * shift[0]
    path_y = start_y + progress * shift[1]

    rgb = np.array(COLOURS[attrs["colour"]], np.float32)
    rgb = np.clip(np.round(rgb + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3)), 0, 255)
    levels = np.array(BACKGROUNDS[attrs["background"]], np.float32)
    levels = levels + rng.uniform(-BACKGROUND_JITTER, BACKGROUND_JITTER)
    if rng.random() < 0.5:
        levels = levels[::-1].copy()  # gradients run either way

    out = dict(attrs)
    out.update(
        radius=np.float32(radius / short),
        trajectory=np.stack([path_x / w, path_y / h], axis=-1).astype(np.float32),
        rgb=rgb.astype(np.uint8),
        background_levels=levels.astype(np.float32),
        background_axis=int(rng.integers(2)),
    )
    for key, values in ATTRIBUTE_VALUES.items():
        out[f"{key}_id"] = values.index(attrs[key]) if attrs.get(key) is not None else -1
    return out


_LAYOUT_KEYS = ("shape", "radius", "trajectory", "rgb", "background_levels", "background_axis")


def render(
    attrs: dict[str, Any],
    world: ShapesWorld,
    rng: np.random.Generator | None = None,
    *,
    style: str | None = None,
) -> np.ndarray:
    """Render the clip described by `attrs`: uint8 [t, h, w, 3].

    style: None (plain, the default) or one of STYLES (see the module docstring); it changes
    only the object's fill, never the layout.

    `attrs` may be fully placed (output of `place`, rendered exactly, no rng needed) or only
    semantic, possibly partial (e.g. from `parse_caption`): then `rng` draws whatever is missing
    and the layout. The trajectory is in normalised units, so a placed clip renders the same
    scene at any resolution; its length must equal world.num_frames.
    """
    if "trajectory" not in attrs:
        if rng is None:
            raise ValueError(
                "render() got attributes without a layout ('trajectory'); pass rng= to draw "
                "it (and any missing attribute), or call place(attrs, world, rng) first."
            )
        attrs = place(complete_attributes(attrs, rng), world, rng)
    check_attributes(attrs)
    missing = [key for key in _LAYOUT_KEYS if attrs.get(key) is None]
    if missing:
        raise ValueError(
            f"render() got a trajectory but no {missing}; pass attributes made by place()."
        )
    trajectory = np.asarray(attrs["trajectory"], np.float32)
    t, h, w = world.num_frames, world.height, world.width
    if trajectory.shape != (t, 2):
        raise ValueError(
            f"attrs['trajectory'] has shape {trajectory.shape}, the world needs ({t}, 2); "
            "re-place the attributes for this world (place(attrs, world, rng))."
        )
    short = float(min(h, w))
    ys = np.arange(h, dtype=np.float32) + 0.5
    xs = np.arange(w, dtype=np.float32) + 0.5
    dx = xs[None, None, :] - (trajectory[:, 0] * w)[:, None, None]  # [t, 1, w]
    dy = ys[None, :, None] - (trajectory[:, 1] * h)[:, None, None]  # [t, h, 1]
    alpha = shape_coverage(attrs["shape"], dx, dy, float(attrs["radius"]) * short)  # [t, h, w]

    background = background_image(attrs, h, w)  # [h, w, 3]
    rgb = np.asarray(attrs["rgb"], np.float32)
    if style is not None:
        rgb = style_fill(style, rgb, dx, dy, short)  # [t, h, w, 3]
    video = background[None] + alpha[..., None] * (rgb - background[None])
    return np.round(video).astype(np.uint8)


def style_fill(style: str, rgb: np.ndarray, dx: np.ndarray, dy: np.ndarray,
               short: float) -> np.ndarray:
    """float32 [t, h, w, 3] object colour of `style` at offsets dx [t, 1, w], dy [t, h, 1]
    (pixels) from the object's centroid; rgb: its plain colour [3].

    "stripes": rgb + STRIPE_TINT * (255 - rgb) * (1 + cos(2 pi u / period)) / 2, with u the
    offset across the stripes ((dx + dy) / sqrt 2, so they run from bottom-left to top-right)
    and period = STRIPE_PERIOD * short: smooth, so it needs no anti-aliasing.
    """
    if style not in STYLES:
        close = difflib.get_close_matches(str(style), STYLES, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown style {style!r}{hint}; styles: {', '.join(STYLES)} "
                         "(None: plain)")
    across = (dx + dy) * np.float32(2**-0.5)  # [t, h, w]
    wave = 0.5 + 0.5 * np.cos(np.float32(2 * np.pi / (STRIPE_PERIOD * short)) * across)
    tint = STRIPE_TINT * (255.0 - rgb)  # [3]
    return (rgb + wave[..., None] * tint).astype(np.float32)


def background_image(attrs: dict[str, Any], height: int, width: int) -> np.ndarray:
    """float32 [h, w, 3] background of placed `attrs`: a gray ramp along one axis."""
    start, end = (float(v) for v in attrs["background_levels"])
    axis = int(attrs["background_axis"])
    size = height if axis == 0 else width
    ramp = start + (end - start) * (np.arange(size, dtype=np.float32) + 0.5) / size
    gray = ramp[:, None] if axis == 0 else ramp[None, :]
    gray = np.broadcast_to(gray, (height, width))
    return np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Captions.

_FILLER_WORDS = ("a", "an", "the", "moving", "on", "background", "standing", "shape")
_WORD_TO_ATTRIBUTE: dict[str, tuple[str, str]] = {
    **{s: ("shape", s) for s in SHAPES},
    **{c: ("colour", c) for c in COLOURS},
    **{s: ("size", s) for s in SIZES},
    **{m: ("motion", m) for m in MOTIONS},
    **{b: ("background", b) for b in BACKGROUNDS},
    "grey": ("background", "gray"),
}
VOCABULARY: tuple[str, ...] = tuple(sorted(set(_WORD_TO_ATTRIBUTE) | set(_FILLER_WORDS)))


def opposite_motion(motion: str) -> str:
    """The motion in the opposite direction ("left" -> "right", "up-right" -> "down-left")."""
    if motion not in MOTION_DIRECTIONS or motion == "still":
        raise ValueError(f"{motion!r} has no opposite; moving motions: "
                         f"{', '.join(m for m in MOTIONS if m != 'still')}")
    dx, dy = MOTION_DIRECTIONS[motion]
    return next(m for m, d in MOTION_DIRECTIONS.items() if d == (-dx, -dy))


def neighbour_motion(motion: str) -> str:
    """The other motion nearest in direction, 45 degrees away ("left" -> "down-left"); of two
    equally near ("up-right": "right" and "up"), the first in MOTIONS."""
    if motion not in MOTION_DIRECTIONS or motion == "still":
        raise ValueError(f"{motion!r} has no neighbouring direction; moving motions: "
                         f"{', '.join(m for m in MOTIONS if m != 'still')}")
    direction = np.array(MOTION_DIRECTIONS[motion])
    others = [m for m in MOTIONS if m not in ("still", motion)]
    return max(others, key=lambda m: float(direction @ np.array(MOTION_DIRECTIONS[m])))


def caption_for(attrs: dict[str, Any]) -> str:
    """Caption of `attrs`; None attributes are left out ("a red circle", "a small shape")."""
    check_attributes(attrs)
    words = ["a"]
    for key in ("size", "colour"):
        if attrs.get(key) is not None:
            words.append(attrs[key])
    words.append(attrs.get("shape") or "shape")
    motion = attrs.get("motion")
    if motion == "still":
        words += ["standing", "still"]
    elif motion is not None:
        words += ["moving", motion]
    if attrs.get("background") is not None:
        words += ["on", "a", attrs["background"], "background"]
    return " ".join(words)


def parse_caption(text: str) -> dict[str, str | None]:
    """Attributes named in `text`: {shape, colour, size, motion, background}, None if unnamed.

    Case and punctuation are ignored. Raises ValueError for an unknown word (with a
    did-you-mean suggestion and the vocabulary) or for two values of one attribute.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_caption expects a str, got {type(text).__name__}")
    attrs: dict[str, str | None] = {key: None for key in SEMANTIC_KEYS}
    for word in re.findall(r"[a-z]+(?:-[a-z]+)*", text.lower()):
        if word in _FILLER_WORDS:
            continue
        if word not in _WORD_TO_ATTRIBUTE:
            close = difflib.get_close_matches(word, VOCABULARY, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise ValueError(
                f"unknown word {word!r} in caption {text!r}{hint} "
                f"Known words: {', '.join(VOCABULARY)}"
            )
        key, value = _WORD_TO_ATTRIBUTE[word]
        if attrs[key] is not None and attrs[key] != value:
            raise ValueError(
                f"caption {text!r} names two {key}s ({attrs[key]!r} and {value!r}); name one."
            )
        attrs[key] = value
    return attrs


# ----------------------------------------------------------------------------------------------
# Random-access source (Grain: len + getitem).


class ShapesSource:
    """`size` clips of `split`, each a pure function of (world.seed, split, index).

    Item i: {'video': uint8 [t, h, w, 3], 'caption': str, 'attrs': dict, 'index': int}; see
    `place` for the attrs keys. Single-frame worlds (t == 1) give captions without motion.
    Usable directly as a Grain source: grain.MapDataset.source(ShapesSource(...)).
    style: None (plain) or one of STYLES: the same clips, captions and attrs, the objects
    rendered in that style.
    size_weights: {size: weight} to draw object sizes unevenly (`size_probabilities`); None
    or equal weights: uniformly, the same clips as without it.
    """

    def __init__(self, world: ShapesWorld, split: str = "train", size: int = 1024,
                 style: str | None = None, size_weights: dict[str, float] | None = None):
        _check_split(split)
        self.size_probs = size_probabilities(size_weights)
        if style is not None and style not in STYLES:
            raise ValueError(f"unknown style {style!r}; styles: {', '.join(STYLES)} (None: plain)")
        self.style = style
        if not (isinstance(size, (int, np.integer)) and size >= 1):
            raise ValueError(f"ShapesSource size must be an int >= 1, got {size!r}")
        self.world = world
        self.split = split
        self.size = int(size)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index) -> dict[str, Any]:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"ShapesSource index must be an int, got {type(index).__name__}")
        index = int(index)
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for ShapesSource of size {self.size}")
        index %= self.size
        rng = np.random.default_rng((self.world.seed, _SPLIT_STREAM[self.split], index))
        attrs = sample_attributes(rng, self.split, with_motion=self.world.num_frames > 1,
                                  size_probs=self.size_probs)
        attrs = place(attrs, self.world, rng)
        return {
            "video": render(attrs, self.world, style=self.style),
            "caption": caption_for(attrs),
            "attrs": attrs,
            "index": index,
        }

    def __repr__(self) -> str:
        extra = f", style={self.style!r}" if self.style is not None else ""
        if self.size_probs is not None:
            extra += f", size_probs={self.size_probs}"
        return f"ShapesSource({self.world}, split={self.split!r}, size={self.size}{extra})"


# ----------------------------------------------------------------------------------------------
# Helpers.


def _choice(rng: np.random.Generator, values: tuple[str, ...]) -> str:
    return values[int(rng.integers(len(values)))]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")


def check_attributes(attrs: dict[str, Any]) -> None:
    """Raise if `attrs` is not a dict or names an unknown value (None values are fine)."""
    if not isinstance(attrs, dict):
        raise TypeError(f"attributes must be a dict, got {type(attrs).__name__}")
    for key, values in ATTRIBUTE_VALUES.items():
        value = attrs.get(key)
        if value is not None and value not in values:
            close = difflib.get_close_matches(str(value), values, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown {key} {value!r}{hint}; known {key}s: {', '.join(values)}"
            )
