"""Exported models: the EMA weights of a run and its config, nothing else.

An export is small (no optimizer state, no history) and self-describing, so the repo can ship
the tiny models that `make demo` samples from, and `lumiere sample/eval --workdir EXPORT`
works on an export as on a training run.
"""

from __future__ import annotations

import json

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from ml_collections import ConfigDict

from lumiere_jax import config as config_lib
from lumiere_jax.models.denoiser import Denoiser, build_denoiser
from lumiere_jax.models.inflate import SAME_NAME_RULES, inflate
from lumiere_jax.models.unet import UNet
from lumiere_jax.train.checkpoint import tree_checksum

PARAMS_DIR = "params"
INFO_FILE = "export.json"


def is_export(directory: str) -> bool:
    return (epath.Path(directory) / INFO_FILE).exists()


def export_model(model: Denoiser, config: ConfigDict, out_dir: str, *, step: int,
                 source: str) -> dict:
    """Writes `model`'s parameters and `config` to `out_dir` (which must not exist yet)."""
    out = epath.Path(out_dir).absolute()
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out / PARAMS_DIR, params)
    checkpointer.wait_until_finished()
    config_lib.write_resolved_config(config, out)
    info = {"step": step, "source": source, "checksum": tree_checksum(params),
            "num_params": sum(x.size for x in jax.tree.leaves(params))}
    (out / INFO_FILE).write_text(json.dumps(info, indent=1))
    return info


def load_export(directory: str) -> tuple[ConfigDict, Denoiser, dict]:
    """(config, model, info) of an export; the weights are checked against the checksum."""
    path = epath.Path(directory).absolute()
    if not is_export(str(path)):
        raise FileNotFoundError(f"{path} is not an exported model (no {INFO_FILE}); make one "
                                "with `lumiere export --workdir RUN --out DIR`")
    info = json.loads((path / INFO_FILE).read_text())
    config = config_lib.read_resolved_config(path)
    model = nnx.eval_shape(lambda: build_denoiser(config, nnx.Rngs(0)))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    params = ocp.StandardCheckpointer().restore(path / PARAMS_DIR, abstract)
    if tree_checksum(params) != info["checksum"]:
        raise ValueError(f"the weights in {path / PARAMS_DIR} do not match the checksum in "
                         f"{INFO_FILE}: the export is damaged; export it again")
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return config, model, info


def inflate_from_export(model: Denoiser, directory: str, new_params: str = r"$^",
                        unused_params: str = r"$^") -> dict:
    """Initialises `model` in place from an export.

    From an image model into a STUNet: inflation (spatial weights by name, `net/temporal` new).
    From a model of the same kind (e.g. a STUNet into a STUNet that adds conditioning inputs,
    an image model into one fine-tuned for a style): every parameter by its own name; those
    matching `new_params` (a regex over paths) may be absent and keep their initialisation;
    the export's parameters matching `unused_params` may have no place in `model` (e.g. the
    temporal down/up-sampling kernels when starting the ablation without them) and are left out.
    """
    config, source_model, _ = load_export(directory)
    source = nnx.to_pure_dict(nnx.state(source_model, nnx.Param))
    if type(source_model.net) is UNet and type(model.net) is not UNet:
        return inflate(model, source, where=directory)
    return inflate(model, source, rules=SAME_NAME_RULES, new_params=new_params,
                   unused_params=unused_params, where=f"{directory} (a {config.model.kind} model)")
