"""The trainer: one jitted train step, read top to bottom, and the loop around it.

`train(config, workdir)` keeps everything of a run in `workdir`: the resolved config, Orbax
checkpoints (trainable params, optimizer state, EMA, data iterator), metrics.csv, TensorBoard
events and sample grids. Started again on the same workdir it resumes from the latest
checkpoint, refusing a config that differs in anything but the run length.

Which parameters train is a regex over parameter paths (`train.trainable`, big_vision
style): '.*' trains everything (stage 0), 'temporal' only the STUNet's new layers (stage 1).
The train step differentiates with respect to the trainable parameters only, so frozen
weights get no gradient computation at all, no optimizer state, and stay bit-identical.

Scale: the mesh comes from `config.mesh` (lumiere_jax.parallel.mesh; default all devices on
'data'). Parameters are traced abstractly and initialised by a jitted function whose outputs
already carry their shardings, so no array is ever whole on one device. The step is compiled
ahead of time with explicit input/output shardings and a donated state; its cost analysis
gives the FLOPs behind the per-step FLOP/s metric. With several processes
(`jax.distributed`), each reads its own slice of the data, all of them checkpoint together,
and only process 0 writes metrics and sample grids. SIGTERM saves at the next step boundary
that every process agrees on, then returns (train.preemption).
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx
from ml_collections import ConfigDict
from tqdm import tqdm

from lumiere_jax import config as config_lib
from lumiere_jax.data.pipeline import global_batch, training_dataset, world_from_config
from lumiere_jax.data.synthetic import ShapesSource
from lumiere_jax.diffusion.losses import diffusion_loss, drop_condition
from lumiere_jax.diffusion.masks import MASK_KINDS, check_mask_kinds, masked_video, random_masks
from lumiere_jax.diffusion.schedules import Diffusion
from lumiere_jax.diffusion.ssr import downsample_video, ssr_loss
from lumiere_jax.eval.motion_word import MotionWordProbe
from lumiere_jax.generate import Generator, from_uint8, sample_device_count
from lumiere_jax.models.denoiser import Denoiser, build_denoiser, denoiser_builder
from lumiere_jax.models.ssr import SSR
from lumiere_jax.models.stunet import STUNet
from lumiere_jax.parallel.distributed import barrier
from lumiere_jax.parallel.mesh import (
    MeshError,
    batch_spec,
    check_batch,
    fit_specs,
    host_replicated,
    local_value,
    make_mesh,
    mesh_rules,
    mesh_sizes,
    opt_state_specs,
    place_like,
    replicated,
    to_shardings,
)
from lumiere_jax.parallel.sharding import (
    DEFAULT_RULES,
    Rules,
    activation_sharding,
    logical_specs,
)
from lumiere_jax.text.encoder import NULL_PROMPT
from lumiere_jax.text.tokenizers import make_tokenizer
from lumiere_jax.train.checkpoint import (
    Checkpointer,
    FrozenRef,
    read_frozen,
    tree_checksum,
    write_frozen,
)
from lumiere_jax.train.export import inflate_from_export
from lumiere_jax.train.metrics import MetricsWriter
from lumiere_jax.train.preemption import PreemptionGuard

# Keys that may change when a run is resumed (e.g. to train it for longer, or on another mesh).
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.ckpt_every", "train.sample_every",
                     "train.probe_every", "train.probe_logsnrs", "train.progress", "sample", "eval",
                     "mesh")
# Where train.probe_every probes by default (train.probe_logsnrs): the motion-word gap where
# only the caption can place the object, and where the noisy clip starts to show it (README
# "Stage 1"). Adding 0 and 2 shows whether the fine levels are healthy (the true caption's error).
PROBE_LOGSNRS = (-8.0, -4.0)
PROBE_CLIPS = 32


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; the last good checkpoint is left untouched."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # trainable parameters
    opt_state: Any
    ema: nnx.State  # exponential moving average of `params`, used for sampling


def trainable_filter(pattern: str):
    """An nnx filter: the parameters whose path ('net/temporal/...') matches `pattern`."""
    regex = re.compile(pattern)
    return lambda path, var: (isinstance(var, nnx.Param)
                              and regex.search("/".join(map(str, path))) is not None)


def make_optimizer(train: ConfigDict) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay, after global-norm gradient clipping.

    The decay runs over train.decay_steps (0: over train.steps), so a run can be stopped
    early and resumed, or extended, without changing its learning-rate curve.
    """
    horizon = train.get("decay_steps") or train.steps
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train.lr, warmup_steps=train.warmup_steps,
        decay_steps=max(horizon, train.warmup_steps + 1),
        end_value=train.lr * train.end_lr_factor)
    return optax.chain(
        optax.clip_by_global_norm(train.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=train.weight_decay))


def ema_decay(step: jax.Array, decay: float) -> jax.Array:
    """EMA decay warmed up as (1 + step) / (10 + step), so early averages are not stale."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_loss_fn(graphdef: nnx.GraphDef, diffusion: Diffusion, train: ConfigDict,
                 null_tokens: dict[str, jax.Array]):
    """(params, frozen, batch, rng) -> (loss, aux): the denoising loss with caption dropout.

    For a conditional STUNet (model.temporal.cond_channels), every clip also gets a random
    mask of the kinds in train.mask_kinds (diffusion.masks) and the masked clip as input;
    its known pixels weigh train.known_weight times the others in the loss.
    For an SSR model, the SSR loss: its low-res condition is made from the batch's clips
    (downsampled, then noise-augmented at levels drawn from train.aug_range).
    """
    aug_range = tuple(train.get("aug_range", (0.0, 0.5)))
    mask_kinds = check_mask_kinds(train.get("mask_kinds", MASK_KINDS))
    known_weight = float(train.get("known_weight", 1.0))
    if not known_weight > 0:
        raise ValueError(f"train.known_weight must be > 0 (the loss weight of known pixels "
                         f"relative to the rest), got {known_weight}")

    def loss_fn(params, frozen, batch, rng):
        model: Denoiser = nnx.merge(graphdef, params, frozen)
        drop_rng, loss_rng = jax.random.split(rng)
        tokens = drop_condition({"ids": batch["ids"], "mask": batch["mask"]}, null_tokens,
                                drop_rng, train.cond_drop)
        cond = model.encode_text(tokens["ids"], tokens["mask"])
        weights = None  # per-pixel loss weights; None: uniform
        if isinstance(model.net, STUNet) and model.net.cfg.cond_channels:
            # The conditional variant: each clip with a random mask of its known pixels.
            mask_rng, loss_rng = jax.random.split(loss_rng)
            masks = random_masks(mask_rng, batch["pixels"].shape[:4], mask_kinds)
            cond = {**cond, "masked": masked_video(batch["pixels"], masks)}
            if known_weight != 1.0:
                # Copying the known pixels is a small part of a uniform loss (a first frame is
                # 1/16 of a clip); weighting them up makes it count.
                weights = 1.0 + (known_weight - 1.0) * masks
        if isinstance(model.net, SSR):
            return ssr_loss(model, batch["pixels"], cond, loss_rng, diffusion,
                            scale=model.net.cfg.scale, aug_range=aug_range,
                            residual=model.net.cfg.residual,
                            residual_base=model.net.cfg.residual_base)
        return diffusion_loss(model, batch["pixels"], cond, loss_rng, diffusion, mask=weights)

    return loss_fn


def microbatches(x: jax.Array, k: int) -> jax.Array:
    """[B, ...] -> [k, B/k, ...] with microbatch i = examples i, i+k, i+2k, ...

    Interleaved, so each device's contiguous share of a batch sharded on dim 0 holds an equal
    part of every microbatch and the split moves no data between devices.
    """
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    diffusion: Diffusion, train: ConfigDict, null_tokens: dict[str, jax.Array],
                    *, shardings: tuple | None = None, rules: Rules = DEFAULT_RULES):
    """(state, frozen, batch, rng) -> (state, metrics): one optimizer step on one batch.

    With train.grad_accum = k > 1 the batch is split into k microbatches whose gradients are
    averaged (microbatch i uses the step's RNG folded with i) before one update.
    `shardings` = (state, frozen, batch, replicated) shardings: the jitted step then takes and
    returns exactly those, and donates the state; the model's activations are then pinned to
    the batch sharding of `rules` (parallel.sharding.constrain_batch says why).
    """
    loss_fn = make_loss_fn(graphdef, diffusion, train, null_tokens)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    accum = int(train.get("grad_accum", 1))

    def loss_and_grads(params, frozen, batch, rng):
        if accum == 1:
            (loss, _), grads = grad_fn(params, frozen, batch, rng)
            return loss, grads

        def add_microbatch(carry, xs):
            index, micro = xs
            (loss, _), grads = grad_fn(params, frozen, micro, jax.random.fold_in(rng, index))
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        micro = jax.tree.map(lambda x: microbatches(x, accum), batch)
        (loss, grads), _ = jax.lax.scan(add_microbatch, zero, (jnp.arange(accum), micro))
        return loss / accum, jax.tree.map(lambda g: g / accum, grads)

    def train_step(state: TrainState, frozen: nnx.State, batch: dict, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)  # per-step RNG from the step: exact resume
        if shardings is None:
            loss, grads = loss_and_grads(state.params, frozen, batch, rng)
        else:
            with activation_sharding(shardings[-1].mesh, rules):
                loss, grads = loss_and_grads(state.params, frozen, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay(state.step, train.ema_decay)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
                   "param_norm": optax.global_norm(params)}
        return TrainState(state.step + 1, params, opt_state, ema), metrics

    if shardings is None:
        return jax.jit(train_step, donate_argnums=0)
    state_sh, frozen_sh, batch_sh, repl = shardings
    return jax.jit(train_step, in_shardings=(state_sh, frozen_sh, batch_sh, repl),
                   out_shardings=(state_sh, repl), donate_argnums=0)


def state_specs(params: nnx.State, opt_state, tx: optax.GradientTransformation,
                rules: Rules) -> TrainState:
    """PartitionSpecs of a TrainState from the logical rules: optimizer moments and the EMA
    follow their parameter, counters replicate."""
    param_specs = logical_specs(params, rules)
    return TrainState(jax.sharding.PartitionSpec(), param_specs,
                      opt_state_specs(tx, opt_state, param_specs), param_specs)


def init_sharded(config: ConfigDict, mesh: jax.sharding.Mesh, rules: Rules
                 ) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable params, frozen state) of the config's model, each array created by
    a jitted initialiser directly in its sharding on `mesh` (never whole on one device)."""
    build, pattern = denoiser_builder(config), config.train.trainable
    graphdef, params, frozen = split_model(nnx.eval_shape(build), pattern)
    sizes = mesh_sizes(mesh)
    specs = (fit_specs(params, logical_specs(params, rules), sizes),
             fit_specs(frozen, logical_specs(frozen, rules), sizes))
    init = jax.jit(lambda: split_model(build(), pattern)[1:],
                   out_shardings=to_shardings(specs, mesh))
    params, frozen = init()
    return graphdef, params, frozen


def init_state(params: nnx.State, tx: optax.GradientTransformation,
               mesh: jax.sharding.Mesh) -> TrainState:
    """Step 0: optimizer state sharded like the parameters it tracks, EMA a copy of them."""
    opt_abstract = jax.eval_shape(tx.init, params)
    param_specs = jax.tree.map(lambda x: x.sharding.spec, params)
    opt_sh = to_shardings(opt_state_specs(tx, opt_abstract, param_specs), mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    return TrainState(host_replicated(np.zeros((), np.int32), mesh), params, opt_state,
                      jax.tree.map(jnp.copy, params))


def shardings_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def program_flops(stage: jax.stages.Lowered | jax.stages.Compiled) -> float:
    """FLOPs by XLA's cost analysis (0 if unknown). Of a Lowered program: the whole (global)
    computation as written, the same count on every backend that gives one (the CPU's does,
    the GPU client's gave none); of a Compiled one: one device's optimised program, where a
    GPU's count leaves out convolutions handed to cuDNN (measured: 0.9 of the 9.0 TFLOP of
    the large STUNet step in bench_train)."""
    cost = stage.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX returned one dict per device program
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def step_flops(lowered: jax.stages.Lowered, compiled: jax.stages.Compiled,
               num_devices: int) -> float:
    """Global FLOPs of one step: the lowered program's count where the backend gives one,
    else the compiled per-device count times the devices (an undercount on GPUs)."""
    return program_flops(lowered) or program_flops(compiled) * num_devices


def split_model(model: Denoiser, pattern: str) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable params, everything else)."""
    graphdef, params, frozen = nnx.split(model, trainable_filter(pattern), ...)
    if not jax.tree.leaves(params):
        raise ValueError(f"train.trainable={pattern!r} matches no parameter; parameter paths "
                         "look like 'net/temporal/blocks/down_0_0/conv1/kernel'")
    return graphdef, params, frozen


def count_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def prepare_workdir(workdir: str) -> epath.Path:
    """Creates `workdir` and checks it can be written, before any work is done."""
    path = epath.Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe.{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"workdir {path} cannot be created or written ({e.strerror or e}); "
                      "choose a writable --workdir") from None
    return path


def _check_resume(config: ConfigDict, workdir: epath.Path) -> None:
    """Refuse to resume a workdir whose run was configured differently."""
    if not config_lib.resolved_config_path(workdir).exists():
        return
    previous = config_lib.read_resolved_config(workdir)
    diff = config_lib.config_diff(previous, config, ignore=RESUMABLE_CHANGES)
    if diff:
        raise ValueError(
            f"{workdir} holds a run with a different config; differences:\n  "
            + "\n  ".join(diff) + "\nUse a new --workdir, or rerun with the same config.")


TRAIN_SCHEMA = {
    "train.steps": config_lib.positive_int,
    "train.batch_size": config_lib.positive_int,
    "train.lr": config_lib.positive_number,
    "train.warmup_steps": config_lib.non_negative_int,
    "train.grad_clip": config_lib.positive_number,
    "train.ema_decay": config_lib.probability,
    "train.cond_drop": config_lib.probability,
    "train.ckpt_every": config_lib.positive_int,
    "train.max_to_keep": config_lib.positive_int,
    "train.grad_accum": config_lib.positive_int,
    "text.max_length": config_lib.positive_int,
}


def _check_probe(config: ConfigDict) -> None:
    """train.probe_every (optional; 0: off) needs a text-to-video STUNet to probe;
    train.probe_logsnrs (optional) the levels to probe at."""
    if "probe_every" not in config.train:
        return
    schema = {"train.probe_every": config_lib.non_negative_int}
    if "probe_logsnrs" in config.train:
        schema["train.probe_logsnrs"] = (config_lib.non_empty,
                                         config_lib.each(config_lib.in_range(-30, 30)))
    config_lib.validate_config(config, schema)
    if config.train.probe_every and config.model.kind != "stunet":
        raise config_lib.ConfigError(
            f"train.probe_every={config.train.probe_every} logs the motion-word probe of a "
            f"text-to-video STUNet; this is a {config.model.kind!r} model. Set it to 0.")


def train(config: ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the run in `workdir`; returns the last logged metrics.

    Every process of a multi-process job calls this with the same arguments.
    """
    config_lib.validate_config(config, TRAIN_SCHEMA)
    train_cfg = config.train
    _check_probe(config)
    mesh = make_mesh(config.get("mesh"))
    rules = mesh_rules(config.get("mesh"))
    per_device = check_batch(train_cfg.batch_size, mesh_sizes(mesh))
    accum = int(train_cfg.get("grad_accum", 1))
    if per_device % accum:
        raise MeshError(f"train.grad_accum={accum} does not divide the per-device batch "
                        f"{per_device} (train.batch_size={train_cfg.batch_size} over "
                        f"{train_cfg.batch_size // per_device} data*fsdp shards)")
    primary = jax.process_index() == 0
    workdir = prepare_workdir(workdir)
    _check_resume(config, workdir)
    if primary:
        config_lib.write_resolved_config(config, workdir)

    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=train_cfg.max_to_keep,
                        keep_period=train_cfg.keep_period or None)
    start = ckpt.latest_step()
    graphdef, params, frozen = init_sharded(config, mesh, rules)
    if start is None and config.get("init_from"):
        model = nnx.merge(graphdef, params, frozen, copy=True)  # keep params unaliased
        # For an export of the same kind: init_new_params, the parameters it may lack;
        # init_unused_params, those of its parameters this model may leave out.
        report = inflate_from_export(model, config.init_from,
                                     config.get("init_new_params", r"$^"),
                                     config.get("init_unused_params", r"$^"))
        logging.info("initialised from %s: %s", config.init_from, report)
        _, inflated_params, inflated_frozen = split_model(model, train_cfg.trainable)
        params = place_like(inflated_params, params)
        frozen = place_like(inflated_frozen, frozen)
    tx = make_optimizer(train_cfg)
    diffusion = Diffusion.from_config(config.diffusion)
    tokenizer = make_tokenizer(config.text.tokenizer, config.text.get("vocab_path"))
    null = tokenizer.encode_batch([NULL_PROMPT], config.text.max_length)
    null_tokens = {"ids": jnp.asarray(null.ids), "mask": jnp.asarray(null.mask)}
    state = init_state(params, tx, mesh)
    logging.info("parameters: %d trainable, %d frozen; mesh %s", count_params(params),
                 count_params(frozen), mesh_sizes(mesh))

    data_iter = iter(training_dataset(
        config, tokenizer, single_frame=config.model.kind == "unet",
        process_index=jax.process_index(), process_count=jax.process_count()))
    if start is not None:
        state, frozen = restore_train_state(ckpt, start, state, frozen, mesh, data_iter)
        logging.info("resumed from step %d in %s", start, workdir)
    # Frozen weights are written once, outside the rotating checkpoints, and every step's
    # metadata points at them (with their checksum).
    frozen_ref = (write_frozen(workdir / "frozen", _to_pure(frozen)).to_json()
                  if jax.tree.leaves(frozen) else None)
    step = int(jax.device_get(state.step.addressable_data(0)))

    repl = replicated(mesh)
    batch_sh = jax.sharding.NamedSharding(mesh, batch_spec(mesh, rules))
    step_fn = make_train_step(graphdef, tx, diffusion, train_cfg, null_tokens, shardings=(
        shardings_of(state), shardings_of(frozen), batch_sh, repl), rules=rules)
    rng = jax.random.wrap_key_data(host_replicated(
        np.asarray(jax.random.key_data(jax.random.key(config.seed))), mesh))
    writer = MetricsWriter(workdir, is_primary=primary)
    last: dict[str, float] = {}
    compiled, flops = None, 0.0
    generator = None  # built at the first sample grid
    probe = None  # built at the first probe
    skipped = 0
    pending = None  # metrics of the step in flight: fetched after the next one is dispatched
    t0 = time.perf_counter()
    try:
        with PreemptionGuard() as guard, tqdm(
                total=train_cfg.steps, initial=step, desc="train", unit="step",
                disable=not (train_cfg.progress and primary)) as bar:
            while step < train_cfg.steps:
                local = next(data_iter)
                # Damaged records are dropped by the pipeline and counted, never fatal.
                skipped += int(np.sum(local.pop("corrupt_skipped", 0)))
                batch = global_batch(local, mesh, batch_spec(mesh, rules)[0])
                if compiled is None:
                    lowered = step_fn.lower(state, frozen, batch, rng)
                    compiled = lowered.compile()
                    flops = step_flops(lowered, compiled, mesh.size)
                    # Processes compile at different speeds, and the step's first
                    # collective must find them all within 30 s (gloo, on CPU).
                    barrier("train_step_compiled")
                    t0 = time.perf_counter()  # the compile is not a step
                state, metrics = compiled(state, frozen, batch, rng)
                metrics = {**metrics, "records_skipped": skipped}
                step += 1
                if pending is not None:
                    last = _log(writer, *pending, train_cfg, bar, t0, flops)
                pending = (step, metrics)
                t0 = time.perf_counter()
                preempted = (train_cfg.get("preemption", True)
                             and guard.should_stop(after=(state, metrics)))
                if (step % train_cfg.ckpt_every == 0 or step == train_cfg.steps
                        or preempted):
                    last = _log(writer, *pending, train_cfg, bar, t0, flops)
                    pending = None
                    ckpt.save(step, _pure(state), _metadata(config, frozen_ref),
                              data_iter=data_iter, force=preempted)
                if preempted:
                    logging.warning("SIGTERM: saved step %d in %s; rerun the same command to "
                                    "resume", step, workdir)
                    last["preempted_at"] = step
                    break
                sample_now = train_cfg.sample_every and step % train_cfg.sample_every == 0
                probe_now = (train_cfg.get("probe_every", 0)
                             and step % train_cfg.probe_every == 0)
                if sample_now or probe_now:
                    # Off the step clock (step_time_s, examples_per_s, flops_per_s): the step
                    # in flight finishes first, so its own compute stays on it.
                    jax.block_until_ready(state)
                    aside = time.perf_counter()
                    if sample_now:
                        if generator is None:
                            generator = make_generator(nnx.merge(graphdef, state.ema, frozen),
                                                       config, diffusion, tokenizer, mesh=mesh)
                        writer.write_images(step, "samples", preview(
                            generator.with_params(state.ema, frozen), config))
                    if probe_now:
                        if probe is None:
                            probe = MotionWordProbe(graphdef, tokenizer, config.text.max_length,
                                                    config, PROBE_CLIPS,
                                                    train_cfg.get("probe_logsnrs", PROBE_LOGSNRS))
                        writer.write_scalars(step, probe.scalars(state.ema, frozen))
                    t0 += time.perf_counter() - aside
            if pending is not None:
                last = _log(writer, *pending, train_cfg, bar, t0, flops)
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()
    return last


def restore_train_state(ckpt: Checkpointer, step: int, state: TrainState, frozen: nnx.State,
                        mesh: jax.sharding.Mesh, data_iter=None) -> tuple[TrainState, nnx.State]:
    """(state, frozen) of checkpoint `step`, placed like the given ones (any mesh: restoring
    onto another mesh reshards); `data_iter` is restored in place."""
    items, metadata = ckpt.restore(step, _pure(state), data_iter=data_iter)
    state = _from_pure(state, items, step, mesh)
    if metadata.get("frozen"):
        frozen = _fill(frozen, read_frozen(FrozenRef.from_json(metadata["frozen"]),
                                           _to_pure(frozen), ckpt.directory.parent / "frozen"))
    return state, frozen


def _no_checkpoint(workdir: str) -> str:
    return (f"no checkpoint in {workdir}/checkpoints: train first with "
            f"`lumiere train --config ... --workdir {workdir}`")


def _read_checkpoints(workdir: str) -> Checkpointer:
    """A run's checkpoints, opened read-only: a training may be saving into them."""
    directory = epath.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(_no_checkpoint(workdir))
    return Checkpointer(directory, max_to_keep=None, read_only=True)


def load_train_state(config: ConfigDict, workdir: str, step: int | None = None
                     ) -> tuple[TrainState, nnx.State, int]:
    """(state, frozen, step) of a run's checkpoint on the mesh of `config` (which may differ
    from the mesh that saved it)."""
    mesh = make_mesh(config.get("mesh"))
    graphdef, params, frozen = init_sharded(config, mesh, mesh_rules(config.get("mesh")))
    state = init_state(params, make_optimizer(config.train), mesh)
    with _read_checkpoints(workdir) as ckpt:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(_no_checkpoint(workdir))
        state, frozen = restore_train_state(ckpt, step, state, frozen, mesh)
    return state, frozen, step


def state_checksum(state: TrainState, frozen: nnx.State) -> str:
    """sha256 of every array of a training state (independent of sharding and mesh)."""
    return tree_checksum({"state": _pure(state), "frozen": _to_pure(frozen)})


def make_generator(model: Denoiser, config: ConfigDict, diffusion: Diffusion,
                   tokenizer, mesh: jax.sharding.Mesh | None = None) -> Generator:
    """A sampler for `model` with the run's sampling settings (config.sample): sampler,
    steps, batch, and for videos the MultiDiffusion window (sample.window, 0: whole clip),
    overlap and window_weights; the noise's correlation between frames (sample.frame_correlation,
    None or absent: the diffusion's); the log-SNRs that are guided (sample.guidance_interval,
    (low, high); None or absent: all); for the SSR the augmentation time of its low-res input
    (sample.aug_time in [0, 1], mapped through the diffusion schedule; 0: clean) and whether
    its estimates are kept consistent with that input (sample.low_res_consistency).

    Without a `mesh`, each batch is split over sample.devices local devices (0, the default:
    all of them; never more than sample.batch_size), the model replicated on each; with one,
    the model keeps that mesh's sharding and every example runs on every device."""
    world = world_from_config(config)
    shape = (world.height, world.width, 3)
    if config.model.kind != "unet":
        shape = (world.num_frames,) + shape
    sample = config.sample
    aug_time = float(sample.get("aug_time", 0.0))
    if not 0.0 <= aug_time <= 1.0:
        raise ValueError(f"sample.aug_time is a diffusion time in [0, 1], got {aug_time}")
    aug_logsnr = float(diffusion.logsnr(aug_time)) if aug_time > 0 else math.inf
    devices = None
    if mesh is None:
        count = min(sample_device_count(sample.get("devices", 0)), sample.batch_size)
        devices = count if count > 1 else None  # one device: no mesh, as before
    return Generator(model, diffusion, tokenizer, config.text.max_length, shape,
                     sampler=sample.sampler, steps=sample.steps, batch_size=sample.batch_size,
                     mesh=mesh, devices=devices, window=sample.get("window", 0),
                     overlap=sample.get("overlap", 2),
                     window_weights=sample.get("window_weights", "uniform"),
                     aug_logsnr=aug_logsnr,
                     low_res_consistency=bool(sample.get("low_res_consistency", False)),
                     frame_correlation=sample.get("frame_correlation"),
                     guidance_interval=sample.get("guidance_interval"))


def preview_examples(config: ConfigDict, n: int) -> list[dict[str, Any]]:
    """The first clips of the seen-combination test split and of the held-out split."""
    world = world_from_config(config)
    half = (n + 1) // 2
    test, heldout = ShapesSource(world, "test", half), ShapesSource(world, "heldout", n - half)
    return [test[i] for i in range(half)] + [heldout[i] for i in range(n - half)]


def low_res_of(videos: np.ndarray, scale: int) -> np.ndarray:
    """uint8 videos [n, t, H, W, 3] -> the SSR's low-res input, floats in [-1, 1]."""
    return np.asarray(downsample_video(from_uint8(videos), scale))


def preview(generator: Generator, config: ConfigDict, n: int = 16) -> np.ndarray:
    """Samples of the preview captions as images [n, h, w, 3] (videos: their middle frames).
    An SSR upsamples the downsampled ground-truth clips of those captions."""
    examples = preview_examples(config, n)
    low_res = None
    if generator.scale:
        low_res = low_res_of(np.stack([e["video"] for e in examples]), generator.scale)
    samples = generator([e["caption"] for e in examples], list(range(n)),
                        config.sample.guidance, low_res=low_res)
    return samples if samples.ndim == 4 else samples[:, samples.shape[1] // 2]


def _log(writer: MetricsWriter, step: int, metrics: dict, train_cfg: ConfigDict, bar,
         t0: float, flops: float) -> dict[str, float]:
    values = {k: float(v if isinstance(v, (int, float)) else local_value(v))
              for k, v in metrics.items()}
    # The parameter norm is of the updated parameters: a finite loss followed by a NaN update
    # must not reach a checkpoint either.
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteLossError(
            f"non-finite training metrics at step {step}: {bad} (loss {values['loss']}); "
            "training stopped and nothing was saved after the last good checkpoint. Lower "
            "train.lr or train.grad_clip, or check the data, then rerun to resume from it.")
    values["step_time_s"] = time.perf_counter() - t0
    values["examples_per_s"] = train_cfg.batch_size / max(values["step_time_s"], 1e-9)
    # XLA's count for all devices' programs over the wall time of the step, all devices.
    values["flops_per_s"] = flops / max(values["step_time_s"], 1e-9)
    bar.update(step - bar.n)
    if step % train_cfg.log_every == 0 or step == 1:
        bar.set_postfix(loss=f"{values['loss']:.4f}")
        writer.write_scalars(step, values)
    return values


def _metadata(config: ConfigDict, frozen_ref: dict | None) -> dict[str, Any]:
    """What a checkpoint records beside the arrays (the Checkpointer adds step and versions)."""
    return {"config": config.to_dict(), "frozen": frozen_ref}


def _is_state(x) -> bool:
    return isinstance(x, nnx.State)


def _to_pure(tree):
    return nnx.to_pure_dict(tree) if _is_state(tree) else tree


def _pure(state: TrainState) -> dict[str, Any]:
    """The checkpoint items of a state, as plain nested dicts of arrays (the step goes in the
    metadata, and is the checkpoint's step)."""
    return {"params": _to_pure(state.params),
            "opt_state": jax.tree.map(_to_pure, state.opt_state, is_leaf=_is_state),
            "ema": _to_pure(state.ema)}


def _fill(template, pure):
    """An nnx.State shaped like `template` holding the arrays of its pure-dict form `pure`."""
    if not _is_state(template):
        return pure
    filled = jax.tree.map(lambda x: x, template)
    nnx.replace_by_pure_dict(filled, pure)
    return filled


def _from_pure(template: TrainState, pure: dict[str, Any], step: int,
               mesh: jax.sharding.Mesh) -> TrainState:
    """Inverse of `_pure`, with `template` giving the nnx.State structure."""
    return TrainState(host_replicated(np.asarray(step, np.int32), mesh),
                      _fill(template.params, pure["params"]),
                      jax.tree.map(_fill, template.opt_state, pure["opt_state"],
                                   is_leaf=_is_state),
                      _fill(template.ema, pure["ema"]))


def restore_model(config: ConfigDict, workdir: str, step: int | None = None,
                  use_ema: bool = True) -> tuple[Denoiser, int]:
    """The denoiser of a training run at `step` (default: latest), with EMA weights by default."""
    model = build_denoiser(config, nnx.Rngs(config.seed))
    graphdef, params, frozen = split_model(model, config.train.trainable)
    ckpt = _read_checkpoints(workdir)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(_no_checkpoint(workdir))
        name = "ema" if use_ema else "params"
        items, metadata = ckpt.restore(step, {name: _to_pure(params)})
    finally:
        ckpt.close()
    if metadata.get("frozen"):
        frozen = _fill(frozen, read_frozen(FrozenRef.from_json(metadata["frozen"]),
                                           _to_pure(frozen), epath.Path(workdir) / "frozen"))
    return nnx.merge(graphdef, _fill(params, items[name]), frozen), step
