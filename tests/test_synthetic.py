"""The shapes world: determinism, splits, captions, geometry, speed."""

import time

import grain
import numpy as np
import pytest

from lumiere_jax.data import synthetic as S


def test_item_format_and_determinism():
    world = S.ShapesWorld(num_frames=16, height=32, width=32, fps=8.0, seed=3)
    source = S.ShapesSource(world, "train", size=50)
    item = source[7]
    assert set(item) == {"video", "caption", "attrs", "index"}
    assert item["video"].shape == (16, 32, 32, 3) and item["video"].dtype == np.uint8
    assert item["index"] == 7
    assert item["caption"] == S.caption_for(item["attrs"])
    assert item["attrs"]["trajectory"].shape == (16, 2)
    again = S.ShapesSource(world, "train", size=50)[7]  # a fresh source: same clip
    np.testing.assert_array_equal(item["video"], again["video"])
    assert item["caption"] == again["caption"]
    assert not np.array_equal(item["video"], source[8]["video"])
    other_seed = S.ShapesSource(S.ShapesWorld(seed=4), "train", size=50)[7]
    assert not np.array_equal(item["video"], other_seed["video"])
    assert source[-1]["index"] == 49
    with pytest.raises(IndexError, match="out of range"):
        source[50]
    assert len(source) == 50


@pytest.mark.parametrize(
    "frames, height, width", [(1, 32, 32), (2, 16, 16), (5, 64, 64), (3, 24, 40), (4, 128, 128)]
)
def test_any_frame_count_and_resolution(frames, height, width):
    world = S.ShapesWorld(num_frames=frames, height=height, width=width, fps=24.0)
    for i in range(5):
        item = S.ShapesSource(world, "test", 5)[i]
        assert item["video"].shape == (frames, height, width, 3)
        assert item["attrs"]["trajectory"].shape == (frames, 2)
        if frames == 1:  # images: no motion in attributes or caption
            assert item["attrs"]["motion"] is None
            assert "moving" not in item["caption"] and "still" not in item["caption"]


def test_splits_hold_out_combinations():
    assert len(S.HELDOUT_COMBINATIONS) == 4
    assert len(S.combinations("train")) == 14 and len(S.combinations("heldout")) == 4
    world = S.ShapesWorld(num_frames=1)
    seen = {
        split: {
            (a["colour"], a["shape"])
            for a in (S.ShapesSource(world, split, 300)[i]["attrs"] for i in range(300))
        }
        for split in S.SPLITS
    }
    assert seen["heldout"] == set(S.HELDOUT_COMBINATIONS)
    assert seen["train"] == set(S.combinations("train"))  # all 14 appear in 300 draws
    assert not seen["train"] & S.HELDOUT_COMBINATIONS
    assert not seen["test"] & S.HELDOUT_COMBINATIONS
    # Every colour and shape is still seen in training.
    assert {c for c, _ in seen["train"]} == set(S.COLOURS)
    assert {s for _, s in seen["train"]} == set(S.SHAPES)
    # 'train' and 'test' come from different seed streams: no shared clip.
    video_world = S.ShapesWorld()
    train = [S.ShapesSource(video_world, "train", 40)[i]["video"] for i in range(40)]
    test = [S.ShapesSource(video_world, "test", 40)[i]["video"] for i in range(40)]
    assert not any(np.array_equal(a, b) for a in train for b in test)
    with pytest.raises(ValueError, match="unknown split 'val'"):
        S.ShapesSource(video_world, "val", 10)


def test_attribute_values_all_appear():
    source = S.ShapesSource(S.ShapesWorld(num_frames=4), "train", 400)
    counts = {key: set() for key in S.SEMANTIC_KEYS}
    for i in range(400):
        for key in S.SEMANTIC_KEYS:
            counts[key].add(source[i]["attrs"][key])
    for key, values in S.ATTRIBUTE_VALUES.items():
        assert counts[key] == set(values), key
    assert len(S.MOTIONS) == 7 and len(S.COLOURS) == 6 and len(S.BACKGROUNDS) == 4


def test_size_weights_oversample_and_equal_weights_keep_the_clips():
    world = S.ShapesWorld(num_frames=4)
    plain = S.ShapesSource(world, "train", 600)
    equal = S.ShapesSource(world, "train", 600, size_weights={"small": 2.0, "large": 2.0})
    for i in range(20):  # equal weights draw exactly as no weights
        np.testing.assert_array_equal(plain[i]["video"], equal[i]["video"])
    skewed = S.ShapesSource(world, "train", 600, size_weights={"small": 3, "large": 1})
    small = np.mean([skewed[i]["attrs"]["size"] == "small" for i in range(600)])
    assert abs(small - 0.75) < 0.05, small  # 3 : 1, within 3 standard errors of 600 draws
    assert abs(np.mean([plain[i]["attrs"]["size"] == "small" for i in range(600)]) - 0.5) < 0.06
    only_small = S.ShapesSource(world, "test", 50, size_weights={"small": 1})
    assert {only_small[i]["attrs"]["size"] for i in range(50)} == {"small"}
    # The rest of the clip is still drawn: every motion and colour appears.
    assert {skewed[i]["attrs"]["motion"] for i in range(600)} == set(S.MOTIONS)
    with pytest.raises(ValueError, match=r"unknown sizes \['tiny'\]"):
        S.ShapesSource(world, "train", 10, size_weights={"tiny": 1, "small": 1})
    with pytest.raises(ValueError, match="not all 0"):
        S.ShapesSource(world, "train", 10, size_weights={"small": 0, "large": 0})
    with pytest.raises(ValueError, match=">= 0"):
        S.ShapesSource(world, "train", 10, size_weights={"small": -1, "large": 2})


def test_colours_are_far_from_each_other_and_from_backgrounds():
    palette = np.array(list(S.COLOURS.values()), float)
    gaps = np.linalg.norm(palette[:, None] - palette[None], axis=-1)
    assert gaps[~np.eye(len(palette), dtype=bool)].min() > 120
    for start, end in S.BACKGROUNDS.values():
        for level in np.linspace(start, end, 5):
            assert np.linalg.norm(palette - level, axis=-1).min() > 110
    # Backgrounds are neutral gray, objects are saturated.
    assert (palette.max(1) - palette.min(1)).min() >= 140


def test_trajectory_matches_rendered_object_and_moves_enough():
    world = S.ShapesWorld(num_frames=16, height=32, width=32)
    source = S.ShapesSource(world, "train", 120)
    for i in range(120):
        item = source[i]
        attrs, video = item["attrs"], item["video"].astype(np.float32)
        background = S.background_image(attrs, 32, 32)
        rgb = attrs["rgb"].astype(np.float32)
        # Recover the opacity from the pixels and compare its centroid with the trajectory.
        alpha = ((video - background) * (rgb - background)).sum(-1)
        alpha = np.clip(alpha / ((rgb - background) ** 2).sum(-1), 0, 1)
        alpha[alpha < 0.02] = 0  # uint8 rounding of the background biases every pixel a little
        ys, xs = np.mgrid[0:32, 0:32] + 0.5
        mass = alpha.sum((1, 2))
        centre = np.stack([(alpha * xs).sum((1, 2)) / mass, (alpha * ys).sum((1, 2)) / mass], -1)
        np.testing.assert_allclose(centre / 32, attrs["trajectory"], atol=0.3 / 32)
        # Area matches the shape's size (anti-aliasing keeps it exact to a few percent).
        radius = float(attrs["radius"]) * 32
        np.testing.assert_allclose(mass, S.shape_area(attrs["shape"], radius), rtol=0.06)
        # Fully in frame: no opacity on the outermost pixel ring.
        assert alpha[:, [0, -1], :].max() < 0.05 and alpha[:, :, [0, -1]].max() < 0.05
        travel = np.linalg.norm(attrs["trajectory"][-1] - attrs["trajectory"][0])
        direction = np.array(S.MOTION_DIRECTIONS[attrs["motion"]])
        if attrs["motion"] == "still":
            assert travel == 0
        else:
            assert 0.3 - 1e-4 <= travel <= 0.45 + 1e-4
            step = (attrs["trajectory"][-1] - attrs["trajectory"][0]) / travel
            np.testing.assert_allclose(step, direction, atol=1e-4)


def test_sizes_are_distinct():
    world = S.ShapesWorld(num_frames=1)
    radius = {"small": [], "large": []}
    source = S.ShapesSource(world, "train", 100)
    for i in range(100):
        attrs = source[i]["attrs"]
        radius[attrs["size"]].append(float(attrs["radius"]))
    assert max(radius["small"]) * 1.4 < min(radius["large"])


def test_caption_round_trip_and_grammar():
    source = S.ShapesSource(S.ShapesWorld(), "train", 100)
    for i in range(100):
        attrs = source[i]["attrs"]
        parsed = S.parse_caption(source[i]["caption"])
        assert parsed == {key: attrs[key] for key in S.SEMANTIC_KEYS}
    attrs = dict(shape="circle", colour="red", size="small", motion="left", background="gray")
    assert S.caption_for(attrs) == "a small red circle moving left on a gray background"
    still = S.caption_for({**attrs, "motion": "still"})
    assert still == "a small red circle standing still on a gray background"
    assert S.caption_for({"colour": "red", "shape": "circle"}) == "a red circle"
    assert S.caption_for({"size": "large"}) == "a large shape"
    assert S.parse_caption("A Red CIRCLE.") == {
        "shape": "circle", "colour": "red", "size": None, "motion": None, "background": None
    }
    parsed = S.parse_caption("a blue square moving up-right on a grey background")
    assert parsed["background"] == "gray" and parsed["motion"] == "up-right"
    assert S.parse_caption("") == {key: None for key in S.SEMANTIC_KEYS}


def test_parse_caption_errors_are_helpful():
    expected = r"unknown word 'circel'.*did you mean 'circle'\?.*Known words: .*triangle"
    with pytest.raises(ValueError, match=expected):
        S.parse_caption("a red circel moving left")
    with pytest.raises(ValueError, match="unknown word 'hexagon'"):
        S.parse_caption("a red hexagon")
    with pytest.raises(ValueError, match="two colours"):
        S.parse_caption("a red blue circle")
    with pytest.raises(TypeError):
        S.parse_caption(None)
    with pytest.raises(ValueError, match=r"unknown colour 'purpel'"):
        S.caption_for({"colour": "purpel"})


def test_render_from_partial_attributes():
    world = S.ShapesWorld(num_frames=8)
    attrs = S.parse_caption("a large yellow triangle moving down")
    with pytest.raises(ValueError, match="pass rng="):
        S.render(attrs, world)
    video = S.render(attrs, world, np.random.default_rng(0))
    np.testing.assert_array_equal(video, S.render(attrs, world, np.random.default_rng(0)))
    assert video.shape == (8, 32, 32, 3)
    # The yellow object is there and moves down.
    yellow = (video[..., 0] > 150) & (video[..., 1] > 150) & (video[..., 2] < 100)
    rows = [np.nonzero(frame)[0].mean() for frame in yellow]
    assert rows[-1] - rows[0] > 0.25 * 32
    # A placed clip re-renders at another resolution; the trajectory length must fit.
    placed = S.ShapesSource(world, "train", 4)[0]["attrs"]
    big = S.render(placed, S.ShapesWorld(num_frames=8, height=64, width=64))
    small = big.reshape(8, 32, 2, 32, 2, 3).mean((2, 4))
    assert np.abs(small - S.render(placed, world)).mean() < 2.0
    with pytest.raises(ValueError, match=r"trajectory.*\(16, 2\)"):
        S.render(placed, S.ShapesWorld(num_frames=16))


def test_world_validation():
    with pytest.raises(ValueError, match="height must be an int >= 16"):
        S.ShapesWorld(height=8)
    with pytest.raises(ValueError, match="num_frames"):
        S.ShapesWorld(num_frames=0)
    with pytest.raises(ValueError, match="fps"):
        S.ShapesWorld(fps=0)
    with pytest.raises(ValueError, match="size must be an int >= 1"):
        S.ShapesSource(S.ShapesWorld(), "train", 0)


def test_fast_enough():
    source = S.ShapesSource(S.ShapesWorld(), "train", 200)
    source[0]
    start = time.perf_counter()
    for i in range(200):
        source[i]
    per_clip = (time.perf_counter() - start) / 200
    assert per_clip < 0.01, f"{per_clip * 1e3:.1f} ms per 16x32x32 clip"


def test_works_as_a_grain_source():
    source = S.ShapesSource(S.ShapesWorld(num_frames=4), "train", 20)
    dataset = grain.MapDataset.source(source).seed(0).shuffle().map(lambda item: item["video"])
    first = dataset[0]
    assert first.shape == (4, 32, 32, 3)
    assert any(np.array_equal(first, source[i]["video"]) for i in range(20))
