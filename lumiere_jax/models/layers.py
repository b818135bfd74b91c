"""Building blocks shared by the text-to-image U-Net, the STUNet and the SSR model.

All spatial blocks take activations `h: [B, H, W, C]` where B may be `batch * frames`: a video is
processed frame by frame by folding frames into the batch, which is exactly what makes the
inflated STUNet equal the image model at initialisation. Conditioning vectors stay per video
(`emb: [b, D]`, `text: [b, L, Dt]`) and are broadcast over frames inside the blocks, so a long
clip never copies its text embeddings once per frame.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lumiere_jax.parallel.sharding import constrain_batch, partitioned

Array = jax.Array

_conv_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")
_dense_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def frames_of(h: Array, b: int) -> int:
    """Frames folded into the leading axis of `h` ([b * t, ...]) for a batch of b videos."""
    if h.shape[0] % b:
        raise ValueError(f"activation batch {h.shape[0]} is not a multiple of the video batch {b}")
    return h.shape[0] // b


def per_frame(v: Array, t: int) -> Array:
    """[b, ...] -> [b * t, ...]: repeat a per-video tensor for each of its t frames."""
    return v if t == 1 else jnp.repeat(v, t, axis=0)


def modulate(h: Array, film: Array) -> Array:
    """FiLM: h * (1 + scale) + shift, with [scale, shift] = film [b, 2C] per video and
    h: [b * t, ..., C] (t frames folded into the batch)."""
    scale, shift = jnp.split(per_frame(film, frames_of(h, film.shape[0])), 2, axis=-1)
    expand = (slice(None),) + (None,) * (h.ndim - 2)
    return h * (1 + scale[expand]) + shift[expand]


class Dense(nnx.Module):
    """y = x @ W (+ b), with logical axis names for W."""

    def __init__(self, din: int, dout: int, axes: tuple[str | None, str | None], *,
                 use_bias: bool = True, zero_init: bool = False, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        init = zeros if zero_init else _dense_init
        self.kernel = nnx.Param(partitioned(init, *axes)(rngs.params(), (din, dout)))
        self.bias = (nnx.Param(partitioned(zeros, axes[1])(rngs.params(), (dout,)))
                     if use_bias else None)
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Conv2d(nnx.Module):
    """3x3 (or kxk) SAME convolution on [B, H, W, C], HWIO kernel."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, *, stride: int = 1,
                 zero_init: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
        init = zeros if zero_init else _conv_init
        self.kernel = nnx.Param(partitioned(init, "kernel", "kernel", "conv_in", "conv_out")(
            rngs.params(), (kernel, kernel, cin, cout)))
        self.bias = nnx.Param(partitioned(zeros, "conv_out")(rngs.params(), (cout,)))
        self.stride = stride
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype),
            window_strides=(self.stride, self.stride), padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return constrain_batch(y + self.bias[...].astype(self.dtype))


class GroupNorm(nnx.Module):
    """GroupNorm over all axes but the first (each image / frame normalised on its own)."""

    def __init__(self, channels: int, groups: int = 8, *, eps: float = 1e-5, rngs: nnx.Rngs):
        groups = math.gcd(groups, channels)
        self.scale = nnx.Param(partitioned(ones, "norm")(rngs.params(), (channels,)))
        self.bias = nnx.Param(partitioned(zeros, "norm")(rngs.params(), (channels,)))
        self.groups = groups
        self.eps = eps

    def _group_mean(self, v: Array) -> Array:
        """[B, S, C] -> [B, 1, C]: the mean over S and over each channel's group.

        Reduced in two stages, over S per channel (the contiguous channels stay the vector
        lanes), then over the few channels of a group: XLA's CPU reduction over the
        [B, S, G, C/G] axes (1, 3) in one go was 7x slower forward and 4x backward."""
        b, _, c = v.shape
        per_channel = v.mean(axis=1).reshape(b, self.groups, c // self.groups)
        per_group = jnp.broadcast_to(per_channel.mean(axis=-1, keepdims=True), per_channel.shape)
        return per_group.reshape(b, 1, c)

    def __call__(self, x: Array) -> Array:
        x = constrain_batch(x)  # whole groups per device (see constrain_batch)
        dtype = x.dtype
        v = x.astype(jnp.float32).reshape(x.shape[0], -1, x.shape[-1])
        centred = v - self._group_mean(v)
        var = self._group_mean(jnp.square(centred))
        y = (centred * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (y * self.scale[...] + self.bias[...]).astype(dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the channel axis."""

    def __init__(self, channels: int, *, eps: float = 1e-6, rngs: nnx.Rngs):
        self.scale = nnx.Param(partitioned(ones, "norm")(rngs.params(), (channels,)))
        self.bias = nnx.Param(partitioned(zeros, "norm")(rngs.params(), (channels,)))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def sinusoidal_embedding(x: Array, dim: int, max_period: float = 10_000.0) -> Array:
    """x: [n] (any real values, e.g. log-SNR or positions) -> [n, dim]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = x.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def logsnr_features(logsnr: Array, dim: int) -> Array:
    """Sinusoidal features [b, dim] of a log-SNR [b]: clipped to [-20, 20] and mapped to
    [0, 1000], the range sinusoidal timestep features are made for, so every frequency varies
    monotonically enough to tell noise levels apart (+inf, no noise, maps to +20)."""
    return sinusoidal_embedding((jnp.clip(logsnr, -20.0, 20.0) + 20.0) * 25.0, dim)


def attention(q: Array, k: Array, v: Array, mask: Array | None = None) -> Array:
    """Multi-head attention. q: [B, Lq, H, D], k/v: [B, Lk, H, D], mask: [B, Lk] bool."""
    bias_mask = None if mask is None else mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=bias_mask)


class ResBlock(nnx.Module):
    """GroupNorm-SiLU-Conv twice, FiLM (scale/shift) from the conditioning embedding."""

    def __init__(self, cin: int, cout: int, emb_dim: int, *, groups: int = 8,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(cin, groups, rngs=rngs)
        self.conv1 = Conv2d(cin, cout, dtype=dtype, rngs=rngs)
        self.film = Dense(emb_dim, 2 * cout, ("embed", "conv_out"), dtype=dtype, rngs=rngs)
        self.norm2 = GroupNorm(cout, groups, rngs=rngs)
        # Zero-initialised last conv: each block starts as the identity (stable deep nets).
        self.conv2 = Conv2d(cout, cout, zero_init=True, dtype=dtype, rngs=rngs)
        self.skip = Conv2d(cin, cout, 1, dtype=dtype, rngs=rngs) if cin != cout else None

    def __call__(self, x: Array, emb: Array) -> Array:
        """x: [b * t, H, W, cin], emb: [b, D] -> [b * t, H, W, cout]."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = modulate(self.norm2(h), self.film(jax.nn.silu(emb)))
        h = self.conv2(jax.nn.silu(h))
        return (x if self.skip is None else self.skip(x)) + h


class SpatialAttention(nnx.Module):
    """Self-attention over each frame's pixels, then cross-attention to the text tokens."""

    def __init__(self, channels: int, text_dim: int, head_dim: int = 32, *,
                 groups: int = 8, dtype=jnp.float32, rngs: nnx.Rngs):
        self.heads = max(1, channels // head_dim)
        self.head_dim = channels // self.heads
        self.norm = GroupNorm(channels, groups, rngs=rngs)
        self.qkv = Dense(channels, 3 * channels, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.out = Dense(channels, channels, ("heads", "embed"), zero_init=True, dtype=dtype,
                         rngs=rngs)
        self.cross_norm = LayerNorm(channels, rngs=rngs)
        self.cross_q = Dense(channels, channels, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.cross_kv = Dense(text_dim, 2 * channels, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.cross_out = Dense(channels, channels, ("heads", "embed"), zero_init=True,
                               dtype=dtype, rngs=rngs)

    def _heads(self, x: Array) -> Array:
        return x.reshape(*x.shape[:-1], self.heads, self.head_dim)

    def __call__(self, x: Array, text: Array, text_mask: Array) -> Array:
        """x: [b * t, H, W, C], text: [b, L, Dt], text_mask: [b, L] -> [b * t, H, W, C]."""
        bt, hh, ww, c = x.shape
        b = text.shape[0]
        t = frames_of(x, b)
        q, k, v = jnp.split(self.qkv(self.norm(x).reshape(bt, hh * ww, c)), 3, axis=-1)
        h = attention(self._heads(q), self._heads(k), self._heads(v))
        x = x + self.out(h.reshape(bt, hh * ww, c)).reshape(x.shape)
        # Cross-attention: a query attends to its own video's text only, so all t frames of a
        # video are one query sequence of length t*H*W (no per-frame copy of the text).
        q = self.cross_q(self.cross_norm(x).reshape(b, t * hh * ww, c))
        k, v = jnp.split(self.cross_kv(text), 2, axis=-1)
        h = attention(self._heads(q), self._heads(k), self._heads(v), text_mask)
        return x + self.cross_out(h.reshape(b, t * hh * ww, c)).reshape(x.shape)


class Downsample(nnx.Module):
    """Stride-2 3x3 convolution."""

    def __init__(self, channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, stride=2, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2 then 3x3 convolution."""

    def __init__(self, channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)
