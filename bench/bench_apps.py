"""Image-to-video both ways, and SDEdit, measured: `python -m bench.bench_apps [--video
checkpoints/shapes_stunet] [--masked checkpoints/shapes_stunet_masked] [--num 24]
[--only i2v|sdedit|sdedit_inverted|sdedit_region|sdedit_resample]`.

Image-to-video: the first frame of each of the first --num ground-truth clips of the world's
'test' split is the given image; the clip's caption is the prompt; seeds 1000 + i. Three ways,
on the same prompts and seeds: the training-free way with the plain STUNet (known pixels
replaced at every step), the conditional STUNet seeing the masked video ("model"), and both.
Reported: PSNR of the output's frame 0 against the image, and the analytic evaluator's colour /
shape / motion accuracy and stability; guidance 3 unless --i2v_guidance, one take per
sampler step unless --i2v_resample.

SDEdit: each clip is edited with a prompt that changes only its colour (to the next colour of
the world), at the strengths and guidance scales of SDEDIT_SETTINGS, with the empty caption in
guidance's second branch or the clip's own caption as the negative prompt, starting from the
clip noised with the seed's noise or from its DDIM inversion under its own caption, over the
whole clip or only in its automatic region (editing.edit_region, DiffEdit's mask, the rest
kept), with one or several takes per sampler step (RePaint's resampling). Reported: colour
accuracy against the new prompt (and against the old one), motion accuracy, how far the
object's track moved (the mean distance between the input's and the output's centroids per
frame, as a fraction of the frame's short side), and the evaluator's stability (speckled fills
score low).
"""

from __future__ import annotations

import argparse
import json
import warnings
from typing import NamedTuple

import numpy as np

from lumiere_jax.apps import editing
from lumiere_jax.config import read_resolved_config
from lumiere_jax.data.pipeline import world_from_config
from lumiere_jax.data.synthetic import COLOURS, ShapesSource
from lumiere_jax.eval import video_quality
from lumiere_jax.eval.shapes import detect, score_batch
from lumiere_jax.sampling import load_generator

KEYS = ("colour_acc", "shape_acc", "motion_acc", "stability")


class Edit(NamedTuple):
    """One SDEdit setting measured."""
    strength: float
    guidance: float
    negative: bool  # the input's caption as the negative prompt (else the empty caption)
    invert: bool = False  # from the input's DDIM inversion under its caption
    region: bool = False  # only in the automatic region (edit_regions)
    resample: int = 1  # takes per sampler step (RePaint's resampling)
    conditional: bool = False  # the conditional STUNet, also shown the kept pixels ("both")


SDEDIT_SETTINGS = (
    Edit(0.5, 3.0, False), Edit(0.5, 3.0, True), Edit(0.5, 6.0, True), Edit(0.5, 10.0, True),
    Edit(0.6, 3.0, False), Edit(0.6, 3.0, True), Edit(0.6, 6.0, True), Edit(0.7, 3.0, False),
    Edit(0.7, 3.0, True), Edit(0.9, 3.0, False), Edit(0.9, 3.0, True),
    Edit(0.5, 1.0, False, invert=True), Edit(0.5, 2.0, True, invert=True),
    Edit(0.5, 3.0, True, invert=True), Edit(0.7, 3.0, True, invert=True),
    Edit(0.9, 3.0, True, invert=True),
    Edit(0.5, 3.0, True, region=True), Edit(0.5, 10.0, True, region=True),
    Edit(0.5, 25.0, True, region=True), Edit(0.7, 3.0, True, region=True),
    Edit(1.0, 3.0, True, region=True),
    Edit(0.5, 3.0, True, region=True, resample=5), Edit(0.5, 10.0, True, region=True, resample=5),
    Edit(0.5, 15.0, True, region=True, resample=5), Edit(0.5, 25.0, True, region=True, resample=5),
    Edit(0.5, 10.0, True, region=True, conditional=True),
    Edit(0.5, 15.0, True, region=True, conditional=True),
    Edit(0.5, 15.0, True, region=True, resample=5, conditional=True))


def _generator(directory: str):
    return load_generator(read_resolved_config(directory), directory)[0]


def image_to_video(plain, masked, clips: np.ndarray, prompts: list[str], seeds: list[int],
                   guidance: float = 3.0, resample: int = 1) -> dict[str, dict[str, float]]:
    ways = {"replace (training-free, plain STUNet)": (plain, "replace")}
    if masked is not None:
        ways["model (conditional STUNet)"] = (masked, "model")
        ways["both (conditional STUNet)"] = (masked, "both")
    rows = {}
    for name, (generator, how) in ways.items():
        videos = np.stack([
            editing.image_to_video(generator, clip[0], prompt, [seed], guidance,
                                   conditioning=how, resample=resample)[0]
            for clip, prompt, seed in zip(clips, prompts, seeds)])
        scores = score_batch(videos, prompts)
        psnr = video_quality.psnr(videos[:, :1], clips[:, :1])
        rows[name] = {"frame0_psnr": float(np.mean(psnr)), **{k: scores[k] for k in KEYS}}
    return rows


def _recoloured(prompt: str) -> tuple[str, str]:
    colours = list(COLOURS)
    for i, colour in enumerate(colours):
        if f" {colour} " in f" {prompt} ":
            new = colours[(i + 1) % len(colours)]
            return f" {prompt} ".replace(f" {colour} ", f" {new} ").strip(), new
    raise ValueError(f"no colour in {prompt!r}")


def edit_regions(generator, clips: np.ndarray, prompts: list[str], seeds: list[int]
                 ) -> np.ndarray:
    """Each clip's automatic region (editing.edit_region) for its recolouring edit."""
    return np.stack([editing.edit_region(generator, clip, _recoloured(old)[0], old, seed=seed)
                     for clip, old, seed in zip(clips, prompts, seeds)])


def sdedit(generator, clips: np.ndarray, prompts: list[str], seeds: list[int], edit: Edit,
           regions: np.ndarray | None = None) -> dict[str, float]:
    """The scores of one setting; regions: the clips' automatic regions (edit_regions), read
    if edit.region."""
    new_prompts = [_recoloured(p)[0] for p in prompts]
    videos = np.stack([
        editing.sdedit(generator, clip, new, edit.strength, [seed], edit.guidance,
                       negative_prompt=old if edit.negative else "", invert=edit.invert,
                       source_prompt=old if edit.invert else "",
                       region=regions[i] if edit.region else None,
                       resample=edit.resample,
                       conditioning="both" if edit.conditional else "replace")[0]
        for i, (clip, new, old, seed) in enumerate(zip(clips, new_prompts, prompts, seeds))])
    new = score_batch(videos, new_prompts)
    old = score_batch(videos, prompts)
    moved = []
    for clip, video in zip(clips, videos):
        a, b = detect(clip)["trajectory"], detect(video)["trajectory"]
        with warnings.catch_warnings():  # no object found in any frame: NaN, left out below
            warnings.simplefilter("ignore", RuntimeWarning)
            moved.append(float(np.nanmean(np.linalg.norm(a - b, axis=-1))))
    return {"strength": edit.strength, "guidance": edit.guidance, "inverted": edit.invert,
            "region": "automatic" if edit.region else "all", "resample": edit.resample,
            "model": "conditional STUNet" if edit.conditional else "STUNet",
            "negative_prompt": "input's caption" if edit.negative else "",
            "colour_acc_new_prompt": new["colour_acc"],
            "colour_acc_old_prompt": old["colour_acc"], "motion_acc": new["motion_acc"],
            "track_shift": float(np.nanmean(moved)), "stability": new["stability"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", default="checkpoints/shapes_stunet")
    parser.add_argument("--masked", default="checkpoints/shapes_stunet_masked",
                        help="the conditional STUNet ('' to skip)")
    parser.add_argument("--num", type=int, default=24)
    parser.add_argument("--i2v_guidance", type=float, default=3.0,
                        help="image-to-video's guidance scale (the conditional model copies the "
                             "image best at 1)")
    parser.add_argument("--i2v_resample", type=int, default=1,
                        help="image-to-video's takes per sampling step (RePaint's resampling)")
    parser.add_argument("--only", choices=("i2v", "sdedit", "sdedit_inverted", "sdedit_region",
                                           "sdedit_resample", "sdedit_conditional"),
                        help="one of the two tables (sdedit_inverted / sdedit_region / "
                             "sdedit_resample / sdedit_conditional: its rows from the inversion "
                             "/ in the automatic region / with several takes per step / with "
                             "the conditional STUNet)")
    args = parser.parse_args()
    plain = _generator(args.video)
    wants_masked = args.only in (None, "i2v", "sdedit_conditional")
    masked = _generator(args.masked) if args.masked and wants_masked else None
    source = ShapesSource(world_from_config(read_resolved_config(args.video)), "test", args.num)
    items = [source[i] for i in range(args.num)]
    clips = np.stack([item["video"] for item in items])
    prompts = [item["caption"] for item in items]
    seeds = [1000 + i for i in range(args.num)]
    i2v = {} if args.only not in (None, "i2v") else image_to_video(
        plain, masked, clips, prompts, seeds, args.i2v_guidance, args.i2v_resample)
    subset = {"sdedit_inverted": lambda edit: edit.invert,
              "sdedit_region": lambda edit: edit.region,
              "sdedit_resample": lambda edit: edit.resample > 1,
              "sdedit_conditional": lambda edit: edit.conditional,
              }.get(args.only, lambda _: True)
    settings = [edit for edit in SDEDIT_SETTINGS
                if subset(edit) and (masked is not None or not edit.conditional)]
    regions = (edit_regions(plain, clips, prompts, seeds)
               if any(edit.region for edit in settings) and args.only != "i2v" else None)
    report = {"i2v": i2v, "sdedit": [] if args.only == "i2v" else [
        sdedit(masked if edit.conditional else plain, clips, prompts, seeds, edit, regions)
        for edit in settings]}
    print("| image-to-video | frame-0 PSNR (dB) | colour | shape | motion | stability |")
    print("|---|---|---|---|---|---|")
    for name, row in report["i2v"].items():
        print(f"| {name} | {row['frame0_psnr']:.1f} | {row['colour_acc']:.0%} | "
              f"{row['shape_acc']:.0%} | {row['motion_acc']:.0%} | {row['stability']:.3f} |")
    print("\n| SDEdit strength | model | from | region | takes per step | guidance | "
          "negative prompt | colour = new prompt | colour = old | motion | track shift | "
          "stability |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in report["sdedit"]:
        negative = row["negative_prompt"] or "(empty)"
        start = "inversion" if row["inverted"] else "noise"
        print(f"| {row['strength']} | {row['model']} | {start} | {row['region']} | "
              f"{row['resample']} | {row['guidance']:g} | {negative} | "
              f"{row['colour_acc_new_prompt']:.0%} | "
              f"{row['colour_acc_old_prompt']:.0%} | {row['motion_acc']:.0%} | "
              f"{row['track_shift']:.3f} | {row['stability']:.3f} |")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
