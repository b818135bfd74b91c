"""Clip shards: encode/decode round trip, manifest, checksums, damaged records, schema errors."""

import json

import numpy as np
import pytest

from lumiere_jax.data import shards
from lumiere_jax.data.shards import (
    ClipRecord,
    CorruptRecordError,
    ManifestError,
    ShardSource,
    decode_record,
    encode_record,
    read_manifest,
    verify_shards,
    write_manifest,
    write_shard,
    write_synthetic_shards,
)
from lumiere_jax.data.synthetic import ShapesSource, ShapesWorld

WORLD = ShapesWorld(num_frames=4, height=16, width=16, fps=8.0, seed=3)


def test_synthetic_shards_read_back_exactly(tmp_path):
    manifest = write_synthetic_shards(tmp_path, WORLD, "train", 11, records_per_shard=4)
    assert [s["num_records"] for s in manifest["shards"]] == [4, 4, 3]
    assert manifest["num_records"] == 11 and manifest["num_frames"] == 44
    assert (manifest["height"], manifest["width"]) == (16, 16)
    assert manifest["schema_version"] == shards.SCHEMA_VERSION
    assert read_manifest(tmp_path) == manifest
    assert verify_shards(tmp_path) == []

    source, reference = ShardSource(tmp_path, verify=True), ShapesSource(WORLD, "train", 11)
    assert len(source) == 11
    for i in (0, 3, 4, 10):
        clip = source[i]
        np.testing.assert_array_equal(clip["video"], reference[i]["video"])
        assert clip["caption"] == reference[i]["caption"]
        assert clip["fps"] == 8.0 and clip["source_id"] == f"shapes/train/{i}"
    with pytest.raises(IndexError, match="out of range"):
        source[11]


def test_record_round_trip_with_t5_embeddings():
    video = np.random.default_rng(0).integers(0, 256, (3, 8, 6, 3), dtype=np.uint8)
    t5 = np.random.default_rng(1).normal(size=(5, 7)).astype(np.float16)
    back = decode_record(encode_record(ClipRecord(video, "a clip", 12.5, "x.mp4#0", t5)))
    np.testing.assert_array_equal(back["video"], video)
    np.testing.assert_array_equal(back["t5"], t5)
    assert (back["caption"], back["fps"], back["source_id"]) == ("a clip", 12.5, "x.mp4#0")
    assert "t5" not in decode_record(encode_record(ClipRecord(video, "b", 1.0, "y")))


def test_garbage_and_truncated_records_raise_corrupt_record_error():
    data = encode_record(ClipRecord(np.zeros((2, 4, 4, 3), np.uint8), "c", 8.0, "z"))
    with pytest.raises(CorruptRecordError, match="rec 7 is corrupt: bad magic"):
        decode_record(b"JUNK" + data[4:], "rec 7")
    with pytest.raises(CorruptRecordError, match="is corrupt"):
        decode_record(data[:-3])
    with pytest.raises(CorruptRecordError, match="trailing"):
        decode_record(data + b"xx")


def test_a_damaged_byte_on_disk_breaks_one_record_only(tmp_path):
    write_synthetic_shards(tmp_path, WORLD, "train", 6, records_per_shard=3)
    reference = ShardSource(tmp_path)
    target = reference[4]  # record #1 of shard-00001
    # Records sit uncompressed in the file, so the record's caption can be located and damaged.
    path = tmp_path / "shard-00001.array_record"
    data = bytearray(path.read_bytes())
    at = data.find(target["caption"].encode())
    assert at > 0
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))

    source = ShardSource(tmp_path)
    with pytest.raises(CorruptRecordError, match=r"record 4 \(shard-00001.array_record #1\)"):
        source[4]
    for i in (0, 1, 2, 3, 5):
        np.testing.assert_array_equal(source[i]["video"], reference[i]["video"])
    assert verify_shards(tmp_path) == [(f"{path}: sha256 differs from the manifest (damaged or "
                                        "replaced)")]
    with pytest.raises(ManifestError, match="sha256 differs"):
        ShardSource(tmp_path, verify=True)


def test_manifest_of_another_schema_version_fails_clearly(tmp_path):
    write_synthetic_shards(tmp_path, WORLD, "train", 2, records_per_shard=2)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="schema_version 99.*reads schema version 1.*Re-create"):
        ShardSource(tmp_path)


def test_missing_manifest_and_missing_shard_files_fail_clearly(tmp_path):
    with pytest.raises(ManifestError, match="no manifest.json"):
        ShardSource(tmp_path)
    write_synthetic_shards(tmp_path, WORLD, "train", 4, records_per_shard=2)
    (tmp_path / "shard-00001.array_record").unlink()
    with pytest.raises(ManifestError, match="do not exist.*shard-00001"):
        ShardSource(tmp_path)


def test_writers_reject_mixed_resolutions_and_bad_videos(tmp_path):
    small = ClipRecord(np.zeros((2, 16, 16, 3), np.uint8), "a", 8.0, "a")
    large = ClipRecord(np.zeros((2, 32, 32, 3), np.uint8), "b", 8.0, "b")
    with pytest.raises(ValueError, match="is 32x32 but the shard holds 16x16"):
        write_shard(tmp_path / "s.array_record", [small, large])
    assert not list(tmp_path.iterdir())  # no partial shard left behind
    entry_a = write_shard(tmp_path / "a.array_record", [small])
    entry_b = write_shard(tmp_path / "b.array_record", [large])
    with pytest.raises(ValueError, match="different resolutions"):
        write_manifest(tmp_path, [entry_a, entry_b])
    with pytest.raises(ValueError, match=r"uint8 \[t, h, w, 3\]"):
        encode_record(ClipRecord(np.zeros((2, 4, 4), np.uint8), "c", 8.0, "c"))
