"""The analytic evaluator: near-perfect on ground truth, clearly worse on corrupted videos."""

import numpy as np
import pytest

from lumiere_jax.data import synthetic as S
from lumiere_jax.eval import shapes as E

VIDEO_WORLD = S.ShapesWorld(num_frames=16, height=32, width=32)


def _items(world, count, split="train"):
    source = S.ShapesSource(world, split, count)
    return [source[i] for i in range(count)]


def _accuracy(items, videos=None):
    videos = [item["video"] for item in items] if videos is None else videos
    return E.score_batch(videos, [item["caption"] for item in items])


@pytest.fixture(scope="module")
def clips():
    # 160 seen and 40 held-out combinations.
    return _items(VIDEO_WORLD, 160) + _items(VIDEO_WORLD, 40, "heldout")


@pytest.mark.parametrize(
    "world",
    [
        VIDEO_WORLD,
        S.ShapesWorld(num_frames=1, height=32, width=32),
        S.ShapesWorld(num_frames=16, height=64, width=64),
    ],
    ids=["16x32x32", "1x32x32", "16x64x64"],
)
def test_ground_truth_is_scored_correct(world):
    items = _items(world, 160) + _items(world, 40, "heldout")
    scores = _accuracy(items)
    assert scores["n"] == 200
    for key in ("colour", "shape", "size", "background"):
        assert scores[f"{key}_acc"] >= 0.98, (key, scores)
    if world.num_frames > 1:
        assert scores["motion_acc"] >= 0.98, scores
        assert scores["stability"] >= 0.98, scores
    else:
        assert scores["motion_acc"] is None  # a single frame has no motion to score
    assert scores["persistence"] == 1.0
    assert scores["shape_iou"] > 0.95


def test_other_resolutions_and_clip_lengths():
    for world in [
        S.ShapesWorld(num_frames=4, height=128, width=128),
        S.ShapesWorld(num_frames=2, height=24, width=40),
        S.ShapesWorld(num_frames=5, height=16, width=16),
    ]:
        scores = _accuracy(_items(world, 30))
        for key in ("colour", "shape", "motion"):
            assert scores[f"{key}_acc"] >= 0.95, (world, key, scores)


def test_trajectory_is_tracked(clips):
    for item in clips[:50]:
        result = E.score_video(item["video"], item["caption"])
        error = np.abs(result["trajectory"] - item["attrs"]["trajectory"]) * 32
        assert error.max() < 0.5, (item["caption"], error.max())
    # At 128x128 the reduced working size must still report full-resolution coordinates.
    item = _items(S.ShapesWorld(num_frames=3, height=128, width=96), 1)[0]
    result = E.score_video(item["video"], item["attrs"])
    error = np.abs(result["trajectory"] - item["attrs"]["trajectory"]) * np.array([96, 128])
    assert error.max() < 1.0


def test_shuffled_frames_fail_motion(clips):
    moving = [item for item in clips if item["attrs"]["motion"] != "still"]
    rng = np.random.default_rng(0)
    shuffled = [item["video"][rng.permutation(16)] for item in moving]
    scores = _accuracy(moving, shuffled)
    assert scores["motion_acc"] <= 0.1, scores
    assert scores["colour_acc"] >= 0.98 and scores["shape_acc"] >= 0.98  # only motion broke


def test_motion_outcomes_by_size(clips):
    seen = clips[:160]
    truth = _accuracy(seen)["motion_by_size"]
    sizes = [item["attrs"]["size"] for item in seen]
    assert set(truth) == {"small", "large"}
    for size, counts in truth.items():
        assert sum(counts.values()) == sizes.count(size)
        assert counts["right"] >= 0.98 * sizes.count(size), (size, counts)
    # Played backwards, every moving clip goes the opposite way; still ones stay right.
    reversed_ = _accuracy(seen, [item["video"][::-1] for item in seen])["motion_by_size"]
    moving = sum(item["attrs"]["motion"] != "still" for item in seen)
    assert sum(c["opposite"] for c in reversed_.values()) >= 0.98 * moving
    # A moving clip captioned with a neighbouring or a still motion.
    item = next(i for i in seen if i["attrs"]["motion"] == "right")
    caption = item["caption"]
    turned = E.score_batch([item["video"]] * 2, [caption.replace("moving right", "moving up-right"),
                                                 caption.replace("moving right", "standing still")])
    assert turned["motion_by_size"][item["attrs"]["size"]] == dict(
        dict.fromkeys(E.MOTION_OUTCOMES, 0), neighbour=1, other=1)


def test_wrong_colour_fails_colour(clips):
    rng = np.random.default_rng(1)
    videos = []
    for item in clips[:100]:
        attrs = dict(item["attrs"])
        others = [c for c in S.COLOURS if c != attrs["colour"]]
        attrs["colour"] = others[rng.integers(len(others))]
        attrs["rgb"] = np.array(S.COLOURS[attrs["colour"]], np.uint8)
        videos.append(S.render(attrs, VIDEO_WORLD))  # same layout, another colour
    scores = _accuracy(clips[:100], videos)
    assert scores["colour_acc"] <= 0.02, scores
    assert scores["shape_acc"] >= 0.98 and scores["motion_acc"] >= 0.98


def _gaussian_blob(item, sigma_per_radius):
    """The right colour on the right path, but a Gaussian blob instead of the shape."""
    attrs, (_, h, w, _) = item["attrs"], item["video"].shape
    background = S.background_image(attrs, h, w)[None]
    centre = attrs["trajectory"] * np.array([w, h])
    sigma = sigma_per_radius * float(attrs["radius"]) * min(h, w)
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    square_distance = (xs - centre[:, 0, None, None]) ** 2 + (ys - centre[:, 1, None, None]) ** 2
    alpha = np.exp(-square_distance / (2 * sigma**2))[..., None]
    video = background + alpha * (attrs["rgb"].astype(np.float32) - background)
    return np.round(video).astype(np.uint8)


@pytest.mark.parametrize("sigma_per_radius", [0.6, 0.9])
def test_blobs_fail_shape(clips, sigma_per_radius):
    blobs = [_gaussian_blob(item, sigma_per_radius) for item in clips[:100]]
    scores = _accuracy(clips[:100], blobs)
    assert scores["shape_acc"] <= 0.02, scores  # circles too: a blob is not a circle
    assert scores["shape_iou"] < E.SHAPE_IOU_GATE - 0.05
    assert scores["colour_acc"] >= 0.98 and scores["motion_acc"] >= 0.98


def test_heavy_noise_scores_lower_and_mild_noise_does_not(clips):
    rng = np.random.default_rng(2)

    def noisy(sigma):
        videos = [item["video"] + rng.normal(0, sigma, item["video"].shape) for item in clips[:100]]
        return [np.clip(v, 0, 255).astype(np.uint8) for v in videos]

    heavy = _accuracy(clips[:100], noisy(60.0))
    assert heavy["shape_acc"] <= 0.5, heavy
    assert heavy["all_acc"] <= 0.3, heavy
    assert heavy["stability"] < 0.95
    mild = _accuracy(clips[:100], noisy(8.0))
    assert min(mild["colour_acc"], mild["shape_acc"], mild["motion_acc"]) >= 0.98, mild


def test_stability_drops_for_flicker_and_vanishing_objects(clips):
    items = clips[:60]
    clean = _accuracy(items)
    assert clean["stability"] >= 0.98 and clean["flicker"] <= 0.02
    rng = np.random.default_rng(3)
    flickering = [
        np.clip(item["video"] + rng.uniform(-40, 40, (16, 1, 1, 1)), 0, 255).astype(np.uint8)
        for item in items
    ]
    flicker = _accuracy(items, flickering)
    assert flicker["stability"] < clean["stability"] - 0.04, (flicker, clean)
    assert flicker["shape_acc"] >= 0.98  # the content is still right

    vanishing = []
    for item in items:  # the object disappears in every other frame
        video = item["video"].copy()
        background = S.background_image(item["attrs"], 32, 32)
        video[1::2] = np.round(background).astype(np.uint8)
        vanishing.append(video)
    gone = _accuracy(items, vanishing)
    assert gone["persistence"] == pytest.approx(0.5)
    assert gone["stability"] < clean["stability"] - 0.2, gone


def test_score_video_fields_and_edge_cases(clips):
    item = clips[0]
    by_caption = E.score_video(item["video"], item["caption"])
    by_attrs = E.score_video(item["video"], item["attrs"])
    for key in ("colour", "shape", "motion", "size", "stability", "persistence"):
        assert by_caption[key] == by_attrs[key]
    assert by_caption["trajectory"].shape == (16, 2)
    assert by_caption["stability"] == pytest.approx(1 - by_caption["flicker"])
    parts = [by_caption[f"flicker_{p}"] for p in ("background", "colour", "area")]
    assert by_caption["flicker"] == pytest.approx(np.mean(parts))
    # A caption that names only the colour scores only the colour.
    partial = E.score_video(item["video"], f"a {item['attrs']['colour']} shape")
    assert partial["colour_ok"] is True
    assert partial["shape_ok"] is None and partial["motion_ok"] is None
    # An image [h, w, 3] is a one-frame video: no motion score.
    still = E.score_video(item["video"][0], item["caption"])
    assert still["motion"] is None and still["motion_ok"] is None and still["shape_ok"] is True
    # Background only: nothing found, everything named counts as wrong.
    empty = np.broadcast_to(item["video"][:, :1, :1], item["video"].shape).copy()
    result = E.score_video(empty, item["caption"])
    assert result["persistence"] == 0.0
    assert result["colour_ok"] is False and result["shape_ok"] is False
    assert result["motion_ok"] is False
    assert np.isnan(result["trajectory"]).all()


def test_bad_input_gets_clear_errors(clips):
    video = clips[0]["video"]
    with pytest.raises(ValueError, match="uint8"):
        E.score_video(video.astype(np.float32) / 255, "a red circle")
    with pytest.raises(ValueError, match=r"\[t, h, w, 3\]"):
        E.score_video(video[..., :2], "a red circle")
    with pytest.raises(ValueError, match="did you mean 'circle'"):
        E.score_video(video, "a red cirlce")
    with pytest.raises(TypeError, match="caption str or an attribute dict"):
        E.score_video(video, 3)
    with pytest.raises(ValueError, match="2 videos but 1 captions"):
        E.score_batch([video, video], ["a red circle"])
