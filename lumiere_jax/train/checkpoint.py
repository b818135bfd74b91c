"""Training checkpoints: rotating Orbax steps for what trains, frozen weights written once.

Lumiere trains only the temporal layers inserted into a frozen text-to-image U-Net. The two
kinds of state live apart:

- `write_frozen(dir, tree)` writes the frozen spatial weights ONCE to their own directory and
  returns a `FrozenRef(path, checksum)`. Each step's metadata carries that reference. (Saving
  them as an item of the first step only would be wrong: `max_to_keep` deletes that step, and
  with it the weights.)
- `Checkpointer` wraps one `ocp.CheckpointManager`. Every step holds the caller's items
  (trainable params, optimizer state, EMA, ...), the Grain iterator state as item 'data' and
  a JSON item 'metadata' (config, step, library versions, frozen-weights reference).

Items are any pytrees (nested dicts, `nnx.State`, optax states made of tuples and
namedtuples). They are stored as nested dicts keyed by each leaf's path ("0/mu/conv/kernel"),
and rebuilt in the caller's own structure on restore, so what Orbax stores never depends on
container types. Before reading any array, `restore` compares the stored shapes and dtypes
with what the caller expects and names every array that differs (`CheckpointMismatchError`).

Orbax writes each step to a temporary directory and renames it when complete, so a crash or
`kill -9` mid-save leaves the previous steps intact; `latest_step()` never sees the partial
one, and a new `Checkpointer` deletes the leftover temporary directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
from collections.abc import Mapping
from typing import Any

import flax
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

import lumiere_jax

DATA_ITEM = "data"  # Grain iterator state
METADATA_ITEM = "metadata"  # JSON: config, step, versions, frozen-weights reference
RESERVED_ITEMS = (DATA_ITEM, METADATA_ITEM)
_FROZEN_FORMAT = "lumiere_jax.frozen.v1"
_MAX_LISTED = 20  # arrays listed per kind of difference in a mismatch message

Path = tuple[str, ...]  # a leaf's position in a tree, one string per level


class CheckpointMismatchError(ValueError):
    """The stored arrays differ from those the caller expects (other config or architecture)."""


@dataclasses.dataclass(frozen=True)
class FrozenRef:
    """Where frozen weights live and the sha256 of their arrays (see `tree_checksum`)."""

    path: str
    checksum: str

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "checksum": self.checksum}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FrozenRef:
        if not isinstance(data, Mapping) or set(data) != {"path", "checksum"}:
            raise ValueError(
                f"a frozen-weights reference is a dict with keys 'path' and 'checksum', "
                f"got {data!r}")
        return cls(path=str(data["path"]), checksum=str(data["checksum"]))


# ----------------------------------------------------------------------------- tree paths


def _key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _flatten(tree: Any, where: str) -> dict[Path, Any]:
    """Leaves by path, in the tree's own order. Empty nodes (None, EmptyState) have none."""
    flat: dict[Path, Any] = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        path = tuple(_key_name(k) for k in key_path)
        if not path:
            raise ValueError(f"{where}: a bare array is not a tree; wrap it, e.g. {{'x': x}}")
        if path in flat:
            raise ValueError(
                f"{where}: two leaves share the path {'/'.join(path)!r} (e.g. keys 0 and '0'); "
                "rename one")
        flat[path] = leaf
    return flat


def _nest(flat: Mapping[Path, Any], where: str) -> dict[str, Any]:
    """The nested dict {'a': {'b': leaf}} of a flat {('a', 'b'): leaf}."""
    nested: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = nested
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{where}: {'/'.join(path)!r} is both a leaf and a subtree")
        if path[-1] in node:
            raise ValueError(f"{where}: {'/'.join(path)!r} is both a leaf and a subtree")
        node[path[-1]] = leaf
    return nested


def _flatten_nested(nested: Any, prefix: Path = ()) -> dict[Path, Any]:
    """Leaves of a nested dict as stored by Orbax (its leaves are array metadata or arrays)."""
    if not isinstance(nested, Mapping):
        return {prefix: nested}
    flat: dict[Path, Any] = {}
    for key, value in nested.items():
        flat.update(_flatten_nested(value, prefix + (str(key),)))
    return flat


def _path_str(path: Path) -> str:
    return "/".join(path)


# ------------------------------------------------------------------ abstract leaves, checks


def _default_sharding() -> jax.sharding.Sharding:
    if jax.process_count() > 1:
        raise ValueError(
            "with several processes every abstract leaf needs a sharding: pass "
            "jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))")
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _abstract_leaf(leaf: Any) -> jax.ShapeDtypeStruct:
    """What to restore a leaf as: its shape, dtype and sharding (default: first device)."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = leaf.sharding if leaf.sharding is not None else _default_sharding()
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    array = np.asarray(leaf)
    return jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=_default_sharding())


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
    return tuple(int(d) for d in leaf.shape), np.dtype(leaf.dtype)


def _format(shape_dtype: tuple[tuple[int, ...], np.dtype]) -> str:
    shape, dtype = shape_dtype
    return f"{shape} {dtype.name}"


def _listed(lines: list[str]) -> list[str]:
    if len(lines) <= _MAX_LISTED:
        return lines
    return lines[:_MAX_LISTED] + [f"... and {len(lines) - _MAX_LISTED} more"]


def _tree_differences(stored: Mapping[Path, Any], expected: Mapping[Path, Any]) -> list[str]:
    """Lines naming arrays missing from, unexpected in, or mis-shaped in the stored tree."""
    stored_sd = {p: _shape_dtype(m) for p, m in stored.items()}
    expected_sd = {p: _shape_dtype(m) for p, m in expected.items()}
    missing = [f"{_path_str(p)} {_format(sd)}" for p, sd in expected_sd.items()
               if p not in stored_sd]
    unexpected = [f"{_path_str(p)} {_format(sd)}" for p, sd in stored_sd.items()
                  if p not in expected_sd]
    differing = [f"{_path_str(p)}: stored {_format(stored_sd[p])}, expected {_format(sd)}"
                 for p, sd in expected_sd.items() if p in stored_sd and stored_sd[p] != sd]
    lines = []
    for title, entries in (("missing from the checkpoint", missing),
                           ("unexpected (in the checkpoint, not expected)", unexpected),
                           ("different shape or dtype", differing)):
        if entries:
            lines.append(f"  {title} ({len(entries)}):")
            lines += [f"    {entry}" for entry in _listed(entries)]
    return lines


def _stored_tree_metadata(item_dir: epath.Path) -> dict[Path, Any]:
    """Shapes/dtypes Orbax recorded for a StandardSave item, read without loading arrays."""
    tree = ocp.StandardCheckpointHandler().metadata(item_dir).tree
    return _flatten_nested(tree)


# ------------------------------------------------------------------------ host and JSON


def _host_array(leaf: Any) -> np.ndarray:
    """The full value of a leaf on this host (gathers arrays sharded over other processes)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        leaf = multihost_utils.process_allgather(leaf, tiled=True)
    return np.asarray(jax.device_get(leaf))


def tree_checksum(tree: Any) -> str:
    """sha256 over (path, dtype, shape, bytes) of every leaf, in sorted path order.

    Independent of sharding, devices and dict insertion order; any changed bit changes it.
    """
    digest = hashlib.sha256()
    flat = _flatten(tree, "checksum")
    for path in sorted(flat):
        array = _host_array(flat[path])
        header = json.dumps([_path_str(path), array.dtype.name, list(array.shape)])
        digest.update(header.encode())
        digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return digest.hexdigest()


def _jsonable(value: Any, where: str) -> Any:
    """Metadata as JSON types: FrozenRef and ConfigDict become dicts, numpy scalars numbers."""
    if isinstance(value, FrozenRef):
        return value.to_json()
    if hasattr(value, "to_dict") and callable(value.to_dict):  # ml_collections.ConfigDict
        value = value.to_dict()
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"metadata key {where}/{key!r} is not a string (JSON needs one)")
            out[key] = _jsonable(item, f"{where}/{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, f"{where}/{i}") for i, item in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"metadata value at {where!r} has type {type(value).__name__}, which JSON cannot "
        "store; pass numbers, strings, lists or dicts (convert it first)")


def library_versions() -> dict[str, str]:
    """Versions recorded with every checkpoint, to explain a failed restore later."""
    return {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "orbax-checkpoint": importlib.metadata.version("orbax-checkpoint"),
        "grain": importlib.metadata.version("grain"),
        "lumiere_jax": lumiere_jax.__version__,
    }


def _absolute(directory: str | os.PathLike) -> epath.Path:
    text = os.fspath(directory)
    return epath.Path(text if "://" in text else os.path.abspath(text))


# ------------------------------------------------------------------------ frozen weights


def _stored_checksum(path: epath.Path) -> str:
    with ocp.StandardCheckpointer() as checkpointer:
        custom = checkpointer.metadata(path).custom_metadata or {}
    if custom.get("format") != _FROZEN_FORMAT or "sha256" not in custom:
        raise ValueError(
            f"{path} exists but is not a frozen-weights directory written by write_frozen "
            "(no checksum in its metadata); point to another directory")
    return custom["sha256"]


def write_frozen(directory: str | os.PathLike, tree: Any) -> FrozenRef:
    """Writes frozen weights once to `directory`; a later call with the same weights is a no-op.

    Orbax writes to a temporary directory and renames it when complete, so `directory` either
    holds all the weights or does not exist. Every process must call this (collective save).
    """
    path = _absolute(directory)
    flat = _flatten(tree, "frozen weights")
    if not flat:
        raise ValueError("write_frozen: the tree has no arrays to write")
    checksum = tree_checksum(tree)
    if path.exists():
        stored = _stored_checksum(path)
        if stored != checksum:
            raise FileExistsError(
                f"{path} already holds different frozen weights (sha256 {stored[:16]}..., "
                f"these are {checksum[:16]}...). Write them to a new directory; delete the "
                "old one only if no checkpoint references it.")
        return FrozenRef(str(path), checksum)
    path.parent.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, _nest(flat, "frozen weights"),
                          custom_metadata={"format": _FROZEN_FORMAT, "sha256": checksum})
        checkpointer.wait_until_finished()
    return FrozenRef(str(path), checksum)


def read_frozen(ref: FrozenRef, abstract_tree: Any,
                moved_to: str | os.PathLike | None = None) -> Any:
    """Restores frozen weights in the structure (and shardings) of `abstract_tree`.

    Checks that the directory holds the weights `ref` names, that shapes and dtypes match,
    and that the bytes read back hash to `ref.checksum`. `moved_to`: where to look when the
    recorded (absolute) path is gone, e.g. the `frozen/` of a workdir that was moved or
    copied from another machine; the checksum still has to match.
    """
    path = epath.Path(ref.path)
    if not path.exists() and moved_to is not None and epath.Path(moved_to).exists():
        path = epath.Path(moved_to)
    if not path.exists():
        raise FileNotFoundError(
            f"frozen weights not found at {path} (referenced by the checkpoint metadata); "
            "were they moved or deleted?")
    stored = _stored_checksum(path)
    if stored != ref.checksum:
        raise ValueError(
            f"{path} holds frozen weights with sha256 {stored[:16]}..., but the checkpoint "
            f"references {ref.checksum[:16]}...: the directory was overwritten")
    expected = _flatten(abstract_tree, "abstract frozen weights")
    differences = _tree_differences(_stored_tree_metadata(path), expected)
    if differences:
        raise CheckpointMismatchError(
            "\n".join([f"frozen weights at {path} do not match the expected tree:"]
                      + differences))
    abstract = {p: _abstract_leaf(leaf) for p, leaf in expected.items()}
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(path, _nest(abstract, "abstract frozen weights"))
    restored_flat = _flatten_nested(restored)
    result = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(abstract_tree), [restored_flat[p] for p in expected])
    actual = tree_checksum(result)
    if actual != ref.checksum:
        raise ValueError(
            f"frozen weights read from {path} hash to {actual[:16]}..., expected "
            f"{ref.checksum[:16]}...: the files are corrupted")
    return result


# ------------------------------------------------------------------------ checkpointer


def _ensure_writable_directory(path: epath.Path) -> None:
    """Fails now, with the path in the message, rather than at the first save hours later."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe.{jax.process_index()}.{os.getpid()}"
        probe.write_text("probe")
        probe.unlink()
    except OSError as error:
        raise type(error)(
            f"checkpoint directory {path} is not a writable directory ({error}); choose "
            "another --workdir or fix its permissions") from error


class Checkpointer:
    """Rotating training checkpoints: named pytree items + Grain iterator + JSON metadata.

    Every process calls every method (Orbax coordinates the writes).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 keep_period: int | None = None, async_save: bool = True,
                 save_interval_steps: int = 1, read_only: bool = False):
        for name, value in (("max_to_keep", max_to_keep), ("keep_period", keep_period)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        self.directory = _absolute(directory)
        self.read_only = read_only
        if read_only:
            # A reader (eval, sample or export beside a running training) neither saves,
            # deletes nor cleans up: leftover temporary directories may be a save in progress.
            if not self.directory.is_dir():
                raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
            options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0,
                                                   create=False, cleanup_tmp_directories=False)
        else:
            _ensure_writable_directory(self.directory)
            policies = ocp.checkpoint_managers
            keep = [policies.LatestN(n=max_to_keep)]
            if keep_period is not None:
                keep.append(policies.EveryNSteps(keep_period))
            options = ocp.CheckpointManagerOptions(
                # No InitialSavePolicy: saves happen exactly on multiples of the interval (and
                # on a preemption signal), which makes the schedule predictable.
                save_decision_policy=policies.AnySavePolicy([
                    policies.FixedIntervalPolicy(save_interval_steps),
                    policies.PreemptionCheckpointingPolicy()]),
                preservation_policy=policies.AnyPreservationPolicy(keep),
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,  # leftovers of a save killed mid-way
                create=True,
            )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # -- saving

    def save(self, step: int, items: Mapping[str, Any], metadata: Mapping[str, Any],
             data_iter: Any = None, force: bool = False) -> bool:
        """Saves `items` at `step` if the save interval (or `force`) says so.

        Returns whether a save started. With async saves, arrays are copied to host before
        returning, so the caller may donate or overwrite them right after.
        """
        if self.read_only:
            raise ValueError(f"cannot save step {step}: {self.directory} was opened read-only")
        if not isinstance(items, Mapping) or not items:
            raise ValueError("items must be a non-empty dict of name -> pytree, "
                             f"got {type(items).__name__}")
        args = {}
        for name, tree in items.items():
            if not isinstance(name, str) or not name or "/" in name or name.startswith("_"):
                raise ValueError(f"item name {name!r}: use a non-empty string without '/' "
                                 "that does not start with '_'")
            if name in RESERVED_ITEMS:
                raise ValueError(f"item name {name!r} is reserved (reserved: {RESERVED_ITEMS})")
            flat = _flatten(tree, f"item {name!r}")
            if flat:  # Orbax cannot store an empty tree; restore rebuilds it from its structure
                args[name] = ocp.args.StandardSave(_nest(flat, f"item {name!r}"))
        record = self._metadata_record(step, items, metadata)
        if data_iter is not None:
            args[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iter)
        args[METADATA_ITEM] = ocp.args.JsonSave(record)
        return self._manager.save(step, args=ocp.args.Composite(**args), force=force)

    def _metadata_record(self, step: int, items: Mapping[str, Any],
                         metadata: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
        taken = {"step", "versions", "items"} & set(metadata)
        if taken:
            raise ValueError(f"metadata keys {sorted(taken)} are filled in by save(); remove them")
        record = _jsonable(metadata, "metadata")
        record.update(step=int(step), versions=library_versions(), items=sorted(items))
        return record

    def wait(self) -> None:
        """Blocks until pending async saves are on disk (and raises their errors)."""
        self._manager.wait_until_finished()

    # -- listing

    def latest_step(self) -> int | None:
        """The newest complete step (a save in progress or killed mid-way is not counted)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def reached_preemption(self, step: int) -> bool:
        """Whether a preemption signal arrived (all processes agree): save, then exit."""
        return self._manager.reached_preemption(step)

    # -- restoring

    def restore(self, step: int | None, abstract_items: Mapping[str, Any],
                data_iter: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restores `abstract_items` (and `data_iter` in place) from `step` (None: latest).

        `abstract_items` maps item names to pytrees whose leaves are `jax.ShapeDtypeStruct`s
        (their shardings say where the arrays go: restoring onto another mesh reshards) or
        arrays. Items of the checkpoint not asked for are not read. Returns (items, metadata).
        """
        self.wait()
        step = self._resolve_step(step)
        step_dir = self.directory / str(step)
        metadata = self._manager.restore(
            step, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()})
        )[METADATA_ITEM]
        stored_items = set(metadata.get("items", []))

        problems: list[str] = []
        expected_flat = {}
        for name, tree in abstract_items.items():
            expected_flat[name] = _flatten(tree, f"abstract item {name!r}")
            if name not in stored_items:
                problems.append(f"item {name!r} is not in the checkpoint "
                                f"(it has: {sorted(stored_items)})")
                continue
            item_dir = step_dir / name  # absent when the item was saved with no arrays
            stored = _stored_tree_metadata(item_dir) if item_dir.exists() else {}
            differences = _tree_differences(stored, expected_flat[name])
            if differences:
                problems += [f"item {name!r}:"] + differences
        if data_iter is not None and not (step_dir / DATA_ITEM).exists():
            problems.append("a data iterator was passed, but this step has no iterator state "
                            "(it was saved without data_iter); pass data_iter=None")
        if problems:
            raise CheckpointMismatchError("\n".join(
                [f"checkpoint step {step} in {self.directory} does not match what is being "
                 "restored (another config or architecture?):"] + problems))

        args = {}
        for name, flat in expected_flat.items():
            if flat:
                abstract = {p: _abstract_leaf(leaf) for p, leaf in flat.items()}
                args[name] = ocp.args.StandardRestore(_nest(abstract, f"item {name!r}"))
        if data_iter is not None:
            args[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._manager.restore(step, args=ocp.args.Composite(**args)) if args else {}

        items = {}
        for name, flat in expected_flat.items():
            restored_flat = _flatten_nested(restored[name]) if flat else {}
            items[name] = jax.tree_util.tree_unflatten(
                jax.tree_util.tree_structure(abstract_items[name]),
                [restored_flat[p] for p in flat])
        return items, metadata

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"no complete checkpoint in {self.directory}; train first, or check the path")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; available steps: {steps}")
        return step

    # -- lifetime

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's threads."""
        # Orbax (0.12) starts the clean-up of leftover temporary directories in a thread when
        # the manager opens and awaits it only at the first save; a manager closed before any
        # save would leave it running into interpreter shutdown, which then prints a traceback.
        cleanup = getattr(self._manager, "_cleanup_tmp_directory_future", None)
        if cleanup is not None:
            cleanup.result()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
