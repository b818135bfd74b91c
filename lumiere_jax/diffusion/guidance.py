"""Classifier-free guidance (Ho & Salimans, 2022) as a wrapper around the model.

The wrapped function has the sampler's signature fn(z, logsnr) -> prediction, so guidance
composes with every sampler and with window-wise wrappers such as MultiDiffusion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lumiere_jax.diffusion import schedules
from lumiere_jax.diffusion.losses import ModelFn, broadcast_null_condition

GuidedFn = Callable[[jax.Array, jax.Array], jax.Array]


def classifier_free_guidance(
    model_fn: ModelFn, cond: Any, null_cond: Any, scale: float | jax.Array
) -> GuidedFn:
    """fn(z, logsnr) -> u + scale * (c - u), c/u the conditional/unconditional predictions.

    Both predictions come from ONE model call on the batch [z; z] with conditions
    [cond; null_cond] (twice the batch, one kernel launch sequence, shardable over data).
    The combination is written scale * c + (1 - scale) * u, which is exactly c at scale 1
    and exactly u at scale 0.

    Args:
      model_fn: (z [2b, ...], logsnr [2b], cond pytree [2b, ...]) -> prediction [2b, ...].
      cond: condition pytree, leaves [b, ...].
      null_cond: same structure, leaves with batch 1 (broadcast) or b (e.g. the embedding
        of the empty caption).
      scale: guidance scale w >= 0, a number or a per-example [b] array. 0 unconditional,
        1 conditional, > 1 guided.
    """
    if isinstance(scale, (int, float, np.ndarray, np.number)) and np.any(np.asarray(scale) < 0):
        raise ValueError(
            f"classifier_free_guidance: scale must be >= 0 (0 = unconditional, 1 = "
            f"conditional, >1 = guided), got {scale}."
        )
    null_cond = broadcast_null_condition(null_cond, cond)
    both_cond = jax.tree_util.tree_map(lambda c, n: jnp.concatenate([c, n], 0), cond, null_cond)

    def guided(z: jax.Array, logsnr: jax.Array) -> jax.Array:
        batch = z.shape[0]
        logsnr = jnp.broadcast_to(jnp.asarray(logsnr, jnp.float32), (batch,))
        pred = model_fn(
            jnp.concatenate([z, z], 0), jnp.concatenate([logsnr, logsnr], 0), both_cond
        )
        if pred.shape[0] != 2 * batch:
            raise ValueError(
                f"classifier_free_guidance: model_fn returned batch {pred.shape[0]} for an "
                f"input batch of {2 * batch}."
            )
        conditional, unconditional = pred[:batch], pred[batch:]
        w = schedules.per_example(jnp.asarray(scale, jnp.float32), conditional)
        return (w * conditional + (1.0 - w) * unconditional).astype(pred.dtype)

    return guided
