"""Training metrics on disk: a CSV table, TensorBoard events and PNG sample grids.

Layout under `workdir` (a local path or gs://):
  metrics.csv                    one row per `write_scalars` call; columns `step` + keys
  tb/events.out.tfevents.*       the same scalars and the images, for TensorBoard
  samples/{name}_{step:07d}.png  image grids

CSV rules (chosen so the file stays one plain table that pandas or a spreadsheet reads):
- The header is written on the first write; reopening an existing file appends below it.
- A key not seen before rewrites the file (atomically) with the union of the columns; rows
  that lack a key leave its cell empty. Column order is first-seen order.
- Resuming from a checkpoint repeats steps: the first write after opening drops the rows of
  the old run with step >= that write's step (TensorBoard gets the same via `purge_step`).
- Non-finite values are written as they are ("nan", "inf") and never raise.

On gs://, which cannot append, every row rewrites the CSV object whole (an object write is
atomic, so a reader sees the old table or the new one), and TensorBoard events go through
tensorboardX's own gs:// writer (google-cloud-storage, installed with the `gcs` extra).

Only the primary process (`is_primary=True`, usually `jax.process_index() == 0`) writes;
the others' calls do nothing, so every process can call the same code.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath
from PIL import Image
from tensorboardX import SummaryWriter

from lumiere_jax.data.remote import is_remote, write_atomic

_STEP = "step"
_IMAGE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _to_number(value: Any, key: str) -> int | float:
    """A Python int/float from a scalar (Python, numpy or jax, on device or host)."""
    array = np.asarray(jax.device_get(value))
    if array.size != 1:
        raise ValueError(f"metric {key!r} must be a scalar, got an array of shape {array.shape}")
    if array.dtype.kind in "biu":
        return int(array.reshape(()))
    if array.dtype.kind != "f":
        raise TypeError(f"metric {key!r} must be a number, got dtype {array.dtype}")
    return float(array.reshape(()))


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 2,
               pad_value: int = 255) -> np.ndarray:
    """Tiles images [n, h, w, c] into one [rows*h + gaps, columns*w + gaps, c] image.

    Images fill rows left to right; `columns` defaults to ceil(sqrt(n)); `pad` pixels of
    `pad_value` separate neighbours (no outer border); empty cells stay `pad_value`.
    """
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * h + (rows - 1) * pad, columns * w + (columns - 1) * pad, c),
                   pad_value, dtype=images.dtype)
    for i, image in enumerate(images):
        top, left = (i // columns) * (h + pad), (i % columns) * (w + pad)
        grid[top:top + h, left:left + w] = image
    return grid


def _as_image_batch(images: Any, name: str) -> np.ndarray:
    """uint8 [n, h, w, 3] from [n, h, w, 3] or a single [h, w, 3]."""
    array = np.asarray(jax.device_get(images))
    if array.dtype != np.uint8:
        raise TypeError(
            f"images {name!r} must be uint8, got {array.dtype}; convert floats in [0, 1] "
            "with (np.clip(x, 0, 1) * 255).round().astype(np.uint8)")
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
        raise ValueError(f"images {name!r} must be [n, h, w, 3] or [h, w, 3] with n >= 1, "
                         f"got shape {np.shape(images)}")
    return array


class MetricsWriter:
    """Writes scalars to CSV + TensorBoard and image grids to PNG + TensorBoard."""

    def __init__(self, workdir: str | os.PathLike, *, is_primary: bool = True,
                 tensorboard: bool = True):
        self.workdir = os.fspath(workdir)
        self._remote = is_remote(self.workdir)  # gs://: through epath, never os/open
        self.is_primary = is_primary
        self.csv_path = os.path.join(self.workdir, "metrics.csv")
        self.tensorboard_dir = os.path.join(self.workdir, "tb")
        self.samples_dir = os.path.join(self.workdir, "samples")
        self._use_tensorboard = tensorboard
        self._tensorboard: SummaryWriter | None = None  # opened at the first write
        self._columns: list[str] | None = None  # CSV header; None until first write
        if is_primary:
            epath.Path(self.workdir).mkdir(parents=True, exist_ok=True)

    # -- scalars

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Appends one CSV row {step, **scalars} and logs each scalar to TensorBoard."""
        if not self.is_primary:
            return
        if not isinstance(scalars, Mapping):
            raise TypeError(f"scalars must be a dict of name -> number, got {type(scalars)}")
        for key in scalars:
            if not isinstance(key, str) or not key or key == _STEP:
                raise ValueError(f"metric name {key!r}: use a non-empty string other than "
                                 f"{_STEP!r}")
        row = {key: _to_number(value, key) for key, value in scalars.items()}
        step = int(step)
        self._write_csv_row(step, row)
        tensorboard = self._tensorboard_writer(step)
        if tensorboard is not None:
            for key, value in row.items():
                tensorboard.add_scalar(key, value, step)
            tensorboard.flush()

    def _write_csv_row(self, step: int, row: dict[str, int | float]) -> None:
        first_write = self._columns is None
        if first_write:
            old_columns, old_rows = self._read_csv()
            kept = [r for r in old_rows if int(r[_STEP]) < step]  # drop a rolled-back run's rows
            columns = old_columns or [_STEP]
            columns += [key for key in row if key not in columns]
            self._columns = columns
            if not old_columns or len(kept) != len(old_rows) or columns != old_columns:
                self._rewrite_csv(kept)
        else:
            new_keys = [key for key in row if key not in self._columns]
            if new_keys:
                self._columns = self._columns + new_keys
                self._rewrite_csv(self._read_csv()[1])
        if self._remote:  # no appends on object stores: the whole table again
            line = io.StringIO()
            csv.DictWriter(line, fieldnames=self._columns).writerow({_STEP: step, **row})
            path = epath.Path(self.csv_path)
            path.write_bytes(path.read_bytes() + line.getvalue().encode())
            return
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._columns).writerow({_STEP: step, **row})

    def _read_csv(self) -> tuple[list[str], list[dict[str, str]]]:
        path = epath.Path(self.csv_path)
        if not path.exists():
            return [], []
        reader = csv.DictReader(io.StringIO(path.read_bytes().decode(), newline=""))
        rows = list(reader)
        columns = list(reader.fieldnames or [])
        if columns and columns[0] != _STEP:
            raise ValueError(f"{self.csv_path} is not a metrics file written by MetricsWriter "
                             f"(first column {columns[0]!r}, expected {_STEP!r}); move it away")
        return columns, rows

    def _rewrite_csv(self, rows: list[dict[str, str]]) -> None:
        """Writes header + rows whole (data.remote.write_atomic), so a reader sees the old
        table or the new one."""
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self._columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(self.csv_path, text.getvalue())

    # -- images

    def write_images(self, step: int, name: str, images: Any) -> str | None:
        """Saves images (uint8 [n, h, w, 3] or [h, w, 3]) as one grid PNG; returns its path."""
        if not isinstance(name, str) or not _IMAGE_NAME.match(name):
            raise ValueError(f"image name {name!r}: use letters, digits, '_', '.' or '-' "
                             "(it becomes part of a file name)")
        if not self.is_primary:
            return None
        batch = _as_image_batch(images, name)
        grid = image_grid(batch)
        path = os.path.join(self.samples_dir, f"{name}_{int(step):07d}.png")
        if self._remote:
            png = io.BytesIO()
            Image.fromarray(grid).save(png, format="png")
            epath.Path(path).write_bytes(png.getvalue())
        else:
            os.makedirs(self.samples_dir, exist_ok=True)
            Image.fromarray(grid).save(path)
        tensorboard = self._tensorboard_writer(int(step))
        if tensorboard is not None:
            tensorboard.add_image(name, grid, int(step), dataformats="HWC")
            tensorboard.flush()
        return path

    # -- lifetime

    def _tensorboard_writer(self, step: int) -> SummaryWriter | None:
        """Opens TensorBoard at the first write, hiding a rolled-back run's later events."""
        if not self._use_tensorboard:
            return None
        if self._tensorboard is None:
            tensorboard_dir = epath.Path(self.tensorboard_dir)
            resuming = tensorboard_dir.is_dir() and any(tensorboard_dir.iterdir())
            # The default file name has one-second resolution: two sessions within a second
            # would write to the same file and the second would erase the first.
            self._tensorboard = SummaryWriter(logdir=self.tensorboard_dir,
                                              purge_step=step if resuming else None,
                                              filename_suffix=f".{time.time_ns()}")
        return self._tensorboard

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
