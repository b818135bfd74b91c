r"""Stage 0: the text-to-image U-Net (the stand-in for Imagen) on frames of the built-in world.

Trains a 0.8M-parameter U-Net (channels 16/32/64, self- and cross-attention at 16x16 and 8x8)
and the tiny T5 encoder (one token per caption word) together on single 32x32 frames of
captioned moving-shapes clips. (Imagen's T5 was
pretrained on text; no weights can be downloaded here, so stage 0 trains the tiny encoder
with the U-Net, and the later stages keep it frozen.)

Run (2 CPU cores: 830 s measured on the idle machine, 0.13 s per step at batch 8):
  lumiere train --config configs/shapes_t2i.py --workdir runs/t2i
  lumiere eval --workdir runs/t2i

Expected result (measured, README "Stage 0"): colour 98% / shape 77% on seen colour-shape
combinations, 100% / 53% held out (96 samples each). `:steps=6000` (951 s) gave 100% / 90%
and 100% / 79%; the shipped export is a 6000-step run. Min-SNR-5 loss weighting and many
small steps are what made the shapes: with no weighting, batch 16 and 3000 steps shape was
20% / 7%; with Min-SNR at batch 16 x 3000 steps, 66% / 49%.

Variants (`--config configs/shapes_t2i.py:ARG`): `smoke` (a few steps, for tests), and any
key=value of: steps, batch, channels.
"""

from ml_collections import ConfigDict

from lumiere_jax.config import parse_config_arg


def get_config(arg: str | None = None) -> ConfigDict:
    arg = parse_config_arg(arg, smoke=False, steps=5000, batch=8, channels=16)
    c = ConfigDict()
    c.seed = 0
    c.world = dict(num_frames=16, height=32, width=32, fps=8.0, seed=0)
    # source: 'shapes' (generated on the fly), 'shards' (data.path: `lumiere data synth` or
    # `lumiere data import` output) or 'tfds' (data.tfds_name, data.path = its data_dir).
    c.data = dict(source="shapes", split="train", path="", num_workers=0, clip_frames=0,
                  frame_strides=(1,))
    # One token per caption word (the world's closed vocabulary; unknown words are errors).
    c.text = dict(preset="tiny", tokenizer="shapes", vocab_path="", max_length=16)
    c.model = dict(kind="unet", unet=dict(
        channels=arg.channels, channel_mult=(1, 2, 4), num_res_blocks=1,
        attention_levels=(1, 2), head_dim=32, groups=8, dtype="float32", remat="none"))
    # Min-SNR-5 weighting: the mid-noise levels, where outlines form, get the weight.
    c.diffusion = dict(prediction="v", logsnr_min=-20.0, logsnr_max=20.0,
                       loss_weighting="min_snr", thresholding="dynamic")
    c.train = dict(
        steps=arg.steps, decay_steps=0, batch_size=arg.batch, lr=1e-3, end_lr_factor=0.1,
        warmup_steps=100,
        weight_decay=1e-4, grad_clip=1.0, ema_decay=0.999, cond_drop=0.1,
        trainable=".*",  # stage 0 trains everything, the T5 stand-in included
        log_every=50, ckpt_every=500, sample_every=2000, max_to_keep=2, keep_period=0,
        grad_accum=1, preemption=True, progress=True)
    # One device (a tiny model gains nothing from more on a CPU); `--config.mesh.data=-1` uses
    # them all. mesh.dcn: sizes across slices; mesh.rules: logical-axis rules before the defaults.
    c.mesh = dict(data=1, fsdp=1, tensor=1, dcn=dict(data=1, fsdp=1, tensor=1), rules=())
    c.sample = dict(sampler="ddim", steps=20, guidance=3.0, batch_size=64,
                    devices=0)  # 0: each batch split over all local devices, 1: one
    c.eval = dict(num_samples=96, seed=1000)
    if arg.smoke:
        c.train.update(steps=4, decay_steps=4, batch_size=4, log_every=1, ckpt_every=2,
                       sample_every=4, warmup_steps=1, progress=False)
        c.sample.update(steps=2, batch_size=16)
        c.eval.update(num_samples=8)
    return c
