"""Diffusion core: schedule, config, conversions, loss plumbing, CFG, sampler hooks.

The statistical checks against closed-form denoisers live in test_diffusion_analytic.py.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.special import ndtr as normal_cdf

from lumiere_jax.diffusion import guidance, losses, samplers, schedules
from lumiere_jax.diffusion.schedules import Diffusion


def uniform(shape, seed):
    """Test data from numpy: no per-shape compile of a JAX random kernel."""
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape), jnp.float32)


def normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# --- Schedule ----------------------------------------------------------------------------


def test_cosine_schedule_endpoints_and_monotonic():
    t = jnp.linspace(0.0, 1.0, 1001)
    logsnr = np.asarray(schedules.logsnr_cosine(t, -20.0, 20.0))
    np.testing.assert_allclose(logsnr[0], 20.0, atol=1e-4)
    np.testing.assert_allclose(logsnr[-1], -20.0, atol=1e-4)
    assert np.all(np.diff(logsnr) < 0)
    # Untruncated cosine schedule in the middle: alpha = cos(pi t / 2), i.e.
    # logsnr = -2 log tan(pi t / 2); the truncation barely moves it there.
    np.testing.assert_allclose(logsnr[500], 0.0, atol=1e-3)
    np.testing.assert_allclose(logsnr[250], -2 * math.log(math.tan(math.pi / 8)), atol=1e-3)
    # Other endpoints.
    ends = schedules.logsnr_cosine(jnp.array([0.0, 1.0]), -15.0, 10.0)
    np.testing.assert_allclose(ends, [10.0, -15.0], atol=1e-4)


def test_schedule_shift_moves_logsnr_by_two_log_resolution_ratio():
    shift = schedules.resolution_shift(128, base_resolution=64)
    assert shift == pytest.approx(2 * math.log(0.5))
    base = Diffusion()
    shifted = Diffusion.from_config({"resolution": 128, "base_resolution": 64})
    assert shifted.shift == pytest.approx(-1.3862944)
    t = jnp.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(shifted.logsnr(t) - base.logsnr(t), shift, atol=1e-5)
    with pytest.raises(ValueError, match="must be positive"):
        schedules.resolution_shift(0, 64)


def test_alpha_sigma_variance_preserving_and_clean_limit():
    logsnr = jnp.array([-20.0, -3.0, 0.0, 2.5, 20.0])
    alpha, sigma = schedules.alpha_sigma(logsnr)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
    np.testing.assert_allclose(jnp.log(alpha**2 / sigma**2)[1:4], logsnr[1:4], atol=1e-5)
    np.testing.assert_allclose(alpha[2], math.sqrt(0.5), rtol=1e-6)
    alpha_inf, sigma_inf = schedules.alpha_sigma(jnp.inf)
    assert float(alpha_inf) == 1.0 and float(sigma_inf) == 0.0


def test_prediction_conversions_round_trip():
    x0 = uniform((4, 3, 5, 5, 2), seed=0)  # [b, t, h, w, c]
    eps = normal(x0.shape, seed=1)
    logsnr = jnp.array([-8.0, -1.0, 1.5, 8.0])
    alpha, sigma = schedules.alpha_sigma(schedules.per_example(logsnr, x0))
    z = alpha * x0 + sigma * eps
    v = schedules.v_from_x0_eps(x0, eps, logsnr)
    np.testing.assert_allclose(schedules.x0_from_v(z, v, logsnr), x0, atol=1e-5)
    np.testing.assert_allclose(schedules.eps_from_v(z, v, logsnr), eps, atol=1e-5)
    np.testing.assert_allclose(schedules.eps_from_x0(z, x0, logsnr), eps, atol=2e-3)
    np.testing.assert_allclose(schedules.x0_from_eps(z, eps, logsnr), x0, atol=2e-3)
    for prediction, pred in (("eps", eps), ("v", v)):
        got_x0, got_eps = schedules.x0_eps_from_prediction(prediction, pred, z, logsnr)
        np.testing.assert_allclose(got_x0, x0, atol=2e-3)
        np.testing.assert_allclose(got_eps, eps, atol=2e-3)
        target = schedules.prediction_from_x0_eps(prediction, x0, eps, logsnr)
        np.testing.assert_allclose(target, pred, atol=1e-6)
    with pytest.raises(ValueError, match="prediction type 'x'"):
        schedules.x0_eps_from_prediction("x", eps, z, logsnr)
    with pytest.raises(ValueError, match=r"per-example value of shape \[4\]"):
        schedules.x0_from_v(z, v, jnp.zeros(3))


# --- Config ------------------------------------------------------------------------------


def test_config_from_config_dict_and_errors():
    config = ml_collections.ConfigDict(
        {"prediction": "eps", "loss_weighting": "min_snr", "min_snr_gamma": 3.0,
         "thresholding": "static"}
    )
    diffusion = Diffusion.from_config(config)
    assert diffusion == Diffusion(prediction="eps", loss_weighting="min_snr",
                                  min_snr_gamma=3.0, thresholding="static")
    with pytest.raises(ValueError, match="prediction type 'x'"):
        Diffusion(prediction="x")
    with pytest.raises(ValueError, match="unknown loss_weighting 'snr'"):
        Diffusion(loss_weighting="snr")
    with pytest.raises(ValueError, match="unknown thresholding"):
        Diffusion(thresholding="clip")
    with pytest.raises(ValueError, match="logsnr_min < logsnr_max"):
        Diffusion(logsnr_min=5.0, logsnr_max=-5.0)
    with pytest.raises(ValueError, match="dynamic_percentile"):
        Diffusion(dynamic_percentile=99.5)
    with pytest.raises(ValueError, match=r"unknown keys \['predicton'\]"):
        Diffusion.from_config({"predicton": "v"})
    with pytest.raises(ValueError, match="give both resolution and base_resolution"):
        Diffusion.from_config({"resolution": 128})
    with pytest.raises(ValueError, match="either shift or resolution"):
        Diffusion.from_config({"resolution": 128, "base_resolution": 64, "shift": 1.0})
    with pytest.raises(ValueError, match="unknown time_distribution 'normal'"):
        Diffusion(time_distribution="normal")
    with pytest.raises(ValueError, match="time_logit_std must be > 0"):
        Diffusion(time_distribution="logit_normal", time_logit_std=0.0)
    assert Diffusion.from_config({"time_distribution": "logit_normal", "time_logit_mean": 2.0}
                                 ) == Diffusion(time_distribution="logit_normal",
                                                time_logit_mean=2.0)


# --- Loss --------------------------------------------------------------------------------


def test_sample_times_uniform_and_low_discrepancy():
    t = np.asarray(losses.sample_times(jax.random.key(0), 64, low_discrepancy=True))
    gaps = np.diff(np.sort(t))
    np.testing.assert_allclose(gaps, 1 / 64, atol=1e-5)  # evenly spread
    t_iid = np.asarray(losses.sample_times(jax.random.key(0), 4096, low_discrepancy=False))
    assert t_iid.min() >= 0 and t_iid.max() < 1
    assert abs(t_iid.mean() - 0.5) < 0.02  # sd of the mean: 0.0045


def test_sample_times_logit_normal_moments_quantiles_and_errors():
    mean, std = 1.5, 0.7
    t = np.asarray(losses.sample_times(jax.random.key(0), 4096, False, "logit_normal",
                                       mean, std), np.float64)
    logit = np.log(t / (1 - t))
    assert abs(logit.mean() - mean) < 0.05  # sd of the mean: 0.011
    assert abs(logit.std() - std) < 0.04
    # Low discrepancy goes through the inverse CDF: the batch sits one per 1/64 quantile.
    t = np.asarray(losses.sample_times(jax.random.key(1), 64, True, "logit_normal", mean, std),
                   np.float64)
    u = normal_cdf((np.log(t / (1 - t)) - mean) / std)
    np.testing.assert_allclose(np.diff(np.sort(u)), 1 / 64, atol=1e-4)
    with pytest.raises(ValueError, match="unknown distribution 'beta'"):
        losses.sample_times(jax.random.key(0), 4, True, "beta")


def test_logit_normal_times_reach_the_loss_where_configured():
    """A mean of 4.4 puts about half of training below log-SNR -8 (the default cosine
    schedule reaches it at t = 0.9884), against 1.2% for uniform times."""
    x0 = uniform((512, 4), seed=0)
    t_at = 1 - 0.0116  # logsnr_cosine(t_at) ~ -8
    expected = 1 - normal_cdf(math.log(t_at / (1 - t_at)) - 4.4)
    fractions = {}
    for name, diffusion in (("uniform", Diffusion()),
                            ("logit_normal", Diffusion(time_distribution="logit_normal",
                                                       time_logit_mean=4.4))):
        _, aux = losses.diffusion_loss(lambda z, logsnr, cond: z, x0, None,
                                       jax.random.key(2), diffusion)
        np.testing.assert_allclose(aux["logsnr"], diffusion.logsnr(aux["t"]), atol=1e-5)
        fractions[name] = float(np.mean(np.asarray(aux["logsnr"]) < -8.0))
    assert abs(fractions["logit_normal"] - expected) < 0.01  # one low-discrepancy batch
    assert abs(fractions["uniform"] - 0.0116) < 0.01


def test_a_uniform_share_keeps_part_of_a_skewed_batch_everywhere():
    """time_uniform_fraction=0.25 draws a quarter of each batch uniformly (evenly spread) and
    the rest from the logit-normal density (evenly spread over its quantiles)."""
    mean, std = 4.4, 1.0
    t = np.asarray(losses.sample_times(jax.random.key(3), 64, True, "logit_normal", mean, std,
                                       uniform_fraction=0.25), np.float64)
    uniform_part, skewed_part = t[:16], t[16:]
    np.testing.assert_allclose(np.diff(np.sort(uniform_part)), 1 / 16, atol=1e-5)
    u = normal_cdf((np.log(skewed_part / (1 - skewed_part)) - mean) / std)
    np.testing.assert_allclose(np.diff(np.sort(u)), 1 / 48, atol=1e-4)
    assert (uniform_part < 0.5).sum() == 8 and (skewed_part < 0.5).sum() == 0
    same = losses.sample_times(jax.random.key(3), 64, True, "logit_normal", mean, std)
    all_skewed = losses.sample_times(jax.random.key(3), 64, True, "logit_normal", mean, std,
                                     uniform_fraction=0.0)
    np.testing.assert_array_equal(same, all_skewed)
    everything = losses.sample_times(jax.random.key(3), 64, True, "uniform",
                                     uniform_fraction=0.25)
    np.testing.assert_allclose(np.diff(np.sort(everything)), 1 / 64, atol=1e-5)
    # An unmixed batch draws from the key itself, as before the share existed (same runs).
    u0 = float(jax.random.uniform(jax.random.key(3), ()))
    np.testing.assert_allclose(everything, np.mod(u0 + np.arange(64) / 64, 1.0), atol=1e-6)
    _, aux = losses.diffusion_loss(
        lambda z, logsnr, cond: z, uniform((64, 4), seed=0), None, jax.random.key(2),
        Diffusion(time_distribution="logit_normal", time_logit_mean=mean,
                  time_uniform_fraction=0.5))
    assert int((np.asarray(aux["t"]) < 0.5).sum()) == 16  # the uniform half's lower half
    with pytest.raises(ValueError, match="time_uniform_fraction is a share"):
        Diffusion(time_uniform_fraction=1.5)


def test_loss_target_noise_and_reduction():
    """The model sees z = alpha x0 + sigma eps and is scored against the right target."""
    x0 = uniform((4, 2, 3, 3, 1), seed=0)
    rng = jax.random.key(1)
    seen = {}

    def model_fn(z, logsnr, cond):
        seen.update(z=z, logsnr=logsnr, cond=cond)
        return jnp.zeros_like(z)

    for prediction in ("eps", "v"):
        diffusion = Diffusion(prediction=prediction, low_discrepancy_t=False)
        loss, aux = losses.diffusion_loss(model_fn, x0, {"c": jnp.ones((4, 2))}, rng, diffusion)
        assert seen["logsnr"].shape == (4,) and seen["cond"]["c"].shape == (4, 2)
        np.testing.assert_allclose(aux["logsnr"], diffusion.logsnr(aux["t"]), atol=1e-6)
        # Recover the noise the loss drew, then the target; a zero prediction costs its MSE.
        eps = schedules.eps_from_x0(seen["z"], x0, aux["logsnr"])
        target = schedules.prediction_from_x0_eps(prediction, x0, eps, aux["logsnr"])
        expected = np.mean(np.square(target), axis=(1, 2, 3, 4))
        np.testing.assert_allclose(aux["loss_per_example"], expected, rtol=2e-3)
        np.testing.assert_allclose(loss, expected.mean(), rtol=2e-3)


def test_loss_weightings_against_closed_forms():
    logsnr = jnp.array([-10.0, -1.0, 0.0, 1.0, math.log(5.0), 4.0, 10.0])
    snr = np.exp(np.asarray(logsnr, np.float64))
    sigma2 = 1 / (1 + snr)
    cases = {
        ("eps", "none"): np.ones_like(snr),
        ("v", "none"): np.ones_like(snr),
        ("eps", "min_snr"): np.minimum(snr, 5.0) / snr,
        ("v", "min_snr"): np.minimum(snr, 5.0) * sigma2,
        ("eps", "truncated_snr"): np.maximum(snr, 1.0) / snr,
        ("v", "truncated_snr"): np.maximum(snr, 1.0) * sigma2,
    }
    for (prediction, weighting), expected in cases.items():
        diffusion = Diffusion(prediction=prediction, loss_weighting=weighting)
        got = losses.loss_weight(logsnr, diffusion)
        np.testing.assert_allclose(got, expected, rtol=1e-5, err_msg=f"{prediction} {weighting}")
        assert np.all(np.isfinite(losses.loss_weight(jnp.array([-30.0, 30.0]), diffusion)))


def test_loss_mask_and_example_weight():
    x0 = jnp.zeros((3, 4, 4, 1))
    diffusion = Diffusion(prediction="eps")
    # Error 1 on the left half of each image, 3 on the right half: the model predicts
    # target + offset, which we get by computing the target from the noisy input.

    def model_fn(z, logsnr, cond):
        eps = schedules.eps_from_x0(z, jnp.zeros_like(z), logsnr)
        offset = jnp.concatenate([jnp.ones((3, 4, 2, 1)), 3 * jnp.ones((3, 4, 2, 1))], axis=2)
        return eps + offset

    rng = jax.random.key(0)
    loss, aux = losses.diffusion_loss(model_fn, x0, None, rng, diffusion)
    np.testing.assert_allclose(aux["loss_per_example"], 5.0, rtol=1e-3)  # (1 + 9) / 2
    left = jnp.concatenate([jnp.ones((3, 4, 2, 1)), jnp.zeros((3, 4, 2, 1))], axis=2)
    mask = left.at[2].set(0.0)  # third example: empty mask
    loss, aux = losses.diffusion_loss(model_fn, x0, None, rng, diffusion, mask=mask)
    np.testing.assert_allclose(aux["loss_per_example"], [1.0, 1.0, 0.0], atol=2e-3)
    loss, aux = losses.diffusion_loss(
        model_fn, x0, None, rng, diffusion, mask=1 - left, example_weight=jnp.array([1.0, 0, 0])
    )
    np.testing.assert_allclose(loss, 9.0, rtol=1e-3)
    with pytest.raises(ValueError, match="mask must have x0's rank"):
        losses.diffusion_loss(model_fn, x0, None, rng, diffusion, mask=jnp.ones((3, 4)))
    with pytest.raises(ValueError, match=r"example_weight must have shape \[3\]"):
        losses.diffusion_loss(model_fn, x0, None, rng, diffusion, example_weight=jnp.ones(2))
    with pytest.raises(ValueError, match="model_fn returned shape"):
        losses.diffusion_loss(lambda z, l, c: z[:, :2], x0, None, rng, diffusion)


def test_loss_is_deterministic_from_key_and_differentiable():
    x0 = uniform((2, 3, 4, 4, 2), seed=0)

    def loss_of(scale, key):
        return losses.diffusion_loss(
            lambda z, l, c: scale * z, x0, None, key, Diffusion(loss_weighting="min_snr")
        )[0]

    a = jax.jit(loss_of)(0.5, jax.random.key(1))
    b = jax.jit(loss_of)(0.5, jax.random.key(1))
    c = jax.jit(loss_of)(0.5, jax.random.key(2))
    assert float(a) == float(b) and float(a) != float(c)
    grad = jax.jit(jax.grad(loss_of))(0.5, jax.random.key(1))
    assert np.isfinite(grad) and grad != 0


def test_drop_condition_replaces_whole_examples():
    b = 2000
    cond = {"emb": jnp.ones((b, 3, 2)), "mask": jnp.ones((b, 3), bool)}
    null = {"emb": jnp.zeros((1, 3, 2)), "mask": jnp.zeros((1, 3), bool)}
    out = losses.drop_condition(cond, null, jax.random.key(0), 0.25)
    dropped = np.asarray(out["emb"][:, 0, 0] == 0)
    # Each example is all-cond or all-null, mask and embedding together.
    np.testing.assert_array_equal(np.asarray(out["emb"]).reshape(b, -1).min(1) == 0, dropped)
    np.testing.assert_array_equal(~np.asarray(out["mask"]).any(1), dropped)
    assert abs(dropped.mean() - 0.25) < 0.04  # sd 0.0097
    assert out["mask"].dtype == jnp.bool_
    kept = losses.drop_condition(cond, null, jax.random.key(0), 0.0)
    assert bool(jnp.all(kept["emb"] == 1))
    all_null = losses.drop_condition(cond, {k: v.repeat(b, 0) for k, v in null.items()},
                                     jax.random.key(0), 1.0)
    assert bool(jnp.all(all_null["emb"] == 0))
    with pytest.raises(ValueError, match="probability"):
        losses.drop_condition(cond, null, jax.random.key(0), 1.5)
    with pytest.raises(ValueError, match="same pytree structure"):
        losses.drop_condition(cond, {"emb": null["emb"]}, jax.random.key(0), 0.1)
    with pytest.raises(ValueError, match="needs batch 1 or 2000"):
        losses.drop_condition(cond, {"emb": jnp.zeros((3, 3, 2)), "mask": null["mask"]},
                              jax.random.key(0), 0.1)


# --- Classifier-free guidance --------------------------------------------------------------


def toy_conditional_model(calls):
    """pred = z * 0.5 + sum of the (masked) text embedding; records each call's batch."""

    def model_fn(z, logsnr, cond):
        calls.append(z.shape[0])
        assert logsnr.shape == (z.shape[0],)
        text = jnp.sum(cond["emb"] * cond["mask"][..., None], axis=(1, 2))  # [b]
        return 0.5 * z + schedules.per_example(text + 0.1 * logsnr, z)

    return model_fn


def test_classifier_free_guidance_combines_one_batched_call():
    b = 3
    z = normal((b, 2, 4, 4, 3), seed=0)
    logsnr = jnp.array([-2.0, 0.0, 3.0])
    cond = {"emb": normal((b, 5, 8), seed=1) + 1.0, "mask": jnp.ones((b, 5))}
    null = {"emb": jnp.zeros((1, 5, 8)), "mask": jnp.zeros((1, 5))}
    calls = []
    model_fn = toy_conditional_model(calls)
    conditional = model_fn(z, logsnr, cond)
    unconditional = model_fn(z, logsnr, jax.tree_util.tree_map(
        lambda n: jnp.broadcast_to(n, (b,) + n.shape[1:]), null))

    calls.clear()
    guided = guidance.classifier_free_guidance(model_fn, cond, null, 1.0)(z, logsnr)
    assert calls == [2 * b]  # one call with the doubled batch
    np.testing.assert_allclose(guided, conditional, atol=1e-6)
    guided0 = guidance.classifier_free_guidance(model_fn, cond, null, 0.0)(z, logsnr)
    np.testing.assert_allclose(guided0, unconditional, atol=1e-6)
    guided3 = guidance.classifier_free_guidance(model_fn, cond, null, 3.0)(z, logsnr)
    np.testing.assert_allclose(
        guided3, unconditional + 3.0 * (conditional - unconditional), atol=1e-5)
    # Per-example scales, null condition with full batch, inside jit.
    scales = jnp.array([0.0, 1.0, 7.5])
    null_b = jax.tree_util.tree_map(lambda n: jnp.repeat(n, b, 0), null)
    per_example = jax.jit(
        lambda z, l: guidance.classifier_free_guidance(model_fn, cond, null_b, scales)(z, l)
    )(z, logsnr)
    np.testing.assert_allclose(per_example[0], unconditional[0], atol=1e-6)
    np.testing.assert_allclose(per_example[1], conditional[1], atol=1e-6)
    np.testing.assert_allclose(
        per_example[2], unconditional[2] + 7.5 * (conditional[2] - unconditional[2]), atol=1e-4)


def test_classifier_free_guidance_errors():
    cond = {"emb": jnp.ones((2, 3)), "mask": jnp.ones((2, 3))}
    null = {"emb": jnp.zeros((1, 3)), "mask": jnp.zeros((1, 3))}
    model_fn = lambda z, l, c: z  # noqa: E731
    with pytest.raises(ValueError, match="scale must be >= 0"):
        guidance.classifier_free_guidance(model_fn, cond, null, -1.0)
    with pytest.raises(ValueError, match="scale must be >= 0"):
        guidance.classifier_free_guidance(model_fn, cond, null, np.array([1.0, -0.5]))
    with pytest.raises(ValueError, match="same pytree structure"):
        guidance.classifier_free_guidance(model_fn, cond, null["emb"], 2.0)
    with pytest.raises(ValueError, match="same trailing shape"):
        guidance.classifier_free_guidance(
            model_fn, cond, {"emb": jnp.zeros((1, 4)), "mask": null["mask"]}, 2.0)


# --- Sampler hooks, thresholding, determinism ----------------------------------------------


def test_dynamic_threshold_range_and_identity_in_range():
    in_range = uniform((2, 3, 8, 8, 3), seed=0)
    np.testing.assert_array_equal(samplers.dynamic_threshold(in_range), in_range)
    wild = jnp.concatenate([in_range[:1], 4.0 * normal((1, 3, 8, 8, 3), seed=1)])
    out = samplers.dynamic_threshold(wild, 0.995)
    assert float(jnp.max(jnp.abs(out))) <= 1.0
    np.testing.assert_array_equal(out[0], wild[0])  # per example: the first is untouched
    s = np.quantile(np.abs(np.asarray(wild[1])), 0.995)
    np.testing.assert_allclose(out[1], np.clip(wild[1], -s, s) / s, rtol=1e-5)
    assert float(jnp.max(jnp.abs(out[1]))) == pytest.approx(1.0)  # scaled, not just clipped
    np.testing.assert_array_equal(samplers.static_threshold(wild), jnp.clip(wild, -1, 1))


def test_sampler_thresholding_keeps_x0_estimates_in_range():
    """A model whose x0 estimates are far out of range: the config's thresholding must bring
    every estimate into [-1, 1] before the user's x0_transform sees it."""

    def wild_eps(z, logsnr):
        return -5.0 * z  # x0 = (z - sigma eps) / alpha = (1 + 5 sigma) z / alpha: huge

    def max_abs_x0_per_step(thresholding):
        maxima = []

        def record(x0):
            jax.debug.callback(lambda m: maxima.append(float(m)), jnp.max(jnp.abs(x0)))
            return x0

        diffusion = Diffusion(prediction="eps", thresholding=thresholding)
        out = samplers.ddim_sample(wild_eps, (2, 8, 8, 1), jax.random.key(0), diffusion,
                                   steps=5, x0_transform=record, clip_output=False)
        out.block_until_ready()
        jax.effects_barrier()
        return np.array(maxima), np.asarray(out)

    unthresholded, _ = max_abs_x0_per_step("none")
    assert len(unthresholded) == 5 and unthresholded.max() > 10
    for thresholding in ("static", "dynamic"):
        maxima, out = max_abs_x0_per_step(thresholding)
        assert len(maxima) == 5 and maxima.max() <= 1.0 + 1e-6
        assert np.abs(out).max() <= 1.0 + 1e-6  # the last estimate is the output


def test_sampler_determinism_and_seed_dependence():
    diffusion = Diffusion(prediction="v")

    def fn(z, logsnr):
        return 0.3 * z + schedules.per_example(0.01 * logsnr, z)

    shape = (2, 3, 8, 8, 3)  # [b, t, h, w, c]
    for method in ("ddim", "ddpm"):
        run = jax.jit(lambda key: samplers.sample(
            method, fn, shape, key, diffusion, steps=6, eta=0.5 if method == "ddim" else 0.0))
        a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
        assert a.shape == shape and a.dtype == jnp.float32
        np.testing.assert_array_equal(a, b)
        assert float(jnp.max(jnp.abs(a - c))) > 1e-2
        assert float(jnp.max(jnp.abs(a))) <= 1.0


def test_sampler_calls_model_once_per_step_with_logsnr_grid():
    diffusion = Diffusion(prediction="v", thresholding="none")
    logsnrs = []

    def fn(z, logsnr):
        jax.debug.callback(lambda l: logsnrs.append(np.asarray(l)), logsnr)
        return jnp.zeros_like(z)

    samplers.ddim_sample(fn, (2, 4), jax.random.key(0), diffusion, steps=4).block_until_ready()
    jax.effects_barrier()
    got = np.stack(logsnrs)  # [steps, b]
    expected = diffusion.logsnr(jnp.array([1.0, 0.75, 0.5, 0.25]))
    np.testing.assert_allclose(got, np.repeat(np.asarray(expected)[:, None], 2, 1), atol=1e-5)


def test_replace_known_makes_known_region_exact():
    shape = (2, 4, 6, 6, 3)  # [b, t, h, w, c]
    x_known = uniform(shape, seed=0)
    # Image-to-video: the first frame is known; plus a spatial box in every frame.
    mask = jnp.zeros(shape[:-1] + (1,)).at[:, 0].set(1.0).at[:, :, 1:3, 2:5].set(1.0)
    diffusion = Diffusion(prediction="v", thresholding="dynamic")

    def fn(z, logsnr):
        return 0.5 * z - 0.2

    for method in ("ddim", "ddpm"):
        out = jax.jit(lambda k: samplers.sample(
            method, fn, shape, k, diffusion, steps=8,
            z_transform=samplers.replace_known(x_known, mask)))(jax.random.key(3))
        known = np.broadcast_to(np.asarray(mask) == 1, shape)
        np.testing.assert_array_equal(np.asarray(out)[known], np.asarray(x_known)[known])
        assert np.abs(np.asarray(out)[~known] - np.asarray(x_known)[~known]).mean() > 0.1


def test_replace_known_noises_to_the_step_level():
    x_known = jnp.full((4000, 8), 0.5)
    z = jnp.zeros_like(x_known)
    mask = jnp.ones_like(x_known).at[:, 4:].set(0.0)
    logsnr = jnp.full((4000,), 1.0)
    out = np.asarray(samplers.replace_known(x_known, mask)(z, logsnr, jax.random.key(0)))
    alpha, sigma = schedules.alpha_sigma(1.0)
    assert abs(out[:, :4].mean() - 0.5 * float(alpha)) < 0.01
    assert abs(out[:, :4].std() - float(sigma)) < 0.01
    np.testing.assert_array_equal(out[:, 4:], 0.0)


def test_noise_to_statistics_and_validation():
    diffusion = Diffusion()
    x0 = jnp.full((10, 1000), -0.4)
    z = np.asarray(samplers.noise_to(x0, 0.3, jax.random.key(0), diffusion))
    alpha, sigma = schedules.alpha_sigma(diffusion.logsnr(0.3))
    assert abs(z.mean() - (-0.4 * float(alpha))) < 0.01
    assert abs(z.std() - float(sigma)) < 0.01
    fn = lambda z, l: z  # noqa: E731
    with pytest.raises(ValueError, match="needs z_init"):
        samplers.ddim_sample(fn, (10, 1000), jax.random.key(0), diffusion, steps=3, start_t=0.5)
    with pytest.raises(ValueError, match=r"start_t must be in \(0, 1\]"):
        samplers.ddim_sample(fn, (10, 1000), jax.random.key(0), diffusion, steps=3,
                             start_t=0.0, z_init=jnp.asarray(z))
    with pytest.raises(ValueError, match="z_init has shape"):
        samplers.ddim_sample(fn, (10, 999), jax.random.key(0), diffusion, steps=3,
                             z_init=jnp.asarray(z))
    with pytest.raises(ValueError, match="steps must be a positive int"):
        samplers.ddim_sample(fn, (10, 1000), jax.random.key(0), diffusion, steps=0)
    with pytest.raises(ValueError, match="Unknown sampler 'euler'"):
        samplers.sample("euler", fn, (10, 1000), jax.random.key(0), diffusion, steps=3)


def test_sampling_with_batch_sharded_over_devices_matches_single_device():
    """CFG + DDPM under a data-parallel mesh (8 forced host devices in CI)."""
    devices = min(jax.device_count(), 8)
    mesh = jax.make_mesh((devices,), ("data",))
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    shape = (8, 2, 4, 4, 3)  # [b, t, h, w, c]
    text = jnp.arange(8.0)  # [b]: a stand-in condition

    def model_fn(z, logsnr, cond):
        return 0.5 * z + schedules.per_example(0.1 * cond + 0.01 * logsnr, z)

    def generate(key, text):
        fn = guidance.classifier_free_guidance(model_fn, text, jnp.zeros((1,)), 2.0)
        return samplers.ddpm_sample(fn, shape, key, Diffusion(), steps=4)

    single = jax.jit(generate)(jax.random.key(0), text)
    sharded = jax.jit(generate, out_shardings=batch_sharding)(
        jax.random.key(0), jax.device_put(text, batch_sharding))
    assert sharded.sharding.is_equivalent_to(batch_sharding, sharded.ndim)
    np.testing.assert_allclose(sharded, single, atol=1e-5)


def test_frame_correlated_noise_has_the_configured_covariance():
    """Every frame stays N(0, 1) and any two frames of a clip correlate by rho (PYoCo's mixed
    prior); images and rho = 0 are untouched; clips stay independent of each other."""
    eps = schedules.gaussian_noise(jax.random.key(0), (2000, 8, 4, 4, 3))
    for rho in (0.0, 0.5, 0.9):
        mixed = np.asarray(schedules.correlate_frames(eps, rho))
        frames = mixed.transpose(1, 0, 2, 3, 4).reshape(8, -1)  # [t, samples]
        cov = np.cov(frames)
        np.testing.assert_allclose(np.diag(cov), 1.0, atol=0.02)
        off = cov[~np.eye(8, dtype=bool)]
        np.testing.assert_allclose(off, rho, atol=0.02)
        clips = mixed[:, 0].reshape(2000, -1)
        assert abs(np.corrcoef(clips[:-1].ravel(), clips[1:].ravel())[0, 1]) < 0.02
    np.testing.assert_array_equal(schedules.correlate_frames(eps, 0.0), eps)
    image = eps[:, 0]
    np.testing.assert_array_equal(schedules.correlate_frames(image, 0.7), image)


def test_frame_correlation_reaches_training_and_sampling_noise():
    diffusion = Diffusion(frame_correlation=0.8, low_discrepancy_t=False)
    x0 = jnp.zeros((64, 6, 4, 4, 3))
    seen = {}

    def model_fn(z, logsnr, cond):
        seen.update(z=z, logsnr=logsnr)
        return jnp.zeros_like(z)

    losses.diffusion_loss(model_fn, x0, None, jax.random.key(0), diffusion)
    eps = np.asarray(schedules.eps_from_x0(seen["z"], x0, seen["logsnr"]))
    frames = eps.transpose(1, 0, 2, 3, 4).reshape(6, -1)
    assert np.corrcoef(frames)[0, 1] == pytest.approx(0.8, abs=0.03)
    z = np.asarray(samplers.noise_to(x0, 1.0, jax.random.key(1), diffusion))
    assert np.corrcoef(z[:, 2].ravel(), z[:, 5].ravel())[0, 1] == pytest.approx(0.8, abs=0.03)
    with pytest.raises(ValueError, match=r"frame_correlation is a correlation in \[0, 1\)"):
        Diffusion(frame_correlation=1.0)
