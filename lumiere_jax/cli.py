"""The `lumiere` command: one absl app with subcommands.

  lumiere train  --config configs/shapes_t2i.py --workdir runs/t2i [--config.train.steps=100]
                 [--coordinator_address host:port --num_processes N --process_id I]
  lumiere sample --workdir runs/t2i --prompts "a red circle moving left" --seeds 0,1
  lumiere sample --pipeline configs/pipeline_shapes.py --out pipeline_out   # base + SSR
  lumiere eval   --workdir runs/t2i [--fvd_weights i3d_kinetics400.npz]
  lumiere app i2v|inpaint|outpaint|cinemagraph|sdedit --workdir runs/stunet --prompts TEXT
                 [--image F] [--video F] [--box x0,y0,x1,y1 | --mask F] [--strength 0.5]
                 [--negative_prompt TEXT] [--invert] [--source_prompt TEXT [--auto_region]]
  lumiere app style --workdir runs/stunet --style STYLE_EXPORT --alpha 0,0.5,1 --prompts TEXT
  lumiere export --workdir runs/t2i --out checkpoints/shapes_t2i
  lumiere demo   --workdir demo_out
  lumiere sweep  --config configs/sweeps/shapes_grid.py --out sweeps/grid   # resumable
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
_PIPELINE = flags.DEFINE_string(
    "pipeline", None, "sample: a pipeline config FILE.py[:ARG] (base STUNet + SSR with "
    "MultiDiffusion); --config.KEY=VALUE overrides apply to it.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_PER_FRAME = flags.DEFINE_bool(
    "per_frame", False, "eval: score the per-frame baseline instead (the run's init_from image "
    "model on every frame independently, same prompts, seeds and noise).")
_FVD_WEIGHTS = flags.DEFINE_string(
    "fvd_weights", "", "eval: an I3D weights .npz (Kinetics-400 RGB, DeepMind variable names; "
    "see lumiere_jax/eval/fvd.py) to add FVD against the world's clips (default: no FVD).")
_IMAGE = flags.DEFINE_string("image", None, "app i2v/cinemagraph: the input image file.")
_VIDEO = flags.DEFINE_string("video", None, "app inpaint/outpaint/sdedit: the input video file.")
_BOX = flags.DEFINE_string("box", None, "app inpaint/cinemagraph/sdedit: the region "
                           "x0,y0,x1,y1 (pixels, or fractions of the frame).")
_MASK = flags.DEFINE_string("mask", None, "app inpaint/cinemagraph/sdedit: the region as a mask "
                            "image (white = region).")
_NEGATIVE = flags.DEFINE_string(
    "negative_prompt", "", "sample/app: a caption for guidance to steer away from, in place of "
    "the empty one (e.g. for sdedit the input video's own caption).")
_STRENGTH = flags.DEFINE_float("strength", 0.5, "app sdedit: how much to change, in [0, 1].")
_INVERT = flags.DEFINE_bool(
    "invert", False, "app sdedit: start from the input's DDIM inversion (under --source_prompt) "
    "instead of the input noised with the seed's noise; deterministic, keeps more motion.")
_SOURCE_PROMPT = flags.DEFINE_string(
    "source_prompt", "", "app sdedit --invert/--auto_region: the input video's caption, read by "
    "the inversion (default: the empty caption) and by the automatic region.")
_AUTO_REGION = flags.DEFINE_bool(
    "auto_region", False, "app sdedit: edit only where the model's estimates under the prompt "
    "and under --source_prompt differ (DiffEdit's mask, editing.edit_region); the rest of the "
    "input is kept exactly.")
_RESAMPLE = flags.DEFINE_integer(
    "resample", 1, "app i2v/inpaint/outpaint/cinemagraph/sdedit: take every sampler step this "
    "many times, re-noised in between (RePaint's resampling; that many times the model calls). "
    "E.g. 5 for a region edit at --strength 0.5 (README \"Applications\").",
    lower_bound=1)
_CONDITIONING = flags.DEFINE_enum(
    "conditioning", "replace", ["replace", "model", "both"],
    "app i2v/inpaint/outpaint/cinemagraph/sdedit (with a region): replace the known pixels at "
    "every step (any model), let a conditional model see them ('model'; "
    "configs/shapes_stunet.py:masked), or both.")
_STYLE = flags.DEFINE_string("style", None, "app style: the image model fine-tuned on the "
                             "style images (an export or a run of configs/shapes_style.py).")
_ALPHA = flags.DEFINE_list("alpha", ["1.0"], "app style: style strengths in [0, 1] (0: the "
                           "original model, 1: the fine-tuned spatial weights); each is sampled.")
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

APPS = ("i2v", "inpaint", "outpaint", "cinemagraph", "sdedit")
COMMANDS = ("train", "sample", "eval", "export", "demo", "sweep", "plan", "data synth",
            "data import", "t5 convert") + tuple(f"app {name}" for name in APPS) + ("app style",)


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
    if _PIPELINE.value:
        return _sample_pipeline()
    from lumiere_jax.sampling import sample_to_files
    config = _run_config()
    guidance = ([float(g) for g in _GUIDANCE.value] if _GUIDANCE.value
                else [config.sample.guidance])
    paths = sample_to_files(config, _require(_WORKDIR, "sample"), _prompts(),
                            [int(s) for s in _SEEDS.value], guidance, step=_STEP.value,
                            out=_OUT.value, negative_prompt=_NEGATIVE.value)
    print("\n".join(paths))


def _sample_pipeline():
    from lumiere_jax.pipeline import run_pipeline
    if CONFIG.spec.value or _WORKDIR.value:
        raise app.UsageError("--pipeline names the models itself: drop --config/--workdir "
                             "(--config.KEY=VALUE overrides apply to the pipeline config)")
    config = config_lib.config_from_flags(_PIPELINE.value, CONFIG.overrides.value)
    seeds = [int(s) for s in _SEEDS.value] if flags.FLAGS["seeds"].present else None
    summary = run_pipeline(config, _OUT.value or "pipeline_out",
                           _prompts() if _PROMPTS.value else None, seeds)
    for video in summary["videos"]:
        print(video["files"][0])
    print(f"summary: {_OUT.value or 'pipeline_out'}/summary.json")


def cmd_eval():
    from lumiere_jax.sampling import evaluate, evaluate_per_frame
    config, workdir = _run_config(), _require(_WORKDIR, "eval")
    if _PER_FRAME.value:
        report = evaluate_per_frame(config, _OUT.value or f"{workdir}/eval_per_frame",
                                    fvd_weights=_FVD_WEIGHTS.value or None)
    else:
        report = evaluate(config, workdir, step=_STEP.value, out=_OUT.value,
                          fvd_weights=_FVD_WEIGHTS.value or None)
    print(json.dumps(report["summary"], indent=1))


def cmd_app(name: str):
    """One application of a trained STUNet run or export; writes the videos like `sample`."""
    from etils import epath

    from lumiere_jax.apps import editing
    from lumiere_jax.sampling import check_prompts, load_generator, slug, write_sample
    config, workdir = _run_config(), _require(_WORKDIR, f"app {name}")
    prompts = _prompts()
    if len(prompts) != 1:
        raise app.UsageError(f"`lumiere app {name}` takes one prompt, got {len(prompts)}")
    check_prompts(prompts)
    prompt, seeds = prompts[0], [int(s) for s in _SEEDS.value]
    guidance = float(_GUIDANCE.value[0]) if _GUIDANCE.value else config.sample.guidance
    generator, _ = load_generator(config, workdir, _STEP.value)
    t, h, w = generator.sample_shape[:3]
    how, negative, resample = _CONDITIONING.value, _NEGATIVE.value, _RESAMPLE.value

    def region():
        if bool(_BOX.value) == bool(_MASK.value):
            raise app.UsageError(f"`lumiere app {name}` needs the region: --box or --mask")
        return (editing.box_region(_BOX.value, h, w) if _BOX.value
                else editing.read_region(_MASK.value, h, w))

    def video():
        from lumiere_jax.data.video_io import read_video
        if name == "outpaint":  # any smaller size: the canvas is the model's
            return read_video(_require(_VIDEO, f"app {name}"))[0][:t]
        return editing.read_clip(_require(_VIDEO, f"app {name}"), t, h, w)

    if name == "i2v":
        image = editing.read_image(_require(_IMAGE, "app i2v"), h, w)
        videos = editing.image_to_video(generator, image, prompt, seeds, guidance, how, negative,
                                        resample)
    elif name == "inpaint":
        videos = editing.inpaint(generator, video(), region(), prompt, seeds, guidance, how,
                                  negative, resample)
    elif name == "outpaint":
        videos = editing.outpaint(generator, video(), prompt, seeds, guidance, how, negative,
                                  resample)
    elif name == "cinemagraph":
        image = editing.read_image(_require(_IMAGE, "app cinemagraph"), h, w)
        videos = editing.cinemagraph(generator, image, region(), prompt, seeds, guidance, how,
                                      negative, resample)
    else:
        source = _SOURCE_PROMPT.value
        if source and not (_INVERT.value or _AUTO_REGION.value):
            raise app.UsageError("--source_prompt is the input's caption, read by the inversion "
                                 "or the automatic region: add --invert or --auto_region, or "
                                 "leave it out")
        if _AUTO_REGION.value and (not source or _BOX.value or _MASK.value):
            raise app.UsageError("--auto_region finds the region from the prompt and the "
                                 "input's caption: give --source_prompt, and no --box or --mask")
        clip, edit = video(), None
        if _AUTO_REGION.value:
            edit = editing.edit_region(generator, clip, prompt, source, seed=seeds[0])
        elif _BOX.value or _MASK.value:
            edit = region()
        videos = editing.sdedit(generator, clip, prompt, _STRENGTH.value, seeds, guidance,
                                 negative, invert=_INVERT.value,
                                 source_prompt=source if _INVERT.value else "", region=edit,
                                 resample=resample, conditioning=how)
    out = epath.Path(_OUT.value or f"{workdir}/apps/{name}")
    out.mkdir(parents=True, exist_ok=True)
    for seed, result in zip(seeds, videos):
        print("\n".join(write_sample(out / f"{slug(prompt)}_seed{seed}", result,
                                      config.world.fps)))


def cmd_app_style():
    """Stylised generation: the STUNet of --workdir with its spatial weights blended towards
    the --style image model by each --alpha; every prompt with every seed and alpha."""
    from etils import epath
    from flax import nnx

    from lumiere_jax.apps import style
    from lumiere_jax.sampling import check_prompts, load_generator, slug, write_sample
    config, workdir = _run_config(), _require(_WORKDIR, "app style")
    style_model = style.load_model(_require(_STYLE, "app style"))
    try:
        alphas = [style.check_alpha(float(a)) for a in _ALPHA.value]
    except ValueError as e:
        raise app.UsageError(f"--alpha: {e}") from None
    prompts = _prompts()
    check_prompts(prompts)
    seeds = [int(s) for s in _SEEDS.value]
    guidance = float(_GUIDANCE.value[0]) if _GUIDANCE.value else config.sample.guidance
    generator, _ = load_generator(config, workdir, _STEP.value)
    video_model = nnx.merge(generator.graphdef, generator.state)
    out = epath.Path(_OUT.value or f"{workdir}/apps/style")
    out.mkdir(parents=True, exist_ok=True)
    items = [(p, s) for p in prompts for s in seeds]
    for alpha in alphas:  # one compiled sampler: only the weights change
        generator.with_params(style.stylised_params(video_model, style_model, alpha))
        videos = generator([p for p, _ in items], [s for _, s in items], guidance)
        for (prompt, seed), result in zip(items, videos):
            print("\n".join(write_sample(out / f"{slug(prompt)}_seed{seed}_alpha{alpha:g}",
                                          result, config.world.fps)))


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


def cmd_sweep():
    from lumiere_jax.parallel import distributed
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from lumiere_jax.sweep import cli_main
    cli_main(_require(CONFIG.spec, "sweep"), CONFIG.overrides.value, _require(_OUT, "sweep"))


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
                "export": cmd_export, "demo": cmd_demo, "sweep": cmd_sweep, "plan": cmd_plan,
                "data synth": cmd_data_synth, "data import": cmd_data_import,
                "t5 convert": cmd_t5_convert,
                **{f"app {name}": (lambda name=name: cmd_app(name)) for name in APPS},
                "app style": cmd_app_style}
    if command not in handlers:
        raise app.UsageError(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
    try:
        handlers[command]()
    except config_lib.ConfigError as e:
        raise app.UsageError(str(e)) from None
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # Bad input (a prompt, a path, a setting): the message says what and where; a
        # traceback would bury it.
        print(f"lumiere {command}: error: {e}", file=sys.stderr)
        sys.exit(1)


def run():
    logging.set_verbosity(logging.WARNING)
    app.run(main, argv=sys.argv, flags_parser=config_lib.absl_flags_parser)


if __name__ == "__main__":
    run()
