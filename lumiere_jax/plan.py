"""`lumiere plan`: what a config costs, worked out abstractly, before any chip is rented.

For a config and a mesh (data, fsdp, tensor) this reports, without allocating the model:
  - parameters: total, trainable (train.trainable regex), frozen, per top-level group
    (text_encoder, net/unet, net/temporal);
  - FLOPs of one training step (XLA's cost analysis of the lowered, unsharded train step, for
    the global batch);
  - bytes per device: parameters, gradients, optimizer state, EMA and the batch from their
    abstract shapes and the sharding rules (lumiere_jax.parallel.sharding), and activations
    from one of two sources, named in the report:
      * "compiled": the train step compiled on a real mesh of local devices; XLA's memory
        analysis gives the per-device temporary bytes (activations, gradients and update
        temporaries together). Used when the mesh fits in the local devices and the model is
        small enough to compile quickly (the tiny configs).
      * "estimate": the bytes of the residuals the forward pass saves for the backward pass
        (the values between jax.vjp's forward and backward halves, from the jaxpr), traced
        for one device's share of the batch. It follows the model's jax.checkpoint (remat)
        policies, since those decide what vjp saves. An estimate, not a bound: it leaves out
        one op's transient buffers and the activation gradients of the backward pass (which
        add), and XLA's fusions recompute cheap elementwise values instead of storing them
        (which subtracts). On a tiny config on one device it was 14.7 MB against a compiled
        temp of 11.3 MB (which also holds the gradients and update temporaries).
FLOPs: the lowered (unoptimised, unpartitioned) program's count; the compiled program of one
device counted 3% more on one device and, times 8, 10% more on a (2, 2, 2) mesh (work that
sharding replicates). With compiling, the report has both (compiled_memory.flops_per_device).
A mesh whose per-device total exceeds the device memory is refused (PlanDoesNotFitError,
which carries the report) with what does not fit and what to change.

The model is built with `nnx.eval_shape` (models.denoiser.abstract_denoiser).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jex_core
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from lumiere_jax.diffusion.schedules import Diffusion
from lumiere_jax.models.denoiser import Denoiser, abstract_denoiser
from lumiere_jax.parallel.mesh import (
    MeshError,
    check_batch,
    fit_specs,
    is_spec,
    make_mesh,
    mesh_config_parts,
    mesh_rules,
    mesh_text,
    parse_mesh_text,  # noqa: F401  (the CLI's --mesh flag)
    resolve_mesh_shape,
    with_shardings,
)
from lumiere_jax.parallel.sharding import logical_specs
from lumiere_jax.train.trainer import (
    TrainState,
    make_loss_fn,
    make_optimizer,
    make_train_step,
    program_flops,
    split_model,
    state_specs,
)

GIB = 1024**3
# Above this many parameters the train step is not compiled for the memory analysis (XLA on a
# CPU would take minutes and the memory of the whole unsharded program); the estimate is used.
COMPILE_PARAM_LIMIT = 50_000_000


PlanError = MeshError  # the mesh or batch cannot run the config; the message says what to change


class PlanDoesNotFitError(PlanError):
    """The per-device total exceeds the device memory. `report` holds the full plan."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


# ----------------------------------------------------------------------------------------------
# Mesh and batch.


# ----------------------------------------------------------------------------------------------
# The abstract model and train-step arguments.


def parameter_group(path: tuple) -> str:
    """'text_encoder', 'net/unet', 'net/temporal' (STUNet) or 'net' (image U-Net)."""
    parts = [str(p) for p in path]
    if parts[0] == "net" and len(parts) > 1 and parts[1] in ("unet", "temporal"):
        return "/".join(parts[:2])
    return parts[0]


def parameter_counts(model: Denoiser, trainable: nnx.State) -> dict[str, Any]:
    """Counts per group and in total, trainable and frozen."""
    trainable_paths = {path for path, _ in nnx.to_flat_state(trainable)}
    groups: dict[str, dict[str, int]] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        group = groups.setdefault(parameter_group(path), {"total": 0, "trainable": 0})
        group["total"] += var.size
        group["trainable"] += var.size if path in trainable_paths else 0
    total = sum(g["total"] for g in groups.values())
    n_trainable = sum(g["trainable"] for g in groups.values())
    return {"total": total, "trainable": n_trainable, "frozen": total - n_trainable,
            "groups": groups}


def video_shape(config: ConfigDict) -> tuple[int, ...]:
    """One example's pixels: [t, h, w, 3] (STUNet) or [h, w, 3] (image U-Net)."""
    world = config.world
    image = (world.height, world.width, 3)
    if config.model.kind == "unet":
        return image
    frames = int(config.data.get("clip_frames", 0)) or world.num_frames
    return (frames,) + image


def abstract_batch(config: ConfigDict, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The trainer's batch, as shapes: pixels, caption ids and mask, corrupt-record count."""
    length = config.text.max_length
    return {"pixels": jax.ShapeDtypeStruct((batch_size,) + video_shape(config), jnp.float32),
            "ids": jax.ShapeDtypeStruct((batch_size, length), jnp.int32),
            "mask": jax.ShapeDtypeStruct((batch_size, length), jnp.bool_),
            "corrupt_skipped": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}


def null_tokens(config: ConfigDict) -> dict[str, jax.Array]:
    """Stand-in tokens of the empty caption: costs do not depend on token values, and the
    paper config's SentencePiece vocabulary need not be present to plan."""
    length = config.text.max_length
    return {"ids": jnp.zeros((1, length), jnp.int32),
            "mask": jnp.zeros((1, length), bool).at[:, 0].set(True)}


def _nbytes(x) -> int:
    return int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


def shard_bytes(shape: tuple[int, ...], dtype, spec: PartitionSpec,
                sizes: Mapping[str, int]) -> int:
    """Bytes of one device's shard of an array (spec as from divisible_spec)."""
    shard = list(shape)
    for i, entry in enumerate(spec):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        shard[i] = -(-shape[i] // math.prod(sizes[a] for a in axes))
    return int(np.prod(shard)) * jnp.dtype(dtype).itemsize


def tree_shard_bytes(tree, specs, sizes: Mapping[str, int]) -> int:
    """Per-device bytes of a tree of arrays/ShapeDtypeStructs with a matching tree of specs."""
    leaves = jax.tree.leaves(tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=is_spec)
    if len(leaves) != len(spec_leaves):
        raise ValueError(f"{len(leaves)} arrays but {len(spec_leaves)} partition specs")
    return sum(shard_bytes(x.shape, x.dtype, s, sizes) for x, s in zip(leaves, spec_leaves))


def lowered_flops(lowered: jax.stages.Lowered) -> float:
    """FLOPs of a lowered (not compiled) program, from XLA's HLO cost analysis."""
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX returned one dict per device program
        cost = cost[0]
    if not cost or "flops" not in cost:
        raise RuntimeError(f"XLA's cost analysis gave no FLOP count ({cost!r})")
    return float(cost["flops"])


def _scalar_loss(loss_fn):
    return lambda *args: loss_fn(*args)[0]


def saved_residuals(loss_fn, params, frozen, batch, rng) -> list[jax.ShapeDtypeStruct]:
    """Arrays the forward pass keeps for the backward pass (gradients w.r.t. `params` only).

    They are the outputs of a jaxpr that returns jax.vjp's backward function; outputs that are
    the inputs themselves (parameters, the batch) or constants hold no new memory and are left
    out, and each array counts once.
    """

    def forward(params, frozen, batch, rng):
        _, backward = jax.vjp(lambda p: loss_fn(p, frozen, batch, rng), params)
        return backward

    closed = jax.make_jaxpr(forward)(params, frozen, batch, rng)
    not_new = set(closed.jaxpr.invars) | set(closed.jaxpr.constvars)
    seen, residuals = set(), []
    for var in closed.jaxpr.outvars:
        if isinstance(var, jex_core.Literal) or var in not_new or var in seen:
            continue
        seen.add(var)
        residuals.append(jax.ShapeDtypeStruct(var.aval.shape, var.aval.dtype))
    return residuals


# ----------------------------------------------------------------------------------------------
# The plan.


def plan(config: ConfigDict, mesh_shape: Mapping[str, int] | None = None,
         device_memory_gib: float | None = None, *, num_devices: int | None = None,
         compile: bool | None = None, rules=None) -> dict[str, Any]:
    """Parameters, FLOPs per training step and per-device memory of `config` on a mesh.

    mesh_shape: {'data', 'fsdp', 'tensor'} sizes (-1 = the rest); None takes config.mesh if
      the config has one, else all local devices on 'data'.
    device_memory_gib: memory of one device; when given, a plan that does not fit raises
      PlanDoesNotFitError (its `.report` is this function's result).
    num_devices: devices the mesh must use (default: see resolve_mesh_shape).
    compile: compile the sharded train step for XLA's memory analysis (needs the mesh's
      devices locally); None = when possible and the model has at most COMPILE_PARAM_LIMIT
      parameters. Otherwise activations are the saved-residual estimate.
    Raises PlanError for a bad mesh or a batch that data*fsdp does not divide.
    """
    if mesh_shape is None and "mesh" in config:
        ici, dcn, _ = mesh_config_parts(config.mesh)
        mesh_shape = {a: s if s == -1 else s * dcn[a] for a, s in ici.items()}
    if rules is None:
        rules = mesh_rules(config.get("mesh"))
    sizes = resolve_mesh_shape(mesh_shape, num_devices)
    n_devices = math.prod(sizes.values())
    batch_size = config.train.batch_size
    per_device_batch = check_batch(batch_size, sizes)

    model = abstract_denoiser(config)
    graphdef, params, frozen = split_model(model, config.train.trainable)
    counts = parameter_counts(model, params)
    tx = make_optimizer(config.train)
    opt_state = jax.eval_shape(tx.init, params)
    diffusion = Diffusion.from_config(config.diffusion)
    tokens = null_tokens(config)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, opt_state, params)
    batch = abstract_batch(config, batch_size)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    step_fn = make_train_step(graphdef, tx, diffusion, config.train, tokens)

    flops = lowered_flops(step_fn.lower(state, frozen, batch, rng))

    specs = fit_specs(state, state_specs(params, opt_state, tx, rules), sizes)
    frozen_specs = fit_specs(frozen, logical_specs(frozen, rules), sizes)
    batch_specs = {k: PartitionSpec(("data", "fsdp")) for k in batch}
    rows = [
        ("trainable params", tree_shard_bytes(params, specs.params, sizes), "abstract shapes"),
        ("frozen params", tree_shard_bytes(frozen, frozen_specs, sizes), "abstract shapes"),
        ("optimizer state", tree_shard_bytes(opt_state, specs.opt_state, sizes),
         "abstract shapes"),
        ("EMA", tree_shard_bytes(params, specs.ema, sizes), "abstract shapes"),
        ("batch", tree_shard_bytes(batch, batch_specs, sizes), "abstract shapes"),
    ]

    can_compile = n_devices <= jax.device_count()
    if compile is None:
        compile = can_compile and counts["total"] <= COMPILE_PARAM_LIMIT
    elif compile and not can_compile:
        raise PlanError(f"cannot compile for mesh {mesh_text(sizes)}: it needs {n_devices} "
                        f"devices and {jax.device_count()} are local; plan without compiling")
    memory: dict[str, Any] = {}
    if compile:
        mesh = make_mesh(sizes, jax.devices()[:n_devices])
        args = (with_shardings(state, specs, mesh), with_shardings(frozen, frozen_specs, mesh),
                with_shardings(batch, batch_specs, mesh),
                jax.ShapeDtypeStruct(rng.shape, rng.dtype,
                                     sharding=NamedSharding(mesh, PartitionSpec())))
        compiled = step_fn.lower(*args).compile()
        analysis = compiled.memory_analysis()
        memory = {key: int(getattr(analysis, f"{key}_size_in_bytes"))
                  for key in ("argument", "output", "alias", "temp", "generated_code")}
        # The optimised, partitioned program of one device (collectives included).
        memory["flops_per_device"] = program_flops(compiled)
        rows.append(("activations + gradients + temporaries", memory["temp"],
                     "compiled memory analysis"))
    else:
        rows.append(("gradients", tree_shard_bytes(params, specs.params, sizes),
                     "abstract shapes"))
    loss_fn = _scalar_loss(make_loss_fn(graphdef, diffusion, config.train, tokens))
    # One device's program sees its own examples: trace the residuals of the per-device batch.
    residuals = saved_residuals(loss_fn, params, frozen,
                                abstract_batch(config, per_device_batch), rng)
    residual_bytes = sum(_nbytes(r) for r in residuals)
    if not compile:
        rows.append(("activations (saved residuals)", residual_bytes,
                     "estimate (traced residuals)"))

    total = sum(r[1] for r in rows)
    report = {
        "config": {"model": config.model.kind, "text": config.text.preset,
                   "video": video_shape(config), "trainable": config.train.trainable,
                   "dtype": config.model.unet.get("dtype", "float32")},
        "mesh": sizes, "num_devices": n_devices, "batch_size": batch_size,
        "per_device_batch": per_device_batch,
        "params": counts,
        "flops_per_step": flops, "flops_per_step_per_device": flops / n_devices,
        "per_device": [{"name": n, "bytes": b, "source": s} for n, b, s in rows],
        "per_device_total": total,
        "activations_source": "compiled" if compile else "estimate",
        "residual_estimate_bytes": residual_bytes,
        "compiled_memory": memory,
        "device_memory_bytes": None if device_memory_gib is None else int(device_memory_gib * GIB),
        "fits": None,
    }
    if device_memory_gib is not None:
        report["fits"] = total <= report["device_memory_bytes"]
        if not report["fits"]:
            raise PlanDoesNotFitError(_does_not_fit_message(report), report)
    return report


def _does_not_fit_message(report: dict[str, Any]) -> str:
    sizes = report["mesh"]
    parts = sorted(report["per_device"], key=lambda r: -r["bytes"])
    bf16 = ("" if report["config"]["dtype"] == "bfloat16"
            else "bfloat16 compute (model.unet.dtype), ")
    largest = ", ".join(f"{r['name']} {r['bytes'] / GIB:.1f} GiB" for r in parts[:3])
    return (
        f"does not fit: {report['per_device_total'] / GIB:.1f} GiB per device on mesh "
        f"{mesh_text(sizes)} exceeds the {report['device_memory_bytes'] / GIB:.1f} GiB of device "
        f"memory (largest: {largest}). To fit: a larger fsdp axis (parameters, gradients, "
        f"optimizer state and EMA are split over it: now fsdp={sizes['fsdp']}), a smaller "
        f"per-device batch (now {report['per_device_batch']}: lower train.batch_size or add "
        f"data/fsdp devices), {bf16}rematerialisation of the blocks (jax.checkpoint: "
        f"without it every block's activations wait for the backward pass; the estimate follows "
        f"the model's remat policy).")


def format_plan(report: dict[str, Any]) -> str:
    """The plan as a plain-text table."""
    p = report["params"]
    lines = [
        f"config: {report['config']['model']} video {report['config']['video']}, text "
        f"{report['config']['text']}, trainable {report['config']['trainable']!r}",
        f"mesh: {mesh_text(report['mesh'])} ({report['num_devices']} devices), batch "
        f"{report['batch_size']} ({report['per_device_batch']} per device)",
        "",
        f"{'parameters':<22}{'total':>16}{'trainable':>16}{'frozen':>16}",
    ]
    for name, g in sorted(p["groups"].items()):
        lines.append(f"{name:<22}{g['total']:>16,}{g['trainable']:>16,}"
                     f"{g['total'] - g['trainable']:>16,}")
    lines.append(f"{'all':<22}{p['total']:>16,}{p['trainable']:>16,}{p['frozen']:>16,}")
    lines += [
        "",
        f"FLOPs per training step: {report['flops_per_step']:.3e} "
        f"({report['flops_per_step_per_device']:.3e} per device, XLA cost analysis)",
        "",
        f"{'per device':<40}{'GiB':>10}  source",
    ]
    for r in report["per_device"]:
        lines.append(f"{r['name']:<40}{r['bytes'] / GIB:>10.3f}  {r['source']}")
    lines.append(f"{'total':<40}{report['per_device_total'] / GIB:>10.3f}")
    if report["activations_source"] == "compiled":
        lines.append(f"(saved-residual estimate of activations for comparison: "
                     f"{report['residual_estimate_bytes'] / GIB:.3f} GiB)")
    if report["device_memory_bytes"] is not None:
        verdict = "fits" if report["fits"] else "DOES NOT FIT"
        lines.append(f"device memory {report['device_memory_bytes'] / GIB:.1f} GiB: {verdict}")
    return "\n".join(lines)
