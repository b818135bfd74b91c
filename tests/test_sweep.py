"""Sampling sweeps: exact resume after kill -9, adoption of unrecorded items, the CSV, plots and
HTML index (checked in headless Chromium), a video model, and clear errors for bad input."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lumiere_jax import sweep as sweep_lib
from lumiere_jax.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
T2I = REPO / "checkpoints" / "shapes_t2i"
GRID = REPO / "configs" / "sweeps" / "shapes_grid.py"
SPEC = f"{GRID}:model={T2I},steps=2"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _config(*overrides: str, spec: str = SPEC):
    return load_config(spec, list(overrides))


def _sweep_process(out: Path, log: Path, *, slow: bool) -> subprocess.Popen:
    """The CLI's entry point in a fresh interpreter, output to `log`.{out,err}; `slow` pauses
    inside every item's staging (after its sample is written, before it is renamed into
    place), so a kill lands mid-item."""
    code = textwrap.dedent(f"""
        import time
        import lumiere_jax.sampling as sampling
        if {slow}:
            write = sampling.write_sample
            def write_slowly(*args, **kwargs):
                paths = write(*args, **kwargs)
                time.sleep(0.4)
                return paths
            sampling.write_sample = write_slowly
        from lumiere_jax.sweep import cli_main
        cli_main({SPEC!r}, ["batch_size=1"], {str(out)!r})
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": os.environ.get(
               "LUMIERE_TEST_JAX_CACHE", "/tmp/lumiere_jax_test_cache")}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's run would have
    with open(f"{log}.out", "w") as stdout, open(f"{log}.err", "w") as stderr:
        return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=stdout,
                                stderr=stderr)


def _manifest_ids(out: Path) -> list[str]:
    path = out / "manifest.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


def _snapshot(folders: list[Path]) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime_ns) of every file in the folders."""
    files = {}
    for folder in folders:
        for path in sorted(folder.iterdir()):
            files[f"{folder.name}/{path.name}"] = (hashlib.sha256(path.read_bytes()).hexdigest(),
                                                   path.stat().st_mtime_ns)
    return files


def _assert_same_sample(a: Path, b: Path) -> None:
    """One item's sample from two runs. The killed run had one device and these tests have
    eight; as the sweep's docstring says, XLA may round a float's last bit differently in a
    program compiled for another device count, which can move a rare pixel by one level (on an
    AVX2-only CPU, one value of 3072 in one item of 12)."""
    x, y = (np.asarray(Image.open(path), np.int16) for path in (a, b))
    assert x.shape == y.shape
    diff = np.abs(x - y)
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 4, (a, b, diff.max())


def _item_folders(out: Path) -> list[Path]:
    return sorted(p for p in (out / "items").iterdir() if not p.name.startswith("."))


def _summary_of(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"): stdout.rindex("}") + 1])


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A 12-item sweep killed with SIGKILL after >= 3 items, then rerun to completion."""
    root = tmp_path_factory.mktemp("sweep")
    out = root / "grid"
    first = _sweep_process(out, root / "first", slow=True)
    deadline = time.monotonic() + 120
    while len(_manifest_ids(out)) < 3:
        if first.poll() is not None:
            pytest.fail("the first sweep run ended before it was killed:\n"
                        + (root / "first.err").read_text()[-3000:])
        if time.monotonic() > deadline:
            first.kill()
            pytest.fail("the first sweep run finished no 3 items in 120 s")
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL
    finished = _item_folders(out)
    state = {"out": out, "manifest_after_kill": _manifest_ids(out), "finished": finished,
             "snapshot": _snapshot(finished),
             "tmp_after_kill": [p.name for p in (out / "items").glob(".tmp-*")]}
    second = _sweep_process(out, root / "second", slow=False)
    assert second.wait(timeout=300) == 0, (root / "second.err").read_text()[-3000:]
    state["summary"] = _summary_of((root / "second.out").read_text())
    return state


def test_killed_sweep_resumes_exactly(resumed):
    out, items = resumed["out"], sweep_lib.expand_items(_config())
    assert 3 <= len(resumed["manifest_after_kill"]) < 12, "the kill did not land midway"
    folders = _item_folders(out)
    assert [p.name for p in folders] == [i["id"] for i in items]
    ids = _manifest_ids(out)
    assert len(ids) == 12 and sorted(ids) == sorted(set(ids)) == [i["id"] for i in items]
    # The first run's finished files were neither resampled nor rewritten.
    assert resumed["snapshot"] and _snapshot(resumed["finished"]) == resumed["snapshot"]
    summary = resumed["summary"]
    assert summary["done_now"] == 12 - len(resumed["finished"])
    assert summary["skipped"] == len(resumed["finished"]) and summary["missing"] == 0
    assert summary["removed"] == len(resumed["tmp_after_kill"])
    assert not list((out / "items").glob(".tmp-*"))
    for folder in folders:
        metrics = json.loads((folder / "metrics.json").read_text())
        assert set(metrics["files"]) == {"sample.png"}
        assert {"colour_ok", "shape_ok", "stability"} <= set(metrics["scores"])
        assert metrics["axes"]["steps"] == 2 and metrics["seconds"] > 0


def test_batching_is_exact_and_adoption_rewrites_nothing(resumed, tmp_path):
    """The killed-and-resumed items, sampled one per call, equal the same items sampled 12 per
    call; a folder the manifest missed is adopted as it is; staging debris is removed; a torn
    last manifest line is dropped; a lost item is sampled again, the same."""
    batched = tmp_path / "batched"
    summary = sweep_lib.run_sweep(_config("batch_size=12"), str(batched), progress=False)
    assert summary["done_now"] == 12
    for folder in _item_folders(resumed["out"]):
        _assert_same_sample(folder / "sample.png", batched / "items" / folder.name / "sample.png")

    out = tmp_path / "copy"
    shutil.copytree(resumed["out"], out, copy_function=shutil.copy2)
    items = sweep_lib.expand_items(_config())
    adopted, lost = items[4]["id"], items[7]["id"]
    lines = (out / "manifest.jsonl").read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["id"] not in (adopted, lost)]
    (out / "manifest.jsonl").write_text("".join(kept) + '{"id": "000')  # killed mid-append
    lost_png = tmp_path / "lost.png"
    shutil.copy(out / "items" / lost / "sample.png", lost_png)
    shutil.rmtree(out / "items" / lost)
    stale = [out / "items" / f".tmp-{lost}-999999", out / "items" / f".tmp-{adopted}-1"]
    for folder in stale:
        folder.mkdir()
        (folder / "sample.png").write_bytes(b"half")
    before = _snapshot([out / "items" / adopted])

    summary = sweep_lib.run_sweep(_config(), str(out), progress=False)
    assert (summary["done_now"], summary["adopted"], summary["removed"]) == (1, 1, 2)
    assert summary["skipped"] == 11
    assert _snapshot([out / "items" / adopted]) == before
    _assert_same_sample(out / "items" / lost / "sample.png", lost_png)
    assert not any(folder.exists() for folder in stale)
    ids = _manifest_ids(out)
    assert len(ids) == len(set(ids)) == 12 and set(ids) == {i["id"] for i in items}
    assert (out / "manifest.jsonl").read_text().endswith("\n")


def test_csv_index_and_plots(resumed):
    out, items = resumed["out"], sweep_lib.expand_items(_config())
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [i["id"] for i in items]
    assert {"model", "steps", "prompt", "seed", "guidance", "colour_ok", "shape_ok",
            "stability"} <= set(rows[0])
    assert rows[1]["prompt"] == items[1]["prompt"] and float(rows[1]["guidance"]) == 3.0
    page = (out / "index.html").read_text()
    for item in items:
        assert f'src="items/{item["id"]}/sample.png"' in page
    for axis in sweep_lib.AXES:
        plot = out / "plots" / f"{axis}.png"
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="plots/{axis}.png"' in page
    record = json.loads((out / "sweep.json").read_text())
    assert record["items"] == items and record["config"]["seeds"] == [0, 1, 2]


def test_index_in_headless_chromium(resumed):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("this test needs Playwright for Python: pip install playwright (no "
                    "`playwright install`: it drives Debian's Chromium)")
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"this test needs Chromium at {CHROMIUM}: apt-get install -y chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto((resumed["out"] / "index.html").as_uri())
            page.wait_for_load_state("load")
            images = page.evaluate("Array.from(document.images, i => [i.getAttribute('src'), "
                                   "i.complete, i.naturalWidth])")
            cells = page.locator("table.grid td").count()
            rows = page.locator("table.grid tr").count()
        finally:
            browser.close()
    assert len(images) == 12 + len(sweep_lib.AXES)
    broken = [src for src, complete, width in images if not (complete and width > 0)]
    assert not broken, f"images that did not load: {broken}"
    assert cells == 12 and rows == 2 + 2  # two header rows, a row per prompt


def test_video_model_sweep(tmp_path):
    """A tiny random-weight STUNet: each item gets an mp4, a gif and a contact sheet, the index
    shows the sheet, and motion is scored."""
    import flax

    from lumiere_jax.models.denoiser import build_denoiser
    from lumiere_jax.train.export import export_model

    config = load_config(f"{REPO}/configs/shapes_stunet.py:smoke", [
        "world.num_frames=8", "world.height=16", "world.width=16", "model.unet.channels=8",
        "model.unet.channel_mult=(1, 2)", "model.unet.attention_levels=(1,)", "init_from="])
    model_dir = tmp_path / "video_model"
    export_model(build_denoiser(config, flax.nnx.Rngs(0)), config, str(model_dir), step=0,
                 source="test")
    sweep_config = _config("seeds=(0, 1)", "guidance=(2.0,)", "batch_size=2",
                           "prompts=('a small red circle moving left on a black background',)",
                           spec=f"{GRID}:model={model_dir},steps=1")
    out = tmp_path / "sweep"
    summary = sweep_lib.run_sweep(sweep_config, str(out), progress=False)
    assert (summary["items"], summary["done_now"], summary["missing"]) == (2, 2, 0)
    page = (out / "index.html").read_text()
    for folder in _item_folders(out):
        metrics = json.loads((folder / "metrics.json").read_text())
        assert set(metrics["files"]) == {"sample.mp4", "sample.gif", "sample_sheet.png"}
        assert all((folder / name).stat().st_size == size
                   for name, size in metrics["files"].items())
        assert metrics["scores"]["motion_ok"] is not None
        assert f'src="items/{folder.name}/sample_sheet.png"' in page


def test_expand_items_order_ids_and_prompt_file(tmp_path):
    items = sweep_lib.expand_items(_config())
    assert len(items) == 12 and [i["index"] for i in items] == list(range(12))
    assert [(i["seed"], i["guidance"]) for i in items[:4]] == [(0, 1.0), (0, 3.0), (1, 1.0),
                                                              (1, 3.0)]
    assert len({i["id"] for i in items}) == 12
    assert items == sweep_lib.expand_items(_config())  # ids are stable
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na large red circle moving right on a black background\n\n"
                       "a small yellow square moving up on a white background\n")
    from_file = sweep_lib.expand_items(_config(spec=f"{SPEC},prompts=@{prompts}"))
    assert from_file == items
    more = sweep_lib.expand_items(_config("steps=(2, 4)"))
    assert more[:12] == items and len(more) == 24  # steps is an outer axis
    swapped = sweep_lib.expand_items(_config("guidance=(3.0, 1.0)"))
    assert swapped[1]["guidance"] == items[0]["guidance"]
    assert swapped[1]["id"] != items[0]["id"]  # the position is part of the id


@pytest.mark.parametrize("overrides, message", [
    (["guidance=(1.0, -2.0)"], "guidance scale >= 0"),
    (["seeds=()"], "the axis is empty"),
    (["seeds=(0, 1, 0)"], "repeated value"),
    (["steps=(0,)"], "int >= 1"),
    (["batch_size=0"], "batch_size"),
    (["prompts=('a red circle wobbling left',)"], "wobbling"),
    (["prompts=@/no/such/prompts.txt"], "does not exist"),
])
def test_bad_sweep_configs_are_clear_errors(overrides, message, tmp_path):
    config = _config(*[o for o in overrides if not o.startswith("prompts=@")],
                     spec=SPEC + "".join(f",{o}" for o in overrides if o.startswith("prompts=@")))
    with pytest.raises(ValueError, match=message):
        sweep_lib.run_sweep(config, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_unknown_key_and_missing_model_are_refused(tmp_path):
    from ml_collections import ConfigDict

    config = ConfigDict(_config().to_dict())
    config.promts = ("a red circle",)
    with pytest.raises(ConfigError, match="unknown key.*promts"):
        sweep_lib.expand_items(config)
    with pytest.raises(FileNotFoundError, match="neither an exported model"):
        sweep_lib.run_sweep(_config(spec=f"{GRID}:model={tmp_path},steps=2"),
                            str(tmp_path / "out"), progress=False)
    ssr = tmp_path / "ssr_run"
    ssr.mkdir()
    (ssr / "config.json").write_text('{"model": {"kind": "ssr"}}')
    with pytest.raises(ConfigError, match="is an SSR"):
        sweep_lib.run_sweep(_config(spec=f"{GRID}:model={ssr},steps=2"), str(tmp_path / "out"),
                            progress=False)
    with pytest.raises(ConfigError, match="unknown config key"):
        _config("sedes=(1,)")


def test_other_sweep_in_same_dir_is_refused_and_dir_is_locked(resumed, tmp_path):
    out = tmp_path / "out"
    (out / "items").mkdir(parents=True)
    shutil.copy(resumed["out"] / "sweep.json", out / "sweep.json")
    with pytest.raises(ConfigError, match="different sweep .*12 items there, 8 in this config"):
        sweep_lib.run_sweep(_config("seeds=(0, 1)"), str(out), progress=False)
    with pytest.raises(ConfigError, match="different sweep .*item 1 was"):
        sweep_lib.run_sweep(_config("guidance=(1.0, 4.0)"), str(out), progress=False)
    assert not (out / "manifest.jsonl").exists()
    with sweep_lib._DirLock(sweep_lib.epath.Path(out), 0):
        with pytest.raises(ValueError, match="another sweep process is running"):
            sweep_lib.run_sweep(_config(), str(out), progress=False)


def test_processes_split_the_items(resumed, tmp_path):
    """Process i of n samples the items with index % n == i; only process 0 appends to the
    manifest and writes the summary, adopting the other processes' items."""
    out = tmp_path / "split"
    second = sweep_lib.run_sweep(_config(), str(out), progress=False, process_index=1,
                                 process_count=2)
    assert (second["owned"], second["done_now"]) == (6, 6) and "missing" not in second
    assert not (out / "manifest.jsonl").exists() and not (out / "index.html").exists()
    first = sweep_lib.run_sweep(_config(), str(out), progress=False, process_index=0,
                                process_count=2)
    assert (first["owned"], first["done_now"], first["missing"]) == (6, 6, 0)
    ids = _manifest_ids(out)
    assert ids[:6] == [i["id"] for i in sweep_lib.expand_items(_config())[::2]]
    assert sorted(ids) == [p.name for p in _item_folders(resumed["out"])]
    for folder in _item_folders(resumed["out"]):  # the same samples as one process made
        _assert_same_sample(folder / "sample.png", out / "items" / folder.name / "sample.png")
    with pytest.raises(ValueError, match="process_index 2 is not in"):
        sweep_lib.run_sweep(_config(), str(out), process_index=2, process_count=2)
