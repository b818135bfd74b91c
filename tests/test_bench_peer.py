"""bench/bench_peer.py's PyTorch peer (lumiere-pytorch, from the `bench` extra): shaped like our
STUNet, and its training step trains the temporal layers only."""

import torch

from bench.bench_peer import (
    build_peer,
    make_peer_step,
    our_param_counts,
    peer_module_names,
    peer_param_counts,
    stunet_config,
)
from bench.bench_train import load

FRAMES, SIZE = 8, 16


def small_config():
    return load("configs/shapes_stunet.py:batch=1,channels=8",
                [f"world.num_frames={FRAMES}", f"world.height={SIZE}", f"world.width={SIZE}"])


def test_peer_is_shaped_like_our_stunet():
    config = small_config()
    cfg = stunet_config(config)
    peer = build_peer(cfg, SIZE)
    names = peer_module_names(cfg)
    # Temporal layers where ours are: convs after the blocks of levels 0 and 1 (1 down + 2 up
    # each), attention after those of level 2 and the middle, sampling next to both levels.
    assert names == {
        "conv_module_names": ["down.0.0", "down.1.0", "up.1.0", "up.1.1", "up.2.0", "up.2.1"],
        "attn_module_names": ["down.2.0", "mid.0", "mid.1", "up.0.0", "up.0.1"],
        "downsample_module_names": ["downsample.0", "downsample.1"],
        "upsample_module_names": ["upsample.1", "upsample.0"],
    }
    assert (len(peer.convs), len(peer.attns), len(peer.downsamples), len(peer.upsamples)) == (
        6, 5, 2, 2)
    # The wrapped image U-Net is our spatial U-Net module for module: equal parameter counts.
    trained, total = peer_param_counts(peer)
    ours_trained, ours_total, t5 = our_param_counts(config)
    assert total - trained == ours_total - ours_trained - t5
    video = torch.randn(2, 3, FRAMES, SIZE, SIZE)
    with torch.no_grad():
        out = peer(video, time=torch.zeros(2), text=torch.randn(2, 16, cfg.unet.text_dim),
                   text_mask=torch.ones(2, 16, dtype=torch.bool))
    assert out.shape == video.shape


def test_peer_step_trains_only_temporal_layers():
    config = small_config()
    cfg = stunet_config(config)
    peer = build_peer(cfg, SIZE)
    assert not any(p.requires_grad for p in peer.model.parameters())
    spatial = {n: p.detach().clone() for n, p in peer.model.named_parameters()}
    temporal = {n: p.detach().clone() for n, p in peer.named_parameters()
                if not n.startswith("model.")}
    assert sum(p.numel() for p in temporal.values()) == peer_param_counts(peer)[0]
    step, _ = make_peer_step(peer, config.train, 1, FRAMES, cfg.unet.text_dim)
    assert torch.isfinite(step())
    for n, p in peer.model.named_parameters():
        assert torch.equal(p, spatial[n]), f"frozen spatial parameter {n} changed"
    now = dict(peer.named_parameters())
    changed = {n for n, before in temporal.items() if not torch.equal(now[n], before)}
    # The first step moves every zero-initialised output projection off zero and the temporal
    # down/up-sampling (in the main path); layers behind a zero projection get no gradient yet.
    must_change = {n for n in temporal if ".proj_out." in n or n.startswith(("downsamples.",
                                                                             "upsamples."))}
    assert must_change and must_change <= changed, sorted(must_change - changed)
