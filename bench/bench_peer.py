"""Our STUNet train step against the PyTorch peer lumiere-pytorch: `python -m bench.bench_peer`.

The peer is lucidrains' lumiere-pytorch (PyPI `lumiere-pytorch`, installed by the `bench` extra
only; never a dependency of lumiere_jax), run eagerly by PyTorch on the CPU with as many
threads as XLA's CPU client uses (see "Threads and load" below). Each row is one training
step of the same-shaped space-time U-Net, temporal layers trained, spatial layers frozen, in
both:
  ours  the trainer's jitted step as bench.bench_train.compile_step builds it: frozen T5
        encoder, v-prediction loss, gradients of the `net/temporal/` parameters, global-norm
        clipping, AdamW, EMA;
  peer  `lumiere_pytorch.Lumiere` wrapping an image U-Net (below) with its temporal layers
        (ConvolutionInflationBlock, AttentionInflationBlock, TemporalDownsample/-Upsample)
        hooked in after the same modules as ours; forward with the same v-prediction loss,
        backward, clip_grad_norm_, AdamW over `Lumiere.parameters()` (its temporal ones; the
        wrapped U-Net is requires_grad=False), EMA.
Random weights and data (the cost depends on shapes only). Each side is timed as the median
of --runs steps after a warm-up step, in --rounds interleaved rounds (ours, peer, ours, peer,
...) so load from other processes hits both alike; the lower of each side's round medians is
reported and all are printed. FLOPs: ours from XLA's cost analysis of the lowered step
(trainer.program_flops: every op, elementwise, T5 and optimizer included), the peer's from
torch.utils.flop_counter.FlopCounterMode over one forward + backward (matmuls, convolutions
and attention only), so the two counts differ in what they include, not just in the network.

Shapes: `tiny STUNet` and `mid STUNet` of bench_train (configs/shapes_stunet.py:batch=4, 16
frames of 32x32, channels 16 or 64, channel_mult (1, 2, 4), 1 res block per level, spatial
attention at levels 1 and 2). The peer's U-Net is built from our model config: lumiere-pytorch
ships no image U-Net (its README wraps denoising-diffusion-pytorch's KarrasUnet, a magnitude-
preserving design without normalisation layers, unlike ours; that package's install also pulls
torchvision and a CUDA build of torch), so `TorchUNet` below is a PyTorch transcription of
lumiere_jax.models.unet.UNet: same levels, widths, res blocks, GroupNorm groups, FiLM, self-
and cross-attention placement and head size, skip connections and down/up-samples. The temporal
layers sit where ours do: a conv block after every block of the levels above the coarsest, an
attention block after every block of the coarsest level and the middle, a temporal down-sample
after each spatial down-sample and an up-sample after each spatial up-sample.

Differences that remain (the peer's API or design fixes them):
  - Temporal conv block. Ours (TemporalConv, model.temporal.temporal_conv_spatial = 1):
    GroupNorm + FiLM from the noise-level embedding, SiLU, 3-tap conv, GroupNorm, SiLU, 3-tap
    conv (zero-init), residual: 6 C^2 MACs per pixel. Peer (ConvolutionInflationBlock): a
    kxk Conv2d (k = --conv_spatial, 1 by default: its smallest, a 1x1 conv; the paper's design
    and its default is 3), RMSNorm, SiLU, 3-tap Conv1d, RMSNorm, SiLU, 1x1 Conv1d (zero-init),
    residual: 5 C^2 MACs per pixel at k = 1 (13 C^2 at k = 3, ours 15 C^2 with
    --conv_spatial 3). No noise-level or text conditioning in the peer's temporal layers.
  - Temporal attention. Ours: LayerNorm + FiLM, sinusoidal frame positions, qkv, attention,
    zero-init output. Peer: RMSNorm, x-transformers Attention (heads of 32 like ours; no
    positions) in a residual, then an extra zero-init CxC projection and a second residual.
  - Temporal sampling. Ours: a learnt mix of each pair of frames (2 taps, stride 2) and a
    learnt 2-way split of each frame. Peer: Conv1d(k=3, stride 2) and ConvTranspose1d(k=3,
    stride 2): 1.5x the MACs.
  - Text. Ours encodes the caption tokens with the frozen tiny T5 (2 layers, d_model 64)
    inside the step, with caption dropout; the peer gets a fixed random T5-sized embedding
    [b, 16, 64] (no text encoder). lumiere-pytorch repeats every conditioning tensor per frame
    (forward pre-hooks on every module), so the peer computes the embedding and the text
    keys/values per frame; ours per video.
  - Loss and optimizer. Same v-target, cosine log-SNR schedule, low-discrepancy times, AdamW
    (b1 0.9, b2 0.99, same weight decay), global-norm clip and EMA decay; ours has a warm-up
    / cosine learning-rate schedule, the peer a constant rate (no effect on time).
  - Execution. Ours is one XLA program (jit, buffers donated); the peer runs eagerly, as the
    package is written (module forward hooks); torch.compile is not applied.
  - Spatial details with equal cost: torch's stride-2 conv pads (1, 1), ours SAME (0, 1); the
    peer's frozen weights use torch's default init, ours the model's init (zero-init last
    layers). Parameter counts of the spatial U-Nets agree exactly.

Threads and load. XLA's CPU thread pool spans the cores this process may run on (its affinity
mask: os.cpu_count() unless pinned); torch.set_num_threads gets the same number
(--torch_threads overrides). libgomp's OpenMP threads, which run torch's ops, spin-wait at the
end of every parallel region: when another process holds one of the cores, each op waits for a
descheduled thread and the peer's step slows 2-10x, varying from round to round, while XLA's
work-stealing pool degrades far less. On a shared machine the default run's ratio therefore
mostly measures that contention. Two runs that take it out:
  taskset -c 0 python -m bench.bench_peer            # one core and one thread each
  OMP_WAIT_POLICY=PASSIVE python -m bench.bench_peer  # torch's threads sleep, not spin
The first line printed gives the thread counts and the load average at the start and end.

Prints markdown tables.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from importlib.metadata import version

import jax
import torch
import torch.nn.functional as F
from flax import nnx
from lumiere_pytorch import Lumiere
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench.bench_train import CONFIGS, compile_step, load
from bench.timing import median_seconds
from lumiere_jax.models.denoiser import abstract_denoiser, net_config
from lumiere_jax.models.stunet import STUNetConfig
from lumiere_jax.models.unet import UNetConfig, block_names
from lumiere_jax.text.t5 import get_preset
from lumiere_jax.train.trainer import count_params, split_model

MODELS = ("tiny STUNet", "mid STUNet")
TEXT_LENGTH = 16  # configs/shapes_stunet.py text.max_length


# --- The image U-Net the peer wraps: lumiere_jax.models.unet.UNet in PyTorch (NCHW). ---

def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-5)


def _logsnr_features(logsnr: torch.Tensor, dim: int) -> torch.Tensor:
    """layers.logsnr_features: sinusoidal features of the clipped, rescaled log-SNR."""
    x = (logsnr.clamp(-20.0, 20.0) + 20.0) * 25.0
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class TorchResBlock(nn.Module):
    """layers.ResBlock: GroupNorm-SiLU-Conv twice, FiLM from the embedding, 1x1 skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = _group_norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return (x if self.skip is None else self.skip(x)) + h


class TorchSpatialAttention(nn.Module):
    """layers.SpatialAttention: self-attention over each frame's pixels, then cross-attention
    to the text tokens."""

    def __init__(self, channels: int, text_dim: int, head_dim: int, groups: int):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = _group_norm(channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)
        self.cross_norm = nn.LayerNorm(channels, eps=1e-6)
        self.cross_q = nn.Linear(channels, channels)
        self.cross_kv = nn.Linear(text_dim, 2 * channels)
        self.cross_out = nn.Linear(channels, channels)

    def _heads(self, x):  # [B, L, C] -> [B, heads, L, C / heads]
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def _merge(self, x):  # [B, heads, L, d] -> [B, L, heads * d]
        return x.transpose(1, 2).flatten(2)

    def forward(self, x, text, text_mask):
        b, c, hh, ww = x.shape
        seq = lambda y: y.flatten(2).transpose(1, 2)  # noqa: E731 [B, C, H, W] -> [B, HW, C]
        image = lambda y: y.transpose(1, 2).reshape(b, c, hh, ww)  # noqa: E731
        q, k, v = self.qkv(seq(self.norm(x))).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v))
        x = x + image(self.out(self._merge(h)))
        q = self.cross_q(self.cross_norm(seq(x)))
        k, v = self.cross_kv(text).chunk(2, dim=-1)
        h = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v),
                                           attn_mask=text_mask[:, None, None, :])
        return x + image(self.cross_out(self._merge(h)))


class TorchBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: UNetConfig, attend: bool):
        super().__init__()
        self.res = TorchResBlock(cin, cout, cfg.emb_dim, cfg.groups)
        self.attn = (TorchSpatialAttention(cout, cfg.text_dim, cfg.head_dim, cfg.groups)
                     if attend else None)

    def forward(self, h, emb, text, text_mask):
        h = self.res(h, emb)
        return h if self.attn is None else self.attn(h, text, text_mask)


class TorchUpsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TorchUNet(nn.Module):
    """lumiere_jax's text-to-image U-Net, module for module. `forward(x [B, C, H, W],
    time [B] (log-SNR), text [B, L, Dt], text_mask [B, L] bool)`; text None (as in
    lumiere-pytorch's shape probe) means one all-zero token."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        emb = cfg.emb_dim
        self.time_mlp1 = nn.Linear(cfg.channels, emb)
        self.time_mlp2 = nn.Linear(emb, emb)
        self.text_pool = nn.Linear(cfg.text_dim, emb)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.channels, 3, padding=1)
        skip_channels, ch = [cfg.channels], cfg.channels
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for level in range(cfg.num_levels):
            cout, attend = cfg.level_channels(level), level in cfg.attention_levels
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(TorchBlock(ch, cout, cfg, attend))
                ch = cout
                skip_channels.append(ch)
            self.down.append(blocks)
            if level < cfg.num_levels - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_channels.append(ch)
        self.mid = nn.ModuleList([TorchBlock(ch, ch, cfg, True), TorchBlock(ch, ch, cfg, False)])
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(cfg.num_levels)):
            cout, attend = cfg.level_channels(level), level in cfg.attention_levels
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(TorchBlock(ch + skip_channels.pop(), cout, cfg, attend))
                ch = cout
            self.up.append(blocks)
            if level > 0:
                self.upsample.append(TorchUpsample(ch))
        self.norm_out = _group_norm(ch, cfg.groups)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    def forward(self, x, time, text=None, text_mask=None):
        if text is None:
            text = x.new_zeros(x.shape[0], 1, self.cfg.text_dim)
            text_mask = torch.ones(x.shape[0], 1, dtype=torch.bool)
        emb = self.time_mlp2(F.silu(self.time_mlp1(_logsnr_features(time, self.cfg.channels))))
        m = text_mask.to(text.dtype)[..., None]
        emb = emb + self.text_pool((text * m).sum(1) / m.sum(1).clamp(min=1.0))
        h = self.conv_in(x)
        skips = [h]
        for level, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb, text, text_mask)
                skips.append(h)
            if level < len(self.down) - 1:
                h = self.downsample[level](h)
                skips.append(h)
        for block in self.mid:
            h = block(h, emb, text, text_mask)
        for k, blocks in enumerate(self.up):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb, text, text_mask)
            if k < len(self.up) - 1:
                h = self.upsample[k](h)
        return self.conv_out(F.silu(self.norm_out(h)))


# --- The peer: lumiere-pytorch's Lumiere around that U-Net, temporal layers where ours are. ---

def torch_module_name(name: str, num_levels: int) -> str:
    """Our hook point (unet.block_names, STUNet sampling names) -> TorchUNet's module name."""
    parts = name.split("_")
    if parts[0] == "mid":
        return f"mid.{parts[1]}"
    level = int(parts[1])
    if parts[0] == "down":
        return f"down.{level}.{parts[2]}" if len(parts) == 3 else f"downsample.{level}"
    k = num_levels - 1 - level  # TorchUNet.up runs from the coarsest level
    return f"up.{k}.{parts[2]}" if len(parts) == 3 else f"upsample.{k}"


def peer_module_names(cfg: STUNetConfig) -> dict[str, list[str]]:
    """Lumiere's conv/attn/downsample/upsample module names, placed as in
    lumiere_jax.models.stunet.TemporalLayers."""
    ucfg, coarsest = cfg.unet, cfg.unet.num_levels - 1
    n = ucfg.num_levels
    names = {"conv_module_names": [], "attn_module_names": [],
             "downsample_module_names": [], "upsample_module_names": []}
    for name, level, _ in block_names(ucfg):
        if level == coarsest and cfg.temporal_attention:
            names["attn_module_names"].append(torch_module_name(name, n))
        elif level < coarsest and cfg.temporal_conv:
            names["conv_module_names"].append(torch_module_name(name, n))
    for level in cfg.sampling_levels:
        names["downsample_module_names"].append(torch_module_name(f"down_{level}", n))
        names["upsample_module_names"].append(torch_module_name(f"up_{level + 1}", n))
    return names


def stunet_config(config) -> STUNetConfig:
    return net_config(config.model, get_preset(config.text.preset).d_model)


def build_peer(cfg: STUNetConfig, image_size: int, seed: int = 0):
    """lumiere_pytorch.Lumiere shaped like our STUNet `cfg` (see the module docstring)."""
    torch.manual_seed(seed)
    ucfg = cfg.unet
    heads = max(1, ucfg.level_channels(ucfg.num_levels - 1) // cfg.temporal_head_dim)
    return Lumiere(
        TorchUNet(ucfg), image_size=image_size, unet_time_kwarg="time",
        channels=ucfg.in_channels, **peer_module_names(cfg),
        conv_inflation_kwargs=dict(conv2d_kernel_size=cfg.temporal_conv_spatial),
        attn_inflation_kwargs=dict(heads=heads, dim_head=cfg.temporal_head_dim))


def peer_param_counts(peer) -> tuple[int, int]:
    """(trained, total): Lumiere.parameters() are its temporal layers; .model the U-Net."""
    trained = sum(p.numel() for p in peer.parameters())
    return trained, trained + sum(p.numel() for p in peer.model.parameters())


def _logsnr_cosine(t: torch.Tensor, lo: float = -20.0, hi: float = 20.0) -> torch.Tensor:
    """schedules.logsnr_cosine: -2 log tan(a t + b), logsnr(0) = hi, logsnr(1) = lo."""
    b = math.atan(math.exp(-0.5 * hi))
    a = math.pi / 2 - b - math.atan(math.exp(0.5 * lo))
    return -2.0 * torch.log(torch.tan(a * t + b))


def make_peer_step(peer, train, batch: int, frames: int, text_dim: int, seed: int = 0):
    """(step, loss_fn): step() runs one training step of the peer's temporal layers (v-target
    loss, backward, clip, AdamW, EMA) and returns the loss; loss_fn() the loss alone."""
    gen = torch.Generator().manual_seed(seed)
    size, channels = peer.image_size, peer.channels
    x0 = torch.rand(batch, channels, frames, size, size, generator=gen) * 2 - 1
    text = torch.randn(batch, TEXT_LENGTH, text_dim, generator=gen)
    text_mask = torch.ones(batch, TEXT_LENGTH, dtype=torch.bool)
    params = peer.parameters()
    opt = torch.optim.AdamW(params, lr=train.lr, betas=(0.9, 0.99),
                            weight_decay=train.weight_decay)
    ema = [p.detach().clone() for p in params]

    def loss_fn():
        t = torch.remainder(torch.rand((), generator=gen) + torch.arange(batch) / batch, 1.0)
        logsnr = _logsnr_cosine(t)
        alpha = torch.sigmoid(logsnr).sqrt().view(-1, 1, 1, 1, 1)
        sigma = torch.sigmoid(-logsnr).sqrt().view(-1, 1, 1, 1, 1)
        eps = torch.randn(x0.shape, generator=gen)
        pred = peer(alpha * x0 + sigma * eps, time=logsnr, text=text, text_mask=text_mask)
        return F.mse_loss(pred, alpha * eps - sigma * x0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - train.ema_decay)
        return loss.detach()

    return step, loss_fn


def peer_flops(loss_fn) -> float:
    """Matmul/conv/attention FLOPs of one forward + backward (FlopCounterMode)."""
    with FlopCounterMode(display=False) as counter:
        loss_fn().backward()
    return float(counter.get_total_flops())


def our_param_counts(config) -> tuple[int, int, int]:
    """(trained, total, of which the text encoder) of our denoiser, from shapes alone."""
    model = abstract_denoiser(config)
    _, params, frozen = split_model(model, config.train.trainable)
    return (count_params(params), count_params(params) + count_params(frozen),
            count_params(nnx.state(model.text_encoder, nnx.Param)))


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg()) + " (1, 5, 15 min)"


def measure(name: str, config, runs: int, rounds: int) -> dict:
    cfg = stunet_config(config)
    batch, frames = config.train.batch_size, config.world.num_frames
    start = time.perf_counter()
    _, ours_fn, args, ours_flops = compile_step(config)
    print(f"  {name}: ours compiled in {time.perf_counter() - start:.0f} s", flush=True)
    peer = build_peer(cfg, config.world.height)
    assert config.world.height == config.world.width
    peer_step, peer_loss = make_peer_step(peer, config.train, batch, frames, cfg.unet.text_dim)
    flops_peer = peer_flops(peer_loss)
    ours_t, peer_t = [], []
    for r in range(rounds):
        ours_t.append(median_seconds(ours_fn, *args, runs=runs))
        peer_t.append(median_seconds(peer_step, runs=runs))  # eager: done on return
        print(f"  {name}, round {r + 1}: ours {ours_t[-1] * 1e3:.0f} ms, "
              f"peer {peer_t[-1] * 1e3:.0f} ms", flush=True)
    return dict(name=name, ours=min(ours_t), peer=min(peer_t), ours_flops=ours_flops,
                peer_flops=flops_peer, ours_params=our_param_counts(config),
                peer_params=peer_param_counts(peer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed steps per round and side")
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved rounds (ours, peer, ours, peer, ...)")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--conv_spatial", type=int, default=1,
                        help="spatial kernel of the temporal conv blocks in both: ours "
                             "model.temporal.temporal_conv_spatial, the peer's "
                             "conv2d_kernel_size (1: ours is the paper's 3x1x1)")
    parser.add_argument("--torch_threads", type=int, default=0,
                        help="torch.set_num_threads; 0 (default): as many as XLA uses, the "
                             "cores this process may run on")
    args = parser.parse_args()
    models = args.models.split(",")
    for name in models:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")

    cores = len(os.sched_getaffinity(0))  # os.cpu_count() unless pinned (taskset)
    torch.set_num_threads(args.torch_threads or cores)
    device = jax.devices()[0]
    print(f"ours: {device.platform} x1 ({device.device_kind}), jax {jax.__version__}, XLA CPU "
          f"thread pool over the {cores} cores this process may use (of os.cpu_count() = "
          f"{os.cpu_count()}); peer: lumiere-pytorch {version('lumiere-pytorch')}, "
          f"x-transformers {version('x-transformers')}, torch {torch.__version__}, "
          f"torch.get_num_threads() = {torch.get_num_threads()}. Median of {args.runs} steps "
          f"after warm-up, best of {args.rounds} interleaved rounds; random weights and batch; "
          f"float32. Load average at start: {load_average()}.", flush=True)
    rows = []
    for name in models:
        spec, overrides, _ = CONFIGS[name]
        config = load(spec, [*overrides,
                             f"model.temporal.temporal_conv_spatial={args.conv_spatial}"])
        rows.append(measure(name, config, args.runs, args.rounds))

    print(f"Load average at end: {load_average()}.\n")
    for name in models:
        spec, overrides, what = CONFIGS[name]
        print(f"- {name}: `{' '.join([spec, *overrides])}` ({what}), temporal conv spatial "
              f"kernel {args.conv_spatial}")
    print("\n| model | ours ms/step | peer ms/step | peer/ours time ratio (>1: ours faster) "
          "| ours GFLOP (XLA, all ops) | peer GFLOP (torch, matmul/conv/attn) "
          "| params trained ours/peer |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['ours'] * 1e3:.0f} | {r['peer'] * 1e3:.0f} "
              f"| {r['peer'] / r['ours']:.2f} | {r['ours_flops'] / 1e9:.2f} "
              f"| {r['peer_flops'] / 1e9:.2f} "
              f"| {r['ours_params'][0]:,} / {r['peer_params'][0]:,} |")
    print("\n| model | peer/ours GFLOP | ours params trained / total (T5 in total) "
          "| peer params trained / total |")
    print("|---|---|---|---|")
    for r in rows:
        (ot, ototal, t5), (pt, ptotal) = r["ours_params"], r["peer_params"]
        print(f"| {r['name']} | {r['peer_flops'] / r['ours_flops']:.2f} "
              f"| {ot:,} / {ototal:,} ({t5:,}) | {pt:,} / {ptotal:,} |")


if __name__ == "__main__":
    main()
