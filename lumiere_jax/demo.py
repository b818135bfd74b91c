"""`make demo`: the whole system on the built-in world, from nothing to scored samples.

Uses the small exported models shipped in the repo's checkpoints/ folder (made by the repo's
own training commands, recipe in checkpoints/README.md); where one is missing it trains it on
the spot with its config, in the recipe's order (the STUNet is inflated from the text-to-image
model). Then:
  1. the text-to-image model (stage 0) samples the demo prompts and is scored on seen and
     held-out captions;
  2. the full pipeline (STUNet base video -> SSR with MultiDiffusion) samples the demo prompts
     into mp4/gif/contact sheets with per-video metrics, and is scored on seen and held-out
     captions (DEMO_EVAL_SAMPLES of each) with the analytic evaluator.
It prints where everything is and writes demo_summary.json.
"""

from __future__ import annotations

import json
import time

from etils import epath
from ml_collections import ConfigDict

import lumiere_jax
from lumiere_jax import config as config_lib
from lumiere_jax.eval import video_quality
from lumiere_jax.pipeline import TextToVideoPipeline, run_pipeline
from lumiere_jax.sampling import evaluate, evaluate_generator, sample_to_files
from lumiere_jax.train.export import export_model, is_export
from lumiere_jax.train.trainer import restore_model, train

REPO = epath.Path(lumiere_jax.__file__).parent.parent
# name, config; each stage's config refers to the previous stage's export by its shipped path.
STAGES = (("shapes_t2i", "configs/shapes_t2i.py"), ("shapes_stunet", "configs/shapes_stunet.py"),
          ("shapes_ssr", "configs/shapes_ssr.py"))
DEMO_EVAL_SAMPLES = 16
DEMO_PROMPTS = ("a large red circle moving right on a black background",
                "a small yellow square moving up on a white background",
                "a large blue triangle moving left on a gray background")


def ensure_model(name: str, config_file: str, workdir: epath.Path,
                 exports: dict[str, str] | None = None) -> str:
    """The export directory of a stage: the shipped one, or one trained now into workdir
    (a stage inflated from an earlier one uses that stage's export in `exports`)."""
    shipped = REPO / "checkpoints" / name
    if is_export(str(shipped)):
        return str(shipped)
    print(f"[demo] no shipped model at {shipped}: training {config_file} (this takes a while)")
    config = config_lib.load_config(str(REPO / config_file))
    source = config.get("init_from")
    if source:
        with config.unlocked():
            config.init_from = (exports or {}).get(epath.Path(source).name, source)
    run = workdir / "runs" / name
    train(config, str(run))
    exported = workdir / "models" / name
    if not is_export(str(exported)):
        model, step = restore_model(config, str(run))
        export_model(model, config, str(exported), step=step, source=str(run))
    return str(exported)


def run_demo(workdir: str) -> dict:
    out = epath.Path(workdir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    exports: dict[str, str] = {}
    for name, config_file in STAGES:
        exports[name] = ensure_model(name, config_file, out, exports)
    summary = {}

    start = time.perf_counter()
    t2i = exports["shapes_t2i"]
    config = config_lib.read_resolved_config(t2i)
    samples = sample_to_files(config, t2i, DEMO_PROMPTS, [0, 1], [config.sample.guidance],
                              out=str(out / "shapes_t2i" / "samples"))
    report = evaluate(config, t2i, out=str(out / "shapes_t2i" / "eval"))
    summary["shapes_t2i"] = {"model": t2i, "samples": str(out / "shapes_t2i" / "samples"),
                             "contact_sheets": report["files"],
                             "seen": _short(report["summary"]["test"]),
                             "held_out": _short(report["summary"]["heldout"]),
                             "wall_seconds": round(time.perf_counter() - start, 1)}
    print(f"[demo] text-to-image: wrote {len(samples)} images and contact sheets")

    start = time.perf_counter()
    pipeline_config = config_lib.load_config(
        str(REPO / "configs" / "pipeline_shapes.py"),
        [f"base.model={exports['shapes_stunet']}", f"ssr.model={exports['shapes_ssr']}"])
    videos = run_pipeline(pipeline_config, str(out / "text_to_video" / "samples"),
                          prompts=DEMO_PROMPTS, seeds=[0, 1])
    report = evaluate_pipeline(TextToVideoPipeline.from_config(pipeline_config),
                               str(out / "text_to_video" / "eval"), DEMO_EVAL_SAMPLES)
    summary["text_to_video"] = {
        "models": [exports["shapes_stunet"], exports["shapes_ssr"]],
        "samples": str(out / "text_to_video" / "samples"),
        "videos": [v["files"][0] for v in videos["videos"]],
        "contact_sheets": report["files"],
        "seen": _short(report["summary"]["test"]),
        "held_out": _short(report["summary"]["heldout"]),
        "wall_seconds": round(time.perf_counter() - start, 1)}
    print(f"[demo] text-to-video: wrote {len(videos['videos'])} videos (mp4, gif, contact "
          f"sheets, metrics)")
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"[demo] everything is in {out}; summary: {out / 'demo_summary.json'}")
    return summary


def evaluate_pipeline(pipe: TextToVideoPipeline, out: str, num_samples: int) -> dict:
    """The analytic scores of the pipeline's final videos on num_samples seen and held-out
    captions (sampling.evaluate_generator with the pipeline as the generator), and each
    split's seam ratio at the SSR's window edges (None when one window covers the clip): of
    the final videos, and of their base videos at the same frames (the base model's own
    frame-to-frame jumps there, which the SSR inherits)."""
    config = ConfigDict(pipe.ssr_config.to_dict())
    config.eval.num_samples = num_samples
    config.sample.guidance = pipe.base_config.sample.guidance
    outputs = []

    def generate(prompts, seeds, guidance):
        outputs.append(pipe(prompts, seeds, base_guidance=guidance, progress=True))
        return outputs[-1][1]

    report = evaluate_generator(generate, config, out, "pipeline")
    edges = pipe.window_edges
    for split, (base, final) in zip(("test", "heldout"), outputs):
        scores = report["summary"][split]
        scores["seam_ratio"] = video_quality.seam_ratio(final, edges) if edges else None
        scores["seam_ratio_base"] = video_quality.seam_ratio(base, edges) if edges else None
    (epath.Path(out) / "step_pipeline.json").write_text(json.dumps(report, indent=1))
    return report


def _short(scores: dict) -> dict:
    keys = ("n", "colour_acc", "shape_acc", "motion_acc", "stability", "seam_ratio",
            "seam_ratio_base", "sample_seconds")
    return {k: (round(scores[k], 3) if isinstance(scores.get(k), float) else scores.get(k))
            for k in keys}
