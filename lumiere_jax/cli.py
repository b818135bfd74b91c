"""The `lumiere` command: one absl app with subcommands.

  lumiere train  --config configs/shapes_t2i.py --workdir runs/t2i [--config.train.steps=100]
                 [--coordinator_address host:port --num_processes N --process_id I]
  lumiere sample --workdir runs/t2i --prompts "a red circle moving left" --seeds 0,1
  lumiere eval   --workdir runs/t2i
  lumiere export --workdir runs/t2i --out checkpoints/shapes_t2i
  lumiere demo   --workdir demo_out
  lumiere plan   --config configs/lumiere_base.py --mesh data=8,fsdp=8,tensor=1 --device_memory_gib 95
  lumiere data synth --out shards/train --num 1024 [--split train]
  lumiere data import --videos DIR --captions captions.csv --out shards/mine
  lumiere t5 convert --src path/to/hf_or_t5x --out t5_ckpt [--preset t5-v1_1-xxl]

A run's resolved config lives in its workdir, so commands after `train` need only --workdir
(a --config given to them must match the run's, overrides included).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from lumiere_jax import config as config_lib

CONFIG = config_lib.define_config_flags()
flags.adopt_module_key_flags(config_lib)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of a run: config, checkpoints, "
                               "metrics, samples.")
_PROMPTS = flags.DEFINE_multi_string("prompts", None, "Prompts to sample (repeat the flag for "
                                     "several), or @FILE with one prompt per line.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds; every prompt is sampled with every seed.")
_GUIDANCE = flags.DEFINE_list("guidance", None, "Classifier-free guidance scales (default: the "
                              "config's sample.guidance); every combination is sampled.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_PER_FRAME = flags.DEFINE_bool(
    "per_frame", False, "eval: score the per-frame baseline instead (the run's init_from image "
    "model on every frame independently, same prompts, seeds and noise).")
_NUM = flags.DEFINE_integer("num", 8, "How many items (data synth).")
_SPLIT = flags.DEFINE_string("split", "train", "Split of the built-in world (data synth).")
_SRC = flags.DEFINE_string("src", None, "Source checkpoint (t5 convert).")
_VIDEOS = flags.DEFINE_string("videos", None, "Folder of video files (data import).")
_CAPTIONS = flags.DEFINE_string("captions", None, "Captions .csv or .jsonl (data import).")
_WORKERS = flags.DEFINE_integer("workers", None, "Worker processes (default: one per core).")
_PRESET = flags.DEFINE_string("preset", None, "T5 preset name (t5 convert).")
_MESH = flags.DEFINE_string("mesh", None, "Mesh sizes for `plan`, e.g. data=8,fsdp=8,tensor=1 "
                            "(-1 = the rest; default: the config's mesh).")
_DEVICE_GIB = flags.DEFINE_float("device_memory_gib", None, "Memory of one device for `plan`; "
                                 "a plan that does not fit is refused.")
_LAYOUT = flags.DEFINE_enum("layout", "auto", ["auto", "hf", "t5x"], "Checkpoint layout.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process `train`: host:port of process 0 (default: "
    "JAX_COORDINATOR_ADDRESS, or auto-detected on Cloud TPU / SLURM / Open MPI).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process `train`: how many.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process `train`: this one's id.")

COMMANDS = ("train", "sample", "eval", "export", "demo", "plan", "data synth", "data import",
            "t5 convert")


def _run_config():
    """The config of this command: --config if given, else the resolved config of --workdir."""
    if CONFIG.spec.value:
        return config_lib.config_from_flags(CONFIG.spec.value, CONFIG.overrides.value)
    if _WORKDIR.value and config_lib.resolved_config_path(_WORKDIR.value).exists():
        if CONFIG.overrides.value:
            raise app.UsageError("--config.* overrides need --config")
        return config_lib.read_resolved_config(_WORKDIR.value)
    raise app.UsageError("give --config FILE.py[:ARG] (or --workdir of a trained run)")


def _require(flag, command: str):
    if flag.value is None:
        raise app.UsageError(f"`lumiere {command}` needs --{flag.name}")
    return flag.value


def _prompts() -> list[str]:
    from etils import epath
    prompts = []
    for p in _PROMPTS.value or []:
        if p.startswith("@"):
            path = epath.Path(p[1:])
            if not path.exists():
                raise app.UsageError(f"prompt file {path} does not exist")
            prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        else:
            prompts.append(p)
    if not prompts:
        raise app.UsageError("no prompts: pass --prompts TEXT (repeatable) or --prompts @FILE")
    return prompts


def cmd_train():
    from lumiere_jax.parallel import distributed
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from lumiere_jax.train.trainer import train
    metrics = train(_run_config(), _require(_WORKDIR, "train"))
    import jax
    if jax.process_index() == 0:
        print(json.dumps(metrics, indent=1))


def cmd_sample():
    from lumiere_jax.sampling import sample_to_files
    config = _run_config()
    guidance = ([float(g) for g in _GUIDANCE.value] if _GUIDANCE.value
                else [config.sample.guidance])
    paths = sample_to_files(config, _require(_WORKDIR, "sample"), _prompts(),
                            [int(s) for s in _SEEDS.value], guidance, step=_STEP.value,
                            out=_OUT.value)
    print("\n".join(paths))


def cmd_eval():
    from lumiere_jax.sampling import evaluate, evaluate_per_frame
    config, workdir = _run_config(), _require(_WORKDIR, "eval")
    if _PER_FRAME.value:
        report = evaluate_per_frame(config, _OUT.value or f"{workdir}/eval_per_frame")
    else:
        report = evaluate(config, workdir, step=_STEP.value, out=_OUT.value)
    print(json.dumps(report["summary"], indent=1))


def cmd_export():
    from lumiere_jax.train.export import export_model
    from lumiere_jax.train.trainer import restore_model
    config, workdir = _run_config(), _require(_WORKDIR, "export")
    model, step = restore_model(config, workdir, _STEP.value)
    info = export_model(model, config, _require(_OUT, "export"), step=step, source=workdir)
    print(json.dumps(info, indent=1))


def cmd_plan():
    from lumiere_jax import plan as plan_lib
    config = _run_config()
    mesh = plan_lib.parse_mesh_text(_MESH.value) if _MESH.value else None
    try:
        report = plan_lib.plan(config, mesh, _DEVICE_GIB.value)
    except plan_lib.PlanDoesNotFitError as e:
        print(plan_lib.format_plan(e.report))
        print(f"REFUSED: {e}")
        sys.exit(1)
    except plan_lib.PlanError as e:
        raise app.UsageError(str(e)) from None
    print(plan_lib.format_plan(report))


def cmd_demo():
    from lumiere_jax.demo import run_demo
    run_demo(_WORKDIR.value or "demo_out")


def _world():
    from lumiere_jax.data.synthetic import ShapesWorld
    if CONFIG.spec.value or _WORKDIR.value:
        return ShapesWorld(**_run_config().world.to_dict())
    return ShapesWorld()


def cmd_data_synth():
    """Shards of the built-in world, plus gif previews and a contact sheet of the first clips."""
    from lumiere_jax.data.shards import write_synthetic_shards
    from lumiere_jax.sampling import write_synthetic_previews
    out, world = _require(_OUT, "data synth"), _world()
    manifest = write_synthetic_shards(out, world, _SPLIT.value, _NUM.value)
    previews = write_synthetic_previews(f"{out}/previews", min(_NUM.value, 8), _SPLIT.value,
                                        world)
    print(json.dumps({"records": manifest.get("num_records"), "out": out,
                      "previews": previews[-1]}, indent=1))


def cmd_data_import():
    from lumiere_jax.data.importer import import_videos
    world = _world()
    report = import_videos(_require(_VIDEOS, "data import"), _require(_CAPTIONS, "data import"),
                           _require(_OUT, "data import"), num_frames=world.num_frames,
                           height=world.height, width=world.width, fps=world.fps,
                           workers=_WORKERS.value)
    print(json.dumps(report, indent=1, default=str))


def cmd_t5_convert():
    from lumiere_jax.text.checkpoints import convert_checkpoint
    report = convert_checkpoint(_require(_SRC, "t5 convert"), _require(_OUT, "t5 convert"),
                                preset=_PRESET.value, layout=_LAYOUT.value)
    print(json.dumps(report, indent=1, default=str))


def main(argv):
    words = argv[1:]
    command = " ".join(words)
    handlers = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval,
                "export": cmd_export, "demo": cmd_demo, "plan": cmd_plan,
                "data synth": cmd_data_synth, "data import": cmd_data_import,
                "t5 convert": cmd_t5_convert}
    if command not in handlers:
        raise app.UsageError(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
    try:
        handlers[command]()
    except config_lib.ConfigError as e:
        raise app.UsageError(str(e)) from None


def run():
    logging.set_verbosity(logging.WARNING)
    app.run(main, argv=sys.argv, flags_parser=config_lib.absl_flags_parser)


if __name__ == "__main__":
    run()
