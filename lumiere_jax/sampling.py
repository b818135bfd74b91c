"""What the CLI's `sample`, `eval` and `data synth` do: load a run, sample, write, score."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath
from flax import nnx
from ml_collections import ConfigDict

from lumiere_jax.data import video_io
from lumiere_jax.data.pipeline import world_from_config
from lumiere_jax.data.synthetic import (
    ShapesSource,
    ShapesWorld,
    parse_caption,
)
from lumiere_jax.diffusion import schedules
from lumiere_jax.diffusion.schedules import Diffusion
from lumiere_jax.diffusion.ssr import project_to_low_res
from lumiere_jax.eval.motion_word import MOTION_PROBE_LOGSNRS, MotionWordProbe  # noqa: F401
from lumiere_jax.eval.shapes import score_batch
from lumiere_jax.generate import Generator, from_uint8, to_uint8
from lumiere_jax.models.denoiser import build_denoiser
from lumiere_jax.text.tokenizers import make_tokenizer
from lumiere_jax.train.export import inflate_from_export, is_export, load_export
from lumiere_jax.train.trainer import make_generator, restore_model


def load_generator(config: ConfigDict, workdir: str, step: int | None = None):
    """(Generator with the EMA weights of a training run or an export, checkpoint step)."""
    if is_export(workdir):
        _, model, info = load_export(workdir)
        step = info["step"]
    else:
        model, step = restore_model(config, workdir, step)
    tokenizer = make_tokenizer(config.text.tokenizer, config.text.get("vocab_path"))
    return make_generator(model, config, Diffusion.from_config(config.diffusion), tokenizer), step


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe form of a prompt: lower case, runs of other characters as one "_"."""
    keep = "".join(c if c.isalnum() else "_" for c in text.lower())
    return "_".join(filter(None, keep.split("_")))[:limit] or "empty"


def write_sample(path_stem: epath.Path, sample: np.ndarray, fps: float,
                 sheet: np.ndarray | None = None) -> list[str]:
    """An image -> PNG; a video -> mp4, gif and a PNG contact sheet (its frames, or `sheet`
    if given, e.g. one with more rows). Returns the paths."""
    if sample.ndim == 3:
        video_io.write_png(f"{path_stem}.png", sample)
        return [f"{path_stem}.png"]
    video_io.write_mp4(f"{path_stem}.mp4", sample, fps)
    video_io.write_gif(f"{path_stem}.gif", sample, fps)
    video_io.write_png(f"{path_stem}_sheet.png",
                       video_io.contact_sheet([sample]) if sheet is None else sheet)
    return [f"{path_stem}.mp4", f"{path_stem}.gif", f"{path_stem}_sheet.png"]


def check_prompts(prompts: Sequence[str]) -> None:
    """Rejects prompts the built-in world's models cannot follow, saying which and why.

    The tiny models only ever saw the world's caption vocabulary, so an unknown word (often a
    typo) is an error with a suggestion, not a silent no-op.
    """
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt {i} is an empty prompt ({prompt!r}); write a caption such "
                             "as 'a red circle moving left' (guidance 0 samples unconditionally)")
        try:
            parse_caption(prompt)
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from None


def sample_to_files(config: ConfigDict, workdir: str, prompts: Sequence[str],
                    seeds: Sequence[int], guidance: Sequence[float], step: int | None = None,
                    out: str | None = None, negative_prompt: str = "") -> list[str]:
    """Samples every (prompt, seed, guidance) combination and writes each to `out`
    (negative_prompt: what guidance steers away from, as in Generator)."""
    if any(g < 0 for g in guidance):
        raise ValueError(f"guidance scales must be >= 0, got {list(guidance)}")
    check_prompts(prompts)
    generator, step = load_generator(config, workdir, step)
    items = list(itertools.product(prompts, seeds, guidance))
    samples = generator([p for p, _, _ in items], [s for _, s, _ in items],
                        [g for _, _, g in items], negative_prompts=[negative_prompt] * len(items))
    out_dir = epath.Path(out or epath.Path(workdir) / "samples" / f"step_{step}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (prompt, seed, g), sample in zip(items, samples):
        stem = out_dir / f"{slug(prompt)}_seed{seed}_cfg{g:g}"
        paths += write_sample(stem, sample, config.world.fps)
    return paths


def evaluation_prompts(world: ShapesWorld, split: str, n: int) -> list[str]:
    source = ShapesSource(world, split, n)
    return [source[i]["caption"] for i in range(n)]


def evaluate(config: ConfigDict, workdir: str, step: int | None = None,
             out: str | None = None, fvd_weights: str | None = None) -> dict[str, Any]:
    """Scores a run (or export) with `evaluate_generator` (an SSR with `evaluate_ssr`);
    writes to `out` (default WORKDIR/eval). fvd_weights: an I3D .npz (eval.fvd) to add FVD."""
    out = out or str(epath.Path(workdir) / "eval")
    if config.model.kind == "ssr":
        return evaluate_ssr(config, workdir, out, step, fvd_weights=fvd_weights)
    generator, step = load_generator(config, workdir, step)
    return evaluate_generator(generator, config, out, step, fvd_weights=fvd_weights)


def _load_fvd_model(fvd_weights: str | None):
    """The I3D of `fvd_weights`, loaded (and checked) before any sampling; None without."""
    if not fvd_weights:
        return None
    from lumiere_jax.eval import fvd as fvd_lib
    return fvd_lib.load_i3d(fvd_weights)


def fvd_score(i3d, truth: np.ndarray, videos: np.ndarray) -> float:
    """FVD (eval.fvd) of generated `videos` against the ground-truth clips `truth`."""
    from lumiere_jax.eval import fvd as fvd_lib
    return fvd_lib.fvd(truth, videos, i3d)


def _without_overlap(config: ConfigDict) -> ConfigDict:
    """The config sampled with the same windows, but tiled without overlap (no aggregation)."""
    plain = ConfigDict(config.to_dict())
    plain.sample.overlap = 0
    return plain


SSR_DIAGNOSTIC_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


def ssr_one_step_psnr(generator, config: ConfigDict, truth: np.ndarray,
                      prompts: Sequence[str]) -> dict[str, float]:
    """PSNR against the truth of the SSR's one-step estimate of each clip's first window from
    the window noised to each time of SSR_DIAGNOSTIC_TIMES (diffusion.ssr.one_step_estimates):
    how well it cleans a noisy clip, and at t = 1 how well it predicts one from the low-res
    video alone. Keys are the times."""
    import jax
    import jax.numpy as jnp

    from lumiere_jax.diffusion.ssr import one_step_estimates
    from lumiere_jax.eval import video_quality as vq

    graphdef = generator.graphdef

    @jax.jit
    def apply(state, z, logsnr, cond):
        return nnx.merge(graphdef, state)(z, logsnr, cond)

    window = config.sample.window or truth.shape[1]
    tokens = generator.tokenizer.encode_batch(list(prompts), generator.max_length)
    model = nnx.merge(graphdef, generator.state)
    cond = model.encode_text(jnp.asarray(tokens.ids), jnp.asarray(tokens.mask))
    x = jnp.asarray(from_uint8(truth[:, :window]))
    ssr = model.net.cfg  # the model's own settings, as the Generator reads them
    estimates = one_step_estimates(
        lambda z, logsnr, c: apply(generator.state, z, logsnr, c), x, cond,
        jax.random.key(config.eval.seed), Diffusion.from_config(config.diffusion),
        SSR_DIAGNOSTIC_TIMES, scale=ssr.scale, residual=ssr.residual,
        residual_base=ssr.residual_base)
    return {f"{t:g}": vq.psnr(to_uint8(e), truth[:, :window]) for t, e in estimates.items()}


MOTION_PROBE_CLIPS = 32  # `lumiere eval` probes at most this many (fewer if eval.num_samples)


def motion_word_gaps(generator, config: ConfigDict, n: int,
                     contrast: str = "opposite") -> dict[str, dict[str, float]]:
    """The motion-word probe (eval.motion_word) of the generator's model on n moving clips of
    the seen split, at each log-SNR of MOTION_PROBE_LOGSNRS, against the opposite or the
    neighbouring motion (`contrast`)."""
    return MotionWordProbe(generator.graphdef, generator.tokenizer, generator.max_length,
                           config, n, contrast=contrast)(generator.state)


KNOWN_FRAME_LOGSNRS = (-8.0, -4.0, 0.0, 4.0)


def known_frame_psnrs(generator, config: ConfigDict, n: int) -> dict[str, dict[str, float]]:
    """Does the conditional STUNet use the pixels it is given? For the first n clips of the
    seen ('test') split, noised (one draw of the config's noise) to each log-SNR of
    KNOWN_FRAME_LOGSNRS: the PSNR of the model's one-step estimate of frame 0 when frame 0 is
    given as known ('known', image-to-video's input), when nothing is given ('unknown'), and
    of frames 1.. when frame 0 is known ('rest'). Keys are the log-SNRs.

    A model that copies the given frame scores far above 'unknown' at every level (+inf when
    exact); one that ignores it scores the same, which is what caps image-to-video's frame-0
    PSNR when nothing is replaced (README "Applications").
    """
    import jax
    import jax.numpy as jnp

    from lumiere_jax.diffusion.masks import masked_video
    from lumiere_jax.eval import video_quality as vq

    source = ShapesSource(world_from_config(config), "test", n)
    clips = np.stack([source[i]["video"] for i in range(n)])
    prompts = [source[i]["caption"] for i in range(n)]
    x = jnp.asarray(from_uint8(clips))
    diffusion = Diffusion.from_config(config.diffusion)
    eps = diffusion.noise(jax.random.key(config.eval.seed), x.shape)
    tokens = generator.tokenizer.encode_batch(prompts, generator.max_length)
    first = jnp.zeros((*x.shape[:4], 1)).at[:, 0].set(1.0)
    graphdef = generator.graphdef

    @jax.jit
    def estimate(state, logsnr, known):  # the x0 estimate, frame 0 known or nothing known
        model = nnx.merge(graphdef, state)
        cond = model.encode_text(jnp.asarray(tokens.ids), jnp.asarray(tokens.mask))
        cond = {**cond, "masked": masked_video(x, first * known)}
        alpha, sigma = schedules.alpha_sigma(logsnr)
        z = alpha * x + sigma * eps
        x0, _ = schedules.x0_eps_from_prediction(
            diffusion.prediction, model(z, jnp.full((n,), logsnr), cond), z, logsnr)
        return x0

    out = {}
    for logsnr in KNOWN_FRAME_LOGSNRS:
        known, unknown = (to_uint8(estimate(generator.state, jnp.float32(logsnr), k))
                          for k in (1.0, 0.0))
        out[f"{logsnr:g}"] = {"known": vq.psnr(known[:, :1], clips[:, :1]),
                              "unknown": vq.psnr(unknown[:, :1], clips[:, :1]),
                              "rest": vq.psnr(known[:, 1:], clips[:, 1:])}
    return out


def evaluate_ssr(config: ConfigDict, workdir: str, out: str, step: int | None = None,
                 fvd_weights: str | None = None) -> dict[str, Any]:
    """The SSR against ground truth on eval.num_samples clips of the seen ('test') and held-out
    splits: each clip is downsampled by the SSR's scale and upsampled again by the SSR (with
    MultiDiffusion over sample.window frames), by the SSR on windows tiled without overlap (no
    aggregation), and by bilinear and bicubic interpolation (bicubic also projected onto the
    input's block means, `project_to_low_res`). Reports PSNR/SSIM of each against
    the clip, the seam ratio (eval.video_quality) of each SSR variant at its own window edges
    and of the ground truth at the same edges, and the analytic shapes scores of the SSR's
    videos, and the PSNR of its one-step estimates by noise level (ssr_one_step_psnr); writes
    step_N.json and a contact sheet (truth, bicubic, SSR without and with
    aggregation) to `out`. With fvd_weights (an I3D .npz), also the FVD of the SSR's videos
    against the clips (fvd_ssr)."""
    import jax

    from lumiere_jax.eval import video_quality as vq
    from lumiere_jax.train.trainer import low_res_of

    i3d = _load_fvd_model(fvd_weights)
    generator, step = load_generator(config, workdir, step)
    plain, _ = load_generator(_without_overlap(config), workdir, step)
    world = world_from_config(config)
    n, scale = config.eval.num_samples, config.model.ssr.scale
    examples = [ex for split in ("test", "heldout")
                for ex in (ShapesSource(world, split, n)[i] for i in range(n))]
    prompts = [ex["caption"] for ex in examples]
    truth = np.stack([ex["video"] for ex in examples])
    low = low_res_of(truth, scale)
    seeds = [config.eval.seed + i for i in range(len(examples))]
    size = (world.height, world.width)
    start = time.perf_counter()
    methods = {"ssr": generator(prompts, seeds, config.sample.guidance, low_res=low)}
    seconds = time.perf_counter() - start
    methods["ssr_no_aggregation"] = plain(prompts, seeds, config.sample.guidance, low_res=low)
    upsampled = {name: jax.image.resize(low, (*low.shape[:2], *size, 3), name)
                 for name in ("bilinear", "bicubic")}
    methods.update({name: to_uint8(up) for name, up in upsampled.items()})
    # Bicubic made consistent with its input, as sample.low_res_consistency makes the SSR's
    # estimates: the baseline to beat with that setting.
    methods["bicubic_consistent"] = to_uint8(
        project_to_low_res(upsampled["bicubic"], low, scale))
    window = config.sample.window or world.num_frames
    edges = {"ssr": vq.window_edges(world.num_frames, window, config.sample.overlap),
             "ssr_no_aggregation": vq.window_edges(world.num_frames, window, 0)}
    summary: dict[str, Any] = {"step": step, "n": len(examples), "scale": scale,
                               "window": window, "overlap": config.sample.overlap,
                               "sample_seconds": seconds}
    for name, videos in methods.items():
        summary[f"psnr_{name}"] = vq.psnr(videos, truth)
        summary[f"ssim_{name}"] = vq.ssim(videos, truth)
    for name, at in edges.items():
        if not at:  # one window covers the clip: there is no seam to measure
            continue
        summary[f"seam_ratio_{name}"] = vq.seam_ratio(methods[name], at)
        summary[f"seam_ratio_truth_at_{name}_edges"] = vq.seam_ratio(truth, at)
    summary["shapes_ssr"] = score_batch(methods["ssr"], prompts)
    summary["psnr_one_step_by_time"] = ssr_one_step_psnr(generator, config, truth, prompts)
    if i3d is not None:
        summary["fvd_ssr"] = fvd_score(i3d, truth, methods["ssr"])
    out_dir = epath.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, labels = [], []
    for i in range(min(4, len(examples))):
        for name, video in (("truth", truth[i]), ("bicubic", methods["bicubic"][i]),
                            ("SSR, no aggregation", methods["ssr_no_aggregation"][i]),
                            ("SSR + MultiDiffusion", methods["ssr"][i])):
            rows.append(video)
            labels.append(f"{name}: {prompts[i]}" if name == "truth" else name)
    sheet = out_dir / f"step_{step}_ssr.png"
    video_io.write_png(str(sheet), video_io.contact_sheet(rows, labels=labels,
                                                          max_frames=world.num_frames))
    report = {"summary": summary, "prompts": prompts, "files": [str(sheet)]}
    (out_dir / f"step_{step}.json").write_text(json.dumps(report, indent=1))
    return report


def evaluate_generator(generator, config: ConfigDict, out: str, step: int | str,
                       fvd_weights: str | None = None) -> dict[str, Any]:
    """Samples eval.num_samples captions of the seen ('test') and held-out splits (seeds
    eval.seed + i), scores them with the analytic evaluator, and writes step_N.json and
    contact sheets to `out`. With fvd_weights (an I3D .npz, see eval.fvd), each split's
    scores also get `fvd`: the samples against the world's clips of the same captions."""
    i3d = _load_fvd_model(fvd_weights)
    world = world_from_config(config)
    n = config.eval.num_samples
    out_dir = epath.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary, details = {"step": step}, {}
    for split in ("test", "heldout"):
        prompts = evaluation_prompts(world, split, n)
        seeds = [config.eval.seed + i for i in range(n)]
        start = time.perf_counter()
        samples = generator(prompts, seeds, config.sample.guidance)
        seconds = time.perf_counter() - start
        videos = samples if samples.ndim == 5 else samples[:, None]
        scores = score_batch(videos, prompts)
        scores["sample_seconds"] = seconds
        if i3d is not None:
            source = ShapesSource(world, split, n)
            truth = np.stack([source[i]["video"] for i in range(n)])
            scores["fvd"] = fvd_score(i3d, truth, videos)
        summary[split] = scores
        details[split] = prompts
        sheet = video_io.contact_sheet(list(videos[:16]), labels=prompts[:16])
        video_io.write_png(str(out_dir / f"step_{step}_{split}.png"), sheet)
    if isinstance(generator, Generator) and len(generator.sample_shape) == 4:  # a video model:
        # does it read the motion words?
        probed = min(n, MOTION_PROBE_CLIPS)
        summary["motion_word"] = motion_word_gaps(generator, config, probed)
        summary["motion_word_neighbour"] = motion_word_gaps(generator, config, probed,
                                                            "neighbour")
        if generator.conditional:  # does it use a given first frame?
            summary["known_frame"] = known_frame_psnrs(generator, config,
                                                       min(n, MOTION_PROBE_CLIPS))
    report = {"summary": summary, "prompts": details,
              "files": [str(out_dir / f"step_{step}_{split}.png") for split in details]}
    (out_dir / f"step_{step}.json").write_text(json.dumps(report, indent=1))
    return report


def per_frame_generator(video_config: ConfigDict, image_export: str):
    """The stage-0 image model applied to every frame independently, as a video sampler.

    It is a STUNet with no temporal layers inflated from the image model, so it is exactly
    the per-frame model, sampled with the same prompts, seeds and per-video noise as the
    STUNet it is compared with.
    """
    return inflated_generator(video_config, image_export, temporal_sampling_levels=(),
                              temporal_conv=False, temporal_attention=False)


def inflated_generator(video_config: ConfigDict, image_export: str, **temporal):
    """A sampler of the STUNet of `video_config` (its model.temporal updated by `temporal`)
    inflated from the image model `image_export`: spatial weights from the export, temporal
    layers as initialised (identity-like: zero-initialised outputs, averaging / repeating
    sampling), untrained."""
    config = ConfigDict(video_config.to_dict())
    config.model.temporal.update(temporal)
    model = build_denoiser(config, nnx.Rngs(0))
    inflate_from_export(model, image_export)
    tokenizer = make_tokenizer(config.text.tokenizer, config.text.get("vocab_path"))
    return make_generator(model, config, Diffusion.from_config(config.diffusion), tokenizer)


def evaluate_per_frame(video_config: ConfigDict, out: str, fvd_weights: str | None = None
                       ) -> dict[str, Any]:
    """`evaluate` for the per-frame baseline of a video run: its `init_from` image model."""
    source = video_config.get("init_from")
    if video_config.model.kind != "stunet" or not source:
        raise ValueError("the per-frame baseline needs a video (stunet) run whose config names "
                         "the image model it was inflated from (init_from)")
    return evaluate_generator(per_frame_generator(video_config, source), video_config, out,
                              "per_frame", fvd_weights=fvd_weights)


def write_synthetic_previews(out: str, num: int, split: str = "train",
                             world: ShapesWorld | None = None) -> list[str]:
    """`num` clips of the built-in world as gif + PNG contact sheet, for a look at the data."""
    world = world or ShapesWorld()
    source = ShapesSource(world, split, num)
    out_dir = epath.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    clips = [source[i] for i in range(num)]
    paths = []
    for clip in clips:
        stem = out_dir / f"{clip['index']:04d}_{slug(clip['caption'])}"
        video_io.write_gif(f"{stem}.gif", clip["video"], world.fps, scale=4)
        paths.append(f"{stem}.gif")
    sheet = video_io.contact_sheet([c["video"] for c in clips], labels=[c["caption"] for c in clips])
    video_io.write_png(str(out_dir / "contact_sheet.png"), sheet)
    return paths + [str(out_dir / "contact_sheet.png")]
