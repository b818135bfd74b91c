"""DDIM and DDPM (ancestral) samplers for continuous-time Gaussian diffusion, plus hooks.

A sampler walks a uniform grid t_N = start_t > ... > t_1 > t_0 = 0 with one model call per
step, `fn(z, logsnr) -> prediction` (eps or v per the Diffusion config; wrap the model with
guidance.classifier_free_guidance for CFG). The last step lands on the clean level, treated
as logsnr = +inf (alpha = 1, sigma = 0): its z is the final x0 estimate.

Hooks, all traced into the loop:
  * x0_transform(x0) -> x0 on every x0 estimate, after the config's thresholding
    (static / Imagen dynamic); eps is then recomputed from z and the new x0 so the update
    stays consistent. For constraints on the clean estimate (inpainting, thresholds).
  * z_transform(z, logsnr_s, rng) -> z on every new state at level logsnr_s ([b]; +inf at
    the final, clean level). For training-free inpainting see replace_known().

resample = R > 1 is RePaint's resampling (Lugmayr et al., 2022): every step is taken R times,
the state carried back to the step's noisier level with fresh noise (renoise) between takes,
so a constrained sample (known pixels, an SDEdit region) has R model calls per level to
reconcile what is fixed with what the prompt asks for instead of one.

Everything is jittable (lax.fori_loop) and a deterministic function of the PRNG key; call the
samplers inside jax.jit with fn closed over.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from lumiere_jax.diffusion import schedules
from lumiere_jax.diffusion.schedules import Diffusion

PredictionFn = Callable[[jax.Array, jax.Array], jax.Array]
X0Transform = Callable[[jax.Array], jax.Array]
ZTransform = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
NoiseFn = Callable[[jax.Array, tuple[int, ...]], jax.Array]  # (rng, shape) -> N(0, 1) noise
SAMPLERS = ("ddim", "ddpm")


def static_threshold(x0: jax.Array) -> jax.Array:
    """Clip x0 to the data range [-1, 1]."""
    return jnp.clip(x0, -1.0, 1.0)


def dynamic_threshold(x0: jax.Array, percentile: float = 0.995) -> jax.Array:
    """Imagen's dynamic thresholding, per example.

    s = max(1, quantile_p(|x0|)); x0 -> clip(x0, -s, s) / s. Keeps x0 in [-1, 1]; leaves an
    example whose values are all in [-1, 1] unchanged (then s = 1).
    x0: [b, ...].
    """
    flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
    s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0)  # [b]
    s = schedules.per_example(s, x0).astype(x0.dtype)
    return jnp.clip(x0, -s, s) / s


def thresholding_transform(diffusion: Diffusion) -> X0Transform | None:
    """The x0 transform the config asks for, or None for 'none'."""
    if diffusion.thresholding == "static":
        return static_threshold
    if diffusion.thresholding == "dynamic":
        return lambda x0: dynamic_threshold(x0, diffusion.dynamic_percentile)
    return None


def noise_to(
    x0: jax.Array, t: float | jax.Array, rng: jax.Array, diffusion: Diffusion
) -> jax.Array:
    """z_t = alpha(t) x0 + sigma(t) eps: x0 [b, ...] noised to time t (scalar or [b]).

    SDEdit: sample from start_t = t with z_init = noise_to(x0, t, rng, diffusion); the
    strength t in [0, 1] sets how much of x0 survives.
    """
    alpha, sigma = schedules.alpha_sigma(schedules.per_example(diffusion.logsnr(t), x0))
    eps = diffusion.noise(rng, x0.shape)
    return (alpha * x0 + sigma * eps).astype(x0.dtype)


def replace_known(x_known: jax.Array, mask: jax.Array,
                  noise: NoiseFn = schedules.gaussian_noise) -> ZTransform:
    """A z_transform for training-free inpainting (and image-to-video, outpainting).

    After every step, the known region (mask = 1) of z is replaced by the known data noised
    to the step's level with fresh noise; at the final, clean level that is x_known itself,
    so the sample equals x_known exactly where mask = 1. Fractional masks blend linearly.

    Args:
      x_known: [b, ...] (or broadcastable), the observed data, in [-1, 1].
      mask: broadcastable to x_known's shape; 1 = known, 0 = to generate.
      noise: (rng, shape) -> noise, e.g. Diffusion.noise for frame-correlated noise.
    """
    x_known = jnp.asarray(x_known)
    mask = jnp.asarray(mask, jnp.float32)

    def transform(z: jax.Array, logsnr: jax.Array, rng: jax.Array) -> jax.Array:
        alpha, sigma = schedules.alpha_sigma(schedules.per_example(logsnr, z))
        z_known = alpha * x_known + sigma * noise(rng, z.shape)
        # mask * z_known + (1 - mask) * z is exactly z_known where mask == 1.
        return (mask * z_known + (1.0 - mask) * z).astype(z.dtype)

    return transform


def renoise(
    z_s: jax.Array, logsnr_s: jax.Array, logsnr_t: jax.Array, rng: jax.Array,
    noise: NoiseFn = schedules.gaussian_noise,
) -> jax.Array:
    """A draw from the forward transition q(z_t | z_s): z_s at level s carried to the noisier
    level t (logsnr_t <= logsnr_s; logsnr_s may be +inf, i.e. z_s is clean data).

    z_t = (alpha_t / alpha_s) z_s + sigma_t sqrt(1 - exp(logsnr_t - logsnr_s)) noise, which
    is distributed as alpha_t x0 + sigma_t eps whenever z_s is alpha_s x0 + sigma_s eps'.
    z_s: [b, ...]; logsnr_s, logsnr_t: [b].
    """
    alpha_t, sigma_t = schedules.alpha_sigma(schedules.per_example(logsnr_t, z_s))
    alpha_s, _ = schedules.alpha_sigma(schedules.per_example(logsnr_s, z_s))
    # The share of sigma_t^2 that is new noise.
    added = -jnp.expm1(schedules.per_example(logsnr_t - logsnr_s, z_s))
    return alpha_t / alpha_s * z_s + sigma_t * jnp.sqrt(added) * noise(rng, z_s.shape)


def ddim_step(
    x0: jax.Array,
    eps: jax.Array,
    logsnr_t: jax.Array,
    logsnr_s: jax.Array,
    eta: float | jax.Array,
    rng: jax.Array,
    noise: NoiseFn = schedules.gaussian_noise,
) -> jax.Array:
    """One DDIM step (Song et al., 2021) from level t to the cleaner level s.

    z_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c noise, with
    c^2 = eta^2 * Var(z_s | z_t, x0) = eta^2 sigma_s^2 (1 - exp(logsnr_t - logsnr_s)).
    eta = 0: deterministic (probability-flow-like); eta = 1: DDPM ancestral.
    x0, eps: [b, ...]; logsnr_t, logsnr_s: [b] (logsnr_s may be +inf).
    """
    alpha_s, sigma_s = schedules.alpha_sigma(schedules.per_example(logsnr_s, x0))
    # 1 - exp(lt - ls) with expm1: accurate when the two levels are close (many steps).
    keep_fraction = -jnp.expm1(schedules.per_example(logsnr_t - logsnr_s, x0))
    c_squared = jnp.square(eta) * jnp.square(sigma_s) * keep_fraction
    direction = jnp.sqrt(jnp.maximum(jnp.square(sigma_s) - c_squared, 0.0))
    z_s = alpha_s * x0 + direction * eps
    if isinstance(eta, (int, float)) and eta == 0:
        return z_s  # deterministic: skip drawing noise that would be multiplied by 0
    return z_s + jnp.sqrt(c_squared) * noise(rng, x0.shape)


def ddpm_step(
    z: jax.Array, x0: jax.Array, logsnr_t: jax.Array, logsnr_s: jax.Array, rng: jax.Array,
    noise: NoiseFn = schedules.gaussian_noise,
) -> jax.Array:
    """One ancestral step: a draw from q(z_s | z_t, x0) with the x0 estimate plugged in.

    With r = exp(logsnr_t - logsnr_s) = (alpha_t sigma_s / (alpha_s sigma_t))^2:
    mean = alpha_s (r z_t / alpha_t + (1 - r) x0), variance = sigma_s^2 (1 - r).
    z, x0: [b, ...]; logsnr_t, logsnr_s: [b] (logsnr_s may be +inf).
    """
    alpha_t, _ = schedules.alpha_sigma(schedules.per_example(logsnr_t, z))
    alpha_s, sigma_s = schedules.alpha_sigma(schedules.per_example(logsnr_s, z))
    log_r = schedules.per_example(logsnr_t - logsnr_s, z)
    r = jnp.exp(log_r)
    one_minus_r = -jnp.expm1(log_r)
    mean = alpha_s * (r / alpha_t * z + one_minus_r * x0)
    return mean + sigma_s * jnp.sqrt(one_minus_r) * noise(rng, z.shape)


def _check_common(shape: Sequence[int], steps: int, start_t: float, z_init) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Sampler: steps must be a positive int, got {steps!r}.")
    if not 0.0 < start_t <= 1.0:
        raise ValueError(
            f"Sampler: start_t must be in (0, 1] (1 = from pure noise), got {start_t}."
        )
    if z_init is None and start_t < 1.0:
        raise ValueError(
            f"Sampler: start_t={start_t} < 1 needs z_init at that noise level; make it with "
            "noise_to(x0, start_t, rng, diffusion) (SDEdit)."
        )
    if z_init is not None and tuple(z_init.shape) != tuple(shape):
        raise ValueError(f"Sampler: z_init has shape {z_init.shape}, expected {tuple(shape)}.")


def _sample(
    method: str,
    fn: PredictionFn,
    shape: Sequence[int],
    rng: jax.Array,
    diffusion: Diffusion,
    steps: int,
    eta: float | jax.Array,
    z_init: jax.Array | None,
    start_t: float,
    x0_transform: X0Transform | None,
    z_transform: ZTransform | None,
    clip_output: bool,
    resample: int,
) -> jax.Array:
    _check_common(shape, steps, start_t, z_init)
    if not isinstance(resample, int) or resample < 1:
        raise ValueError(f"Sampler: resample must be an int >= 1 (1: each step once), got "
                         f"{resample!r}.")
    shape = tuple(shape)
    batch = shape[0]
    init_rng, loop_rng = jax.random.split(rng)
    z = diffusion.noise(init_rng, shape) if z_init is None else z_init
    z = z.astype(jnp.float32)
    threshold = thresholding_transform(diffusion)

    def level(i):  # logsnr at grid point i ([b]); +inf at the clean end i = 0.
        t = start_t * i.astype(jnp.float32) / steps
        logsnr = jnp.where(i == 0, jnp.inf, diffusion.logsnr(t))
        return jnp.full((batch,), logsnr, jnp.float32)

    def body(k, z):
        i = steps - k  # from grid point i to i - 1
        logsnr_t, logsnr_s = level(i), level(i - 1)
        step_rng = jax.random.fold_in(loop_rng, k)

        def take_and_renoise(u, z):  # RePaint's earlier takes, each carried back to level t
            take_rng, back_rng = jax.random.split(jax.random.fold_in(step_rng, u + 1))
            z = step(z, logsnr_t, logsnr_s, take_rng)
            return renoise(z, logsnr_s, logsnr_t, back_rng, diffusion.noise)

        z = jax.lax.fori_loop(0, resample - 1, take_and_renoise, z)
        return step(z, logsnr_t, logsnr_s, step_rng)  # the last take (the only one if R = 1)

    def step(z, logsnr_t, logsnr_s, step_rng):  # one take from level t to level s
        noise_rng, hook_rng = jax.random.split(step_rng)

        pred = fn(z, logsnr_t).astype(jnp.float32)
        x0, eps = schedules.x0_eps_from_prediction(diffusion.prediction, pred, z, logsnr_t)
        if threshold is not None or x0_transform is not None:
            if threshold is not None:
                x0 = threshold(x0)
            if x0_transform is not None:
                x0 = x0_transform(x0)
            eps = schedules.eps_from_x0(z, x0, logsnr_t)

        if method == "ddim":
            z = ddim_step(x0, eps, logsnr_t, logsnr_s, eta, noise_rng, diffusion.noise)
        else:
            z = ddpm_step(z, x0, logsnr_t, logsnr_s, noise_rng, diffusion.noise)
        if z_transform is not None:
            z = z_transform(z, logsnr_s, hook_rng).astype(jnp.float32)
        return z

    x0 = jax.lax.fori_loop(0, steps, body, z)
    return jnp.clip(x0, -1.0, 1.0) if clip_output else x0


def ddim_invert(
    fn: PredictionFn,
    x0: jax.Array,
    diffusion: Diffusion,
    *,
    steps: int,
    end_t: float | jax.Array,
) -> jax.Array:
    """DDIM run backwards (DDIM inversion): the state at time end_t whose deterministic DDIM
    path leads to x0; returns z [x0's shape] float32.

    Walks the grid the sampler uses (t_i = end_t * i / steps), from the clean level up: at
    each t_i the model's (x0, eps) estimate from z_i is re-noised to the next level,
    z_{i+1} = alpha_{i+1} x0_hat + sigma_{i+1} eps_hat. This is the deterministic DDIM step
    with its two levels swapped, so ddim_sample(fn, ..., steps=steps, start_t=end_t,
    z_init=ddim_invert(fn, x0, ..., end_t=end_t)) retraces the path back to about x0, the
    closer the more steps (exact for a denoiser whose estimates do not change along the
    path). An edit that starts from this z instead of freshly noised data keeps what the
    input's own path decided (e.g. where an object is). No thresholding: the path inverted
    is the network's own, and the grid point t_0 = 0 is evaluated at the schedule's finite
    logsnr(0).

    Args:
      fn: (z [b, ...], logsnr [b]) -> prediction of type diffusion.prediction (usually the
        conditional prediction with the input's own caption, without guidance).
      x0: [b, ...] clean data.
      steps: model calls.
      end_t: time in (0, 1] to invert to (SDEdit's strength).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"ddim_invert: steps must be a positive int, got {steps!r}.")
    if isinstance(end_t, (int, float)) and not 0.0 < end_t <= 1.0:
        raise ValueError(f"ddim_invert: end_t must be in (0, 1], got {end_t}.")
    batch = x0.shape[0]

    def level(i):  # [b] logsnr at grid point i
        t = end_t * jnp.asarray(i, jnp.float32) / steps
        return jnp.full((batch,), diffusion.logsnr(t), jnp.float32)

    def body(i, z):
        logsnr_s, logsnr_t = level(i), level(i + 1)
        pred = fn(z, logsnr_s).astype(jnp.float32)
        x0_hat, eps = schedules.x0_eps_from_prediction(diffusion.prediction, pred, z, logsnr_s)
        alpha_t, sigma_t = schedules.alpha_sigma(schedules.per_example(logsnr_t, z))
        return alpha_t * x0_hat + sigma_t * eps

    return jax.lax.fori_loop(0, steps, body, jnp.asarray(x0, jnp.float32))


def ddim_sample(
    fn: PredictionFn,
    shape: Sequence[int],
    rng: jax.Array,
    diffusion: Diffusion,
    *,
    steps: int,
    eta: float | jax.Array = 0.0,
    z_init: jax.Array | None = None,
    start_t: float = 1.0,
    x0_transform: X0Transform | None = None,
    z_transform: ZTransform | None = None,
    clip_output: bool = True,
    resample: int = 1,
) -> jax.Array:
    """Sample with DDIM; returns x0 [shape] float32, clipped to [-1, 1] unless clip_output=False.

    Args:
      fn: (z [b, ...], logsnr [b]) -> prediction of type diffusion.prediction.
      shape: [b, ...] of the sample.
      rng: PRNG key; same key -> bitwise same sample.
      diffusion: schedule, prediction type and thresholding.
      steps: model calls (uniform grid in t from start_t to 0).
      eta: 0 deterministic; 1 same as DDPM ancestral.
      z_init: starting state at level start_t (default: N(0, I) noise).
      start_t: starting time in (0, 1]; < 1 needs z_init (SDEdit, see noise_to).
      x0_transform, z_transform: hooks, see the module docstring.
      resample: takes per step (RePaint's resampling, see the module docstring); 1: none.
    """
    return _sample("ddim", fn, shape, rng, diffusion, steps, eta, z_init, start_t,
                   x0_transform, z_transform, clip_output, resample)


def ddpm_sample(
    fn: PredictionFn,
    shape: Sequence[int],
    rng: jax.Array,
    diffusion: Diffusion,
    *,
    steps: int,
    z_init: jax.Array | None = None,
    start_t: float = 1.0,
    x0_transform: X0Transform | None = None,
    z_transform: ZTransform | None = None,
    clip_output: bool = True,
    resample: int = 1,
) -> jax.Array:
    """Sample with DDPM ancestral steps (posterior variance). Arguments as ddim_sample."""
    return _sample("ddpm", fn, shape, rng, diffusion, steps, 1.0, z_init, start_t,
                   x0_transform, z_transform, clip_output, resample)


def sample(
    method: str,
    fn: PredictionFn,
    shape: Sequence[int],
    rng: jax.Array,
    diffusion: Diffusion,
    *,
    steps: int,
    eta: float = 0.0,
    z_init: jax.Array | None = None,
    start_t: float = 1.0,
    x0_transform: X0Transform | None = None,
    z_transform: ZTransform | None = None,
    clip_output: bool = True,
    resample: int = 1,
) -> jax.Array:
    """Dispatch on a config string: method 'ddim' (uses eta) or 'ddpm'."""
    if method not in SAMPLERS:
        raise ValueError(f"Unknown sampler {method!r}; expected one of {SAMPLERS}.")
    if method == "ddpm" and eta != 0.0:
        raise ValueError("Sampler 'ddpm' takes no eta (it is DDIM with eta = 1); drop eta.")
    return _sample(method, fn, shape, rng, diffusion, steps, eta, z_init, start_t,
                   x0_transform, z_transform, clip_output, resample)
