"""The paper's conditional variant: a STUNet that takes the masked video and the mask as extra
input, zero-initialised (so it starts as the unconditional model) and fine-tuned on random
masks; and the sampler and applications that use it."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lumiere_jax.apps import editing
from lumiere_jax.config import load_config
from lumiere_jax.diffusion import masks
from lumiere_jax.diffusion.schedules import Diffusion
from lumiere_jax.models.denoiser import build_denoiser
from lumiere_jax.models.inflate import InflationError
from lumiere_jax.sampling import load_generator
from lumiere_jax.train import trainer
from lumiere_jax.train.export import export_model, inflate_from_export, load_export

T, H, W = 8, 16, 16
SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "shapes_stunet_masked"
SMALL = [f"world.num_frames={T}", f"world.height={H}", f"world.width={W}",
         "model.unet.channels=8", "model.unet.channel_mult=(1, 2)",
         "model.unet.attention_levels=(1,)", "sample.steps=3"]
PROMPT = "a small red circle moving left on a black background"


def _config(masked: bool, init_from: str = ""):
    arg = "smoke,masked" if masked else "smoke"
    return load_config(f"configs/shapes_stunet.py:{arg}", SMALL + [f"init_from={init_from}"])


def _flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(tree)}


@pytest.fixture(scope="module")
def plain_export(tmp_path_factory):
    """A plain STUNet export with non-zero temporal outputs (a stand-in for a trained one)."""
    config = _config(False)
    model = build_denoiser(config, nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(3), 500))
    nnx.update(model, jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape),
                                   state))
    out = str(tmp_path_factory.mktemp("plain") / "stunet")
    export_model(model, config, out, step=0, source="test")
    return out


@pytest.fixture(scope="module")
def conditional_export(plain_export, tmp_path_factory):
    """The conditional model initialised from the plain one, its new input layer moved off
    zero (a stand-in for fine-tuning), exported."""
    config = _config(True, plain_export)
    model = build_denoiser(config, nnx.Rngs(1))
    inflate_from_export(model, plain_export, config.init_new_params)
    cond_in = model.net.temporal.cond_in
    cond_in.kernel[...] = 0.3 * jax.random.normal(jax.random.key(4), cond_in.kernel.shape)
    out = str(tmp_path_factory.mktemp("cond") / "stunet")
    export_model(model, config, out, step=0, source="test")
    return out


def test_random_masks_draw_every_kind_with_its_shape():
    b = 64
    m = np.asarray(masks.random_masks(jax.random.key(0), (b, T, H, W)))
    assert m.shape == (b, T, H, W, 1) and set(np.unique(m)) <= {0.0, 1.0}
    for kind in masks.MASK_KINDS:
        one = np.asarray(masks.random_masks(jax.random.key(1), (16, T, H, W), [kind]))[..., 0]
        known = one.mean(axis=(2, 3))  # [b, t]: fraction known per frame
        if kind == "none":
            assert one.max() == 0
        elif kind == "first_frame":
            np.testing.assert_array_equal(known[:, 0], 1.0)
            np.testing.assert_array_equal(known[:, 1:], 0.0)
        elif kind == "box":  # the same hole in every frame, 9% to 36% of the frame
            assert (one == one[:, :1]).all()
            hole = 1 - known[:, 0]
            assert (hole >= 0.3 * 0.3 - 0.05).all() and (hole <= 0.6 * 0.6 + 0.05).all()
        elif kind == "spatiotemporal":  # a hole in some frames only
            holes = known < 1
            assert holes.any(axis=1).all() and (~holes).any(axis=1).all()
        else:  # border: a known inner rectangle, the border to generate
            assert (one == one[:, :1]).all()
            assert (one[:, 0, 0, :].min(axis=1) == 0).all() or (one[:, 0, :, 0] == 0).all()
            assert (known[:, 0] >= 0.6 * 0.6 - 0.05).all() and (known[:, 0] < 1).all()
    kinds_seen = {tuple(np.unique(frame.mean(axis=(1, 2)))) for frame in m[..., 0]}
    assert len(kinds_seen) >= 4  # several kinds in one batch
    with pytest.raises(ValueError, match="mask kinds must be"):
        masks.random_masks(jax.random.key(0), (1, T, H, W), ["first_frame", "diagonal"])
    video = jnp.ones((2, T, H, W, 3)) * 0.5
    mv = np.asarray(masks.masked_video(video, m[:2]))
    assert mv.shape == (2, T, H, W, 4)
    np.testing.assert_array_equal(mv[..., 3:], m[:2])
    np.testing.assert_array_equal(mv[..., :3], 0.5 * np.broadcast_to(m[:2], (2, T, H, W, 3)))


def test_conditional_model_starts_as_the_plain_model(plain_export):
    """Zero-initialised: whatever is known, the conditional model's prediction equals the
    plain model's exactly; the plain weights are copied by name."""
    _, plain_model, _ = load_export(plain_export)
    config = _config(True, plain_export)
    model = build_denoiser(config, nnx.Rngs(9))
    report = inflate_from_export(model, plain_export, config.init_new_params)
    assert report["new"] == 2  # cond_in kernel and bias
    flat, source = _flat(nnx.state(model, nnx.Param)), _flat(nnx.state(plain_model, nnx.Param))
    for path, value in source.items():
        np.testing.assert_array_equal(flat[path], value, err_msg=path)
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(2, T, H, W, 3)), jnp.float32)
    ids = jnp.asarray(rng.integers(3, 50, (2, config.text.max_length)), jnp.int32)
    mask = jnp.ones((2, config.text.max_length), bool)
    cond = model.encode_text(ids, mask)
    logsnr = jnp.array([-1.0, 2.0])
    known = masks.masked_video(jnp.asarray(rng.uniform(-1, 1, (2, T, H, W, 3)), jnp.float32),
                               masks.random_masks(jax.random.key(2), (2, T, H, W)))
    expected = plain_model(z, logsnr, plain_model.encode_text(ids, mask))
    np.testing.assert_array_equal(model(z, logsnr, {**cond, "masked": known}), expected)
    np.testing.assert_array_equal(model(z, logsnr, cond), expected)  # nothing known
    with pytest.raises(ValueError, match="has no conditioning input"):
        plain_model(z, logsnr, {**cond, "masked": known})


def test_initialising_without_declaring_the_new_input_lists_it(plain_export):
    model = build_denoiser(_config(True, plain_export), nnx.Rngs(0))
    with pytest.raises(InflationError, match=r"(?s)missing \(2\):\n  net/temporal/cond_in/bias"
                       r".*keep their initialisation, are those matching '\$\^'"):
        inflate_from_export(model, plain_export)


def test_going_on_from_a_conditional_export_loads_its_conditioning_input(conditional_export):
    """The masked config declares the conditioning input new: a plain export may lack it,
    a conditional one (to go on fine-tuning) has it, and then it is loaded."""
    config = _config(True, conditional_export)
    model = build_denoiser(config, nnx.Rngs(0))
    assert inflate_from_export(model, conditional_export, config.init_new_params)["new"] == 0
    _, source, _ = load_export(conditional_export)
    np.testing.assert_array_equal(model.net.temporal.cond_in.kernel[...],
                                  source.net.temporal.cond_in.kernel[...])


def test_fine_tuning_trains_the_conditioning_input_and_nothing_spatial(plain_export):
    config = _config(True, plain_export)
    model = build_denoiser(config, nnx.Rngs(0))
    inflate_from_export(model, plain_export, config.init_new_params)
    graphdef, params, frozen = trainer.split_model(model, config.train.trainable)
    assert "net/temporal/cond_in/kernel" in _flat(params)
    tx = trainer.make_optimizer(config.train)
    null = {"ids": jnp.zeros((1, config.text.max_length), jnp.int32).at[0, 0].set(1),
            "mask": (jnp.arange(config.text.max_length) < 1)[None]}
    step = trainer.make_train_step(graphdef, tx, Diffusion.from_config(config.diffusion),
                                   config.train, null)
    state = trainer.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                               jax.tree.map(jnp.copy, params))
    rng = np.random.default_rng(0)
    batch = {"pixels": jnp.asarray(rng.uniform(-1, 1, (2, T, H, W, 3)), jnp.float32),
             "ids": jnp.asarray(rng.integers(3, 50, (2, config.text.max_length)), jnp.int32),
             "mask": jnp.ones((2, config.text.max_length), bool)}
    before = _flat(frozen)
    for i in range(2):
        state, metrics = step(state, frozen, batch, jax.random.key(i))
        assert np.isfinite(float(metrics["loss"]))
    assert np.abs(_flat(state.params)["net/temporal/cond_in/kernel"]).max() > 0
    for path, value in _flat(frozen).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)


def _generator(directory):
    from lumiere_jax.config import read_resolved_config
    return load_generator(read_resolved_config(directory), directory)[0]


def test_conditional_sampling_sees_the_known_pixels(conditional_export, plain_export):
    generator = _generator(conditional_export)
    image = np.random.default_rng(1).integers(0, 256, (H, W, 3), np.uint8)
    by_model = editing.image_to_video(generator, image, PROMPT, [0], conditioning="model")
    plain = generator([PROMPT], [0])
    assert not np.array_equal(by_model, plain)  # the known frame changes the sample
    for how in ("replace", "both"):  # replacing makes frame 0 exact
        out = editing.image_to_video(generator, image, PROMPT, [0], conditioning=how)
        np.testing.assert_array_equal(out[0, 0], image)
    both = editing.image_to_video(generator, image, PROMPT, [0], conditioning="both")
    replace = editing.image_to_video(generator, image, PROMPT, [0], conditioning="replace")
    assert not np.array_equal(both[0, 1:], replace[0, 1:])

    with pytest.raises(ValueError, match="needs a conditional STUNet"):
        editing.image_to_video(_generator(plain_export), image, PROMPT, [0],
                               conditioning="model")
    with pytest.raises(ValueError, match="conditioning must be one of"):
        editing.image_to_video(generator, image, PROMPT, [0], conditioning="guess")
    with pytest.raises(ValueError, match="none were given"):  # no known pixels to show
        generator([PROMPT], [0], conditioning="model")


def test_region_sdedit_with_the_conditional_model_keeps_the_rest(conditional_export):
    """SDEdit in a region, the kept pixels also shown to the conditional model ("both"):
    outside the region the output is the input bit for bit, inside it differs from the
    training-free edit; without a region the setting is refused, not ignored."""
    generator = _generator(conditional_export)
    video = np.random.default_rng(2).integers(0, 256, (T, H, W, 3), np.uint8)
    region = np.zeros((H, W), np.float32)
    region[4:12, 4:12] = 1.0
    edits = {how: editing.sdedit(generator, video, PROMPT, 0.5, [0], region=region,
                                 conditioning=how, resample=2)[0] for how in ("both", "replace")}
    outside = region == 0
    np.testing.assert_array_equal(edits["both"][:, outside], video[:, outside])
    assert not np.array_equal(edits["both"][:, ~outside], edits["replace"][:, ~outside])
    with pytest.raises(ValueError, match="give a region"):
        editing.sdedit(generator, video, PROMPT, 0.5, [0], conditioning="both")


def test_known_frame_psnrs_show_whether_the_given_frame_is_used(conditional_export, tmp_path):
    """`lumiere eval`'s probe of a conditional STUNet: one-step estimates of frame 0 with frame
    0 given and with nothing given. Recomputed here for one level; with the conditioning input
    zeroed (the model as initialised) both are exactly the same."""
    from lumiere_jax.config import read_resolved_config
    from lumiere_jax.data.pipeline import world_from_config
    from lumiere_jax.data.synthetic import ShapesSource
    from lumiere_jax.eval import video_quality as vq
    from lumiere_jax.generate import to_uint8
    from lumiere_jax.sampling import KNOWN_FRAME_LOGSNRS, evaluate_generator, known_frame_psnrs

    generator = _generator(conditional_export)
    config = read_resolved_config(conditional_export)
    probe = known_frame_psnrs(generator, config, 3)
    assert list(probe) == [f"{x:g}" for x in KNOWN_FRAME_LOGSNRS]
    assert all(p["known"] != p["unknown"] for p in probe.values()), probe

    source = ShapesSource(world_from_config(config), "test", 3)
    clips = np.stack([source[i]["video"] for i in range(3)])
    x = jnp.asarray(clips, jnp.float32) / 127.5 - 1
    eps = Diffusion.from_config(config.diffusion).noise(jax.random.key(config.eval.seed), x.shape)
    tokens = generator.tokenizer.encode_batch([source[i]["caption"] for i in range(3)],
                                              generator.max_length)
    model = nnx.merge(generator.graphdef, generator.state)
    first = np.zeros((3, T, H, W, 1), np.float32)
    first[:, 0] = 1
    alpha, sigma = np.sqrt(1 / (1 + np.e ** 4)), np.sqrt(1 / (1 + np.e ** -4))  # log-SNR -4
    z = alpha * x + sigma * eps
    v = model(z, jnp.full((3,), -4.0), {
        **model.encode_text(jnp.asarray(tokens.ids), jnp.asarray(tokens.mask)),
        "masked": masks.masked_video(x, first)})
    x0 = to_uint8(alpha * z - sigma * v)  # v-prediction
    assert probe["-4"]["known"] == pytest.approx(vq.psnr(x0[:, :1], clips[:, :1]), abs=0.05)
    assert probe["-4"]["rest"] == pytest.approx(vq.psnr(x0[:, 1:], clips[:, 1:]), abs=0.05)

    unused = generator.with_params(jax.tree_util.tree_map_with_path(
        lambda path, p: p * 0 if "cond_in" in jax.tree_util.keystr(path) else p,
        generator.state))
    for p in known_frame_psnrs(unused, config, 3).values():
        assert p["known"] == p["unknown"] and np.isfinite(p["known"])

    report = evaluate_generator(generator, config, str(tmp_path), 0)  # `lumiere eval`
    assert report["summary"]["known_frame"] == known_frame_psnrs(
        generator, config, config.eval.num_samples)


def test_known_pixels_weigh_known_weight_times_the_rest(conditional_export):
    """train.known_weight = k: per clip, the loss is (k * known error + unknown error) /
    (k * known count + unknown count). With the first frame known (1/T of the clip) and the
    same draws for every k, L(k) = ((T - 1) e_u + k e_k) / (T - 1 + k)."""
    config, model, _ = load_export(conditional_export)
    graphdef, params, frozen = trainer.split_model(model, "^net/")
    null = {"ids": jnp.zeros((1, config.text.max_length), jnp.int32).at[0, 0].set(1),
            "mask": (jnp.arange(config.text.max_length) < 1)[None]}
    rng = np.random.default_rng(1)
    batch = {"pixels": jnp.asarray(rng.uniform(-1, 1, (1, T, H, W, 3)), jnp.float32),
             "ids": jnp.asarray(rng.integers(3, 50, (1, config.text.max_length)), jnp.int32),
             "mask": jnp.ones((1, config.text.max_length), bool)}
    diffusion = Diffusion.from_config(config.diffusion)

    def loss(known_weight, kinds=("first_frame",)):
        train = config.train.copy_and_resolve_references()
        train.update(known_weight=known_weight, mask_kinds=kinds)
        loss_fn = trainer.make_loss_fn(graphdef, diffusion, train, null)
        return float(loss_fn(params, frozen, batch, jax.random.key(7))[0])

    uniform, heavy = loss(1.0), loss(1e7)  # heavy ~ the known frame's error alone
    unknown = (uniform * T - heavy) / (T - 1)
    assert abs(heavy - unknown) > 0.01 * uniform  # the two regions' errors differ
    np.testing.assert_allclose(loss(16.0), ((T - 1) * unknown + 16 * heavy) / (T - 1 + 16),
                               rtol=1e-4)
    # Nothing known: every weight is 1 (a weighted mean, so equal up to rounding).
    np.testing.assert_allclose(loss(16.0, ("none",)), loss(1.0, ("none",)), rtol=1e-6)
    with pytest.raises(ValueError, match="known_weight must be > 0"):
        loss(0.0)


def test_the_shipped_conditional_model_uses_the_frame_it_is_given():
    """The shipped export (checkpoints/README.md: every U-Net weight fine-tuned, known pixels
    weighted 64x) loads with its checksum, and its one-step estimate of frame 0 on 8 seen
    clips is far better with frame 0 given than without: +7.5 dB at log-SNR -8 and +4.6 at -4
    when shipped. The 600-step temporal-only recipe it replaced gained at most 0.5 dB
    (README "Applications"), so a model that ignores the frame fails here."""
    from lumiere_jax.config import read_resolved_config
    from lumiere_jax.sampling import known_frame_psnrs

    config = read_resolved_config(str(SHIPPED))
    assert config.model.temporal.cond_channels == 4
    assert (config.train.trainable, config.train.known_weight) == ("^net/", 64.0)
    probe = known_frame_psnrs(_generator(str(SHIPPED)), config, 8)
    for level in ("-8", "-4"):
        assert probe[level]["known"] - probe[level]["unknown"] > 4.0, probe
    assert probe["-8"]["known"] > 25.0, probe
