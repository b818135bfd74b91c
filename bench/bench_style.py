"""Stylised generation against the style strength alpha: `python -m bench.bench_style
--style STYLE_EXPORT [--video checkpoints/shapes_stunet] [--num 24] [--sheet PNG]`.

For each alpha in --alphas (default 0, 0.25, 0.5, 0.75, 1) the STUNet's spatial weights are
blended towards the style image model (lumiere_jax.apps.style) and the same prompts (the first
--num captions of the world's 'test' split) are sampled with the same seeds (1000 + i),
DDIM at the video model's config steps (20), guidance 3. Each alpha is scored with the style
score (lumiere_jax.eval.style, stripe amplitude in RGB units) and the analytic evaluator's
colour / shape / motion accuracy and stability. Ground-truth clips of the same captions,
plain and styled, are scored too, for reference. Prints a markdown table and JSON; --sheet
writes a contact sheet (rows: the first prompts at each alpha, the styled truth on top).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from flax import nnx

from lumiere_jax.apps import style
from lumiere_jax.config import read_resolved_config
from lumiere_jax.data import video_io
from lumiere_jax.data.pipeline import world_from_config
from lumiere_jax.data.synthetic import ShapesSource
from lumiere_jax.eval.shapes import score_batch
from lumiere_jax.eval.style import style_scores
from lumiere_jax.sampling import load_generator


def _scores(videos: np.ndarray, prompts: list[str]) -> dict[str, float]:
    shapes = score_batch(videos, prompts)
    return {**style_scores(videos), **{k: shapes[k] for k in (
        "colour_acc", "shape_acc", "motion_acc", "background_acc", "stability")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--style", required=True, help="the fine-tuned image model (export "
                        "or run of configs/shapes_style.py)")
    parser.add_argument("--video", default="checkpoints/shapes_stunet")
    parser.add_argument("--num", type=int, default=24)
    parser.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--sheet", default=None, help="write a contact sheet PNG here")
    parser.add_argument("--sheet_rows", type=int, default=3)
    args = parser.parse_args()

    config = read_resolved_config(args.video)
    world = world_from_config(config)
    plain_truth = ShapesSource(world, "test", args.num)
    styled_truth = ShapesSource(world, "test", args.num, style="stripes")
    prompts = [plain_truth[i]["caption"] for i in range(args.num)]
    seeds = [1000 + i for i in range(args.num)]
    rows = {"truth, plain": _scores(np.stack([plain_truth[i]["video"]
                                               for i in range(args.num)]), prompts)}
    styled = np.stack([styled_truth[i]["video"] for i in range(args.num)])
    rows["truth, stripes"] = _scores(styled, prompts)

    generator, _ = load_generator(config, args.video)
    video_model = nnx.merge(generator.graphdef, generator.state)
    style_model = style.load_model(args.style)
    samples = {}
    for alpha in (float(a) for a in args.alphas.split(",")):
        generator.with_params(style.stylised_params(video_model, style_model, alpha))
        start = time.perf_counter()
        samples[alpha] = generator(prompts, seeds, args.guidance)
        seconds = time.perf_counter() - start
        rows[f"alpha {alpha:g}"] = {**_scores(samples[alpha], prompts), "seconds": seconds}

    print("| model | style score (mean) | colour | shape | motion | stability |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['style_mean']:.1f} | {r['colour_acc']:.0%} | {r['shape_acc']:.0%} "
              f"| {r['motion_acc']:.0%} | {r['stability']:.3f} |")
    print(json.dumps({"num": args.num, "seeds": [seeds[0], seeds[-1]], "rows": rows}, indent=1))

    if args.sheet:
        videos, labels = [], []
        for i in range(min(args.sheet_rows, args.num)):
            videos.append(styled[i])
            labels.append(f"style (truth): {prompts[i]}")
            for alpha, batch in samples.items():
                videos.append(batch[i])
                labels.append(f"alpha {alpha:g}")
        video_io.write_png(args.sheet, video_io.contact_sheet(videos, labels=labels,
                                                              max_frames=8))
        print(f"contact sheet: {args.sheet}")


if __name__ == "__main__":
    main()
