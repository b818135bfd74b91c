r"""The paper's base model: an STUNet generating 80 frames at 128x128 (5 s at 16 fps).

Stage 1 of Lumiere at paper scale: the text-to-image U-Net (spatial weights, frozen) inflated
with temporal layers, which alone are trained (train.trainable='temporal'), conditioned on a
frozen T5 v1.1 XXL encoder. Meant for a TPU pod; on a CPU it is only planned, never trained.

What is approximated (the paper gives no widths; no Imagen weights are public):
  - Widths follow Imagen's 64x64 base U-Net in spirit (Saharia et al. 2022, appendix: 512
    channels, mult (1, 2, 3, 4), 3 res blocks, attention at the lower resolutions, ~2B
    parameters) but start at 256 channels, because this base works at 128x128 and on 80
    frames folded into the batch: activations at level 0 are 4x Imagen's per image. Levels:
    128, 64, 32, 16 pixels with 256, 512, 768, 1024 channels, 3 res blocks each, spatial
    self- and cross-attention at 32x32 and 16x16.
  - Time: temporal down-sampling next to every spatial one, 80 -> 40 -> 20 -> 10 frames;
    temporal convolutions at the three finer levels, temporal attention at the coarsest
    (16x16 x 10 frames), as in the paper's STUNet figure.
  - bfloat16 compute, float32 parameters and optimizer state.
  - Batch 64 (one clip per chip on 64 chips); learning rate and schedule are guesses.

Run (the SentencePiece model of T5 v1.1, e.g. spiece.model from the published checkpoint, must
be given; shards from `lumiere data import`):
  lumiere train --config configs/lumiere_base.py --workdir gs://BUCKET/runs/base \
      --config.text.vocab_path=/path/to/spiece.model --config.data.path=gs://BUCKET/shards
  lumiere plan --config configs/lumiere_base.py --mesh data=8,fsdp=8,tensor=1 \
      --device_memory_gib 95

Expected `lumiere plan` result (a v5p-128 slice: 64 chips, 95 GiB HBM each; the name counts
TensorCores), about 20 s on a CPU, nothing allocated:
  parameters 5,509,694,211: text_encoder 4,762,310,656 and net/unet 624,409,347 (frozen),
  net/temporal 122,974,208 (trainable); 9.6e15 FLOPs per step (1.5e14 per chip);
  per chip: frozen params 2.51 GiB, trainable params / gradients / EMA 0.06 GiB each, Adam
  state 0.12 GiB, and 260 GiB of activations (saved residuals, an estimate) for its one clip:
  REFUSED ("does not fit ... largest: activations"). Without rematerialisation every block's
  80x128x128 activations wait for the backward pass, and one clip per chip is the least a
  data/fsdp mesh can give it. `--config.model.unet.remat=block` (each block keeps only its
  input) brings them to 155 GiB at 1.16e16 FLOPs per step (the recomputed forward): still
  refused. One clip's activations alone exceed a chip, so this slice needs shorter clips
  (`:frames=`) or activations split across chips, which the estimate does not count (it
  gives 155 GiB on data=4,fsdp=4,tensor=4 at batch 16 as well).
  The stage-1 switches of configs/shapes_stunet.py are here too (model.temporal:
  temporal_text, temporal_position, temporal_conv_spatial). `temporal_text=sum` with
  `temporal_position=true` adds 5.5M trainable parameters and, with remat=block, 5.4 GiB of
  activations per chip (160 GiB); the FLOPs per step that XLA's cost analysis reports stay
  1.163e16 (a rough count of the position MLP's work is under 1% of that).

Variants (`--config configs/lumiere_base.py:ARG`): key=value of batch, channels, frames.
"""

from ml_collections import ConfigDict

from lumiere_jax.config import parse_config_arg


def get_config(arg: str | None = None) -> ConfigDict:
    arg = parse_config_arg(arg, batch=64, channels=256, frames=80)
    c = ConfigDict()
    c.seed = 0
    # The clip format: 80 frames at 128x128, 16 fps (ShapesWorld's fields also describe shards).
    c.world = dict(num_frames=arg.frames, height=128, width=128, fps=16.0, seed=0)
    c.data = dict(source="shards", path="", split="train", clip_frames=arg.frames,
                  frame_strides=(1,), num_workers=4, prefetch=2)
    c.text = dict(preset="t5-v1_1-xxl", tokenizer="sentencepiece", vocab_path="",
                  max_length=128)
    c.model = dict(
        kind="stunet",
        unet=dict(channels=arg.channels, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                  attention_levels=(2, 3), head_dim=64, groups=32, dtype="bfloat16",
                  remat="none"),
        temporal=dict(temporal_sampling_levels=None, temporal_sampling_init="nearest",
                      temporal_conv=True, temporal_attention=True, temporal_head_dim=64,
                      temporal_conv_spatial=1, temporal_text="none", temporal_position=False))
    c.diffusion = dict(prediction="v", logsnr_min=-20.0, logsnr_max=20.0,
                       loss_weighting="none", thresholding="dynamic",
                       time_distribution="uniform", time_logit_mean=0.0, time_logit_std=1.0,
                       time_uniform_fraction=0.0)
    c.train = dict(
        steps=500_000, batch_size=arg.batch, lr=1e-4, end_lr_factor=0.1, warmup_steps=10_000,
        weight_decay=0.0, grad_clip=1.0, ema_decay=0.9999, cond_drop=0.1,
        trainable="temporal",  # stage 1: the spatial (text-to-image) weights stay frozen
        log_every=100, ckpt_every=2000, sample_every=0, max_to_keep=3, keep_period=50_000,
        grad_accum=1, preemption=True, progress=False)
    c.sample = dict(sampler="ddim", steps=256, guidance=8.0, batch_size=4,
                    devices=0)  # 0: each batch split over all local devices, 1: one
    c.eval = dict(num_samples=96, seed=1000)
    # Mesh sizes within a slice (-1 = the rest of the devices): parameters and optimizer state
    # over fsdp. mesh.dcn: sizes across slices (multi-slice: e.g. dcn.data=2 for two slices
    # doing data parallelism over the data-center network). mesh.rules: (logical name, mesh
    # axis) pairs that take precedence over lumiere_jax.parallel.sharding.DEFAULT_RULES.
    c.mesh = dict(data=-1, fsdp=8, tensor=1, dcn=dict(data=1, fsdp=1, tensor=1), rules=())
    return c
