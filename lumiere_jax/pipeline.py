"""The text-to-video pipeline: prompt -> T5 -> STUNet base video -> SSR (MultiDiffusion) -> files.

A pipeline config (e.g. configs/pipeline_shapes.py) names the two trained models (an export
or a training run directory each) and how to sample each stage:

  base = dict(model=DIR, guidance=3.0, sampler="ddim", steps=20)
  ssr  = dict(model=DIR, guidance=1.0, sampler="ddim", steps=10,
              window=8, overlap=2, window_weights="uniform", aug_time=0.1,
              low_res_consistency=True)
  prompts = (...), seeds = (0,), batch_size = 8

Each stage samples with its model's EMA weights and its run's sampling settings, with the
keys given here replacing them (also `devices`: how many local devices each batch is split
over, 0 = all, the default). The SSR must take the base model's output: same frame count,
and its resolution exactly `scale` times the base's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath
from ml_collections import ConfigDict

from lumiere_jax import config as config_lib
from lumiere_jax.data import video_io
from lumiere_jax.data.pipeline import world_from_config
from lumiere_jax.eval import video_quality
from lumiere_jax.eval.shapes import score_video
from lumiere_jax.generate import Generator

STAGE_SAMPLE_KEYS = {"guidance", "sampler", "steps", "batch_size", "window", "overlap",
                     "window_weights", "aug_time", "low_res_consistency", "devices"}


def stage_config(stage: ConfigDict, kind: str, where: str) -> ConfigDict:
    """The resolved config of a stage's model with the stage's sampling keys applied."""
    if not stage.get("model"):
        raise ValueError(f"pipeline {where}.model is empty: give an export (`lumiere export`) "
                         f"or a training run directory")
    unknown = sorted(set(stage) - STAGE_SAMPLE_KEYS - {"model"})
    if unknown:
        raise ValueError(f"pipeline {where}: unknown keys {unknown}; valid keys: model, "
                         f"{', '.join(sorted(STAGE_SAMPLE_KEYS))}")
    config = ConfigDict(config_lib.read_resolved_config(stage.model).to_dict())
    if config.model.kind != kind:
        raise ValueError(f"pipeline {where}.model={stage.model} is a {config.model.kind!r} "
                         f"model; the {where} stage needs a {kind!r} model")
    for key in sorted(set(stage) & STAGE_SAMPLE_KEYS):
        config.sample[key] = stage[key]
    if config.sample.guidance < 0:
        raise ValueError(f"pipeline {where}.guidance must be >= 0, got {config.sample.guidance}")
    return config


class TextToVideoPipeline:
    """(prompts, seeds) -> (base videos [n, t, h, w, 3], final videos [n, t, H, W, 3]), uint8."""

    def __init__(self, base: Generator, base_config: ConfigDict, ssr: Generator,
                 ssr_config: ConfigDict):
        self.base, self.ssr = base, ssr
        self.base_config, self.ssr_config = base_config, ssr_config
        low, high = world_from_config(base_config), world_from_config(ssr_config)
        scale = ssr.scale
        if (low.num_frames != high.num_frames or low.height * scale != high.height
                or low.width * scale != high.width):
            raise ValueError(
                f"the SSR ({high.num_frames} frames of {high.height}x{high.width}, scale "
                f"{scale}) cannot take the base model's videos ({low.num_frames} frames of "
                f"{low.height}x{low.width}): it needs the same frames at 1/{scale} its size")

    @property
    def window_edges(self) -> tuple[int, ...]:
        """The frames where the SSR's MultiDiffusion windows begin or end (none if one window
        covers the clip): where a seam would show."""
        world, sample = world_from_config(self.ssr_config), self.ssr_config.sample
        return video_quality.window_edges(world.num_frames, sample.window or world.num_frames,
                                          sample.overlap)

    @classmethod
    def from_config(cls, pipeline: ConfigDict) -> "TextToVideoPipeline":
        from lumiere_jax.sampling import load_generator
        base_config = stage_config(pipeline.base, "stunet", "base")
        ssr_config = stage_config(pipeline.ssr, "ssr", "ssr")
        base, _ = load_generator(base_config, pipeline.base.model)
        ssr, _ = load_generator(ssr_config, pipeline.ssr.model)
        return cls(base, base_config, ssr, ssr_config)

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int],
                 base_guidance: float | None = None, ssr_guidance: float | None = None,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        base_guidance = (self.base_config.sample.guidance if base_guidance is None
                         else base_guidance)
        ssr_guidance = self.ssr_config.sample.guidance if ssr_guidance is None else ssr_guidance
        low = self.base(prompts, seeds, base_guidance, progress="base" if progress else None)
        high = self.ssr(prompts, seeds, ssr_guidance, low_res=low,
                        progress="ssr" if progress else None)
        return low, high


def video_metrics(video: np.ndarray, prompt: str, edges: Sequence[int]) -> dict[str, Any]:
    """Per-video metrics: the analytic shapes scores against the prompt and the seam ratio at
    the SSR's window edges (None for a video too still to measure, or one sampled whole)."""
    scores = score_video(video, prompt)
    seam = video_quality.seam_ratio(video[None], edges) if edges else float("nan")
    return {**{k: v for k, v in scores.items() if isinstance(v, (bool, int, float, str))
               or v is None},
            "seam_ratio": None if not np.isfinite(seam) else seam}


def run_pipeline(pipeline_config: ConfigDict, out: str, prompts: Sequence[str] | None = None,
                 seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """Samples every (prompt, seed) through both stages; writes per video an mp4, a gif, a PNG
    contact sheet (base and final rows) and a metrics JSON, and summary.json for all."""
    from lumiere_jax.sampling import check_prompts, slug, write_sample

    prompts = list(prompts or pipeline_config.prompts)
    seeds = list(seeds if seeds is not None else pipeline_config.seeds)
    check_prompts(prompts)
    items = [(p, s) for p in prompts for s in seeds]
    start = time.perf_counter()
    pipe = TextToVideoPipeline.from_config(pipeline_config)
    load_seconds = time.perf_counter() - start
    start = time.perf_counter()
    low, high = pipe([p for p, _ in items], [s for _, s in items], progress=True)
    seconds = time.perf_counter() - start
    world, edges = world_from_config(pipe.ssr_config), pipe.window_edges
    out_dir = epath.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    videos = []
    for i, ((prompt, seed), base, final) in enumerate(zip(items, low, high)):
        stem = out_dir / f"{i:03d}_{slug(prompt)}_seed{seed}"
        sheet = video_io.contact_sheet([base, final], labels=[f"base: {prompt}", "SSR"],
                                       max_frames=world.num_frames)
        files = write_sample(stem, final, world.fps, sheet=sheet)
        metrics = {"prompt": prompt, "seed": seed, "files": files,
                   "base": video_metrics(base, prompt, edges),
                   "final": video_metrics(final, prompt, edges)}
        (epath.Path(f"{stem}_metrics.json")).write_text(json.dumps(metrics, indent=1))
        videos.append(metrics)
    summary = {"n": len(items), "load_seconds": load_seconds, "sample_seconds": seconds,
               "base_model": pipeline_config.base.model, "ssr_model": pipeline_config.ssr.model,
               "window_edges": list(edges), "videos": videos}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
