"""Space-Time U-Net (STUNet): the text-to-image U-Net inflated with temporal layers.

The spatial U-Net (`self.unet`, the frozen pretrained weights) runs every frame with frames
folded into the batch. `self.temporal` holds everything new, all of it under the path
"temporal" so that freezing is one filter:
  - after every block of every level except the coarsest: a temporal convolution (3 taps over
    frames), residual, its last projection zero-initialised;
  - after every block at the coarsest level (and the middle): temporal self-attention over
    the frame axis with space folded into the batch, zero-initialised output;
  - next to each spatial down/up-sample on the configured levels: a temporal down-sample
    (pairs of frames, initialised to their average) or up-sample (initialised to repeating
    each frame), which makes the coarse levels see fewer frames.
At initialisation the temporal residual branches are exactly zero, so without temporal sampling
the STUNet equals the image model on each frame, and with it the same holds for a still video.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lumiere_jax.models import layers
from lumiere_jax.models.unet import UNet, UNetConfig, block_names
from lumiere_jax.parallel.sharding import partitioned

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class STUNetConfig:
    unet: UNetConfig = UNetConfig()
    # Levels whose spatial down-sample (and the mirrored up-sample) also halves (doubles) the
    # frames. None = every level that has a spatial down-sample; () = no temporal sampling.
    temporal_sampling_levels: tuple[int, ...] | None = None
    temporal_sampling_init: str = "nearest"  # "nearest" (average / repeat) or "random"
    temporal_conv: bool = True
    # Spatial kernel size of a new per-frame convolution before the temporal taps: 1 (none)
    # is the paper's 3x1x1 temporal convolution next to the frozen 3x3 one; 3 makes every
    # temporal block a trainable (2+1)D convolution, whose spatial part can shift features
    # between frames, i.e. express motion, without waiting on the frozen layers.
    temporal_conv_spatial: int = 1
    temporal_attention: bool = True
    temporal_head_dim: int = 32
    # Channels of a per-frame conditioning video (0: none). The paper's conditional variant
    # for image-to-video and inpainting feeds the masked video and its mask (3 + 1 channels):
    # a zero-initialised input convolution `temporal/cond_in` adds them to the U-Net's first
    # features, which equals zero-padding the frozen first convolution's input channels and
    # keeps the model unconditional until fine-tuned.
    cond_channels: int = 0
    # The temporal layers' own reading of the caption, added to the per-video embedding their
    # FiLM sees: "none" (the paper's design, whose T5 and spatial layers already know motion
    # words), "attention" (TemporalTextPool; True is read as this), "sum" (TemporalTextSum,
    # every token's projection summed, so one word is not diluted by the caption's length) or
    # "tokens" (TemporalTokenSum, a learned vector per token id, summed: it reads the words
    # themselves, where the frozen T5 may not tell apart words it never saw).
    temporal_text: str = "none"
    # The tokenizer's vocabulary size, for temporal_text="tokens" (build_denoiser sets it from
    # the T5 config).
    text_vocab: int = 0
    # A learned embedding of each activation's place in the clip (frame, row, column; see
    # SpaceTimePosition) in every temporal block's input: "none", "add" (added to it; True is
    # read as this) or "scale" (a per-place scale and shift of it). The U-Net is translation
    # equivariant and the frozen layers never place an object by a word, so without it the
    # temporal layers cannot turn "moving left" into "on the right early, on the left late".
    # "scale" multiplies the frozen features (which carry the object's colour and shape) by
    # place, so that with the caption's FiLM one layer holds a word x place x feature term.
    temporal_position: str = "none"

    def __post_init__(self):
        # Configs and exports written before these switches had kinds say True / False (or,
        # from the command line, "true" / "false"): the first kind is False, the second True.
        for name, kinds in (("temporal_text", ("none", "attention", "sum", "tokens")),
                            ("temporal_position", ("none", "add", "scale"))):
            words = {False: kinds[0], "false": kinds[0], True: kinds[1], "true": kinds[1],
                     **{k: k for k in kinds}}
            value = getattr(self, name)
            if value not in words:
                raise ValueError(f"{name} must be {', '.join(map(repr, kinds[:-1]))} or "
                                 f"{kinds[-1]!r}, got {value!r}")
            object.__setattr__(self, name, words[value])
        if self.temporal_text == "tokens" and self.text_vocab < 1:
            raise ValueError("temporal_text='tokens' needs text_vocab, the tokenizer's "
                             f"vocabulary size (got {self.text_vocab})")
        if self.temporal_sampling_init not in ("nearest", "random"):
            raise ValueError("temporal_sampling_init must be 'nearest' or 'random', got "
                             f"{self.temporal_sampling_init!r}")
        if self.temporal_conv_spatial < 1 or self.temporal_conv_spatial % 2 == 0:
            raise ValueError("temporal_conv_spatial must be an odd kernel size >= 1, got "
                             f"{self.temporal_conv_spatial}")
        if self.cond_channels < 0:
            raise ValueError(f"cond_channels must be >= 0, got {self.cond_channels}")
        bad = [lvl for lvl in self.sampling_levels if not 0 <= lvl < self.unet.num_levels - 1]
        if bad:
            raise ValueError(f"temporal_sampling_levels {bad}: only levels with a spatial "
                             f"down-sample (0..{self.unet.num_levels - 2}) can sample time")

    @property
    def sampling_levels(self) -> tuple[int, ...]:
        if self.temporal_sampling_levels is None:
            return tuple(range(self.unet.num_levels - 1))
        return tuple(self.temporal_sampling_levels)

    @property
    def frame_multiple(self) -> int:
        """The frame count must be a multiple of this (each temporal down-sample halves it)."""
        return 2 ** len(self.sampling_levels)

    def check_frames(self, t: int) -> None:
        m = self.frame_multiple
        if t < m or t % m:
            valid = ", ".join(str(m * k) for k in range(1, 6))
            raise ValueError(
                f"{t} frames cannot be halved {len(self.sampling_levels)} times by the temporal "
                f"down-sampling on levels {self.sampling_levels}: use a multiple of {m} "
                f"({valid}, ...) or change model.temporal_sampling_levels")


def _video(h: Array, b: int) -> Array:
    """[b * t, H, W, C] -> [b, t, H*W, C]."""
    bt, hh, ww, c = h.shape
    return h.reshape(b, bt // b, hh * ww, c)


class SpaceTimePosition(nnx.Module):
    """A learned embedding of where an activation is in the clip: sines and cosines of its
    frame, row and column (each scaled to (0, 1) over the clip, so any frame count or size
    works) through a small MLP, one vector of `channels` per (frame, row, column).

    Added to a temporal block's normalised input (mode "add"), or scaling and shifting it
    (mode "scale"), before the caption's FiLM scales it, so a block can make a place-and-time
    pattern that depends on a word (an object on the right in the first frames and on the left
    in the last ones for "moving left"), which a translation equivariant U-Net fed with noise
    cannot. The block's output is zero at initialisation whatever this does, so the STUNet
    still starts as the image model.
    """

    frequencies = 3  # sin / cos of pi * k * coordinate, k = 1..3, for each of the 3 axes
    hidden = 64

    def __init__(self, channels: int, dtype, rngs: nnx.Rngs, mode: str = "add"):
        self.mode = mode  # "add": one vector per place; "scale": a scale and a shift
        self.mlp_in = layers.Dense(6 * self.frequencies, self.hidden, (None, "embed"),
                                   dtype=dtype, rngs=rngs)
        self.mlp_out = layers.Dense(self.hidden, channels * (2 if mode == "scale" else 1),
                                    ("embed", "conv_out"), dtype=dtype, rngs=rngs)

    def __call__(self, frames: int, height: int, width: int) -> Array:
        """-> [frames, height, width, channels] ("scale": 2 * channels, scale then shift)."""
        axes = [(jnp.arange(n, dtype=jnp.float32) + 0.5) / n for n in (frames, height, width)]
        coords = jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)  # [t, H, W, 3]
        k = jnp.arange(1, self.frequencies + 1, dtype=jnp.float32)
        angles = (jnp.pi * coords[..., None] * k).reshape(*coords.shape[:-1], -1)
        feats = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
        return self.mlp_out(jax.nn.silu(self.mlp_in(feats)))


def _with_position(position: SpaceTimePosition | None, h: Array, b: int) -> Array:
    """h [b * t, H, W, C] with each frame's and pixel's position embedding added, or (mode
    "scale") scaling and shifting it; None: h."""
    if position is None:
        return h
    v = h.reshape(b, -1, *h.shape[1:])
    p = position(*v.shape[1:4]).astype(h.dtype)[None]
    if position.mode == "scale":
        scale, shift = jnp.split(p, 2, axis=-1)
        return (v * (1 + scale) + shift).reshape(h.shape)
    return (v + p).reshape(h.shape)


def _position(mode: str, channels: int, dtype, rngs: nnx.Rngs) -> SpaceTimePosition | None:
    return None if mode == "none" else SpaceTimePosition(channels, dtype, rngs, mode)


class TemporalConv(nnx.Module):
    """Residual (3x1x1) convolution over frames: each pixel mixes with its neighbours in time.

    FiLM from the per-video embedding (noise level and pooled text) modulates its input: the
    frozen spatial layers were trained on still images and carry nothing about motion, so the
    caption's motion words reach the temporal layers this way.
    """

    def __init__(self, channels: int, groups: int, emb_dim: int, dtype, rngs: nnx.Rngs,
                 spatial: int = 1, position: str = "none"):
        self.norm1 = layers.GroupNorm(channels, groups, rngs=rngs)
        self.position = _position(position, channels, dtype, rngs)
        self.spatial = (layers.Conv2d(channels, channels, spatial, dtype=dtype, rngs=rngs)
                        if spatial > 1 else None)
        self.film = layers.Dense(emb_dim, 2 * channels, ("embed", "conv_out"), dtype=dtype,
                                 rngs=rngs)
        self.conv1 = layers.Dense(3 * channels, channels, ("conv_in", "conv_out"), dtype=dtype,
                                  rngs=rngs)
        self.norm2 = layers.GroupNorm(channels, groups, rngs=rngs)
        self.conv2 = layers.Dense(3 * channels, channels, ("conv_in", "conv_out"), dtype=dtype,
                                  zero_init=True, rngs=rngs)

    @staticmethod
    def _taps(h: Array, b: int) -> Array:
        """[b * t, H, W, C] -> [b * t, H, W, 3C]: each frame with its previous and next frame
        (zeros past the ends), so a 3-tap convolution over time is one matmul."""
        v = _video(h, b)
        pad = jnp.pad(v, ((0, 0), (1, 1), (0, 0), (0, 0)))
        taps = jnp.concatenate([pad[:, :-2], v, pad[:, 2:]], axis=-1)
        return taps.reshape(*h.shape[:-1], 3 * h.shape[-1])

    def __call__(self, h: Array, emb: Array) -> Array:
        b = emb.shape[0]
        y = _with_position(self.position, self.norm1(h), b)
        y = jax.nn.silu(layers.modulate(y, self.film(jax.nn.silu(emb))))
        if self.spatial is not None:
            y = self.spatial(y)
        y = self.conv1(self._taps(y, b))
        y = self.conv2(self._taps(jax.nn.silu(self.norm2(y)), b))
        return h + y.astype(h.dtype)


class TemporalAttention(nnx.Module):
    """Self-attention along the frame axis for every pixel (space folded into the batch)."""

    def __init__(self, channels: int, head_dim: int, emb_dim: int, dtype, rngs: nnx.Rngs,
                 position: str = "none"):
        self.heads = max(1, channels // head_dim)
        self.norm = layers.LayerNorm(channels, rngs=rngs)
        self.position = _position(position, channels, dtype, rngs)
        self.film = layers.Dense(emb_dim, 2 * channels, ("embed", "heads"), dtype=dtype,
                                 rngs=rngs)
        self.qkv = layers.Dense(channels, 3 * channels, ("embed", "heads"), dtype=dtype,
                                rngs=rngs)
        self.out = layers.Dense(channels, channels, ("heads", "embed"), zero_init=True,
                                dtype=dtype, rngs=rngs)
        self.channels = channels

    def __call__(self, h: Array, emb: Array) -> Array:
        b = emb.shape[0]
        x = _with_position(self.position, self.norm(h), b)  # as in TemporalConv
        x = layers.modulate(x, self.film(jax.nn.silu(emb)))
        x = _video(x, b)  # [b, t, HW, C]
        _, t, hw, c = x.shape
        x = x + layers.sinusoidal_embedding(jnp.arange(t), c)[None, :, None].astype(x.dtype)
        x = jnp.swapaxes(x, 1, 2).reshape(b * hw, t, c)  # [b*HW, t, C]
        q, k, val = jnp.split(self.qkv(x), 3, axis=-1)
        split = lambda a: a.reshape(b * hw, t, self.heads, c // self.heads)
        y = layers.attention(split(q), split(k), split(val)).reshape(b * hw, t, c)
        y = jnp.swapaxes(self.out(y).reshape(b, hw, t, c), 1, 2)
        return h + y.reshape(h.shape).astype(h.dtype)


class TemporalTextPool(nnx.Module):
    """Attention pooling of the caption's T5 tokens (a learned query per head) into a
    per-video vector for the temporal layers.

    The frozen embedding pools the text by a plain mean through a projection trained on still
    images, in which the motion words carry almost nothing (two captions differing only in
    "left" vs "right" differ by ~3% of its norm). Attention can pick those words out.
    """

    def __init__(self, text_dim: int, emb_dim: int, head_dim: int, dtype, rngs: nnx.Rngs):
        self.heads = max(1, emb_dim // head_dim)
        self.norm = layers.LayerNorm(text_dim, rngs=rngs)
        self.query = nnx.Param(partitioned(nnx.initializers.normal(1.0), None, "heads")(
            rngs.params(), (self.heads, emb_dim // self.heads)))
        self.kv = layers.Dense(text_dim, 2 * emb_dim, ("embed", "heads"), dtype=dtype,
                               rngs=rngs)
        self.out = layers.Dense(emb_dim, emb_dim, ("heads", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, text: Array, text_mask: Array) -> Array:
        """text: [b, L, Dt], text_mask: [b, L] -> [b, emb_dim]."""
        b, length, _ = text.shape
        k, v = jnp.split(self.kv(self.norm(text)), 2, axis=-1)
        split = lambda a: a.reshape(b, length, self.heads, -1)  # noqa: E731
        q = jnp.broadcast_to(self.query[...].astype(k.dtype), (b, 1, *self.query.shape))
        y = layers.attention(q, split(k), split(v), text_mask)  # [b, 1, heads, d]
        return self.out(y.reshape(b, -1))


class TemporalTextSum(nnx.Module):
    """The caption's T5 tokens, each projected on its own and summed into a per-video vector
    for the temporal layers: a word adds the same vector to it in any caption, whatever the
    caption's length, where attention pooling starts by averaging it with all the others."""

    def __init__(self, text_dim: int, emb_dim: int, dtype, rngs: nnx.Rngs):
        self.norm = layers.LayerNorm(text_dim, rngs=rngs)
        self.proj = layers.Dense(text_dim, emb_dim, ("embed", "heads"), dtype=dtype, rngs=rngs)

    def __call__(self, text: Array, text_mask: Array) -> Array:
        """text: [b, L, Dt], text_mask: [b, L] -> [b, emb_dim]."""
        y = self.proj(self.norm(text))
        return jnp.where(text_mask[..., None], y, 0.0).sum(axis=1)


class TemporalTokenSum(nnx.Module):
    """A learned vector per token id, summed over the caption into a per-video vector for the
    temporal layers. The frozen T5 of the built-in world was trained on captions of stills,
    which never name a motion, so its outputs for "left" and "right" barely differ: through
    TemporalTextSum they move the temporal layers' embedding by a sixth of what a colour word
    does (README "Stage 1"). Here every word starts as far from any other as two random
    vectors, and padding adds nothing."""

    def __init__(self, vocab: int, emb_dim: int, rngs: nnx.Rngs):
        self.embedding = nnx.Param(partitioned(nnx.initializers.normal(1.0), "vocab", "embed")(
            rngs.params(), (vocab, emb_dim)))

    def __call__(self, ids: Array, mask: Array) -> Array:
        """ids, mask: [b, L] -> [b, emb_dim]."""
        y = jnp.take(self.embedding[...], ids, axis=0)
        return jnp.where(mask[..., None], y, 0.0).sum(axis=1)


class TemporalDownsample(nnx.Module):
    """Halves the frames: out[i] = W0 x[2i] + W1 x[2i+1], initialised to the average."""

    def __init__(self, channels: int, init: str, rngs: nnx.Rngs):
        base = 0.5 * jnp.stack([jnp.eye(channels)] * 2)
        self.kernel = nnx.Param(partitioned(_sampling_init(base, init), None, "conv_in",
                                            "conv_out")(rngs.params(), base.shape))

    def __call__(self, h: Array, b: int) -> Array:
        v = _video(h, b)
        bb, t, hw, c = v.shape
        pairs = v.reshape(bb, t // 2, 2, hw, c)
        out = jnp.einsum("btkpc,kcd->btpd", pairs, self.kernel[...].astype(h.dtype))
        return out.reshape(bb * (t // 2), *h.shape[1:])


class TemporalUpsample(nnx.Module):
    """Doubles the frames: out[2i+k] = W_k x[i], initialised to repeating each frame."""

    def __init__(self, channels: int, init: str, rngs: nnx.Rngs):
        base = jnp.stack([jnp.eye(channels)] * 2)
        self.kernel = nnx.Param(partitioned(_sampling_init(base, init), None, "conv_in",
                                            "conv_out")(rngs.params(), base.shape))

    def __call__(self, h: Array, b: int) -> Array:
        v = _video(h, b)
        bb, t, hw, c = v.shape
        out = jnp.einsum("btpc,kcd->btkpd", v, self.kernel[...].astype(h.dtype))
        return out.reshape(bb * t * 2, *h.shape[1:])


def _sampling_init(base: Array, init: str):
    """Nearest-neighbour init returns `base`; the ablation draws a random matrix instead."""
    if init == "nearest":
        return lambda key, shape, dtype=jnp.float32: base.astype(dtype)
    fan_in = base.shape[1] * base.shape[0]
    return lambda key, shape, dtype=jnp.float32: (
        jax.random.normal(key, shape, dtype) / jnp.sqrt(fan_in).astype(dtype))


class TemporalLayers(nnx.Module):
    """All new (trainable) layers of the STUNet, keyed by the U-Net hook point they follow."""

    def __init__(self, cfg: STUNetConfig, *, rngs: nnx.Rngs):
        ucfg = cfg.unet
        dtype = jnp.dtype(ucfg.dtype)
        coarsest = ucfg.num_levels - 1
        self.blocks = nnx.Dict()
        for name, level, ch in block_names(ucfg):
            if level == coarsest and cfg.temporal_attention:
                self.blocks[name] = TemporalAttention(ch, cfg.temporal_head_dim, ucfg.emb_dim,
                                                      dtype, rngs,
                                                      position=cfg.temporal_position)
            elif level < coarsest and cfg.temporal_conv:
                self.blocks[name] = TemporalConv(ch, ucfg.groups, ucfg.emb_dim, dtype, rngs,
                                                 spatial=cfg.temporal_conv_spatial,
                                                 position=cfg.temporal_position)
        readers = {
            "none": lambda: None,
            "attention": lambda: TemporalTextPool(ucfg.text_dim, ucfg.emb_dim,
                                                  cfg.temporal_head_dim, dtype, rngs),
            "sum": lambda: TemporalTextSum(ucfg.text_dim, ucfg.emb_dim, dtype, rngs),
            "tokens": lambda: TemporalTokenSum(cfg.text_vocab, ucfg.emb_dim, rngs),
        }
        # `text_pool`, whatever its kind, so exports of the attention reader keep their paths.
        self.text_pool = readers[cfg.temporal_text]()
        self.cond_in = (layers.Conv2d(cfg.cond_channels, ucfg.channels, zero_init=True,
                                      dtype=dtype, rngs=rngs) if cfg.cond_channels else None)
        self.down = nnx.Dict()
        self.up = nnx.Dict()
        for level in cfg.sampling_levels:
            # The spatial down-sample of `level` keeps that level's channels; the mirrored
            # up-sample ends level + 1 and so has level + 1's channels.
            self.down[f"down_{level}"] = TemporalDownsample(
                ucfg.level_channels(level), cfg.temporal_sampling_init, rngs)
            self.up[f"up_{level + 1}"] = TemporalUpsample(
                ucfg.level_channels(level + 1), cfg.temporal_sampling_init, rngs)

    # The U-Net's Hooks protocol.
    def embed(self, emb: Array, text: Array, text_mask: Array,
              text_ids: Array | None = None) -> Array:
        if self.text_pool is None:
            return emb
        if isinstance(self.text_pool, TemporalTokenSum):
            if text_ids is None:
                raise ValueError("temporal_text='tokens' reads the caption's token ids: call the "
                                 "STUNet with text_ids (Denoiser.encode_text puts them in "
                                 "cond['ids'])")
            return emb + self.text_pool(text_ids, text_mask)
        return emb + self.text_pool(text, text_mask)

    def after_block(self, name: str, h: Array, emb: Array) -> Array:
        return self.blocks[name](h, emb) if name in self.blocks else h

    def downsample(self, name: str, h: Array, b: int) -> Array:
        return self.down[name](h, b) if name in self.down else h

    def upsample(self, name: str, h: Array, b: int) -> Array:
        return self.up[name](h, b) if name in self.up else h


class _WithTokenIds:
    """The temporal layers as the U-Net's hooks, with this call's token ids for their reader
    (the U-Net's embed hook passes the T5 outputs only)."""

    def __init__(self, temporal: TemporalLayers, text_ids: Array | None):
        self.temporal, self.text_ids = temporal, text_ids

    def embed(self, emb: Array, text: Array, text_mask: Array) -> Array:
        return self.temporal.embed(emb, text, text_mask, self.text_ids)

    def __getattr__(self, name: str):  # after_block, downsample, upsample
        return getattr(self.temporal, name)


class STUNet(nnx.Module):
    """Denoises a whole clip at once: x: [b, t, H, W, C] -> [b, t, H, W, out_channels]."""

    def __init__(self, cfg: STUNetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.unet = UNet(cfg.unet, rngs=rngs)
        self.temporal = TemporalLayers(cfg, rngs=rngs)

    def __call__(self, x: Array, logsnr: Array, text: Array, text_mask: Array,
                 cond_video: Array | None = None, text_ids: Array | None = None) -> Array:
        """cond_video: [b, t, H, W, cond_channels] for a model with cond_channels (None: all
        zeros, i.e. nothing known); must be None otherwise. text_ids: the caption's token ids
        [b, L], which temporal_text="tokens" reads (the other readers read `text`)."""
        b, t = x.shape[:2]
        self.cfg.check_frames(t)
        residual = None
        if self.cfg.cond_channels:
            shape = (*x.shape[:-1], self.cfg.cond_channels)
            if cond_video is None:
                cond_video = jnp.zeros(shape, x.dtype)
            if cond_video.shape != shape:
                raise ValueError(f"cond_video has shape {cond_video.shape}; this STUNet takes "
                                 f"{shape} (the masked video and its mask, per frame)")
            residual = self.temporal.cond_in(cond_video.reshape(b * t, *shape[2:]))
        elif cond_video is not None:
            raise ValueError("this STUNet has no conditioning input (model.temporal."
                             "cond_channels=0); use a model fine-tuned with masks")
        out = self.unet(x.reshape(b * t, *x.shape[2:]), logsnr, text, text_mask,
                        hooks=_WithTokenIds(self.temporal, text_ids), input_residual=residual)
        return out.reshape(b, t, *out.shape[1:])
