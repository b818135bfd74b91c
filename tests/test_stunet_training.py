"""Stage-1 training: only the temporal layers learn; the spatial weights never move."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lumiere_jax.config import load_config
from lumiere_jax.diffusion.losses import diffusion_loss
from lumiere_jax.diffusion.schedules import Diffusion
from lumiere_jax.models.denoiser import build_denoiser
from lumiere_jax.models.inflate import InflationError, inflate
from lumiere_jax.train import trainer

CONFIG = "configs/shapes_stunet.py:smoke,channels=8"


def _flat(state) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def _batch(config, b=2):
    t, h, w = config.world.num_frames, config.world.height, config.world.width
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 200, (b, config.text.max_length)).astype(np.int32)
    mask = np.arange(config.text.max_length)[None] < np.array([[20], [35]])
    return {"pixels": jnp.asarray(rng.uniform(-1, 1, (b, t, h, w, 3)), jnp.float32),
            "ids": jnp.asarray(ids), "mask": jnp.asarray(mask)}


def test_only_temporal_parameters_train():
    config = load_config(CONFIG, ["world.num_frames=8"])
    model = build_denoiser(config, nnx.Rngs(0))
    graphdef, params, frozen = trainer.split_model(model, config.train.trainable)
    # Stand-in for trained spatial weights: the random init has a zero output conv, which
    # would block every gradient.
    leaves, treedef = jax.tree.flatten(frozen)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    frozen = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                          if jnp.issubdtype(x.dtype, jnp.floating) else x
                                          for x, k in zip(leaves, keys)])
    assert all(p.startswith("net/temporal/") for p in _flat(params))
    assert not any(p.startswith("net/temporal/") for p in _flat(frozen))

    tx = trainer.make_optimizer(config.train)
    opt_state = tx.init(params)
    # The optimizer holds state for the temporal parameters alone.
    n_temporal = sum(x.size for x in jax.tree.leaves(params))
    assert sum(x.size for x in jax.tree.leaves(opt_state)) <= 2 * n_temporal + 8

    diffusion = Diffusion.from_config(config.diffusion)
    null = {"ids": jnp.zeros((1, config.text.max_length), jnp.int32).at[0, 0].set(1),
            "mask": (jnp.arange(config.text.max_length) < 1)[None]}
    step_fn = trainer.make_train_step(graphdef, tx, diffusion, config.train, null)
    state = trainer.TrainState(jnp.zeros((), jnp.int32), params, opt_state,
                               jax.tree.map(jnp.copy, params))
    frozen_before = _flat(frozen)
    start = _flat(params)
    for _ in range(3):
        state, metrics = step_fn(state, frozen, _batch(config), jax.random.key(0))
        assert np.isfinite(float(metrics["loss"]))
    # Spatial (and T5) weights: bit-identical.
    for path, value in _flat(frozen).items():
        np.testing.assert_array_equal(value, frozen_before[path], err_msg=path)
    moved = {p for p, v in _flat(state.params).items() if not np.array_equal(v, start[p])}
    assert moved, "no temporal parameter changed"

    # Every temporal parameter family gets a gradient (after the zero-initialised output
    # projections have moved, the layers before them receive gradient too).
    def loss(p):
        m = nnx.merge(graphdef, p, frozen)
        batch = _batch(config)
        cond = m.encode_text(batch["ids"], batch["mask"])
        return diffusion_loss(m, batch["pixels"], cond, jax.random.key(1), diffusion)[0]

    grads = _flat(jax.jit(jax.grad(loss))(state.params))
    families = {}
    for path, g in grads.items():
        family = "/".join(path.split("/")[2:3] + path.split("/")[4:])  # e.g. blocks/conv1/kernel
        families[family] = families.get(family, 0.0) + float(np.abs(g).sum())
    dead = sorted(f for f, total in families.items() if total == 0.0)
    assert not dead, f"temporal parameter families without gradient: {dead}"
    assert {"blocks/conv1/kernel", "blocks/qkv/kernel", "blocks/film/kernel", "down/kernel",
            "up/kernel"} <= set(families)


def test_inflation_copies_the_image_model_exactly():
    image_config = load_config("configs/shapes_t2i.py:smoke,channels=8")
    video_config = load_config(CONFIG)
    image = build_denoiser(image_config, nnx.Rngs(5))
    video = build_denoiser(video_config, nnx.Rngs(6))
    source = nnx.to_pure_dict(nnx.state(image, nnx.Param))
    report = inflate(video, source)
    assert report["copied"] == len(_flat(nnx.state(image, nnx.Param)))
    image_flat, video_flat = _flat(nnx.state(image, nnx.Param)), _flat(nnx.state(video))
    for path, value in image_flat.items():
        target = path.replace("net/", "net/unet/", 1) if path.startswith("net/") else path
        np.testing.assert_array_equal(video_flat[target], value, err_msg=path)


def test_inflation_from_another_architecture_lists_what_differs():
    image = build_denoiser(load_config("configs/shapes_t2i.py:smoke,channels=16"),
                           nnx.Rngs(0))
    video = build_denoiser(load_config(CONFIG), nnx.Rngs(0))
    with pytest.raises(InflationError) as error:
        inflate(video, nnx.to_pure_dict(nnx.state(image, nnx.Param)), where="stage0")
    message = str(error.value)
    assert "cannot initialise from stage0" in message and "mis-shaped (" in message
    assert "net/unet/conv_in/kernel: model (3, 3, 3, 8), source (3, 3, 3, 16)" in message
    assert "unexpected" not in message and "missing" not in message


def test_the_ablation_without_temporal_sampling_starts_from_a_stunet_that_has_it(tmp_path):
    """`:sampling=none` from an export with temporal down/up-sampling: every parameter it has
    is copied by name, and only the source's sampling kernels are left out, as its config
    declares; without the declaration they are listed as unexpected."""
    from lumiere_jax.train.export import export_model, inflate_from_export

    source = build_denoiser(load_config(CONFIG), nnx.Rngs(1))
    state = nnx.state(source, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(2), 500))
    nnx.update(source, jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape),
                                    state))
    export = str(tmp_path / "stunet")
    export_model(source, load_config(CONFIG), export, step=0, source="test")
    config = load_config(CONFIG + ",sampling=none")
    model = build_denoiser(config, nnx.Rngs(0))
    with pytest.raises(InflationError, match=r"(?s)unexpected \(unused\) \(4\):\n"
                       r"  net/temporal/down/.*may leave out are those matching '\$\^'"):
        inflate_from_export(model, export)
    report = inflate_from_export(model, export, config.init_new_params,
                                 config.init_unused_params)
    source_flat, model_flat = (_flat(nnx.state(source, nnx.Param)),
                               _flat(nnx.state(model, nnx.Param)))
    left_out = sorted(set(source_flat) - set(model_flat))
    assert left_out and all(p.startswith(("net/temporal/down/", "net/temporal/up/"))
                            for p in left_out)
    assert report == {"copied": len(model_flat), "new": 0, "unused": len(left_out)}
    for path, value in model_flat.items():
        np.testing.assert_array_equal(value, source_flat[path], err_msg=path)


def test_remat_keeps_gradients_and_saves_fewer_activations():
    from lumiere_jax.plan import saved_residuals

    results = {}
    for remat in ("none", "block"):
        config = load_config(CONFIG, ["world.num_frames=8", f"model.unet.remat={remat}"])
        model = build_denoiser(config, nnx.Rngs(0))
        graphdef, params, frozen = trainer.split_model(model, config.train.trainable)
        leaves, treedef = jax.tree.flatten(frozen)
        keys = jax.random.split(jax.random.key(7), len(leaves))
        frozen = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                              for x, k in zip(leaves, keys)])
        null = {"ids": jnp.zeros((1, config.text.max_length), jnp.int32).at[0, 0].set(1),
                "mask": (jnp.arange(config.text.max_length) < 1)[None]}
        loss_fn = trainer.make_loss_fn(graphdef, Diffusion.from_config(config.diffusion),
                                       config.train, null)
        scalar = lambda *a: loss_fn(*a)[0]  # noqa: E731
        args = (params, frozen, _batch(config), jax.random.key(3))
        loss, grads = jax.jit(jax.value_and_grad(scalar))(*args)
        saved = sum(r.size * r.dtype.itemsize for r in saved_residuals(scalar, *args))
        results[remat] = (float(loss), _flat(grads), saved)
    (loss_a, grads_a, saved_a), (loss_b, grads_b, saved_b) = results["none"], results["block"]
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for path, g in grads_a.items():
        np.testing.assert_allclose(grads_b[path], g, rtol=1e-4, atol=1e-6, err_msg=path)
    assert saved_b < 0.7 * saved_a, (saved_a, saved_b)


def test_the_shipped_motion_model_reads_the_motion_word():
    """checkpoints/shapes_stunet_motion (README Stage 1, run e8) loads with its checksum checked
    and, unlike the per-frame model, predicts better with the true motion word than with the
    opposite one at high noise, where only the caption can place the object."""
    from lumiere_jax.config import read_resolved_config
    from lumiere_jax.eval.motion_word import MotionWordProbe
    from lumiere_jax.sampling import load_generator

    export = "checkpoints/shapes_stunet_motion"
    config = read_resolved_config(export)
    generator, step = load_generator(config, export)
    assert step == 4000 and config.model.temporal.temporal_text == "tokens"
    probe = MotionWordProbe(generator.graphdef, generator.tokenizer, generator.max_length,
                            config, 8, logsnrs=(-8.0,))
    result = probe(generator.state)["-8"]
    assert result["gap"] > 0.01 and result["wins"] >= 0.75, result  # README: +0.023, 97%
