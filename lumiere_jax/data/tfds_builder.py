"""A TFDS dataset builder for clip shard directories, in array_record format (no TensorFlow).

    builder = ClipShards(data_dir="~/tfds", shard_dirs={"train": "shards/train"})
    builder.download_and_prepare()
    source = tfds.data_source("clip_shards", split="train", data_dir="~/tfds")

Features: 'video' uint8 [t, h, w, 3], 'caption' text, 'fps' float32, 'source_id' text.
The video is a `tfds.features.Tensor` with zlib encoding, not `tfds.features.Video`: Video
needs TensorFlow to encode and decode, Tensor does not. Precomputed T5 embeddings are not
carried (TFDS features have one fixed structure; read them from the shards themselves).
TFDS shuffles records by key at write time, so read order differs from the shards'.

The pipeline reads this (or any TFDS array_record dataset, given a field mapping) with
config.data.source='tfds', data.tfds_name, data.path=<data_dir>, data.tfds_fields.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from lumiere_jax.data.shards import ShardSource


class ClipShards(tfds.core.GeneratorBasedBuilder):
    """Captioned clips from lumiere_jax shard directories, one directory per split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release: video, caption, fps, source_id."}
    # No download checksums to look up. TFDS 4.9.10 finds them through `code_path`, which for
    # a builder inside a package imports `importlib_resources` (a backport TFDS declares only
    # for Python < 3.9), failing on 3.11.
    code_path = None

    def __init__(self, *, shard_dirs: Mapping[str, str | os.PathLike] | None = None, **kwargs):
        # Reading an existing build needs no shard_dirs; only download_and_prepare does.
        kwargs.setdefault("file_format", "array_record")
        self._shard_dirs = dict(shard_dirs or {})
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: dataset_info_from_configs would look for metadata files
        # (README, CITATIONS) next to this module.
        return tfds.core.DatasetInfo(
            builder=self,
            description="Captioned video clips written by lumiere_jax (shards.py).",
            features=tfds.features.FeaturesDict({
                "video": tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8,
                                              encoding="zlib"),
                "caption": tfds.features.Text(),
                "fps": tfds.features.Scalar(dtype=np.float32),
                "source_id": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager):
        if not self._shard_dirs:
            raise ValueError("ClipShards needs shard_dirs={split: shard directory} to build; "
                             "e.g. ClipShards(data_dir=..., shard_dirs={'train': 'shards/'})")
        return {split: self._generate_examples(path) for split, path in self._shard_dirs.items()}

    def _generate_examples(self, shard_dir):
        source = ShardSource(shard_dir, verify=True)
        for index in range(len(source)):
            clip = source[index]
            yield index, {"video": clip["video"], "caption": clip["caption"],
                          "fps": np.float32(clip["fps"]), "source_id": clip["source_id"]}


def build_clip_shards(data_dir: str | os.PathLike,
                      shard_dirs: Mapping[str, str | os.PathLike]) -> ClipShards:
    """Build (or reuse) the ClipShards TFDS dataset under `data_dir`; returns the builder."""
    builder = ClipShards(data_dir=str(data_dir), shard_dirs=shard_dirs)
    builder.download_and_prepare()
    return builder
