"""Training at scale on 8 forced host devices: sharded init and step, accumulation, bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lumiere_jax.config import load_config
from lumiere_jax.data.pipeline import global_batch
from lumiere_jax.diffusion.schedules import Diffusion
from lumiere_jax.parallel.mesh import (
    MeshError,
    batch_spec,
    fetch,
    make_mesh,
    mesh_rules,
    replicated,
)
from lumiere_jax.train import trainer

# Every parameter trains (U-Net, temporal layers and T5), so every family is sharded, updated
# and compared.
CONFIG = "configs/shapes_stunet.py:smoke,channels=16"
OVERRIDES = ["world.num_frames=8", "train.batch_size=8", "train.warmup_steps=0",
             "train.trainable=.*"]
MESHES = {"single": (1, 1, 1), "data": (8, 1, 1), "fsdp": (1, 8, 1), "mixed": (2, 2, 2)}


def _config(mesh, extra=()):
    data, fsdp, tensor = mesh
    return load_config(CONFIG, OVERRIDES + [f"mesh.data={data}", f"mesh.fsdp={fsdp}",
                                            f"mesh.tensor={tensor}", *extra])


def _batch(config):
    rng = np.random.default_rng(0)
    b, t, h, w = (config.train.batch_size, config.world.num_frames, config.world.height,
                  config.world.width)
    length = config.text.max_length
    return {"pixels": rng.uniform(-1, 1, (b, t, h, w, 3)).astype(np.float32),
            "ids": rng.integers(3, 40, (b, length)).astype(np.int32),
            "mask": np.arange(length)[None] < rng.integers(4, length, (b, 1))}


def _perturb(params):
    """Random init has zero output layers, which block most gradients at step 1; move every
    parameter a little, by the same values on any mesh. Partitionable threefry gives the same
    bits everywhere; the floats made from them must be exact too: uniform's [-1, 1) grid
    times a power of two needs no rounding, whereas normal's erfinv polynomial is rounded
    differently by XLA:CPU in the partitioned program (seen with jax 0.12: 1-4 ulp)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    moved = [x + 2.0 ** -4 * jax.random.uniform(k, x.shape, x.dtype, -1.0, 1.0)
             for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, moved)


def one_step(config):
    """(params before, params after, loss, grad norm, param shardings) of one sharded step."""
    mesh = make_mesh(config.mesh)
    rules = mesh_rules(config.mesh)
    graphdef, params, frozen = trainer.init_sharded(config, mesh, rules)
    params = jax.jit(_perturb, out_shardings=trainer.shardings_of(params))(params)
    tx = trainer.make_optimizer(config.train)
    state = trainer.init_state(params, tx, mesh)
    before = fetch(params)
    null = {"ids": jnp.zeros((1, config.text.max_length), jnp.int32),
            "mask": jnp.zeros((1, config.text.max_length), bool).at[0, 0].set(True)}
    step = trainer.make_train_step(
        graphdef, tx, Diffusion.from_config(config.diffusion), config.train, null,
        shardings=(trainer.shardings_of(state), trainer.shardings_of(frozen),
                   jax.sharding.NamedSharding(mesh, batch_spec(mesh, rules)), replicated(mesh)))
    batch = global_batch(_batch(config), mesh, batch_spec(mesh, rules)[0])
    shardings = trainer.shardings_of(state.params)
    state, metrics = step(state, frozen, batch, jax.random.key(0))
    return before, fetch(state.params), float(metrics["loss"]), float(metrics["grad_norm"]), \
        shardings


@pytest.fixture(scope="module")
def reference():
    return one_step(_config(MESHES["single"]))


@pytest.mark.parametrize("name", ["data", "fsdp", "mixed"])
def test_one_step_on_a_mesh_equals_one_device(reference, name):
    """Same initial values, loss and updated parameters as on one device.

    Tolerance: the sharded program sums the loss and the gradients in another order (partial
    sums per device, then an all-reduce), so fp32 results differ by rounding only: relative
    1e-5 on the loss and gradient norm. AdamW's first update is lr * g / (|g| + eps), about
    lr * sign(g): a gradient entry within rounding of zero may change sign, so an updated
    parameter may differ by up to 2 * lr = 2e-3, and only in a handful of entries; all others
    agree to 1e-6.
    """
    before, after, loss, grad_norm, _ = reference
    m_before, m_after, m_loss, m_grad_norm, _ = one_step(_config(MESHES[name]))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(m_before)):
        np.testing.assert_array_equal(a, b)  # initialised sharded == initialised whole
    assert abs(m_loss - loss) <= 1e-5 * abs(loss)
    assert abs(m_grad_norm - grad_norm) <= 1e-5 * grad_norm
    diffs = np.concatenate([np.abs(a - b).ravel() for a, b in
                            zip(jax.tree.leaves(after), jax.tree.leaves(m_after))])
    assert diffs.max() <= 2e-3 + 1e-6
    assert np.mean(diffs > 1e-6) < 1e-3
    moved = np.concatenate([np.abs(a - b).ravel() for a, b in
                            zip(jax.tree.leaves(after), jax.tree.leaves(before))])
    assert np.mean(moved > 1e-4) > 0.5  # the step did update the parameters


def test_parameters_live_sharded_by_the_rules():
    """On fsdp=8 every big kernel holds 1/8 of its rows per device; on tensor=8 the kernels
    with 8-divisible wide dimensions hold 1/8 of their columns; norms stay replicated."""
    for mesh, axis in (((1, 8, 1), "fsdp"), ((1, 1, 8), "tensor")):
        config = _config(mesh)
        m = make_mesh(config.mesh)
        _, params, frozen = trainer.init_sharded(config, m, mesh_rules(config.mesh))
        flat = {jax.tree_util.keystr(p, simple=True, separator="/"): v for p, v in
                jax.tree_util.tree_flatten_with_path(params)[0]}
        sharded = [p for p, x in flat.items()
                   if x.addressable_shards[0].data.size * 8 == x.size]
        big = [p for p, x in flat.items() if x.size >= 64 * 64]
        # fsdp: every big array is split, T5 and temporal layers included. tensor: the tiny
        # T5's 4 heads cannot split 8 ways, so its attention stays whole (fit_specs).
        if axis == "fsdp":
            assert set(big) <= set(sharded), sorted(set(big) - set(sharded))[:5]
            assert any("text_encoder" in p for p in sharded)
        assert any("temporal" in p for p in sharded)
        assert all(axis in str(flat[p].sharding.spec) for p in sharded)
        norms = [x for p, x in flat.items() if p.endswith("scale/value") and "norm" in p]
        assert norms and all(x.sharding.is_fully_replicated for x in norms)


def test_gradient_accumulation_averages_the_microbatch_gradients():
    """grad_accum=2: the loss and gradient norm equal those of the average of the two
    microbatch gradients (microbatch i = examples i, i+2, ...; RNG folded with i)."""
    config = _config(MESHES["single"], ["train.grad_accum=2"])
    mesh = make_mesh(config.mesh)
    graphdef, params, frozen = trainer.init_sharded(config, mesh, mesh_rules(config.mesh))
    params = _perturb(params)
    tx = trainer.make_optimizer(config.train)
    null = {"ids": jnp.zeros((1, config.text.max_length), jnp.int32),
            "mask": jnp.zeros((1, config.text.max_length), bool).at[0, 0].set(True)}
    diffusion = Diffusion.from_config(config.diffusion)
    batch = jax.tree.map(jnp.asarray, _batch(config))
    rng = jax.random.key(3)

    loss_fn = trainer.make_loss_fn(graphdef, diffusion, config.train, null)
    step_rng = jax.random.fold_in(rng, 0)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))  # eager ops took minutes
    losses, grads = [], []
    for i in range(2):
        micro = jax.tree.map(lambda x: x[i::2], batch)
        (loss, _), g = grad_fn(params, frozen, micro, jax.random.fold_in(step_rng, i))
        losses.append(float(loss))
        grads.append(g)
    mean_grads = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
    expected_norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(mean_grads))))

    step = trainer.make_train_step(graphdef, tx, diffusion, config.train, null)
    state = trainer.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                               jax.tree.map(jnp.copy, params))
    _, metrics = step(state, frozen, batch, rng)
    assert float(metrics["loss"]) == pytest.approx(np.mean(losses), rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(expected_norm, rel=1e-4)


def test_bf16_compute_keeps_fp32_master_weights(reference):
    """model.unet.dtype=bfloat16: parameters, optimizer state and EMA stay float32, and the
    loss is the fp32 loss to bf16 precision."""
    _, after, loss, _, _ = reference
    config = _config(MESHES["single"], ["model.unet.dtype=bfloat16"])
    _, bf16_after, bf16_loss, _, _ = one_step(config)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(bf16_after))
    assert bf16_loss == pytest.approx(loss, rel=2e-2)
    assert bf16_loss != loss  # it did compute in bf16


def test_bad_mesh_and_accumulation_settings_are_refused(tmp_path):
    with pytest.raises(MeshError, match="has 16 devices, but 8"):
        make_mesh(dict(data=4, fsdp=4))
    with pytest.raises(MeshError, match="not divisible by data\\*fsdp"):
        trainer.train(_config((1, 8, 1), ["train.batch_size=4"]), str(tmp_path / "a"))
    with pytest.raises(MeshError, match="grad_accum=3 does not divide the per-device batch"):
        trainer.train(_config((1, 1, 1), ["train.grad_accum=3"]), str(tmp_path / "b"))
    with pytest.raises(MeshError, match="mesh.dcn axes \\['pods'\\]"):
        make_mesh(dict(data=-1, dcn=dict(pods=2)))
