r"""A sampling sweep over the shipped text-to-image model: 2 prompts x 3 seeds x 2 guidance
scales at 20 DDIM steps, 12 images, each written and scored against its prompt.

Run (2 CPU cores: about 25 s, most of it loading and compiling):
  lumiere sweep --config configs/sweeps/shapes_grid.py --out sweeps/shapes_grid
Then open sweeps/shapes_grid/index.html: a row per prompt, a column per (seed, guidance), the
per-axis plots under it; sweeps/shapes_grid/metrics.csv has every item's scores. Rerunning the
same command (after a crash or a kill too) samples only the items not finished yet.

Expected result (measured): colour right in 12/12 images, shape in 10/12.

Variants (`--config configs/sweeps/shapes_grid.py:ARG`), any key=value of:
  model=DIR   another model: an export (checkpoints/NAME) or a training run directory;
  steps=N     sampler steps;
  prompts=@FILE  prompts from a file, one per line.
Any key can be overridden too, e.g. `--config.seeds=(0,1,2,3) --config.batch_size=4`; a
tuple of models (`--config.model="('checkpoints/a', 'runs/b')"`) or of steps is one more axis.
"""

from ml_collections import ConfigDict

from lumiere_jax.config import parse_config_arg


def get_config(arg: str | None = None) -> ConfigDict:
    arg = parse_config_arg(arg, model="checkpoints/shapes_t2i", steps=20, prompts="")
    c = ConfigDict()
    c.model = arg.model  # a model directory, or a tuple of them (an axis)
    c.prompts = arg.prompts or ("a large red circle moving right on a black background",
                                "a small yellow square moving up on a white background")
    c.seeds = (0, 1, 2)
    c.guidance = (1.0, 3.0)
    c.steps = (arg.steps,)
    c.batch_size = 12  # items sampled per call (same model and steps); any value is exact
    c.devices = 0  # local devices each call is split over (0: all; the batch is rounded up)
    return c
