"""Import a folder of captioned videos (mp4, webm, gif, ...) into clip shards.

Each video is decoded (PyAV), resampled to the target fps (nearest earlier frame), resized so
it covers the target size and centre-cropped, then cut into clips of `num_frames` frames
(a new clip every `clip_stride` frames). Videos are processed in groups, one group per shard,
in parallel worker processes.

Real collections are dirty, so one bad file never stops an import: zero-byte, truncated,
undecodable, too-short and captionless files are skipped and listed with the reason in
`import_report.json` in the output directory.

Resumable: every finished shard has a sidecar `shard-NNNNN.json` naming its input files and
the clip settings; a rerun skips shards whose sidecar matches and rewrites the others, then
rewrites the manifest and report. (Adding files to the folder regroups the files after
them; those shards are then rewritten.)

The videos folder, the captions file and the output directory may each be local or gs://
(through etils.epath): remote videos are downloaded one at a time to decode them, a remote
shard is written locally then uploaded, and remote JSON files are written as single objects.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import json
import multiprocessing
import os
import posixpath
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath
from PIL import Image
from tqdm import tqdm

from lumiere_jax.data.remote import write_atomic
from lumiere_jax.data.shards import ClipRecord, shard_name, write_manifest, write_shard
from lumiere_jax.data.video_io import is_remote, read_video

REPORT_NAME = "import_report.json"


@dataclasses.dataclass(frozen=True)
class ClipSettings:
    """Format of the clips written: frames per clip, frame size, frame rate, clip spacing."""

    num_frames: int = 16
    height: int = 32
    width: int = 32
    fps: float = 8.0
    clip_stride: int = 0  # frames between the starts of consecutive clips; 0 = num_frames

    def __post_init__(self):
        for name in ("num_frames", "height", "width"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"import: {name} must be an int >= 1, got {value!r}")
        if not (isinstance(self.clip_stride, int) and self.clip_stride >= 0):
            raise ValueError(f"import: clip_stride must be an int >= 0, got {self.clip_stride!r}")
        if not self.fps > 0:
            raise ValueError(f"import: fps must be > 0, got {self.fps!r}")


def read_captions(captions_file: str | os.PathLike) -> dict[str, str]:
    """{video path relative to the videos folder: caption} from a .csv or .jsonl file.

    CSV: a header with a file column ('file', 'video' or 'path') and 'caption' (or 'text').
    JSONL: one object per line with the same keys.
    """
    remote = is_remote(captions_file)
    path = _path(captions_file)
    if not path.is_file():
        raise FileNotFoundError(f"import: no captions file at {path}")
    if path.suffix.lower() == ".csv":
        if remote:  # the bytes as they are: csv handles the line ends (open's newline="")
            text = path.read_bytes().decode("utf-8")
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
        else:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
    elif path.suffix.lower() == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number} is not valid JSON ({error})") from None
    else:
        raise ValueError(f"import: captions file {path} must end in .csv or .jsonl")
    captions = {}
    for number, row in enumerate(rows, 1):
        file = next((row[k] for k in ("file", "video", "path") if row.get(k)), None)
        caption = next((row[k] for k in ("caption", "text") if row.get(k) is not None), None)
        if file is None or caption is None:
            raise ValueError(f"{path}: row {number} needs a 'file' and a 'caption' field, got "
                             f"{sorted(row)}")
        captions[str(Path(file))] = str(caption)
    return captions


def resample_indices(num_source: int, source_fps: float, fps: float) -> np.ndarray:
    """Indices of the source frames shown at each tick of the target fps (nearest earlier)."""
    duration = num_source / source_fps
    count = int(np.floor(duration * fps + 1e-6))
    return np.minimum(np.floor(np.arange(count) * source_fps / fps + 1e-6).astype(int),
                      num_source - 1)


def resize_and_crop(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale uint8 [h, w, 3] to cover height x width (aspect kept), then centre-crop."""
    h, w, _ = frame.shape
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    image = Image.fromarray(frame).resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return np.asarray(image)[top : top + height, left : left + width]


def video_to_clips(path: Path | epath.Path, settings: ClipSettings) -> list[np.ndarray]:
    """Clips uint8 [num_frames, height, width, 3] of one video; ValueError says why not."""
    if (path.stat().length if is_remote(path) else path.stat().st_size) == 0:
        raise ValueError("empty file (0 bytes)")
    video, source_fps = read_video(path)
    if source_fps <= 0:
        raise ValueError("the container states no frame rate")
    indices = resample_indices(len(video), source_fps, settings.fps)
    if len(indices) < settings.num_frames:
        raise ValueError(f"too short: {len(video)} frames at {source_fps:g} fps give "
                         f"{len(indices)} frames at {settings.fps:g} fps, fewer than "
                         f"num_frames={settings.num_frames}")
    frames = np.stack([resize_and_crop(video[i], settings.height, settings.width)
                       for i in indices])
    stride = settings.clip_stride or settings.num_frames
    return [frames[s : s + settings.num_frames]
            for s in range(0, len(frames) - settings.num_frames + 1, stride)]


def _import_group(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: one group of videos -> one shard + its sidecar. Never raises for a bad video."""
    settings = ClipSettings(**task["settings"])
    videos_dir, out_dir = _path(task["videos_dir"]), _path(task["out_dir"])
    records, files = [], {}
    for rel, caption in task["inputs"]:
        try:
            clips = video_to_clips(videos_dir / rel, settings)
        except Exception as error:  # noqa: BLE001 (any failure of one file is reported, not fatal)
            files[rel] = {"error": f"{type(error).__name__}: {error}"}
            continue
        files[rel] = {"clips": len(clips)}
        records += [ClipRecord(clip, caption, settings.fps, f"{rel}#{k}")
                    for k, clip in enumerate(clips)]
    shard = (write_shard(out_dir / task["shard_file"], records) if records else None)
    sidecar = {"inputs": task["inputs"], "settings": task["settings"], "shard": shard,
               "files": files}
    _write_json(out_dir / task["sidecar_file"], sidecar)
    return sidecar


def import_videos(videos_dir: str | os.PathLike, captions_file: str | os.PathLike,
                  out_dir: str | os.PathLike, *, num_frames: int = 16, height: int = 32,
                  width: int = 32, fps: float = 8.0, clip_stride: int = 0,
                  videos_per_shard: int = 16, workers: int | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Import every file under `videos_dir` into shards in `out_dir`; returns the report.

    workers: processes (None: one per core; 0: in this process). The report (also written to
    out_dir/import_report.json) holds counts, the bad files with reasons, and caption rows
    naming no file.
    """
    settings = ClipSettings(num_frames, height, width, fps, clip_stride)
    videos_dir, out_dir = _path(videos_dir), _path(out_dir)
    if not videos_dir.is_dir():
        raise FileNotFoundError(f"import: no folder {videos_dir}")
    if not (isinstance(videos_per_shard, int) and videos_per_shard >= 1):
        raise ValueError(f"import: videos_per_shard must be an int >= 1, got {videos_per_shard!r}")
    captions = read_captions(captions_file)
    if is_remote(videos_dir):
        files = _remote_files(videos_dir, captions_file)
    else:
        captions_path = Path(captions_file).resolve()
        files = sorted(str(p.relative_to(videos_dir)) for p in videos_dir.rglob("*")
                       if p.is_file() and not p.name.startswith(".")
                       and p.resolve() != captions_path)
    bad = [{"file": f, "reason": "no caption in the captions file"}
           for f in files if f not in captions]
    captioned = [(f, captions[f]) for f in files if f in captions]
    out_dir.mkdir(parents=True, exist_ok=True)

    tasks, skipped = [], 0
    sidecars: dict[int, dict[str, Any]] = {}
    for k, start in enumerate(range(0, len(captioned), videos_per_shard)):
        inputs = [list(pair) for pair in captioned[start : start + videos_per_shard]]
        task = {"videos_dir": str(videos_dir), "out_dir": str(out_dir),
                "settings": dataclasses.asdict(settings), "inputs": inputs,
                "shard_file": shard_name(k), "sidecar_file": shard_name(k).split(".")[0] + ".json"}
        done = _finished(out_dir, task)
        if done is not None:
            sidecars[k], skipped = done, skipped + 1
        else:
            tasks.append((k, task))

    workers = (os.cpu_count() or 1) if workers is None else workers
    with tqdm(total=len(tasks), desc="import", unit="shard", disable=not progress) as bar:
        if workers == 0 or len(tasks) <= 1:
            for k, task in tasks:
                sidecars[k] = _import_group(task)
                bar.update()
        else:
            # spawn: forking a process that may hold JAX or PyAV threads is unsafe.
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(min(workers, len(tasks)),
                                                        mp_context=context) as pool:
                futures = {pool.submit(_import_group, task): k for k, task in tasks}
                for future in concurrent.futures.as_completed(futures):
                    sidecars[futures[future]] = future.result()
                    bar.update()

    entries, clips, good = [], 0, 0
    for k in sorted(sidecars):
        sidecar = sidecars[k]
        if sidecar["shard"] is not None:
            entries.append(sidecar["shard"])
        for rel, outcome in sidecar["files"].items():
            if "error" in outcome:
                bad.append({"file": rel, "reason": outcome["error"]})
            else:
                good, clips = good + 1, clips + outcome["clips"]
    if entries:
        write_manifest(out_dir, entries, source="import", videos_dir=str(videos_dir),
                       settings=dataclasses.asdict(settings))
    report = {
        "files": len(files), "good_files": good, "bad_files": len(bad), "clips": clips,
        "shards": len(entries), "shards_skipped_as_done": skipped,
        "shards_written": len(tasks),
        "bad": sorted(bad, key=lambda b: b["file"]),
        "captions_without_file": sorted(set(captions) - set(files)),
    }
    _write_json(out_dir / REPORT_NAME, report)
    if not entries:
        raise ValueError(f"import: no clip could be made from {videos_dir}; see "
                         f"{out_dir / REPORT_NAME} for the reason of each file")
    return report


def _path(path: str | os.PathLike) -> Path | epath.Path:
    """pathlib for a local path; etils.epath for gs:// (pathlib would turn it into 'gs:/')."""
    return epath.Path(path) if is_remote(path) else Path(path)


def _remote_files(videos_dir: epath.Path, captions_file: str | os.PathLike) -> list[str]:
    """The files under a gs:// folder, as import_videos lists a local one: sorted paths
    relative to the folder, without hidden files and without the captions file."""
    import fsspec  # installed with etils' gs:// support (gcsfs)

    fs, root = fsspec.core.url_to_fs(os.fspath(videos_dir))
    root = root.rstrip("/")
    captions = (fsspec.core.url_to_fs(os.fspath(captions_file))[1]
                if is_remote(captions_file) else None)
    return sorted(posixpath.relpath(name, root) for name in fs.find(root)
                  if not posixpath.basename(name).startswith(".") and name != captions)


def _finished(out_dir: Path, task: dict[str, Any]) -> dict[str, Any] | None:
    """The sidecar of an already written shard for exactly this task, else None."""
    path = out_dir / task["sidecar_file"]
    try:
        sidecar = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if sidecar.get("inputs") != task["inputs"] or sidecar.get("settings") != task["settings"]:
        return None
    if sidecar["shard"] is not None and not (out_dir / sidecar["shard"]["file"]).is_file():
        return None
    return sidecar


def _write_json(path: Path | epath.Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=1))
