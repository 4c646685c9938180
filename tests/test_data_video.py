"""Frames of real videos (the fly videos in shared/) and of image folders: counts,
ranges, one frame, and bad input named by file and frame."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from fly_video import FLIES, needs_video

from escape_fast.data.video import open_frames
from escape_fast.errors import DataError, DataWarning

pytest.importorskip("av", reason="PyAV (the video extra) is not installed")


@needs_video
def test_a_real_video_streams_every_frame_in_order():
    video = open_frames(FLIES)
    assert video.size == (384, 384) and video.fps == pytest.approx(15) and video.count == 1100
    n, last, first = 0, -1, None
    for index, frame in video:
        assert index == last + 1 and frame.shape == (384, 384, 3) and frame.dtype == np.uint8
        first = frame if first is None else first
        last, n = index, n + 1
    assert n == video.count and video.skipped == 0
    assert np.array_equal(video.frame(0), first)


@needs_video
def test_ranges_and_one_frame():
    video = open_frames(FLIES)
    picked = list(video.frames(10, 40, 7))
    assert [i for i, _ in picked] == [10, 17, 24, 31, 38]
    assert np.array_equal(video.frame(17), picked[1][1])
    assert not np.array_equal(picked[0][1], picked[1][1])  # a video, not one still
    with pytest.raises(DataError, match=r"flies_pair_384px.mp4: frame 5000 is past the end \(it has 1100 frames"):
        video.frame(5000)
    with pytest.raises(DataError, match="is not a range"):
        list(video.frames(5, 2))


@needs_video
def test_a_truncated_video_gives_the_frames_before_the_cut(tmp_path):
    cut = tmp_path / "cut.mp4"
    data = FLIES.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    try:
        video = open_frames(cut)
    except DataError as exc:  # an mp4 cut before its index: refused with the file named
        assert str(cut) in str(exc)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        frames = sum(1 for _ in video)
    assert 0 < frames < 1100


def test_bad_files_are_named(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(DataError, match=r"notes.mp4: not a readable video"):
        open_frames(text)
    with pytest.raises(DataError, match=r"missing.mp4: no such video file"):
        open_frames(tmp_path / "missing.mp4")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no image files"):
        open_frames(empty)


def test_image_folders_and_globs(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(tmp_path / f"f{i:02d}.png")
    (tmp_path / "f02.png").write_bytes(b"broken")  # skipped, counted and reported; the others go on
    folder = open_frames(tmp_path)
    assert folder.count == 4 and folder.size == (40, 30) and folder.fps is None
    with pytest.warns(DataWarning, match="f02.png.*frame 2 skipped"):
        got = [i for i, _ in folder]
    assert got == [0, 1, 3] and folder.skipped == 1
    assert [i for i, _ in open_frames(str(tmp_path / "f0[01].png"))] == [0, 1]
    Image.fromarray(np.zeros((31, 40, 3), dtype=np.uint8)).save(tmp_path / "f09.png")
    with pytest.warns(DataWarning), pytest.raises(DataError, match="frame 4 is 40 x 31 pixels, the first was 40 x 30"):
        list(open_frames(tmp_path))


@needs_video
def test_one_frame_by_seeking_is_the_frame_decoding_from_the_start_gives():
    from escape_fast.data.video import FrameSource

    video = open_frames(FLIES)
    for n in (1, 17, 250, 777, video.count - 1):  # keyframes and frames between them
        assert np.array_equal(video.frame(n), FrameSource.frame(video, n)), n
