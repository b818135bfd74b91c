"""Input pipeline throughput: `python -m bench.bench_data [--batches N] [--workers 0,1,2]`.

Writes built-in-world shards for two clip formats, `tiny` (16x32x32, the base model's tiny
configs) and `paper` (80x128x128, Lumiere's base model), then times the training pipeline
(config.data.source='shards': shuffle, decode, temporal crop, tokenize, batch) with 0, 1 and 2
Grain worker processes. The first batch (worker start-up) is timed separately and excluded
from the rate. Prints a markdown table of records/s and frames/s.

Compare with the trainer's consumption: records/s needed = batch size / step time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from absl import flags
from ml_collections import ConfigDict

from lumiere_jax.data.pipeline import training_dataset
from lumiere_jax.data.shards import write_synthetic_shards
from lumiere_jax.data.synthetic import ShapesWorld
from lumiere_jax.text.tokenizers import make_tokenizer

CLIP_FORMATS = {  # name: (world, records written, batch size)
    "tiny": (ShapesWorld(num_frames=16, height=32, width=32, fps=8.0), 512, 16),
    "paper": (ShapesWorld(num_frames=80, height=128, width=128, fps=16.0), 48, 4),
}


def pipeline_config(world: ShapesWorld, shard_dir: Path, batch: int, workers: int) -> ConfigDict:
    return ConfigDict({
        "seed": 0,
        "world": {"num_frames": world.num_frames, "height": world.height, "width": world.width,
                      "fps": world.fps, "seed": world.seed},
        "data": {"source": "shards", "path": str(shard_dir), "num_workers": workers},
        "text": {"max_length": 80},
        "train": {"batch_size": batch},
    })


def measure(config: ConfigDict, batches: int) -> tuple[float, float]:
    """(seconds to the first batch, seconds per batch after it)."""
    tokenizer = make_tokenizer("byte")
    start = time.perf_counter()
    iterator = iter(training_dataset(config, tokenizer, single_frame=False))
    next(iterator)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    per_batch = (time.perf_counter() - start) / batches
    del iterator  # stops the worker processes
    return first, per_batch


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20, help="batches timed per setting")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    parser.add_argument("--formats", default="tiny,paper", help=f"of {', '.join(CLIP_FORMATS)}")
    args = parser.parse_args(argv[1:])
    rows = ["| clip format | batch | workers | first batch (s) | records/s | frames/s |",
            "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.formats.split(","):
            world, records, batch = CLIP_FORMATS[name]
            shard_dir = Path(tmp) / name
            start = time.perf_counter()
            write_synthetic_shards(shard_dir, world, "train", records, records_per_shard=64)
            print(f"{name}: wrote {records} records in {time.perf_counter() - start:.1f} s",
                  file=sys.stderr)
            for workers in (int(w) for w in args.workers.split(",")):
                config = pipeline_config(world, shard_dir, batch, workers)
                first, per_batch = measure(config, args.batches)
                rate = batch / per_batch
                rows.append(f"| {name} {world.num_frames}x{world.height}x{world.width} | {batch} "
                            f"| {workers} | {first:.2f} | {rate:.0f} | "
                            f"{rate * world.num_frames:.0f} |")
                print(rows[-1], file=sys.stderr)
    print("\n".join(rows))


if __name__ == "__main__":
    flags.FLAGS(sys.argv[:1])  # Grain workers read absl flags; our own flags go to argparse
    main(sys.argv)
