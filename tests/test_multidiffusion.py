"""MultiDiffusion over temporal windows: window layout, least-squares merge, exactness, CFG."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lumiere_jax.diffusion import guidance, multidiffusion, samplers
from lumiere_jax.diffusion.schedules import Diffusion


def normal(shape, seed):
    """Test data from numpy: no per-shape compile of a JAX random kernel."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def frame_mixing_fn(window, channels, seed=0):
    """A nonlinear toy denoiser on [b, window, h, w, c]: a fixed random linear map over
    (frame, channel), a logsnr term, then tanh. Every output frame depends on every input
    frame, so overlapping windows disagree on the frames they share."""
    m = normal((window, channels, window, channels), seed) / np.sqrt(window * channels)

    def fn(z, logsnr):
        mixed = jnp.einsum("bfhwc,fcgd->bghwd", z, m)
        return jnp.tanh(mixed + 0.1 * logsnr[:, None, None, None, None])

    return fn


# --- Window layout -------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames, window, overlap, expected", [
    (16, 8, 2, (0, 6, 8)),  # stride 6: 0, 6; a window at 12 would end at 20 > 16, so the
                            # last one is shifted to end at 16: start 8 (overlaps 6 frames)
    (14, 8, 2, (0, 6)),     # stride 6: 0, 6 and 6 + 8 = 14 ends exactly at the clip's end
    (8, 8, 2, (0,)),        # the window is the whole clip
    (11, 4, 1, (0, 3, 6, 7)),  # stride 3: 0, 3, 6 end at 10 < 11, so add 11 - 4 = 7
    (80, 16, 2, (0, 14, 28, 42, 56, 64)),  # Lumiere-like: 80 frames; 56 + 16 = 72 < 80
    (8, 4, 0, (0, 4)),      # no overlap: tiles
    (3, 1, 0, (0, 1, 2)),   # one-frame windows
])
def test_window_starts_cases_and_coverage(num_frames, window, overlap, expected):
    starts = multidiffusion.window_starts(num_frames, window, overlap)
    assert starts == expected
    covered = np.zeros(num_frames, int)
    for s in starts:
        assert 0 <= s <= num_frames - window  # every window is full
        covered[s : s + window] += 1
    assert np.all(covered >= 1)
    # Consecutive windows overlap by at least `overlap` frames.
    assert all(b - a <= window - overlap for a, b in itertools.pairwise(starts))


def test_window_starts_and_weights_errors():
    with pytest.raises(ValueError, match="window must be >= 1"):
        multidiffusion.window_starts(8, 0, 0)
    with pytest.raises(ValueError, match=r"overlap must be in \[0, window\), got overlap=-1"):
        multidiffusion.window_starts(8, 4, -1)
    with pytest.raises(ValueError, match="got overlap=4 for window=4"):
        multidiffusion.window_starts(8, 4, 4)
    with pytest.raises(ValueError, match=r"window=16 exceeds .* num_frames=8.*use window=8"):
        multidiffusion.window_starts(8, 16, 2)
    with pytest.raises(ValueError, match=r"unknown weights 'gauss'.*\('uniform', 'tapered'\)"):
        multidiffusion.window_weights(8, 2, "gauss")


def test_window_weights_values():
    np.testing.assert_array_equal(multidiffusion.window_weights(5, 2, "uniform"), np.ones(5))
    np.testing.assert_allclose(multidiffusion.window_weights(8, 2, "tapered"),
                               [1 / 3, 2 / 3, 1, 1, 1, 1, 2 / 3, 1 / 3], rtol=1e-6)
    # Ramps that meet in the middle take the smaller one; still strictly positive.
    np.testing.assert_allclose(multidiffusion.window_weights(3, 2, "tapered"),
                               [1 / 3, 2 / 3, 1 / 3], rtol=1e-6)
    np.testing.assert_array_equal(multidiffusion.window_weights(4, 0, "tapered"), np.ones(4))


# --- Exactness and least squares -----------------------------------------------------------


def test_whole_clip_window_samples_bitwise_like_fn():
    shape = (2, 8, 4, 4, 3)
    fn = frame_mixing_fn(8, 3)
    diffusion = Diffusion()
    rng = jax.random.key(0)
    direct = samplers.ddim_sample(fn, shape, rng, diffusion, steps=3)
    wrapped = samplers.ddim_sample(
        multidiffusion.multidiffusion(fn, 8, window=8), shape, rng, diffusion, steps=3)
    np.testing.assert_array_equal(wrapped, direct)
    assert float(jnp.std(direct)) > 0.1  # a real sample, not all zeros

    # The general split -> vmap -> merge path is exact too with one window, for both kinds
    # of weights (its merge coefficient is exactly 1).
    for kind in multidiffusion.WEIGHTS:
        weights = multidiffusion.window_weights(8, 2, kind)

        def general(z, logsnr, weights=weights):
            windows = multidiffusion.split_windows(z, (0,), 8)
            preds = jax.vmap(lambda zw: fn(zw, logsnr))(windows)
            return multidiffusion.merge_windows(preds, (0,), 8, weights)

        z, logsnr = normal(shape, 1), jnp.array([-1.0, 2.0])
        roundtrip = multidiffusion.merge_windows(
            multidiffusion.split_windows(z, (0,), 8), (0,), 8, weights)
        np.testing.assert_array_equal(roundtrip, z)
        np.testing.assert_array_equal(general(z, logsnr), fn(z, logsnr))
        general_sample = samplers.ddim_sample(general, shape, rng, diffusion, steps=3)
        np.testing.assert_array_equal(general_sample, direct)


@pytest.mark.parametrize("num_frames, window, overlap, kind", [
    (14, 8, 2, "uniform"),
    (14, 8, 2, "tapered"),
    (16, 8, 2, "uniform"),  # last window shifted: frames 8..13 are covered 2 or 3 times
    (16, 8, 2, "tapered"),
    (11, 4, 1, "tapered"),
])
def test_merge_is_the_least_squares_solution(num_frames, window, overlap, kind):
    b, h, w, c = 2, 2, 2, 3
    fn = frame_mixing_fn(window, c, seed=num_frames)
    z, logsnr = normal((b, num_frames, h, w, c), seed=3), jnp.array([0.5, -1.5])
    merged = np.asarray(
        multidiffusion.multidiffusion(fn, num_frames, window, overlap, kind)(z, logsnr))

    # Independent reference: per-window predictions (one plain call each), then the
    # weighted least-squares problem min_x sum_i ||sqrt(w) (P_i x - pred_i)||^2 solved by
    # numpy's lstsq with the stacked selection matrix A [n * window, num_frames].
    starts = multidiffusion.window_starts(num_frames, window, overlap)
    sqrt_w = np.sqrt(multidiffusion.window_weights(window, overlap, kind).astype(np.float64))
    rows, targets = [], []
    for s in starts:
        pred = np.asarray(fn(z[:, s : s + window], logsnr), np.float64)  # [b, window, h, w, c]
        for k in range(window):
            row = np.zeros(num_frames)
            row[s + k] = sqrt_w[k]
            rows.append(row)
            targets.append(sqrt_w[k] * pred[:, k].reshape(-1))  # all pixels at once
    solution, *_ = np.linalg.lstsq(np.stack(rows), np.stack(targets), rcond=None)
    expected = solution.reshape(num_frames, b, h, w, c).swapaxes(0, 1)
    np.testing.assert_allclose(merged, expected, atol=1e-5)
    # The windows really disagree on shared frames: the merge is not a plain copy.
    second = np.asarray(fn(z[:, starts[1] : starts[1] + window], logsnr))
    assert np.abs(second[:, 0] - merged[:, starts[1]]).max() > 1e-2


@pytest.mark.parametrize("kind", ["uniform", "tapered"])
def test_framewise_fn_is_unchanged(kind):
    # Each output frame depends only on its own input frame: all windows agree, so the
    # merge must give fn on the whole clip.
    m = normal((3, 3), seed=4)

    def framewise(z, logsnr):
        return jnp.tanh(z @ m + 0.3 * logsnr[:, None, None, None, None])

    z, logsnr = normal((2, 16, 3, 3, 3), seed=5), jnp.array([1.0, -2.0])
    out = multidiffusion.multidiffusion(framewise, 16, 8, 2, kind)(z, logsnr)
    np.testing.assert_allclose(out, framewise(z, logsnr), atol=1e-6)


def test_composes_with_classifier_free_guidance_under_jit():
    b, num_frames, window, overlap = 2, 11, 4, 1
    mix = frame_mixing_fn(window, 3, seed=6)
    cond = {"emb": normal((b, 5), seed=7)}
    null = {"emb": jnp.zeros((1, 5))}

    def model_fn(z, logsnr, cond):  # per-example conditioning: batch must match z's
        assert cond["emb"].shape[0] == z.shape[0] == logsnr.shape[0]
        text = jnp.sum(cond["emb"], axis=1)[:, None, None, None, None]
        return mix(z, logsnr) + 0.5 * text * jnp.tanh(z)

    guided = guidance.classifier_free_guidance(model_fn, cond, null, 3.0)
    wrapped = multidiffusion.multidiffusion(guided, num_frames, window, overlap, "tapered")
    z, logsnr = normal((b, num_frames, 2, 2, 3), seed=8), jnp.array([0.0, 1.0])
    out = jax.jit(wrapped)(z, logsnr)

    # By hand: guidance on each window separately, then the tapered weighted average.
    weights = multidiffusion.window_weights(window, overlap, "tapered")
    numerator, denominator = np.zeros(z.shape), np.zeros(num_frames)
    for s in (0, 3, 6, 7):
        pred = np.asarray(guided(z[:, s : s + window], logsnr))
        numerator[:, s : s + window] += weights[None, :, None, None, None] * pred
        denominator[s : s + window] += weights
    expected = numerator / denominator[None, :, None, None, None]
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # Guidance matters here (scale 3 vs the conditional prediction alone).
    conditional = multidiffusion.multidiffusion(
        guidance.classifier_free_guidance(model_fn, cond, null, 1.0),
        num_frames, window, overlap, "tapered")(z, logsnr)
    assert np.abs(np.asarray(out) - np.asarray(conditional)).max() > 1e-2


# --- Errors --------------------------------------------------------------------------------


def test_errors():
    fn = frame_mixing_fn(4, 3)
    wrapped = multidiffusion.multidiffusion(fn, 10, 4)
    with pytest.raises(ValueError, match=r"z has shape \(1, 12, 2, 2, 3\), expected \[b, 10"):
        wrapped(jnp.zeros((1, 12, 2, 2, 3)), jnp.zeros(1))
    whole = multidiffusion.multidiffusion(fn, 4, 4)  # the short-circuit checks too
    with pytest.raises(ValueError, match="expected \\[b, 4, ...\\]"):
        whole(jnp.zeros((1, 5, 2, 2, 3)), jnp.zeros(1))
    windows = jnp.zeros((2, 1, 4, 3))
    with pytest.raises(ValueError, match=r"frames \[4, 5\] of 10 have no window"):
        multidiffusion.merge_windows(windows, (0, 6), 10)
    with pytest.raises(ValueError, match="need one start per window"):
        multidiffusion.merge_windows(windows, (0, 3, 6), 10)
    with pytest.raises(ValueError, match="need one start per window"):
        multidiffusion.merge_windows(windows, (0, 6), 10, weights=np.ones(3))
