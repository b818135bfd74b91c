"""Text -> pixels with a trained denoiser: classifier-free guided DDIM/DDPM sampling.

The text is encoded once per prompt, outside the denoising loop, and the conditional and
unconditional predictions share one batched network call per step. Each sample's starting
noise comes from its own seed, so with DDIM (eta 0) a (prompt, seed) pair gives the same output
whatever else is in the batch; DDPM's per-step noise is drawn per batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lumiere_jax.diffusion.guidance import classifier_free_guidance
from lumiere_jax.diffusion.samplers import sample
from lumiere_jax.diffusion.schedules import Diffusion
from lumiere_jax.models.denoiser import Denoiser
from lumiere_jax.parallel.mesh import host_replicated, local_value, replicated
from lumiere_jax.text.encoder import NULL_PROMPT
from lumiere_jax.text.tokenizers import Tokenizer


class Generator:
    """Samples from a denoiser. `sample_shape` is one example's shape: [h, w, 3] or [t, h, w, 3].

    With a `mesh` (the model's parameters sharded on it, e.g. during training), the inputs
    are replicated over the mesh and so is the output, so every process of a multi-process
    job can call it and read the samples.
    """

    def __init__(self, model: Denoiser, diffusion: Diffusion, tokenizer: Tokenizer,
                 max_length: int, sample_shape: Sequence[int], *, sampler: str = "ddim",
                 steps: int = 25, batch_size: int = 32, mesh: Mesh | None = None):
        if steps < 1:
            raise ValueError(f"sampler steps must be >= 1, got {steps}")
        self.graphdef, self.state = nnx.split(model)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.sample_shape = tuple(sample_shape)
        self.batch_size = batch_size
        null = tokenizer.encode_batch([NULL_PROMPT], max_length)
        self.null_tokens = (jnp.asarray(null.ids), jnp.asarray(null.mask))

        def run(state, ids, mask, null_ids, null_mask, z_init, rng, scale):
            model: Denoiser = nnx.merge(self.graphdef, state)
            cond = model.encode_text(ids, mask)
            null_cond = model.encode_text(null_ids, null_mask)
            fn = classifier_free_guidance(model, cond, null_cond, scale)
            # The sampler applies the config's thresholding (diffusion.thresholding) itself.
            return sample(sampler, fn, z_init.shape, rng, diffusion, steps=steps, z_init=z_init)

        self.mesh = mesh
        self._run = jax.jit(run) if mesh is None else jax.jit(run, out_shardings=replicated(mesh))

    def with_params(self, *states: nnx.State) -> "Generator":
        """Use these parameter states (e.g. the EMA and the frozen weights) from now on."""
        nnx.update(model := nnx.merge(self.graphdef, self.state), *states)
        self.state = nnx.state(model)
        return self

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int],
                 guidance: float | Sequence[float] = 3.0) -> np.ndarray:
        """uint8 samples [n, *sample_shape] for n prompts with one seed (and scale) each."""
        prompts = list(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds: give one seed "
                             "per prompt")
        scales = np.broadcast_to(np.asarray(guidance, np.float32), (len(prompts),))
        if np.any(scales < 0):
            raise ValueError(f"guidance scales must be >= 0 (1 = no guidance), got {guidance}")
        tokens = self.tokenizer.encode_batch(prompts, self.max_length)
        out = []
        for i in range(0, len(prompts), self.batch_size):
            sl = slice(i, i + self.batch_size)
            z = jnp.stack([jax.random.normal(jax.random.key(int(s)), self.sample_shape)
                           for s in seeds[sl]])
            rng = jax.random.key_data(jax.random.key(int(seeds[sl][0]) + 7919 * i))
            inputs = (tokens.ids[sl], tokens.mask[sl], *self.null_tokens, z, rng, scales[sl])
            inputs = (jax.tree.map(jnp.asarray, inputs) if self.mesh is None
                      else host_replicated(jax.device_get(inputs), self.mesh))
            *inputs, rng, scale = inputs
            x = self._run(self.state, *inputs, jax.random.wrap_key_data(rng), scale)
            out.append(to_uint8(local_value(x)))
        return np.concatenate(out)


def to_uint8(x: jax.Array) -> np.ndarray:
    """[-1, 1] floats -> uint8 pixels."""
    return np.asarray(jnp.round((jnp.clip(x, -1, 1) + 1) * 127.5), dtype=np.uint8)
