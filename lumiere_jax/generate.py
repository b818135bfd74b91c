"""Text -> pixels with a trained denoiser: classifier-free guided DDIM/DDPM sampling.

The text is encoded once per prompt, outside the denoising loop, and the conditional and
unconditional predictions share one batched network call per step. Each sample's starting
noise comes from its own seed, so with DDIM (eta 0) a (prompt, seed) pair gives the same output
whatever else is in the batch; DDPM's per-step noise is drawn per batch.

Videos can be sampled window by window with MultiDiffusion (`window` < frames): the denoiser
then sees `window` frames at a time and the overlapping windows are reconciled at every step.
The SSR stage is sampled this way, with the low-resolution video as per-frame conditioning:
it is noised to the fixed augmentation level `aug_logsnr` (as in training) and cut into the
same windows as the high-resolution sample.

Data-parallel sampling (`devices`): each batch is split over a process's local devices, the
model replicated on each, so N devices sample N times the examples in the same time. A batch
of n examples on up to D devices runs ceil(n / D) examples per device on the fewest devices
that allows, padded with its last example where the split is uneven (the padding is dropped
from the output). The outputs equal one device's: each example's noise comes from its own seed,
and a padded batch only appends examples, which leaves the earlier ones' per-batch noise as it
was (JAX's partitionable threefry, the default, draws noise independently of the shape and
sharding of the batch).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from lumiere_jax.diffusion import schedules
from lumiere_jax.diffusion.guidance import classifier_free_guidance
from lumiere_jax.diffusion.masks import masked_video
from lumiere_jax.diffusion.multidiffusion import multidiffusion, window_starts
from lumiere_jax.diffusion.multidiffusion import window_weights as window_weights_of
from lumiere_jax.diffusion.samplers import ddim_invert, replace_known, sample
from lumiere_jax.diffusion.schedules import Diffusion
from lumiere_jax.diffusion.ssr import augment_condition, project_to_low_res
from lumiere_jax.models.denoiser import Denoiser
from lumiere_jax.models.ssr import SSR, upsample_video
from lumiere_jax.models.stunet import STUNet
from lumiere_jax.parallel.mesh import (
    batch_spec,
    data_mesh,
    host_replicated,
    local_value,
    replicated,
)
from lumiere_jax.text.encoder import NULL_PROMPT
from lumiere_jax.text.tokenizers import Tokenizer

CONDITIONINGS = ("replace", "model", "both")


class Generator:
    """Samples from a denoiser. `sample_shape` is one example's shape: [h, w, 3] or [t, h, w, 3].

    With a `mesh` (the model's parameters sharded on it, e.g. during training), the inputs
    are replicated over the mesh and so is the output, so every process of a multi-process
    job can call it and read the samples.

    With `devices` (data-parallel sampling; see the module docstring), the model is replicated
    on this process's devices and each batch is split over them: an int samples on the first
    `devices` local devices (0: all of them), a list on those devices. Without either, every
    batch runs on the default device.
    """

    def __init__(self, model: Denoiser, diffusion: Diffusion, tokenizer: Tokenizer,
                 max_length: int, sample_shape: Sequence[int], *, sampler: str = "ddim",
                 steps: int = 25, batch_size: int = 32, mesh: Mesh | None = None,
                 devices: int | Sequence[jax.Device] | None = None, window: int = 0,
                 overlap: int = 2, window_weights: str = "uniform",
                 aug_logsnr: float = float("inf"), low_res_consistency: bool = False,
                 frame_correlation: float | None = None,
                 guidance_interval: tuple[float, float] | None = None):
        """window: MultiDiffusion window in frames (0: the whole clip); overlap and
        window_weights as in diffusion.multidiffusion. frame_correlation: the correlation
        between frames of all the noise the sampler draws (each seed's starting noise, DDPM's
        and re-noising's fresh noise, SDEdit's), None: the diffusion's, as in training. A
        value above the training one makes the frozen per-frame layers start every frame from
        a more similar layout (README Stage 1, session 27). aug_logsnr: the SSR's conditioning
        augmentation level at sampling time (+inf: the low-res video is used as it is).
        low_res_consistency: for an SSR, every clean estimate of the sampler is projected onto
        the videos whose block means are the low-res input (`project_to_low_res`), so the
        network only decides what downsampling removed. guidance_interval: (low, high)
        log-SNRs; the guidance scale applies only to the sampler's steps whose level is in
        [low, high] and every other step is conditional (scale 1), as in Kynkaenniemi et al.
        2024: e.g. (-inf, -1) guides the levels where the caption still decides the layout
        and leaves the fine levels, where strong guidance costs detail, alone. None: all."""
        if steps < 1:
            raise ValueError(f"sampler steps must be >= 1, got {steps}")
        if frame_correlation is not None:
            if not 0.0 <= frame_correlation < 1.0:
                raise ValueError(f"sampling frame_correlation is a correlation in [0, 1) (None: "
                                 f"the diffusion's, {diffusion.frame_correlation}), got "
                                 f"{frame_correlation}")
            diffusion = dataclasses.replace(diffusion, frame_correlation=float(frame_correlation))
        if guidance_interval is not None:
            low, high = (float(v) for v in guidance_interval)
            if not low <= high:
                raise ValueError(f"guidance_interval is (low, high) in log-SNR with low <= high, "
                                 f"got {tuple(guidance_interval)}")
            guidance_interval = (low, high)
        self.graphdef, self.state = nnx.split(model)
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.sample_shape = tuple(sample_shape)
        self.batch_size = batch_size
        self.scale = model.net.cfg.scale if isinstance(model.net, SSR) else None
        residual = self.scale is not None and model.net.cfg.residual
        residual_base = model.net.cfg.residual_base if residual else None
        frames = self.sample_shape[0] if len(self.sample_shape) == 4 else 1
        window = window or frames
        if len(self.sample_shape) == 3 and window != 1:
            raise ValueError(f"MultiDiffusion windows are for videos; sample_shape "
                             f"{self.sample_shape} is an image (use window=0)")
        overlap = overlap if window < frames else 0  # one window: nothing overlaps
        window_starts(frames, window, overlap)  # bad windows fail here, not at the first call
        window_weights_of(window, overlap, window_weights)

        def denoiser(model, cond, null_cond, scale, aug, low_res, use_guidance):
            """fn(z, logsnr): the guided prediction (MultiDiffusion windows for a video)."""

            def guided(z, logsnr, low_res_window=None):
                c, n = cond, null_cond
                if low_res_window is not None:  # the SSR's low-res window and its level
                    extra = {"low_res": low_res_window, "aug_logsnr": aug}
                    c, n = {**c, **extra}, {**n, **extra}
                # The sampler applies the config's thresholding (diffusion.thresholding).
                if not use_guidance:  # every scale is 1: the conditional prediction alone
                    return model(z, jnp.broadcast_to(logsnr, (z.shape[0],)), c)
                w = scale
                if guidance_interval is not None:  # outside it, the conditional prediction
                    low, high = guidance_interval
                    w = jnp.where((logsnr >= low) & (logsnr <= high), scale, 1.0)
                return classifier_free_guidance(model, c, n, w)(z, logsnr)

            if len(self.sample_shape) == 4:
                return multidiffusion(guided, frames, window, overlap, window_weights,
                                      frame_cond=low_res)
            return guided

        def local_prediction(state, z, logsnr, cond, null_cond, scale, aug, low_res, *,
                             use_guidance):
            """The prediction for one device's examples (data-parallel sampling)."""
            model: Denoiser = nnx.merge(self.graphdef, state)
            return denoiser(model, cond, null_cond, scale, aug, low_res, use_guidance)(z, logsnr)

        def run(state, ids, mask, null_ids, null_mask, z_init, rng, scale, low_res, edit,
                start_t, use_guidance, conditioning, batch_mesh, resample):
            model: Denoiser = nnx.merge(self.graphdef, state)
            cond = model.encode_text(ids, mask)
            null_cond = model.encode_text(null_ids, null_mask)
            aug = jnp.full((z_init.shape[0],), aug_logsnr, jnp.float32)

            edit = edit or {}
            if "known" in edit and conditioning != "replace":  # the model sees the known part
                masked = {"masked": masked_video(edit["known"], edit["known_mask"])}
                cond, null_cond = {**cond, **masked}, {**null_cond, **masked}

            base, x0_transform = None, None
            if low_res is not None:
                if residual:  # the sample is the residual over the given video, upsampled
                    base = upsample_video(low_res, z_init.shape[-3:-1], residual_base)
                if low_res_consistency:
                    x0_transform = functools.partial(
                        _consistent_with, low_res=low_res, scale=self.scale,
                        base=0.0 if base is None else base)
                aug_rng, rng = jax.random.split(rng)
                low_res = augment_condition(low_res, aug, aug_rng)

            def prediction(cond, use_guidance):
                if batch_mesh is None:
                    return denoiser(model, cond, null_cond, scale, aug, low_res, use_guidance)
                # Data-parallel: every device runs the network on its own examples alone (no
                # window or guidance batch is ever gathered). The sampler around it, with its
                # per-example arithmetic and its noise (drawn the same whatever the sharding),
                # stays one SPMD program over the whole batch.
                batch = batch_spec(batch_mesh)
                step = jax.shard_map(
                    functools.partial(local_prediction, use_guidance=use_guidance),
                    mesh=batch_mesh, in_specs=(PartitionSpec(), *[batch] * 7),
                    out_specs=batch)

                def fn(z, logsnr):  # one level per example, split like z
                    logsnr = jnp.broadcast_to(logsnr, (z.shape[0],))
                    return step(state, z, logsnr, cond, null_cond, scale, aug, low_res)

                return fn

            fn = prediction(cond, use_guidance)
            if "source_ids" in edit:  # SDEdit from the input's DDIM inversion, unguided
                source = {**cond, **model.encode_text(edit["source_ids"], edit["source_mask"])}
                z_init = ddim_invert(prediction(source, False), edit["init"], diffusion,
                                     steps=steps, end_t=start_t)
            elif "init" in edit and start_t < 1.0:  # SDEdit: the input noised to start_t
                alpha, sigma = schedules.alpha_sigma(
                    schedules.per_example(diffusion.logsnr(start_t), z_init))
                z_init = alpha * edit["init"] + sigma * z_init
            z_transform = (replace_known(edit["known"], edit["known_mask"], diffusion.noise)
                           if "known" in edit and conditioning != "model" else None)
            x = sample(sampler, fn, z_init.shape, rng, diffusion, steps=steps, z_init=z_init,
                       start_t=start_t, x0_transform=x0_transform, z_transform=z_transform,
                       clip_output=base is None, resample=resample)
            return x if base is None else jnp.clip(base + x, -1.0, 1.0)

        def estimate(state, ids, mask, x0, eps, logsnr):
            """The unguided one-step clean estimate from x0 noised to one level (a scalar)."""
            model: Denoiser = nnx.merge(self.graphdef, state)
            alpha, sigma = schedules.alpha_sigma(logsnr)
            z = alpha * x0 + sigma * eps
            logsnr = jnp.full((x0.shape[0],), logsnr, jnp.float32)
            fn = denoiser(model, model.encode_text(ids, mask), None, None, None, None, False)
            return schedules.x0_eps_from_prediction(diffusion.prediction,
                                                    fn(z, logsnr).astype(jnp.float32), z,
                                                    logsnr)[0]

        out_replicated = {} if mesh is None else {"out_shardings": replicated(mesh)}
        self.diffusion = diffusion
        self._estimate = jax.jit(estimate, **out_replicated)
        self.mesh = mesh
        self.devices = None if devices is None else sampling_devices(devices)
        if mesh is not None and self.devices is not None:
            raise ValueError("give the Generator a mesh (the model sharded on it, every example "
                             "on every device) or devices (the examples split over them), not "
                             "both")
        self._placements: dict[int, tuple[Mesh, nnx.State]] = {}
        if self.devices is not None:
            self.state = self._replicate(self.state)
        self._run = jax.jit(run, static_argnames=("start_t", "use_guidance", "conditioning",
                                                  "batch_mesh", "resample"), **out_replicated)
        self.conditional = isinstance(model.net, STUNet) and model.net.cfg.cond_channels > 0
        self.window = window
        self.guidance_interval = guidance_interval

    def with_params(self, *states: nnx.State) -> "Generator":
        """Use these parameter states (e.g. the EMA and the frozen weights) from now on.

        The states held before (`self.state`, and the model the generator was made from,
        whose variables it shares) are left as they were: the update goes into a copy."""
        nnx.update(model := nnx.merge(self.graphdef, self.state, copy=True), *states)
        self.state = nnx.state(model)
        if self.devices is not None:
            self.state = self._replicate(self.state)
            self._placements.clear()
        return self

    @property
    def num_devices(self) -> int:
        """How many devices a full batch is split over (1 without data-parallel sampling)."""
        return 1 if self.devices is None else len(self.devices)

    def _replicate(self, state: nnx.State) -> nnx.State:
        return jax.device_put(state, replicated(data_mesh(self.devices)))

    def _placement(self, used: int) -> tuple[Mesh, nnx.State]:
        """The mesh of the first `used` sampling devices and the state replicated on it: the
        buffers the full replica already holds on those devices, not a copy."""
        if used not in self._placements:
            devices = self.devices[:used]
            mesh = data_mesh(devices)
            state = self.state
            if used < len(self.devices):
                sharding = replicated(mesh)

                def view(x):
                    shards = {shard.device: shard.data for shard in x.addressable_shards}
                    return jax.make_array_from_single_device_arrays(
                        x.shape, sharding, [shards[d] for d in devices])

                state = jax.tree.map(view, state)
            self._placements[used] = (mesh, state)
        return self._placements[used]

    def _place(self, batch, shared, used: int | None):
        """(batch inputs, shared inputs, state, the data-parallel mesh or None) where the
        sampling function runs: replicated over `mesh`, the batch split over the first `used`
        devices (data-parallel), or on the default device."""
        if self.mesh is not None:
            batch, shared = host_replicated(jax.device_get((batch, shared)), self.mesh)
            return batch, shared, self.state, None
        if used is None:
            batch, shared = jax.tree.map(jnp.asarray, (batch, shared))
            return batch, shared, self.state, None
        mesh, state = self._placement(used)
        batch = jax.device_put(jax.device_get(batch), NamedSharding(mesh, batch_spec(mesh)))
        shared = jax.device_put(jax.device_get(shared), replicated(mesh))
        return batch, shared, state, mesh

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int],
                 guidance: float | Sequence[float] = 3.0,
                 low_res: np.ndarray | None = None, progress: str | None = None, *,
                 known: np.ndarray | None = None, known_mask: np.ndarray | None = None,
                 init: np.ndarray | None = None, strength: float = 1.0,
                 conditioning: str = "replace",
                 negative_prompts: Sequence[str] | None = None, invert: bool = False,
                 source_prompts: Sequence[str] | None = None, resample: int = 1) -> np.ndarray:
        """uint8 samples [n, *sample_shape] for n prompts with one seed (and scale) each.

        low_res: for an SSR model, the low-resolution videos to upsample, [n, t, H/scale,
        W/scale, 3], uint8 pixels or floats in [-1, 1] (e.g. the base model's samples).
        progress: a label for a progress bar over the samples (None: no bar).
        known, known_mask: training-free conditioning on known pixels (image-to-video,
          inpainting, cinemagraphs): known [n, *sample_shape] (uint8 or [-1, 1] floats) and
          known_mask [n, *sample_shape[:-1], 1] (1 = keep the known pixel, 0 = generate). At
          every step the known region is replaced by the known pixels noised to that step's
          level, so the sample equals `known` exactly where known_mask is 1.
        conditioning: how the known pixels steer the sample: "replace" (the training-free way
          above), "model" (a conditional STUNet, fine-tuned with masks, sees the masked video
          and the mask as input; nothing is replaced) or "both".
        init, strength: SDEdit. init [n, *sample_shape] is noised (with each seed's noise) to
          diffusion time `strength` in [0, 1] and denoised from there with the prompt:
          strength 0 returns init, strength 1 is plain sampling from the seed.
        negative_prompts: one caption per prompt for guidance to steer away from: the second
          branch of classifier-free guidance reads it instead of the empty caption, so scale w
          gives c + (w - 1)(c - c_negative). "" (or None for all) is the empty caption. E.g.
          SDEdit with the input's own caption as the negative prompt pushes away from it.
        invert, source_prompts: SDEdit from a DDIM inversion (samplers.ddim_invert) of init
          under its caption (source_prompts, one per prompt; None or "": the empty caption),
          unguided, up to `strength`, instead of init noised with the seed's noise: the edit
          starts where the input's own deterministic path was, so the seed plays no part and
          strength 1 is no longer plain sampling. Needs the DDIM sampler.
        resample: each sampler step taken this many times, re-noised in between (RePaint's
          resampling, diffusion.samplers): costs `resample` times the model calls; with known
          pixels or an SDEdit it gives the sample that many chances per level to reconcile
          the input with the prompt. 1: each step once.
        """
        prompts = list(prompts)
        if not isinstance(resample, (int, np.integer)) or resample < 1:
            raise ValueError(f"resample must be an int >= 1 (1: each sampler step once), got "
                             f"{resample!r}")
        low_res = self._check_low_res(low_res, len(prompts))
        edit = self._check_edit(len(prompts), known, known_mask, init, strength)
        if invert:
            edit.update(self._source_tokens(len(prompts), init, source_prompts))
        elif source_prompts is not None:
            raise ValueError("source_prompts are the captions a DDIM inversion of init is run "
                             "under: pass invert=True as well, or leave them out")
        self._check_conditioning(conditioning, "known" in edit)
        if init is not None and strength == 0.0:
            return to_uint8(edit["init"])
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds: give one seed "
                             "per prompt")
        scales = np.broadcast_to(np.asarray(guidance, np.float32), (len(prompts),))
        if np.any(scales < 0):
            raise ValueError(f"guidance scales must be >= 0 (1 = no guidance), got {guidance}")
        tokens = self.tokenizer.encode_batch(prompts, self.max_length)
        negatives = [NULL_PROMPT] * len(prompts) if negative_prompts is None else [
            p or NULL_PROMPT for p in negative_prompts]
        if len(negatives) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(negatives)} negative prompts:"
                             " give one per prompt (\"\" for none)")
        null = self.tokenizer.encode_batch(negatives, self.max_length)
        out = []
        bar = tqdm(total=len(prompts), desc=progress, unit="sample", disable=progress is None)
        for i, n, idx, used in self._batches(len(prompts)):
            z = self._seed_noise(seeds, idx)
            rng = jax.random.key_data(jax.random.key(int(seeds[i]) + 7919 * i))
            batch = (tokens.ids[idx], tokens.mask[idx], null.ids[idx], null.mask[idx], z,
                     scales[idx], None if low_res is None else low_res[idx],
                     {k: v[idx] for k, v in edit.items()} or None)
            (ids, mask, null_ids, null_mask, z, scale, low, batch_edit), rng, state, mesh = \
                self._place(batch, rng, used)
            x = self._run(state, ids, mask, null_ids, null_mask, z,
                          jax.random.wrap_key_data(rng), scale, low, batch_edit,
                          start_t=float(strength) if init is not None else 1.0,
                          use_guidance=bool(np.any(scales[i : i + n] != 1.0)),
                          conditioning=conditioning,
                          batch_mesh=mesh, resample=int(resample))
            out.append(to_uint8(local_value(x)[:n]))
            bar.update(len(out[-1]))
        bar.close()
        return np.concatenate(out)

    def _batches(self, total: int):
        """(start, size, example indices, devices used) of each batch of `total` examples; with
        data-parallel sampling the indices are padded with the batch's last example so that
        they split evenly over the devices used (None: no data-parallel split)."""
        for i in range(0, total, self.batch_size):
            n = min(self.batch_size, total - i)
            idx, used = np.arange(i, i + n), None
            if self.devices is not None:
                used, padded = data_parallel_split(n, len(self.devices))
                idx = np.concatenate([idx, np.full(padded - n, i + n - 1)])
            yield i, n, idx, used

    def _seed_noise(self, seeds: Sequence[int], idx: np.ndarray) -> jax.Array:
        """The starting noise of the examples idx, each from its own seed."""
        z = jnp.stack([jax.random.normal(jax.random.key(int(seeds[j])), self.sample_shape)
                       for j in idx])
        return schedules.correlate_frames(z, self.diffusion.frame_correlation)

    def clean_estimates(self, prompts: Sequence[str], x: np.ndarray, t: float,
                        seeds: Sequence[int]) -> np.ndarray:
        """The model's one-step clean estimates [n, *sample_shape] (float32, [-1, 1] range) of
        x (uint8 or [-1, 1] floats, [n, *sample_shape]) noised to diffusion time t in (0, 1]
        with each seed's noise (the noise SDEdit uses for that seed), conditional on each
        prompt and unguided. Two calls with the same seeds see the same noisy input, so their
        difference is what the prompts change (editing.edit_region)."""
        prompts = list(prompts)
        if not 0.0 < t <= 1.0 or len(seeds) != len(prompts):
            raise ValueError(f"clean_estimates: t must be in (0, 1] and there must be one seed "
                             f"per prompt; got t={t}, {len(prompts)} prompts, {len(seeds)} "
                             "seeds")
        x = self._check_edit(len(prompts), None, None, x, t)["init"]
        tokens = self.tokenizer.encode_batch(prompts, self.max_length)
        logsnr = float(self.diffusion.logsnr(t))
        out = []
        for _, n, idx, used in self._batches(len(prompts)):
            batch = (tokens.ids[idx], tokens.mask[idx], x[idx], self._seed_noise(seeds, idx))
            (ids, mask, x0, eps), _, state, _ = self._place(batch, (), used)
            out.append(np.asarray(local_value(self._estimate(state, ids, mask, x0, eps,
                                                             logsnr)))[:n])
        return np.concatenate(out)

    def _source_tokens(self, n: int, init, source_prompts) -> dict[str, np.ndarray]:
        """The tokens DDIM inversion reads (`invert=True`), after checking it can run."""
        if init is None:
            raise ValueError("invert=True inverts the videos given as init (SDEdit): give init "
                             "and a strength")
        if self.sampler != "ddim":
            raise ValueError(f"invert=True needs the DDIM sampler, whose deterministic steps "
                             f"retrace the inverted path; this generator uses {self.sampler!r} "
                             "(set sample.sampler='ddim')")
        sources = [""] * n if source_prompts is None else list(source_prompts)
        if len(sources) != n:
            raise ValueError(f"got {n} prompts but {len(sources)} source prompts: give one "
                             "per prompt (the caption of its input video, \"\" for none)")
        tokens = self.tokenizer.encode_batch([p or NULL_PROMPT for p in sources],
                                             self.max_length)
        return {"source_ids": tokens.ids, "source_mask": tokens.mask}

    def _check_conditioning(self, conditioning: str, has_known: bool) -> None:
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got "
                             f"{conditioning!r}")
        if conditioning == "replace":
            return
        if not has_known:  # nothing to show the model: refused, not quietly sampled plain
            raise ValueError(f"conditioning={conditioning!r} shows the model the known pixels, "
                             "and none were given: pass known and known_mask (image-to-video, "
                             "inpainting) or leave conditioning at 'replace'")
        if not self.conditional:
            raise ValueError(f"conditioning={conditioning!r} needs a conditional STUNet (model."
                             "temporal.cond_channels=4, fine-tuned with masks: configs/"
                             "shapes_stunet.py:masked); this model only supports 'replace'")
        if self.window < self.sample_shape[0]:
            raise ValueError("the conditional model samples the whole clip at once; set "
                             f"window=0 (got window {self.window} < {self.sample_shape[0]} "
                             "frames)")

    def _check_edit(self, n: int, known, known_mask, init, strength: float
                    ) -> dict[str, np.ndarray]:
        """The editing inputs as float32 arrays, after checking their shapes and values."""
        edit = {}
        shape = (n, *self.sample_shape)
        if (known is None) != (known_mask is None):
            raise ValueError("known and known_mask go together: give both (the pixels to keep "
                             "and where they are) or neither")
        if known is not None:
            edit["known"] = _pixels(known, shape, "known")
            mask = np.asarray(known_mask, np.float32)
            if mask.shape != shape[:-1] + (1,):
                raise ValueError(f"known_mask must have shape {shape[:-1] + (1,)} (1 = keep, "
                                 f"0 = generate), got {mask.shape}")
            if mask.min() < 0 or mask.max() > 1:
                raise ValueError(f"known_mask values must lie in [0, 1], got [{mask.min()}, "
                                 f"{mask.max()}]")
            edit["known_mask"] = mask
        if not 0.0 <= float(strength) <= 1.0:
            raise ValueError(f"strength is a diffusion time in [0, 1] (0 keeps the input, 1 "
                             f"ignores it), got {strength}")
        if init is not None:
            edit["init"] = _pixels(init, shape, "init")
        return edit

    def _check_low_res(self, low_res: np.ndarray | None, n: int) -> np.ndarray | None:
        """The SSR's low-res input as float32 in [-1, 1], after checking it fits the model."""
        if self.scale is None:
            if low_res is not None:
                raise ValueError("low_res is the input of an SSR model; this generator samples "
                                 "a text-to-image/video model, which takes prompts only")
            return None
        t, hh, ww, c = self.sample_shape
        want = (n, t, hh // self.scale, ww // self.scale, c)
        if low_res is None or tuple(np.shape(low_res)) != want:
            got = None if low_res is None else tuple(np.shape(low_res))
            raise ValueError(
                f"the SSR upsamples low-resolution videos by {self.scale}x: low_res must have "
                f"shape {want} (one per prompt, [n, frames, h, w, 3]), got {got}")
        low_res = np.asarray(low_res)
        return from_uint8(low_res) if low_res.dtype == np.uint8 else low_res.astype(np.float32)


def _consistent_with(x0: jax.Array, *, low_res: jax.Array, scale: int, base) -> jax.Array:
    """x0 (the residual over `base`, or the frames for base 0) made consistent with low_res."""
    return project_to_low_res(base + x0, low_res, scale) - base


def sampling_devices(devices: int | Sequence[jax.Device]) -> list[jax.Device]:
    """The devices of data-parallel sampling: the first `devices` of this process's local
    devices (0: all of them), or the given devices (this process's)."""
    local = jax.local_devices()
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        count = int(devices) or len(local)
        if not 1 <= count <= len(local):
            raise ValueError(f"devices={devices}: this process has {len(local)} local "
                             f"device(s); sample on 1 to {len(local)} of them (0: all; the "
                             "config key is sample.devices)")
        return local[:count]
    devices = list(devices)
    if not devices:
        raise ValueError("devices is empty: give a device count (0: all local devices) or a "
                         "list of local devices")
    foreign = [d for d in devices if d.process_index != jax.process_index()]
    if foreign:
        raise ValueError(f"devices {foreign} belong to other processes; a Generator samples "
                         "on its own process's devices (each process samples its own items)")
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices {devices} names a device more than once")
    return devices


def sample_device_count(devices: int) -> int:
    """A config's sample.devices as a count of local devices: 0 is all of them."""
    if isinstance(devices, bool) or not isinstance(devices, (int, np.integer)):
        raise ValueError(f"sample.devices must be an int (0: all local devices, 1: one), got "
                         f"{devices!r}")
    return len(sampling_devices(int(devices)))


def data_parallel_split(n: int, devices: int) -> tuple[int, int]:
    """(devices used, padded batch size) for a batch of `n` examples on up to `devices`
    devices: ceil(n / devices) examples per device, the fewest possible, on the fewest devices
    that allows, so the padding is less than one device's share."""
    if n < 1 or devices < 1:
        raise ValueError(f"cannot split {n} examples over {devices} devices")
    per_device = -(-n // devices)
    used = -(-n // per_device)
    return used, used * per_device


def _pixels(x: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    """uint8 pixels or [-1, 1] floats of the given shape -> float32 in [-1, 1]."""
    x = np.asarray(x)
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {shape} ([n, *sample_shape]), got {x.shape}")
    return from_uint8(x) if x.dtype == np.uint8 else x.astype(np.float32)


def from_uint8(pixels) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1] (the inverse of to_uint8 on its outputs)."""
    return np.asarray(pixels).astype(np.float32) / 127.5 - 1.0


def to_uint8(x: jax.Array) -> np.ndarray:
    """[-1, 1] floats -> uint8 pixels."""
    return np.asarray(jnp.round((jnp.clip(x, -1, 1) + 1) * 127.5), dtype=np.uint8)
