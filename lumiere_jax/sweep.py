"""Batch sampling sweeps: every combination of models, steps, prompts, seeds and guidance scales
sampled once, written, scored, and summarised as a CSV, per-axis plots and an HTML index.

  lumiere sweep --config configs/sweeps/shapes_grid.py --out sweeps/grid

Exact and resumable. Each item (one video or image) is written to a private staging folder
`DIR/items/.tmp-<id>-<pid>/`, fsynced, renamed in one step to `DIR/items/<id>/`, and only then
recorded in `DIR/manifest.jsonl`. A rerun, after a crash or `kill -9`, skips every item in the
manifest and adopts every complete item folder the manifest missed (killed between the rename
and the append), so no item is sampled twice and no finished file is ever rewritten; staging
folders left by a killed run are removed. `DIR/sweep.json` records the sweep's resolved config
and item list, and a rerun whose items differ is refused: its files would mix two sweeps.
Only batch_size (and devices) may change between runs: with DDIM a (prompt, seed, guidance)
samples the same whatever else shares its batch; models with another sampler are sampled one
item per call.

Within a process, each batch is split over all its local devices (data-parallel sampling, the
model replicated on each; the optional key `devices` = k > 0 keeps it to the first k):
batch_size is rounded up to a multiple of the device count, so every call fills every device,
and a short last batch is padded with its last item (the padding is sampled, then dropped).
Each device computes its examples as one device would; as for another batch size, XLA may round
a float's last bit differently in a program compiled for another device count, which can move
a rare pixel by one level.

Several hosts (`jax.process_count() > 1`): process i samples the items whose index %
process_count == i; DIR must be one shared filesystem or a gs:// path seen by all of them.
Process 0 alone appends to the manifest and writes the summary (after a barrier); the others'
items reach the manifest by adoption. On gs://, where renames are not atomic, an item is staged
locally and copied file by file, metrics.json last; a folder whose files do not match the sizes
in its metrics.json is incomplete, and is removed and sampled again by its owner.
Run one sweep process per host and DIR at a time (a local DIR is locked to enforce that).
Exports load onto each process's local devices; a training run directory's loader
(restore_model) still assumes one JAX process, so for run directories run the hosts as
separate single-process jobs with `run_sweep(..., process_index=i, process_count=n)`, then
rerun process 0 (it samples nothing then) to write the summary of all items.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import itertools
import json
import math
import os
import shutil
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from etils import epath
from ml_collections import ConfigDict
from tqdm import tqdm

from lumiere_jax import config as config_lib
from lumiere_jax.config import ConfigError
from lumiere_jax.data.remote import is_remote, write_atomic

AXES = ("model", "steps", "prompt", "seed", "guidance")
CONFIG_KEYS = ("model", "prompts", "seeds", "guidance", "steps", "batch_size")
OPTIONAL_KEYS = {"devices": 0}  # key -> its value when a sweep config leaves it out
ITEMS_DIR = "items"
MANIFEST = "manifest.jsonl"
SWEEP_RECORD = "sweep.json"
METRICS_FILE = "metrics.json"
SAMPLE_STEM = "sample"
TMP_PREFIX = ".tmp-"
# Per-item marks averaged in the summary plots: attribute accuracies and frame stability.
SUMMARY_SCORES = ("colour_ok", "shape_ok", "size_ok", "motion_ok", "background_ok", "all_ok",
                  "stability", "persistence")


# ----------------------------------------------------------------------------------------------
# The item list.


def read_prompts(prompts: str | Sequence[str]) -> list[str]:
    """The prompts of a sweep: a tuple, or '@FILE' with one prompt per line ('#' comments and
    blank lines skipped)."""
    if isinstance(prompts, str):
        if not prompts.startswith("@"):
            raise ConfigError(f"sweep prompts: expected a tuple of prompts or '@FILE' (one prompt "
                              f"per line), got the string {prompts!r}")
        path = epath.Path(prompts[1:])
        if not prompts[1:] or not path.is_file():
            raise ConfigError(f"sweep prompts: prompt file {str(path)!r} does not exist")
        lines = (line.strip() for line in path.read_text().splitlines())
        return [line for line in lines if line and not line.startswith("#")]
    return list(prompts)


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _checked_axis(name: str, values: Sequence[Any], check, what: str) -> list[Any]:
    """`values` after checking it is non-empty, has no repeats, and every value passes."""
    values = list(values)
    if not values:
        raise ConfigError(f"sweep {name}: the axis is empty; give at least one value")
    for value in values:
        if not check(value):
            raise ConfigError(f"sweep {name}: {value!r} is not {what}")
    repeated = sorted({repr(v) for v in values if values.count(v) > 1})
    if repeated:
        raise ConfigError(f"sweep {name}: repeated value(s) {', '.join(repeated)}; each item "
                          "would be sampled twice")
    return values


def resolve_sweep(sweep_config: ConfigDict) -> dict[str, Any]:
    """The sweep's axes as plain lists (prompt file read), after checking every value."""
    from lumiere_jax.sampling import check_prompts

    keys = set(sweep_config.keys())
    unknown = sorted(keys - set(CONFIG_KEYS) - set(OPTIONAL_KEYS))
    missing = sorted(set(CONFIG_KEYS) - keys)
    if unknown:
        raise ConfigError(f"sweep config: unknown key(s) {', '.join(unknown)}; the keys are "
                          f"{', '.join((*CONFIG_KEYS, *OPTIONAL_KEYS))}")
    if missing:
        raise ConfigError(f"sweep config: missing key(s) {', '.join(missing)}")

    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    models = _checked_axis("model", _as_tuple(sweep_config.model),
                           lambda m: isinstance(m, str) and m.strip(), "a model directory")
    steps = _checked_axis("steps", _as_tuple(sweep_config.steps),
                          lambda s: is_int(s) and s >= 1, "an int >= 1")
    prompts = _checked_axis("prompts", read_prompts(sweep_config.prompts),
                            lambda p: isinstance(p, str), "a string")
    check_prompts(prompts)
    seeds = _checked_axis("seeds", _as_tuple(sweep_config.seeds), is_int, "an int")
    guidance = _checked_axis(
        "guidance", _as_tuple(sweep_config.guidance),
        lambda g: isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g)
        and g >= 0, "a guidance scale >= 0 (1 = no guidance)")
    batch_size = sweep_config.batch_size
    if not (is_int(batch_size) and batch_size >= 1):
        raise ConfigError(f"sweep batch_size: {batch_size!r} is not an int >= 1")
    devices = sweep_config.get("devices", OPTIONAL_KEYS["devices"])
    if not (is_int(devices) and devices >= 0):
        raise ConfigError(f"sweep devices: {devices!r} is not an int >= 0 (0: every local "
                          "device, k: the first k)")
    return {"model": models, "steps": steps, "prompts": prompts, "seeds": seeds,
            "guidance": [float(g) for g in guidance], "batch_size": batch_size,
            "devices": devices}


def item_id(index: int, axes: dict[str, Any]) -> str:
    """`00007_1a2b3c4d`: the position (sorts in sweep order) and a hash of the axis values, so
    an id names the same item in every run of the same sweep, and only that item."""
    key = json.dumps([axes[a] for a in AXES], ensure_ascii=False)
    return f"{index:05d}_{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def expand_items(sweep_config: ConfigDict) -> list[dict[str, Any]]:
    """Every item of the sweep in a fixed order: model, steps, prompt, seed, guidance (the last
    varies fastest). Each is {'id', 'index', 'model', 'steps', 'prompt', 'seed', 'guidance'}."""
    sweep = resolve_sweep(sweep_config)
    product = itertools.product(sweep["model"], sweep["steps"], sweep["prompts"], sweep["seeds"],
                                sweep["guidance"])
    items = []
    for index, values in enumerate(product):
        axes = dict(zip(AXES, values))
        items.append({"id": item_id(index, axes), "index": index, **axes})
    return items


# ----------------------------------------------------------------------------------------------
# Files: local ones are written with fsync and atomic renames; gs:// ones through epath.


def _fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_manifest(path: epath.Path, repair: bool) -> dict[str, dict[str, Any]]:
    """id -> manifest line. A last line cut short by a kill is dropped (and, with `repair`,
    truncated away, so the next append starts on a fresh line)."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if repair and complete != data and not is_remote(path):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
            os.fsync(f.fileno())
    entries = {}
    for line in complete.decode().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "id" in entry:
            entries[entry["id"]] = entry
    return entries


def _append_manifest(path: epath.Path, entries: Sequence[dict[str, Any]]) -> None:
    """Appends one JSON line per entry and fsyncs (on gs://, which cannot append, the object is
    rewritten whole; only process 0 writes it)."""
    if not entries:
        return
    data = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries).encode()
    if is_remote(path):
        path.write_bytes((path.read_bytes() if path.exists() else b"") + data)
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_size(path: epath.Path) -> int:
    return path.stat().length if is_remote(path) else os.path.getsize(path)


def _read_metrics(item_dir: epath.Path) -> dict[str, Any] | None:
    """An item folder's metrics.json if the folder is complete: it parses, names this item, and
    every sample file it lists is there with its recorded size. Else None."""
    try:
        metrics = json.loads((item_dir / METRICS_FILE).read_text())
        if metrics.get("id") != item_dir.name:
            return None
        for name, size in metrics["files"].items():
            if _file_size(item_dir / name) != size:
                return None
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    return metrics


class _DirLock:
    """An exclusive lock on a local sweep DIR for this process index: a second run on the same
    DIR fails at once instead of racing the first (the kernel drops it when a process dies)."""

    def __init__(self, out: epath.Path, process_index: int):
        self.out = out
        self.path = None if is_remote(out) else os.fspath(out / f".lock-p{process_index}")
        self.fd = None

    def __enter__(self):
        if self.path:
            import fcntl
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self.fd)
                raise ValueError(f"another sweep process is running on {self.out}; wait for "
                                   "it or use another --out") from None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock


# ----------------------------------------------------------------------------------------------
# Sampling.


def _json_scores(scores: dict[str, Any]) -> dict[str, Any]:
    """The scalar scores, NaN as None; plus all_ok (colour, shape and, where scored, motion)."""
    out = {}
    for key, value in scores.items():
        if isinstance(value, (np.generic,)):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        if value is None or isinstance(value, (bool, int, float, str)):
            out[key] = value
    out["all_ok"] = all(out.get(f"{k}_ok") is not False for k in ("colour", "shape", "motion"))
    return out


class _ModelGroup:
    """The generator of one (model, steps) pair, loaded only when it has items left to sample."""

    def __init__(self, model: str, steps: int, batch_size: int, devices: int = 0):
        from lumiere_jax.generate import sample_device_count
        from lumiere_jax.sampling import load_generator

        config = ConfigDict(config_lib.read_resolved_config(model).to_dict())
        config.sample.steps = steps
        # DDIM is deterministic given the seed's noise, so batching is exact; another sampler
        # draws noise from a per-batch key, so each item is sampled alone to stay exact.
        self.exact_batching = config.sample.sampler == "ddim"
        if self.exact_batching:  # a multiple of the devices each batch is split over
            config.sample.devices = sample_device_count(devices)
            self.batch_size = -(-batch_size // config.sample.devices) * config.sample.devices
        else:
            self.batch_size = 1
            config.sample.devices = 1  # one item per call: one device
        config.sample.batch_size = self.batch_size
        self.generator, self.checkpoint_step = load_generator(config, model)
        self.fps = float(config.world.fps)
        self.sampler = config.sample.sampler

    def sample(self, items: Sequence[dict[str, Any]]) -> np.ndarray:
        """Samples for `items`; a short batch is padded with its last item so every call has
        the same shape (one compilation) and is split evenly over the devices."""
        padded = list(items) + [items[-1]] * (self.batch_size - len(items))
        samples = self.generator([i["prompt"] for i in padded], [i["seed"] for i in padded],
                                 [i["guidance"] for i in padded])
        return samples[: len(items)]


def _write_item(items_dir: epath.Path, item: dict[str, Any], sample: np.ndarray,
                group: _ModelGroup, sample_seconds: float) -> dict[str, Any]:
    """Writes one item's samples and metrics.json into a staging folder and moves it into
    place in one rename (locally; see the module docstring for gs://). Returns the metrics."""
    from lumiere_jax.eval.shapes import score_video
    from lumiere_jax.sampling import write_sample

    start = time.perf_counter()
    local = not is_remote(items_dir)
    staging_root = os.fspath(items_dir) if local else tempfile.mkdtemp(prefix="lumiere_sweep_")
    staging = os.path.join(staging_root, f"{TMP_PREFIX}{item['id']}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    paths = write_sample(epath.Path(staging) / SAMPLE_STEM, sample, group.fps)
    names = [os.path.basename(p) for p in paths]
    scores = _json_scores(score_video(sample, item["prompt"]))
    metrics = {"id": item["id"], "index": item["index"],
               "axes": {a: item[a] for a in AXES}, "scores": scores,
               "checkpoint_step": group.checkpoint_step, "sampler": group.sampler,
               "sample_seconds": sample_seconds,
               "seconds": sample_seconds + time.perf_counter() - start,
               "files": {n: os.path.getsize(os.path.join(staging, n)) for n in names}}
    with open(os.path.join(staging, METRICS_FILE), "w") as f:
        json.dump(metrics, f, indent=1, ensure_ascii=False)
    final = items_dir / item["id"]
    if local:
        for name in (*names, METRICS_FILE):
            _fsync_path(os.path.join(staging, name))
        _fsync_path(staging, directory=True)
        os.rename(staging, final)  # atomic: the folder appears complete or not at all
        _fsync_path(os.fspath(items_dir), directory=True)
    else:
        final.mkdir(parents=True, exist_ok=True)
        for name in (*names, METRICS_FILE):  # metrics.json last: it marks the folder complete
            with open(os.path.join(staging, name), "rb") as f:
                (final / name).write_bytes(f.read())
        shutil.rmtree(staging_root, ignore_errors=True)
    return metrics


def _manifest_entry(metrics: dict[str, Any]) -> dict[str, Any]:
    return {"id": metrics["id"], "index": metrics["index"], **metrics["axes"],
            "seconds": round(metrics["seconds"], 4), "finished": time.time()}


def _chunks(items: Sequence[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


# ----------------------------------------------------------------------------------------------
# The run.


def _check_models(models: Sequence[str]) -> None:
    from lumiere_jax.train.export import is_export

    for model in models:
        if not (is_export(model) or config_lib.resolved_config_path(model).exists()):
            raise FileNotFoundError(f"sweep model {model!r} is neither an exported model nor a "
                                    "training run directory (no export.json or config.json)")
        if config_lib.read_resolved_config(model).model.kind == "ssr":
            raise ConfigError(f"sweep model {model!r} is an SSR, which upsamples a given video; "
                              "sweep a text-to-image or text-to-video model (the SSR: `lumiere "
                              "sample --pipeline`)")


def _check_or_write_record(out: epath.Path, record: dict[str, Any], writer: bool) -> None:
    """Refuses a DIR made by another sweep; records this one in a new DIR."""
    path = out / SWEEP_RECORD
    if path.exists():
        try:
            old_items = json.loads(path.read_text())["items"]
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{path} is unreadable ({e}); is {out} a sweep directory?") from None
        new_items = record["items"]
        if old_items != new_items:
            if len(old_items) != len(new_items):
                what = f"{len(old_items)} items there, {len(new_items)} in this config"
            else:
                k = next(i for i, (a, b) in enumerate(zip(old_items, new_items)) if a != b)
                what = (f"item {k} was {json.dumps(old_items[k], ensure_ascii=False)}, is now "
                        f"{json.dumps(new_items[k], ensure_ascii=False)}")
            raise ConfigError(f"{out} holds a different sweep ({what}); rerun it with the config "
                              f"in {path}, or use a new --out for this one")
    elif writer:
        write_atomic(path, (json.dumps(record, indent=1, ensure_ascii=False) + "\n").encode())


def _scan_items(items_dir: epath.Path, owned: dict[str, dict[str, Any]],
                in_manifest: set[str], remove: bool) -> tuple[list[dict[str, Any]], int]:
    """(metrics of complete folders of `owned` items missing from the manifest, how many stale
    staging or incomplete folders were removed). Only an item's owner removes its folders."""
    adopted, removed = [], 0
    if not items_dir.exists():
        return adopted, removed
    for entry in sorted(items_dir.iterdir(), key=lambda p: p.name):
        name = entry.name
        if name.startswith(TMP_PREFIX):
            item = name[len(TMP_PREFIX):].rsplit("-", 1)[0]
            if remove and item in owned:
                _remove_tree(entry)
                removed += 1
        elif name in owned and name not in in_manifest:
            metrics = _read_metrics(entry)
            if metrics is not None:
                adopted.append(metrics)
            elif remove:  # only on a non-atomic store (gs://): a copy cut short
                _remove_tree(entry)
                removed += 1
    return adopted, removed


def _remove_tree(path: epath.Path) -> None:
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.rmtree(missing_ok=True)


def run_sweep(sweep_config: ConfigDict, out_dir: str, progress: bool = True,
              process_index: int | None = None, process_count: int | None = None
              ) -> dict[str, Any]:
    """Samples, writes and scores every item of the sweep not finished yet, then (process 0)
    writes metrics.csv, plots/<axis>.png and index.html for all items.

    process_index, process_count: which share of the items to sample (default: this JAX
    process's); given explicitly, the processes need not be one JAX job (e.g. separate jobs
    on a shared DIR; process 0 must then run last, as it writes the summary).
    Returns {'items': all items, 'owned': this process's, 'done_now', 'skipped' (finished
    before this run), 'adopted' (found complete but not in the manifest), 'removed' (stale
    staging folders), 'seconds', 'out', and for process 0 'missing' (items with no folder)}.
    """
    import jax

    start = time.perf_counter()
    sweep = resolve_sweep(sweep_config)
    items = expand_items(sweep_config)
    _check_models(sweep["model"])
    rank = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= rank < count:
        raise ValueError(f"process_index {rank} is not in [0, process_count={count})")
    out = epath.Path(out_dir)
    items_dir = out / ITEMS_DIR
    items_dir.mkdir(parents=True, exist_ok=True)
    record = {"config": sweep, "items": items}
    with _DirLock(out, rank):
        _check_or_write_record(out, record, writer=rank == 0)
        owned = {i["id"]: i for i in items if i["index"] % count == rank}
        manifest = _read_manifest(out / MANIFEST, repair=rank == 0)
        adopted, removed = _scan_items(items_dir, owned, set(manifest), remove=True)
        if rank == 0:
            _append_manifest(out / MANIFEST, [_manifest_entry(m) for m in adopted])
        finished = (set(manifest) & set(owned)) | {m["id"] for m in adopted}
        pending = [i for i in owned.values() if i["id"] not in finished]
        bar = tqdm(total=len(owned), initial=len(finished), desc="sweep", unit="item",
                   disable=not progress)
        for (model, steps), group_items in itertools.groupby(
                pending, key=lambda i: (i["model"], i["steps"])):
            group = _ModelGroup(model, steps, sweep["batch_size"], sweep["devices"])
            for chunk in _chunks(list(group_items), group.batch_size):
                t0 = time.perf_counter()
                samples = group.sample(chunk)
                seconds = (time.perf_counter() - t0) / len(chunk)
                for item, sample in zip(chunk, samples):
                    metrics = _write_item(items_dir, item, sample, group, seconds)
                    if rank == 0:
                        _append_manifest(out / MANIFEST, [_manifest_entry(metrics)])
                    bar.update(1)
            del group
        bar.close()
    from lumiere_jax.parallel.distributed import barrier
    barrier("sweep_items_done")  # processes finish their shares minutes apart
    summary = {"items": len(items), "owned": len(owned), "done_now": len(pending),
               "skipped": len(finished), "adopted": len(adopted), "removed": removed,
               "out": os.fspath(out)}
    if rank == 0:
        if count > 1:  # the other processes' items reach the manifest here
            manifest = _read_manifest(out / MANIFEST, repair=True)
            everyone = {i["id"]: i for i in items}
            late, _ = _scan_items(items_dir, everyone, set(manifest), remove=False)
            _append_manifest(out / MANIFEST, [_manifest_entry(m) for m in late])
        summary["missing"] = write_summary(out, items)
    summary["seconds"] = time.perf_counter() - start
    return summary


# ----------------------------------------------------------------------------------------------
# Summary: metrics.csv, plots/<axis>.png, index.html.


def _collect(out: epath.Path, items: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """id -> metrics.json of every complete item folder."""
    found = {}
    for item in items:
        metrics = _read_metrics(out / ITEMS_DIR / item["id"])
        if metrics is not None:
            found[item["id"]] = metrics
    return found


def write_summary(out: epath.Path, items: Sequence[dict[str, Any]]) -> int:
    """Writes metrics.csv, plots/<axis>.png and index.html from the item folders; returns how
    many items have no complete folder (0 after a full run)."""
    found = _collect(out, items)
    _write_csv(out / "metrics.csv", items, found)
    plots = write_plots(out / "plots", items, found)
    write_atomic(out / "index.html", render_index(items, found, plots).encode())
    return len(items) - len(found)


def _write_csv(path: epath.Path, items: Sequence[dict[str, Any]],
               found: dict[str, dict[str, Any]]) -> None:
    score_keys = sorted({k for m in found.values() for k in m["scores"]})
    columns = ["id", "index", *AXES, "checkpoint_step", "seconds", *score_keys]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    for item in items:
        metrics = found.get(item["id"])
        if metrics is None:
            continue
        writer.writerow({"id": item["id"], "index": item["index"],
                         **{a: item[a] for a in AXES},
                         "checkpoint_step": metrics.get("checkpoint_step"),
                         "seconds": round(metrics["seconds"], 4),
                         **{k: _csv_value(metrics["scores"].get(k)) for k in score_keys}})
    write_atomic(path, buffer.getvalue().encode())


def _csv_value(value: Any) -> Any:
    return "" if value is None else value


def axis_means(items: Sequence[dict[str, Any]], found: dict[str, dict[str, Any]], axis: str
               ) -> dict[str, list[float | None]]:
    """score -> its mean per value of `axis` (values in sweep order; None where never scored).
    Booleans average to accuracies."""
    values = list(dict.fromkeys(i[axis] for i in items))
    means = {}
    for score in SUMMARY_SCORES:
        row = []
        for value in values:
            marks = [float(found[i["id"]]["scores"].get(score)) for i in items
                     if i[axis] == value and i["id"] in found
                     and found[i["id"]]["scores"].get(score) is not None]
            row.append(float(np.mean(marks)) if marks else None)
        if any(m is not None for m in row):
            means[score] = row
    return means


def _axis_label(axis: str, value: Any) -> str:
    if axis == "model":
        return os.path.basename(os.path.normpath(value)) or value
    if axis == "guidance":
        return f"{value:g}"
    return str(value)


def write_plots(plots_dir: epath.Path, items: Sequence[dict[str, Any]],
                found: dict[str, dict[str, Any]]) -> dict[str, str]:
    """plots/<axis>.png for every axis: grouped bars of each score's mean per axis value.
    Returns axis -> path relative to the sweep DIR."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for axis in AXES:
        values = list(dict.fromkeys(i[axis] for i in items))
        means = axis_means(items, found, axis)
        width_in = max(5.0, 1.5 + 0.25 * len(values) * max(1, len(means)))
        fig, ax = plt.subplots(figsize=(min(width_in, 16.0), 3.6), dpi=100)
        width = 0.8 / max(1, len(means))
        for k, (score, row) in enumerate(means.items()):
            xs = [x + (k - (len(means) - 1) / 2) * width for x in range(len(values))]
            ax.bar(xs, [np.nan if m is None else m for m in row], width,
                   label=score.removesuffix("_ok"))
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels(["\n".join(textwrap.wrap(_axis_label(axis, v), 22)) for v in values],
                           fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("mean (accuracy / stability)")
        ax.set_title(f"scores by {axis} ({len(found)} items)")
        if means:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", bbox_inches="tight")
        plt.close(fig)
        write_atomic(plots_dir / f"{axis}.png", buffer.getvalue())
        written[axis] = f"plots/{axis}.png"
    return written


def _caption(scores: dict[str, Any]) -> str:
    marks = []
    for key in ("colour", "shape", "size", "motion", "background"):
        ok = scores.get(f"{key}_ok")
        if ok is not None:
            marks.append(f"{key} {'✓' if ok else '✗'}")
    if scores.get("stability") is not None:
        marks.append(f"stab {scores['stability']:.2f}")
    return " · ".join(marks)


def _sheet_name(metrics: dict[str, Any]) -> str:
    """The file a cell shows: a video's contact sheet, or the image itself."""
    names = list(metrics["files"])
    return next((n for n in names if n.endswith("_sheet.png")),
                next((n for n in names if n.endswith(".png")), names[0]))


def _playable_name(metrics: dict[str, Any]) -> str:
    """The file a cell links to: a video's gif (it plays in any browser), or the image."""
    return next((n for n in metrics["files"] if n.endswith(".gif")), _sheet_name(metrics))


_STYLE = """
body { font: 13px system-ui, sans-serif; margin: 16px; background: #fafafa; color: #222; }
table { border-collapse: collapse; margin-bottom: 24px; }
th, td { border: 1px solid #ccc; padding: 4px; vertical-align: top; background: #fff; }
th { background: #eee; }
th.prompt { max-width: 180px; text-align: left; font-weight: normal; }
td img { min-width: 96px; image-rendering: pixelated; display: block; }
figure { margin: 0; } figcaption { font-size: 11px; max-width: 220px; }
td.missing { color: #a00; }
.plots img { max-width: 48%; margin: 4px; border: 1px solid #ccc; }
"""


def render_index(items: Sequence[dict[str, Any]], found: dict[str, dict[str, Any]],
                 plots: dict[str, str]) -> str:
    """A self-contained HTML page (inline CSS, relative image paths): per (model, steps) a table
    with a row per prompt and a column per (seed, guidance); then the summary plots."""
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8"><title>lumiere sweep</title>',
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>Sweep: {len(items)} items, {len(found)} finished</h1>"]
    groups = itertools.groupby(items, key=lambda i: (i["model"], i["steps"]))
    for (model, steps), group in groups:
        group = list(group)
        prompts = list(dict.fromkeys(i["prompt"] for i in group))
        seeds = list(dict.fromkeys(i["seed"] for i in group))
        scales = list(dict.fromkeys(i["guidance"] for i in group))
        by_axes = {(i["prompt"], i["seed"], i["guidance"]): i for i in group}
        parts.append(f"<h2>{esc(model)}, {steps} steps</h2><table class=\"grid\">")
        parts.append("<tr><th rowspan=\"2\">prompt</th>" + "".join(
            f"<th colspan=\"{len(scales)}\">seed {seed}</th>" for seed in seeds) + "</tr>")
        parts.append("<tr>" + "".join(f"<th>guidance {g:g}</th>" for _ in seeds for g in scales)
                     + "</tr>")
        for prompt in prompts:
            cells = []
            for seed, scale in itertools.product(seeds, scales):
                item = by_axes[(prompt, seed, scale)]
                metrics = found.get(item["id"])
                if metrics is None:
                    cells.append(f"<td class=\"missing\">{esc(item['id'])}: not sampled</td>")
                    continue
                folder = f"{ITEMS_DIR}/{item['id']}"
                src = f"{folder}/{_sheet_name(metrics)}"
                link = f"{folder}/{_playable_name(metrics)}"
                cells.append(
                    f"<td><figure><a href=\"{esc(link)}\">"
                    f"<img src=\"{esc(src)}\" alt=\"{esc(item['id'])}\"></a>"
                    f"<figcaption>{esc(_caption(metrics['scores']))}</figcaption></figure></td>")
            parts.append(f"<tr><th class=\"prompt\">{esc(prompt)}</th>{''.join(cells)}</tr>")
        parts.append("</table>")
    parts.append("<h2>Mean scores per axis</h2><div class=\"plots\">")
    parts += [f"<img src=\"{esc(path)}\" alt=\"scores by {esc(axis)}\">"
              for axis, path in plots.items()]
    parts.append("</div><p>Per item: <a href=\"metrics.csv\">metrics.csv</a>, "
                 f"<code>{ITEMS_DIR}/&lt;id&gt;/{METRICS_FILE}</code>.</p></body></html>")
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------
# Command line.


def cli_main(spec: str, overrides: Sequence[str], out: str) -> None:
    """`lumiere sweep --config FILE.py[:ARG] [--config.KEY=VALUE] --out DIR`."""
    import jax

    config = config_lib.config_from_flags(spec, list(overrides or ()))
    summary = run_sweep(config, out)
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=1))
        print(f"index: {os.path.join(out, 'index.html')}")
