"""Grain input pipelines: captioned clips -> batches of pixels in [-1, 1] and caption tokens.

Sources (config.data.source): 'shapes' (the built-in world, the default), 'shards' (a shard
directory, see shards.py) or 'tfds' (any TFDS dataset in array_record format, read without
TensorFlow through `tfds.data_source`, with a field mapping).

The pipeline is a `grain.MapDataset`: a seeded global shuffle, reshuffled every epoch, random
temporal crops / frame strides and tokenization seeded per position in that order, then each
process takes whole local batches of it in turn (ProcessBlocks: disjoint shares whose union
is the epoch, and a global batch that does not depend on the number of processes). The iterator's state (`get_state` / `set_state`, or Orbax through
grain.checkpoint) resumes exactly, also with worker processes (config.data.num_workers).

Damaged records are skipped, not fatal: each example carries `corrupt_skipped`, the number of
damaged records dropped just before it, so `skipped_in_batch(batch)` counts them per step.
Caption dropout for classifier-free guidance happens in the train step (train.cond_drop),
where the null caption's tokens are known.

Config keys read (all under config.data, all optional except as noted):
    source         'shapes' | 'shards' | 'tfds'                      (default 'shapes')
    split          split of the built-in world or of the TFDS dataset (default 'train')
    path           shard directory, or TFDS data_dir
    tfds_name      TFDS dataset name (source='tfds')
    tfds_fields    {'video': ..., 'caption': ...} TFDS feature names  (default identity)
    clip_frames    frames per example; 0 keeps every frame            (default 0)
    frame_strides  strides drawn uniformly per example                (default (1,))
    num_workers    Grain worker processes; 0 reads in this process    (default 0)
    prefetch       batches each worker keeps ready                    (default 2)
    read_threads   threads decoding records in each process           (default 2)
    read_ahead     records decoded ahead in each process     (default 2 x local batch)
    num_examples   source='shapes': only its first N clips; 0 = unbounded (default 0)
    style          source='shapes': objects in a style of synthetic.STYLES  (default plain)
    size_weights   source='shapes': {size: weight}, e.g. {'small': 3, 'large': 1}
                   to oversample small objects                        (default uniform)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from lumiere_jax.data.shards import CorruptRecordError, ShardSource
from lumiere_jax.data.synthetic import ShapesSource, ShapesWorld
from lumiere_jax.text.tokenizers import Tokenizer

EPOCH_SIZE = 100_000  # virtual clips per epoch of the procedural world (it is unbounded)
CORRUPT = "__corrupt__"  # key of the placeholder a damaged record becomes before it is dropped


def world_from_config(config: ConfigDict) -> ShapesWorld:
    return ShapesWorld(**config.world.to_dict())


# ----------------------------------------------------------------------------------------------
# Sources.


class TfdsSource:
    """A TFDS array_record dataset as clips: fields renamed by `fields` (ours -> TFDS names).

    Needs the TFDS features 'video' (uint8 [t, h, w, 3]) and 'caption' (text) under some name;
    text comes back from TFDS as bytes and is decoded to str.
    """

    def __init__(self, name: str, split: str, data_dir: str | None,
                 fields: Mapping[str, str] | None = None):
        import tensorflow_datasets as tfds  # optional: only this source needs it

        self.fields = {"video": "video", "caption": "caption", **dict(fields or {})}
        self._source = tfds.data_source(name, split=split, data_dir=data_dir)
        features = set(self._source.dataset_info.features.keys())
        unknown = {ours: theirs for ours, theirs in self.fields.items() if theirs not in features}
        if unknown:
            raise ValueError(f"TFDS dataset {name!r} has no feature(s) {unknown} named in the "
                             f"field mapping; its features are {sorted(features)}")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index) -> dict[str, Any]:
        raw = self._source[int(index)]
        example = {ours: raw[theirs] for ours, theirs in self.fields.items()}
        if isinstance(example["caption"], bytes):
            example["caption"] = example["caption"].decode("utf-8")
        example["video"] = np.asarray(example["video"], np.uint8)
        return example


class SkipCorrupt:
    """Wraps a source: a CorruptRecordError becomes a placeholder {CORRUPT: message}."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index) -> dict[str, Any]:
        try:
            return self.source[index]
        except CorruptRecordError as error:
            logging.warning("skipping a damaged record: %s", error)
            return {CORRUPT: str(error)}


def make_source(config: ConfigDict):
    """The random-access clip source named by config.data.source."""
    data = config.data
    kind = data.get("source", "shapes")
    if kind == "shapes":
        # num_examples > 0: only the first few clips (e.g. a handful of style images);
        # style: the world's objects rendered in a style (synthetic.STYLES), '' or None plain.
        size = int(data.get("num_examples", 0) or 0) or EPOCH_SIZE
        weights = data.get("size_weights")
        return ShapesSource(world_from_config(config), data.get("split", "train"), size,
                            style=data.get("style") or None,
                            size_weights=dict(weights) if weights else None)
    if kind == "shards":
        if not data.get("path"):
            raise ValueError("config.data.source='shards' needs config.data.path (a shard "
                             "directory written by `lumiere data synth` or `lumiere data import`)")
        source = ShardSource(data.path)
        height, width = config.world.height, config.world.width
        if (source.manifest["height"], source.manifest["width"]) != (height, width):
            raise ValueError(f"shards in {data.path} are {source.manifest['height']}x"
                             f"{source.manifest['width']} but the model trains on {height}x{width} "
                             "(config.world.height/width); import the videos at that size")
        return source
    if kind == "tfds":
        if not data.get("tfds_name"):
            raise ValueError("config.data.source='tfds' needs config.data.tfds_name")
        fields = data.get("tfds_fields")
        return TfdsSource(data.tfds_name, data.get("split", "train"), data.get("path") or None,
                          fields.to_dict() if hasattr(fields, "to_dict") else fields)
    raise ValueError(f"unknown config.data.source {kind!r}; use 'shapes', 'shards' or 'tfds'")


class ProcessBlocks(grain.MapDataset):
    """One process's share of an endless stream: blocks of `block` consecutive elements, block
    j going to process j % process_count.

    With block = the local batch, the processes' batches of step k, side by side, are the
    elements a single process would batch at step k. The parent is the repeated dataset, so
    batches run across epoch ends exactly as with one process.
    """

    def __init__(self, parent: grain.MapDataset, block: int, process_index: int,
                 process_count: int):
        super().__init__(parent)
        self._block, self._index, self._count = block, process_index, process_count

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        rounds, offset = divmod(int(index), self._block)
        return self._parent[(rounds * self._count + self._index) * self._block + offset]


# ----------------------------------------------------------------------------------------------
# Per-example transforms.


def temporal_crop(video: np.ndarray, clip_frames: int, strides: Sequence[int],
                  rng: np.random.Generator) -> np.ndarray:
    """A random window of `clip_frames` frames, every `stride`-th, stride drawn from those that
    fit: video [t, h, w, 3] -> [clip_frames, h, w, 3]. clip_frames=0 returns the video."""
    if clip_frames == 0:
        return video
    t = video.shape[0]
    fitting = [s for s in strides if (clip_frames - 1) * s + 1 <= t]
    if not fitting:
        raise ValueError(f"a clip of {t} frames is too short for clip_frames={clip_frames} at "
                         f"any stride of {tuple(strides)}")
    stride = fitting[rng.integers(len(fitting))]
    span = (clip_frames - 1) * stride + 1
    start = int(rng.integers(t - span + 1))
    return video[start : start + span : stride]


class ToExample(grain.transforms.RandomMap):
    """A clip dict -> {'pixels': float32 [t, h, w, 3] (or one frame [h, w, 3]), 'ids', 'mask',
    'corrupt_skipped': 0}; a damaged-record placeholder passes through untouched."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, single_frame: bool,
                 clip_frames: int = 0, frame_strides: Sequence[int] = (1,)):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.single_frame = single_frame
        self.clip_frames = clip_frames
        self.frame_strides = tuple(frame_strides)

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if CORRUPT in element:
            return element
        video = element["video"]
        if self.single_frame:  # the text-to-image stage sees random frames of the clips
            video = video[rng.integers(video.shape[0])]
        else:
            video = temporal_crop(video, self.clip_frames, self.frame_strides, rng)
        # Real captions can run long; cut them rather than stop training (the tokenizer warns).
        tokens = self.tokenizer.encode_batch([element["caption"]], self.max_length,
                                             truncate=True)
        return {
            "pixels": video.astype(np.float32) / 127.5 - 1.0,
            "ids": tokens.ids[0],
            "mask": tokens.mask[0],
            "corrupt_skipped": np.int32(0),
        }


# ----------------------------------------------------------------------------------------------
# Dropping damaged records with a count that survives workers and checkpoints.


class _DropCorruptIterator(grain.DatasetIterator):
    """Drops placeholders; the next good example's 'corrupt_skipped' says how many it passed."""

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self._pending = 0  # placeholders dropped since the last example handed out

    def __next__(self) -> dict[str, Any]:
        while True:
            element = next(self._parent)
            if CORRUPT not in element:
                break
            self._pending += 1
        element = dict(element, corrupt_skipped=np.int32(self._pending))
        self._pending = 0
        return element

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "pending": self._pending}

    def set_state(self, state: dict[str, Any]) -> None:
        if "parent" not in state:  # saved before this stage existed: the parent's state
            state = {"parent": state, "pending": 0}
        self._parent.set_state(state["parent"])
        self._pending = int(state["pending"])


class DropCorrupt(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset):
        super().__init__(parent)

    def __iter__(self) -> _DropCorruptIterator:
        return _DropCorruptIterator(self._parent.__iter__())


def skipped_in_batch(batch: Mapping[str, Any]) -> int:
    """How many damaged records were skipped to fill this batch."""
    return int(np.sum(batch["corrupt_skipped"]))


# ----------------------------------------------------------------------------------------------
# The pipeline.


def training_dataset(config: ConfigDict, tokenizer: Tokenizer, *, single_frame: bool,
                     process_index: int = 0, process_count: int = 1,
                     source=None) -> grain.IterDataset:
    """Infinite, shuffled, batched examples: {'pixels', 'ids', 'mask', 'corrupt_skipped'}.

    Each process reads a disjoint slice of every epoch and batches `batch_size // processes`.
    `source` overrides config.data.source (any random-access source of clip dicts).
    """
    data = config.data
    batch = config.train.batch_size
    if not (0 <= process_index < process_count):
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    if batch % process_count:
        raise ValueError(f"train.batch_size={batch} is not divisible by the {process_count} "
                         "processes; each process loads an equal share")
    strides = tuple(data.get("frame_strides", (1,)))
    clip_frames = int(data.get("clip_frames", 0))
    if clip_frames < 0 or not strides or min(strides) < 1:
        raise ValueError(f"config.data.clip_frames must be >= 0 (got {clip_frames}) and "
                         f"frame_strides positive ints (got {strides})")
    source = make_source(config) if source is None else source
    if len(source) < batch:
        raise ValueError(f"the source holds {len(source)} records, fewer than one global batch "
                         f"(train.batch_size={batch})")
    local_batch = batch // process_count
    ds = grain.MapDataset.source(SkipCorrupt(source)).seed(config.seed).shuffle()
    # Crops and tokens are drawn per position in the global order (before the process split),
    # and each process takes whole local batches of that order, so the global batch of step
    # k is the same examples in the same order whatever the number of processes.
    ds = ds.random_map(
        ToExample(tokenizer, config.text.max_length, single_frame, clip_frames, strides))
    ds = ProcessBlocks(ds.repeat(None), local_batch, process_index, process_count)
    # Grain's default read-ahead (16 threads, 500 elements) suits KiB-sized records; an
    # 80x128x128 float clip is 16 MB, so read ahead about two batches instead.
    read = grain.ReadOptions(num_threads=int(data.get("read_threads", 2)),
                             prefetch_buffer_size=int(data.get("read_ahead", 2 * local_batch)))
    ds = DropCorrupt(ds.to_iter_dataset(read))
    ds = ds.batch(local_batch, drop_remainder=True)
    workers = int(data.get("num_workers", 0))
    if workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=int(data.get("prefetch", 2))))
    return ds


def shapes_dataset(config: ConfigDict, tokenizer: Tokenizer, *, single_frame: bool,
                   process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Former name of `training_dataset` (which also reads shards and TFDS)."""
    return training_dataset(config, tokenizer, single_frame=single_frame,
                            process_index=process_index, process_count=process_count)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh,
                 batch_axes: str | tuple[str, ...] = ("data",)) -> dict[str, jax.Array]:
    """This process's batch -> global jax.Arrays split along dim 0 over `batch_axes` of `mesh`.

    Every process passes its own rows (batch_size // process_count of them); the global array
    has all processes' rows, in process order.
    """
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
        raise ValueError(f"batch axes {unknown} are not axes of the mesh {mesh.axis_names}")
    sharding = NamedSharding(mesh, PartitionSpec(axes))
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in local_batch.items()}
