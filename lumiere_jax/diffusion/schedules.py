"""Continuous-time Gaussian diffusion: noise schedule, configuration, prediction conversions.

Notation (Imagen / VDM / simple diffusion): data x0, noise eps ~ N(0, I), time t in [0, 1]
(t = 0 clean, t = 1 pure noise), log signal-to-noise ratio logsnr(t) decreasing in t, and

    z_t = alpha * x0 + sigma * eps,   alpha^2 = sigmoid(logsnr),   sigma^2 = sigmoid(-logsnr),

so alpha^2 + sigma^2 = 1 (variance preserving). The model sees (z_t, logsnr) and predicts
either eps or v = alpha * eps - sigma * x0 (Salimans & Ho, 2022). All array functions work on
channels-last data of any shape [b, ...]; per-example scalars (logsnr, t) have shape [b] or [].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

PREDICTIONS = ("eps", "v")
# How the per-example squared error is weighted, expressed in the units of x0-MSE
# (w(logsnr) * ||x0 - x0_hat||^2), then converted to the units of the prediction target:
#   'none':          plain MSE of the prediction target (eps-MSE or v-MSE); no reweighting.
#   'min_snr':       Min-SNR-gamma (Hang et al., 2023): x0-MSE * min(snr, gamma). Caps the
#                    weight of nearly-clean levels, so training time goes to the noisy ones.
#   'truncated_snr': progressive distillation (Salimans & Ho, 2022): x0-MSE * max(snr, 1).
#                    With v-prediction the weight stays within [0.5, 1] in v units.
LOSS_WEIGHTINGS = ("none", "min_snr", "truncated_snr")
# What happens to every x0 estimate during sampling:
#   'none': nothing; 'static': clip to [-1, 1]; 'dynamic': Imagen's dynamic thresholding.
THRESHOLDINGS = ("none", "static", "dynamic")
# The density of training times t (losses.sample_times): 'uniform', or 'logit_normal' (SD3),
# which trains more at one band of noise levels without changing the loss weights.
TIME_DISTRIBUTIONS = ("uniform", "logit_normal")


def logsnr_cosine(
    t: jax.Array | float, logsnr_min: float = -20.0, logsnr_max: float = 20.0
) -> jax.Array:
    """Cosine schedule in log-SNR form, logsnr(t) = -2 log tan(a t + b).

    a, b are chosen so that logsnr(0) = logsnr_max and logsnr(1) = logsnr_min; without the
    truncation this is alpha = cos(pi t / 2) (Nichol & Dhariwal). Values near t = 1 are
    computed through the complementary angle, because tan(pi/2 - tiny) in float32 loses
    ~0.3% of the tiny angle and with it the endpoint.

    Args:
      t: time in [0, 1], any shape.
    Returns:
      logsnr with t's shape, float32.
    """
    if not logsnr_min < logsnr_max:
        raise ValueError(
            f"logsnr_cosine: need logsnr_min < logsnr_max, got {logsnr_min} and {logsnr_max}."
        )
    t = jnp.asarray(t, jnp.float32)
    # Angles in float64 on the host: they are constants of the schedule.
    b_low = math.atan(math.exp(-0.5 * logsnr_max))  # angle at t = 0
    b_high = math.atan(math.exp(0.5 * logsnr_min))  # complementary angle at t = 1
    a = math.pi / 2 - b_low - b_high
    # Each branch only sees its own half of [0, 1], so the unused one stays finite (no NaN
    # gradients through jnp.where).
    near_clean = -2.0 * jnp.log(jnp.tan(a * jnp.minimum(t, 0.5) + b_low))
    near_noise = 2.0 * jnp.log(jnp.tan(a * (1.0 - jnp.maximum(t, 0.5)) + b_high))
    return jnp.where(t < 0.5, near_clean, near_noise)


def resolution_shift(resolution: float, base_resolution: float) -> float:
    """simple diffusion's log-SNR shift, 2 log(base_resolution / resolution).

    A schedule tuned at base_resolution keeps the same per-pixel-block noise level at a higher
    resolution when every logsnr is moved by this (negative for resolution > base).
    """
    if resolution <= 0 or base_resolution <= 0:
        raise ValueError(
            "resolution_shift: resolution and base_resolution must be positive, got "
            f"resolution={resolution}, base_resolution={base_resolution}."
        )
    return 2.0 * math.log(base_resolution / resolution)


def alpha_sigma(logsnr: jax.Array | float) -> tuple[jax.Array, jax.Array]:
    """(alpha, sigma) with alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr).

    logsnr = +inf gives exactly (1, 0): the clean level.
    """
    logsnr = jnp.asarray(logsnr, jnp.float32)
    return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def per_example(value: jax.Array | float, x: jax.Array) -> jax.Array:
    """Reshape a per-example value ([b] or scalar) so it broadcasts against x: [b, 1, ..., 1]."""
    value = jnp.asarray(value)
    if value.ndim == 0:
        return value
    if value.ndim != 1 or value.shape[0] != x.shape[0]:
        raise ValueError(
            f"Expected a per-example value of shape [{x.shape[0]}] (or a scalar) to go with "
            f"data of shape {x.shape}, got shape {value.shape}."
        )
    return value.reshape((x.shape[0],) + (1,) * (x.ndim - 1))


def gaussian_noise(rng: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """N(0, I) noise of shape [b, ...], drawn as [b, prod(rest)] and reshaped.

    Why: with jax_threefry_partitionable (JAX's default) the compile time of a random draw
    grows with its rank: ~5 s for a rank-5 video shape on a 2-core CPU, < 1 s for rank 2.
    Keeping the batch axis first keeps batch sharding a free reshape.
    """
    shape = tuple(shape)
    if len(shape) <= 2:
        return jax.random.normal(rng, shape, dtype)
    return jax.random.normal(rng, (shape[0], math.prod(shape[1:])), dtype).reshape(shape)


def correlate_frames(eps: jax.Array, correlation: float) -> jax.Array:
    """Videos' noise [b, t, ...] with the given correlation between any two frames.

    The mixed noise prior of PYoCo (Ge et al., 2023): each frame's noise shares a fraction
    `correlation` of its variance with every other frame of the clip, so an image model run on
    each frame starts every frame from a similar layout and the temporal layers only have to
    learn how frames differ. Deterministic in eps: e' = a e + c mean_t(e) with
    a = sqrt(1 - rho) and c = sqrt(a^2 + t rho) - a gives Var(e'_i) = 1, Cov(e'_i, e'_j) = rho.
    Images (rank < 5) and correlation 0 are returned unchanged.
    """
    if eps.ndim < 5 or correlation == 0.0:
        return eps
    t = eps.shape[1]
    a = math.sqrt(1.0 - correlation)
    c = math.sqrt(a * a + t * correlation) - a
    return (a * eps + c * jnp.mean(eps, axis=1, keepdims=True)).astype(eps.dtype)


# Conversions between predictions. z, x0, eps, v: [b, ...]; logsnr: [b] or scalar.


def x0_from_eps(z: jax.Array, eps: jax.Array, logsnr: jax.Array) -> jax.Array:
    alpha, sigma = alpha_sigma(per_example(logsnr, z))
    return (z - sigma * eps) / alpha


def eps_from_x0(z: jax.Array, x0: jax.Array, logsnr: jax.Array) -> jax.Array:
    alpha, sigma = alpha_sigma(per_example(logsnr, z))
    return (z - alpha * x0) / sigma


def v_from_x0_eps(x0: jax.Array, eps: jax.Array, logsnr: jax.Array) -> jax.Array:
    alpha, sigma = alpha_sigma(per_example(logsnr, x0))
    return alpha * eps - sigma * x0


def x0_from_v(z: jax.Array, v: jax.Array, logsnr: jax.Array) -> jax.Array:
    alpha, sigma = alpha_sigma(per_example(logsnr, z))
    return alpha * z - sigma * v


def eps_from_v(z: jax.Array, v: jax.Array, logsnr: jax.Array) -> jax.Array:
    alpha, sigma = alpha_sigma(per_example(logsnr, z))
    return sigma * z + alpha * v


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(
            f"Unknown diffusion prediction type {prediction!r}; expected one of {PREDICTIONS}."
        )


def x0_eps_from_prediction(
    prediction: str, pred: jax.Array, z: jax.Array, logsnr: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(x0 estimate, eps estimate) from a model output of the given prediction type."""
    check_prediction(prediction)
    if prediction == "eps":
        return x0_from_eps(z, pred, logsnr), pred
    return x0_from_v(z, pred, logsnr), eps_from_v(z, pred, logsnr)


def prediction_from_x0_eps(
    prediction: str, x0: jax.Array, eps: jax.Array, logsnr: jax.Array
) -> jax.Array:
    """The model's regression target (eps or v) for clean data x0 and noise eps."""
    check_prediction(prediction)
    if prediction == "eps":
        return eps
    return v_from_x0_eps(x0, eps, logsnr)


@dataclasses.dataclass(frozen=True)
class Diffusion:
    """Settings of the diffusion process, shared by training (losses) and sampling.

    Attributes:
      prediction: what the model outputs, 'eps' or 'v'.
      logsnr_min, logsnr_max: the cosine schedule's log-SNR at t = 1 and t = 0.
      shift: added to every logsnr (simple diffusion); use resolution_shift(res, base_res),
        or give resolution/base_resolution to from_config. Endpoints move by it too.
      loss_weighting: one of LOSS_WEIGHTINGS (see there).
      min_snr_gamma: gamma of 'min_snr'.
      low_discrepancy_t: draw the batch's times as u + i/b mod 1 (VDM) rather than
        independently; same marginal U(0, 1), lower variance of the batch loss.
      time_distribution: the training times' density, one of TIME_DISTRIBUTIONS: 'uniform'
        (every config so far), or 'logit_normal' with time_logit_mean / time_logit_std
        (losses.sample_times): puts more of training where the model must learn most, e.g.
        a mean of 4.4 draws half the times below log-SNR -8 on the default cosine schedule.
        Training only: samplers walk their own grid.
      time_uniform_fraction: with 'logit_normal', the share of every batch still drawn
        uniformly, so the levels the skewed density leaves out keep training (0: none).
      thresholding: one of THRESHOLDINGS, applied to every x0 estimate while sampling.
      dynamic_percentile: Imagen's p: the per-example quantile of |x0| used as the threshold.
      frame_correlation: for videos, the correlation of the noise between any two frames of
        a clip (correlate_frames; 0 = independent frames, as in the Lumiere paper), in
        training and sampling alike, unless the Generator is given its own
        (sample.frame_correlation).
    """

    prediction: str = "v"
    logsnr_min: float = -20.0
    logsnr_max: float = 20.0
    shift: float = 0.0
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0
    low_discrepancy_t: bool = True
    time_distribution: str = "uniform"
    time_logit_mean: float = 0.0
    time_logit_std: float = 1.0
    time_uniform_fraction: float = 0.0
    thresholding: str = "dynamic"
    dynamic_percentile: float = 0.995
    frame_correlation: float = 0.0

    def __post_init__(self):
        check_prediction(self.prediction)
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(
                f"Diffusion: need logsnr_min < logsnr_max, got {self.logsnr_min} and "
                f"{self.logsnr_max}."
            )
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"Diffusion: unknown loss_weighting {self.loss_weighting!r}; expected one of "
                f"{LOSS_WEIGHTINGS}."
            )
        if not self.min_snr_gamma > 0:
            raise ValueError(f"Diffusion: min_snr_gamma must be > 0, got {self.min_snr_gamma}.")
        if self.thresholding not in THRESHOLDINGS:
            raise ValueError(
                f"Diffusion: unknown thresholding {self.thresholding!r}; expected one of "
                f"{THRESHOLDINGS}."
            )
        if not 0.0 < self.dynamic_percentile <= 1.0:
            raise ValueError(
                "Diffusion: dynamic_percentile is a fraction in (0, 1] (Imagen uses 0.995), "
                f"got {self.dynamic_percentile}."
            )

        if self.time_distribution not in TIME_DISTRIBUTIONS:
            raise ValueError(
                f"Diffusion: unknown time_distribution {self.time_distribution!r}; expected one "
                f"of {TIME_DISTRIBUTIONS}."
            )
        if not self.time_logit_std > 0:
            raise ValueError(
                f"Diffusion: time_logit_std must be > 0, got {self.time_logit_std}."
            )
        if not 0.0 <= self.time_uniform_fraction <= 1.0:
            raise ValueError(
                "Diffusion: time_uniform_fraction is a share of the batch in [0, 1], got "
                f"{self.time_uniform_fraction}."
            )
        if not 0.0 <= self.frame_correlation < 1.0:
            raise ValueError(
                "Diffusion: frame_correlation is a correlation in [0, 1) (0 = independent "
                f"frames), got {self.frame_correlation}."
            )

    def noise(self, rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """N(0, 1) noise for data of `shape`; a video's frames correlated per
        frame_correlation."""
        return correlate_frames(gaussian_noise(rng, shape), self.frame_correlation)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> "Diffusion":
        """Build from an ml_collections.ConfigDict (or a dict) with this class's field names.

        Instead of `shift`, the config may give `resolution` and `base_resolution`; the shift
        is then resolution_shift(resolution, base_resolution). Unknown keys raise.
        """
        values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        resolution = values.pop("resolution", None)
        base_resolution = values.pop("base_resolution", None)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(
                f"Diffusion config: unknown keys {unknown}; valid keys are {sorted(fields)} "
                "plus resolution/base_resolution."
            )
        if (resolution is None) != (base_resolution is None):
            raise ValueError(
                "Diffusion config: give both resolution and base_resolution (for the shift), "
                f"or neither; got resolution={resolution}, base_resolution={base_resolution}."
            )
        if resolution is not None:
            if values.get("shift", 0.0) != 0.0:
                raise ValueError(
                    "Diffusion config: give either shift or resolution/base_resolution, not both."
                )
            values["shift"] = resolution_shift(resolution, base_resolution)
        return cls(**values)

    def logsnr(self, t: jax.Array | float) -> jax.Array:
        """The (shifted) schedule: logsnr_cosine(t) + shift."""
        return logsnr_cosine(t, self.logsnr_min, self.logsnr_max) + self.shift
