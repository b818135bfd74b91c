r"""Stage 1: inflate the stage-0 text-to-image model into a STUNet and train only its temporal layers.

16 frames at 32x32 (8 fps) of the built-in world. The spatial U-Net and the T5 encoder come
from the stage-0 export (`init_from`) and stay frozen (bit-identical); only `net/temporal`
(temporal convolutions at 32x32 and 16x16, temporal attention at 8x8, temporal down/up-sampling
initialised to averaging / repeating) is trained. Four choices beyond the paper's recipe,
each a switch (README "Stage 1" has what they did):
  - `text=attention` (or `true`) / `text=sum` / `text=tokens`: the temporal layers read the
    caption through their own attention pooling, sum of T5 token projections, or sum of a
    learned vector per token id (model.temporal.temporal_text): the frozen text path, trained
    on stills, carries the motion words at ~3% of its norm, and even the summed T5 outputs
    move less for "left" -> "right" than for "red" -> "blue" by a factor of six;
  - `position`: every temporal block adds a learned embedding of its frame, row and column
    (model.temporal.temporal_position), without which no block can place the object where a
    motion word says;
    `position_scale`: the embedding scales and shifts that input instead of adding to it
    (model.temporal.temporal_position=scale), so the caption's FiLM times it gates the frozen
    features (the object) by place;
  - `conv_spatial=3`: each temporal convolution has its own 3x3 spatial part, (2+1)D
    (model.temporal.temporal_conv_spatial; 1 = the paper's 3x1x1 next to the frozen 3x3);
  - `frame_correlation=0.5`: noise correlated across frames (PYoCo's mixed prior).
  - `shift=-2`: the log-SNR shift of simple diffusion (diffusion.shift), training and
    sampling noisier, where the caption has to decide the direction.

Run (2 CPU cores: 0.6-0.7 s per step idle, 2600 steps in about 30 minutes):
  lumiere train --config configs/shapes_stunet.py --workdir runs/stunet
  lumiere eval  --workdir runs/stunet
  lumiere eval  --workdir runs/stunet --per_frame   # the stage-0 model on every frame

Sampling knobs for small objects, which otherwise jump between the coarse frames of the
temporally down-sampled levels (README Stage 1, session 27):
`--config.sample.frame_correlation=0.95` starts the sampler from noise more correlated across
frames than in training (the frozen per-frame layers then agree on a layout), and
`--config.world.num_frames=19 --config.sample.window=16 --config.sample.overlap=15` samples a
19-frame clip with MultiDiffusion over 16-frame windows at stride 1, so every frame is pooled
in all four phases of the 8x8 level. `--config.sample.guidance=8
--config.sample.guidance_interval="(-100.0,-2.0)"` guides strongly only the noisy steps, where
the caption places the object, and leaves the fine ones conditional (session 28).

Ablations (the paper's, rerun here): `:sampling=none` (no temporal down/up-sampling),
`:sampling_init=random` (temporal sampling randomly initialised), `:attention=false`; and
`:text=false,conv_spatial=1,frame_correlation=0` (the paper's temporal layers alone).
`:sampling=none,init_from=DIR` starts the ablation from the export of a STUNet that has temporal
down/up-sampling: every parameter by name, its sampling kernels left out (init_unused_params).

The conditional variant (`:masked`): the trained STUNet (default init_from
checkpoints/shapes_stunet) plus a zero-initialised input for the masked video and its mask
(model.temporal.cond_channels=4), fine-tuned on random masks (train.mask_kinds,
diffusion/masks.py) for image-to-video and inpainting:
  lumiere train --config configs/shapes_stunet.py:masked --workdir runs/stunet_masked
With `--config.train.trainable='^net/'` (the whole U-Net) the copy of the known pixels is
learned faster with them weighted up in the loss, e.g. `--config.train.known_weight=64`; the
shipped checkpoints/shapes_stunet_masked is that, at batch=64 and lr 3e-4 on a GPU
(checkpoints/README.md).

Expected result: see README "Stage 1" for the measured motion accuracy and temporal stability
against the per-frame stage-0 model on the same prompts and seeds, and README "Applications"
for the conditional variant.
"""

from ml_collections import ConfigDict

from lumiere_jax.config import parse_config_arg


def get_config(arg: str | None = None) -> ConfigDict:
    arg = parse_config_arg(arg, smoke=False, steps=0, batch=4, sampling="all",
                           sampling_init="nearest", attention=True, channels=16,
                           frame_correlation=0.0, text="none", position=False,
                           position_scale=False,
                           conv_spatial=1, masked=False, init_from="", shift=0.0)
    # The masked variant fine-tunes a trained STUNet; the plain one inflates the image model.
    init_from = arg.init_from or ("checkpoints/shapes_stunet" if arg.masked
                                  else "checkpoints/shapes_t2i")
    steps = arg.steps or (600 if arg.masked else 1500)
    c = ConfigDict()
    c.seed = 0
    c.init_from = init_from  # an export of the stage-0 model (`lumiere export`)
    # From an export of a STUNet (`init_from=...`, or the masked variant's default): the
    # parameters it may lack, which keep their initialisation. From the image model: ignored
    # (inflation makes all of net/temporal new).
    c.init_new_params = "^net/temporal/cond_in/" if arg.masked else r"$^"
    # ... and those of its parameters this model may leave out: an ablation without (some)
    # temporal down/up-sampling may start from a STUNet that has it (README Stage 1, run e6).
    c.init_unused_params = r"$^" if arg.sampling == "all" else r"^net/temporal/(down|up)/"
    c.world = dict(num_frames=16, height=32, width=32, fps=8.0, seed=0)
    # source: 'shapes' (generated on the fly), 'shards' (data.path: `lumiere data synth` or
    # `lumiere data import` output) or 'tfds' (data.tfds_name, data.path = its data_dir).
    # size_weights: the built-in world's object sizes drawn unevenly, e.g.
    # --config.data.size_weights.small=3 for three small objects to one large (equal: uniform).
    c.data = dict(source="shapes", split="train", path="", num_workers=0, clip_frames=0,
                  frame_strides=(1,), size_weights=dict(small=1.0, large=1.0))
    # One token per caption word (the world's closed vocabulary; unknown words are errors).
    c.text = dict(preset="tiny", tokenizer="shapes", vocab_path="", max_length=16)
    levels = {"all": None, "none": (), "coarse": (1,)}
    if arg.sampling not in levels:
        raise ValueError(f"sampling must be one of {sorted(levels)}, got {arg.sampling!r}")
    c.model = dict(
        kind="stunet",
        unet=dict(channels=arg.channels, channel_mult=(1, 2, 4), num_res_blocks=1,
                  attention_levels=(1, 2), head_dim=32, groups=8, dtype="float32",
                  remat="none"),
        temporal=dict(temporal_sampling_levels=levels[arg.sampling],
                      temporal_sampling_init=arg.sampling_init, temporal_conv=True,
                      temporal_conv_spatial=arg.conv_spatial,
                      temporal_attention=arg.attention, temporal_head_dim=32,
                      temporal_text=arg.text,
                      temporal_position="scale" if arg.position_scale else arg.position,
                      cond_channels=4 if arg.masked else 0))
    c.diffusion = dict(prediction="v", logsnr_min=-20.0, logsnr_max=20.0,
                       loss_weighting="none", thresholding="dynamic",
                       frame_correlation=arg.frame_correlation,
                       shift=arg.shift,  # log-SNR shift; < 0 trains and samples noisier
                       # Training times' density: 'logit_normal' with time_logit_mean=4.4 trains
                       # half the time below log-SNR -8, where only the caption places the object;
                       # time_uniform_fraction keeps that share of each batch uniform, without
                       # which the model forgets the fine levels (README Stage 1, session 20).
                       time_distribution="uniform", time_logit_mean=0.0, time_logit_std=1.0,
                       time_uniform_fraction=0.0)
    c.train = dict(
        steps=steps, decay_steps=0, batch_size=arg.batch, lr=1e-3, end_lr_factor=0.1,
        warmup_steps=50,
        weight_decay=1e-4, grad_clip=1.0, ema_decay=0.995, cond_drop=0.1,
        trainable="^net/temporal/",  # frozen: the stage-0 U-Net and T5
        log_every=25, ckpt_every=250, sample_every=500, max_to_keep=2, keep_period=0,
        # Logs the motion-word gap at log-SNR -8 and -4 (eval/motion_word.py): positive once
        # the temporal layers read the motion word, long before samples move as captioned.
        # Its true-caption error at (0, 2), if added, shows whether the fine levels are learned.
        probe_every=500, probe_logsnrs=(-8.0, -4.0),
        grad_accum=1, preemption=True, progress=True)
    if arg.masked:  # one random mask per clip (diffusion/masks.py)
        c.train.mask_kinds = ("none", "first_frame", "box", "spatiotemporal", "border")
        c.train.known_weight = 1.0  # loss weight of the known pixels against the rest
    # One device (a tiny model gains nothing from more on a CPU); `--config.mesh.data=-1` uses
    # them all. mesh.dcn: sizes across slices; mesh.rules: logical-axis rules before the defaults.
    c.mesh = dict(data=1, fsdp=1, tensor=1, dcn=dict(data=1, fsdp=1, tensor=1), rules=())
    # frame_correlation: of the sampler's noise (None: diffusion.frame_correlation, as
    # trained); 0.95 with a model trained at 0.5 keeps small objects in place (README Stage 1).
    # guidance_interval: (low, high) log-SNRs where guidance applies (None: every step).
    # window: MultiDiffusion over windows of that many frames (0: the whole clip), for clips
    # longer than training's (world.num_frames), e.g. 19 frames in 16-frame windows at stride 1.
    c.sample = dict(sampler="ddim", steps=20, guidance=3.0, batch_size=16,
                    devices=0,  # 0: each batch split over all local devices, 1: one
                    frame_correlation=None, guidance_interval=None, window=0, overlap=2,
                    window_weights="uniform")
    c.eval = dict(num_samples=96, seed=1000)
    if arg.smoke:
        c.train.update(steps=4, decay_steps=6, batch_size=2, log_every=1, ckpt_every=2,
                       sample_every=4, probe_every=0, warmup_steps=1, progress=False)
        c.sample.update(steps=2, batch_size=8)
        c.eval.update(num_samples=4)
    return c
