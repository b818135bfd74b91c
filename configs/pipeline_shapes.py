r"""The full text-to-video pipeline on the built-in world: STUNet base (16 frames at 32x32),
then the SSR to 64x64 with MultiDiffusion over 8-frame windows overlapping by 2.

Run (2 CPU cores, models shipped in checkpoints/ or exported from your own runs):
  lumiere sample --pipeline configs/pipeline_shapes.py --out pipeline_out
  lumiere sample --pipeline configs/pipeline_shapes.py --prompts "a small red circle moving \
      left on a black background" --seeds 0,1 --config.ssr.window=16

Writes per video: mp4, gif, a contact sheet (base and final rows) and a metrics JSON (the
analytic shapes scores and the seam ratio at the SSR's window edges); summary.json for all.

Variants: `:base=DIR,ssr=DIR` point at other models (exports or training run directories).
"""

from ml_collections import ConfigDict

from lumiere_jax.config import parse_config_arg


def get_config(arg: str | None = None) -> ConfigDict:
    arg = parse_config_arg(arg, base="checkpoints/shapes_stunet", ssr="checkpoints/shapes_ssr")
    c = ConfigDict()
    c.base = dict(model=arg.base, guidance=3.0, sampler="ddim", steps=20)
    c.ssr = dict(model=arg.ssr, guidance=1.0, sampler="ddim", steps=10, window=8, overlap=2,
                 window_weights="uniform", aug_time=0.1, low_res_consistency=True)
    c.prompts = ("a large red circle moving right on a black background",
                 "a small yellow square moving up on a white background",
                 "a large blue triangle moving left on a gray background")
    c.seeds = (0,)
    return c
