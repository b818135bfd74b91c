"""MetricsWriter: CSV contents (header, union of keys, resume, rollback, nan), TensorBoard
events and PNG grids, read back from disk."""

import csv
import io
import math
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from lumiere_jax.train.metrics import MetricsWriter, image_grid


def _read_csv(workdir):
    with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
        return list(csv.reader(f))


def _read_events(tb_dir):
    """All events of all TensorBoard files (TFRecord framing: length, crc, data, crc)."""
    events = []
    for name in sorted(os.listdir(tb_dir)):
        with open(os.path.join(tb_dir, name), "rb") as f:
            data = f.read()
        position = 0
        while position < len(data):
            (length,) = struct.unpack("<Q", data[position:position + 8])
            position += 12
            events.append(event_pb2.Event.FromString(data[position:position + length]))
            position += length + 4
    return events


def _scalars(events):
    return [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value
            if v.HasField("simple_value")]


def test_scalars_csv_and_tensorboard(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write_scalars(1, {"loss": 0.5, "lr": jnp.float32(0.25)})
        writer.write_scalars(2, {"loss": np.float64(0.125), "lr": 0.5, "grad_norm": 3})
        writer.write_scalars(3, {"loss": float("nan"), "lr": jnp.inf})
    assert _read_csv(tmp_path) == [
        ["step", "loss", "lr", "grad_norm"],  # a new key rewrote the header
        ["1", "0.5", "0.25", ""],
        ["2", "0.125", "0.5", "3"],
        ["3", "nan", "inf", ""],
    ]
    scalars = _scalars(_read_events(tmp_path / "tb"))
    assert scalars[:5] == [(1, "loss", 0.5), (1, "lr", 0.25), (2, "loss", 0.125),
                           (2, "lr", 0.5), (2, "grad_norm", 3.0)]
    assert scalars[5][:2] == (3, "loss") and math.isnan(scalars[5][2])
    assert scalars[6] == (3, "lr", math.inf)


def test_resume_appends_under_one_header_and_drops_rolled_back_rows(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for step in (10, 20, 30):
            writer.write_scalars(step, {"loss": step / 10})
    with MetricsWriter(tmp_path) as writer:  # resumed after step 30
        writer.write_scalars(40, {"loss": 4.0})
    assert _read_csv(tmp_path) == [["step", "loss"], ["10", "1.0"], ["20", "2.0"],
                                   ["30", "3.0"], ["40", "4.0"]]

    with MetricsWriter(tmp_path) as writer:  # crashed at 40, restored the step-20 checkpoint
        writer.write_scalars(21, {"loss": 2.5, "eval_loss": 9.0})
        writer.write_scalars(30, {"loss": 3.5})
    assert _read_csv(tmp_path) == [["step", "loss", "eval_loss"], ["10", "1.0", ""],
                                   ["20", "2.0", ""], ["21", "2.5", "9.0"], ["30", "3.5", ""]]
    events = _read_events(tmp_path / "tb")
    purges = [e.step for e in events if e.session_log.status == event_pb2.SessionLog.START]
    assert purges == [40, 21]  # TensorBoard hides the old run's events from these steps on


def test_images_grid_png_and_tensorboard(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(5, 4, 6, 3), dtype=np.uint8)
    with MetricsWriter(tmp_path) as writer:
        path = writer.write_images(12, "samples", images)
        single_path = writer.write_images(3, "first_frame", images[0])
    assert path == os.path.join(tmp_path, "samples", "samples_0000012.png")
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 4 + 2, 3 * 6 + 2 * 2, 3)  # 5 images: 3 columns, 2 rows, pad 2
    np.testing.assert_array_equal(grid[0:4, 0:6], images[0])
    np.testing.assert_array_equal(grid[0:4, 8:14], images[1])
    np.testing.assert_array_equal(grid[6:10, 8:14], images[4])
    assert (grid[4:6] == 255).all() and (grid[6:10, 16:22] == 255).all()  # gap, empty cell
    np.testing.assert_array_equal(np.asarray(Image.open(single_path)), images[0])

    tb_images = [(e.step, v.tag, v.image) for e in _read_events(tmp_path / "tb")
                 for v in e.summary.value if v.HasField("image")]
    assert [(step, tag) for step, tag, _ in tb_images] == [(12, "samples"), (3, "first_frame")]
    decoded = np.asarray(Image.open(io.BytesIO(tb_images[0][2].encoded_image_string)))
    np.testing.assert_array_equal(decoded, grid)


def test_image_grid_layout():
    images = np.arange(3 * 2 * 2 * 1, dtype=np.uint8).reshape(3, 2, 2, 1)
    grid = image_grid(images, columns=3, pad=1, pad_value=0)
    expected = np.zeros((2, 8, 1), np.uint8)
    for i in range(3):
        expected[:, 3 * i:3 * i + 2] = images[i]
    np.testing.assert_array_equal(grid, expected)


def test_non_primary_and_no_tensorboard_write_only_what_they_should(tmp_path):
    with MetricsWriter(tmp_path / "other", is_primary=False) as writer:
        writer.write_scalars(1, {"loss": 1.0})
        assert writer.write_images(1, "x", np.zeros((2, 2, 3), np.uint8)) is None
    assert not (tmp_path / "other").exists()

    with MetricsWriter(tmp_path / "csv_only", tensorboard=False) as writer:
        writer.write_scalars(1, {"loss": 1.0})
        writer.write_images(1, "x", np.zeros((2, 2, 3), np.uint8))
    assert sorted(os.listdir(tmp_path / "csv_only")) == ["metrics.csv", "samples"]


def test_bad_input_errors(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match=r"'loss' must be a scalar.*\(2,\)"):
            writer.write_scalars(1, {"loss": np.ones(2)})
        with pytest.raises(ValueError, match="other than 'step'"):
            writer.write_scalars(1, {"step": 1})
        with pytest.raises(TypeError, match="must be uint8.*astype"):
            writer.write_images(1, "x", np.zeros((2, 2, 3), np.float32))
        with pytest.raises(ValueError, match=r"\[n, h, w, 3\].*\(2, 2\)"):
            writer.write_images(1, "x", np.zeros((2, 2), np.uint8))
        with pytest.raises(ValueError, match="file name"):
            writer.write_images(1, "a/b", np.zeros((2, 2, 3), np.uint8))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "metrics.csv").write_text("time,loss\n1,2\n")
    with pytest.raises(ValueError, match="not a metrics file"):
        MetricsWriter(tmp_path / "foreign").write_scalars(1, {"loss": 1.0})
