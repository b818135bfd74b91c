"""Data-parallel sampling: a Generator with `devices` splits each batch over the local devices
(8 forced CPU devices here), the model replicated on each, and samples what one device samples;
`lumiere sample` (make_generator) and `lumiere sweep` use every local device.

"The same" is checked on the floats at 1e-5 and on the pixels to one level: XLA compiles a
program split over 8 devices apart from the one-device program (as it does a program for
another batch size), and may round the last bit of a float differently, which can move a rare
pixel by one level. The tiny random models here agree bit for bit, and tests/test_sweep.py
checks the shipped image model's 8-device sweep byte for byte against one device."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from lumiere_jax import generate
from lumiere_jax import sweep as sweep_lib
from lumiere_jax.config import load_config, read_resolved_config
from lumiere_jax.diffusion.schedules import Diffusion
from lumiere_jax.models.denoiser import build_denoiser
from lumiere_jax.parallel.mesh import make_mesh
from lumiere_jax.text.tokenizers import make_tokenizer
from lumiere_jax.train.trainer import make_generator

REPO = Path(__file__).resolve().parents[1]
T2I = REPO / "checkpoints" / "shapes_t2i"
GRID = REPO / "configs" / "sweeps" / "shapes_grid.py"
FRAMES, SIZE = 8, 16
VIDEO = [f"world.num_frames={FRAMES}", f"world.height={SIZE}", f"world.width={SIZE}",
         "model.unet.channels=8", "model.unet.channel_mult=(1, 2)",
         "model.unet.attention_levels=(1,)", "init_from="]
PROMPTS = ["a small red circle moving left on a black background",
           "a large blue square moving up on a white background",
           "a small green triangle moving right on a gray background",
           "a large yellow circle moving down on a black background",
           "a small red square moving right on a white background",
           "a large green circle moving left on a gray background",
           "a small blue triangle moving up on a black background",
           "a large red triangle moving down on a white background",
           "a small yellow square moving left on a gray background"]
SEEDS = [3, 1, 4, 15, 9, 2, 6, 5, 35]
GUIDANCE = [3.0, 1.0, 2.0, 3.0, 0.0, 3.0, 1.5, 3.0, 4.0]  # per item: guided sampling
IMAGE = ["world.height=16", "world.width=16", "model.unet.channels=8",
         "model.unet.channel_mult=(1, 2)", "model.unet.attention_levels=(1,)"]
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute",
               "reduce-scatter")


def _assert_same_pixels(a: np.ndarray, b: np.ndarray) -> None:
    """uint8 samples equal but for a rare value one level off (a float's last bit)."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def _recording(generator: generate.Generator) -> list:
    """Records every call of the generator's jitted sampling function: (args, kwargs, the
    float output before it is gathered and converted to uint8)."""
    calls, run = [], generator._run

    def record(*args, **kwargs):
        x = run(*args, **kwargs)
        calls.append((args, kwargs, x))
        return x

    generator._run = record
    generator._unrecorded_run = run
    return calls


@pytest.fixture(scope="module")
def video():
    """A random-weight tiny STUNet sampled with MultiDiffusion (4-frame windows of 8 frames),
    on one device and split over all 8; each generator records its sampling calls."""
    assert jax.local_device_count() == 8, "the tests run on 8 forced CPU devices (conftest)"
    config = load_config("configs/shapes_stunet.py:smoke", VIDEO)
    model = build_denoiser(config, nnx.Rngs(0))
    tokenizer = make_tokenizer(config.text.tokenizer, config.text.get("vocab_path"))
    diffusion = Diffusion.from_config(config.diffusion)

    def generator(devices):
        g = generate.Generator(model, diffusion, tokenizer, config.text.max_length,
                               (FRAMES, SIZE, SIZE, 3), steps=2, batch_size=16, window=4,
                               overlap=2, devices=devices)
        return g, _recording(g)

    (one, one_calls), (eight, eight_calls) = generator(None), generator(8)
    reference = one(PROMPTS, SEEDS, GUIDANCE)  # one call of 9 on one device
    (_, _, reference_float), = one_calls
    return {"one": one, "eight": eight, "calls": eight_calls, "reference": reference,
            "reference_float": np.asarray(reference_float)}


@pytest.mark.parametrize("n, used, padded", [(8, 8, 8), (5, 5, 5), (9, 5, 10)])
def test_split_over_devices_equals_one_device(video, n, used, padded):
    """8 examples: one per device; 5: one on each of 5 devices; 9: two on each of 5, padded
    with the last example. The videos are those of one device, bit for bit (the floats too)."""
    calls = video["calls"]
    calls.clear()
    out = video["eight"](PROMPTS[:n], SEEDS[:n], GUIDANCE[:n])
    assert out.shape == (n, FRAMES, SIZE, SIZE, 3) and out.dtype == np.uint8
    _assert_same_pixels(out, video["reference"][:n])
    (args, _, x), = calls
    z = args[5]
    assert z.shape[0] == padded and len(z.sharding.device_set) == used
    assert x.shape[0] == padded
    np.testing.assert_allclose(np.asarray(x)[:n], video["reference_float"][:n], rtol=0,
                               atol=1e-5)
    if padded > n:  # the padding repeats the last example
        np.testing.assert_array_equal(np.asarray(args[1])[n:], np.asarray(args[1])[n - 1 : n])


def test_sampling_runs_sharded_with_no_collectives(video):
    """The batch is split over the 8 devices (one example each) and the model replicated; the
    compiled program is partitioned 8 ways, works on one example's arrays per device, and
    moves nothing between devices."""
    eight, calls = video["eight"], video["calls"]
    calls.clear()
    eight(PROMPTS[:8], SEEDS[:8], GUIDANCE[:8])
    (args, kwargs, x), = calls
    state, z = args[0], args[5]
    devices = set(jax.local_devices())
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.device_set == devices and leaf.sharding.is_fully_replicated
    for array in (z, x):
        assert array.sharding.device_set == devices and not array.sharding.is_fully_replicated
        assert {s.data.shape for s in array.addressable_shards} == {(1, FRAMES, SIZE, SIZE, 3)}
    hlo = eight._unrecorded_run.lower(*args, **kwargs).compile().as_text()
    assert "num_partitions=8" in hlo
    shapes = set(re.findall(rf"f32\[(\d+),{FRAMES},{SIZE},{SIZE},3\]", hlo))
    assert "1" in shapes and not shapes & {"8", "16"}, shapes  # no full-batch video anywhere
    assert not [c for c in COLLECTIVES if c in hlo]


def test_sdedit_from_the_inversion_is_the_same_split_over_devices(video):
    """SDEdit from a DDIM inversion (its own unguided pass with the source captions, then the
    guided sampling) split over devices: 5 examples on 5 devices equal one device's."""
    init = np.random.default_rng(1).integers(0, 256, (5, FRAMES, SIZE, SIZE, 3), np.uint8)
    kwargs = dict(init=init, strength=0.6, invert=True, source_prompts=PROMPTS[1:6])
    one = video["one"](PROMPTS[:5], SEEDS[:5], GUIDANCE[:5], **kwargs)
    split = video["eight"](PROMPTS[:5], SEEDS[:5], GUIDANCE[:5], **kwargs)
    _assert_same_pixels(split, one)
    plain = video["one"](PROMPTS[:5], SEEDS[:5], GUIDANCE[:5], init=init, strength=0.6)
    assert not np.array_equal(plain, one)


def test_clean_estimates_are_the_same_split_over_devices(video):
    """The one-step estimates editing.edit_region compares: 9 examples over 5 devices (padded
    to 10) equal one device's, each from its own seed's noise."""
    init = np.random.default_rng(2).integers(0, 256, (9, FRAMES, SIZE, SIZE, 3), np.uint8)
    one = video["one"].clean_estimates(PROMPTS, init, 0.5, SEEDS)
    split = video["eight"].clean_estimates(PROMPTS, init, 0.5, SEEDS)
    assert split.shape == (9, FRAMES, SIZE, SIZE, 3)
    np.testing.assert_allclose(split, one, rtol=0, atol=1e-5)
    other_seeds = video["one"].clean_estimates(PROMPTS, init, 0.5, SEEDS[1:] + SEEDS[:1])
    assert not np.allclose(other_seeds, one)


def test_ddpm_and_chunks_are_exact_when_padded():
    """DDPM draws each step's noise for the whole batch from one key: padding appends examples
    and leaves the earlier ones' noise as it is, so 3 examples padded to 4 over 2 devices
    sample what one device samples. A batch_size that is no multiple of the devices works too
    (chunks of 3 padded to 4, the last of 1), on devices given as a list."""
    config = load_config("configs/shapes_t2i.py:smoke", IMAGE)
    model = build_denoiser(config, nnx.Rngs(1))
    tokenizer = make_tokenizer(config.text.tokenizer, config.text.get("vocab_path"))
    diffusion = Diffusion.from_config(config.diffusion)
    shape = (config.world.height, config.world.width, 3)

    def sample(devices, batch_size, n):
        g = generate.Generator(model, diffusion, tokenizer, config.text.max_length, shape,
                               sampler="ddpm", steps=2, batch_size=batch_size, devices=devices)
        calls = _recording(g)
        out = g(PROMPTS[:n], SEEDS[:n], 3.0)
        chunks = [min(batch_size, n - i) for i in range(0, n, batch_size)]
        return out, np.concatenate([np.asarray(x)[:m] for m, (_, _, x) in zip(chunks, calls)])

    for (split, floats), (one, one_floats) in (
            (sample(2, 4, 3), sample(None, 4, 3)),
            (sample(jax.local_devices()[6:], 3, 4), sample(None, 3, 4))):
        _assert_same_pixels(split, one)
        np.testing.assert_allclose(floats, one_floats, rtol=0, atol=1e-5)
    ddpm = generate.Generator(model, diffusion, tokenizer, config.text.max_length, shape,
                              sampler="ddpm", steps=2)
    with pytest.raises(ValueError, match="invert=True needs the DDIM sampler"):
        ddpm(PROMPTS[:1], SEEDS[:1], init=np.zeros((1, *shape), np.uint8), strength=0.5,
             invert=True)


def test_ssr_upsampling_is_the_same_split_over_devices():
    """The SSR: the low-res videos are split with the batch (into MultiDiffusion windows on
    each device) and their augmentation noise, drawn for the whole batch, is the same: 3
    videos padded to 4 over 2 devices upsample as on one device."""
    config = load_config("configs/shapes_ssr.py:smoke", [
        "world.num_frames=8", "world.height=16", "world.width=16",
        "model.unet.channel_mult=(1, 2)", "model.unet.attention_levels=(1,)"])
    model = build_denoiser(config, nnx.Rngs(0))
    tokenizer = make_tokenizer(config.text.tokenizer, config.text.get("vocab_path"))
    diffusion = Diffusion.from_config(config.diffusion)
    low = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 8, 3), np.uint8)
    outs = []
    for devices in (None, 2):
        g = generate.Generator(model, diffusion, tokenizer, config.text.max_length,
                               (8, 16, 16, 3), steps=2, batch_size=4, window=4, overlap=2,
                               aug_logsnr=float(diffusion.logsnr(0.3)), devices=devices)
        calls = _recording(g)
        outs.append((g(PROMPTS[:3], SEEDS[:3], 2.0, low_res=low), np.asarray(calls[0][2])))
    (one, one_floats), (split, split_floats) = outs
    _assert_same_pixels(split, one)
    assert split_floats.shape[0] == 4  # padded
    np.testing.assert_allclose(split_floats[:3], one_floats, rtol=0, atol=1e-5)


def test_data_parallel_split():
    assert generate.data_parallel_split(8, 8) == (8, 8)
    assert generate.data_parallel_split(5, 8) == (5, 5)
    assert generate.data_parallel_split(9, 8) == (5, 10)  # 2 per device, as on 8 devices
    assert generate.data_parallel_split(13, 8) == (7, 14)
    assert generate.data_parallel_split(32, 8) == (8, 32)
    assert generate.data_parallel_split(1, 8) == (1, 1)
    with pytest.raises(ValueError, match="cannot split 0 examples"):
        generate.data_parallel_split(0, 8)


def test_sample_devices_config_and_errors():
    """sample.devices: 0 (default) all local devices, never more than the batch; 1 keeps the
    single-device path; more than the host has is a clear error. A mesh (training) and
    devices do not go together."""
    config = load_config("configs/shapes_t2i.py:smoke", ["sample.batch_size=16"])
    model = build_denoiser(config, nnx.Rngs(0))
    tokenizer = make_tokenizer(config.text.tokenizer, config.text.get("vocab_path"))
    diffusion = Diffusion.from_config(config.diffusion)

    def generator(*overrides):
        c = ConfigDict(config.to_dict())
        for key, value in overrides:
            c.sample[key] = value
        return make_generator(model, c, diffusion, tokenizer)

    assert config.sample.devices == 0 and generator().num_devices == jax.local_device_count()
    assert generator(("batch_size", 2)).num_devices == 2
    single = generator(("devices", 1))
    assert single.num_devices == 1 and single.devices is None
    assert generator(("devices", 3)).devices == jax.local_devices()[:3]
    recorded_before = ConfigDict(config.to_dict())
    del recorded_before.sample["devices"]  # a run recorded before the key: all devices
    assert make_generator(model, recorded_before, diffusion,
                          tokenizer).num_devices == jax.local_device_count()
    with pytest.raises(ValueError, match="this process has 8 local device.*sample.devices"):
        generator(("devices", 9))
    with pytest.raises(ValueError, match="sample.devices must be an int"):
        generate.sample_device_count("all")
    assert load_config("configs/shapes_t2i.py:smoke", ["sample.devices=1"]).sample.devices == 1
    with pytest.raises(ValueError, match="mesh .* or devices"):
        generate.Generator(model, diffusion, tokenizer, 16, (32, 32, 3), mesh=make_mesh(),
                           devices=8)


def test_sweep_uses_every_local_device(tmp_path, monkeypatch):
    """The sweep's generator splits each batch over all 8 devices, its batch_size (3) rounded
    up to a multiple of them; its images are those of the same sweep on one device (the
    optional key `devices`), and of one device sampling one item per call."""
    from PIL import Image

    from lumiere_jax.sampling import load_generator

    groups, init = [], sweep_lib._ModelGroup.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        groups.append(self)

    monkeypatch.setattr(sweep_lib._ModelGroup, "__init__", recording_init)
    spec, overrides = f"{GRID}:model={T2I},steps=1", ["seeds=(0, 1)", "guidance=(3.0,)"]
    items = sweep_lib.expand_items(load_config(spec, overrides + ["batch_size=3"]))

    def images(name: str) -> np.ndarray:
        folder = tmp_path / name / "items"
        return np.stack([np.asarray(Image.open(folder / i["id"] / "sample.png")) for i in items])

    for name, extra in (("all", []), ("one", ["devices=1"])):
        config = load_config(spec, overrides + ["batch_size=3", *extra])
        summary = sweep_lib.run_sweep(config, str(tmp_path / name), progress=False)
        assert (summary["done_now"], summary["missing"]) == (4, 0)
    (everywhere, one) = groups
    assert everywhere.generator.num_devices == jax.local_device_count() == 8
    assert everywhere.batch_size == 8  # 3 rounded up: the 4 items, padded, one per device
    assert (one.generator.num_devices, one.batch_size) == (1, 3)
    _assert_same_pixels(images("all"), images("one"))

    config = ConfigDict(read_resolved_config(str(T2I)).to_dict())
    config.sample.update(steps=1, devices=1, batch_size=1)
    single, _ = load_generator(config, str(T2I))
    _assert_same_pixels(images("all"), single([i["prompt"] for i in items],
                                              [i["seed"] for i in items],
                                              [i["guidance"] for i in items]))
    with pytest.raises(ValueError, match="sweep devices: -1 is not an int >= 0"):
        sweep_lib.resolve_sweep(load_config(spec, overrides + ["devices=-1"]))
