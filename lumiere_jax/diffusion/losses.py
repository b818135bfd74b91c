"""Training loss of continuous-time Gaussian diffusion, and condition dropout for CFG.

The model is `model_fn(z, logsnr, cond) -> prediction` with z: [b, ...] (x0's shape),
logsnr: [b] float32 and cond any pytree whose leaves have leading dim b.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lumiere_jax.diffusion import schedules
from lumiere_jax.diffusion.schedules import Diffusion

ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def sample_times(rng: jax.Array, batch: int, low_discrepancy: bool,
                 distribution: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0, uniform_fraction: float = 0.0) -> jax.Array:
    """Training times t in [0, 1): [batch] float32.

    low_discrepancy: one uniform u, then u_i = (u + i / batch) mod 1 (VDM, Kingma et al.
    2021): every u_i is still U(0, 1), but the batch covers [0, 1) evenly.
    distribution: 'uniform' (t = u) or 'logit_normal' (t = sigmoid(logit_mean + logit_std *
    Phi^-1(u)), the timestep density of SD3, Esser et al. 2024): more of the batch at the
    noise levels around sigmoid(logit_mean); t near 1 is high noise. Drawn through the
    inverse CDF so a low-discrepancy batch stays evenly spread over the distribution's
    quantiles.
    uniform_fraction: with 'logit_normal', the first round(uniform_fraction * batch) times
    are drawn uniformly instead (each part low-discrepancy on its own): a density skewed far
    to one end starves the other levels, which the model then forgets.
    """
    if distribution not in schedules.TIME_DISTRIBUTIONS:
        raise ValueError(f"sample_times: unknown distribution {distribution!r}; expected one "
                         f"of {schedules.TIME_DISTRIBUTIONS}.")
    n_uniform = batch if distribution == "uniform" else round(uniform_fraction * batch)
    sizes = [(n, skewed) for n, skewed in ((n_uniform, False), (batch - n_uniform, True)) if n]
    # One part draws from rng itself, so unmixed densities keep their random stream.
    keys = [rng] if len(sizes) == 1 else list(jax.random.split(rng))
    parts = []
    for key, (n, skewed) in zip(keys, sizes):
        if low_discrepancy:
            u = jax.random.uniform(key, (), jnp.float32)
            u = jnp.mod(u + jnp.arange(n, dtype=jnp.float32) / n, 1.0)
        else:
            u = jax.random.uniform(key, (n,), jnp.float32)
        if skewed:
            u = jax.nn.sigmoid(logit_mean + logit_std * jax.scipy.special.ndtri(u))
        parts.append(u)
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def loss_weight(logsnr: jax.Array, config: Diffusion) -> jax.Array:
    """Weight of the prediction-target MSE at each logsnr ([b] -> [b]).

    The schemes are defined on x0-MSE (see schedules.LOSS_WEIGHTINGS); since
    x0-MSE = eps-MSE / snr = v-MSE * sigma^2 for a consistent prediction, the weight in target
    units is w_x0(snr) / snr for eps and w_x0(snr) * sigmoid(-logsnr) for v. Written with
    exp/sigmoid of logsnr so nothing overflows over logsnr in [-30, 30].
    """
    if config.loss_weighting == "none":
        return jnp.ones_like(logsnr)
    x0_mse_per_target_mse = (
        jnp.exp(-logsnr) if config.prediction == "eps" else jax.nn.sigmoid(-logsnr)
    )
    snr = jnp.exp(logsnr)
    if config.loss_weighting == "min_snr":
        if config.prediction == "eps":
            # min(snr, gamma) / snr, without inf * 0 at very low logsnr.
            return jnp.minimum(1.0, config.min_snr_gamma * jnp.exp(-logsnr))
        return jnp.minimum(snr, config.min_snr_gamma) * x0_mse_per_target_mse
    if config.loss_weighting == "truncated_snr":
        if config.prediction == "eps":
            return jnp.maximum(1.0, jnp.exp(-logsnr))
        return jnp.maximum(snr, 1.0) * x0_mse_per_target_mse
    raise ValueError(f"Unknown loss_weighting {config.loss_weighting!r}.")  # post_init guards


def diffusion_loss(
    model_fn: ModelFn,
    x0: jax.Array,
    cond: Any,
    rng: jax.Array,
    config: Diffusion,
    *,
    mask: jax.Array | None = None,
    example_weight: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Denoising loss for a batch of clean data.

    Draws t (U(0, 1), or per config.time_distribution) and eps ~ N(0, I) per example (frames
    correlated per config.frame_correlation), builds z = alpha x0 + sigma eps, and
    regresses the model's output on the target of config.prediction, weighted per
    config.loss_weighting.

    Args:
      model_fn: (z [b, ...], logsnr [b], cond) -> prediction [b, ...].
      x0: clean data [b, ...] (e.g. videos [b, t, h, w, c]), roughly in [-1, 1].
      cond: condition pytree passed through to model_fn (leaves [b, ...]); may be None.
      rng: PRNG key; the loss is a deterministic function of it.
      mask: optional elementwise weights broadcastable to x0 ([b, ...] with x0's rank, e.g.
        [b, t, h, w, 1]); each example's error is the mask-weighted mean over its non-batch
        dims (an all-zero mask gives 0). For training only on a region, e.g. inpainting.
      example_weight: optional [b] weights; the batch loss is sum(w * l) / sum(w) (0 if all
        weights are 0), so zero-weight (padding) examples do not count.
    Returns:
      (scalar loss, aux) with aux = {'loss_per_example': [b], 't': [b], 'logsnr': [b]}.
    """
    batch = x0.shape[0]
    time_rng, noise_rng = jax.random.split(rng)
    t = sample_times(time_rng, batch, config.low_discrepancy_t, config.time_distribution,
                     config.time_logit_mean, config.time_logit_std,
                     config.time_uniform_fraction)
    logsnr = config.logsnr(t)
    eps = config.noise(noise_rng, x0.shape).astype(x0.dtype)
    alpha, sigma = schedules.alpha_sigma(schedules.per_example(logsnr, x0))
    z = (alpha * x0 + sigma * eps).astype(x0.dtype)

    pred = model_fn(z, logsnr, cond)
    if pred.shape != x0.shape:
        raise ValueError(
            f"diffusion_loss: model_fn returned shape {pred.shape}, expected x0's shape "
            f"{x0.shape}."
        )
    target = schedules.prediction_from_x0_eps(config.prediction, x0, eps, logsnr)
    squared_error = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))

    reduce_axes = tuple(range(1, x0.ndim))
    if mask is None:
        mse = jnp.mean(squared_error, axis=reduce_axes)
    else:
        mask = jnp.asarray(mask, jnp.float32)
        if mask.ndim != x0.ndim or mask.shape[0] != batch:
            raise ValueError(
                f"diffusion_loss: mask must have x0's rank {x0.ndim} and leading dim {batch} "
                f"(broadcastable to {x0.shape}), got shape {mask.shape}."
            )
        mask = jnp.broadcast_to(mask, x0.shape)
        total = jnp.sum(mask, axis=reduce_axes)
        mse = jnp.sum(mask * squared_error, axis=reduce_axes) / jnp.maximum(total, 1e-8)

    loss_per_example = loss_weight(logsnr, config) * mse
    if example_weight is None:
        loss = jnp.mean(loss_per_example)
    else:
        example_weight = jnp.asarray(example_weight, jnp.float32)
        if example_weight.shape != (batch,):
            raise ValueError(
                f"diffusion_loss: example_weight must have shape [{batch}], got "
                f"{example_weight.shape}."
            )
        loss = jnp.sum(example_weight * loss_per_example) / jnp.maximum(
            jnp.sum(example_weight), 1e-8
        )
    aux = {"loss_per_example": loss_per_example, "t": t, "logsnr": logsnr}
    return loss, aux


def _leading_dim(tree: Any, what: str) -> int:
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"{what} has no array leaves.")
    dims = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
    if len(dims) != 1 or None in dims:
        raise ValueError(
            f"All leaves of {what} need the same leading (batch) dim; got leaf shapes "
            f"{[jnp.shape(leaf) for leaf in leaves]}."
        )
    return dims.pop()


def broadcast_null_condition(null_cond: Any, cond: Any) -> Any:
    """null_cond with every leaf broadcast to the batch of cond (null leaves have batch 1 or b)."""
    batch = _leading_dim(cond, "cond")
    cond_def = jax.tree_util.tree_structure(cond)
    null_def = jax.tree_util.tree_structure(null_cond)
    if cond_def != null_def:
        raise ValueError(
            f"null_cond must have the same pytree structure as cond; got {null_def} for "
            f"null_cond and {cond_def} for cond."
        )

    def broadcast(c, n):
        n = jnp.asarray(n)
        if n.shape[1:] != c.shape[1:] or n.shape[0] not in (1, batch):
            raise ValueError(
                f"null_cond leaf of shape {n.shape} does not match cond leaf {c.shape}: it "
                f"needs batch 1 or {batch} and the same trailing shape {c.shape[1:]}."
            )
        return jnp.broadcast_to(n, c.shape).astype(c.dtype)

    return jax.tree_util.tree_map(broadcast, cond, null_cond)


def drop_condition(cond: Any, null_cond: Any, rng: jax.Array, p: float | jax.Array) -> Any:
    """Replace each example's condition by the null condition with probability p.

    Classifier-free guidance training (Ho & Salimans, 2022): the same model learns the
    conditional and the unconditional prediction. All leaves of one example are swapped
    together (e.g. text embeddings [b, L, d] and their mask [b, L]).

    Args:
      cond: pytree, leaves [b, ...].
      null_cond: same structure, leaves with batch 1 (broadcast) or b.
      rng: PRNG key.
      p: drop probability in [0, 1].
    """
    if isinstance(p, (int, float, np.floating)) and not 0.0 <= p <= 1.0:
        raise ValueError(f"drop_condition: p is a probability in [0, 1], got {p}.")
    batch = _leading_dim(cond, "cond")
    null_cond = broadcast_null_condition(null_cond, cond)
    drop = jax.random.bernoulli(rng, p, (batch,))  # [b]

    def choose(c, n):
        return jnp.where(drop.reshape((batch,) + (1,) * (c.ndim - 1)), n, c)

    return jax.tree_util.tree_map(choose, cond, null_cond)
