"""The stage-0 trainer end to end on a few steps: files, exact resume, NaN safety, errors."""

import csv
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lumiere_jax.config import ConfigError, load_config
from lumiere_jax.diffusion.schedules import Diffusion
from lumiere_jax.sampling import motion_word_gaps
from lumiere_jax.text.tokenizers import make_tokenizer
from lumiere_jax.train import trainer
from lumiere_jax.train.checkpoint import Checkpointer, CheckpointMismatchError

SMOKE = "configs/shapes_t2i.py:smoke,channels=8"


def _losses(workdir) -> dict[int, str]:
    with open(workdir / "metrics.csv") as f:
        return {int(row["step"]): row["loss"] for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    trainer.train(load_config(SMOKE), str(workdir))
    return workdir


def test_a_run_writes_config_checkpoints_metrics_and_samples(run_dir):
    assert json.loads((run_dir / "config.json").read_text())["train"]["steps"] == 4
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["2", "4"]
    assert set(_losses(run_dir)) == {1, 2, 3, 4}
    assert all(np.isfinite(float(v)) for v in _losses(run_dir).values())
    assert (run_dir / "samples" / "samples_0000004.png").exists()
    assert any((run_dir / "tb").iterdir())


def test_resume_is_exact(run_dir, tmp_path):
    # 2 steps, stop, then resume to 4: the same losses, bit for bit, as the 4-step run.
    trainer.train(load_config(SMOKE, ["train.steps=2"]), str(tmp_path))
    trainer.train(load_config(SMOKE), str(tmp_path))
    assert _losses(tmp_path) == _losses(run_dir)


def test_resume_with_another_config_is_refused(run_dir):
    with pytest.raises(ValueError, match=r"different config.*\n.*train.lr"):
        trainer.train(load_config(SMOKE, ["train.lr=0.5"]), str(run_dir))


def _nan_after(k: int) -> optax.GradientTransformation:
    """Updates become NaN from the k-th optimizer step on."""
    def init(params):
        return jnp.zeros((), jnp.int32)

    def update(updates, count, params=None):
        poison = jnp.where(count + 1 >= k, jnp.nan, 0.0)
        return jax.tree.map(lambda u: u + poison, updates), count + 1

    return optax.GradientTransformation(init, update)


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    make = trainer.make_optimizer
    monkeypatch.setattr(trainer, "make_optimizer",
                        lambda cfg: optax.chain(make(cfg), _nan_after(3)))
    with pytest.raises(trainer.NonFiniteLossError, match="step 3"):
        trainer.train(load_config(SMOKE), str(tmp_path))
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.latest_step() == 2
    ckpt.close()
    monkeypatch.undo()
    model, step = trainer.restore_model(load_config(SMOKE), str(tmp_path))
    assert step == 2
    kernel = np.asarray(model.net.conv_in.kernel[...])
    assert np.isfinite(kernel).all()


def test_restore_errors(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        trainer.restore_model(load_config(SMOKE), str(tmp_path))
    other = load_config("configs/shapes_t2i.py:smoke,channels=16")
    with pytest.raises(CheckpointMismatchError, match=r"net/conv_in/kernel.*\(3, 3, 3, 8\)"):
        trainer.restore_model(other, str(run_dir))


def test_unwritable_workdir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="choose a writable --workdir"):
        trainer.train(load_config(SMOKE), str(blocker / "run"))


def test_sample_and_eval_write_files(run_dir, tmp_path):
    from lumiere_jax.sampling import evaluate, sample_to_files

    config = load_config(SMOKE)
    paths = sample_to_files(config, str(run_dir), ["a red circle moving left"], [0, 1], [1.0],
                            out=str(tmp_path))
    assert len(paths) == 2 and all(p.endswith(".png") for p in paths)
    report = evaluate(config, str(run_dir))
    for split in ("test", "heldout"):
        assert report["summary"][split]["n"] == config.eval.num_samples
        assert 0.0 <= report["summary"][split]["colour_acc"] <= 1.0
    assert (run_dir / "eval" / "step_4.json").exists()
    assert "motion_word" not in report["summary"]  # an image model: no motion to probe
    with pytest.raises(ValueError, match="empty prompt"):
        sample_to_files(config, str(run_dir), ["  "], [0], [1.0], out=str(tmp_path))
    with pytest.raises(ValueError, match="circel.*did you mean 'circle'"):
        sample_to_files(config, str(run_dir), ["a red circel"], [0], [1.0], out=str(tmp_path))
    with pytest.raises(ValueError, match="guidance"):
        sample_to_files(config, str(run_dir), ["a red circle"], [0], [-1.0], out=str(tmp_path))


@pytest.mark.parametrize("override, message", [
    ("--config.trian.steps=3", "Did you mean 'train'"),
    ("--config.train.steps=1.5", "train.steps expects an int"),
])
def test_cli_config_errors(override, message, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lumiere_jax.cli", "train", "--config", "configs/shapes_t2i.py",
         override, "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def _tree_files(directory) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in directory.rglob("*") if p.is_file()}


def test_stage1_inflates_freezes_and_writes_frozen_weights_once(run_dir, tmp_path):
    from flax import nnx

    from lumiere_jax.train.export import export_model, load_export

    image_model, step = trainer.restore_model(load_config(SMOKE), str(run_dir))
    export_dir = tmp_path / "t2i_export"
    export_model(image_model, load_config(SMOKE), str(export_dir), step=step, source="test")
    stage1 = "configs/shapes_stunet.py:smoke,channels=8"
    overrides = [f"init_from={export_dir}", "world.num_frames=8", "train.ckpt_every=1",
                 "train.max_to_keep=2", "train.probe_every=3", "train.probe_logsnrs=(-8,-4,2)",
                 "train.steps=3"]
    work = tmp_path / "stunet"
    trainer.train(load_config(stage1, overrides), str(work))
    frozen_files = _tree_files(work / "frozen")
    assert frozen_files
    # The motion-word probe logged at step 3 is `lumiere eval`'s, on that step's EMA weights.
    with open(work / "metrics.csv") as f:
        logged = next(r for r in csv.DictReader(f) if r["step"] == "3" and r["motion_word_gap/-8"])
    model, _ = trainer.restore_model(load_config(stage1, overrides), str(work), 3)
    config = load_config(stage1, overrides)
    gaps = motion_word_gaps(trainer.make_generator(
        model, config, Diffusion.from_config(config.diffusion),
        make_tokenizer(config.text.tokenizer)), config, trainer.PROBE_CLIPS)
    assert "motion_word_gap/0" not in logged  # only the levels asked for
    for logsnr in ("-8", "-4", "2"):
        assert float(logged[f"motion_word_gap/{logsnr}"]) == pytest.approx(
            gaps[logsnr]["gap"], rel=1e-3, abs=1e-7)
        assert float(logged[f"motion_word_wins/{logsnr}"]) == gaps[logsnr]["wins"]
        assert float(logged[f"motion_word_true/{logsnr}"]) == pytest.approx(
            gaps[logsnr]["true"], rel=1e-5)
    # Three more steps on resume: checkpoints rotate (max_to_keep=2), the frozen weights are
    # neither rewritten nor touched, and every retained step restores completely.
    trainer.train(load_config(stage1, overrides[:-1] + ["train.steps=6"]), str(work))
    assert _tree_files(work / "frozen") == frozen_files
    steps = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [5, 6]
    _, exported, _ = load_export(str(export_dir))
    source = {"/".join(map(str, p)): np.asarray(v[...])
              for p, v in nnx.to_flat_state(nnx.state(exported, nnx.Param))}
    for s in steps:
        model, _ = trainer.restore_model(load_config(stage1, overrides), str(work), s)
        params = {"/".join(map(str, p)): np.asarray(v[...])
                  for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        for path, value in source.items():  # spatial + T5: bit-identical to stage 0
            target = path.replace("net/", "net/unet/", 1) if path.startswith("net/") else path
            np.testing.assert_array_equal(params[target], value, err_msg=path)
        assert any(p.startswith("net/temporal/") for p in params)


def test_the_motion_word_probe_is_refused_for_an_image_model_or_bad_levels(tmp_path):
    config = load_config(SMOKE)
    with config.unlocked():
        config.train.probe_every = 2
    with pytest.raises(ConfigError, match="probe_every=2 logs the motion-word probe of a "
                                          "text-to-video STUNet; this is a 'unet' model"):
        trainer.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # refused before anything is written
    config = load_config("configs/shapes_stunet.py:smoke", ["train.probe_logsnrs=()"])
    with pytest.raises(ConfigError, match="train.probe_logsnrs = \\(\\): must not be empty"):
        trainer.train(config, str(tmp_path / "run"))
    config = load_config("configs/shapes_stunet.py:smoke", ["train.probe_logsnrs=(-8,99)"])
    with pytest.raises(ConfigError,
                       match=r"probe_logsnrs.*element 1 \(99.0\) must be in \[-30, 30\]"):
        trainer.train(config, str(tmp_path / "run"))


def test_a_damaged_record_is_skipped_at_training_time(tmp_path):
    from lumiere_jax.data.shards import write_synthetic_shards
    from lumiere_jax.data.synthetic import ShapesSource, ShapesWorld

    shards = tmp_path / "shards"
    write_synthetic_shards(shards, ShapesWorld(), "train", 8, records_per_shard=8)
    path = next(shards.glob("*.array_record"))
    data = bytearray(path.read_bytes())
    caption = ShapesSource(ShapesWorld(), "train", 8)[5]["caption"].encode()
    at = data.find(caption)
    assert at >= 0
    data[at] ^= 0xFF  # one damaged byte inside record 5
    path.write_bytes(bytes(data))

    config = load_config(SMOKE, ["data.source=shards", f"data.path={shards}"])
    last = trainer.train(config, str(tmp_path / "run"))  # 4 steps x 4 clips: two epochs
    assert last["records_skipped"] >= 1
    assert np.isfinite(last["loss"])


def test_per_frame_baseline_is_the_image_model_on_every_frame(tmp_path):
    """`lumiere eval --per_frame` scores the run's init_from image model (the shipped stage-0
    export) applied to every frame; an image run has no per-frame baseline."""
    from lumiere_jax.sampling import evaluate_per_frame

    config = load_config("configs/shapes_stunet.py:smoke", ["eval.num_samples=2",
                                                              "world.num_frames=4"])
    report = evaluate_per_frame(config, str(tmp_path))
    for split in ("test", "heldout"):
        assert report["summary"][split]["n"] == 2
        assert 0.0 <= report["summary"][split]["colour_acc"] <= 1.0
    assert (tmp_path / "step_per_frame.json").exists()
    for contrast in ("motion_word", "motion_word_neighbour"):
        assert set(report["summary"][contrast]) == {"-8", "-4", "-2", "0", "2"}
    unet = load_config("configs/shapes_t2i.py:smoke")
    with pytest.raises(ValueError, match="per-frame baseline needs a video"):
        evaluate_per_frame(unet, str(tmp_path))
