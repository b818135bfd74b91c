"""T5 encoder throughput on this machine: `python -m bench.bench_t5 [--preset ..] [--runs N]`.

Encodes a batch of token ids with a randomly initialised encoder (default t5-v1_1-base, batch
32, length 64), jitted, in float32 and bfloat16 compute. Compilation and one warm-up call are
excluded; the time is the median of `--runs` calls. FLOPs come from XLA's cost analysis of the
compiled encoder; the reference peak is a jitted float32 matmul of the encoder's largest shape
([b*L, d_model] x [d_model, d_ff]) timed in the same run (before and after, the better kept),
so the fraction is comparable across machines. Prints a markdown table.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.timing import matmul_peak, median_seconds
from lumiere_jax.text.t5 import T5Encoder, count_params, get_preset
from lumiere_jax.train.trainer import step_flops


def bench_encoder(preset: str, dtype: str, batch: int, length: int, runs: int) -> dict:
    config = get_preset(preset, dtype=dtype)
    graphdef, params = nnx.split(T5Encoder(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, config.vocab_size, (batch, length)), jnp.int32)
    mask = jnp.ones((batch, length), bool)
    encode = jax.jit(lambda p, i, m: nnx.merge(graphdef, p)(i, m))
    lowered = encode.lower(params, ids, mask)
    flops = step_flops(lowered, lowered.compile(), 1)
    seconds = median_seconds(encode, params, ids, mask, runs=runs)
    return {"dtype": dtype, "seconds": seconds, "flops": flops,
            "params": count_params(config), "config": config}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="t5-v1_1-base")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    config = get_preset(args.preset)
    shape = (args.batch * args.length, config.d_model, config.d_ff)
    # The peak is measured before and after the encoder runs and the better one kept, so that a
    # burst of load from other processes during one measurement does not set it.
    peak_before = matmul_peak(*shape, runs=args.runs)
    results = [bench_encoder(args.preset, dtype, args.batch, args.length, args.runs)
               for dtype in ("float32", "bfloat16")]
    peak = max(peak_before, matmul_peak(*shape, runs=args.runs))

    print(f"T5 encoder {args.preset} ({results[0]['params'] / 1e6:.1f}M params), "
          f"batch {args.batch}, length {args.length}, random weights, "
          f"{jax.devices()[0].platform} x{jax.local_device_count()} "
          f"({jax.devices()[0].device_kind}); median of {args.runs} runs after warm-up.")
    print(f"Same-run fp32 matmul peak ([{args.batch * args.length}, {config.d_model}] x "
          f"[{config.d_model}, {config.d_ff}]): {peak / 1e9:.1f} GFLOP/s.\n")
    print("| compute dtype | ms / batch | prompts / s | GFLOP / batch (XLA) | GFLOP/s "
          "| fraction of fp32 matmul peak |")
    print("|---|---|---|---|---|---|")
    for r in results:
        achieved = r["flops"] / r["seconds"]
        print(f"| {r['dtype']} | {r['seconds'] * 1e3:.0f} | {args.batch / r['seconds']:.1f} "
              f"| {r['flops'] / 1e9:.1f} | {achieved / 1e9:.1f} | {achieved / peak:.2f} |")


if __name__ == "__main__":
    main()
