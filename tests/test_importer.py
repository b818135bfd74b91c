"""Importing a dirty folder of captioned videos: good clips written, bad files reported, reruns."""

import csv
import json

import numpy as np
import pytest

from lumiere_jax.data import importer
from lumiere_jax.data.shards import ShardSource, read_manifest
from lumiere_jax.data.video_io import write_gif, write_mp4


def moving_bar(frames: int, height: int = 40, width: int = 56) -> np.ndarray:
    """A white vertical bar moving right one pixel per frame on black: uint8 [t, h, w, 3]."""
    video = np.zeros((frames, height, width, 3), np.uint8)
    for t in range(frames):
        video[t, :, 10 + t : 14 + t] = 255
    return video


@pytest.fixture
def dirty_folder(tmp_path):
    videos = tmp_path / "videos"
    write_mp4(videos / "good.mp4", moving_bar(32), fps=16.0)  # 2 s: 16 frames at 8 fps
    write_mp4(videos / "sub" / "good2.mp4", moving_bar(24), fps=8.0)  # 3 s: 24 frames
    write_gif(videos / "anim.gif", moving_bar(10), fps=5.0)  # 2 s: 16 frames at 8 fps
    write_mp4(videos / "uncaptioned.mp4", moving_bar(16), fps=8.0)
    write_mp4(videos / "short.mp4", moving_bar(4), fps=8.0)
    full = (videos / "good.mp4").read_bytes()
    (videos / "truncated.mp4").write_bytes(full[: len(full) // 2])
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "notes.txt").write_text("not a video at all")
    captions = tmp_path / "captions.csv"
    with open(captions, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "caption"])
        for name in ("good.mp4", "sub/good2.mp4", "anim.gif", "short.mp4", "truncated.mp4",
                     "empty.mp4", "notes.txt", "gone.mp4"):
            writer.writerow([name, f"caption of {name}"])
    return videos, captions


def test_import_writes_good_clips_and_reports_bad_files(dirty_folder, tmp_path):
    videos, captions = dirty_folder
    out = tmp_path / "shards"
    report = importer.import_videos(videos, captions, out, num_frames=8, height=16, width=16,
                                    fps=8.0, videos_per_shard=3, workers=0, progress=False)
    reasons = {b["file"]: b["reason"] for b in report["bad"]}
    assert set(reasons) == {"uncaptioned.mp4", "short.mp4", "truncated.mp4", "empty.mp4",
                            "notes.txt"}
    assert "no caption" in reasons["uncaptioned.mp4"]
    assert "empty file" in reasons["empty.mp4"]
    assert "too short" in reasons["short.mp4"]
    assert "could not be decoded" in reasons["truncated.mp4"]
    assert "could not be decoded" in reasons["notes.txt"]
    assert report["captions_without_file"] == ["gone.mp4"]
    assert json.loads((out / importer.REPORT_NAME).read_text()) == report
    # good: 16 -> 2 clips; good2: 24 -> 3 clips; anim.gif: 16 -> 2 clips
    assert (report["good_files"], report["bad_files"], report["clips"]) == (3, 5, 7)

    source = ShardSource(out, verify=True)
    assert len(source) == 7 and read_manifest(out)["num_frames"] == 56
    clips = {source[i]["source_id"]: source[i] for i in range(len(source))}
    assert set(clips) == {"good.mp4#0", "good.mp4#1", "sub/good2.mp4#0", "sub/good2.mp4#1",
                          "sub/good2.mp4#2", "anim.gif#0", "anim.gif#1"}
    clip = clips["good.mp4#1"]
    assert clip["video"].shape == (8, 16, 16, 3) and clip["fps"] == 8.0
    assert clip["caption"] == "caption of good.mp4"
    # 16 fps -> 8 fps keeps every other frame: the bar moves ~2 source px (0.8 output px) a
    # frame, so its brightness centroid must move right monotonically over the clip.
    column_mass = clip["video"][..., 0].astype(float).sum(axis=(1,))  # [t, w]
    centroid = (column_mass * np.arange(16)).sum(-1) / column_mass.sum(-1)
    assert np.all(np.diff(centroid) > 0.3)


def test_rerun_skips_finished_shards_and_is_idempotent(dirty_folder, tmp_path):
    videos, captions = dirty_folder
    out = tmp_path / "shards"
    kwargs = {"num_frames": 8, "height": 16, "width": 16, "fps": 8.0, "videos_per_shard": 2,
                  "progress": False}
    first = importer.import_videos(videos, captions, out, workers=2, **kwargs)  # parallel
    manifest = read_manifest(out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    second = importer.import_videos(videos, captions, out, workers=0, **kwargs)
    assert second["shards_written"] == 0
    # 7 captioned files in groups of 2: 4 groups, the last (truncated.mp4 alone) has no clip.
    assert second["shards_skipped_as_done"] == first["shards_written"] == 4
    assert first["shards"] == 3
    assert {k: v for k, v in second.items() if not k.startswith("shards_")} == \
        {k: v for k, v in first.items() if not k.startswith("shards_")}
    assert read_manifest(out) == manifest
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == stamps

    # Other clip settings invalidate the finished shards: all are rewritten.
    third = importer.import_videos(videos, captions, out, workers=0,
                                   **dict(kwargs, num_frames=4))
    # 4 + 6 + 4 clips, and short.mp4 (4 frames) now makes one clip too.
    assert third["shards_written"] == 4 and third["clips"] == 15 and third["bad_files"] == 4


def test_resample_and_crop_helpers():
    np.testing.assert_array_equal(importer.resample_indices(8, 16.0, 8.0), [0, 2, 4, 6])
    np.testing.assert_array_equal(importer.resample_indices(3, 4.0, 8.0), [0, 0, 1, 1, 2, 2])
    frame = np.zeros((20, 40, 3), np.uint8)
    frame[:, 10:30] = 200  # the centre half of a wide frame
    out = importer.resize_and_crop(frame, 10, 10)  # scale 0.5 -> 10x20, crop columns 5..15
    # Only the (antialiased) edge columns blend with the black border, and not by much.
    assert out.shape == (10, 10, 3) and out[:, 1:-1].min() >= 195 and out.min() >= 150


def test_bad_arguments_fail_clearly(dirty_folder, tmp_path):
    videos, captions = dirty_folder
    with pytest.raises(ValueError, match="must end in .csv or .jsonl"):
        importer.import_videos(videos, videos / "notes.txt", tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="num_frames must be an int >= 1"):
        importer.import_videos(videos, captions, tmp_path / "o", num_frames=0, progress=False)
    bad_rows = tmp_path / "c.jsonl"
    bad_rows.write_text('{"file": "good.mp4"}\n')
    with pytest.raises(ValueError, match="row 1 needs a 'file' and a 'caption'"):
        importer.read_captions(bad_rows)
    rows = tmp_path / "ok.jsonl"
    rows.write_text('{"video": "a.mp4", "text": "x"}\n\n{"file": "b/c.gif", "caption": "y"}\n')
    assert importer.read_captions(rows) == {"a.mp4": "x", "b/c.gif": "y"}
