"""Logical-axis sharding: models name their parameter axes, configs map names to mesh axes.

Every parameter in the project is created with `partitioned(init, axes)`, which records the
logical names (e.g. ("embed", "mlp")) as metadata without sharding eagerly. A mesh and a rule
list then turn those names into `NamedSharding`s, so one model definition runs on a CPU, on 8
forced host devices and on a pod, with only the rules in the config changing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes, or None = replicated). First match wins.
# Weights: their model dimension over fsdp, their wide dimension over tensor. Activations: the
# batch over data+fsdp. Small vectors (norm scales, biases) stay replicated on purpose.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("relpos_buckets", None),
    ("norm", None),
    ("frames", None),
    ("height", None),
    ("width", None),
    ("kernel", None),
)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def partitioned(init, *axes: str | None):
    """Wraps an initializer so its parameter carries logical axis names (no eager sharding)."""
    return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


def logical_specs(state, rules: Rules = DEFAULT_RULES):
    """PartitionSpecs over mesh axes for a state (or abstract state) of annotated parameters."""
    with nn.logical_axis_rules(tuple(rules)):
        return nnx.get_partition_spec(state)


def named_shardings(state, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings for every leaf of `state`, from its logical names and `rules`."""
    specs = logical_specs(state, rules)
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec), specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """Context for tracing a model on `mesh`: `constrain_batch` pins activations there."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(tuple(rules)):
        yield


def constrain_batch(x: jax.Array) -> jax.Array:
    """Pins an activation [B, ...] to the batch sharding: B over the mesh axes of the logical
    'batch' rule, every other dimension whole. A no-op outside `activation_sharding`.

    Why: left free, XLA's partitioner (Shardy and GSPMD alike, jax 0.10) shards the U-Net's
    activations over channels too, and on meshes with data, fsdp and tensor all > 1 it then
    partitions the backward of GroupNorm -> FiLM wrongly: gradients off by ~100% on (2,2,2)
    while the loss is right. Pinned at every convolution's output and GroupNorm's input, the
    gradients equal the one-device ones. Weights keep their fsdp/tensor shardings (gathered
    per layer, as FSDP does); only the activations' layout is fixed.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    rules = nn.get_logical_axis_rules() or DEFAULT_RULES
    axes = next((target for name, target in rules if name == "batch"), None)
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    # Axes made manual by a shard_map (data-parallel sampling) are already split: each device
    # holds its own examples there, and there is nothing to pin.
    axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1
                 and a not in mesh.manual_axes)
    if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(axes, *[None] * (x.ndim - 1)))


def unannotated_params(state) -> list[str]:
    """Paths of parameters with more than one element and no logical axis names.

    Such a parameter would be silently replicated on every device; tests assert this is empty.
    """
    missing = []
    for path, var in nnx.to_flat_state(state):
        if not isinstance(var, nnx.Param):
            continue
        names = var.get_metadata().get("out_sharding")
        if getattr(var, "size", 1) > 1 and not names:
            missing.append("/".join(map(str, path)))
    return missing
