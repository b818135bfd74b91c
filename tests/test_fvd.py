"""FVD machinery: the Flax I3D on random weights, its weight file, the PyTorch-name converter,
the Frechet distance against closed forms, and the `eval --fvd_weights` hook.

Every network call runs 4 clips of 16x32x32 at resolution 32 with batch 4, so one compiled
forward pass serves the whole file (the jitted function is cached per network structure)."""

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from lumiere_jax.data.synthetic import ShapesSource, ShapesWorld
from lumiere_jax.eval import fvd as F

RES, BATCH = 32, 4
WORLD = ShapesWorld(num_frames=16, height=32, width=32)


def feats(model, videos):
    return model.features(videos, resolution=RES, batch_size=BATCH)


@pytest.fixture(scope="module")
def model():
    return F.I3D(rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def clips():
    source = ShapesSource(WORLD, "test", 4)
    return np.stack([source[i]["video"] for i in range(4)])


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("i3d") / "i3d.npz"
    F.save_i3d(model, path)
    with np.load(path) as data:
        return path, {k: data[k] for k in data.files}


# ----------------------------------------------------------------------------------------------
# Network.


def test_network_shapes_and_determinism(model, clips):
    # The FVD setting (16 frames of 224x224: Mixed_5c ends at 2x7x7), traced only.
    out = jax.eval_shape(model, jax.ShapeDtypeStruct((2, 16, 224, 224, 3), np.float32))
    assert out.shape == (2, 400)
    variables = model.variables()
    assert variables["Conv3d_1a_7x7/conv_3d/w"].shape == (7, 7, 7, 3, 64)
    assert variables["Mixed_5b/Branch_2/Conv3d_0a_3x3/conv_3d/w"].shape == (3, 3, 3, 32, 128)
    assert variables["Logits/Conv3d_0c_1x1/conv_3d/w"].shape == (1, 1, 1, 1024, 400)
    assert variables["Mixed_5c/Branch_3/Conv3d_0b_1x1/batch_norm/moving_variance"].shape == (128,)
    a = feats(model, clips)
    assert a.shape == (4, 400) and a.dtype == np.float32 and np.all(np.isfinite(a))
    assert a.std() > 1e-3  # random weights still separate the clips
    np.testing.assert_array_equal(a, feats(model, clips))
    # 5 videos with batch 4: the padded last batch gives the same features as a full one.
    five = feats(model, np.concatenate([clips, clips[:1]]))
    np.testing.assert_allclose(five, np.concatenate([a, a[:1]]), rtol=1e-5, atol=1e-5)


def test_preprocess_matches_tf1_resize_bilinear():
    frame = np.array([[0, 100], [200, 50]], np.uint8)
    video = np.broadcast_to(frame[None, None, :, :, None], (1, 1, 2, 2, 3))
    out = np.asarray(F.preprocess(np.asarray(video), 4))[0, 0, :, :, 0]
    # Legacy TF: output i samples input i * 2/4 (no half-pixel centres), edges clamp.
    row0 = np.array([0, 50, 100, 100.0])
    row1 = np.array([200, 125, 50, 50.0])
    expected = np.stack([row0, (row0 + row1) / 2, row1, row1]) * (2 / 255) - 1
    np.testing.assert_allclose(out, expected, atol=1e-6)
    floats = np.asarray(video, np.float32) / 127.5 - 1  # floats in [-1, 1] are not rescaled
    np.testing.assert_allclose(np.asarray(F.preprocess(floats, 4))[0, 0, :, :, 0], expected,
                               atol=1e-6)
    assert F.preprocess(np.zeros((2, 3, 5, 7, 3), np.uint8), 8).shape == (2, 3, 8, 8, 3)


def test_bad_videos(model):
    with pytest.raises(ValueError, match=r"\[-1, 1\].*uint8"):
        model.features(np.full((2, 4, 8, 8, 3), 255.0, np.float32))
    with pytest.raises(ValueError, match="RGB videos"):
        model.features(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="int32"):
        model.features(np.zeros((2, 4, 8, 8, 3), np.int32))


# ----------------------------------------------------------------------------------------------
# Weight file.


def test_save_load_round_trip(model, clips, saved, tmp_path):
    path, arrays = saved
    assert "Mixed_5b/Branch_2/Conv3d_0a_3x3/conv_3d/w" in arrays
    assert not any(k.endswith("gamma") for k in arrays)  # all ones: DeepMind layout
    assert len(arrays) == 57 * 4 + 2  # 3 + 9 * 6 BN units (w, beta, mean, var), logits w, b
    loaded = F.load_i3d(path)
    np.testing.assert_array_equal(feats(loaded, clips), feats(model, clips))

    # A gamma other than ones is saved and loaded back.
    loaded.conv_1a.gamma[...] = np.linspace(0.5, 1.5, 64, dtype=np.float32)
    F.save_i3d(loaded, tmp_path / "gamma.npz")
    with np.load(tmp_path / "gamma.npz") as data:
        assert "Conv3d_1a_7x7/batch_norm/gamma" in data.files
    again = F.load_i3d(tmp_path / "gamma.npz")
    np.testing.assert_array_equal(np.asarray(again.conv_1a.gamma[...]),
                                  np.asarray(loaded.conv_1a.gamma[...]))

    # The TF checkpoint's own layout: full variable names and [1, 1, 1, 1, C] BN vectors.
    tf_style = {F.TF_PREFIX + k + ":0": (v.reshape(1, 1, 1, 1, -1) if v.ndim == 1 else v)
                for k, v in arrays.items()}
    np.savez(tmp_path / "tf_style.npz", **tf_style)
    np.testing.assert_array_equal(feats(F.load_i3d(tmp_path / "tf_style.npz"), clips),
                                  feats(model, clips))


def test_bad_weight_files(saved, tmp_path):
    _, arrays = saved
    bad = dict(arrays)
    del bad["Mixed_4d/Branch_1/Conv3d_0b_3x3/conv_3d/w"]
    del bad["Logits/Conv3d_0c_1x1/conv_3d/b"]
    bad["Mixed_9z/Branch_0/Conv3d_0a_1x1/conv_3d/w"] = np.zeros(3, np.float32)
    bad["Conv3d_2b_1x1/batch_norm/beta"] = np.zeros(65, np.float32)
    bad["Logits/Conv3d_0c_1x1/conv_3d/w"] = np.zeros((1, 1, 1, 1024, 600), np.float32)
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(ValueError) as e:
        F.load_i3d(tmp_path / "bad.npz")
    msg = str(e.value)
    assert "Kinetics-400 I3D RGB checkpoint converted to .npz" in msg
    for name in ("2 missing", "Mixed_4d/Branch_1/Conv3d_0b_3x3/conv_3d/w",
                 "Logits/Conv3d_0c_1x1/conv_3d/b", "1 unexpected",
                 "Mixed_9z/Branch_0/Conv3d_0a_1x1/conv_3d/w", "2 mis-shaped",
                 "Conv3d_2b_1x1/batch_norm/beta (65,) (expected (64,))",
                 "Logits/Conv3d_0c_1x1/conv_3d/w (1, 1, 1, 1024, 600)"):
        assert name in msg, name

    torch_named = {"Conv3d_1a_7x7.conv3d.weight": np.zeros((64, 3, 7, 7, 7), np.float32)}
    np.savez(tmp_path / "torch.npz", **torch_named)
    with pytest.raises(ValueError, match="convert_pytorch_i3d"):
        F.load_i3d(tmp_path / "torch.npz")
    with pytest.raises(FileNotFoundError, match="Kinetics-400"):
        F.load_i3d(tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="as .npz"):
        F.load_i3d(tmp_path / "junk.npz")


# ----------------------------------------------------------------------------------------------
# PyTorch converter.

# pytorch-i3d's names of the units, written out here independently of the converter.
TORCH_BRANCH = {"Branch_0/Conv3d_0a_1x1": "b0", "Branch_1/Conv3d_0a_1x1": "b1a",
                "Branch_1/Conv3d_0b_3x3": "b1b", "Branch_2/Conv3d_0a_1x1": "b2a",
                "Branch_2/Conv3d_0b_3x3": "b2b", "Branch_2/Conv3d_0a_3x3": "b2b",
                "Branch_3/Conv3d_0b_1x1": "b3b"}
TORCH_PARAM = {"conv_3d/w": "conv3d.weight", "conv_3d/b": "conv3d.bias",
               "batch_norm/beta": "bn.bias", "batch_norm/moving_mean": "bn.running_mean",
               "batch_norm/moving_variance": "bn.running_var"}


def to_pytorch(arrays):
    state = {}
    for key, value in arrays.items():
        parts = key.split("/")
        unit, param = "/".join(parts[:-2]), "/".join(parts[-2:])
        if unit.startswith("Mixed_"):
            module = f"{parts[0]}.{TORCH_BRANCH['/'.join(parts[1:3])]}"
        elif unit == "Logits/Conv3d_0c_1x1":
            module = "logits"
        else:
            module = unit
        if param == "conv_3d/w":
            value = value.transpose(4, 3, 0, 1, 2)  # [t, h, w, in, out] -> [out, in, t, h, w]
        state[f"{module}.{TORCH_PARAM[param]}"] = value
        if param == "batch_norm/beta":
            state[f"{module}.bn.weight"] = np.ones_like(value)
            state[f"{module}.bn.num_batches_tracked"] = np.array(0)
    return state


def test_convert_pytorch(model, clips, saved, tmp_path):
    _, arrays = saved
    state = to_pytorch(arrays)
    for key in ("Conv3d_1a_7x7.conv3d.weight", "Conv3d_1a_7x7.bn.running_var",
                "Mixed_3b.b1a.bn.bias", "Mixed_5b.b2b.conv3d.weight", "Mixed_5c.b3b.bn.weight",
                "logits.conv3d.weight", "logits.conv3d.bias"):
        assert key in state, key
    assert state["Conv3d_1a_7x7.conv3d.weight"].shape == (64, 3, 7, 7, 7)
    converted = F.convert_pytorch_i3d(state)
    assert set(converted) == set(arrays) | {k.replace("beta", "gamma") for k in arrays
                                            if k.endswith("beta")}
    np.savez(tmp_path / "converted.npz", **converted)
    np.testing.assert_array_equal(feats(F.load_i3d(tmp_path / "converted.npz"), clips),
                                  feats(model, clips))
    # DataParallel's prefix is ignored; unknown entries are all named in one error.
    prefixed = F.convert_pytorch_i3d({"module." + k: v for k, v in state.items()})
    assert set(prefixed) == set(converted)
    with pytest.raises(ValueError, match=r"2 unknown.*fc\.weight.*Mixed_3b\.b9\.conv3d"):
        F.convert_pytorch_i3d({**state, "fc.weight": np.zeros(3),
                               "Mixed_3b.b9.conv3d.weight": np.zeros(3)})


# ----------------------------------------------------------------------------------------------
# Frechet distance.


def exact_set(rng, mean, variances, n):
    """n samples whose sample mean is `mean` and sample covariance diag(variances), exactly."""
    d = len(mean)
    z = rng.standard_normal((n, d))
    q, _ = np.linalg.qr(np.concatenate([np.ones((n, 1)), z], axis=1))
    orthonormal = q[:, 1:]  # columns orthogonal to each other and to the ones vector
    return mean + orthonormal * np.sqrt((n - 1) * np.asarray(variances))


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8))
    assert abs(F.frechet_distance(x, x)) < 1e-6
    wide = rng.standard_normal((10, 400)) * 3  # fewer samples than dimensions, as in FVD
    assert abs(F.frechet_distance(wide, wide)) < 1e-6

    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    a, b = exact_set(rng, mu1, s1, 40), exact_set(rng, mu2, s2, 25)
    np.testing.assert_allclose(a.mean(0), mu1, atol=1e-12)
    np.testing.assert_allclose(np.cov(a, rowvar=False), np.diag(s1), atol=1e-12)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    np.testing.assert_allclose(F.frechet_distance(a, b), expected, rtol=1e-9)
    np.testing.assert_allclose(F.frechet_distance(b, a), expected, rtol=1e-9)

    # Full covariances, against scipy's general matrix square root.
    import scipy.linalg
    c = rng.standard_normal((30, 5)) @ rng.standard_normal((5, 5))
    e = rng.standard_normal((20, 5)) @ rng.standard_normal((5, 5)) + 1.0
    ca, ce = np.cov(c, rowvar=False), np.cov(e, rowvar=False)
    ref = (np.sum((c.mean(0) - e.mean(0)) ** 2) + np.trace(ca + ce)
           - 2 * np.trace(scipy.linalg.sqrtm(ca @ ce)).real)
    np.testing.assert_allclose(F.frechet_distance(c, e), ref, rtol=1e-8)

    # A shift adds exactly its squared length and grows with it.
    shifts = [F.frechet_distance(x, x + k * np.ones(8)) for k in (0.5, 1.0, 2.0)]
    np.testing.assert_allclose(shifts, [8 * 0.25, 8.0, 32.0], rtol=1e-9)


def test_frechet_distance_errors():
    x = np.zeros((5, 4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        F.frechet_distance(x[:1], x)
    with pytest.raises(ValueError, match="same d"):
        F.frechet_distance(x, np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        F.frechet_distance(np.zeros(5), x)


# ----------------------------------------------------------------------------------------------
# FVD and the eval hook.


def test_fvd_orders_corruptions(model, clips):
    assert F.fvd(clips, clips, model, resolution=RES, batch_size=BATCH) < 1e-6
    rng = np.random.default_rng(0)
    reference = feats(model, clips)

    def distance(videos):
        return F.frechet_distance(reference, feats(model, videos))

    def noisy(std):
        return np.clip(clips + rng.normal(0, std, clips.shape), 0, 255).astype(np.uint8)

    assert distance(clips[:, rng.permutation(clips.shape[1])]) > 1e-3  # shuffled frames
    d_noisy = distance(noisy(40))
    assert d_noisy > 1e-3
    assert distance(noisy(80)) > d_noisy  # more noise, further away


def test_evaluate_generator_adds_fvd(model, saved, tmp_path, monkeypatch):
    from lumiere_jax import sampling

    monkeypatch.setattr(F, "fvd", functools.partial(F.fvd, resolution=RES, batch_size=BATCH))
    config = ConfigDict({"world": dataclasses.asdict(WORLD),
                         "eval": {"num_samples": 4, "seed": 0}, "sample": {"guidance": 1.0}})
    rng = np.random.default_rng(1)
    calls = []

    def generator(prompts, seeds, guidance):
        split = "test" if not calls else "heldout"
        calls.append(split)
        source = ShapesSource(WORLD, split, len(prompts))
        truth = np.stack([source[i]["video"] for i in range(len(prompts))])
        assert [source[i]["caption"] for i in range(len(prompts))] == list(prompts)
        if split == "test":
            return truth  # a perfect generator
        return np.clip(truth + rng.normal(0, 60, truth.shape), 0, 255).astype(np.uint8)

    path, _ = saved
    report = sampling.evaluate_generator(generator, config, str(tmp_path), 7,
                                         fvd_weights=str(path))
    summary = report["summary"]
    assert summary["test"]["fvd"] < 1e-6 < summary["heldout"]["fvd"]
    on_disk = json.loads((tmp_path / "step_7.json").read_text())["summary"]
    assert on_disk["heldout"]["fvd"] == summary["heldout"]["fvd"]
    # Without weights there is no FVD; a bad path fails before anything is sampled.
    calls.clear()
    assert "fvd" not in sampling.evaluate_generator(generator, config, str(tmp_path), 8
                                                    )["summary"]["test"]
    calls.clear()
    with pytest.raises(FileNotFoundError):
        sampling.evaluate_generator(generator, config, str(tmp_path), 9,
                                    fvd_weights=str(tmp_path / "absent.npz"))
    assert not calls


def test_cli_has_fvd_flag():
    from absl import flags

    import lumiere_jax.cli  # noqa: F401  (defines the flags)
    assert flags.FLAGS["fvd_weights"].default == ""
