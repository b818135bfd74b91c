"""Stylised generation: the styled world and its score, the fine-tuning config, and the spatial
weight interpolation (alpha 0 / 1 exact, the midpoint, errors) on small random models."""

import jax
import numpy as np
import pytest
from flax import nnx

from lumiere_jax.apps import style
from lumiere_jax.config import load_config
from lumiere_jax.data.pipeline import make_source
from lumiere_jax.data.synthetic import ShapesSource, ShapesWorld, render
from lumiere_jax.eval.shapes import score_batch
from lumiere_jax.eval.style import style_score, style_scores
from lumiere_jax.models.denoiser import build_denoiser

TINY = ["model.unet.channels=8", "model.unet.channel_mult=(1, 2)",
        "model.unet.attention_levels=(1,)", "init_from="]


def _flat(model) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v[...])
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _perturbed(model, seed: int, pattern: str = "net/"):
    """`model` with its params under `pattern` moved (a stand-in for fine-tuning)."""
    state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(state)
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(flat):
        if "/".join(map(str, path)).startswith(pattern):
            value = var[...]
            var[...] = value + 0.1 * jax.random.normal(jax.random.fold_in(key, i), value.shape,
                                                       value.dtype)
    return model


@pytest.fixture(scope="module")
def models():
    video = build_denoiser(load_config("configs/shapes_stunet.py:smoke", TINY + [
        "world.num_frames=4", "world.height=16", "world.width=16"]), nnx.Rngs(0))
    video = _perturbed(video, 1, "net/unet/")  # a trained spatial U-Net (not the random init)
    image_config = load_config("configs/shapes_style.py:smoke", TINY)
    image = build_denoiser(image_config, nnx.Rngs(1))
    # The fine-tuned image model: the STUNet's own spatial weights and encoder, moved.
    video_params = nnx.to_pure_dict(nnx.state(video, nnx.Param))
    state = nnx.state(image, nnx.Param)
    nnx.replace_by_pure_dict(state, {"text_encoder": video_params["text_encoder"],
                                     "net": video_params["net"]["unet"]})
    nnx.update(image, state)
    return video, _perturbed(image, 2, "net/")


def test_alpha_ends_are_exact_and_the_midpoint_is_the_mean(models):
    video, image = models
    before = _flat(video)
    ft = _flat(image)
    for alpha in (0.0, 0.5, 1.0):
        out = _flat(style.stylise(video, image, alpha))
        assert out.keys() == before.keys()
        for path, value in out.items():
            if not path.startswith("net/unet/"):  # temporal layers and T5: the STUNet's
                np.testing.assert_array_equal(value, before[path])
                continue
            orig, tuned = before[path], ft["net/" + path[len("net/unet/"):]]
            assert value.dtype == orig.dtype
            if alpha == 0.0:
                np.testing.assert_array_equal(value, orig)
            elif alpha == 1.0:
                np.testing.assert_array_equal(value, tuned)
            else:
                np.testing.assert_allclose(value, (orig + tuned) / 2, rtol=1e-6, atol=1e-7)
        if alpha == 0.5:
            assert any(not np.array_equal(out[p], before[p]) for p in out
                       if p.startswith("net/unet/"))
    for path, value in _flat(video).items():  # the input model is unchanged
        np.testing.assert_array_equal(value, before[path])


def test_errors(models):
    video, image = models
    for bad in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="alpha"):
            style.stylise(video, image, bad)
    other = nnx.eval_shape(lambda: build_denoiser(load_config(
        "configs/shapes_style.py:smoke", TINY + ["model.unet.channels=16"]), nnx.Rngs(0)))
    with pytest.raises(ValueError, match="another architecture"):
        style.stylise(video, other, 0.5)
    with pytest.raises(ValueError, match="text-to-image U-Net"):
        style.stylise(video, video, 0.5)
    other_text = _perturbed(nnx.clone(image), 3, "text_encoder/")
    with pytest.raises(ValueError, match="text encoder differs"):
        style.stylise(video, other_text, 0.5)


def test_style_score_separates_styled_from_plain_clips_and_the_evaluator_still_works():
    world = ShapesWorld()
    n = 40
    plain, styled = ShapesSource(world, "test", n), ShapesSource(world, "test", n, "stripes")
    captions = [plain[i]["caption"] for i in range(n)]
    assert captions == [styled[i]["caption"] for i in range(n)]  # same clips, styled
    plain_v = np.stack([plain[i]["video"] for i in range(n)])
    styled_v = np.stack([styled[i]["video"] for i in range(n)])
    plain_s, styled_s = style_scores(plain_v), style_scores(styled_v)
    assert plain_s["style_mean"] < 0.1 and max(style_score(v) for v in plain_v) < 0.5
    assert styled_s["style_min"] > 25 and 28 < styled_s["style_mean"] < 36
    scores = score_batch(styled_v, captions)
    assert scores["colour_acc"] == scores["shape_acc"] == scores["motion_acc"] == 1.0
    assert scores["size_acc"] == scores["background_acc"] == 1.0
    assert scores["shape_iou"] > 0.85  # 0.99 plain: the stripes lower the soft IoU


def test_style_is_off_by_default_and_checked():
    world = ShapesWorld()
    attrs = ShapesSource(world, "test", 1)[0]["attrs"]
    np.testing.assert_array_equal(render(attrs, world), render(attrs, world, style=None))
    assert not np.array_equal(render(attrs, world), render(attrs, world, style="stripes"))
    with pytest.raises(ValueError, match="did you mean 'stripes'"):
        render(attrs, world, style="stripe")
    with pytest.raises(ValueError, match="unknown style"):
        ShapesSource(world, "test", 1, style="dots")


def test_config_reads_a_few_styled_images():
    config = load_config("configs/shapes_style.py")
    assert config.train.trainable == "^net/" and config.init_from == "checkpoints/shapes_t2i"
    source = make_source(config)
    assert len(source) == 16 and source.style == "stripes"
    assert source[0]["video"].shape == (1, 32, 32, 3)
    assert style_score(source[0]["video"]) > 20
    smoke = load_config("configs/shapes_style.py:smoke", TINY)
    assert len(make_source(smoke)) == 4



def test_config_trains_the_unet_and_freezes_the_text_encoder(models):
    from lumiere_jax.train.trainer import split_model
    _, image = models
    config = load_config("configs/shapes_style.py:smoke", TINY)
    _, params, frozen = split_model(nnx.clone(image), config.train.trainable)
    trained = [p for p, _ in nnx.to_flat_state(params)]
    kept = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(frozen)]
    assert trained and all(p[0] == "net" for p in trained)
    assert kept and all(p.startswith("text_encoder/") for p in kept)
