"""Spatial super-resolution: the SSR network, its low-res conditioning, its loss, MultiDiffusion
with per-frame conditioning, and the 'ssr' denoiser kind."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from lumiere_jax.diffusion import multidiffusion
from lumiere_jax.diffusion.schedules import Diffusion
from lumiere_jax.diffusion.ssr import (
    augment_condition,
    downsample_video,
    project_to_low_res,
    ssr_loss,
)
from lumiere_jax.models.denoiser import build_denoiser, net_config
from lumiere_jax.models.ssr import SSR, SSRConfig, upsample_video
from lumiere_jax.models.stunet import STUNetConfig
from lumiere_jax.models.unet import UNetConfig
from lumiere_jax.parallel.sharding import unannotated_params

UNET = UNetConfig(channels=8, channel_mult=(1, 2), attention_levels=(1,), head_dim=8, groups=4,
                  text_dim=8, extra_in_channels=3)
CFG = SSRConfig(stunet=STUNetConfig(unet=UNET, temporal_sampling_levels=(), temporal_head_dim=8),
                scale=4)
B, T, HW = 2, 4, 16
LOW = HW // CFG.scale


def normal(shape, seed):
    """Test data from numpy: no per-shape compile of a JAX random kernel."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _rngs(seed: int = 0) -> nnx.Rngs:
    """Parameter init from an RBG key: its kernels compile ~5x faster than threefry's, one
    per parameter shape, which dominated this file's runtime on a 2-core CPU."""
    return nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))


def _randomise(module: nnx.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Perturb every parameter: zero-initialised layers would hide mistakes. (numpy noise:
    nothing to compile.)"""
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    nnx.update(module, jax.tree.unflatten(
        treedef, [x + scale * rng.standard_normal(x.shape, np.float32) for x in leaves]))


# XLA's cheap CPU backend passes: each program here runs a few times on tiny inputs, so its
# compile time is what counts (about half of the default's).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=_FAST_COMPILE)
def _jit_call(fn, graphdef, state, *args):
    return fn(nnx.merge(graphdef, state), *args)


def _forward(model, *args):
    return model(*args)


def _apply(model, *args, fn=_forward):
    """fn(model, *args) compiled once per fn, model structure and input shapes (eager
    execution compiles every primitive at every shape: several times slower here)."""
    return _jit_call(fn, *nnx.split(model), *args)


def _inputs(t: int = T):
    x = normal((B, t, HW, HW, 3), 2)
    low = normal((B, t, LOW, LOW, 3), 3)
    text = normal((B, 5, 8), 4)
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    return x, jnp.array([-3.0, 2.0]), text, mask, low, jnp.array([5.0, -1.0])


def _ssr(spatial: bool = True, temporal: bool = False) -> SSR:
    """An SSR with randomised spatial (U-Net and augmentation embedding) and/or temporal
    parameters; the rest keeps its initialisation."""
    model = SSR(CFG, rngs=_rngs())
    if spatial:
        _randomise(model.unet, seed=1)
        _randomise(model.aug_mlp1, seed=2)
        _randomise(model.aug_mlp2, seed=3)
    if temporal:
        _randomise(model.temporal, seed=4)
    return model


def _paths(module) -> list[str]:
    return ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(module, nnx.Param))]


# --- The network ---------------------------------------------------------------------------


def test_ssr_shapes_and_parameter_tree():
    model = _ssr(temporal=True)
    out = _apply(model, *_inputs())
    assert out.shape == (B, T, HW, HW, 3) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all() and float(jnp.abs(out).max()) > 1e-2
    # The first convolution takes x and the upsampled low-res video: 3 + 3 channels.
    assert model.unet.conv_in.kernel.shape == (3, 3, 6, UNET.channels)
    kinds = {type(b).__name__ for b in model.temporal.blocks.values()}
    assert kinds == {"TemporalConv", "TemporalAttention"}
    assert len(model.temporal.down) == 0 and len(model.temporal.up) == 0
    paths = _paths(model)
    assert any(p.startswith("temporal/blocks/") and "/qkv/" in p for p in paths)
    assert {p.split("/")[0] for p in paths} == {"unet", "temporal", "aug_mlp1", "aug_mlp2"}
    assert unannotated_params(nnx.state(model)) == []


def test_ssr_config_errors():
    with pytest.raises(ValueError, match=r"temporal_sampling_levels=None .* set "
                                         r"model.temporal.temporal_sampling_levels=\(\)"):
        SSRConfig(stunet=STUNetConfig(unet=UNET))
    with pytest.raises(ValueError, match="unet.extra_in_channels=0: set extra_in_channels=3"):
        SSRConfig(stunet=STUNetConfig(unet=UNetConfig(), temporal_sampling_levels=()))
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="scale is the integer upsampling factor"):
            SSRConfig(stunet=CFG.stunet, scale=bad)


def test_ssr_input_shape_errors():
    model = SSR(CFG, rngs=_rngs())
    x, logsnr, text, mask, low, aug = _inputs()
    with pytest.raises(ValueError, match=r"low_res has shape \(2, 4, 8, 8, 3\), expected "
                                         r"\(2, 4, 4, 4, 3\)"):
        model(x, logsnr, text, mask, jnp.zeros((B, T, 8, 8, 3)), aug)
    with pytest.raises(ValueError, match=r"expected \(2, 4, 4, 4, 3\): the same videos and "
                                         r"frames"):
        model(x, logsnr, text, mask, low[:, :3], aug)
    with pytest.raises(ValueError, match="frame size 18x16 must be divisible by scale=4"):
        model(jnp.zeros((B, T, 18, 16, 3)), logsnr, text, mask, low, aug)
    with pytest.raises(ValueError, match=r"aug_logsnr must have shape \[2\]"):
        model(x, logsnr, text, mask, low, jnp.zeros(()))
    with pytest.raises(ValueError, match=r"x must be a video \[b, t, H, W, 3\]"):
        model(x[:, 0], logsnr, text, mask, low, aug)


def test_conditioning_changes_the_output():
    model = _ssr(temporal=True)
    x, logsnr, text, mask, low, aug = _inputs()
    base = _apply(model, x, logsnr, text, mask, low, aug)
    # A different low-res video for example 0 only: example 0 changes, example 1 does not.
    other_low = _apply(model, x, logsnr, text, mask, low.at[0].set(normal(low.shape[1:], 5)), aug)
    assert float(jnp.abs(other_low[0] - base[0]).max()) > 1e-2
    np.testing.assert_allclose(other_low[1], base[1], atol=1e-6)
    # A different augmentation level changes the output through the embedding.
    other_aug = _apply(model, x, logsnr, text, mask, low, jnp.array([-15.0, 15.0]))
    assert float(jnp.abs(other_aug - base).max()) > 1e-2


def test_frames_are_independent_at_temporal_init():
    """With the temporal layers at their (zero-residual) init, the SSR on a clip is the SSR on
    each frame alone; randomising the temporal layers breaks that (the test can fail)."""
    model = _ssr()
    x, logsnr, text, mask, low, aug = _inputs()
    out = _apply(model, x, logsnr, text, mask, low, aug)
    per_frame = jnp.concatenate(
        [_apply(model, x[:, i:i + 1], logsnr, text, mask, low[:, i:i + 1], aug) for i in range(T)], 1)
    assert float(jnp.abs(per_frame).max()) > 1e-2
    np.testing.assert_allclose(out, per_frame, atol=1e-5)
    _randomise(model.temporal, seed=4)
    mixed = _apply(model, x, logsnr, text, mask, low, aug)
    assert float(jnp.abs(mixed - per_frame).max()) > 1e-3


# --- Low-res conditioning ------------------------------------------------------------------


def test_downsample_is_the_exact_block_mean():
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 12, 3)).astype(np.float32)
    want = x.reshape(2, 3, 2, 4, 3, 4, 3).mean(axis=(3, 5))
    got = jax.jit(downsample_video, static_argnums=1)(jnp.asarray(x), 4)
    assert got.shape == (2, 3, 2, 3, 3)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(downsample_video(jnp.asarray(x[:, 0]), 2),
                               x[:, 0].reshape(2, 4, 2, 6, 2, 3).mean(axis=(2, 4)), atol=1e-6)
    with pytest.raises(ValueError, match="frame size 8x12 is not divisible by scale=5"):
        downsample_video(jnp.asarray(x), 5)


def test_upsample_then_downsample():
    # A constant stays exactly constant.
    const = jnp.full((1, 2, 4, 4, 3), 0.37)
    np.testing.assert_allclose(downsample_video(upsample_video(const, (16, 16)), 4), const,
                               atol=1e-6)
    # Alignment: a linear ramp is reproduced exactly away from the borders (bilinear
    # interpolation of a linear function is that function; the block mean of a linear function
    # is its value at the block's centre). A half-pixel shift would break this.
    rows, cols = np.meshgrid(np.arange(8.0), np.arange(8.0), indexing="ij")
    ramp = jnp.asarray(np.repeat((0.25 * rows + 0.1 * cols)[None, :, :, None], 3, axis=-1))
    back = downsample_video(upsample_video(ramp, (32, 32)), 4)
    np.testing.assert_allclose(back[:, 1:-1, 1:-1], ramp[:, 1:-1, 1:-1], atol=1e-5)
    # Bilinear never overshoots the low-res value range (a step edge, cubic would ring).
    step = jnp.where(jnp.arange(8) < 4, -1.0, 1.0)[None, :, None, None] * jnp.ones((1, 8, 8, 1))
    up = upsample_video(step, (32, 32))
    assert float(up.min()) >= -1.0 - 1e-6 and float(up.max()) <= 1.0 + 1e-6


def test_projection_to_low_res_is_the_least_squares_consistent_video():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 8, 12, 3)), jnp.float32)
    low = jnp.asarray(rng.standard_normal((2, 3, 4, 6, 3)), jnp.float32)
    p = project_to_low_res(x, low, 2)
    np.testing.assert_allclose(downsample_video(p, 2), low, atol=1e-6)  # consistent
    np.testing.assert_allclose(project_to_low_res(p, low, 2), p, atol=1e-6)  # idempotent
    # Orthogonal: the step x -> p is perpendicular to every move within the consistent set
    # (v - p, with v another consistent video), so p is the consistent video nearest to x and
    # no consistent video (the truth among them) is further from p than from x.
    v = project_to_low_res(jnp.asarray(rng.standard_normal(x.shape), jnp.float32), low, 2)
    assert abs(float(jnp.vdot(x - p, v - p))) < 1e-3 * float(jnp.linalg.norm(x - p)
                                                              * jnp.linalg.norm(v - p))
    assert float(jnp.linalg.norm(p - v)) < float(jnp.linalg.norm(x - v))
    # Already consistent: unchanged; images [b, H, W, C] work too.
    np.testing.assert_allclose(project_to_low_res(x[:, 0], downsample_video(x[:, 0], 4), 4),
                               x[:, 0], atol=1e-6)


def test_augment_condition_levels():
    low = normal((4, 4, 16, 16, 3), 6)
    rng = jax.random.key(7)
    # Per example: +inf is exact, a high level barely moves it, a low level is mostly noise.
    out = augment_condition(low, jnp.array([jnp.inf, 30.0, -10.0, -10.0]), rng)
    np.testing.assert_array_equal(out[0], low[0])
    assert float(jnp.abs(out[1] - low[1]).max()) < 1e-4
    noisy = np.asarray(out[2:]).ravel()
    assert abs(noisy.std() - 1.0) < 0.05  # sigma^2 = sigmoid(10) ~ 1
    assert abs(np.corrcoef(noisy, np.asarray(low[2:]).ravel())[0, 1]) < 0.05
    # At logsnr 0 half the variance is signal: the correlation is sqrt(1/2).
    mid = np.asarray(augment_condition(low, jnp.zeros(4), rng)).ravel()
    assert abs(np.corrcoef(mid, np.asarray(low).ravel())[0, 1] - np.sqrt(0.5)) < 0.03


# --- Loss ----------------------------------------------------------------------------------


def test_ssr_loss_builds_the_condition():
    diffusion = Diffusion()
    x_high = normal((3, 2, 8, 8, 3), 8)
    seen = {}

    def model_fn(z, logsnr, cond):
        seen.update(cond)
        return jnp.zeros_like(z)

    cond = {"text": jnp.zeros((3, 2, 4)), "text_mask": jnp.ones((3, 2), bool)}
    # aug_range (0, 0): the clean end of the schedule, logsnr_max = 20 (sigma ~ 5e-5).
    _, aux = ssr_loss(model_fn, x_high, cond, jax.random.key(0), diffusion, scale=2,
                      aug_range=(0.0, 0.0))
    assert seen["low_res"].shape == (3, 2, 4, 4, 3)
    np.testing.assert_allclose(seen["low_res"], downsample_video(x_high, 2), atol=1e-3)
    np.testing.assert_allclose(aux["aug_logsnr"], 20.0, atol=1e-4)
    assert seen["text"] is cond["text"]
    _, aux = ssr_loss(model_fn, x_high, cond, jax.random.key(1), diffusion, scale=2,
                      aug_range=(0.2, 0.4))
    lo, hi = float(diffusion.logsnr(0.4)), float(diffusion.logsnr(0.2))
    assert np.all((aux["aug_logsnr"] >= lo) & (aux["aug_logsnr"] <= hi))
    assert float(jnp.abs(seen["low_res"] - downsample_video(x_high, 2)).max()) > 0.1
    with pytest.raises(ValueError, match="aug_range is an interval"):
        ssr_loss(model_fn, x_high, cond, jax.random.key(0), diffusion, scale=2,
                 aug_range=(0.5, 0.2))
    with pytest.raises(ValueError, match=r"cond already holds \['low_res'\]"):
        ssr_loss(model_fn, x_high, {**cond, "low_res": 0}, jax.random.key(0), diffusion,
                 scale=2)


@pytest.mark.parametrize("base", ["bilinear", "bicubic"])
def test_residual_ssr_loss_is_the_loss_of_the_residual_over_the_upsampled_input(base):
    """residual=True is the plain SSR loss with the clip replaced by x - upsample(low-res),
    the upsampling being residual_base's (bicubic clipped to the value range)."""
    diffusion = Diffusion()
    x_high = jnp.tanh(normal((3, 2, 8, 8, 3), 13))
    cond = {"text": jnp.zeros((3, 2, 4)), "text_mask": jnp.ones((3, 2), bool)}

    def model_fn(z, logsnr, c):
        return 0.3 * z + 0.1 * jnp.repeat(jnp.repeat(c["low_res"], 2, 2), 2, 3)

    rng = jax.random.key(3)
    residual, _ = ssr_loss(model_fn, x_high, cond, rng, diffusion, scale=2, residual=True,
                           residual_base=base)
    low_clean = downsample_video(x_high, 2)
    up = jnp.clip(jax.image.resize(low_clean, (3, 2, 8, 8, 3), base), -1, 1)
    r = x_high - up
    # The same rng split as ssr_loss: same levels and noise, the condition made from x_high.
    from lumiere_jax.diffusion import ssr as ssr_lib
    from lumiere_jax.diffusion.losses import diffusion_loss
    aug_rng, noise_rng, loss_rng = jax.random.split(rng, 3)
    aug = ssr_lib.sample_aug_logsnr(aug_rng, 3, diffusion, (0.0, 0.5))
    low = ssr_lib.augment_condition(downsample_video(x_high, 2), aug, noise_rng)
    reference, _ = diffusion_loss(model_fn, r, ssr_lib.ssr_condition(cond, low, aug), loss_rng,
                                  diffusion)
    np.testing.assert_allclose(float(residual), float(reference), rtol=1e-6)
    plain, _ = ssr_loss(model_fn, x_high, cond, rng, diffusion, scale=2)
    assert abs(float(plain) - float(residual)) > 1e-3
    assert float(jnp.abs(r).mean()) < float(jnp.abs(x_high).mean())


@pytest.mark.parametrize("residual", [False, True])
def test_one_step_estimates_of_an_oracle_are_the_clip(residual):
    """A model that outputs the exact v of the (residual) clip and the noise gives back the clip
    at every level; at t = 1 one that outputs zeros gives the base (nothing learned: the
    interpolation for a residual SSR, zeros otherwise)."""
    from lumiere_jax.diffusion import schedules
    from lumiere_jax.diffusion.ssr import one_step_estimates
    diffusion = Diffusion()
    x_high = jnp.tanh(normal((2, 2, 8, 8, 3), 5))
    base = upsample_video(downsample_video(x_high, 2), (8, 8), "bicubic") if residual else 0.0
    rng, times = jax.random.key(1), (0.2, 0.6, 1.0)
    noise = jax.random.normal(rng, x_high.shape)

    def oracle(z, logsnr, cond):
        assert cond["low_res"].shape == (2, 2, 4, 4, 3) and "text" in cond
        return schedules.v_from_x0_eps(x_high - base, noise, logsnr)

    kwargs = dict(scale=2, residual=residual, residual_base="bicubic")
    cond = {"text": jnp.zeros((2, 3, 4))}
    for t, estimate in one_step_estimates(oracle, x_high, cond, rng, diffusion, times,
                                          **kwargs).items():
        np.testing.assert_allclose(estimate, x_high, atol=2e-5, err_msg=f"t={t}")
    zero = one_step_estimates(lambda z, logsnr, c: jnp.zeros_like(z), x_high, cond, rng,
                              diffusion, times, **kwargs)
    np.testing.assert_allclose(zero[1.0], jnp.broadcast_to(base, x_high.shape), atol=1e-3)
    assert float(jnp.abs(zero[0.2] - x_high).mean()) < float(jnp.abs(zero[1.0] - x_high).mean())


def test_residual_base_is_checked_and_bicubic_stays_in_range():
    with pytest.raises(ValueError, match="residual_base must be one of"):
        dataclasses.replace(CFG, residual_base="nearest")
    edge = jnp.where(jnp.arange(8) < 4, -1.0, 1.0)[None, None, :, None, None]
    low = jnp.broadcast_to(edge, (1, 1, 8, 8, 3))  # a hard edge: cubic overshoots it
    raw = jax.image.resize(low, (1, 1, 16, 16, 3), "bicubic")
    assert float(jnp.abs(raw).max()) > 1.05
    up = upsample_video(low, (16, 16), "bicubic")
    assert float(jnp.abs(up).max()) == 1.0
    np.testing.assert_allclose(up, jnp.clip(raw, -1, 1))


def test_ssr_loss_is_finite_differentiable_and_deterministic():
    model = _ssr(temporal=True)
    x, _, text, mask, _, _ = _inputs()
    cond = {"text": text, "text_mask": mask}
    diffusion = Diffusion()

    def loss(model, rng):
        def fn(z, logsnr, c):
            return model(z, logsnr, c["text"], c["text_mask"], c["low_res"], c["aug_logsnr"])
        return ssr_loss(fn, x, cond, rng, diffusion, scale=CFG.scale)[0]

    def value_and_grad(model, rng):
        return nnx.value_and_grad(loss)(model, rng)

    value, grads = _apply(model, jax.random.key(0), fn=value_and_grad)
    assert value.shape == () and np.isfinite(float(value)) and float(value) > 0
    assert float(_apply(model, jax.random.key(0), fn=value_and_grad)[0]) == float(value)
    assert float(_apply(model, jax.random.key(1), fn=value_and_grad)[0]) != float(value)
    norms = {"/".join(map(str, p)): float(jnp.abs(g[...]).max())
             for p, g in nnx.to_flat_state(grads)}
    for prefix in ("unet/", "temporal/", "aug_mlp1/", "aug_mlp2/"):
        group = [n for p, n in norms.items() if p.startswith(prefix)]
        assert group and all(np.isfinite(group)), prefix
        assert max(group) > 0, prefix
    assert all(norms[p] > 0 for p in norms if p.startswith("aug_mlp")), norms


# --- MultiDiffusion with per-frame conditioning --------------------------------------------


def _cond_fn(window):
    """A toy SSR-like denoiser: mixes frames of z and of the low-res condition (so a
    misaligned condition window would show), then tanh."""
    m = normal((window, window), 9) / np.sqrt(window)

    def fn(z, logsnr, cond):
        low = jnp.repeat(jnp.repeat(cond["low"], 2, axis=2), 2, axis=3)  # [b, w, h, w, c]
        mixed = jnp.einsum("bfhwc,fg->bghwc", z + 0.5 * low * cond["gain"][..., None, None, None],
                           m)
        return jnp.tanh(mixed + 0.1 * logsnr[:, None, None, None, None])

    return fn


def test_multidiffusion_frame_cond_whole_clip_is_fn():
    fn = _cond_fn(6)
    z, logsnr = normal((2, 6, 4, 4, 3), 10), jnp.array([0.5, -1.0])
    cond = {"low": normal((2, 6, 2, 2, 3), 11), "gain": normal((2, 6), 12)}
    wrapped = multidiffusion.multidiffusion(fn, 6, 6, frame_cond=cond)
    np.testing.assert_array_equal(wrapped(z, logsnr), fn(z, logsnr, cond))


@pytest.mark.parametrize("kind", ["uniform", "tapered"])
def test_multidiffusion_frame_cond_windows_by_hand(kind):
    num_frames, window, overlap = 11, 4, 1
    fn = _cond_fn(window)
    z, logsnr = normal((2, num_frames, 4, 4, 3), 13), jnp.array([1.0, -0.5])
    cond = {"low": normal((2, num_frames, 2, 2, 3), 14), "gain": normal((2, num_frames), 15)}
    wrapped = multidiffusion.multidiffusion(fn, num_frames, window, overlap, kind,
                                            frame_cond=cond)
    out = np.asarray(jax.jit(wrapped)(z, logsnr))

    weights = multidiffusion.window_weights(window, overlap, kind)
    numerator, denominator = np.zeros(z.shape), np.zeros(num_frames)
    for s in (0, 3, 6, 7):
        sl = slice(s, s + window)
        pred = np.asarray(fn(z[:, sl], logsnr, {"low": cond["low"][:, sl],
                                                "gain": cond["gain"][:, sl]}))
        numerator[:, sl] += weights[None, :, None, None, None] * pred
        denominator[sl] += weights
    np.testing.assert_allclose(out, numerator / denominator[None, :, None, None, None],
                               atol=1e-5)
    # The condition matters per frame: shifting it by one frame changes the result.
    shifted = jax.tree.map(lambda c: jnp.roll(c, 1, axis=1), cond)
    other = multidiffusion.multidiffusion(fn, num_frames, window, overlap, kind,
                                          frame_cond=shifted)(z, logsnr)
    assert np.abs(np.asarray(other) - out).max() > 1e-2


def test_multidiffusion_frame_cond_errors():
    fn = _cond_fn(4)
    with pytest.raises(ValueError, match=r"frame_cond leaf must be \[b, 10, ...\].*\(2, 9, 2"):
        multidiffusion.multidiffusion(fn, 10, 4, frame_cond={"low": jnp.zeros((2, 9, 2, 2, 3))})
    wrapped = multidiffusion.multidiffusion(
        fn, 10, 4, frame_cond={"low": jnp.zeros((2, 10, 2, 2, 3)), "gain": jnp.zeros((2, 10))})
    with pytest.raises(ValueError, match=r"frame_cond has batch \[2\] but z has batch 1"):
        wrapped(jnp.zeros((1, 10, 4, 4, 3)), jnp.zeros(1))


# --- The 'ssr' denoiser kind ---------------------------------------------------------------


def _ssr_config(**ssr) -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.text = dict(preset="tiny")
    c.model = dict(
        kind="ssr",
        unet=dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                  head_dim=8, groups=4),
        temporal=dict(temporal_conv=True, temporal_attention=True, temporal_head_dim=8),
        ssr=ssr or dict(scale=2))
    return c


def test_denoiser_ssr_kind_builds_and_runs():
    config = _ssr_config()
    cfg = net_config(config.model, text_dim=64)
    # Defaults the SSR needs: the low-res video as extra channels, no temporal sampling.
    assert isinstance(cfg, SSRConfig) and cfg.scale == 2
    assert cfg.unet.extra_in_channels == 3 and cfg.stunet.sampling_levels == ()
    model = build_denoiser(config, _rngs())
    assert isinstance(model.net, SSR)
    _randomise(model.net)
    ids = jnp.asarray(np.random.default_rng(16).integers(3, 259, (B, 6)), jnp.int32)
    mask = jnp.arange(6)[None] < jnp.array([[4], [6]])
    z = normal((B, T, 8, 8, 3), 17)
    low = normal((B, T, 4, 4, 3), 18)
    logsnr, aug = jnp.array([0.0, 1.0]), jnp.ones(B)

    def both(model):
        cond = model.encode_text(ids, mask)
        return (model(z, logsnr, {**cond, "low_res": low, "aug_logsnr": aug}),
                model.net(z, logsnr, cond["text"], cond["text_mask"], low, aug), cond)

    out, direct, cond = _apply(model, fn=both)
    assert out.shape == (B, T, 8, 8, 3) and float(jnp.abs(out).max()) > 1e-2
    np.testing.assert_array_equal(out, direct)
    with pytest.raises(ValueError, match=r"needs cond keys \['low_res', 'aug_logsnr'\].*"
                                         r"\['aug_logsnr'\] missing"):
        model(z, jnp.zeros(B), {**cond, "low_res": low})


def test_denoiser_ssr_config_errors():
    config = _ssr_config()
    config.model.temporal.temporal_sampling_levels = (0,)
    with pytest.raises(ValueError, match=r"temporal_sampling_levels=\(0,\)"):
        net_config(config.model, text_dim=64)
    with pytest.raises(ValueError, match=r"unknown model.ssr keys \['scael'\]"):
        net_config(_ssr_config(scael=4).model, text_dim=64)
    config = _ssr_config()
    del config.model["ssr"]
    with pytest.raises(ValueError, match=r"model.kind='ssr' needs model.ssr"):
        net_config(config.model, text_dim=64)
