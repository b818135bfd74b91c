"""Video and image files: mp4 (PyAV, libx264), gif and png (Pillow), contact sheets.

All videos are uint8 [t, h, w, 3] RGB arrays; images are uint8 [h, w, 3]. Writers create the
parent folder. Tiny videos (the 32x32 base model's) can be enlarged with nearest-neighbour
`scale=` so players show crisp pixels; mp4 (yuv420p) also needs even sizes, so an odd height or
width is padded by one edge-replicated row or column.

Paths may be local or remote (gs://, through etils.epath). The encoders and decoders work on
local files only, so a remote file is written through a local temporary file uploaded as one
object (`remote.local_file_for`), and read from a downloaded temporary copy
(`remote.local_copy_of`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont

from lumiere_jax.data.remote import is_remote, local_copy_of, local_file_for

PathLike = str | os.PathLike


def write_mp4(
    path: PathLike, video: np.ndarray, fps: float, *, scale: int = 1, crf: int = 18
) -> tuple[int, int]:
    """Encode `video` uint8 [t, h, w, 3] as H.264 (yuv420p) at `fps`; returns (height, width)
    as written (after the integer `scale` and padding to even sizes). Lower crf = higher quality.
    """
    video = _upscale(_check_video(video, "write_mp4"), scale, "write_mp4")
    fps = _check_fps(fps, "write_mp4")
    if not (isinstance(crf, int) and 0 <= crf <= 51):
        raise ValueError(f"write_mp4: crf must be an int in [0, 51], got {crf!r}")
    pad_h, pad_w = video.shape[1] % 2, video.shape[2] % 2
    if pad_h or pad_w:  # yuv420p subsamples chroma 2x2
        video = np.pad(video, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    t, h, w, _ = video.shape
    with local_file_for(path) as target, av.open(str(target), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder
    return h, w


def read_video(path: PathLike) -> tuple[np.ndarray, float]:
    """Decode every frame of a video file: (uint8 [t, h, w, 3], fps).

    Raises FileNotFoundError for a missing file and ValueError naming the file when it is not a
    decodable video or holds fewer frames than its container declares (truncated). A remote
    file (gs://) is downloaded to a temporary file first.
    """
    if is_remote(path):
        if not epath.Path(path).is_file():
            raise FileNotFoundError(f"read_video: no video file at {path}")
        with local_copy_of(path) as local:
            return _decode_video(local, os.fspath(path))
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_video: no video file at {path}")
    return _decode_video(path, path)


def _decode_video(local: Path, path: PathLike) -> tuple[np.ndarray, float]:
    """read_video of the local file `local`; errors name `path` (the file as the caller gave
    it, which differs for a downloaded remote file)."""
    try:
        with av.open(str(local)) as container:
            if not container.streams.video:
                raise ValueError(
                    f"read_video: {path} has no video stream (truncated, corrupt or not a video)"
                )
            stream = container.streams.video[0]
            declared = stream.frames  # 0 when the container does not say
            rate = stream.average_rate or stream.guessed_rate
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except av.FFmpegError as error:
        raise ValueError(
            f"read_video: {path} could not be decoded; the file is truncated or corrupt "
            f"({error}). Re-create it (e.g. with write_mp4)."
        ) from error
    if not frames:
        raise ValueError(f"read_video: {path} holds no decodable frame (truncated or corrupt?)")
    if declared and len(frames) < declared:
        raise ValueError(
            f"read_video: {path} is truncated: the container declares {declared} frames but "
            f"only {len(frames)} decoded. Re-create the file."
        )
    return np.stack(frames), float(rate) if rate else 0.0


def write_gif(path: PathLike, video: np.ndarray, fps: float, *, scale: int = 1) -> None:
    """Write `video` uint8 [t, h, w, 3] as a looping GIF (GIF rounds frame times to 10 ms).

    GIF stores <= 256 colours per frame (ample for the shapes world). Pillow merges consecutive
    identical frames into one longer frame, so a still clip may read back with fewer frames.
    """
    video = _upscale(_check_video(video, "write_gif"), scale, "write_gif")
    fps = _check_fps(fps, "write_gif")
    frames = [
        Image.fromarray(frame).quantize(colors=256, dither=Image.Dither.NONE) for frame in video
    ]
    duration = max(1, round(1000.0 / fps))
    with local_file_for(path) as target:
        if len(frames) == 1:
            frames[0].save(target, format="GIF")
            return
        frames[0].save(
            target, format="GIF", save_all=True, append_images=frames[1:], duration=duration,
            loop=0,
        )


def write_png(path: PathLike, image: np.ndarray) -> None:
    """Write an image uint8 [h, w, 3] (or [h, w] gray) as PNG."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (
        image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)
    ):
        raise ValueError(
            f"write_png expects uint8 [h, w, 3] or [h, w], got {image.dtype} {image.shape}"
        )
    with local_file_for(path) as target:
        Image.fromarray(image).save(target, format="PNG")


def image_grid(
    images: np.ndarray | Sequence[np.ndarray], cols: int, *, pad: int = 0, fill: int = 0
) -> np.ndarray:
    """Tile images [n, h, w, 3] row by row into a grid of `cols` columns: uint8 [H, W, 3].

    `pad` pixels of gray level `fill` separate the cells and frame the grid.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"image_grid expects uint8 images [n, h, w, 3], got {images.dtype} {images.shape}"
        )
    if not (isinstance(cols, int) and cols >= 1):
        raise ValueError(f"image_grid: cols must be an int >= 1, got {cols!r}")
    n, h, w, _ = images.shape
    rows = -(-n // cols)
    cols = min(cols, n)
    grid = np.full((pad + rows * (h + pad), pad + cols * (w + pad), 3), fill, np.uint8)
    for k, image in enumerate(images):
        top, left = pad + (k // cols) * (h + pad), pad + (k % cols) * (w + pad)
        grid[top : top + h, left : left + w] = image
    return grid


def contact_sheet(
    videos: np.ndarray | Sequence[np.ndarray],
    labels: Sequence[str] | None = None,
    *,
    max_frames: int = 8,
    scale: int = 1,
    pad: int = 2,
) -> np.ndarray:
    """One row of evenly spaced frames per video, under an optional text label: uint8 image.

    videos: [n, t, h, w, 3] or a list of [t, h, w, 3] (an [h, w, 3] item is one frame). Videos
    of different sizes share a cell of the largest size: each is enlarged by the largest
    integer factor that fits and centred. `scale` then enlarges the cells (nearest neighbour).
    """
    clips = [_as_clip(v, k) for k, v in enumerate(videos)]
    if not clips:
        raise ValueError("contact_sheet needs at least one video")
    if labels is not None and len(labels) != len(clips):
        raise ValueError(f"contact_sheet got {len(clips)} videos but {len(labels)} labels")
    if not (isinstance(max_frames, int) and max_frames >= 1):
        raise ValueError(f"contact_sheet: max_frames must be an int >= 1, got {max_frames!r}")
    cell_h = max(c.shape[1] for c in clips) * scale
    cell_w = max(c.shape[2] for c in clips) * scale
    columns = min(max_frames, max(c.shape[0] for c in clips))
    width = pad + columns * (cell_w + pad)

    font = ImageFont.load_default()
    label_h = (font.getbbox("Ag")[3] + 4) if labels is not None else 0
    row_h = label_h + cell_h + pad
    sheet = Image.new("RGB", (width, pad + len(clips) * row_h), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for k, clip in enumerate(clips):
        top = pad + k * row_h
        if labels is not None:
            draw.text((pad, top + 1), str(labels[k]), fill=(235, 235, 235), font=font)
        picks = np.round(np.linspace(0, clip.shape[0] - 1, min(columns, clip.shape[0])))
        for column, index in enumerate(picks.astype(int)):
            cell = _fit_cell(clip[index], cell_h, cell_w)
            sheet.paste(Image.fromarray(cell), (pad + column * (cell_w + pad), top + label_h))
    return np.asarray(sheet, dtype=np.uint8).copy()


# ----------------------------------------------------------------------------------------------
# Helpers.


def _check_video(video: np.ndarray, where: str) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or min(video.shape[:3]) < 1:
        raise ValueError(f"{where} expects a video [t, h, w, 3], got shape {video.shape}")
    if video.dtype != np.uint8:
        raise ValueError(
            f"{where} expects uint8 pixels, got {video.dtype}; convert [0, 1] floats with "
            "np.clip(np.round(x * 255), 0, 255).astype(np.uint8)"
        )
    return video


def _check_fps(fps: float, where: str) -> float:
    try:
        fps = float(fps)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: fps must be a positive number, got {fps!r}") from None
    if not (np.isfinite(fps) and fps > 0):
        raise ValueError(f"{where}: fps must be a positive number, got {fps!r}")
    return fps


def _upscale(video: np.ndarray, scale: int, where: str) -> np.ndarray:
    if not (isinstance(scale, (int, np.integer)) and scale >= 1):
        raise ValueError(f"{where}: scale must be an int >= 1, got {scale!r}")
    if scale == 1:
        return video
    return np.repeat(np.repeat(video, scale, axis=-3), scale, axis=-2)


def _as_clip(video: np.ndarray, index: int) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim == 3:
        video = video[None]
    try:
        return _check_video(video, "contact_sheet")
    except ValueError as error:
        raise ValueError(f"contact_sheet: video {index}: {error}") from None


def _fit_cell(frame: np.ndarray, cell_h: int, cell_w: int) -> np.ndarray:
    """Enlarge a frame [h, w, 3] by the largest integer factor that fits, centred in the cell."""
    h, w, _ = frame.shape
    factor = max(1, min(cell_h // h, cell_w // w))
    frame = _upscale(frame[None], factor, "contact_sheet")[0]
    cell = np.full((cell_h, cell_w, 3), 24, np.uint8)
    top, left = (cell_h - frame.shape[0]) // 2, (cell_w - frame.shape[1]) // 2
    cell[top : top + frame.shape[0], left : left + frame.shape[1]] = frame
    return cell


def _prepare(path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
