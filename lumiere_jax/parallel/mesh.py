"""The device mesh (data, fsdp, tensor) from a config, and shardings of what lives on it.

A config's `mesh` block gives each axis's size within a slice (ICI; -1 = the rest of the
devices) and, for multi-slice jobs, `mesh.dcn` the sizes across slices (DCN); an axis's total
size is the product. `mesh.rules` holds logical-axis rules that take precedence over
`sharding.DEFAULT_RULES`. The same config runs on one CPU (every axis 1), on 8 forced host
devices in tests and on a pod.

Arrays whose dimension a mesh axis does not divide evenly (an RGB conv's 3 input channels
over fsdp=2) stay unsharded along that dimension: `fit_specs`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from absl import logging
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lumiere_jax.parallel.sharding import DEFAULT_RULES, MESH_AXES, Rules


class MeshError(ValueError):
    """The mesh or batch cannot run the config; the message says what to change."""


# ----------------------------------------------------------------------------------------------
# Sizes.


def parse_mesh_text(text: str) -> dict[str, int]:
    """'data=8,fsdp=8,tensor=1' (the --mesh flag) -> {'data': 8, 'fsdp': 8, 'tensor': 1}."""
    sizes = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        axis, sep, value = item.partition("=")
        try:
            sizes[axis.strip()] = int(value)
        except ValueError:
            sep = ""
        if not sep:
            raise MeshError(f"--mesh {text!r}: {item!r} is not axis=int; write e.g. "
                            "data=8,fsdp=8,tensor=1 (axes: data, fsdp, tensor; -1 = the rest)")
    return sizes


def mesh_text(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{a}={s}" for a, s in sizes.items())


def resolve_mesh_shape(mesh_shape: Mapping[str, int] | None,
                       num_devices: int | None = None) -> dict[str, int]:
    """{'data', 'fsdp', 'tensor'} sizes, -1 replaced by the rest of `num_devices`.

    Missing axes are 1; None means dict(data=-1). `num_devices` defaults to the product of the
    sizes when none is -1 (an abstract mesh, e.g. 64 chips of a pod), else to the local
    jax.device_count().
    """
    shape = dict(mesh_shape) if mesh_shape else {"data": -1}
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"mesh axes {unknown} are unknown; the mesh axes are {MESH_AXES} "
                        "(e.g. --mesh data=8,fsdp=8,tensor=1)")
    sizes = {axis: shape.get(axis, 1) for axis in MESH_AXES}
    bad = {a: s for a, s in sizes.items()
           if not isinstance(s, (int, np.integer)) or isinstance(s, bool) or (s < 1 and s != -1)}
    if bad:
        raise MeshError(f"mesh sizes {bad} must be positive ints, or -1 for 'the rest'")
    rest = [a for a, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise MeshError(f"mesh axes {rest} are all -1; at most one axis can take the rest")
    known = math.prod(s for s in sizes.values() if s != -1)
    if num_devices is None:
        num_devices = jax.device_count() if rest else known
    if rest:
        if num_devices % known:
            raise MeshError(f"mesh {mesh_text(sizes)}: the fixed axes ({known} devices) do not "
                            f"divide the {num_devices} devices; choose sizes whose product "
                            f"divides {num_devices}")
        sizes[rest[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise MeshError(f"mesh {mesh_text(sizes)} has {math.prod(sizes.values())} devices, but "
                        f"{num_devices} are to be used; the axis sizes must multiply to "
                        f"{num_devices} (or set one axis to -1)")
    return sizes


def check_batch(batch_size: int, sizes: Mapping[str, int]) -> int:
    """The per-device batch; the global batch must split evenly over data * fsdp."""
    shards = sizes["data"] * sizes["fsdp"]
    if batch_size % shards:
        raise MeshError(
            f"train.batch_size={batch_size} is not divisible by data*fsdp = "
            f"{sizes['data']}*{sizes['fsdp']} = {shards} (the batch is split over both); use a "
            f"multiple of {shards}, e.g. "
            f"--config.train.batch_size={shards * max(1, batch_size // shards)}")
    return batch_size // shards


def _plain(block: Mapping[str, Any]) -> dict[str, Any]:
    return block.to_dict() if hasattr(block, "to_dict") else dict(block)


def mesh_config_parts(mesh_config: Mapping[str, Any] | None
                      ) -> tuple[dict[str, int], dict[str, int], Rules]:
    """(ICI sizes as given, DCN sizes, rules) of a config's `mesh` block (None: all on data)."""
    block = _plain(mesh_config or {})
    dcn = _plain(block.pop("dcn", None) or {})
    extra_rules = tuple(tuple(rule) for rule in block.pop("rules", None) or ())
    unknown_dcn = sorted(set(dcn) - set(MESH_AXES))
    if unknown_dcn:
        raise MeshError(f"mesh.dcn axes {unknown_dcn} are unknown; the mesh axes are {MESH_AXES}")
    bad_dcn = {a: s for a, s in dcn.items() if not isinstance(s, int) or s < 1}
    if bad_dcn:
        raise MeshError(f"mesh.dcn sizes {bad_dcn} must be positive ints (slices per axis)")
    for rule in extra_rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise MeshError(f"mesh.rules entry {rule!r} is not (logical_name, mesh_axis)")
    dcn_sizes = {axis: dcn.get(axis, 1) for axis in MESH_AXES}
    return block, dcn_sizes, extra_rules + tuple(DEFAULT_RULES)


def make_mesh(mesh_config: Mapping[str, Any] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) Mesh of a config's `mesh` block over `devices` (default: all).

    Within a slice, devices are laid out by `mesh_utils.create_device_mesh` (ICI topology
    aware on TPU); with `mesh.dcn`, slices (TPU slices, or processes where devices have no
    slice index) are laid out by `create_hybrid_device_mesh`, so only the axes named in dcn
    cross the slow network.
    """
    devices = list(jax.devices() if devices is None else devices)
    ici, dcn, _ = mesh_config_parts(mesh_config)
    slices = math.prod(dcn.values())
    wanted = slices * math.prod(ici.get(a, 1) for a in MESH_AXES)
    if -1 not in ici.values() and 0 < wanted < len(devices):
        if jax.process_count() > 1:
            raise MeshError(f"mesh {mesh_text(ici)} uses {wanted} of the {len(devices)} devices; "
                            "with several processes the mesh must span them all (set one axis "
                            "to -1)")
        logging.info("mesh %s uses the first %d of %d devices", mesh_text(ici), wanted,
                     len(devices))
        devices = devices[:wanted]
    if len(devices) % slices:
        raise MeshError(f"mesh.dcn {mesh_text(dcn)} asks for {slices} slices, which do not divide "
                        f"the {len(devices)} devices")
    sizes = resolve_mesh_shape(ici, len(devices) // slices)
    shape = [sizes[a] for a in MESH_AXES]
    if slices == 1:
        if len(devices) == 1:
            grid = np.array(devices).reshape(shape)
        else:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    else:
        by_process = not hasattr(devices[0], "slice_index")
        grid = mesh_utils.create_hybrid_device_mesh(
            shape, [dcn[a] for a in MESH_AXES], devices, process_is_granule=by_process,
            allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES)


def data_mesh(devices: Sequence[jax.Device]) -> Mesh:
    """A (data, fsdp, tensor) = (n, 1, 1) mesh over `devices` in the given order, for work
    split over examples alone (sampling): no collective runs between the devices, so their
    layout needs no topology, and any subset of a host's devices will do."""
    devices = list(devices)
    if not devices:
        raise MeshError("a data mesh needs at least one device")
    return Mesh(np.array(devices, dtype=object).reshape(len(devices), 1, 1), MESH_AXES)


def mesh_rules(mesh_config: Mapping[str, Any] | None) -> Rules:
    """The logical-axis rules of a config's mesh block: its own first, then the defaults."""
    return mesh_config_parts(mesh_config)[2]


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    return {axis: int(mesh.shape[axis]) for axis in MESH_AXES}


# ----------------------------------------------------------------------------------------------
# Specs and shardings.


def is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def divisible_spec(shape: tuple[int, ...], spec: PartitionSpec,
                   sizes: Mapping[str, int]) -> PartitionSpec:
    """`spec` with every dimension the mesh does not divide evenly left unsharded: jit refuses
    uneven input shardings (e.g. an RGB conv's 3 input channels over fsdp=2)."""
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    fitted = []
    for dim, entry in zip(shape, entries):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        fitted.append(entry if dim % math.prod(sizes[a] for a in axes) == 0 else None)
    return PartitionSpec(*fitted)


def fit_specs(tree, specs, sizes: Mapping[str, int]):
    """divisible_spec for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda spec, x: divisible_spec(x.shape, spec, sizes), specs, tree,
                        is_leaf=is_spec)


def opt_state_specs(tx: optax.GradientTransformation, opt_state, param_specs):
    """Specs of an optimizer state: moments follow their parameter, counters replicate."""
    return optax.tree_map_params(tx, lambda _, spec: spec, opt_state, param_specs,
                                 transform_non_params=lambda _: PartitionSpec(),
                                 is_leaf=is_spec)


def to_shardings(specs, mesh: Mesh):
    """NamedShardings on `mesh` for a tree of PartitionSpecs."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=is_spec)


def with_shardings(tree, specs, mesh: Mesh):
    """ShapeDtypeStructs of `tree`'s leaves placed by `specs` on `mesh` (for AOT lowering)."""
    return jax.tree.map(
        lambda spec, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec)),
        specs, tree, is_leaf=is_spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_spec(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """Examples split over the mesh axes the rules give the logical 'batch' axis."""
    for name, axes in rules:
        if name == "batch":
            return PartitionSpec(axes)
    return PartitionSpec(("data", "fsdp"))


def host_replicated(tree, mesh: Mesh):
    """Host values (the same on every process) as arrays replicated over `mesh`.

    Works with several processes, where a plain device_put of a numpy array cannot say that
    every process holds the same value.
    """
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def fetch(tree):
    """Host numpy values of arrays that may span other processes (gathered when they do)."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)


def place_like(values, like):
    """`values` (host or device arrays, the same on every process) placed with the shardings
    of the arrays in `like` (same tree structure)."""

    def put(value, target):
        host = np.asarray(jax.device_get(value))
        if host.shape != target.shape:
            raise ValueError(f"cannot place an array of shape {host.shape} where one of shape "
                             f"{target.shape} lives")
        host = host.astype(target.dtype, copy=False)
        return jax.make_array_from_callback(host.shape, target.sharding, lambda i: host[i])

    return jax.tree.map(put, values, like)


def local_value(x: jax.Array) -> np.ndarray:
    """The host value of a replicated (or single-process) array, without a collective."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(x.addressable_data(0))
