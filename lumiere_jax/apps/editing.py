"""Lumiere's applications of one trained text-to-video model, training-free.

All of them condition the sampler of an unchanged base model (a `Generator` of a STUNet):

- image-to-video: the first frame is given, the rest follows the prompt;
- inpainting: a region of a video is regenerated, everything else kept;
- outpainting: a smaller video is placed on the model's canvas and the border generated;
- cinemagraph: an image where only a region moves, as the prompt says;
- SDEdit: a video noised to a strength in [0, 1], then denoised with a new prompt.

The first four replace the known pixels, noised to each step's level, at every sampling step
(diffusion.samplers.replace_known), so the result equals the input exactly where it is known.
With a conditional STUNet (the paper's variant: fine-tuned with random masks, it takes the
masked video and the mask as input; configs/shapes_stunet.py:masked) they can instead let the
model see the known pixels (`conditioning="model"`), or do both (`"both"`).
SDEdit starts the sampler part-way (diffusion time = strength) from the noised input; given a
region (e.g. DiffEdit's automatic one, `edit_region`: where the model's estimates under the
new and the old caption differ), it replaces the pixels outside it like the others, so an
edit can push the colour hard while the object stays on its track.

Each takes `resample`: RePaint's resampling (diffusion.samplers), every step taken that many
times with the state re-noised in between. A region edit at strength 0.5 gains most: with one
take per step the old colour, still plain in the half-noised input, survives in speckles; with
five the new colour takes over far more of the region and the edit is steadier (README
"Applications").

Inputs are uint8 pixels; image and video files are read and fitted to the model's frame size
(cover and centre-crop, with a warning when that changes the size); they may be gs:// paths.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from lumiere_jax.data import video_io
from lumiere_jax.data.importer import resize_and_crop
from lumiere_jax.generate import Generator


def _video_shape(generator: Generator) -> tuple[int, int, int]:
    if len(generator.sample_shape) != 4 or generator.scale is not None:
        raise ValueError(f"the applications need a text-to-video base model (a STUNet); this "
                         f"generator samples shape {generator.sample_shape}"
                         f"{' (an SSR)' if generator.scale else ''}")
    return generator.sample_shape[:3]


def fit_frame(frame: np.ndarray, height: int, width: int, what: str) -> np.ndarray:
    """An RGB uint8 frame at exactly height x width (covered and centre-cropped if needed)."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"{what}: expected RGB uint8 pixels [h, w, 3], got {frame.dtype} "
                         f"{frame.shape}")
    if frame.shape[:2] != (height, width):
        logging.warning("%s is %dx%d; resized and centre-cropped to the model's %dx%d", what,
                        frame.shape[0], frame.shape[1], height, width)
        frame = resize_and_crop(frame, height, width)
    return frame


def read_image(path: str, height: int, width: int) -> np.ndarray:
    """An image file (local or gs://) as uint8 [height, width, 3]; unreadable files are a clear
    error."""
    try:
        with video_io.local_copy_of(path) as local, Image.open(local) as image:
            pixels = np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no image file at {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image (PNG, JPEG, ...): {e}") from None
    return fit_frame(pixels, height, width, f"image {path}")


def read_clip(path: str, frames: int, height: int, width: int) -> np.ndarray:
    """A video file as uint8 [frames, height, width, 3]: its first `frames` frames."""
    video, _ = video_io.read_video(path)
    if len(video) < frames:
        raise ValueError(f"video {path} has {len(video)} frames; the model makes {frames}, so "
                         f"give a video of at least {frames} frames")
    return np.stack([fit_frame(f, height, width, f"video {path}") for f in video[:frames]])


def read_region(path: str, height: int, width: int) -> np.ndarray:
    """A mask image as float [height, width, 1]: 1 where it is bright (> 50%), else 0."""
    gray = read_image(path, height, width).mean(-1, keepdims=True)
    return (gray > 127.5).astype(np.float32)


def box_region(spec: str, height: int, width: int) -> np.ndarray:
    """'x0,y0,x1,y1' (pixels, or fractions of the frame if all are <= 1 and one is not an
    integer) -> float mask [height, width, 1], 1 inside the box [x0, x1) x [y0, y1)."""
    try:
        values = [float(v) for v in spec.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise ValueError(f"box {spec!r}: write x0,y0,x1,y1 in pixels (e.g. 8,8,24,24) or as "
                         f"fractions of the frame (e.g. 0.25,0.25,0.75,0.75)")
    if all(0 <= v <= 1 for v in values) and any(v != int(v) for v in values):
        values = [v * s for v, s in zip(values, (width, height, width, height))]
    x0, y0, x1, y1 = (int(round(v)) for v in values)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {spec!r} = x {x0}..{x1}, y {y0}..{y1} is empty or outside the "
                         f"{width}x{height} frame")
    region = np.zeros((height, width, 1), np.float32)
    region[y0:y1, x0:x1] = 1.0
    return region


def _check_region(region: np.ndarray, height: int, width: int) -> np.ndarray:
    region = np.asarray(region, np.float32)
    if region.shape == (height, width):
        region = region[..., None]
    if region.shape != (height, width, 1) or region.min() < 0 or region.max() > 1:
        raise ValueError(f"a region is a mask [{height}, {width}(, 1)] with values in [0, 1], "
                         f"got shape {region.shape}")
    if not region.any():
        raise ValueError("the region is empty: nothing would be generated")
    return region


def _frame_regions(region: np.ndarray, t: int, h: int, w: int) -> np.ndarray:
    """A region for every frame ([h, w(, 1)]) or one per frame ([t, h, w, 1]) as float
    [t, h, w, 1]."""
    if np.ndim(region) <= 3:
        return np.broadcast_to(_check_region(region, h, w), (t, h, w, 1))
    region = np.asarray(region, np.float32)
    if region.shape != (t, h, w, 1) or region.min() < 0 or region.max() > 1:
        raise ValueError(f"a per-frame region is a mask [{t}, {h}, {w}, 1] with values in "
                         f"[0, 1], got shape {region.shape}")
    return region


def _sample_known(generator: Generator, prompt: str, seeds: Sequence[int], guidance: float,
                  known: np.ndarray, keep: np.ndarray, conditioning: str,
                  negative_prompt: str, resample: int) -> np.ndarray:
    n = len(seeds)
    return generator([prompt] * n, list(seeds), guidance,
                     known=np.broadcast_to(known, (n, *known.shape)),
                     known_mask=np.broadcast_to(keep, (n, *known.shape[:-1], 1)),
                     conditioning=conditioning, negative_prompts=[negative_prompt] * n,
                     resample=resample)


def image_to_video(generator: Generator, image: np.ndarray, prompt: str, seeds: Sequence[int],
                   guidance: float = 3.0, conditioning: str = "replace",
                   negative_prompt: str = "", resample: int = 1) -> np.ndarray:
    """Videos [n, t, h, w, 3] whose frame 0 is `image` (uint8 [h, w, 3]); exactly so unless
    conditioning="model" (then the conditional model follows the image as well as it can)."""
    t, h, w = _video_shape(generator)
    known = np.zeros((t, h, w, 3), np.uint8)
    known[0] = fit_frame(image, h, w, "image")
    keep = np.zeros((t, h, w, 1), np.float32)
    keep[0] = 1.0
    return _sample_known(generator, prompt, seeds, guidance, known, keep, conditioning,
                         negative_prompt, resample)


def inpaint(generator: Generator, video: np.ndarray, region: np.ndarray, prompt: str,
            seeds: Sequence[int], guidance: float = 3.0,
            conditioning: str = "replace", negative_prompt: str = "",
            resample: int = 1) -> np.ndarray:
    """`video` (uint8 [t, h, w, 3]) with `region` regenerated: region [h, w(, 1)] for every
    frame or [t, h, w, 1] per frame, 1 = generate. Elsewhere the output equals the input."""
    t, h, w = _video_shape(generator)
    if np.shape(video) != (t, h, w, 3):
        raise ValueError(f"inpaint: the video must have the model's shape {(t, h, w, 3)}, got "
                         f"{np.shape(video)} (read files with read_clip)")
    keep = 1.0 - _frame_regions(region, t, h, w)
    return _sample_known(generator, prompt, seeds, guidance, np.asarray(video), keep,
                         conditioning, negative_prompt, resample)


def outpaint(generator: Generator, video: np.ndarray, prompt: str, seeds: Sequence[int],
             guidance: float = 3.0, conditioning: str = "replace",
             negative_prompt: str = "", resample: int = 1) -> np.ndarray:
    """A smaller video (uint8 [t, h', w', 3]) centred on the model's canvas, the border
    generated; the centre equals the input."""
    t, h, w = _video_shape(generator)
    vt, vh, vw = np.shape(video)[:3]
    if vt != t or vh > h or vw > w or (vh, vw) == (h, w):
        raise ValueError(f"outpaint: give {t} frames smaller than the {w}x{h} canvas, got "
                         f"{np.shape(video)}")
    top, left = (h - vh) // 2, (w - vw) // 2
    known = np.zeros((t, h, w, 3), np.uint8)
    known[:, top:top + vh, left:left + vw] = video
    keep = np.zeros((t, h, w, 1), np.float32)
    keep[:, top:top + vh, left:left + vw] = 1.0
    return _sample_known(generator, prompt, seeds, guidance, known, keep, conditioning,
                         negative_prompt, resample)


def cinemagraph(generator: Generator, image: np.ndarray, region: np.ndarray, prompt: str,
                seeds: Sequence[int], guidance: float = 3.0,
                conditioning: str = "replace", negative_prompt: str = "",
                resample: int = 1) -> np.ndarray:
    """Videos where every frame equals `image` outside `region` ([h, w(, 1)], 1 = animate)
    and the region moves as the prompt says."""
    t, h, w = _video_shape(generator)
    image = fit_frame(image, h, w, "image")
    keep = np.broadcast_to(1.0 - _check_region(region, h, w), (t, h, w, 1))
    return _sample_known(generator, prompt, seeds, guidance, np.broadcast_to(image, (t, h, w, 3)),
                         keep, conditioning, negative_prompt, resample)


def edit_region(generator: Generator, video: np.ndarray, prompt: str, source_prompt: str,
                strength: float = 0.5, seed: int = 0, draws: int = 10,
                threshold: float = 0.1) -> np.ndarray:
    """Where an edit of `video` (uint8 [t, h, w, 3]) from `source_prompt` (its caption) to
    `prompt` should happen: DiffEdit's automatic mask (Couairon et al., 2023), float
    [t, h, w, 1], 1 = edit.

    The video is noised to `strength` (DiffEdit's 0.5, whatever the edit's own strength) with
    `draws` noises (seeds seed .. seed + draws - 1), and the model's clean estimates under the
    two prompts are compared: the absolute difference, averaged over the colour channels and
    the draws, is scaled so that its largest value is 1, thresholded at `threshold`, and each
    frame's enclosed holes filled. What the two captions agree on (the background, the rest
    of the clip) gives the same estimate under both and stays outside the region. DiffEdit
    thresholds at 0.5; on the shapes world that leaves out a third of the object, and 0.1
    covers all of it (README "Applications")."""
    t, h, w = _video_shape(generator)
    if np.shape(video) != (t, h, w, 3):
        raise ValueError(f"edit_region: the video must have the model's shape {(t, h, w, 3)}, "
                         f"got {np.shape(video)} (read files with read_clip)")
    if draws < 1 or not 0.0 < threshold < 1.0:
        raise ValueError(f"edit_region: draws must be >= 1 and threshold in (0, 1); got "
                         f"draws={draws}, threshold={threshold}")
    seeds = [seed + k for k in range(draws)]
    videos = np.broadcast_to(np.asarray(video), (draws, t, h, w, 3))
    edited, source = (generator.clean_estimates([p] * draws, videos, strength, seeds)
                      for p in (prompt, source_prompt))
    difference = np.abs(edited - source).mean(axis=(0, -1))  # [t, h, w]
    if not difference.max() > 0:
        raise ValueError(f"edit_region: the model's estimates under {prompt!r} and "
                         f"{source_prompt!r} are identical, so there is nothing to edit")
    region = difference / difference.max() >= threshold
    # An enclosed hole (where the two estimates happen to agree inside the object) would keep
    # the old pixels there: each frame's region is filled.
    return np.stack([ndimage.binary_fill_holes(frame) for frame in region])[..., None].astype(
        np.float32)


def sdedit(generator: Generator, video: np.ndarray, prompt: str, strength: float,
           seeds: Sequence[int], guidance: float = 3.0,
           negative_prompt: str = "", invert: bool = False,
           source_prompt: str = "", region: np.ndarray | None = None,
           resample: int = 1, conditioning: str = "replace") -> np.ndarray:
    """`video` (uint8 [t, h, w, 3]) edited towards `prompt`: noised to diffusion time
    `strength` (0: unchanged, 1: a new video from the seed) and denoised with the prompt.

    negative_prompt: what guidance steers away from instead of the empty caption; the input's
    own caption makes the edit change what differs between the two captions (e.g. the colour)
    at a strength low enough to keep the rest (README "Applications").
    invert: start from the video's DDIM inversion under `source_prompt` (its caption; "" the
    empty one; a source_prompt without invert is an error) instead of the video noised with
    each seed's noise: deterministic (the seeds give identical edits) and it keeps more of the
    input's motion at a given colour change (README "Applications"); strength 1 is then no
    longer plain text-to-video.
    region: where the edit may change the video ([h, w(, 1)] for every frame or [t, h, w, 1],
    1 = edit; e.g. edit_region's automatic mask); elsewhere the output equals the input
    exactly (its pixels replaced at every step, as for inpaint). None: the whole clip.
    resample: takes per sampler step (RePaint's resampling; that many times the model calls);
    strength 0 still returns the input, and pixels outside the region stay exact.
    conditioning: with a region, how the pixels outside it steer the edit, as for inpaint;
    "both" with the conditional STUNet gives the steadiest region edits at strength 0.5
    (README "Applications")."""
    t, h, w = _video_shape(generator)
    if np.shape(video) != (t, h, w, 3):
        raise ValueError(f"sdedit: the video must have the model's shape {(t, h, w, 3)}, got "
                         f"{np.shape(video)} (read files with read_clip)")
    if region is None and conditioning != "replace":
        raise ValueError(f"sdedit: conditioning={conditioning!r} steers the edit by the pixels "
                         "kept outside a region; give a region (--box, --mask or --auto_region)"
                         " or leave conditioning at 'replace'")
    n = len(seeds)
    video = np.broadcast_to(np.asarray(video), (n, t, h, w, 3))
    known = {} if region is None else {
        "known": video, "known_mask": np.broadcast_to(1.0 - _frame_regions(region, t, h, w),
                                                      (n, t, h, w, 1))}
    return generator([prompt] * n, list(seeds), guidance, strength=strength, init=video,
                     negative_prompts=[negative_prompt] * n, invert=invert,
                     source_prompts=[source_prompt] * n if source_prompt else None,
                     resample=resample, conditioning=conditioning, **known)
