"""gs:// run directories, configs, shards, checkpoints and sweeps against a local GCS emulator.

The emulator is `gcp-storage-emulator` (pure Python, in-process, in memory) on a free loopback
port with one bucket. Every library that touches gs:// is pointed at it by its own setting:

- gcsfs (behind etils.epath: configs, config.json, metrics.csv, PNGs, Orbax's directories):
  STORAGE_EMULATOR_HOST, anonymous credentials (fsspec's `token="anon"`), and gcsfs's plain
  GCSFileSystem. gcsfs's default ExtendedGcsFileSystem first asks the gRPC Storage Control API
  for the bucket's layout; no emulator serves it, so every call would wait out a 60 s timeout
  (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false selects the plain class in a fresh process).
- tensorstore (Orbax's array data, kvstore driver "gcs"): TENSORSTORE_GCS_HTTP_URL, and
  GOOGLE_AUTH_TOKEN_FOR_TESTING, which it uses instead of looking for credentials.
- ArrayRecord (Grain's shard reader, riegeli's GcsReader on google-cloud-cpp):
  CLOUD_STORAGE_EMULATOR_ENDPOINT, which also makes it send no credentials.
- google-cloud-storage (tensorboardX's gs:// event writer): STORAGE_EMULATOR_HOST, with which
  it uses anonymous credentials.
The GCE metadata server variables point at a closed loopback port, so no credential lookup can
leave the machine, and NO_PROXY keeps loopback requests off any proxy. Everything is restored
when this module's tests are done.

Two shims complete the emulator where the code under test needs it (see their docstrings):
downloads carry `x-goog-generation` and honour `ifGenerationNotMatch`/`ifGenerationMatch`
(tensorstore's OCDBT fails without them), and tensorboardX's gs:// writer does not upload again
at interpreter exit. Gaps left (not used by the code under test, checked by logging the
requests): uploads ignore `ifGenerationMatch` (tensorstore sends it with every OCDBT manifest
write; a conflict between two writers cannot be tested here), and listings ignore
`startOffset`/`endOffset` (tensorstore's `KvStore.list()` would return wrong keys).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
import uuid
from http import HTTPStatus
from pathlib import Path

import fsspec
import gcsfs.core
import jax
import numpy as np
import pytest
from etils import epath
from fsspec.registry import _registry as fsspec_registry
from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects as emulator_objects
from PIL import Image, ImageSequence
from tensorboardX import record_writer
from tensorboardX.proto import event_pb2

from lumiere_jax import sweep as sweep_lib
from lumiere_jax.config import load_config, read_resolved_config
from lumiere_jax.data.pipeline import training_dataset, world_from_config
from lumiere_jax.data.shards import (
    ShardSource,
    read_manifest,
    verify_shards,
    write_synthetic_shards,
)
from lumiere_jax.text.tokenizers import make_tokenizer
from lumiere_jax.train import trainer
from lumiere_jax.train.checkpoint import (
    Checkpointer,
    CheckpointMismatchError,
    FrozenRef,
    read_frozen,
    write_frozen,
)

REPO = Path(__file__).resolve().parents[1]
BUCKET = "lumiere-test"
SMOKE = f"{REPO}/configs/shapes_t2i.py:smoke,channels=8"
T2I = REPO / "checkpoints" / "shapes_t2i"
GRID = REPO / "configs" / "sweeps" / "shapes_grid.py"


# ----------------------------------------------------------------------------------------------
# The emulator.


def _download_as_gcs_does(download):
    """The emulator's media download, completed as tensorstore needs it.

    The emulator sends no `x-goog-generation` header and ignores `ifGenerationNotMatch` /
    `ifGenerationMatch` on downloads. Tensorstore's OCDBT reads its manifest with
    `GET .../o/<dir>/manifest.ocdbt?alt=media&ifGenerationNotMatch=<generation>` and fails
    with "Malformed StorageGeneration" on a 200 without that header (Cloud Storage answers
    304 Not Modified, or 200 with the header). This adds the headers GCS sends and answers the
    two preconditions as GCS does (304 / 412); everything else is the emulator's own code.
    """
    def wrapped(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"],
                                       request.params["object_id"])
        except NotFound:
            response.status = HTTPStatus.NOT_FOUND
            return
        generation = str(obj["generation"])
        not_match = request.query.get("ifGenerationNotMatch")
        match = request.query.get("ifGenerationMatch")
        if not_match and not_match[0] == generation:
            response.status = HTTPStatus.NOT_MODIFIED
        elif match and match[0] != generation:
            response.status = HTTPStatus.PRECONDITION_FAILED
        else:
            download(request, response, storage, *args, **kwargs)
        response["x-goog-generation"] = generation
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

    return wrapped


class _UploadedOnce(record_writer.GCSRecordWriter):
    """tensorboardX's gs:// event writer, whose close() after the first does nothing.

    tensorboardX keeps every event writer alive until interpreter exit (an atexit hook), and
    GCSRecordWriter.__del__ uploads the file once more then, long after the emulator stopped;
    google-cloud-storage retries that upload for 2 minutes. MetricsWriter.close() has already
    uploaded the complete file, so that last upload is dropped."""

    def close(self):
        if not getattr(self, "_uploaded", False):
            super().close()
            self._uploaded = True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
    """The emulator's URL and gs:// bucket root, with every library pointed at it."""
    port = _free_port()
    server = emulator_server.create_server("127.0.0.1", port, in_memory=True,
                                           default_bucket=BUCKET)
    url = f"http://127.0.0.1:{port}"
    closed = "127.0.0.1:9"  # discard port: nothing listens, so a metadata lookup fails at once
    env = {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "FSSPEC_GCS_TOKEN": "anon",  # for a fresh process; this one gets fsspec.config below
        "NO_GCE_CHECK": "true",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "GCE_METADATA_HOST": closed,
        "GCE_METADATA_IP": closed,
        "GCE_METADATA_ROOT": closed,
    }
    server.start()  # a non-daemon thread: stopped below whatever happens
    try:
        with pytest.MonkeyPatch.context() as mp:  # undone, even on errors, at the module's end
            for key, value in env.items():
                mp.setenv(key, value)
            mp.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
            mp.setitem(fsspec.config.conf, "gcs",
                       {**fsspec.config.conf.get("gcs", {}), "token": "anon"})
            for protocol in ("gs", "gcs"):  # what fsspec.filesystem("gcs") builds from now on
                mp.setitem(fsspec_registry, protocol, gcsfs.core.GCSFileSystem)
            mp.setattr(record_writer.GCSRecordWriterFactory, "open",
                       lambda self, path: _UploadedOnce(path))
            download = emulator_objects.download
            shim = _download_as_gcs_does(download)
            mp.setattr(emulator_objects, "download", shim)  # objects.get's alt=media branch
            for _, routes in emulator_server.HANDLERS:  # the /download/storage/v1 route
                for method, handler in routes.items():
                    if handler is download:
                        mp.setitem(routes, method, shim)
            # Its expected 404s are logged as errors: keep them out of failure reports.
            mp.setattr(logging.getLogger("gcp_storage_emulator"), "level", logging.CRITICAL)
            gcsfs.core.GCSFileSystem.clear_instance_cache()
            yield {"url": url, "root": f"gs://{BUCKET}"}
    finally:
        gcsfs.core.GCSFileSystem.clear_instance_cache()
        server.stop()


@pytest.fixture
def gs_dir(gcs, tmp_path, monkeypatch):
    """A fresh gs:// prefix for one test. The test runs in an empty local directory, so code
    that handled gs:// with os.path/open (which makes a local folder 'gs:') is caught."""
    monkeypatch.chdir(tmp_path)
    yield f"{gcs['root']}/{uuid.uuid4().hex[:12]}"
    assert not (tmp_path / "gs:").exists(), "a gs:// path was written to the local disk"


def _objects(gcs, prefix: str) -> dict[str, dict]:
    """name (relative to `prefix`) -> the emulator's object resource, read with the JSON API
    directly (not through epath or gcsfs, whose listings could be cached)."""
    assert prefix.startswith(gcs["root"] + "/")
    key = prefix[len(gcs["root"]) + 1:].rstrip("/") + "/"
    query = urllib.parse.urlencode({"prefix": key})
    with urllib.request.urlopen(f"{gcs['url']}/storage/v1/b/{BUCKET}/o?{query}") as response:
        items = json.load(response).get("items") or []
    return {item["name"][len(key):]: item for item in items}


def _read(gcs, path: str) -> bytes:
    """An object's bytes, downloaded with the JSON API directly."""
    key = urllib.parse.quote(path[len(gcs["root"]) + 1:], safe="")
    with urllib.request.urlopen(
            f"{gcs['url']}/storage/v1/b/{BUCKET}/o/{key}?alt=media") as response:
        return response.read()


# ----------------------------------------------------------------------------------------------
# a. The checkpoint layer.


def test_checkpoints_and_frozen_weights_on_gcs(gcs, gs_dir):
    rng = np.random.default_rng(0)
    frozen = {"spatial": {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
                          "bias": np.arange(4, dtype=np.float32)}}
    ref = write_frozen(f"{gs_dir}/frozen", frozen)
    assert ref.path == f"{gs_dir}/frozen"
    assert write_frozen(f"{gs_dir}/frozen", frozen) == ref  # same weights: a no-op
    with pytest.raises(FileExistsError, match="different frozen weights"):
        write_frozen(f"{gs_dir}/frozen", {"spatial": {**frozen["spatial"], "bias": np.zeros(4)}})
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), frozen)
    back = read_frozen(FrozenRef.from_json(ref.to_json()), abstract)
    jax.tree.map(np.testing.assert_array_equal, back, frozen)
    assert "commit_success.txt" in _objects(gcs, f"{gs_dir}/frozen")  # Orbax's gs:// commit

    def state(step):
        return {"params": {"w": np.full((2, 3), step, np.float32),
                           "b": np.arange(3, dtype=np.float32) * step},
                "opt": ({"count": np.int32(step)},
                        {"mu": {"w": np.ones((2, 3), np.float32) / step}})}

    with Checkpointer(f"{gs_dir}/ckpt", max_to_keep=2) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, state(step), {"frozen": ref, "note": f"step {step}"})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
    stored = {name.split("/")[0] for name in _objects(gcs, f"{gs_dir}/ckpt")}
    assert {"2", "3"} <= stored and "1" not in stored  # max_to_keep deleted step 1 on GCS

    with Checkpointer(f"{gs_dir}/ckpt", max_to_keep=2) as ckpt:  # a new process, as it were
        zeros = jax.tree.map(np.zeros_like, state(1))
        for step in (None, 2):
            items, metadata = ckpt.restore(step, zeros)
            expected = state(3 if step is None else step)
            jax.tree.map(np.testing.assert_array_equal, items, expected)
            assert metadata["step"] == (3 if step is None else step)
        again = read_frozen(FrozenRef.from_json(metadata["frozen"]), abstract)
        jax.tree.map(np.testing.assert_array_equal, again, frozen)
        wrong = {"params": {"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)}}
        with pytest.raises(CheckpointMismatchError,
                           match=r"item 'params':\n.*\n    w: stored \(2, 3\) float32, expected"):
            ckpt.restore(None, wrong)


# ----------------------------------------------------------------------------------------------
# b. The trainer: config from gs://, workdir on gs://, resumed.


def _losses(csv_text: str) -> dict[int, str]:
    return {int(row["step"]): row["loss"] for row in csv.DictReader(io.StringIO(csv_text))}


def _event_losses(data: bytes) -> dict[int, float]:
    """step -> 'loss' of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    losses, position = {}, 0
    while position < len(data):
        length = int.from_bytes(data[position:position + 8], "little")
        event = event_pb2.Event.FromString(data[position + 12:position + 12 + length])
        position += 12 + length + 4
        losses.update({event.step: v.simple_value for v in event.summary.value
                       if v.tag == "loss"})
    return losses


def test_train_and_resume_on_gcs_match_a_local_run(gcs, gs_dir, tmp_path):
    local = tmp_path / "local_run"
    trainer.train(load_config(SMOKE), str(local))
    reference = _losses((local / "metrics.csv").read_text())
    assert set(reference) == {1, 2, 3, 4}

    config_file = f"{gs_dir}/configs/shapes_t2i.py"
    epath.Path(config_file).write_text((REPO / "configs" / "shapes_t2i.py").read_text())
    spec = f"{config_file}:smoke,channels=8"
    assert load_config(spec).to_dict() == load_config(SMOKE).to_dict()

    run = f"{gs_dir}/run"
    trainer.train(load_config(spec, ["train.steps=2"]), run)  # stop after 2 steps
    assert _losses(_read(gcs, f"{run}/metrics.csv").decode()) == {
        k: v for k, v in reference.items() if k <= 2}
    trainer.train(load_config(spec), run)  # resume to 4

    objects = _objects(gcs, run)
    assert _losses(_read(gcs, f"{run}/metrics.csv").decode()) == reference
    resolved = json.loads(_read(gcs, f"{run}/config.json"))
    assert resolved["train"]["steps"] == 4 and resolved == json.loads(
        (local / "config.json").read_text())
    assert read_resolved_config(run).to_dict() == read_resolved_config(local).to_dict()
    steps = {name.split("/")[1] for name in objects if name.startswith("checkpoints/")}
    assert {step for step in steps if step.isdigit()} == {"2", "4"}  # max_to_keep=2
    png = Image.open(io.BytesIO(_read(gcs, f"{run}/samples/samples_0000004.png")))
    assert png.size == Image.open(local / "samples" / "samples_0000004.png").size
    events = [name for name in objects if name.startswith("tb/events.out.tfevents")]
    assert len(events) == 2  # one per session
    tensorboard = {}
    for name in events:
        tensorboard.update(_event_losses(_read(gcs, f"{run}/{name}")))
    assert tensorboard == pytest.approx({k: float(v) for k, v in reference.items()})
    assert not any(name.startswith(".write_probe") for name in objects)

    model, step = trainer.restore_model(load_config(spec), run)
    local_model, _ = trainer.restore_model(load_config(SMOKE), str(local))
    assert step == 4
    np.testing.assert_array_equal(np.asarray(model.net.conv_in.kernel[...]),
                                  np.asarray(local_model.net.conv_in.kernel[...]))


# ----------------------------------------------------------------------------------------------
# c. Shards on gs://, read by the Grain pipeline.


def test_shards_on_gcs_feed_the_same_batches(gcs, gs_dir, tmp_path):
    shards = f"{gs_dir}/shards"
    config = load_config(SMOKE, ["data.source=shards", f"data.path={shards}"])
    world = world_from_config(config)
    manifest = write_synthetic_shards(shards, world, "train", 7, records_per_shard=3)
    local_manifest = write_synthetic_shards(tmp_path / "shards", world, "train", 7,
                                            records_per_shard=3)
    assert manifest == local_manifest and read_manifest(shards) == manifest
    assert sorted(_objects(gcs, shards)) == ["manifest.json", "shard-00000.array_record",
                                             "shard-00001.array_record", "shard-00002.array_record"]
    assert verify_shards(shards) == []

    remote, local = ShardSource(shards, verify=True), ShardSource(tmp_path / "shards")
    assert len(remote) == len(local) == 7
    for i in range(7):
        a, b = remote[i], local[i]
        np.testing.assert_array_equal(a["video"], b["video"])
        assert (a["caption"], a["source_id"]) == (b["caption"], b["source_id"])

    tokenizer = make_tokenizer(config.text.tokenizer)
    local_config = load_config(SMOKE, ["data.source=shards", f"data.path={tmp_path / 'shards'}"])
    batches = [iter(training_dataset(c, tokenizer, single_frame=True))
               for c in (config, local_config)]
    for _ in range(3):  # past the end of the first epoch (7 records, batches of 4)
        a, b = (next(it) for it in batches)
        assert set(a) == set(b) and a["pixels"].shape[0] == 4
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_sentencepiece_vocabulary_on_gcs(gs_dir, tmp_path):
    """config.text.vocab_path=gs://... (docs/tpu.md): the T5 SentencePiece model on gs://."""
    import sentencepiece

    words = ["red", "green", "blue", "circle", "square", "star", "moving", "left", "right"]
    corpus = tmp_path / "captions.txt"
    corpus.write_text("\n".join(f"a {a} {b} {c} on a {d} background" for a in words
                                for b in words[3:6] for c in words[6:] for d in words[:3]))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "spiece"), vocab_size=40, pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    remote = f"{gs_dir}/t5/spiece.model"
    epath.Path(remote).write_bytes((tmp_path / "spiece.model").read_bytes())
    prompts = ["a red circle moving left", "a blue star moving right on a green background"]
    local = make_tokenizer("sentencepiece", str(tmp_path / "spiece.model"))
    tokens = make_tokenizer("sentencepiece", remote).encode_batch(prompts, 48)
    np.testing.assert_array_equal(tokens.ids, local.encode_batch(prompts, 48).ids)
    assert (tokens.ids[:, 0] > 2).all() and tokens.mask.sum() > 2 * len(prompts)
    with pytest.raises(FileNotFoundError, match="not found"):
        make_tokenizer("sentencepiece", f"{gs_dir}/t5/missing.model")


# ----------------------------------------------------------------------------------------------
# d. A sweep writing to gs://.


def test_sweep_on_gcs_resumes_from_its_manifest(gcs, gs_dir):
    out = f"{gs_dir}/sweep"
    config = load_config(f"{GRID}:model={T2I},steps=2", ["seeds=(0,)", "guidance=(1.0,)"])
    items = sweep_lib.expand_items(config)
    ids = [i["id"] for i in items]
    assert len(ids) == 2

    summary = sweep_lib.run_sweep(config, out, progress=False)
    assert (summary["done_now"], summary["missing"]) == (2, 0)
    objects = _objects(gcs, out)
    for name in ("sweep.json", "manifest.jsonl", "metrics.csv", "index.html", "plots/seed.png"):
        assert name in objects, name
    manifest = _read(gcs, f"{out}/manifest.jsonl").decode().splitlines()
    assert [json.loads(line)["id"] for line in manifest] == ids
    for item_id in ids:
        metrics = json.loads(_read(gcs, f"{out}/items/{item_id}/metrics.json"))
        for name, size in metrics["files"].items():
            assert int(objects[f"items/{item_id}/{name}"]["size"]) == size
    rows = list(csv.DictReader(io.StringIO(_read(gcs, f"{out}/metrics.csv").decode())))
    assert [row["id"] for row in rows] == ids
    assert not any(".tmp-" in name for name in objects)

    generations = {name: o["generation"] for name, o in objects.items()
                   if name.startswith("items/")}
    again = sweep_lib.run_sweep(config, out, progress=False)
    assert (again["done_now"], again["skipped"], again["adopted"], again["removed"],
            again["missing"]) == (0, 2, 0, 0, 0)
    after = _objects(gcs, out)
    assert {name: after[name]["generation"] for name in generations} == generations
    assert _read(gcs, f"{out}/manifest.jsonl").decode().splitlines() == manifest

    # A copy cut short (no metrics.json) is removed and sampled again; a complete folder the
    # manifest missed is adopted as it is.
    cut, missed = ids
    epath.Path(f"{out}/items/{cut}/metrics.json").unlink()
    epath.Path(f"{out}/manifest.jsonl").write_text("")
    png = [name for name in generations if name.startswith(f"items/{cut}/")
           and name.endswith(".png")]
    assert png
    kept = {name: g for name, g in generations.items() if name.startswith(f"items/{missed}/")}
    before = {name: _read(gcs, f"{out}/{name}") for name in png}
    third = sweep_lib.run_sweep(config, out, progress=False)
    assert (third["done_now"], third["adopted"], third["removed"], third["missing"]) == (
        1, 1, 1, 0)
    after = _objects(gcs, out)
    assert {name: after[name]["generation"] for name in kept} == kept
    assert {name: _read(gcs, f"{out}/{name}") for name in png} == before  # resampled exactly
    lines = _read(gcs, f"{out}/manifest.jsonl").decode().splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == sorted(ids)


# ----------------------------------------------------------------------------------------------
# e. Video files on gs://: `lumiere data synth`, `sample`, `data import`.


def test_data_synth_cli_writes_shards_and_previews_to_gcs(gcs, gs_dir, tmp_path):
    """The real command in a fresh process (the fixture's environment points it at the
    emulator); its shards and previews match the same calls writing to a local folder."""
    from lumiere_jax.data.synthetic import ShapesWorld
    from lumiere_jax.sampling import write_synthetic_previews

    out = f"{gs_dir}/synth"
    result = subprocess.run(
        [sys.executable, "-m", "lumiere_jax.cli", "data", "synth", "--out", out, "--num", "3"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["previews"] == f"{out}/previews/contact_sheet.png"

    world = ShapesWorld()
    local = tmp_path / "local_synth"
    manifest = write_synthetic_shards(local, world, "train", 3)
    previews = write_synthetic_previews(str(local / "previews"), 3, "train", world)
    assert read_manifest(out) == manifest and verify_shards(out) == []
    expected = {str(Path(p).relative_to(local)) for p in previews}
    assert len(expected) == 4 and {"previews/contact_sheet.png"} < expected
    assert set(_objects(gcs, out)) == expected | {"manifest.json", "shard-00000.array_record"}
    for name in sorted(expected):
        data = _read(gcs, f"{out}/{name}")
        assert data == (local / name).read_bytes(), name
        with Image.open(io.BytesIO(data)) as image:
            if name.endswith(".gif"):
                assert image.format == "GIF" and image.n_frames == world.num_frames
                assert image.size == (4 * world.width, 4 * world.height)  # scale=4
            else:
                assert image.format == "PNG"
                assert image.size == Image.open(local / name).size


def test_sample_to_gcs_matches_a_local_sample(gcs, gs_dir, tmp_path):
    """`lumiere sample --out gs://...` (sample_to_files) with the shipped STUNet export at two
    sampler steps: mp4, gif and contact sheet on gs://, as a local run writes them."""
    from ml_collections import ConfigDict

    from lumiere_jax.apps.editing import read_image
    from lumiere_jax.data.video_io import read_video
    from lumiere_jax.sampling import sample_to_files

    export = str(REPO / "checkpoints" / "shapes_stunet")
    config = ConfigDict(read_resolved_config(export).to_dict())
    config.sample.steps = 2
    prompts, seeds, guidance = ["a red circle moving left"], [0], [1.0]
    local = tmp_path / "local_sample"
    local_paths = sample_to_files(config, export, prompts, seeds, guidance, out=str(local))
    out = f"{gs_dir}/sample"
    paths = sample_to_files(config, export, prompts, seeds, guidance, out=out)
    names = [Path(p).name for p in local_paths]
    assert paths == [f"{out}/{name}" for name in names]
    assert sorted(_objects(gcs, out)) == sorted(names)
    assert {Path(name).suffix for name in names} == {".mp4", ".gif", ".png"}
    # Compared decoded, within a codec's error: libx264 does not re-encode bit-identically
    # on a loaded machine (seen in CI: 1.4% of values off by up to 10), so neither can the
    # two runs' files be compared bytewise. The upload itself is checked bytewise: the object
    # read with the JSON API is the file gs:// readers see.
    def decoded(path):
        if path.endswith(".mp4"):
            frames, fps = read_video(path)
            assert fps == config.world.fps
            return frames
        with epath.Path(path).open("rb") as f:
            image = Image.open(io.BytesIO(f.read()))
            return np.stack([np.asarray(frame.convert("RGB"))
                             for frame in ImageSequence.Iterator(image)])

    for name in names:
        with epath.Path(f"{out}/{name}").open("rb") as f:
            assert f.read() == _read(gcs, f"{out}/{name}"), name
        remote, here = decoded(f"{out}/{name}"), decoded(str(local / name))
        assert remote.shape == here.shape, name
        diff = np.abs(remote.astype(int) - here.astype(int))
        assert diff.mean() < 0.5 and diff.max() <= 24, (name, diff.mean(), diff.max())
    mp4 = next(name for name in names if name.endswith(".mp4"))
    assert decoded(f"{out}/{mp4}").shape == (config.world.num_frames, 32, 32, 3)
    sheet = next(name for name in names if name.endswith("_sheet.png"))
    np.testing.assert_allclose(read_image(f"{out}/{sheet}", 32, 32).astype(int),  # app --image
                               read_image(str(local / sheet), 32, 32).astype(int), atol=24)
    with pytest.raises(FileNotFoundError, match="no video file"):
        read_video(f"{out}/missing.mp4")


def _moving_bar(frames: int) -> np.ndarray:
    video = np.zeros((frames, 40, 56, 3), np.uint8)
    for t in range(frames):
        video[t, :, 10 + t: 14 + t] = 255
    return video


def test_import_videos_to_gcs_matches_a_local_import(gcs, gs_dir, tmp_path):
    """`lumiere data import --out gs://...`: shards, sidecars, manifest and report on gs://
    as a local import writes them; a rerun skips the finished shards; and the same import with
    the videos folder and captions file on gs:// too."""
    from lumiere_jax.data import importer
    from lumiere_jax.data.video_io import write_gif, write_mp4

    videos = tmp_path / "videos"
    write_mp4(videos / "good.mp4", _moving_bar(32), fps=16.0)
    write_mp4(videos / "sub" / "good2.mp4", _moving_bar(24), fps=8.0)
    write_gif(videos / "anim.gif", _moving_bar(10), fps=5.0)
    write_mp4(videos / "uncaptioned.mp4", _moving_bar(16), fps=8.0)
    (videos / "empty.mp4").write_bytes(b"")
    (videos / ".hidden.mp4").write_bytes(b"skipped")
    captions = videos / "captions.csv"  # inside the folder: not a video
    with open(captions, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "caption"])
        for name in ("good.mp4", "sub/good2.mp4", "anim.gif", "empty.mp4", "gone.mp4"):
            writer.writerow([name, f"caption of {name}"])
    settings = dict(num_frames=8, height=16, width=16, fps=8.0, videos_per_shard=2, workers=0,
                    progress=False)

    local = tmp_path / "local_import"
    report = importer.import_videos(videos, captions, local, **settings)
    assert (report["good_files"], report["bad_files"], report["clips"], report["shards"]) == (
        3, 2, 7, 2)
    out = f"{gs_dir}/import"
    assert importer.import_videos(videos, captions, out, **settings) == report
    names = sorted(p.name for p in local.iterdir())
    assert sorted(_objects(gcs, out)) == names
    for name in names:  # shards, sidecars, manifest and report: the same bytes
        assert _read(gcs, f"{out}/{name}") == (local / name).read_bytes(), name
    assert verify_shards(out) == []
    remote, local_source = ShardSource(out), ShardSource(local)
    assert len(remote) == len(local_source) == 7
    for i in range(7):
        a, b = remote[i], local_source[i]
        np.testing.assert_array_equal(a["video"], b["video"])
        assert (a["caption"], a["source_id"]) == (b["caption"], b["source_id"])

    generations = {name: o["generation"] for name, o in _objects(gcs, out).items()
                   if name.startswith("shard-")}
    again = importer.import_videos(videos, captions, out, **settings)
    assert (again["shards_skipped_as_done"], again["shards_written"]) == (2, 0)
    after = _objects(gcs, out)
    assert {name: after[name]["generation"] for name in generations} == generations

    # Videos and captions on gs:// as well (downloaded one at a time to decode).
    remote_videos = f"{gs_dir}/videos"
    for path in videos.rglob("*"):
        if path.is_file():
            epath.Path(f"{remote_videos}/{path.relative_to(videos)}").write_bytes(
                path.read_bytes())
    out2 = f"{gs_dir}/import_from_gcs"
    assert importer.import_videos(remote_videos, f"{remote_videos}/captions.csv", out2,
                                  **settings) == report
    assert read_manifest(out2)["metadata"]["videos_dir"] == remote_videos
    assert ({**read_manifest(out2), "metadata": None}
            == {**read_manifest(local), "metadata": None})
    for name in names:
        if name.startswith("shard-"):
            assert _read(gcs, f"{out2}/{name}") == (local / name).read_bytes(), name
