"""Timing helpers shared by the benchmarks: medians after warm-up, XLA FLOP counts, and the
same-run matmul peak every achieved FLOP/s is divided by."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def median_seconds(fn, *args, runs: int) -> float:
    """Median wall time of `fn(*args)` over `runs` calls, after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(m: int, k: int, n: int, runs: int, dtype=jnp.float32) -> float:
    """FLOP/s of a jitted [m, k] x [k, n] matmul."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, k)), dtype)
    b = jnp.asarray(rng.standard_normal((k, n)), dtype)
    return 2.0 * m * k * n / median_seconds(jax.jit(jnp.matmul), a, b, runs=runs)


def peak_flops(runs: int = 5, size: int = 1024, dtype=jnp.float32) -> float:
    """The machine's matmul peak in `dtype`: the best of two measurements of a square matmul,
    so a burst of load from another process during one of them does not set it."""
    return max(matmul_peak(size, size, size, runs, dtype) for _ in range(2))
