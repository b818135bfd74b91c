"""Checkpoints: exact roundtrips, rotation beside write-once frozen weights, mismatch messages,
kill -9 mid-save, and restoring onto another mesh."""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from lumiere_jax.train.checkpoint import (
    Checkpointer,
    CheckpointMismatchError,
    FrozenRef,
    read_frozen,
    tree_checksum,
    write_frozen,
)


def _params() -> dict:
    keys = jax.random.split(jax.random.key(0), 3)
    return {
        "temporal": {"conv": {"kernel": jax.random.normal(keys[0], (3, 4, 4)),
                              "bias": jax.random.normal(keys[1], (4,)).astype(jnp.bfloat16)}},
        "blocks": [{"scale": jax.random.normal(keys[2], (4,))}],
    }


def _data_iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=0).batch(4).to_iter_dataset())


def _assert_trees_equal(actual, expected):
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected),
                    strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def _adamw_state_after_one_update(params):
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)
    return opt_state


def test_roundtrip_params_adamw_state_data_iterator_and_metadata(tmp_path):
    params = _params()
    opt_state = _adamw_state_after_one_update(params)
    frozen_ref = write_frozen(tmp_path / "frozen", {"spatial": {"w": jnp.ones((2, 2))}})
    data = _data_iterator()
    for _ in range(3):
        next(data)

    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        metadata = {"config": ConfigDict({"lr": 1e-2, "frames": 16}), "frozen": frozen_ref}
        assert checkpointer.save(5, {"params": params, "opt_state": opt_state}, metadata,
                                 data_iter=data)
        following_batches = [next(data) for _ in range(3)]  # consumed after the save

    fresh_data = _data_iterator()
    abstract = jax.eval_shape(lambda: {"params": params, "opt_state": opt_state})
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        assert checkpointer.latest_step() == 5
        items, metadata = checkpointer.restore(None, abstract, data_iter=fresh_data)

    _assert_trees_equal(items["params"], params)
    _assert_trees_equal(items["opt_state"], opt_state)  # tuple of namedtuples, EmptyStates
    assert isinstance(items["opt_state"][0], optax.ScaleByAdamState)
    assert int(items["opt_state"][0].count) == 1
    for restored, expected in zip([next(fresh_data) for _ in range(3)], following_batches,
                                  strict=True):
        np.testing.assert_array_equal(restored, expected)
    assert metadata["step"] == 5
    assert metadata["config"] == {"lr": 1e-2, "frames": 16}
    assert metadata["versions"]["jax"] == jax.__version__
    assert set(metadata["versions"]) >= {"jax", "flax", "lumiere_jax"}
    assert FrozenRef.from_json(metadata["frozen"]) == frozen_ref


def test_restore_onto_concrete_arrays_and_nnx_pure_dict_with_int_keys(tmp_path):
    class TwoLayers(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(2, 3, rngs=rngs), nnx.Linear(3, 2, rngs=rngs)])

    trained = nnx.state(TwoLayers(nnx.Rngs(1)), nnx.Param).to_pure_dict()
    template = nnx.state(TwoLayers(nnx.Rngs(2)), nnx.Param).to_pure_dict()  # other values
    with Checkpointer(tmp_path, async_save=False) as checkpointer:
        checkpointer.save(0, {"temporal": trained, "empty": {"nothing": None}}, {})
        items, _ = checkpointer.restore(0, {"temporal": template, "empty": {"nothing": None}})
    _assert_trees_equal(items["temporal"], trained)
    assert list(items["temporal"]["layers"]) == [0, 1]  # int keys come back as ints
    assert items["empty"] == {"nothing": None}


def _file_fingerprints(directory):
    fingerprints = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            fingerprints[path] = (os.stat(path).st_mtime_ns, digest)
    return fingerprints


def test_rotation_keeps_frozen_weights_and_every_retained_step_restores(tmp_path):
    frozen = {"spatial": {"kernel": jnp.arange(12.0).reshape(3, 4)}}
    ref = write_frozen(tmp_path / "frozen", frozen)
    before = _file_fingerprints(tmp_path / "frozen")
    assert before

    with Checkpointer(tmp_path / "ckpt", max_to_keep=2, keep_period=3) as checkpointer:
        for step in range(8):
            params = {"w": jnp.full((4,), float(step))}
            assert checkpointer.save(step, {"params": params}, {"frozen": ref})
            params["w"].delete()  # as if donated to the next train step: the save has a copy
        checkpointer.wait()
        # keep_period=3 keeps 0, 3, 6; max_to_keep=2 keeps the newest two: 6, 7.
        assert checkpointer.all_steps() == [0, 3, 6, 7]
        assert checkpointer.latest_step() == 7
        for step in checkpointer.all_steps():
            items, metadata = checkpointer.restore(
                step, {"params": {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}})
            np.testing.assert_array_equal(items["params"]["w"], np.full((4,), float(step)))
            restored_frozen = read_frozen(FrozenRef.from_json(metadata["frozen"]),
                                          jax.eval_shape(lambda: frozen))
            _assert_trees_equal(restored_frozen, frozen)

    assert _file_fingerprints(tmp_path / "frozen") == before
    # Writing the same weights again is a no-op; different weights are refused.
    assert write_frozen(tmp_path / "frozen", frozen) == ref
    assert _file_fingerprints(tmp_path / "frozen") == before
    with pytest.raises(FileExistsError, match="already holds different frozen weights"):
        write_frozen(tmp_path / "frozen", {"spatial": {"kernel": jnp.zeros((3, 4))}})


def test_save_interval_and_force(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=None, save_interval_steps=3,
                      async_save=False) as checkpointer:
        saved = [checkpointer.save(s, {"p": {"w": jnp.ones(2)}}, {}) for s in range(7)]
        assert saved == [True, False, False, True, False, False, True]
        assert checkpointer.save(7, {"p": {"w": jnp.ones(2)}}, {}, force=True)
        assert checkpointer.all_steps() == [0, 3, 6, 7]


def test_mismatch_names_missing_unexpected_and_misshaped_arrays(tmp_path):
    stored = {"conv": {"kernel": jnp.zeros((3, 3, 8)), "bias": jnp.zeros((8,))},
              "old_gate": jnp.zeros((2,))}
    with Checkpointer(tmp_path, async_save=False) as checkpointer:
        checkpointer.save(1, {"temporal": stored}, {})
        expected = {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 16), jnp.float32),
                             "bias": jax.ShapeDtypeStruct((8,), jnp.bfloat16)},
                    "new_gate": jax.ShapeDtypeStruct((4,), jnp.float32)}
        with pytest.raises(CheckpointMismatchError) as error:
            checkpointer.restore(1, {"temporal": expected, "ema": expected})
    message = str(error.value)
    assert "checkpoint step 1" in message and str(tmp_path) in message
    assert "missing from the checkpoint (1):\n    new_gate (4,) float32" in message
    assert "unexpected (in the checkpoint, not expected) (1):\n    old_gate (2,) float32" in message
    assert "conv/kernel: stored (3, 3, 8) float32, expected (3, 3, 16) float32" in message
    assert "conv/bias: stored (8,) float32, expected (8,) bfloat16" in message
    assert "item 'ema' is not in the checkpoint (it has: ['temporal'])" in message


def test_a_reader_leaves_a_save_in_progress_alone(tmp_path):
    """eval / sample / export open a run's checkpoints read-only, so they may run beside the
    training: they must not remove its in-progress (temporary) save, nor write anything."""
    params = _params()
    with Checkpointer(tmp_path, async_save=False) as writer:
        writer.save(1, {"params": params}, {})
    in_progress = tmp_path / "2.orbax-checkpoint-tmp"
    in_progress.mkdir()
    (in_progress / "part").write_text("being written")
    before = sorted(os.listdir(tmp_path))

    with Checkpointer(tmp_path, read_only=True) as reader:
        assert reader.latest_step() == 1
        items, _ = reader.restore(None, {"params": jax.eval_shape(lambda: params)})
        with pytest.raises(ValueError, match="opened read-only"):
            reader.save(3, {"params": params}, {})
    _assert_trees_equal(items["params"], params)
    assert sorted(os.listdir(tmp_path)) == before and in_progress.is_dir()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Checkpointer(tmp_path / "missing", read_only=True)
    assert not (tmp_path / "missing").exists()

    with Checkpointer(tmp_path, async_save=False) as writer:  # a writer removes such leftovers
        writer.save(3, {"params": params}, {})
    assert not in_progress.exists()


def test_clear_errors_for_bad_directories_steps_and_inputs(tmp_path):
    with Checkpointer(tmp_path / "empty") as checkpointer:
        with pytest.raises(FileNotFoundError, match="no complete checkpoint in .*empty"):
            checkpointer.restore(None, {"p": {"w": jnp.ones(2)}})
        checkpointer.save(2, {"p": {"w": jnp.ones(2)}}, {})
        with pytest.raises(FileNotFoundError, match=r"step 9 .*available steps: \[2\]"):
            checkpointer.restore(9, {"p": {"w": jnp.ones(2)}})
        with pytest.raises(CheckpointMismatchError, match="saved without data_iter"):
            checkpointer.restore(2, {"p": {"w": jnp.ones(2)}}, data_iter=_data_iterator())
        with pytest.raises(ValueError, match="'data' is reserved"):
            checkpointer.save(3, {"data": {"w": jnp.ones(2)}}, {})
        with pytest.raises(TypeError, match="metadata value at 'metadata/when'"):
            checkpointer.save(3, {"p": {"w": jnp.ones(2)}}, {"when": object()})
        with pytest.raises(ValueError, match="filled in by save"):
            checkpointer.save(3, {"p": {"w": jnp.ones(2)}}, {"step": 3})

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="is not a writable directory"):
        Checkpointer(blocker / "ckpt")
    with pytest.raises(OSError, match="is not a writable directory"):
        Checkpointer(blocker)


def test_frozen_checksum_and_reference_checks(tmp_path):
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": {"c": jnp.ones((2,), jnp.bfloat16)}}
    reordered = {"b": {"c": jnp.ones((2,), jnp.bfloat16)},
                 "a": np.arange(6.0, dtype=np.float32).reshape(2, 3)}
    assert tree_checksum(tree) == tree_checksum(reordered)
    flipped = {"a": tree["a"].at[1, 2].set(5.000001), "b": tree["b"]}
    assert tree_checksum(flipped) != tree_checksum(tree)
    ref = write_frozen(tmp_path / "frozen", tree)
    assert ref.checksum == tree_checksum(tree)

    with pytest.raises(ValueError, match="the directory was overwritten"):
        read_frozen(FrozenRef(ref.path, "0" * 64), tree)
    with pytest.raises(FileNotFoundError, match="frozen weights not found"):
        read_frozen(FrozenRef(str(tmp_path / "moved"), ref.checksum), tree)
    # A moved workdir: the recorded path is gone, the weights are found where they went.
    moved = read_frozen(FrozenRef(str(tmp_path / "gone"), ref.checksum), tree,
                        moved_to=tmp_path / "frozen")
    np.testing.assert_array_equal(moved["a"], tree["a"])
    with pytest.raises(ValueError, match="the directory was overwritten"):
        read_frozen(FrozenRef(str(tmp_path / "gone"), "0" * 64), tree,
                    moved_to=tmp_path / "frozen")
    with pytest.raises(CheckpointMismatchError,
                       match=r"a: stored \(2, 3\) float32, expected \(3, 2\)"):
        read_frozen(ref, {"a": jnp.zeros((3, 2)), "b": tree["b"]})


def _require_devices(n):
    assert jax.device_count() >= n, (
        f"this test needs {n} devices; run with XLA_FLAGS=--xla_force_host_platform_device_count=8")


def test_restore_onto_another_mesh_reshards(tmp_path):
    _require_devices(8)
    mesh8 = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
    values = np.arange(16 * 6, dtype=np.float32).reshape(16, 6)
    sharded = jax.device_put(values, NamedSharding(mesh8, P("fsdp", None)))
    assert tree_checksum({"w": sharded}) == tree_checksum({"w": values})
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(1, {"params": {"w": sharded}}, {})
        checkpointer.wait()
        mesh2 = Mesh(np.array(jax.devices()[:2]), ("fsdp",))
        for sharding in (NamedSharding(mesh2, P("fsdp", None)),
                         NamedSharding(mesh2, P(None, "fsdp")),
                         jax.sharding.SingleDeviceSharding(jax.devices()[0])):
            abstract = {"params": {"w": jax.ShapeDtypeStruct((16, 6), jnp.float32,
                                                               sharding=sharding)}}
            items, _ = checkpointer.restore(1, abstract)
            restored = items["params"]["w"]
            assert restored.sharding == sharding
            np.testing.assert_array_equal(np.asarray(restored), values)


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from lumiere_jax.train.checkpoint import Checkpointer

    directory, mode = sys.argv[1], sys.argv[2]
    checkpointer = Checkpointer(directory)
    checkpointer.save(1, {"params": {"w": jnp.full((64, 64), 1.0)}}, {})
    checkpointer.wait()
    if mode == "before_commit":
        # Every byte of step 2 is written, but the commit (rename) never comes.
        async def never_commit(self, *args, **kwargs):
            print("COMMITTING", flush=True)
            time.sleep(600)
        atomicity.AtomicRenameTemporaryPath.finalize = never_commit
    checkpointer.save(2, {"params": {"w": jnp.full((1024, 2048), 2.0)}}, {})  # 8 MB
    print("SAVE_STARTED", flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("mode", ["before_commit", "right_after_save_returns"])
def test_kill_mid_save_keeps_previous_step(tmp_path, mode):
    directory = tmp_path / "ckpt"
    child = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(directory), mode],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wait_for = "COMMITTING" if mode == "before_commit" else "SAVE_STARTED"
    try:
        for line in child.stdout:
            if line.strip() == wait_for:
                break
        else:
            pytest.fail(f"the child exited (rc {child.wait()}) before printing {wait_for}")
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()

    if mode == "before_commit":
        leftovers = [n for n in os.listdir(directory) if "tmp" in n]
        assert leftovers, os.listdir(directory)  # step 2 really was half done
    with Checkpointer(directory) as checkpointer:
        latest = checkpointer.latest_step()
        if mode == "before_commit":
            assert latest == 1
        assert latest in (1, 2)  # whichever is the newest complete one, it restores fully
        shape = (64, 64) if latest == 1 else (1024, 2048)
        items, _ = checkpointer.restore(
            None, {"params": {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}})
        np.testing.assert_array_equal(items["params"]["w"], np.full(shape, float(latest)))
        # Training goes on: the next save works and the half-written leftovers are gone.
        checkpointer.save(3, {"params": {"w": jnp.zeros(2)}}, {})
        checkpointer.wait()
        assert checkpointer.latest_step() == 3
    assert not [n for n in os.listdir(directory) if "tmp" in n]
