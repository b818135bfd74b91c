"""Stage 2 and the full pipeline: SSR training and evaluation, the SSR's windowed sampling,
the quality metrics, and `lumiere sample --pipeline` on tiny models the tests make."""

import json
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from lumiere_jax.config import load_config
from lumiere_jax.eval import video_quality as vq
from lumiere_jax.models.denoiser import build_denoiser
from lumiere_jax.train import trainer
from lumiere_jax.train.export import export_model

FRAMES, LOW, HIGH = 8, 16, 32  # frames; base and SSR frame sizes (scale 2)
SSR_OVERRIDES = [f"world.num_frames={FRAMES}", f"world.height={HIGH}", f"world.width={HIGH}",
                 "model.unet.channel_mult=(1, 2)", "model.unet.attention_levels=(1,)",
                 "data.clip_frames=4", "sample.window=4"]
BASE_OVERRIDES = [f"world.num_frames={FRAMES}", f"world.height={LOW}", f"world.width={LOW}",
                  "model.unet.channels=8", "model.unet.channel_mult=(1, 2)",
                  "model.unet.attention_levels=(1,)", "init_from="]


def ssr_config(*extra):
    return load_config("configs/shapes_ssr.py:smoke", SSR_OVERRIDES + list(extra))


@pytest.fixture(scope="module")
def ssr_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ssr_run")
    metrics = trainer.train(ssr_config(), str(workdir))
    return workdir, metrics


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Randomly initialised base (STUNet) and SSR exports: the pipeline's plumbing, not its
    quality, is under test."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, config in (("base", load_config("configs/shapes_stunet.py:smoke",
                                              BASE_OVERRIDES)),
                         ("ssr", ssr_config())):
        out[name] = str(root / name)
        export_model(build_denoiser(config, nnx.Rngs(0)), config, out[name], step=0,
                     source="test")
    return out


def test_psnr_ssim_known_values():
    a = np.zeros((2, 3, 8, 8, 3), np.uint8)
    b = a.copy()
    b[0] += 51  # one video off by 0.2 everywhere: mse 0.04 -> 13.98 dB
    b[1, :, :4] = 255  # the other: half its pixels off by 1 -> 3.01 dB
    assert vq.psnr(b, a) == pytest.approx((10 * np.log10(25) + 10 * np.log10(2)) / 2, abs=1e-6)
    assert vq.psnr(a, a) == np.inf
    assert vq.ssim(a + 100, a + 100) == pytest.approx(1.0, abs=1e-6)
    assert vq.ssim(b, a) < 0.9
    with pytest.raises(ValueError, match="same shape"):
        vq.psnr(a, a[:, :2])


def test_window_edges_and_seam_ratio():
    assert vq.window_edges(16, 8, 0) == (8,)
    assert vq.window_edges(16, 8, 2) == (6, 8, 14)  # windows 0-7, 6-13, 8-15
    assert vq.window_edges(16, 16, 0) == ()
    # A wide bar moving one pixel per frame: steady pace, no seams.
    video = np.zeros((1, 16, 4, 32, 3), np.float32)
    for f in range(16):
        video[0, f, :, f : f + 8] = 1.0
    assert vq.seam_ratio(video, (8,)) == pytest.approx(1.0)
    jumped = video.copy()
    jumped[0, 8:] = np.roll(video[0, 8:], 3, axis=2)  # the second window starts elsewhere
    assert vq.seam_ratio(jumped, (8,)) == pytest.approx(4.0)  # it moved 4 pixels, not 1
    assert np.isnan(vq.seam_ratio(np.zeros((1, 16, 4, 4, 3)), (8,)))
    with pytest.raises(ValueError, match="some but not all"):
        vq.seam_ratio(video, ())
    with pytest.raises(ValueError, match="edge frame 16"):
        vq.seam_ratio(video, (16,))


def test_ssr_trains_and_previews(ssr_run):
    workdir, metrics = ssr_run
    assert np.isfinite(metrics["loss"])
    assert (workdir / "samples").exists() and any((workdir / "samples").iterdir())
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["kind"] == "ssr" and config["sample"]["window"] == 4


def test_ssr_eval_compares_with_interpolation_and_measures_seams(ssr_run, tmp_path):
    from lumiere_jax.sampling import evaluate

    workdir, _ = ssr_run
    report = evaluate(ssr_config(), str(workdir), out=str(tmp_path))
    s = report["summary"]
    assert s["n"] == 2 * ssr_config().eval.num_samples and s["window"] == 4
    # Interpolation of the exact block means is close to the truth; an untrained SSR is not.
    assert s["psnr_bicubic"] > 20 and s["psnr_bilinear"] > 20
    assert s["psnr_ssr"] < s["psnr_bicubic"]
    # Projected onto its input's block means, interpolation only moves closer to the truth
    # (up to the rounding to uint8).
    assert s["psnr_bicubic_consistent"] > s["psnr_bicubic"] - 0.05
    assert 0 < s["ssim_ssr"] < 1
    by_time = s["psnr_one_step_by_time"]
    assert list(by_time) == ["0.1", "0.3", "0.5", "0.7", "0.9", "1"]
    assert by_time["0.1"] > by_time["1"]  # the less noise, the more the clip itself tells
    for name in ("ssr", "ssr_no_aggregation"):
        assert np.isfinite(s[f"seam_ratio_{name}"])
        assert s[f"seam_ratio_truth_at_{name}_edges"] == pytest.approx(1.0, abs=0.3)
    assert (tmp_path / "step_4.json").exists() and (tmp_path / "step_4_ssr.png").exists()


def test_ssr_generator_checks_its_low_res_input(models):
    from lumiere_jax.config import read_resolved_config
    from lumiere_jax.sampling import load_generator

    generator, _ = load_generator(read_resolved_config(models["ssr"]), models["ssr"])
    with pytest.raises(ValueError, match=r"low_res must have shape \(1, 8, 16, 16, 3\)"):
        generator(["a red circle"], [0], 1.0)
    with pytest.raises(ValueError, match=r"low_res must have shape \(1, 8, 16, 16, 3\)"):
        generator(["a red circle"], [0], 1.0, low_res=np.zeros((1, 8, 32, 32, 3), np.uint8))
    base, _ = load_generator(read_resolved_config(models["base"]), models["base"])
    with pytest.raises(ValueError, match="low_res is the input of an SSR model"):
        base(["a red circle"], [0], 1.0, low_res=np.zeros((1, 8, 4, 4, 3), np.uint8))


def test_ssr_window_equal_to_the_clip_equals_unwindowed_sampling(models):
    """window = 0 (the whole clip) and window = frames give the same samples bit for bit."""
    from lumiere_jax.config import read_resolved_config
    from lumiere_jax.sampling import load_generator

    config = read_resolved_config(models["ssr"])
    low = np.random.default_rng(0).integers(0, 256, (2, FRAMES, LOW, LOW, 3), np.uint8)
    outs = []
    for window in (0, FRAMES):
        c = load_config("configs/shapes_ssr.py:smoke", SSR_OVERRIDES + [f"sample.window={window}"])
        assert c.to_dict().keys() == config.to_dict().keys()
        generator, _ = load_generator(c, models["ssr"])
        outs.append(generator(["a red circle", "a blue square"], [0, 1], 1.0, low_res=low))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_ssr_low_res_consistency_keeps_the_sample_on_its_input(models):
    """sample.low_res_consistency projects every clean estimate onto the input's block means:
    the sample downsampled is the low-res input up to the uint8 rounding of its pixels (and
    the clipping of any pixel out of range). Without it, this barely trained SSR's is not."""
    from lumiere_jax.diffusion.ssr import downsample_video
    from lumiere_jax.sampling import load_generator

    low = np.random.default_rng(0).integers(64, 192, (2, FRAMES, LOW, LOW, 3), np.uint8)
    errors = {}
    for on in (False, True):
        c = load_config("configs/shapes_ssr.py:smoke",
                        SSR_OVERRIDES + [f"sample.low_res_consistency={on}"])
        generator, _ = load_generator(c, models["ssr"])
        out = generator(["a red circle", "a blue square"], [0, 1], 1.0, low_res=low)
        block_means = np.asarray(downsample_video(out.astype(np.float32), HIGH // LOW))
        errors[on] = np.abs(block_means - low)  # in pixel levels
    assert np.mean(errors[True] <= 0.5 + 1e-4) > 0.99, np.percentile(errors[True], [50, 99])
    assert np.mean(errors[False] <= 0.5 + 1e-4) < 0.5


def _pipeline_config(models, *extra):
    return load_config(f"configs/pipeline_shapes.py:base={models['base']},ssr={models['ssr']}",
                       ["base.steps=2", "ssr.steps=2", "ssr.window=4", *extra])


def test_pipeline_writes_videos_sheets_and_metrics(models, tmp_path):
    from lumiere_jax.pipeline import run_pipeline

    summary = run_pipeline(_pipeline_config(models), str(tmp_path),
                           prompts=["a small red circle moving left on a black background"],
                           seeds=[0, 1])
    assert summary["n"] == 2 and summary["window_edges"] == [2, 4, 6]
    for video in summary["videos"]:
        for path in video["files"]:
            assert (tmp_path / path.split("/")[-1]).stat().st_size > 0
        stem = video["files"][0][: -len(".mp4")]
        metrics = json.loads(open(f"{stem}_metrics.json").read())
        assert set(metrics["final"]) >= {"colour_ok", "shape_ok", "stability", "seam_ratio"}
    from PIL import Image

    from lumiere_jax.data.video_io import contact_sheet, read_video
    frames, _ = read_video(summary["videos"][0]["files"][0])
    assert frames.shape == (FRAMES, HIGH, HIGH, 3)
    # The sheet has two rows, the base video over the final one (written once).
    one_row = contact_sheet([frames], labels=["x"], max_frames=FRAMES)
    sheet = np.asarray(Image.open(summary["videos"][0]["files"][2]))
    assert sheet.shape[0] > 1.5 * one_row.shape[0]


def test_pipeline_evaluation_reports_the_seam_ratio_of_its_videos(models, tmp_path):
    """`make demo`'s pipeline evaluation: per split, the analytic scores and the seam ratio at
    the SSR's window edges of exactly the videos it scored (resampled here to check)."""
    from lumiere_jax.demo import evaluate_pipeline
    from lumiere_jax.pipeline import TextToVideoPipeline

    pipe = TextToVideoPipeline.from_config(_pipeline_config(models))
    report = evaluate_pipeline(pipe, str(tmp_path), num_samples=2)
    assert pipe.window_edges == (2, 4, 6)
    seeds = [pipe.ssr_config.eval.seed + i for i in range(2)]
    for split in ("test", "heldout"):
        scores = report["summary"][split]
        assert scores["n"] == 2 and set(scores) >= {"colour_acc", "motion_acc", "stability"}
        base, final = pipe(report["prompts"][split], seeds)
        assert scores["seam_ratio"] == pytest.approx(vq.seam_ratio(final, (2, 4, 6)))
        assert scores["seam_ratio_base"] == pytest.approx(vq.seam_ratio(base, (2, 4, 6)))
    saved = json.loads((tmp_path / "step_pipeline.json").read_text())
    assert saved["summary"]["heldout"]["seam_ratio"] == report["summary"]["heldout"]["seam_ratio"]


def test_pipeline_errors(models, tmp_path):
    from lumiere_jax.pipeline import run_pipeline

    with pytest.raises(ValueError, match="guidance must be >= 0"):
        run_pipeline(_pipeline_config(models, "base.guidance=-1.0"), str(tmp_path))
    with pytest.raises(ValueError, match="needs a 'ssr' model"):
        run_pipeline(load_config(f"configs/pipeline_shapes.py:base={models['base']},"
                                 f"ssr={models['base']}"), str(tmp_path))
    with pytest.raises(ValueError, match="window=16 exceeds the clip's num_frames=8"):
        run_pipeline(_pipeline_config(models, "ssr.window=16"), str(tmp_path))
    with pytest.raises(ValueError, match="did you mean 'circle'"):
        run_pipeline(_pipeline_config(models), str(tmp_path), prompts=["a red circel"])


def test_pipeline_refuses_an_ssr_of_another_resolution(models, tmp_path):
    from lumiere_jax.pipeline import run_pipeline

    other = tmp_path / "ssr48"
    config = load_config("configs/shapes_ssr.py:smoke", SSR_OVERRIDES + [
        "world.height=48", "world.width=48", "model.unet.channel_mult=(1,)",
        "model.unet.attention_levels=()"])
    export_model(build_denoiser(config, nnx.Rngs(0)), config, str(other), step=0, source="t")
    pipe = load_config(f"configs/pipeline_shapes.py:base={models['base']},ssr={other}",
                       ["ssr.window=4"])
    with pytest.raises(ValueError, match="cannot take the base model's videos"):
        run_pipeline(pipe, str(tmp_path / "out"))


def test_cli_pipeline(models, tmp_path):
    def lumiere(*args):
        return subprocess.run([sys.executable, "-m", "lumiere_jax.cli", "sample", *args],
                              capture_output=True, text=True, timeout=300)

    spec = f"configs/pipeline_shapes.py:base={models['base']},ssr={models['ssr']}"
    result = lumiere("--pipeline", spec, "--prompts", f"@{tmp_path}/missing.txt")
    assert result.returncode != 0 and "missing.txt does not exist" in result.stderr
    result = lumiere("--pipeline", spec, "--config.base.guidance=-1")
    assert result.returncode != 0 and "base.guidance must be >= 0" in result.stderr
    assert "Traceback" not in result.stderr
    result = lumiere("--pipeline", spec, "--config.ssr.steps=1", "--config.base.steps=1",
                     "--prompts", "a red circle moving left", "--seeds", "3",
                     "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(v["prompt"], v["seed"]) for v in summary["videos"]] == [
        ("a red circle moving left", 3)]


def test_guidance_one_skips_the_unconditional_branch_with_the_same_result(models):
    """All scales 1: one network call per step instead of the [cond; null] pair, and the same
    samples as the guided path gives a scale-1 item (up to float rounding of the batch)."""
    from lumiere_jax.config import read_resolved_config
    from lumiere_jax.sampling import load_generator

    generator, _ = load_generator(read_resolved_config(models["base"]), models["base"])
    prompts = ["a red circle moving left", "a blue square moving up"]
    alone = generator(prompts[:1], [4], 1.0)
    mixed = generator(prompts, [4, 5], [1.0, 2.0])  # the guided path for both items
    diff = np.abs(alone[0].astype(int) - mixed[0].astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01
