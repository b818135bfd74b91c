"""T5 v1.1 encoder in Flax NNX (the frozen text encoder that conditions the diffusion U-Nets).

The architecture follows T5 v1.1 exactly, so that published weights (Hugging Face or t5x) load
into it and give the same embeddings:

- token embedding (no scaling), then `num_layers` pre-norm blocks and a final norm;
- the norm is RMSNorm: no mean subtraction, no bias, statistics in float32;
- self-attention has no 1/sqrt(d_kv) scaling (T5 folds it into the query weights at
  initialisation) and adds a learned relative position bias, bucketed bidirectionally. The bias
  table belongs to the first layer in the published checkpoints and is shared by every layer;
- the feed-forward block is gated GELU (tanh approximation, HF `gelu_new`): wo(gelu(wi_0 x) *
  wi_1 x);
- no biases and no dropout anywhere (inference only).

Parameters keep `param_dtype` (float32 by default); activations are computed in `dtype`
(float32 or bfloat16), with norms, attention logits and softmax in float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lumiere_jax.parallel.sharding import partitioned

# Hugging Face pads T5's 32100 SentencePiece ids to 32128 rows; the published checkpoints use it.
T5_VOCAB_SIZE = 32128


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Sizes of a T5 v1.1 encoder. `dtype` is the compute dtype, `param_dtype` the storage one."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"T5Config.{name} must be a positive integer, got {value!r}.")
        if self.relative_attention_num_buckets % 2:
            raise ValueError("T5Config.relative_attention_num_buckets must be even (half of the "
                             "buckets are for each direction), got "
                             f"{self.relative_attention_num_buckets}.")
        # Normalise dtypes so that configs compare equal however the dtype was spelled.
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))

    def replace(self, **changes) -> T5Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (dtypes as names)."""
        out = dataclasses.asdict(self)
        out["dtype"] = jnp.dtype(self.dtype).name
        out["param_dtype"] = jnp.dtype(self.param_dtype).name
        return out

    @classmethod
    def from_dict(cls, values: dict) -> T5Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown T5Config keys {unknown}; known keys: {sorted(known)}.")
        return cls(**values)


PRESETS: dict[str, T5Config] = {
    # The published T5 v1.1 sizes (google/t5-v1_1-*), encoder part.
    "t5-v1_1-small": T5Config(T5_VOCAB_SIZE, d_model=512, d_kv=64, d_ff=1024, num_layers=8,
                              num_heads=6),
    "t5-v1_1-base": T5Config(T5_VOCAB_SIZE, d_model=768, d_kv=64, d_ff=2048, num_layers=12,
                             num_heads=12),
    "t5-v1_1-large": T5Config(T5_VOCAB_SIZE, d_model=1024, d_kv=64, d_ff=2816, num_layers=24,
                              num_heads=16),
    "t5-v1_1-xl": T5Config(T5_VOCAB_SIZE, d_model=2048, d_kv=64, d_ff=5120, num_layers=24,
                           num_heads=32),
    "t5-v1_1-xxl": T5Config(T5_VOCAB_SIZE, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                            num_heads=64),
    # For the built-in tiny configs with the byte tokenizer: 3 special ids + 256 bytes = 259,
    # padded to 384 (a multiple of 128, like T5's 32128).
    "tiny": T5Config(384, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
}


def get_preset(name: str, **overrides) -> T5Config:
    """A preset config by name, with optional field overrides (e.g. dtype="bfloat16")."""
    if name not in PRESETS:
        raise ValueError(f"Unknown T5 preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name].replace(**overrides)


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket ids, [query_length, key_length] int32.

    Half of the buckets are for keys after the query, half for keys before. Within each half,
    distances below num_buckets/4 get their own bucket; larger ones share logarithmically wider
    buckets up to `max_distance`, beyond which all distances share the last bucket. Computed with
    numpy in float32 like Mesh TensorFlow and Hugging Face, since the sequence length is static.
    """
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    # Clipped below at max_exact only to keep log() finite in the branch np.where discards.
    far = np.maximum(distance, max_exact).astype(np.float32)
    log_ratio = np.log(far / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    buckets = buckets + np.where(distance < max_exact, distance, large)
    return buckets.astype(np.int32)


class RMSNorm(nnx.Module):
    """T5 layer norm: x / rms(x) * scale, statistics in float32, no mean and no bias."""

    def __init__(self, dim: int, config: T5Config):
        self.epsilon = config.layer_norm_epsilon
        self.dtype = config.dtype
        self.scale = nnx.Param(
            partitioned(nnx.initializers.ones, "norm")(None, (dim,), config.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.epsilon)).astype(self.dtype)
        return normed * self.scale[...].astype(self.dtype)


class SelfAttention(nnx.Module):
    """Multi-head self-attention with T5's unscaled logits. Kernels: [embed, heads, kv]."""

    def __init__(self, config: T5Config, rngs: nnx.Rngs):
        d, h, k = config.d_model, config.num_heads, config.d_kv
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=0,
                                                 out_axis=(1, 2))
        # T5 folds the 1/sqrt(d_kv) attention scaling into the query initialisation.
        query_init = nnx.initializers.variance_scaling(1.0 / k, "fan_in", "normal", in_axis=0,
                                                       out_axis=(1, 2))
        out_init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=(0, 1),
                                                     out_axis=2)
        pdt = config.param_dtype
        self.query = nnx.Param(partitioned(query_init, "embed", "heads", "kv")(
            rngs.params(), (d, h, k), pdt))
        self.key = nnx.Param(partitioned(init, "embed", "heads", "kv")(
            rngs.params(), (d, h, k), pdt))
        self.value = nnx.Param(partitioned(init, "embed", "heads", "kv")(
            rngs.params(), (d, h, k), pdt))
        self.out = nnx.Param(partitioned(out_init, "heads", "kv", "embed")(
            rngs.params(), (h, k, d), pdt))
        self.dtype = config.dtype

    def __call__(self, x: jax.Array, bias: jax.Array, key_mask: jax.Array) -> jax.Array:
        """x: [b, L, d]; bias: [h, L, L] float32; key_mask: [b, L] bool -> [b, L, d]."""
        dt = self.dtype
        q = jnp.einsum("bld,dhk->blhk", x, self.query[...].astype(dt))
        k = jnp.einsum("bld,dhk->blhk", x, self.key[...].astype(dt))
        v = jnp.einsum("bld,dhk->blhk", x, self.value[...].astype(dt))
        logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32)
        logits = logits + bias[None]
        # Masked keys get the most negative float, not -inf, so an all-padding row stays finite.
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(dt)
        attended = jnp.einsum("bhqs,bshk->bqhk", weights, v)
        return jnp.einsum("blhk,hkd->bld", attended, self.out[...].astype(dt))


class GatedGeluMlp(nnx.Module):
    """wo(gelu_tanh(x wi_0) * (x wi_1)). Kernels: wi [embed, mlp], wo [mlp, embed]."""

    def __init__(self, config: T5Config, rngs: nnx.Rngs):
        d, f, pdt = config.d_model, config.d_ff, config.param_dtype
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")
        self.wi_0 = nnx.Param(partitioned(init, "embed", "mlp")(rngs.params(), (d, f), pdt))
        self.wi_1 = nnx.Param(partitioned(init, "embed", "mlp")(rngs.params(), (d, f), pdt))
        self.wo = nnx.Param(partitioned(init, "mlp", "embed")(rngs.params(), (f, d), pdt))
        self.dtype = config.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        gate = jax.nn.gelu(x @ self.wi_0[...].astype(dt), approximate=True)
        return (gate * (x @ self.wi_1[...].astype(dt))) @ self.wo[...].astype(dt)


class EncoderLayer(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: T5Config, rngs: nnx.Rngs):
        self.pre_attention_norm = RMSNorm(config.d_model, config)
        self.attention = SelfAttention(config, rngs)
        self.pre_mlp_norm = RMSNorm(config.d_model, config)
        self.mlp = GatedGeluMlp(config, rngs)

    def __call__(self, x: jax.Array, bias: jax.Array, key_mask: jax.Array) -> jax.Array:
        x = x + self.attention(self.pre_attention_norm(x), bias, key_mask)
        return x + self.mlp(self.pre_mlp_norm(x))


class T5Encoder(nnx.Module):
    """The T5 v1.1 encoder stack: ids [b, L] int32, mask [b, L] bool -> [b, L, d_model].

    Positions where `mask` is False are ignored as attention keys (as in Hugging Face); their
    own outputs are computed but meaningless, and downstream code must use the mask.
    """

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        embed_init = nnx.initializers.normal(stddev=1.0)
        self.token_embedder = nnx.Param(partitioned(embed_init, "vocab", "embed")(
            rngs.params(), (config.vocab_size, config.d_model), config.param_dtype))
        bias_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")
        self.relpos_bias = nnx.Param(partitioned(bias_init, "relpos_buckets", "heads")(
            rngs.params(), (config.relative_attention_num_buckets, config.num_heads),
            config.param_dtype))
        self.layers = nnx.List([EncoderLayer(config, rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.d_model, config)

    def position_bias(self, length: int) -> jax.Array:
        """Relative position bias shared by all layers: [heads, L, L] float32."""
        cfg = self.config
        buckets = relative_position_buckets(length, length, cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance)
        table = self.relpos_bias[...].astype(jnp.float32)  # [buckets, heads]
        return jnp.transpose(table[buckets], (2, 0, 1))

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"T5Encoder expects ids [b, L] and mask [b, L] of the same shape, "
                             f"got ids {ids.shape} and mask {mask.shape}.")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"T5Encoder ids must be integers, got dtype {ids.dtype}.")
        x = self.token_embedder[...][ids].astype(self.config.dtype)  # [b, L, d]
        bias = self.position_bias(ids.shape[1])
        key_mask = mask.astype(bool)
        for layer in self.layers:
            x = layer(x, bias, key_mask)
        return self.final_norm(x)


def count_params(config: T5Config) -> int:
    """Number of parameters of an encoder with this config (by arithmetic, no allocation)."""
    d, f, hk = config.d_model, config.d_ff, config.num_heads * config.d_kv
    per_layer = 4 * d * hk + 3 * d * f + 2 * d
    return (config.vocab_size * d + config.relative_attention_num_buckets * config.num_heads
            + config.num_layers * per_layer + d)
