"""The trainer: one jitted train step, read top to bottom, and the loop around it.

`train(config, workdir)` keeps everything of a run in `workdir`: the resolved config, Orbax
checkpoints (trainable params, optimizer state, EMA, data iterator), metrics.csv, TensorBoard
events and sample grids. Started again on the same workdir it resumes from the latest
checkpoint, refusing a config that differs in anything but the run length.

Which parameters train is a regex over parameter paths (`train.trainable`, big_vision
style): '.*' trains everything (stage 0), 'temporal' only the STUNet's new layers (stage 1).
The train step differentiates with respect to the trainable parameters only, so frozen
weights get no gradient computation at all, no optimizer state, and stay bit-identical.
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
from lumiere_jax.data.pipeline import shapes_dataset, world_from_config
from lumiere_jax.data.synthetic import ShapesSource
from lumiere_jax.diffusion.losses import diffusion_loss, drop_condition
from lumiere_jax.diffusion.schedules import Diffusion
from lumiere_jax.generate import Generator
from lumiere_jax.models.denoiser import Denoiser, build_denoiser
from lumiere_jax.text.encoder import NULL_PROMPT
from lumiere_jax.text.tokenizers import make_tokenizer
from lumiere_jax.train.checkpoint import Checkpointer, FrozenRef, read_frozen, write_frozen
from lumiere_jax.train.export import inflate_from_export
from lumiere_jax.train.metrics import MetricsWriter

# Keys that may change when a run is resumed (e.g. to train it for longer).
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.ckpt_every", "train.sample_every",
                     "sample", "eval")


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
    """(params, frozen, batch, rng) -> (loss, aux): the denoising loss with caption dropout."""

    def loss_fn(params, frozen, batch, rng):
        model: Denoiser = nnx.merge(graphdef, params, frozen)
        drop_rng, loss_rng = jax.random.split(rng)
        tokens = drop_condition({"ids": batch["ids"], "mask": batch["mask"]}, null_tokens,
                                drop_rng, train.cond_drop)
        cond = model.encode_text(tokens["ids"], tokens["mask"])
        return diffusion_loss(model, batch["pixels"], cond, loss_rng, diffusion)

    return loss_fn


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    diffusion: Diffusion, train: ConfigDict, null_tokens: dict[str, jax.Array]):
    """(state, frozen, batch, rng) -> (state, metrics): one optimizer step on one batch."""
    loss_fn = make_loss_fn(graphdef, diffusion, train, null_tokens)

    def train_step(state: TrainState, frozen: nnx.State, batch: dict, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)  # per-step RNG from the step: exact resume
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, frozen, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay(state.step, train.ema_decay)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
                   "param_norm": optax.global_norm(params)}
        return TrainState(state.step + 1, params, opt_state, ema), metrics

    return jax.jit(train_step, donate_argnums=0)


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
        probe = path / ".write_probe"
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
    "text.max_length": config_lib.positive_int,
}


def train(config: ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the run in `workdir`; returns the last logged metrics."""
    config_lib.validate_config(config, TRAIN_SCHEMA)
    workdir = prepare_workdir(workdir)
    _check_resume(config, workdir)
    config_lib.write_resolved_config(config, workdir)
    train_cfg = config.train

    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=train_cfg.max_to_keep,
                        keep_period=train_cfg.keep_period or None)
    start = ckpt.latest_step()
    model = build_denoiser(config, nnx.Rngs(config.seed))
    if start is None and config.get("init_from"):
        report = inflate_from_export(model, config.init_from)
        logging.info("inflated %s: %s", config.init_from, report)
    graphdef, params, frozen = split_model(model, train_cfg.trainable)
    tx = make_optimizer(train_cfg)
    diffusion = Diffusion.from_config(config.diffusion)
    tokenizer = make_tokenizer(config.text.tokenizer, config.text.get("vocab_path"))
    null = tokenizer.encode_batch([NULL_PROMPT], config.text.max_length)
    null_tokens = {"ids": jnp.asarray(null.ids), "mask": jnp.asarray(null.mask)}
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                       jax.tree.map(jnp.copy, params))
    logging.info("parameters: %d trainable, %d frozen", count_params(params),
                 count_params(frozen))

    single_frame = config.model.kind == "unet"
    data_iter = iter(shapes_dataset(config, tokenizer, single_frame=single_frame))
    if start is not None:
        items, metadata = ckpt.restore(start, _pure(state), data_iter=data_iter)
        state = _from_pure(state, items, start)
        frozen_ref = metadata.get("frozen")
        if frozen_ref:
            frozen = _fill(frozen, read_frozen(FrozenRef.from_json(frozen_ref),
                                               _to_pure(frozen)))
        logging.info("resumed from step %d in %s", start, workdir)
    # Frozen weights are written once, outside the rotating checkpoints, and every step's
    # metadata points at them (with their checksum).
    frozen_ref = (write_frozen(workdir / "frozen", _to_pure(frozen)).to_json()
                  if jax.tree.leaves(frozen) else None)
    step = int(state.step)

    train_step = make_train_step(graphdef, tx, diffusion, train_cfg, null_tokens)
    rng = jax.random.key(config.seed)
    writer = MetricsWriter(workdir)
    last: dict[str, float] = {}
    generator = None  # built at the first sample grid
    skipped = 0
    pending = None  # metrics of the step in flight: fetched after the next one is dispatched
    t0 = time.perf_counter()
    try:
        with tqdm(total=train_cfg.steps, initial=step, desc="train", unit="step",
                  disable=not train_cfg.progress) as bar:
            while step < train_cfg.steps:
                batch = next(data_iter)
                # Damaged records are dropped by the pipeline and counted, never fatal.
                skipped += int(np.sum(batch.pop("corrupt_skipped", 0)))
                state, metrics = train_step(state, frozen, jax.tree.map(jnp.asarray, batch), rng)
                metrics = {**metrics, "records_skipped": skipped}
                step += 1
                if pending is not None:
                    last = _log(writer, *pending, train_cfg, bar, t0)
                pending = (step, metrics)
                t0 = time.perf_counter()
                if step % train_cfg.ckpt_every == 0 or step == train_cfg.steps:
                    last = _log(writer, *pending, train_cfg, bar, t0)
                    pending = None
                    ckpt.save(step, _pure(state), _metadata(config, frozen_ref),
                              data_iter=data_iter)
                if train_cfg.sample_every and step % train_cfg.sample_every == 0:
                    if generator is None:
                        generator = make_generator(nnx.merge(graphdef, state.ema, frozen),
                                                   config, diffusion, tokenizer)
                    writer.write_images(step, "samples",
                                        preview(generator.with_params(state.ema, frozen), config))
            if pending is not None:
                last = _log(writer, *pending, train_cfg, bar, t0)
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()
    return last


def make_generator(model: Denoiser, config: ConfigDict, diffusion: Diffusion,
                   tokenizer) -> Generator:
    """A sampler for `model` with the run's sampling settings (config.sample)."""
    world = world_from_config(config)
    shape = (world.height, world.width, 3)
    if config.model.kind != "unet":
        shape = (world.num_frames,) + shape
    return Generator(model, diffusion, tokenizer, config.text.max_length, shape,
                     sampler=config.sample.sampler, steps=config.sample.steps,
                     batch_size=config.sample.batch_size)


def preview_prompts(config: ConfigDict, n: int) -> list[str]:
    """Captions of the first clips of the seen-combination test split and the held-out split."""
    world = world_from_config(config)
    half = (n + 1) // 2
    test, heldout = ShapesSource(world, "test", half), ShapesSource(world, "heldout", n - half)
    return [test[i]["caption"] for i in range(half)] + [heldout[i]["caption"]
                                                        for i in range(n - half)]


def preview(generator: Generator, config: ConfigDict, n: int = 16) -> np.ndarray:
    """Samples of preview_prompts as images [n, h, w, 3] (videos: their middle frames)."""
    samples = generator(preview_prompts(config, n), list(range(n)), config.sample.guidance)
    return samples if samples.ndim == 4 else samples[:, samples.shape[1] // 2]


def _log(writer: MetricsWriter, step: int, metrics: dict, train_cfg: ConfigDict, bar,
         t0: float) -> dict[str, float]:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
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


def _from_pure(template: TrainState, pure: dict[str, Any], step: int) -> TrainState:
    """Inverse of `_pure`, with `template` giving the nnx.State structure."""
    return TrainState(jnp.asarray(step, jnp.int32), _fill(template.params, pure["params"]),
                      jax.tree.map(_fill, template.opt_state, pure["opt_state"],
                                   is_leaf=_is_state),
                      _fill(template.ema, pure["ema"]))


def restore_model(config: ConfigDict, workdir: str, step: int | None = None,
                  use_ema: bool = True) -> tuple[Denoiser, int]:
    """The denoiser of a training run at `step` (default: latest), with EMA weights by default."""
    model = build_denoiser(config, nnx.Rngs(config.seed))
    graphdef, params, frozen = split_model(model, config.train.trainable)
    ckpt = Checkpointer(epath.Path(workdir) / "checkpoints", max_to_keep=None)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(
                f"no checkpoint in {workdir}/checkpoints: train first with "
                f"`lumiere train --config ... --workdir {workdir}`")
        name = "ema" if use_ema else "params"
        items, metadata = ckpt.restore(step, {name: _to_pure(params)})
    finally:
        ckpt.close()
    if metadata.get("frozen"):
        frozen = _fill(frozen, read_frozen(FrozenRef.from_json(metadata["frozen"]),
                                           _to_pure(frozen)))
    return nnx.merge(graphdef, _fill(params, items[name]), frozen), step
