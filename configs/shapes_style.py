r"""Stylised generation, step 1: fine-tune the stage-0 image U-Net on a few style images.

Lumiere's recipe (section 5): fine-tune the text-to-image model's spatial weights on a handful
of images in the target style, leave the STUNet's temporal layers alone, and at sampling time
interpolate the STUNet's spatial weights between the original and the fine-tuned ones
(`lumiere app style`, `lumiere_jax.apps.style`).

The style images: the first `images` (16) still frames of the built-in world's 'train' split
with the objects filled with diagonal stripes (`data.style="stripes"`, data.synthetic
STYLES; captions unchanged, so no style word is needed). The model starts from the shipped
stage-0 export (`init_from`, same kind: every parameter copied by name); only the U-Net `net/`
trains, the T5 encoder stays frozen (it must: the STUNet keeps its own, equal, encoder).
EMA 0.99, so a few hundred steps are not averaged away.

Run (2 CPU cores, shared with another training run):
  lumiere train  --config configs/shapes_style.py --workdir runs/style
  lumiere export --workdir runs/style --out runs/style_export
  lumiere app style --workdir checkpoints/shapes_stunet --style checkpoints/shapes_style \
      --alpha 0,0.5,1 --prompts "a large red square moving left on a white background"
  python -m bench.bench_style --style checkpoints/shapes_style   # the README table

Measured (README "Stylised generation"): 300 steps at batch 8 took 2m48s wall, 2.0 CPU-minutes
(0.30 s/step plus 33 s of compilation) on the 2 cores shared with another training run. With
the shipped STUNet, 24 test captions, DDIM 20, guidance 3, the style score (eval.style; plain
truth 0, styled truth 32.9) rises with alpha: 7.4, 7.8, 9.1, 11.4, 16.4 at alpha 0, 0.25, 0.5,
0.75, 1, with colour 100%, shape 96-100% and motion 8-12% (8% at alpha 0) throughout.
Shipped as checkpoints/shapes_style (3.6 MB; this command reproduces it bit for bit).

Variants (`--config configs/shapes_style.py:ARG`): `smoke` (a few steps, for tests), and any
key=value of: steps, batch, images, lr, style, channels, init_from.
"""

from ml_collections import ConfigDict

from lumiere_jax.config import parse_config_arg


def get_config(arg: str | None = None) -> ConfigDict:
    arg = parse_config_arg(arg, smoke=False, steps=300, batch=8, images=16, lr=5e-4,
                           style="stripes", channels=16, init_from="checkpoints/shapes_t2i")
    c = ConfigDict()
    c.seed = 0
    c.init_from = arg.init_from  # the stage-0 export (kind 'unet', same architecture)
    # Still frames (num_frames=1): `images` fixed style images, captions without motion.
    c.world = dict(num_frames=1, height=32, width=32, fps=8.0, seed=0)
    c.data = dict(source="shapes", split="train", path="", num_workers=0, clip_frames=0,
                  frame_strides=(1,), style=arg.style, num_examples=arg.images)
    c.text = dict(preset="tiny", tokenizer="shapes", vocab_path="", max_length=16)
    c.model = dict(kind="unet", unet=dict(
        channels=arg.channels, channel_mult=(1, 2, 4), num_res_blocks=1,
        attention_levels=(1, 2), head_dim=32, groups=8, dtype="float32", remat="none"))
    c.diffusion = dict(prediction="v", logsnr_min=-20.0, logsnr_max=20.0,
                       loss_weighting="min_snr", thresholding="dynamic")
    c.train = dict(
        steps=arg.steps, decay_steps=0, batch_size=arg.batch, lr=arg.lr, end_lr_factor=0.1,
        warmup_steps=20,
        weight_decay=1e-4, grad_clip=1.0, ema_decay=0.99, cond_drop=0.1,
        trainable="^net/",  # the spatial U-Net; the T5 encoder stays the stage-0 one
        log_every=50, ckpt_every=100, sample_every=0, max_to_keep=1, keep_period=0,
        grad_accum=1, preemption=True, progress=True)
    c.mesh = dict(data=1, fsdp=1, tensor=1, dcn=dict(data=1, fsdp=1, tensor=1), rules=())
    c.sample = dict(sampler="ddim", steps=20, guidance=3.0, batch_size=64,
                    devices=0)  # 0: each batch split over all local devices, 1: one
    c.eval = dict(num_samples=32, seed=1000)
    if arg.smoke:
        c.train.update(steps=3, decay_steps=3, batch_size=4, log_every=1, ckpt_every=3,
                       warmup_steps=1, progress=False)
        c.data.update(num_examples=min(arg.images, 4))
        c.sample.update(steps=2, batch_size=8)
        c.eval.update(num_samples=4)
    return c
