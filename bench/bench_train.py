"""Train-step speed and memory on this machine: `python -m bench.bench_train [--part ...]`.

Each row is the trainer's own jitted step (loss, gradients of the trainable parameters, AdamW,
EMA) on one device, with random weights and a batch of random pixels and caption tokens (the
cost depends on shapes only). Compilation and one warm-up call are excluded; times are medians.
FLOPs come from XLA's cost analysis of the lowered step (the same count on every backend);
the reference is a jitted square matmul in the same dtype timed in the same process, before
and after the rows (the better kept).

Parts:
  steps   tiny and mid STUNet (stage 1, temporal layers trained) and the stage-0 U-Net;
          rows for the forward pass alone, the step as trained (frozen spatial weights) and
          the step with every parameter trained, to show what freezing saves. `--models`,
          `--variants` and `--dtypes` pick rows (an accelerator run adds the large STUNet
          and bfloat16; each dtype's rows are divided by that dtype's matmul peak).
  frames  the stage-1 step at 8..80 frames (fixed resolution and width): time, peak memory
          from the compiled memory analysis, and a least-squares fit time = a + b * frames.
  remat   peak memory with and without rematerialisation of the U-Net blocks, and the
          largest frame count that fits --budget_gib.
Prints markdown tables (BENCHMARKS.md holds a copy with the date and machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.timing import median_seconds, peak_flops
from lumiere_jax import config as config_lib
from lumiere_jax.diffusion.schedules import Diffusion
from lumiere_jax.parallel.mesh import make_mesh, mesh_rules
from lumiere_jax.plan import abstract_batch, null_tokens
from lumiere_jax.train.trainer import (
    init_sharded,
    init_state,
    make_loss_fn,
    make_optimizer,
    make_train_step,
    step_flops,
)

STUNET = "configs/shapes_stunet.py"
LARGE = ("world.height=64", "world.width=64")
CONFIGS = {  # name -> (config file:arg, overrides, description)
    "stage-0 U-Net": ("configs/shapes_t2i.py", (), "32x32 images, channels 16, batch 8"),
    "tiny STUNet": (f"{STUNET}:batch=4", (), "16x32x32, channels 16, batch 4"),
    "mid STUNet": (f"{STUNET}:batch=4,channels=64", (), "16x32x32, channels 64, batch 4"),
    "large STUNet": (f"{STUNET}:batch=8,channels=128", LARGE,
                     "16x64x64, channels 128, batch 8 (for accelerators)"),
}
DEFAULT_MODELS = "stage-0 U-Net,tiny STUNet,mid STUNet"
VARIANTS = {"forward": "forward (loss only)", "step": "step, trained as configured",
            "all": "step, every parameter trained"}
ALL_PARAMS = ".*"


@dataclasses.dataclass
class Row:
    name: str
    variant: str
    dtype: str
    seconds: float
    flops: float
    examples: int
    frames: int
    peak_bytes: int


def load(spec: str, overrides=()) -> config_lib.ConfigDict:
    return config_lib.load_config(spec, list(overrides))


def random_batch(config, batch_size: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    out = {}
    for key, spec in abstract_batch(config, batch_size).items():
        if key == "pixels":
            out[key] = jnp.asarray(rng.uniform(-1, 1, spec.shape), spec.dtype)
        elif key == "ids":
            out[key] = jnp.asarray(rng.integers(3, 20, spec.shape), spec.dtype)
        else:
            out[key] = jnp.ones(spec.shape, spec.dtype)
    out.pop("corrupt_skipped")
    return out


def compile_step(config, forward_only: bool = False):
    """(compiled, fn, args, flops): the trainer's step (or its loss alone) for `config` on one
    device; `fn(*args)` runs it. FLOPs are counted on the lowered program, the same on every
    backend that counts it (see trainer.step_flops)."""
    train = config.train
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    graphdef, params, frozen = init_sharded(config, mesh, mesh_rules(config.mesh))
    tx = make_optimizer(train)
    diffusion = Diffusion.from_config(config.diffusion)
    batch = random_batch(config, train.batch_size)
    rng = jax.random.key(0)
    if forward_only:
        loss = make_loss_fn(graphdef, diffusion, train, null_tokens(config))
        lowered = jax.jit(lambda *a: loss(*a)[0]).lower(params, frozen, batch, rng)
        compiled = lowered.compile()
        return compiled, compiled, (params, frozen, batch, rng), step_flops(lowered, compiled, 1)
    state = init_state(params, tx, mesh)
    step = make_train_step(graphdef, tx, diffusion, train, null_tokens(config))
    lowered = step.lower(state, frozen, batch, rng)
    compiled = lowered.compile()
    carry = [state]

    def run(*rest):  # the step donates its state: chain it, as the trainer does
        carry[0], metrics = compiled(carry[0], *rest)
        return metrics

    return compiled, run, (frozen, batch, rng), step_flops(lowered, compiled, 1)


def peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes)


def measure(name: str, variant: str, config, runs: int, **kw) -> Row:
    start = time.perf_counter()
    compiled, fn, args, flops = compile_step(config, **kw)
    compile_seconds = time.perf_counter() - start
    seconds = median_seconds(fn, *args, runs=runs)
    batch = config.train.batch_size
    frames = batch * (1 if config.model.kind == "unet" else config.world.num_frames)
    row = Row(name, variant, config.model.unet.dtype, seconds, flops, batch,
              frames, peak_bytes(compiled))
    print(f"  measured {name} / {variant} / {row.dtype}: {seconds * 1e3:.1f} ms "
          f"(compiled in {compile_seconds:.0f} s)", flush=True)
    return row


def part_steps(models: list[str], variants: list[str], dtypes: list[str],
               runs: int) -> list[Row]:
    rows = []
    for name in models:
        spec, overrides, _ = CONFIGS[name]
        for dtype in dtypes:
            base = [*overrides, f"model.unet.dtype={dtype}"]
            for variant in variants:
                if variant == "all" and load(spec).model.kind != "stunet":
                    continue  # stage 0 trains every parameter already
                extra = [f"train.trainable={ALL_PARAMS}"] if variant == "all" else []
                rows.append(measure(name, VARIANTS[variant], load(spec, base + extra), runs,
                                    forward_only=variant == "forward"))
    return rows


def part_frames(model: str, dtype: str, frame_counts: list[int], runs: int) -> list[Row]:
    spec, overrides, _ = CONFIGS[model]
    spec = spec.replace("batch=4", "batch=1").replace("batch=8", "batch=1")
    return [measure(f"{model}, batch 1", f"{f} frames",
                    load(spec, [*overrides, f"model.unet.dtype={dtype}",
                                f"world.num_frames={f}"]), runs)
            for f in frame_counts]


def part_remat(frame_counts: list[int]) -> list[tuple[int, str, int]]:
    """(frames, remat policy, peak bytes) from compiled memory analyses (nothing is run)."""
    out = []
    for f in frame_counts:
        for policy in ("none", "block"):
            config = load(f"{STUNET}:batch=1", [f"world.num_frames={f}",
                                               f"model.unet.remat={policy}"])
            out.append((f, policy, peak_bytes(compile_step(config)[0])))
    return out


def print_rows(rows: list[Row], peaks: dict[str, float]) -> None:
    print("| model | variant | dtype | ms / step | examples / s | frames / s | GFLOP / step (XLA) "
          "| GFLOP/s | fraction of same-dtype matmul peak | peak memory (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        achieved = r.flops / r.seconds
        print(f"| {r.name} | {r.variant} | {r.dtype} | {r.seconds * 1e3:.1f} "
              f"| {r.examples / r.seconds:.1f} | {r.frames / r.seconds:.0f} "
              f"| {r.flops / 1e9:.2f} | {achieved / 1e9:.1f} | {achieved / peaks[r.dtype]:.3f} "
              f"| {r.peak_bytes / 2**20:.0f} |")


def print_frames(rows: list[Row]) -> None:
    frames = np.array([r.frames for r in rows], float)
    seconds = np.array([r.seconds for r in rows])
    slope, intercept = np.polyfit(frames, seconds, 1)
    fit = intercept + slope * frames
    r2 = 1 - np.sum((seconds - fit) ** 2) / np.sum((seconds - seconds.mean()) ** 2)
    print(f"\nFit: time = {intercept * 1e3:.1f} ms + {slope * 1e3:.2f} ms x frames "
          f"(R^2 = {r2:.4f}).")
    by_frames = {r.frames: r.seconds for r in rows}
    if 16 in by_frames and 80 in by_frames:
        print(f"16 -> 80 frames (5x): {by_frames[80] / by_frames[16]:.2f}x step time.")


def print_remat(rows, budget_gib: float) -> None:
    if jax.devices()[0].platform == "cpu":
        # Measured: the stage-0 step's temporaries are 412.8 MB with remat none, block or dots.
        print("\nOn CPU the two policies give the same peak: the compiled CPU program has none "
              "of the optimization barriers jax.checkpoint puts around the recomputation, so "
              "nothing keeps it out of the forward pass (its FLOPs are still paid). Measure "
              "remat on an accelerator.")
    print("\n| frames | remat | peak memory (MiB) |\n|---|---|---|")
    for f, policy, nbytes in rows:
        print(f"| {f} | {policy} | {nbytes / 2**20:.0f} |")
    budget = budget_gib * 2**30
    for policy in ("none", "block"):
        points = [(f, b) for f, p, b in rows if p == policy]
        (f0, b0), (f1, b1) = points[0], points[-1]
        per_frame = (b1 - b0) / (f1 - f0)  # memory grows linearly in frames: extrapolate
        largest = int((budget - (b0 - per_frame * f0)) // per_frame)
        print(f"remat={policy}: {per_frame / 2**20:.1f} MiB per frame; largest frame count "
              f"within {budget_gib:g} GiB (batch 1): ~{largest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("steps", "frames", "remat", "all"), default="all")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--frames", default="8,16,32,64,80")
    parser.add_argument("--budget_gib", type=float, default=16.0)
    parser.add_argument("--models", default=DEFAULT_MODELS,
                        help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument("--variants", default="forward,step,all",
                        help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--dtypes", default="float32", help="float32 and/or bfloat16")
    parser.add_argument("--frames_model", default="tiny STUNet", choices=list(CONFIGS))
    parser.add_argument("--peak_size", type=int, default=1024,
                        help="side of the square matmul that measures the peak (8192 on a GPU)")
    args = parser.parse_args()
    frame_counts = [int(f) for f in args.frames.split(",")]
    models, variants = args.models.split(","), args.variants.split(",")
    dtypes = args.dtypes.split(",")
    for name in models:
        if name not in CONFIGS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(CONFIGS)}")
    for variant in variants:
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")

    device = jax.devices()[0]
    print(f"{device.platform} x1 ({device.device_kind}), jax {jax.__version__}; median of "
          f"{args.runs} steps after warm-up, random weights and batch.", flush=True)

    def peaks() -> dict[str, float]:
        return {d: peak_flops(args.runs, args.peak_size, jnp.dtype(d)) for d in dtypes}

    peak_before = peaks()
    steps = (part_steps(models, variants, dtypes, args.runs)
             if args.part in ("steps", "all") else [])
    frames = (part_frames(args.frames_model, dtypes[-1], frame_counts, args.runs)
              if args.part in ("frames", "all") else [])
    peak = {d: max(p, peak_before[d]) for d, p in peaks().items()}
    for d, p in peak.items():
        print(f"Same-run {d} matmul peak ({args.peak_size}^3, jitted): {p / 1e9:.1f} GFLOP/s.")
    print()
    for name in dict.fromkeys(models + ([args.frames_model] if frames else [])):
        spec, overrides, what = CONFIGS[name]
        print(f"- {name}: `{' '.join([spec, *overrides])}` ({what})")
    if steps:
        print()
        print_rows(steps, peak)
    if frames:
        print()
        print_rows(frames, peak)
        print_frames(frames)
    if args.part in ("remat", "all"):
        print_remat(part_remat(frame_counts), args.budget_gib)


if __name__ == "__main__":
    main()
