"""`make demo`: the whole system on the built-in world, from nothing to scored samples.

Uses the small exported models shipped in the repo's checkpoints/ folder (made by the repo's
own training commands, recipe in checkpoints/README.md); where one is missing it trains it on
the spot with its config. Then it samples held-out and seen prompts, writes images/videos and
contact sheets, scores them with the analytic evaluator, and prints where everything is.
"""

from __future__ import annotations

import json
import time

from etils import epath

import lumiere_jax
from lumiere_jax import config as config_lib
from lumiere_jax.sampling import evaluate, sample_to_files
from lumiere_jax.train.export import export_model, is_export
from lumiere_jax.train.trainer import restore_model, train

REPO = epath.Path(lumiere_jax.__file__).parent.parent
STAGES = (("shapes_t2i", "configs/shapes_t2i.py"),)
DEMO_PROMPTS = ("a large red circle moving right on a black background",
                "a small yellow square moving up on a white background",
                "a large blue triangle moving left on a gray background")


def ensure_model(name: str, config_file: str, workdir: epath.Path) -> str:
    """The export directory of a stage: the shipped one, or one trained now into workdir."""
    shipped = REPO / "checkpoints" / name
    if is_export(str(shipped)):
        return str(shipped)
    print(f"[demo] no shipped model at {shipped}: training {config_file} (this takes a while)")
    config = config_lib.load_config(str(REPO / config_file))
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
    summary = {}
    for name, config_file in STAGES:
        start = time.perf_counter()
        model_dir = ensure_model(name, config_file, out)
        config = config_lib.read_resolved_config(model_dir)
        samples = sample_to_files(config, model_dir, DEMO_PROMPTS, [0, 1], [config.sample.guidance],
                                  out=str(out / name / "samples"))
        report = evaluate(config, model_dir, out=str(out / name / "eval"))
        summary[name] = {"model": model_dir, "samples": str(out / name / "samples"),
                         "contact_sheets": report["files"],
                         "seen": _short(report["summary"]["test"]),
                         "held_out": _short(report["summary"]["heldout"]),
                         "wall_seconds": round(time.perf_counter() - start, 1)}
        print(f"[demo] {name}: wrote {len(samples)} sample files and contact sheets")
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"[demo] everything is in {out}; summary: {out / 'demo_summary.json'}")
    return summary


def _short(scores: dict) -> dict:
    keys = ("n", "colour_acc", "shape_acc", "motion_acc", "stability", "sample_seconds")
    return {k: (round(scores[k], 3) if isinstance(scores.get(k), float) else scores.get(k))
            for k in keys}
