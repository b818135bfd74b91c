"""Diffusion core against closed forms: data whose optimal denoiser is known exactly.

For x0 ~ N(mu, s^2) per dimension and z = alpha x0 + sigma eps:
  E[x0 | z]  = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (z - alpha mu)
  E[eps | z] = sigma / (alpha^2 s^2 + sigma^2) (z - alpha mu)
With this denoiser each DDIM step is affine in z, so the sampler's output can be predicted
per sample (float64 reference), and DDPM's output variance follows a scalar recursion. The
loss of the optimal model equals the posterior variance of its target, in closed form.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lumiere_jax.diffusion import losses, samplers, schedules
from lumiere_jax.diffusion.schedules import Diffusion

N_SAMPLES = 20_000
MU, STD = 0.3, 0.5


def gaussian_posterior(z, logsnr, mu, std):
    """(E[x0|z], E[eps|z]) for x0 ~ N(mu, std^2); z: [b, ...], logsnr: [b]."""
    alpha, sigma = schedules.alpha_sigma(schedules.per_example(logsnr, z))
    total_var = alpha**2 * std**2 + sigma**2
    centred = z - alpha * mu
    return mu + alpha * std**2 / total_var * centred, sigma / total_var * centred


def as_prediction(posterior_fn, prediction):
    """Turn a (z, logsnr) -> (x0, eps) posterior into a sampler fn of the given type."""

    def fn(z, logsnr):
        x0, eps = posterior_fn(z, logsnr)
        return eps if prediction == "eps" else schedules.v_from_x0_eps(x0, eps, logsnr)

    return fn


def gaussian_fn(prediction, mu=MU, std=STD):
    return as_prediction(lambda z, l: gaussian_posterior(z, l, mu, std), prediction)


def mixture_fn(prediction, weights, means, stds):
    """Optimal denoiser for a 1-d mixture of Gaussians: responsibilities times components."""

    def posterior(z, logsnr):
        alpha, sigma = schedules.alpha_sigma(schedules.per_example(logsnr, z))
        log_resp, x0s, epss = [], [], []
        for w, m, s in zip(weights, means, stds):
            var = alpha**2 * s**2 + sigma**2
            log_resp.append(math.log(w) - 0.5 * jnp.log(var) - 0.5 * (z - alpha * m) ** 2 / var)
            x0, eps = gaussian_posterior(z, logsnr, m, s)
            x0s.append(x0)
            epss.append(eps)
        resp = jax.nn.softmax(jnp.stack(log_resp), axis=0)
        return jnp.sum(resp * jnp.stack(x0s), 0), jnp.sum(resp * jnp.stack(epss), 0)

    return as_prediction(posterior, prediction)


def reference_logsnrs(diffusion, steps, start_t=1.0):
    """The sampler's grid in float64: logsnr at t_N .. t_0, the last one +inf."""
    lo, hi = diffusion.logsnr_min, diffusion.logsnr_max
    b_low = math.atan(math.exp(-hi / 2))
    a = math.atan(math.exp(-lo / 2)) - b_low
    t = start_t * np.arange(steps, -1, -1) / steps
    logsnr = -2 * np.log(np.tan(a * t + b_low)) + diffusion.shift
    logsnr[-1] = np.inf
    return logsnr


def alpha_sigma64(logsnr):
    return np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))


def ddim_gain(diffusion, steps, std):
    """DDIM(eta=0) output = mu + gain * (z_init - alpha_start mu) for Gaussian data."""
    gain, _ = resampled_ddim_reference(diffusion, steps, 1.0, 1, std)
    return gain


def ddpm_output_std(diffusion, steps, std):
    """Std of DDPM's output for Gaussian data, from the exact variance recursion."""
    logsnr = reference_logsnrs(diffusion, steps)
    var = 1.0  # z_init ~ N(0, 1)
    for l_t, l_s in zip(logsnr[:-1], logsnr[1:]):
        a_t, s_t = alpha_sigma64(l_t)
        a_s, s_s = alpha_sigma64(l_s)
        r = np.exp(l_t - l_s)
        x0_gain = a_t * std**2 / (a_t**2 * std**2 + s_t**2)
        var = (a_s * (r / a_t + (1 - r) * x0_gain)) ** 2 * var + s_s**2 * (1 - r)
    return math.sqrt(var)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_matches_affine_reference_and_data_distribution(prediction):
    diffusion = Diffusion(prediction=prediction, thresholding="none")
    steps = 200
    shape = (N_SAMPLES // 100, 100)
    z_init = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    sample = jax.jit(
        lambda z: samplers.ddim_sample(
            gaussian_fn(prediction), shape, jax.random.key(1), diffusion, steps=steps,
            z_init=z, clip_output=False,
        )
    )(z_init)
    sample = np.asarray(sample, np.float64)

    # 1) Implementation: per sample equal to the float64 affine map of its start noise.
    alpha_start, _ = alpha_sigma64(reference_logsnrs(diffusion, steps)[0])
    gain = ddim_gain(diffusion, steps, STD)
    expected = MU + gain * (np.asarray(z_init, np.float64) - alpha_start * MU)
    np.testing.assert_allclose(sample, expected, atol=1e-4)  # measured 2e-5

    # 2) Discretisation: 200 DDIM steps shrink the std by 0.8% (first-order error).
    assert abs(gain / STD - 1) < 0.01
    # 3) Statistics of 20k samples: mean within 4 standard errors (4 * 0.5 / sqrt(20k) =
    #    0.014); std within 0.8% bias + 4 standard errors of a std (4 / sqrt(40k) = 2%).
    assert abs(sample.mean() - MU) < 0.015
    assert abs(sample.std() / STD - 1) < 0.03


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddpm_reproduces_gaussian_statistics(prediction):
    diffusion = Diffusion(prediction=prediction, thresholding="none")
    steps = 250
    shape = (N_SAMPLES // 100, 100)
    sample = jax.jit(
        lambda key: samplers.ddpm_sample(
            gaussian_fn(prediction), shape, key, diffusion, steps=steps, clip_output=False
        )
    )(jax.random.key(3))
    sample = np.asarray(sample, np.float64)
    # Exact std of the discretised chain: 1.5% low at 250 steps.
    expected_std = ddpm_output_std(diffusion, steps, STD)
    assert abs(expected_std / STD - 1) < 0.02
    # The chain's mean is exactly mu; tolerances are 4 standard errors (see the DDIM test).
    assert abs(sample.mean() - MU) < 0.015
    assert abs(sample.std() / expected_std - 1) < 0.02
    assert abs(sample.std() / STD - 1) < 0.035


def test_ddpm_equals_ddim_with_eta_one():
    diffusion = Diffusion(prediction="v", thresholding="none")
    fn = gaussian_fn("v")
    shape = (8, 64)
    key = jax.random.key(5)
    ddpm = samplers.ddpm_sample(fn, shape, key, diffusion, steps=50, clip_output=False)
    ddim = samplers.ddim_sample(fn, shape, key, diffusion, steps=50, eta=1.0, clip_output=False)
    ddim0 = samplers.ddim_sample(fn, shape, key, diffusion, steps=50, eta=0.0, clip_output=False)
    np.testing.assert_allclose(ddpm, ddim, atol=1e-4)
    assert np.abs(np.asarray(ddpm) - np.asarray(ddim0)).max() > 0.1


def test_ddim_on_mixture_of_two_gaussians():
    weights, means, stds = (0.3, 0.7), (-0.5, 0.5), (0.15, 0.15)
    diffusion = Diffusion(prediction="v", thresholding="none")
    shape = (N_SAMPLES // 100, 100)
    sample = jax.jit(
        lambda key: samplers.ddim_sample(
            mixture_fn("v", weights, means, stds), shape, key, diffusion, steps=200,
            clip_output=False,
        )
    )(jax.random.key(7))
    sample = np.asarray(sample, np.float64).ravel()
    low, high = sample[sample < 0], sample[sample >= 0]
    # Mode weight: standard error sqrt(0.21 / 20k) = 0.0032; tolerance 5 of them.
    assert abs(low.size / sample.size - weights[0]) < 0.016
    # Mode means and stds (DDIM at 200 steps shrinks a std of 0.15 by ~3%).
    assert abs(low.mean() - means[0]) < 0.01
    assert abs(high.mean() - means[1]) < 0.01
    assert abs(low.std() / stds[0] - 1) < 0.08
    assert abs(high.std() / stds[1] - 1) < 0.08


def test_sdedit_from_noised_data_keeps_the_distribution():
    """Noise real samples to start_t = 0.6 and denoise: still N(mu, s^2)."""
    diffusion = Diffusion(prediction="eps", thresholding="none")
    shape = (N_SAMPLES // 100, 100)
    data = jnp.asarray(MU + STD * np.random.default_rng(11).standard_normal(shape), jnp.float32)
    z_start = samplers.noise_to(data, 0.6, jax.random.key(12), diffusion)
    sample = samplers.ddim_sample(
        gaussian_fn("eps"), shape, jax.random.key(13), diffusion, steps=100, z_init=z_start,
        start_t=0.6, clip_output=False,
    )
    sample = np.asarray(sample, np.float64)
    assert abs(sample.mean() - MU) < 0.015
    assert abs(sample.std() / STD - 1) < 0.03
    # And the result stays correlated with its input (only partly re-generated).
    assert np.corrcoef(sample.ravel(), np.asarray(data).ravel())[0, 1] > 0.3


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_inversion_follows_the_probability_flow_and_back(prediction):
    """For N(mu, s^2) data the probability-flow ODE maps x0 to z_t = alpha mu +
    sqrt(alpha^2 s^2 + sigma^2) (x0 - mu) / s. DDIM inversion must approach that map, and
    DDIM sampling from its output must come back to x0, both with first-order error in the
    step size; on a two-component mixture (a curved path) the round trip converges too."""
    diffusion = Diffusion(prediction=prediction, thresholding="none")
    x0 = jnp.asarray(MU + STD * np.random.default_rng(5).standard_normal((64, 50)), jnp.float32)
    alpha, sigma = schedules.alpha_sigma(diffusion.logsnr(0.8))
    flow = alpha * MU + jnp.sqrt(alpha**2 * STD**2 + sigma**2) * (x0 - MU) / STD

    def round_trip(fn, steps, end_t):
        z = samplers.ddim_invert(fn, x0, diffusion, steps=steps, end_t=end_t)
        back = samplers.ddim_sample(fn, x0.shape, jax.random.key(0), diffusion, steps=steps,
                                    z_init=z, start_t=end_t, clip_output=False)
        return float(jnp.abs(z - flow).max()), float(jnp.abs(back - x0).max())

    z_err_100, back_err_100 = round_trip(gaussian_fn(prediction), 100, 0.8)
    z_err_400, back_err_400 = round_trip(gaussian_fn(prediction), 400, 0.8)
    assert z_err_400 < 0.02 and back_err_400 < 0.02
    assert z_err_100 > 3 * z_err_400 and back_err_100 > 3 * back_err_400  # ~ 1 / steps
    mixture = mixture_fn(prediction, (0.3, 0.7), (-0.6, 0.5), (0.15, 0.25))
    _, mix_100 = round_trip(mixture, 100, 1.0)
    _, mix_400 = round_trip(mixture, 400, 1.0)
    assert mix_400 < 0.05 and mix_100 > 3 * mix_400
    with pytest.raises(ValueError, match=r"end_t must be in \(0, 1\]"):
        samplers.ddim_invert(mixture, x0, diffusion, steps=4, end_t=0.0)


# --- Loss at the optimum ---------------------------------------------------------------


def min_target_mse(logsnr, prediction, std):
    """Posterior variance of the target for N(mu, std^2) data: the optimal model's MSE."""
    alpha2 = 1 / (1 + np.exp(-logsnr))
    sigma2 = 1 / (1 + np.exp(logsnr))
    total = alpha2 * std**2 + sigma2
    return alpha2 * std**2 / total if prediction == "eps" else std**2 / total


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("weighting", ["none", "min_snr", "truncated_snr"])
def test_loss_of_optimal_model_equals_its_closed_form(prediction, weighting):
    diffusion = Diffusion(prediction=prediction, loss_weighting=weighting)
    x0 = jnp.asarray(MU + STD * np.random.default_rng(0).standard_normal((2048, 64)), jnp.float32)

    def model_fn(z, logsnr, cond):
        return gaussian_fn(prediction)(z, logsnr)

    loss, aux = jax.jit(
        lambda key: losses.diffusion_loss(model_fn, x0, None, key, diffusion)
    )(jax.random.key(1))
    logsnr = np.asarray(aux["logsnr"], np.float64)
    weight = np.asarray(losses.loss_weight(aux["logsnr"], diffusion), np.float64)
    expected = weight * min_target_mse(logsnr, prediction, STD)  # [b]
    # Each example's loss is a mean of 64 squared errors: relative sd sqrt(2/64) = 0.18;
    # the batch mean of 2048 of them is within 1.5% (> 3.5 standard errors).
    assert abs(float(loss) / expected.mean() - 1) < 0.03
    np.testing.assert_allclose(float(loss), np.mean(aux["loss_per_example"]), rtol=1e-6)

    # A model off by 0.2 everywhere pays 0.2^2 = 0.04 more per element, times the weight
    # (same key, so same t and noise; the cross term averages out to within ~3%).
    def perturbed_fn(z, logsnr, cond):
        return model_fn(z, logsnr, cond) + 0.2

    worse, _ = losses.diffusion_loss(perturbed_fn, x0, None, jax.random.key(1), diffusion)
    excess = float(worse) - float(loss)
    assert abs(excess / (0.04 * weight.mean()) - 1) < 0.1


@pytest.mark.parametrize("logsnr_s", [1.0, np.inf])
def test_renoise_is_the_forward_transition(logsnr_s):
    """z_s = alpha_s x0 + sigma_s eps carried back to level t is alpha_t x0 + sigma_t eps."""
    logsnr_t = -1.0
    x0 = np.linspace(-1.0, 1.0, 8)[:, None].repeat(N_SAMPLES // 8, 1)  # 8 values, 2.5k each
    alpha_s, sigma_s = alpha_sigma64(logsnr_s)
    z_s = alpha_s * x0 + sigma_s * np.random.default_rng(21).standard_normal(x0.shape)
    z_t = np.asarray(samplers.renoise(
        jnp.asarray(z_s, jnp.float32), jnp.full((8,), logsnr_s, jnp.float32),
        jnp.full((8,), logsnr_t, jnp.float32), jax.random.key(22)), np.float64)
    alpha_t, sigma_t = alpha_sigma64(logsnr_t)
    residual = z_t - alpha_t * x0  # should be sigma_t * N(0, 1), whatever x0
    # 4 standard errors of each x0's mean (sigma_t / 50) and of the std of all 20k (0.5%).
    np.testing.assert_allclose(residual.mean(1), 0.0, atol=4 * sigma_t / 50)
    assert abs(residual.std() / sigma_t - 1) < 0.02, residual.std() / sigma_t


def resampled_ddim_reference(diffusion, steps, start_t, resample, std):
    """DDIM with RePaint's resampling on N(mu, std^2) data from start_t: the output is
    mu + gain * (z_init - alpha_start mu) + (noise of variance `var`, from the re-noising),
    both from the float64 recursion of the affine steps and forward transitions."""
    logsnr = reference_logsnrs(diffusion, steps, start_t)
    gain, var = 1.0, 0.0
    for l_t, l_s in zip(logsnr[:-1], logsnr[1:]):
        a_t, s_t = alpha_sigma64(l_t)
        a_s, s_s = alpha_sigma64(l_s)
        total = a_t**2 * std**2 + s_t**2
        step = a_s * a_t * std**2 / total + s_s * s_t / total  # DDIM's affine factor
        for _ in range(resample - 1):  # a take, then back to level t
            back = a_t / a_s
            gain, var = gain * step * back, var * (step * back) ** 2 + s_t**2 * (
                1 - np.exp(l_t - l_s))
        gain, var = gain * step, var * step**2  # the last take
    return gain, var


def test_ddim_with_resampling_matches_its_affine_reference():
    """SDEdit from start_t = 0.5 with 4 takes per step: per sample, the output is the affine
    reference of its start plus independent noise of the reference's variance; the data
    distribution is kept while the start is forgotten much faster than without resampling."""
    diffusion = Diffusion(prediction="v", thresholding="none")
    steps, start_t, resample = 50, 0.5, 4
    shape = (N_SAMPLES // 100, 100)
    data = MU + STD * np.random.default_rng(31).standard_normal(shape)
    z_init = samplers.noise_to(jnp.asarray(data, jnp.float32), start_t, jax.random.key(32),
                               diffusion)
    sample = np.asarray(jax.jit(lambda z: samplers.ddim_sample(
        gaussian_fn("v"), shape, jax.random.key(33), diffusion, steps=steps, z_init=z,
        start_t=start_t, clip_output=False, resample=resample))(z_init), np.float64)

    gain, var = resampled_ddim_reference(diffusion, steps, start_t, resample, STD)
    plain_gain, plain_var = resampled_ddim_reference(diffusion, steps, start_t, 1, STD)
    assert plain_var == 0.0 and gain < 0.1 * plain_gain  # 0.054 vs 0.62: the start forgotten
    alpha_start, sigma_start = alpha_sigma64(reference_logsnrs(diffusion, steps, start_t)[0])
    # The chain keeps N(mu, s^2) up to DDIM's discretisation: 2.7% low at 50 x 4 takes.
    reference_std = math.sqrt(gain**2 * (alpha_start**2 * STD**2 + sigma_start**2) + var)
    assert abs(reference_std / STD - 1) < 0.03
    start = np.asarray(z_init, np.float64).ravel() - alpha_start * MU
    out = sample.ravel() - MU
    slope = (start @ out) / (start @ start)
    residual = out - slope * start
    # Slope: 5 standard errors; residual std: 4 standard errors of a std (2%).
    assert abs(slope - gain) < 5 * math.sqrt(var / (start @ start)), (slope, gain)
    assert abs(residual.std() / math.sqrt(var) - 1) < 0.02, (residual.std(), math.sqrt(var))
    assert abs(sample.mean() - MU) < 0.015
    assert abs(sample.std() / reference_std - 1) < 0.02, (sample.std(), reference_std)


def test_resampling_once_is_the_plain_sampler_and_bad_counts_are_refused():
    diffusion = Diffusion(prediction="v", thresholding="none")
    key, shape = jax.random.key(41), (4, 16)
    for method in samplers.SAMPLERS:
        plain = samplers.sample(method, gaussian_fn("v"), shape, key, diffusion, steps=10)
        once = samplers.sample(method, gaussian_fn("v"), shape, key, diffusion, steps=10,
                               resample=1)
        twice = samplers.sample(method, gaussian_fn("v"), shape, key, diffusion, steps=10,
                                resample=2)
        np.testing.assert_array_equal(np.asarray(once), np.asarray(plain))
        assert np.abs(np.asarray(twice) - np.asarray(plain)).max() > 0.01
    for bad in (0, 2.0):
        with pytest.raises(ValueError, match="resample must be an int >= 1"):
            samplers.ddim_sample(gaussian_fn("v"), shape, key, diffusion, steps=10,
                                 resample=bad)
