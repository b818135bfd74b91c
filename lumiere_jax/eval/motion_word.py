"""Does a video model read the caption's motion word? A probe built once, then run on any
weights of the model: the trainer logs it during training, `lumiere eval` reports it.

For the first n moving clips of the seen ('test') split, noised (the config's frame-correlated
noise, one draw) to a log-SNR, the probe compares the MSE of the model's prediction of its
target (v or eps) with the clip's own caption ('true') and with the caption that names another
motion ('opposite'). 'gap' is opposite - true (> 0 when the motion word helps) and 'wins' the
fraction of clips on which the true caption gives the strictly lower error.

The other motion is the opposite one by default ("right" for "left"): whether the model reads
the word at all. `contrast="neighbour"` takes the motion 45 degrees away instead ("down-left"
for "left"), a smaller difference: a model can read the word well enough to tell left from
right and still blur it with its neighbour (its samples then drift that way).

A model that ignores the word has gap 0 and wins near 0.5 (exactly 0 when both captions encode
alike, as ties do not count). The gap a perfect model reaches is largest at low log-SNR, where
the caption is all it has to place the object in each frame; a sampled clip moves as its
caption says only if that gap is there.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.multihost_utils import process_allgather
from ml_collections import ConfigDict

from lumiere_jax.data.pipeline import world_from_config
from lumiere_jax.data.synthetic import ShapesSource, caption_for, neighbour_motion, opposite_motion
from lumiere_jax.diffusion import schedules
from lumiere_jax.diffusion.schedules import Diffusion
from lumiere_jax.generate import from_uint8
from lumiere_jax.text.tokenizers import Tokenizer

MOTION_PROBE_LOGSNRS = (-8.0, -4.0, -2.0, 0.0, 2.0)
MOTION_CONTRASTS = {"opposite": opposite_motion, "neighbour": neighbour_motion}


class MotionWordProbe:
    """Clips, both captions' tokens, the noise and one compiled program, made once; each call
    runs it on the given weights (`nnx.merge(graphdef, *states)`), so probing every few hundred
    training steps costs forward passes only."""

    def __init__(self, graphdef: nnx.GraphDef, tokenizer: Tokenizer, max_length: int,
                 config: ConfigDict, n: int, logsnrs=MOTION_PROBE_LOGSNRS,
                 contrast: str = "opposite"):
        if contrast not in MOTION_CONTRASTS:
            raise ValueError(f"unknown motion-word contrast {contrast!r}; choose one of "
                             f"{', '.join(MOTION_CONTRASTS)}")
        other_motion = MOTION_CONTRASTS[contrast]
        world = world_from_config(config)
        if world.num_frames < 2:
            raise ValueError("the motion-word probe needs a video world (world.num_frames > 1); "
                             f"this config's world has {world.num_frames} frame")
        source = ShapesSource(world, "test", max(8 * n, 64))
        moving = (ex for ex in map(source.__getitem__, range(len(source)))
                  if ex["attrs"]["motion"] != "still")
        clips = list(itertools.islice(moving, n))  # renders only until n are found
        if not clips:
            raise ValueError(f"the motion-word probe needs n >= 1 moving clips, got n={n}")
        wrong = [caption_for({**ex["attrs"], "motion": other_motion(ex["attrs"]["motion"])})
                 for ex in clips]
        tokens = [tokenizer.encode_batch(c, max_length)
                  for c in ([ex["caption"] for ex in clips], wrong)]
        self.ids = jnp.asarray(np.stack([t.ids for t in tokens]))  # [2, n, L]: true, other
        self.mask = jnp.asarray(np.stack([t.mask for t in tokens]))
        self.logsnrs = tuple(float(v) for v in logsnrs)
        diffusion = Diffusion.from_config(config.diffusion)
        x = jnp.asarray(from_uint8(np.stack([ex["video"] for ex in clips])))
        eps = diffusion.noise(jax.random.key(config.eval.seed), x.shape)

        @jax.jit
        def errors(states, ids, mask, logsnr):  # [2n]: per clip, in the model's target units
            model = nnx.merge(graphdef, *states)
            alpha, sigma = schedules.alpha_sigma(logsnr)
            target = schedules.prediction_from_x0_eps(diffusion.prediction, x, eps, logsnr)
            # Both captions in one batch, so that a model blind to the word gives both the
            # same errors to the bit.
            z = jnp.concatenate([alpha * x + sigma * eps] * 2)
            prediction = model(z, jnp.full((z.shape[0],), logsnr),
                               model.encode_text(ids.reshape(z.shape[0], -1),
                                                 mask.reshape(z.shape[0], -1)))
            return jnp.mean((prediction - jnp.concatenate([target] * 2)) ** 2,
                            axis=(1, 2, 3, 4))

        self._errors = errors

    def __call__(self, *states: nnx.State) -> dict[str, dict[str, float]]:
        """{log-SNR as text: {true, opposite, gap, wins}} for the model with these weights.
        Every process of a multi-host job calls it (the errors are gathered to each)."""
        out = {}
        for logsnr in self.logsnrs:
            errors = np.asarray(process_allgather(
                self._errors(states, self.ids, self.mask, jnp.float32(logsnr)), tiled=True))
            true, opposite = np.split(errors, 2)  # the statistics on the host: exact ties
            out[f"{logsnr:g}"] = {"true": float(true.mean()), "opposite": float(opposite.mean()),
                                  "gap": float((opposite - true).mean()),
                                  "wins": float(np.mean(true < opposite))}
        return out

    def scalars(self, *states: nnx.State) -> dict[str, float]:
        """The same as flat metrics: motion_word_gap/-8, motion_word_wins/-8,
        motion_word_true/-8 (the error with the true caption: at high log-SNR, whether the
        fine levels are learned), ..."""
        return {f"motion_word_{name}/{logsnr}": values[name]
                for logsnr, values in self(*states).items() for name in ("gap", "wins", "true")}
