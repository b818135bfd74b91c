"""The Grain pipeline: exact resume, per-process sharding, damaged records, crops, global batch."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from ml_collections import ConfigDict

from lumiere_jax.data import pipeline
from lumiere_jax.data.shards import (
    ClipRecord,
    ManifestError,
    write_manifest,
    write_shard,
)
from lumiere_jax.text.tokenizers import make_tokenizer

TOKENIZER = make_tokenizer("byte")
FRAMES, SIZE = 6, 16


def make_config(batch: int = 4, **data) -> ConfigDict:
    """The keys the pipeline reads, as in configs/shapes_t2i.py (tiny world)."""
    return ConfigDict({
        "seed": 0,
        "world": {"num_frames": FRAMES, "height": SIZE, "width": SIZE, "fps": 8.0, "seed": 0},
        "data": dict(split="train", **data),
        "text": {"max_length": 24},
        "train": {"batch_size": batch},
    })


def coded_shards(out_dir, num: int, per_shard: int = 5):
    """Shards whose record i has channel 0 == i and channel 1 == frame index (pixel-coded)."""
    entries = []
    for k, start in enumerate(range(0, num, per_shard)):
        records = []
        for i in range(start, min(num, start + per_shard)):
            video = np.zeros((FRAMES, SIZE, SIZE, 3), np.uint8)
            video[..., 0] = i
            video[..., 1] = np.arange(FRAMES)[:, None, None]
            records.append(ClipRecord(video, f"clip {i}", 8.0, f"clip-{i}"))
        entries.append(write_shard(out_dir / f"shard-{k:05d}.array_record", records))
    write_manifest(out_dir, entries)
    return out_dir


def decode(pixels: np.ndarray, channel: int) -> np.ndarray:
    return np.round((np.asarray(pixels)[..., channel] + 1.0) * 127.5).astype(int)


def record_ids(batch) -> list[int]:
    """Record index of every example of a video batch [b, t, h, w, 3]."""
    return decode(batch["pixels"], 0)[:, 0, 0, 0].tolist()


def read(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return coded_shards(tmp_path_factory.mktemp("shards"), 20)


def test_exact_resume_across_epochs_with_crops_and_strides(shard_dir):
    config = make_config(source="shards", path=str(shard_dir), clip_frames=3,
                         frame_strides=(1, 2))
    first = iter(pipeline.training_dataset(config, TOKENIZER, single_frame=False))
    read(first, 3)
    state = first.get_state()
    expected = read(first, 4)  # batches 4-7: crosses the epoch boundary at 20 records
    assert expected[0]["pixels"].shape == (4, 3, SIZE, SIZE, 3)

    fresh = iter(pipeline.training_dataset(config, TOKENIZER, single_frame=False))
    fresh.set_state(json.loads(json.dumps(state)))  # the state survives a JSON round trip
    assert_same_batches(read(fresh, 4), expected)


def test_exact_resume_with_a_worker_process(shard_dir):
    config = make_config(source="shards", path=str(shard_dir), num_workers=1)
    first = iter(pipeline.training_dataset(config, TOKENIZER, single_frame=True))
    read(first, 2)
    state = first.get_state()
    expected = read(first, 3)
    fresh = iter(pipeline.training_dataset(config, TOKENIZER, single_frame=True))
    fresh.set_state(state)
    assert_same_batches(read(fresh, 3), expected)
    assert expected[0]["pixels"].shape == (4, SIZE, SIZE, 3)


def test_states_saved_before_the_corrupt_record_stage_still_restore(shard_dir):
    config = make_config(source="shards", path=str(shard_dir))
    first = iter(pipeline.training_dataset(config, TOKENIZER, single_frame=False))
    read(first, 2)
    state = first.get_state()
    expected = read(first, 2)
    fresh = iter(pipeline.training_dataset(config, TOKENIZER, single_frame=False))
    fresh.set_state(state["parent"])  # the format the previous pipeline checkpointed
    assert_same_batches(read(fresh, 2), expected)


def test_two_processes_read_disjoint_halves_of_each_epoch(shard_dir):
    config = make_config(batch=4, source="shards", path=str(shard_dir))  # 2 per process
    per_process = []
    for index in (0, 1):
        iterator = iter(pipeline.training_dataset(config, TOKENIZER, single_frame=False,
                                                  process_index=index, process_count=2))
        batches = read(iterator, 10)  # two epochs: 5 batches x 2 = 10 records per epoch
        per_process.append([[i for b in batches[e * 5:(e + 1) * 5] for i in record_ids(b)]
                            for e in (0, 1)])
    for epoch in (0, 1):
        a, b = per_process[0][epoch], per_process[1][epoch]
        assert not set(a) & set(b)
        assert sorted(a + b) == list(range(20))
    assert per_process[0][0] != per_process[0][1]  # reshuffled for the second epoch


def test_a_damaged_record_is_skipped_and_counted(tmp_path):
    coded_shards(tmp_path, 10)
    path = tmp_path / "shard-00001.array_record"
    data = bytearray(path.read_bytes())
    at = data.find(b"clip 7")
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))

    config = make_config(batch=9, source="shards", path=str(tmp_path))
    batch = next(iter(pipeline.training_dataset(config, TOKENIZER, single_frame=False)))
    assert sorted(record_ids(batch)) == [0, 1, 2, 3, 4, 5, 6, 8, 9]  # the epoch minus record 7
    assert pipeline.skipped_in_batch(batch) == 1


def test_a_manifest_of_another_schema_version_stops_the_pipeline(tmp_path):
    coded_shards(tmp_path, 4)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["schema_version"] = 0
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    config = make_config(source="shards", path=str(tmp_path))
    with pytest.raises(ManifestError, match="schema_version 0"):
        pipeline.training_dataset(config, TOKENIZER, single_frame=False)


def test_bad_settings_fail_clearly(shard_dir):
    with pytest.raises(ValueError, match="needs config.data.path"):
        pipeline.training_dataset(make_config(source="shards"), TOKENIZER, single_frame=False)
    with pytest.raises(ValueError, match="unknown config.data.source 'webdataset'"):
        pipeline.training_dataset(make_config(source="webdataset"), TOKENIZER,
                                  single_frame=False)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        pipeline.training_dataset(make_config(batch=4), TOKENIZER, single_frame=False,
                                  process_count=3)
    config = make_config(source="shards", path=str(shard_dir))
    config.world.height = 32
    with pytest.raises(ValueError, match="are 16x16 but the model trains on 32x16"):
        pipeline.training_dataset(config, TOKENIZER, single_frame=False)


def test_temporal_crop_takes_evenly_strided_windows():
    video = np.zeros((10, 2, 2, 3), np.uint8)
    video[..., 0] = np.arange(10)[:, None, None]
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(50):
        frames = pipeline.temporal_crop(video, 4, (1, 3), rng)[:, 0, 0, 0].astype(int)
        steps = set(np.diff(frames))
        assert len(frames) == 4 and len(steps) == 1 and steps <= {1, 3}
        seen |= steps
    assert seen == {1, 3}  # stride 3 fits exactly: frames 0, 3, 6, 9
    with pytest.raises(ValueError, match="too short for clip_frames=6"):
        pipeline.temporal_crop(video, 6, (2,), rng)


def test_the_built_in_world_stays_the_default_source():
    config = make_config(batch=2)  # no data.source key, as in older configs
    batch = next(iter(pipeline.shapes_dataset(config, TOKENIZER, single_frame=False)))
    assert batch["pixels"].shape == (2, FRAMES, SIZE, SIZE, 3)
    assert batch["pixels"].min() >= -1.0 and batch["pixels"].max() <= 1.0
    assert batch["ids"].shape == (2, 24) and batch["mask"][:, 0].all()
    assert pipeline.skipped_in_batch(batch) == 0


def test_size_weights_reach_the_built_in_source():
    source = pipeline.make_source(make_config(size_weights={"small": 1.0, "large": 0.0}))
    assert {source[i]["attrs"]["size"] for i in range(30)} == {"small"}
    equal = pipeline.make_source(make_config(size_weights={"small": 1.0, "large": 1.0}))
    default = pipeline.make_source(make_config())  # as configs/shapes_stunet.py's default
    np.testing.assert_array_equal(equal[5]["video"], default[5]["video"])


def test_global_batch_spreads_the_process_batch_over_the_mesh():
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    local = {"pixels": np.arange(8 * 3, dtype=np.float32).reshape(8, 3),
             "ids": np.arange(8, dtype=np.int32)}
    arrays = pipeline.global_batch(local, mesh)
    assert arrays["pixels"].shape == (8, 3)  # one process: global == local
    assert len(arrays["pixels"].addressable_shards) == 8
    assert {s.data.shape for s in arrays["pixels"].addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(arrays["ids"]), local["ids"])
    with pytest.raises(ValueError, match="not axes of the mesh"):
        pipeline.global_batch(local, mesh, "batch")


# ----------------------------------------------------------------------------------------------
# TFDS (array_record, read without TensorFlow).


def test_clip_shards_tfds_builder_reads_back_the_shards(shard_dir, tmp_path):
    import tensorflow_datasets as tfds

    from lumiere_jax.data.shards import ShardSource
    from lumiere_jax.data.tfds_builder import build_clip_shards

    build_clip_shards(tmp_path, {"train": shard_dir})
    tfds_source = tfds.data_source("clip_shards", split="train", data_dir=str(tmp_path))
    shards = ShardSource(shard_dir)
    assert len(tfds_source) == len(shards) == 20
    by_id = {shards[i]["source_id"]: shards[i] for i in range(len(shards))}
    for i in range(len(tfds_source)):
        example = tfds_source[i]
        reference = by_id[example["source_id"].decode()]
        np.testing.assert_array_equal(example["video"], reference["video"])
        assert example["caption"].decode() == reference["caption"]
        assert example["fps"] == np.float32(8.0)

    config = make_config(batch=20, source="tfds", tfds_name="clip_shards", path=str(tmp_path))
    batch = next(iter(pipeline.training_dataset(config, TOKENIZER, single_frame=False)))
    assert sorted(record_ids(batch)) == list(range(20))  # one epoch, every record once


def test_any_tfds_array_record_dataset_reads_through_a_field_mapping(tmp_path):
    import tensorflow_datasets as tfds

    class RenamedClips(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "frames": tfds.features.Tensor(shape=(FRAMES, SIZE, SIZE, 3), dtype=np.uint8),
                "text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(6):
                yield i, {"frames": np.full((FRAMES, SIZE, SIZE, 3), 10 * i, np.uint8),
                          "text": f"clip {i}"}

    RenamedClips(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    config = make_config(batch=6, source="tfds", tfds_name="renamed_clips", path=str(tmp_path),
                         tfds_fields={"video": "frames", "caption": "text"})
    batch = next(iter(pipeline.training_dataset(config, TOKENIZER, single_frame=True)))
    values = sorted(decode(batch["pixels"], 0)[:, 0, 0].tolist())
    assert values == [0, 10, 20, 30, 40, 50]
    captions = {TOKENIZER.decode(ids) for ids in batch["ids"]}
    assert captions == {f"clip {i}" for i in range(6)}

    config.data.tfds_fields = {"video": "pixels"}
    with pytest.raises(ValueError, match=r"no feature\(s\) \{'video': 'pixels', 'caption': 'caption'\}.*"
                       r"features are \['frames', 'text'\]"):
        pipeline.training_dataset(config, TOKENIZER, single_frame=True)


def test_the_global_batch_does_not_depend_on_the_number_of_processes(shard_dir):
    """Side by side, the processes' batches of a step are one process's batch of that step:
    the same examples, the same crops, the same order (so a 2-host run can match 1 host)."""
    config = make_config(batch=4, source="shards", path=str(shard_dir))
    single = read(iter(pipeline.training_dataset(config, TOKENIZER, single_frame=False)), 7)
    parts = [read(iter(pipeline.training_dataset(config, TOKENIZER, single_frame=False,
                                                 process_index=i, process_count=2)), 7)
             for i in (0, 1)]
    for step in range(7):  # past the first epoch (5 batches of 4 from 20 records)
        for key in ("pixels", "ids", "mask"):
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(joined, single[step][key])
