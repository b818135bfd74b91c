"""Imagen-style text-to-image U-Net: the frozen spatial backbone of Lumiere.

The U-Net denoises images `x: [B, H, W, C]` conditioned on the noise level (log-SNR) and T5
text embeddings. It is written once, and the STUNet reuses it unchanged: a video's frames are
folded into B, and the STUNet passes `hooks` that insert its temporal layers at the named
points of this forward pass (after each block, next to each down/up-sample). With no hooks the
model is the image model, so the spatial weights of the two share names and values exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from lumiere_jax.models import layers

Array = jax.Array


# Per-block rematerialisation: 'none' keeps every activation for the backward pass; 'block'
# keeps only each block's input and recomputes the rest; 'dots' also keeps matmul/conv outputs
# (recomputing only the cheap elementwise work).
REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 3
    out_channels: int = 3
    channels: int = 32  # width of level 0; level i has channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = (2,)  # levels with self- and cross-attention
    head_dim: int = 32
    groups: int = 8
    text_dim: int = 64  # T5 d_model
    extra_in_channels: int = 0  # e.g. SSR's low-res conditioning video, masks for inpainting
    dtype: str = "float32"  # compute dtype; parameters stay float32
    # Rematerialisation of every block (see REMAT_POLICIES): trade recompute for activation
    # memory in the backward pass.
    remat: str = "none"

    def __post_init__(self):
        levels = len(self.channel_mult)
        bad = [lvl for lvl in self.attention_levels if not 0 <= lvl < levels]
        if bad:
            raise ValueError(f"attention_levels {bad} out of range for {levels} levels "
                             f"(channel_mult={self.channel_mult}); use 0..{levels - 1}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got "
                             f"{self.remat!r}")

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    @property
    def emb_dim(self) -> int:
        return 4 * self.channels

    def level_channels(self, level: int) -> int:
        return self.channels * self.channel_mult[level]

    @classmethod
    def from_dict(cls, d) -> "UNetConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown U-Net config keys {unknown}; valid keys: {sorted(names)}")
        for key in ("channel_mult", "attention_levels"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


class Hooks(Protocol):
    """Where the STUNet inserts temporal layers. `name` identifies the point, e.g. 'down_1_0'.

    Each hook takes the activation `h: [b * t, H, W, C]` and returns the new activation (whose
    frame count t may change at down/up-samples). `after_block` also gets the per-video
    conditioning embedding `emb: [b, emb_dim]` (noise level and pooled text; b = videos), the
    samplings only the video batch size b. `embed` gives the hooks' layers their own
    embedding, computed once per call from the U-Net's and the text.
    """

    def embed(self, emb: Array, text: Array, text_mask: Array) -> Array: ...

    def after_block(self, name: str, h: Array, emb: Array) -> Array: ...

    def downsample(self, name: str, h: Array, b: int) -> Array: ...

    def upsample(self, name: str, h: Array, b: int) -> Array: ...


class Block(nnx.Module):
    """A res block, followed by spatial self/cross-attention on attention levels."""

    def __init__(self, cin: int, cout: int, cfg: UNetConfig, attend: bool, dtype, rngs):
        self.res = layers.ResBlock(cin, cout, cfg.emb_dim, groups=cfg.groups, dtype=dtype,
                                   rngs=rngs)
        self.attn = (layers.SpatialAttention(cout, cfg.text_dim, cfg.head_dim, groups=cfg.groups,
                                             dtype=dtype, rngs=rngs) if attend else None)

    def __call__(self, h, emb, text, text_mask):
        h = self.res(h, emb)
        return h if self.attn is None else self.attn(h, text, text_mask)


class UNet(nnx.Module):
    """Text-to-image U-Net. Parameters carry logical axis names for sharding."""

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.dtype)
        emb = cfg.emb_dim
        self.time_mlp1 = layers.Dense(cfg.channels, emb, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.time_mlp2 = layers.Dense(emb, emb, ("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.text_pool = layers.Dense(cfg.text_dim, emb, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.conv_in = layers.Conv2d(cfg.in_channels + cfg.extra_in_channels, cfg.channels,
                                     dtype=dtype, rngs=rngs)

        skip_channels = [cfg.channels]
        ch = cfg.channels
        self.down = nnx.List()
        self.downsample = nnx.List()
        for level in range(cfg.num_levels):
            cout = cfg.level_channels(level)
            attend = level in cfg.attention_levels
            blocks = nnx.List()
            for _ in range(cfg.num_res_blocks):
                blocks.append(Block(ch, cout, cfg, attend, dtype, rngs))
                ch = cout
                skip_channels.append(ch)
            self.down.append(blocks)
            if level < cfg.num_levels - 1:
                self.downsample.append(layers.Downsample(ch, dtype=dtype, rngs=rngs))
                skip_channels.append(ch)

        self.mid = nnx.List([Block(ch, ch, cfg, True, dtype, rngs),
                             Block(ch, ch, cfg, False, dtype, rngs)])

        self.up = nnx.List()
        self.upsample = nnx.List()
        for level in reversed(range(cfg.num_levels)):
            cout = cfg.level_channels(level)
            attend = level in cfg.attention_levels
            blocks = nnx.List()
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(Block(ch + skip_channels.pop(), cout, cfg, attend, dtype, rngs))
                ch = cout
            self.up.append(blocks)
            if level > 0:
                self.upsample.append(layers.Upsample(ch, dtype=dtype, rngs=rngs))

        self.norm_out = layers.GroupNorm(ch, cfg.groups, rngs=rngs)
        self.conv_out = layers.Conv2d(ch, cfg.out_channels, zero_init=True, dtype=dtype,
                                      rngs=rngs)

    def embed(self, logsnr: Array, text: Array, text_mask: Array) -> Array:
        """Per-example conditioning vector [b, emb_dim] from the noise level and pooled text."""
        h = layers.logsnr_features(logsnr, self.cfg.channels)
        h = self.time_mlp2(jax.nn.silu(self.time_mlp1(h)))
        m = text_mask.astype(text.dtype)[..., None]
        pooled = (text * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        return h + self.text_pool(pooled)

    def _block(self, block: Block, h, emb, text, text_mask):
        """Runs one block, rematerialised per config.remat."""
        policy = REMAT_POLICIES[self.cfg.remat]
        if policy is None:
            return block(h, emb, text, text_mask)
        graphdef, state = nnx.split(block)
        run = lambda st, *args: nnx.merge(graphdef, st)(*args)  # noqa: E731 (pure: remat-able)
        return jax.checkpoint(run, policy=policy)(state, h, emb, text, text_mask)

    def __call__(self, x: Array, logsnr: Array, text: Array, text_mask: Array,
                 hooks: Hooks | None = None, extra_emb: Array | None = None,
                 input_residual: Array | None = None) -> Array:
        """x: [b * t, H, W, C] (t = 1 for images), logsnr: [b], text: [b, L, Dt],
        text_mask: [b, L] -> prediction [b * t, H, W, out_channels] (float32).

        extra_emb: optional [b, emb_dim] added to the per-example embedding, for conditioning
        a wrapping model owns (e.g. the SSR's augmentation noise level); None adds nothing.
        input_residual: optional [b * t, H, W, channels] added to the first convolution's
        output (the STUNet's conditioning input); None adds nothing.
        """
        b = logsnr.shape[0]
        n = self.cfg.num_levels
        if x.shape[1] % 2 ** (n - 1) or x.shape[2] % 2 ** (n - 1):
            raise ValueError(f"image size {x.shape[1:3]} must be divisible by {2 ** (n - 1)} "
                             f"for {n} U-Net levels")
        emb = self.embed(logsnr, text, text_mask)
        if extra_emb is not None:
            if extra_emb.shape != emb.shape:
                raise ValueError(f"extra_emb has shape {extra_emb.shape}; it is added to the "
                                 f"embedding and must have shape {emb.shape} [b, emb_dim]")
            emb = emb + extra_emb.astype(emb.dtype)
        if hooks:
            hook_emb = hooks.embed(emb, text, text_mask)
            after = lambda name, h: hooks.after_block(name, h, hook_emb)  # noqa: E731
        else:
            after = lambda _, h: h  # noqa: E731

        h = self.conv_in(x)
        if input_residual is not None:
            h = h + input_residual.astype(h.dtype)
        skips = [h]
        for level, blocks in enumerate(self.down):
            for j, block in enumerate(blocks):
                h = after(f"down_{level}_{j}", self._block(block, h, emb, text, text_mask))
                skips.append(h)
            if level < n - 1:
                h = self.downsample[level](h)
                if hooks:
                    h = hooks.downsample(f"down_{level}", h, b)
                skips.append(h)

        for j, block in enumerate(self.mid):
            h = after(f"mid_{j}", self._block(block, h, emb, text, text_mask))

        for k, blocks in enumerate(self.up):
            level = n - 1 - k
            for j, block in enumerate(blocks):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = after(f"up_{level}_{j}", self._block(block, h, emb, text, text_mask))
            if level > 0:
                h = self.upsample[k](h)
                if hooks:
                    h = hooks.upsample(f"up_{level}", h, b)

        h = self.conv_out(jax.nn.silu(self.norm_out(h)))
        return h.astype(jnp.float32)


def block_names(cfg: UNetConfig) -> Sequence[tuple[str, int, int]]:
    """(name, level, channels) of every point where `Hooks.after_block` is called."""
    names = []
    for level in range(cfg.num_levels):
        names += [(f"down_{level}_{j}", level, cfg.level_channels(level))
                  for j in range(cfg.num_res_blocks)]
    last = cfg.num_levels - 1
    names += [(f"mid_{j}", last, cfg.level_channels(last)) for j in range(2)]
    for level in reversed(range(cfg.num_levels)):
        names += [(f"up_{level}_{j}", level, cfg.level_channels(level))
                  for j in range(cfg.num_res_blocks + 1)]
    return names
