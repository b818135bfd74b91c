"""Sampling speed of the text-to-video pipeline: `python -m bench.bench_sample [--steps 25]`.

Samples with the shipped tiny models (checkpoints/shapes_stunet -> checkpoints/shapes_ssr,
MultiDiffusion windows of 8 frames overlapping by 2) at `--steps` DDIM steps per stage, for
batches of 1 and 4 prompts. Compilation and a warm-up call are excluded; each time is the
median of `--runs` calls. Prints a markdown table: seconds per batch and per video, and
output frames per second, for the base stage, the SSR stage and both.

`--variants`: instead, seconds per video (batch 4, guidance 3) of each text-to-video variant
of the README's comparison, side by side in one process: the per-frame image model, the
STUNet without temporal down/up-sampling, the STUNet, and the full pipeline. Sampling time
depends on the architecture, not the weights: the ablation is timed as inflated from the
image model, untrained.
"""

from __future__ import annotations

import argparse

from bench.timing import median_seconds
from lumiere_jax.config import load_config
from lumiere_jax.pipeline import TextToVideoPipeline
from lumiere_jax.sampling import inflated_generator, per_frame_generator

PROMPTS = ("a large red circle moving right on a black background",
           "a small yellow square moving up on a white background",
           "a large blue triangle moving left on a gray background",
           "a small green circle moving down on a black background")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--variants", action="store_true")
    args = parser.parse_args()
    config = load_config("configs/pipeline_shapes.py",
                         [f"base.steps={args.steps}", f"ssr.steps={args.steps}"])
    pipe = TextToVideoPipeline.from_config(config)
    if args.variants:
        return variants(pipe, args.runs)
    frames = pipe.ssr.sample_shape[0]
    print("| batch | stage | seconds per batch | seconds per video | frames/s |")
    print("|---|---|---|---|---|")
    for batch in (1, 4):
        prompts, seeds = list(PROMPTS[:batch]), list(range(batch))
        low = pipe.base(prompts, seeds, config.base.guidance)
        stages = {
            "base (16x32x32)": lambda: pipe.base(prompts, seeds, config.base.guidance),
            "SSR (16x64x64)": lambda: pipe.ssr(prompts, seeds, config.ssr.guidance, low_res=low),
            "both": lambda: pipe(prompts, seeds),
        }
        for name, fn in stages.items():
            seconds = median_seconds(fn, runs=args.runs)
            print(f"| {batch} | {name} | {seconds:.2f} | {seconds / batch:.2f} | "
                  f"{batch * frames / seconds:.1f} |")


def variants(pipe: TextToVideoPipeline, runs: int) -> None:
    base_config = pipe.base_config
    image = base_config.init_from
    prompts, seeds, guidance = list(PROMPTS), list(range(len(PROMPTS))), 3.0
    rows = {
        "per-frame image model": per_frame_generator(base_config, image),
        "STUNet without temporal down/up-sampling": inflated_generator(
            base_config, image, temporal_sampling_levels=()),
        "STUNet": pipe.base,
        "full pipeline (STUNet, then SSR)": lambda p, s, g: pipe(p, s, base_guidance=g),
    }
    print("| variant | seconds per video |\n|---|---|")
    for name, generate in rows.items():
        seconds = median_seconds(lambda: generate(prompts, seeds, guidance), runs=runs)
        print(f"| {name} | {seconds / len(prompts):.2f} |")


if __name__ == "__main__":
    main()
