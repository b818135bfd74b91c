"""The training-free applications on a small random STUNet: their exactness properties (known
pixels kept bit for bit, still regions still, SDEdit's endpoints) and their bad-input errors."""

import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from scipy import ndimage

from lumiere_jax.apps import editing
from lumiere_jax.config import load_config
from lumiere_jax.data import video_io
from lumiere_jax.models.denoiser import build_denoiser
from lumiere_jax.sampling import load_generator
from lumiere_jax.train.export import export_model

T, H, W = 8, 16, 16
PROMPT = "a small red circle moving left on a black background"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = load_config("configs/shapes_stunet.py:smoke", [
        f"world.num_frames={T}", f"world.height={H}", f"world.width={W}",
        "model.unet.channels=8", "model.unet.channel_mult=(1, 2)",
        "model.unet.attention_levels=(1,)", "init_from=", "sample.steps=3"])
    out = str(tmp_path_factory.mktemp("stunet") / "model")
    export_model(build_denoiser(config, nnx.Rngs(0)), config, out, step=0, source="test")
    return out


@pytest.fixture(scope="module")
def generator(model_dir):
    from lumiere_jax.config import read_resolved_config
    return load_generator(read_resolved_config(model_dir), model_dir)[0]


@pytest.fixture(scope="module")
def text_generator(model_dir):
    """The model with every float parameter perturbed: its zero-initialised output layers
    (cross-attention included) no longer hide the prompt, so prompts change the samples."""
    import jax

    from lumiere_jax.config import read_resolved_config
    generator = load_generator(read_resolved_config(model_dir), model_dir)[0]
    rng = np.random.default_rng(0)
    return generator.with_params(jax.tree.map(
        lambda p: p + 0.2 * rng.standard_normal(p.shape).astype(p.dtype)
        if np.issubdtype(p.dtype, np.floating) else p, generator.state))


def _video(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (T, H, W, 3), np.uint8)


def test_image_to_video_keeps_the_first_frame(generator):
    image = _video()[0]
    videos = editing.image_to_video(generator, image, PROMPT, [0, 1])
    assert videos.shape == (2, T, H, W, 3)
    np.testing.assert_array_equal(videos[:, 0], np.broadcast_to(image, (2, H, W, 3)))
    assert not np.array_equal(videos[0, 1:], videos[1, 1:])  # the rest comes from the seed


def test_inpainting_keeps_every_pixel_outside_the_region(generator):
    video = _video()
    region = editing.box_region("4,4,12,12", H, W)
    out = editing.inpaint(generator, video, region, PROMPT, [0])[0]
    outside = np.broadcast_to(region == 0, video.shape)
    np.testing.assert_array_equal(out[outside], video[outside])
    assert np.abs(out[~outside].astype(int) - video[~outside]).mean() > 10


def test_outpainting_keeps_the_centre(generator):
    small = _video()[:, :8, :12]
    out = editing.outpaint(generator, small, PROMPT, [0])[0]
    np.testing.assert_array_equal(out[:, 4:12, 2:14], small)
    with pytest.raises(ValueError, match="smaller than the 16x16 canvas"):
        editing.outpaint(generator, _video(), PROMPT, [0])


def test_cinemagraph_is_still_outside_the_region_and_moves_inside(generator):
    image = _video()[0]
    region = editing.box_region("0.25,0.25,0.75,0.75", H, W)
    out = editing.cinemagraph(generator, image, region, PROMPT, [0])[0].astype(np.float64)
    variance = out.var(axis=0).mean(-1)  # per pixel, over time
    assert np.all(variance[region[..., 0] == 0] == 0)
    assert variance[region[..., 0] == 1].mean() > 1.0
    np.testing.assert_array_equal(out[0][region[..., 0] == 0], image[region[..., 0] == 0])


def test_sdedit_endpoints(generator):
    video = _video()
    np.testing.assert_array_equal(editing.sdedit(generator, video, PROMPT, 0.0, [0])[0], video)
    fresh = generator([PROMPT], [5], 3.0)
    np.testing.assert_array_equal(editing.sdedit(generator, video, PROMPT, 1.0, [5]), fresh)
    half = editing.sdedit(generator, video, PROMPT, 0.5, [5])[0].astype(np.float64)
    # Half-way: closer to the input than a fresh sample is.
    assert np.abs(half - video).mean() < np.abs(fresh[0].astype(np.float64) - video).mean()
    with pytest.raises(ValueError, match=r"strength is a diffusion time in \[0, 1\]"):
        editing.sdedit(generator, video, PROMPT, 1.5, [0])


def test_sdedit_from_the_inversion_retraces_the_input(generator):
    """invert=True starts from the input's DDIM inversion: deterministic (every seed gives
    the same edit), strength 0 is the input, and with the source caption as the prompt and no
    guidance the sampler walks back close to the input, far closer than from freshly noised
    input (3 sampling steps here, so not exactly)."""
    video = _video()
    kwargs = dict(invert=True, source_prompt=PROMPT)
    np.testing.assert_array_equal(
        editing.sdedit(generator, video, PROMPT, 0.0, [0], **kwargs)[0], video)
    inverted = editing.sdedit(generator, video, PROMPT, 0.5, [0, 1], 1.0, **kwargs)
    np.testing.assert_array_equal(inverted[0], inverted[1])
    noised = editing.sdedit(generator, video, PROMPT, 0.5, [0], 1.0)[0]
    error = lambda x: np.abs(x.astype(np.float64) - video).mean()  # noqa: E731
    assert error(inverted[0]) < 0.5 * error(noised), (error(inverted[0]), error(noised))
    with pytest.raises(ValueError, match="pass invert=True as well"):
        generator([PROMPT], [0], init=video[None], strength=0.5, source_prompts=[PROMPT])
    with pytest.raises(ValueError, match="pass invert=True as well"):
        editing.sdedit(generator, video, PROMPT, 0.5, [0], source_prompt=PROMPT)
    with pytest.raises(ValueError, match="give init and a strength"):
        generator([PROMPT], [0], invert=True)
    with pytest.raises(ValueError, match="purple"):
        editing.sdedit(generator, video, PROMPT, 0.5, [0], invert=True,
                       source_prompt="a purple circle")


def test_negative_prompt_takes_the_empty_captions_place_in_guidance(text_generator):
    """Scale w gives w * c(prompt) + (1 - w) * c(negative): at w = 0 that is the negative
    prompt's own conditional sample; "" is the empty caption (the default)."""
    generator = text_generator
    other = "a large blue square moving up on a white background"
    default = generator([PROMPT], [2], 3.0)
    np.testing.assert_array_equal(generator([PROMPT], [2], 3.0, negative_prompts=[""]), default)
    steered = generator([PROMPT], [2], 3.0, negative_prompts=[other])
    assert np.abs(steered.astype(int) - default).mean() > 1
    swapped = generator([PROMPT], [2], 0.0, negative_prompts=[other]).astype(int)
    diff = np.abs(swapped - generator([other], [2], 1.0))  # [cond; null] batch vs one call
    assert diff.max() <= 1 and diff.mean() < 0.01
    edited = editing.sdedit(generator, _video(), other, 0.5, [5], negative_prompt=PROMPT)
    assert not np.array_equal(edited, editing.sdedit(generator, _video(), other, 0.5, [5]))
    with pytest.raises(ValueError, match="give one per prompt"):
        generator([PROMPT, other], [2, 3], 3.0, negative_prompts=[other])
    with pytest.raises(ValueError, match="purple"):
        generator([PROMPT], [2], 3.0, negative_prompts=["a purple circle"])


def test_bad_inputs(generator, tmp_path):
    with pytest.raises(ValueError, match="write x0,y0,x1,y1"):
        editing.box_region("1,2,3", H, W)
    with pytest.raises(ValueError, match="empty or outside"):
        editing.box_region("4,4,40,8", H, W)
    with pytest.raises(ValueError, match="region is empty"):
        editing.cinemagraph(generator, _video()[0], np.zeros((H, W)), PROMPT, [0])
    with pytest.raises(ValueError, match="model's shape"):
        editing.inpaint(generator, _video()[:4], np.ones((H, W)), PROMPT, [0])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="not a readable image"):
        editing.read_image(str(bad), H, W)
    with pytest.raises(FileNotFoundError, match="no image file"):
        editing.read_image(str(tmp_path / "missing.png"), H, W)
    with pytest.raises(ValueError, match="known and known_mask go together"):
        generator([PROMPT], [0], known=np.zeros((1, T, H, W, 3), np.uint8))


def test_images_of_another_size_are_fitted_with_a_warning(tmp_path, caplog):
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 10:30] = 255  # a white centre band, kept by the centre crop
    video_io.write_png(str(tmp_path / "wide.png"), wide)
    image = editing.read_image(str(tmp_path / "wide.png"), H, W)
    assert image.shape == (H, W, 3) and image.mean() > 200
    assert "resized and centre-cropped" in caplog.text


def test_cli_app_writes_videos_and_reports_bad_input(model_dir, tmp_path):
    image = tmp_path / "first.png"
    video_io.write_png(str(image), _video()[0])

    def lumiere(*args):
        return subprocess.run([sys.executable, "-m", "lumiere_jax.cli", "app", *args,
                               "--workdir", model_dir, "--prompts", PROMPT],
                              capture_output=True, text=True, timeout=300)

    result = lumiere("i2v", "--image", str(image), "--out", str(tmp_path / "out"),
                     "--resample", "2")
    assert result.returncode == 0, result.stderr
    frames, _ = video_io.read_video(tmp_path / "out" / (
        "a_small_red_circle_moving_left_on_a_black_backgr_seed0.mp4"))
    assert frames.shape == (T, H, W, 3)
    result = lumiere("sdedit", "--video", str(tmp_path / "out" / (
        "a_small_red_circle_moving_left_on_a_black_backgr_seed0.mp4")), "--strength", "0.6",
        "--negative_prompt", "a small blue circle moving left on a black background",
        "--invert", "--source_prompt", PROMPT, "--out", str(tmp_path / "edit"))
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "edit").glob("*.mp4"))) == 1
    result = lumiere("sdedit", "--video", str(tmp_path / "out" / (
        "a_small_red_circle_moving_left_on_a_black_backgr_seed0.mp4")), "--auto_region",
        "--source_prompt", "a small blue circle moving left on a black background",
        "--out", str(tmp_path / "region"))
    # This model's zero-initialised text layers make every caption give the same estimate.
    assert result.returncode != 0 and "so there is nothing to edit" in result.stderr
    assert "Traceback" not in result.stderr
    result = lumiere("sdedit", "--video", str(tmp_path / "missing.mp4"), "--auto_region")
    assert result.returncode != 0 and "give --source_prompt, and no --box" in result.stderr
    result = lumiere("cinemagraph", "--image", str(image))
    assert result.returncode != 0 and "needs the region: --box or --mask" in result.stderr
    result = lumiere("i2v", "--image", str(image), "--resample", "0")
    assert result.returncode != 0 and "--resample=0" in result.stderr
    result = lumiere("sdedit", "--video", str(tmp_path / "missing.mp4"))
    assert result.returncode != 0 and "no video file" in result.stderr
    result = lumiere("sdedit", "--video", str(tmp_path / "missing.mp4"), "--source_prompt",
                     PROMPT)
    assert result.returncode != 0 and "add --invert or --auto_region" in result.stderr
    assert "Traceback" not in result.stderr


def test_motion_word_gaps_measure_whether_the_model_reads_the_motion_word(text_generator,
                                                                          model_dir):
    """`lumiere eval`'s probe: the v-MSE with each clip's caption and with the opposite
    motion's, per log-SNR. Recomputed here for one level; a model whose text encoder outputs
    nothing (every caption alike) has a gap of exactly 0 and never 'wins'."""
    import jax
    import jax.numpy as jnp

    from lumiere_jax.config import read_resolved_config
    from lumiere_jax.data.pipeline import world_from_config
    from lumiere_jax.data.synthetic import ShapesSource, caption_for, opposite_motion
    from lumiere_jax.diffusion.schedules import Diffusion
    from lumiere_jax.sampling import MOTION_PROBE_LOGSNRS, motion_word_gaps

    config = read_resolved_config(model_dir)
    gaps = motion_word_gaps(text_generator, config, 4)
    assert list(gaps) == [f"{x:g}" for x in MOTION_PROBE_LOGSNRS]
    assert all(abs(g["gap"]) > 1e-6 for g in gaps.values()), gaps  # the prompt matters

    source = ShapesSource(world_from_config(config), "test", 64)
    clips = [ex for ex in (source[i] for i in range(64)) if ex["attrs"]["motion"] != "still"][:4]
    x = jnp.asarray(np.stack([ex["video"] for ex in clips]), jnp.float32) / 127.5 - 1
    eps = Diffusion.from_config(config.diffusion).noise(jax.random.key(config.eval.seed), x.shape)
    model = nnx.merge(text_generator.graphdef, text_generator.state)
    alpha, sigma = np.sqrt(1 / (1 + np.e ** 2)), np.sqrt(1 / (1 + np.e ** -2))  # log-SNR -2
    errors = []
    for captions in ([ex["caption"] for ex in clips],
                     [caption_for({**ex["attrs"], "motion": opposite_motion(ex["attrs"]["motion"])})
                      for ex in clips]):
        t = text_generator.tokenizer.encode_batch(captions, text_generator.max_length)
        v = model(alpha * x + sigma * eps, jnp.full((4,), -2.0),
                  model.encode_text(jnp.asarray(t.ids), jnp.asarray(t.mask)))
        errors.append(np.asarray(jnp.mean((v - (alpha * eps - sigma * x)) ** 2, axis=(1, 2, 3, 4))))
    assert gaps["-2"]["true"] == pytest.approx(errors[0].mean(), rel=1e-4)
    assert gaps["-2"]["gap"] == pytest.approx((errors[1] - errors[0]).mean(), rel=1e-3, abs=1e-7)
    assert gaps["-2"]["wins"] == np.mean(errors[0] < errors[1])

    seeing = text_generator.state
    kept = [np.asarray(leaf).copy() for leaf in jax.tree.leaves(seeing)]
    blind = text_generator.with_params(jax.tree_util.tree_map_with_path(
        lambda path, p: p * 0 if "text_encoder" in jax.tree_util.keystr(path) else p, seeing))
    try:
        for g in motion_word_gaps(blind, config, 4).values():
            assert g["gap"] == 0.0 and g["wins"] == 0.0 and g["true"] > 0
        # with_params updated a copy: the state held before is as it was.
        for before, after in zip(kept, jax.tree.leaves(seeing)):
            np.testing.assert_array_equal(before, after)
    finally:
        text_generator.with_params(seeing)  # the fixture is shared by the later tests


def test_opposite_and_neighbouring_motions():
    from lumiere_jax.data.synthetic import neighbour_motion, opposite_motion

    assert [opposite_motion(m) for m in ("left", "up", "up-right")] == ["right", "down",
                                                                       "down-left"]
    with pytest.raises(ValueError, match="'still' has no opposite"):
        opposite_motion("still")
    # 45 degrees away; of two as near, the first in MOTIONS.
    assert {m: neighbour_motion(m) for m in ("left", "right", "up", "down", "up-right",
                                             "down-left")} == {
        "left": "down-left", "right": "up-right", "up": "up-right", "down": "down-left",
        "up-right": "right", "down-left": "left"}
    with pytest.raises(ValueError, match="'still' has no neighbouring direction"):
        neighbour_motion("still")


def test_motion_word_probe_contrasts_a_neighbouring_motion(text_generator, model_dir):
    """contrast='neighbour' compares each clip's caption with the one naming the motion 45
    degrees away: the same clips, noise and true-caption errors as the opposite contrast, a
    different second caption."""
    from lumiere_jax.config import read_resolved_config
    from lumiere_jax.eval.motion_word import MotionWordProbe

    g = text_generator
    config = read_resolved_config(model_dir)
    probes = {contrast: MotionWordProbe(g.graphdef, g.tokenizer, g.max_length, config, 4, (-2.0,),
                                        contrast=contrast)
              for contrast in ("opposite", "neighbour")}
    opposite, neighbour = (probes[c](g.state)["-2"] for c in ("opposite", "neighbour"))
    assert neighbour["true"] == opposite["true"]
    assert neighbour["opposite"] != opposite["opposite"]
    np.testing.assert_array_equal(probes["neighbour"].ids[0], probes["opposite"].ids[0])
    assert not np.array_equal(probes["neighbour"].ids[1], probes["opposite"].ids[1])
    with pytest.raises(ValueError, match="unknown motion-word contrast 'sideways'"):
        MotionWordProbe(g.graphdef, g.tokenizer, g.max_length, config, 4, contrast="sideways")


def test_clean_estimates_are_the_one_step_edit(text_generator):
    """Generator.clean_estimates sees the input SDEdit sees for a seed: a one-step unguided
    SDEdit from the same seed is its estimate, thresholded and rounded to pixels."""
    from lumiere_jax.diffusion.samplers import thresholding_transform
    from lumiere_jax.generate import Generator, to_uint8
    g = text_generator
    video = _video()
    one_step = Generator(nnx.merge(g.graphdef, g.state), g.diffusion, g.tokenizer,
                         g.max_length, g.sample_shape, steps=1)
    edit = one_step([PROMPT], [4], 1.0, init=video[None], strength=0.5)
    x0 = g.clean_estimates([PROMPT], video[None], 0.5, [4])
    threshold = thresholding_transform(g.diffusion) or (lambda x: x)
    expected = to_uint8(threshold(x0))
    assert np.abs(edit.astype(int) - expected).max() <= 1  # float rounding at a .5 boundary
    assert (edit != expected).mean() < 0.001
    assert not np.array_equal(x0, g.clean_estimates([PROMPT], video[None], 0.5, [5]))
    with pytest.raises(ValueError, match=r"t must be in \(0, 1\]"):
        g.clean_estimates([PROMPT], video[None], 0.0, [4])


def test_edit_region_is_where_the_two_captions_change_the_estimate(text_generator):
    """DiffEdit's mask: the clean estimates' difference under the two captions, averaged over
    the draws and colours, thresholded at a fraction of its largest value."""
    g, video = text_generator, _video()
    other = "a small blue circle moving left on a black background"
    region = editing.edit_region(g, video, other, PROMPT, seed=3, draws=2, threshold=0.3)
    a, b = (g.clean_estimates([p] * 2, np.stack([video] * 2), 0.5, [3, 4])
            for p in (other, PROMPT))
    difference = np.abs(a - b).mean(axis=(0, -1))
    above = difference / difference.max() >= 0.3
    # The region is the pixels above the threshold plus the holes they enclose: what it adds
    # cannot reach the frame's edge without crossing it.
    assert np.all(region[..., 0] >= above)
    for frame in range(T):
        pieces, _ = ndimage.label(~above[frame])
        edge = np.unique(np.concatenate([pieces[0], pieces[-1], pieces[:, 0], pieces[:, -1]]))
        added = (region[frame, ..., 0] > 0) & ~above[frame]
        np.testing.assert_array_equal(added, ~above[frame] & ~np.isin(pieces, edge))
    assert region.shape == (T, H, W, 1) and 0 < region.mean() < 1
    looser = editing.edit_region(g, video, other, PROMPT, seed=3, draws=2, threshold=0.1)
    assert np.all(looser >= region) and looser.sum() > region.sum()
    with pytest.raises(ValueError, match="nothing to edit"):
        editing.edit_region(g, video, PROMPT, PROMPT, draws=2)
    with pytest.raises(ValueError, match=r"threshold in \(0, 1\)"):
        editing.edit_region(g, video, other, PROMPT, threshold=1.0)


def test_sdedit_in_a_region_keeps_the_rest_of_the_input(generator):
    video = _video()
    region = np.zeros((T, H, W, 1), np.float32)
    region[:, 4:12, 2:10] = 1.0
    region[T // 2:, 4:12, 2:10] = 0.0  # a per-frame region: the later frames kept whole
    out = editing.sdedit(generator, video, PROMPT, 0.6, [0], region=region)[0]
    outside = np.broadcast_to(region == 0, video.shape)
    np.testing.assert_array_equal(out[outside], video[outside])
    assert np.abs(out[~outside].astype(int) - video[~outside]).mean() > 5
    with pytest.raises(ValueError, match=r"per-frame region is a mask \[8, 16, 16, 1\]"):
        editing.sdedit(generator, video, PROMPT, 0.6, [0], region=region[:4])


def test_resampling_keeps_the_known_pixels_and_the_endpoints(generator):
    """RePaint's resampling (several takes per step) changes the sample, but not what the
    applications promise exactly: pixels outside an SDEdit region, a given first frame, and
    strength 0 returning the input."""
    video = _video()
    region = editing.box_region("4,4,12,12", H, W)
    plain = editing.sdedit(generator, video, PROMPT, 0.5, [0], region=region)[0]
    resampled = editing.sdedit(generator, video, PROMPT, 0.5, [0], region=region,
                               resample=3)[0]
    outside = np.broadcast_to(region == 0, video.shape)
    np.testing.assert_array_equal(resampled[outside], video[outside])
    assert np.abs(resampled[~outside].astype(int) - plain[~outside]).mean() > 1
    np.testing.assert_array_equal(
        editing.sdedit(generator, video, PROMPT, 0.0, [0], resample=3)[0], video)
    first = editing.image_to_video(generator, video[0], PROMPT, [1], resample=2)[0]
    np.testing.assert_array_equal(first[0], video[0])
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="resample must be an int >= 1"):
            editing.sdedit(generator, video, PROMPT, 0.5, [0], resample=bad)


def test_sampling_frame_correlation_changes_only_the_samplers_noise(text_generator, model_dir):
    """A Generator given frame_correlation samples, bit for bit, what one made on a diffusion
    trained at that correlation samples (DDIM and DDPM alike): the model and its schedule are
    untouched, only the noise it starts from and draws changes. Frames start from more similar
    noise, so they come out more alike; make_generator reads sample.frame_correlation."""
    import dataclasses

    from lumiere_jax.config import read_resolved_config
    from lumiere_jax.generate import Generator
    from lumiere_jax.train.trainer import make_generator
    g = text_generator
    model = nnx.merge(g.graphdef, g.state)
    independent = dataclasses.replace(g.diffusion, frame_correlation=0.0)
    trained_at = dataclasses.replace(g.diffusion, frame_correlation=0.9)

    def samples(diffusion, sampler="ddim", **kwargs):
        generator = Generator(model, diffusion, g.tokenizer, g.max_length, g.sample_shape,
                              sampler=sampler, steps=3, **kwargs)
        return generator([PROMPT] * 2, [1, 2], 3.0).astype(np.float64)

    correlated = {sampler: samples(independent, sampler, frame_correlation=0.9)
                  for sampler in ("ddim", "ddpm")}
    for sampler, x in correlated.items():
        np.testing.assert_array_equal(x, samples(trained_at, sampler))
    plain = samples(independent)
    frame_change = [np.abs(np.diff(x, axis=1)).mean() for x in (plain, correlated["ddim"])]
    assert frame_change[1] < 0.9 * frame_change[0], frame_change
    np.testing.assert_array_equal(samples(independent, frame_correlation=0.0), plain)
    with pytest.raises(ValueError, match=r"sampling frame_correlation is a correlation in \[0, 1\)"):
        samples(independent, frame_correlation=1.0)

    config = read_resolved_config(model_dir)
    for value, expected in ((None, 0.0), (0.9, 0.9)):  # None: the diffusion's
        config.sample.frame_correlation = value
        made = make_generator(model, config, independent, g.tokenizer)
        assert made.diffusion.frame_correlation == expected


def test_guidance_interval_guides_only_the_levels_inside_it(text_generator, model_dir):
    """Guidance applies to the sampler steps whose log-SNR is in the interval, the rest are
    conditional: an interval holding every level samples what plain guidance does, bit for
    bit; one holding none what the conditional model does; one holding the first step only
    something between. make_generator reads sample.guidance_interval."""
    from lumiere_jax.config import read_resolved_config
    from lumiere_jax.generate import Generator
    from lumiere_jax.train.trainer import make_generator

    g = text_generator
    model = nnx.merge(g.graphdef, g.state)
    first, second = (float(g.diffusion.logsnr(t)) for t in (1.0, 2 / 3))  # 3 DDIM steps

    def samples(guidance=3.0, interval=None):
        generator = Generator(model, g.diffusion, g.tokenizer, g.max_length, g.sample_shape,
                              steps=3, guidance_interval=interval)
        return generator([PROMPT] * 2, [1, 2], guidance).astype(np.float64)

    guided, conditional = samples(), samples(1.0)
    np.testing.assert_array_equal(samples(interval=(-np.inf, np.inf)), guided)
    # The conditional branch of a guided batch: equal up to a pixel level of rounding.
    assert np.abs(samples(interval=(1e3, 2e3)) - conditional).max() <= 1
    first_only = samples(interval=(first - 1.0, (first + second) / 2))
    for other in (guided, conditional):
        assert np.abs(first_only - other).mean() > 0.5
    with pytest.raises(ValueError, match="guidance_interval is \\(low, high\\)"):
        samples(interval=(0.0, -1.0))

    config = read_resolved_config(model_dir)
    config.sample.guidance_interval = (-3.0, -1.0)
    assert make_generator(model, config, g.diffusion, g.tokenizer).guidance_interval == (-3.0,
                                                                                         -1.0)
