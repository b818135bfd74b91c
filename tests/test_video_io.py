"""Video files: mp4 round trip, broken files, gif, png, contact sheets and grids."""

import numpy as np
import pytest
from PIL import Image

from lumiere_jax.data import synthetic as S
from lumiere_jax.data import video_io as V


@pytest.fixture(scope="module")
def clip():
    return S.ShapesSource(S.ShapesWorld(num_frames=12), "train", 4)[0]["video"]  # a moving shape


def test_mp4_round_trip(tmp_path, clip):
    path = tmp_path / "nested" / "clip.mp4"
    assert V.write_mp4(path, clip, fps=8) == (32, 32)
    frames, fps = V.read_video(path)
    assert frames.shape == clip.shape and frames.dtype == np.uint8
    assert fps == pytest.approx(8.0)
    error = np.abs(frames.astype(int) - clip.astype(int))
    assert error.mean() < 5.0  # H.264 + 4:2:0 chroma at crf 18; edges differ most
    assert np.median(error) <= 2


def test_mp4_scale_odd_sizes_and_fractional_fps(tmp_path, clip):
    assert V.write_mp4(tmp_path / "big.mp4", clip, fps=12, scale=4) == (128, 128)
    frames, fps = V.read_video(tmp_path / "big.mp4")
    assert frames.shape == (12, 128, 128, 3) and fps == pytest.approx(12.0)
    assert np.abs(frames[:, 1::4, 1::4].astype(int) - clip).mean() < 3.0  # crisp enlarged pixels
    odd = clip[:3, :17, :21]
    assert V.write_mp4(tmp_path / "odd.mp4", odd, fps=29.97) == (18, 22)  # padded to even
    frames, fps = V.read_video(tmp_path / "odd.mp4")
    assert frames.shape == (3, 18, 22, 3) and fps == pytest.approx(29.97, abs=1e-3)
    assert np.abs(frames[:, :17, :21].astype(int) - odd).mean() < 6.0
    V.write_mp4(tmp_path / "one.mp4", clip[:1], fps=1)
    assert V.read_video(tmp_path / "one.mp4")[0].shape == (1, 32, 32, 3)


def test_broken_files_raise_clear_errors(tmp_path, clip):
    path = tmp_path / "clip.mp4"
    V.write_mp4(path, clip, fps=8)
    data = path.read_bytes()
    for fraction in (0.3, 0.6, 0.9):
        broken = tmp_path / f"cut{fraction}.mp4"
        broken.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(ValueError, match=rf"{broken.name}.*(truncated|corrupt)"):
            V.read_video(broken)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 50)
    with pytest.raises(ValueError, match="junk.mp4.*truncated or corrupt"):
        V.read_video(junk)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        V.read_video(tmp_path / "missing.mp4")


def test_writers_reject_bad_input(tmp_path, clip):
    with pytest.raises(ValueError, match="uint8"):
        V.write_mp4(tmp_path / "a.mp4", clip.astype(np.float32), fps=8)
    with pytest.raises(ValueError, match=r"\[t, h, w, 3\]"):
        V.write_mp4(tmp_path / "a.mp4", clip[0], fps=8)
    with pytest.raises(ValueError, match="fps must be a positive number"):
        V.write_gif(tmp_path / "a.gif", clip, fps=0)
    with pytest.raises(ValueError, match="scale must be an int >= 1"):
        V.write_mp4(tmp_path / "a.mp4", clip, fps=8, scale=1.5)
    with pytest.raises(ValueError, match="write_png expects uint8"):
        V.write_png(tmp_path / "a.png", clip)


def test_gif_written_and_readable(tmp_path, clip):
    path = tmp_path / "clip.gif"
    V.write_gif(path, clip, fps=10, scale=2)
    with Image.open(path) as gif:
        assert gif.n_frames == 12 and gif.size == (64, 64)
        assert gif.info["duration"] == 100 and gif.info["loop"] == 0
        gif.seek(5)
        frame = np.asarray(gif.convert("RGB"))
    # Few colours: quantisation is exact up to the palette, enlarged 2x by repetition.
    assert np.abs(frame[::2, ::2].astype(int) - clip[5]).mean() < 2.0
    V.write_gif(tmp_path / "one.gif", clip[:1], fps=10)
    with Image.open(tmp_path / "one.gif") as gif:
        assert gif.n_frames == 1


def test_png_and_image_grid(tmp_path, clip):
    grid = V.image_grid(clip[:7], cols=3, pad=1, fill=255)
    assert grid.shape == (1 + 3 * 33, 1 + 3 * 33, 3)
    np.testing.assert_array_equal(grid[1:33, 1:33], clip[0])
    np.testing.assert_array_equal(grid[34:66, 1:33], clip[3])  # second row starts at image 3
    assert (grid[67:99, 34:66] == 255).all()  # empty cells stay blank
    V.write_png(tmp_path / "grid.png", grid)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "grid.png")), grid)
    with pytest.raises(ValueError, match="cols must be an int >= 1"):
        V.image_grid(clip, cols=0)


def test_contact_sheet_layout(clip):
    videos = [clip, clip[:3], clip[0]]  # 12 frames, 3 frames, one image
    sheet = V.contact_sheet(videos, max_frames=4, pad=2)
    assert sheet.dtype == np.uint8
    assert sheet.shape == (2 + 3 * (32 + 2), 2 + 4 * (32 + 2), 3)
    # Row 0 shows frames 0, 4, 7, 11 (evenly spaced).
    np.testing.assert_array_equal(sheet[2:34, 2:34], clip[0])
    np.testing.assert_array_equal(sheet[2:34, 2 + 3 * 34 : 34 + 3 * 34], clip[11])
    labelled = V.contact_sheet(videos, labels=["a", "b", "c"], max_frames=4, scale=2)
    assert labelled.shape[1] == 2 + 4 * (64 + 2)
    assert labelled.shape[0] > 2 + 3 * (64 + 2)  # label rows add height
    # A larger video in the same sheet: small ones are enlarged to the same cell size.
    mixed = V.contact_sheet([clip[:2], np.repeat(np.repeat(clip[:2], 2, 1), 2, 2)], max_frames=2)
    np.testing.assert_array_equal(mixed[2:66, 2:66], mixed[68:132, 2:66])
    with pytest.raises(ValueError, match="2 videos but 1 labels"):
        V.contact_sheet([clip, clip], labels=["x"])
    with pytest.raises(ValueError, match=r"video 1: .*uint8"):
        V.contact_sheet([clip, clip.astype(float)])
