"""Tracking videos (escape_fast.track): the layout fit, the smoother, the tracker on a synthetic
video with ground truth, and the command on the real fly video of shared/ (files read back with
the tools they are for, resume after a stop, bad input)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fly_video import FLIES, FLY, needs_video

from escape_fast.data.synthetic.video import keypoint_names, render_video, skeleton, video_spec
from escape_fast.predict import KeypointSet, Predictor
from escape_fast.track import SmoothingConfig, TrackedFrame, Tracker, fit_layout, rts_smooth, smooth_track


# ------------------------------------------------------------------ the layout fit
@pytest.mark.parametrize("mirror", [False, True])
def test_fit_layout_recovers_a_similarity_despite_an_outlier(mirror):
    rng = np.random.default_rng(0)
    offsets = rng.uniform(-0.5, 0.5, (9, 2))
    offsets[3] = np.nan  # a keypoint no support shows
    angle, size, center = 0.7, 80.0, np.array([300.0, 200.0])
    c, s = np.cos(angle), np.sin(angle)
    o = offsets * [-1, 1] if mirror else offsets
    points = center + size * o @ np.array([[c, -s], [s, c]]).T
    points[5] += [60, -40]  # one keypoint decoded on something else
    use = np.ones(9, bool)
    got_center, got_size, got_angle = fit_layout(offsets, points, use)
    np.testing.assert_allclose(got_center, center, atol=1e-6)
    assert got_size == pytest.approx(size, rel=1e-6)
    if not mirror:
        assert got_angle == pytest.approx(angle, abs=1e-6)
    assert fit_layout(offsets, points, np.eye(9, dtype=bool)[0]) is None  # one point fixes no similarity


# ------------------------------------------------------------------ the smoother
def test_smoother_reduces_noise_and_keeps_what_it_does_not_use():
    rng = np.random.default_rng(1)
    t = np.arange(200.0)
    truth = np.stack([np.stack([100 + 0.5 * t, 50 + 10 * np.sin(t / 30)], -1)] * 3, 1)  # [T, 3, 2]
    noisy = truth + rng.normal(0, 2.0, truth.shape)
    use = np.ones((200, 3), bool)
    use[50:60, 1] = False  # low-confidence points: kept as measured
    noisy[55, 1] = [900, 900]
    noisy[:, 2] = np.nan  # a keypoint never known stays unknown
    out = rts_smooth(t, noisy, np.ones((200, 3)), use, size=100.0, config=SmoothingConfig(0.02, 0.01))
    err_raw = np.abs(noisy[:, 0] - truth[:, 0]).mean()
    err_smooth = np.abs(out[:, 0] - truth[:, 0]).mean()
    assert err_smooth < 0.6 * err_raw
    np.testing.assert_array_equal(out[50:60, 1], noisy[50:60, 1])
    assert np.isnan(out[:, 2]).all()
    assert np.array_equal(rts_smooth(t[:1], noisy[:1], np.ones((1, 3)), use[:1], 100.0), noisy[:1], equal_nan=True)


# ------------------------------------------------------------------ the tracker on ground truth
@pytest.fixture(scope="module")
def synthetic():
    spec = video_spec(7, 0, frames=150)  # 640 x 480; the first 24 frames, before the occluder comes
    frames = list(itertools.islice(render_video(spec), 24))
    return spec, [f[0] for f in frames], np.stack([f[1] for f in frames]), np.stack([f[2] for f in frames])


def test_tracker_follows_a_synthetic_object_better_than_copying_the_support(synthetic):
    spec, images, truth, boxes = synthetic
    names = keypoint_names(spec.category)
    assert skeleton(spec.category) and len(names) == truth.shape[1]
    support = KeypointSet(tuple(names), truth[0, :, :2].copy(), truth[0, :, 2] > 0, (), boxes[0].copy(), "frame 0")
    predictor = Predictor("builtin", device="cpu").adapt(images[0], support)
    tracker = Tracker(predictor)
    results = list(tracker.track(enumerate(images), "synthetic"))
    assert [r.index for r in results] == list(range(len(images)))
    assert tracker.stats.frames == len(images) and tracker.stats.searches >= 1  # the first frame is searched
    hit = vis = copy_hit = 0
    for r, kp, box in zip(results, truth, boxes):
        v = kp[:, 2] > 0
        tol = 0.2 * max(box[2:])
        hit += int((np.linalg.norm(r.keypoints[v] - kp[v, :2], axis=1) <= tol).sum())
        copied = box[:2] + (truth[0, :, :2] - boxes[0, :2]) / boxes[0, 2:] * box[2:]
        copy_hit += int((np.linalg.norm(copied[v] - kp[v, :2], axis=1) <= tol).sum())
        vis += int(v.sum())
    assert hit / vis > copy_hit / vis + 0.1, (hit / vis, copy_hit / vis)
    smoothed = smooth_track(results, tracker.reference)
    assert smoothed.shape == (len(images), len(names), 2)
    low = ~np.stack([r.confident for r in results])
    np.testing.assert_array_equal(smoothed[low], np.stack([r.keypoints for r in results])[low])


def test_resume_rebuilds_the_state_the_tracker_had(synthetic):
    spec, images, truth, boxes = synthetic
    names = keypoint_names(spec.category)
    support = KeypointSet(tuple(names), truth[0, :, :2].copy(), truth[0, :, 2] > 0, (), boxes[0].copy(), "frame 0")
    predictor = Predictor("builtin", device="cpu").adapt(images[0], support)
    whole = list(Tracker(predictor, batch_size=4).track(enumerate(images[:17])))
    # frame 0 is searched alone, then batches of 4 come: 1-4, 5-8, 9-12 (unless a re-search moved them)
    assert not any(f.searched for f in whole[1:9])
    again = Tracker(predictor, batch_size=4)
    again.resume([TrackedFrame.of_record(json.loads(json.dumps(f.as_record()))) for f in whole[:9]])
    rest = list(again.track(enumerate(images[9:17], 9)))
    assert [f.index for f in rest] == list(range(9, 17))
    for a, b in zip(whole[9:], rest):  # resumed at a batch boundary: the same crops, the same keypoints
        np.testing.assert_allclose(a.keypoints, b.keypoints, atol=1e-6)


# ------------------------------------------------------------------ the command on a real video
@pytest.fixture
def fly_keypoints(tmp_path):
    path = tmp_path / "fly0.json"
    path.write_text(json.dumps(FLY))
    return path


def _track(args):
    from escape_fast.track.__main__ import main

    return main([str(a) for a in args])


@needs_video
def test_command_tracks_the_fly_video_into_files_the_tools_read(tmp_path, fly_keypoints, capsys):
    movement = pytest.importorskip("movement.io.load_poses")
    sio = pytest.importorskip("sleap_io")
    from escape_fast.data.video import open_frames

    out = tmp_path / "out"
    code = _track([FLIES, "--support-frame", 0, "--support-keypoints", fly_keypoints, "--out", out,
                   "--start", 0, "--stop", 24, "--step", 2])
    assert code == 0, capsys.readouterr().err
    summary = capsys.readouterr().out
    assert "12 frames" in summary and "low-confidence points" in summary
    stem = out / "flies_pair_384px"
    result = json.loads(Path(f"{stem}.json").read_text())
    assert [f["frame"] for f in result["frames"]] == list(range(0, 24, 2))
    assert result["keypoint_names"] == FLY["names"] and result["summary"]["frames"] == 12
    # DeepLabCut's layout, read back by movement: a row per video frame, NaN between the steps
    for suffix in (".escape_fast.h5", ".escape_fast.csv"):
        ds = movement.from_dlc_file(f"{stem}{suffix}", fps=15)
        assert list(ds.keypoints.values) == FLY["names"] and ds.sizes["time"] == 23
        pos = ds.position.values[:, :, :, 0]  # [T, 2, K]
        assert np.isfinite(pos[::2]).all() and np.isnan(pos[1::2]).all()
        smoothed = np.array([[[np.nan if v is None else v for v in p] for p in f["smoothed"]]
                             for f in result["frames"]])
        np.testing.assert_allclose(pos[::2].transpose(0, 2, 1), smoothed, atol=1e-3)
        conf = ds.confidence.values[::2, :, 0]
        assert ((conf >= 0) & (conf <= 1)).all()
    header = Path(f"{stem}.escape_fast.csv").read_text().splitlines()[:3]
    assert header[0].startswith("scorer,escape_fast") and header[1].startswith("bodyparts,head,head,head")
    assert header[2].startswith("coords,x,y,likelihood")
    # SLEAP's analysis file, read by SLEAP's own reader
    labels = sio.load_file(f"{stem}.analysis.h5")
    assert [n.name for n in labels.skeletons[0].nodes] == FLY["names"]
    assert len(labels.labeled_frames) == 12
    # the labelled video: one frame per tracked frame, the frame size of the video
    video = open_frames(f"{stem}.labeled.mp4")
    assert video.size == (384, 384) and sum(1 for _ in video) == 12
    assert Path(f"{stem}.trajectories.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


@needs_video
def test_a_stopped_run_keeps_its_frames_and_resume_completes_it(tmp_path, fly_keypoints, capsys, monkeypatch):
    from escape_fast.track import tracker as tracker_module

    out = tmp_path / "out"
    args = [FLIES, "--support-frame", 0, "--support-keypoints", fly_keypoints, "--out", out, "--stop", 20,
            "--no-video"]
    real_track = tracker_module.Tracker.track

    def stopping(self, frames, name="video"):
        for n, frame in enumerate(real_track(self, frames, name)):
            if n == 9:
                raise KeyboardInterrupt
            yield frame

    monkeypatch.setattr(tracker_module.Tracker, "track", stopping)
    assert _track(args) == 130
    err = capsys.readouterr().err
    assert "stopped after frame 8 (9 frames)" in err and "--resume continues" in err
    stem = out / "flies_pair_384px"
    first = json.loads(Path(f"{stem}.json").read_text())
    assert [f["frame"] for f in first["frames"]] == list(range(9))  # complete files of the frames done
    monkeypatch.setattr(tracker_module.Tracker, "track", real_track)
    assert _track(args) == 2  # the earlier run's files are not silently overwritten
    assert "--resume continues it" in capsys.readouterr().err
    assert _track(args + ["--resume"]) == 0
    done = json.loads(Path(f"{stem}.json").read_text())
    assert [f["frame"] for f in done["frames"]] == list(range(20))
    assert [f["keypoints"] for f in done["frames"][:9]] == [f["keypoints"] for f in first["frames"]]


@needs_video
@pytest.mark.parametrize("case", ["not a video", "support frame past the end", "no support", "frames change size"])
def test_bad_input_is_one_line_with_exit_code_2(tmp_path, fly_keypoints, capsys, case):
    out = tmp_path / "out"
    if case == "not a video":
        bad = tmp_path / "broken.mp4"
        bad.write_bytes(b"\x00" * 1000)
        args = [bad, "--support-frame", 0, "--support-keypoints", fly_keypoints]
        message = "broken.mp4: not a readable video"
    elif case == "support frame past the end":
        args = [FLIES, "--support-frame", 5000, "--support-keypoints", fly_keypoints]
        message = "flies_pair_384px.mp4: frame 5000 is past the end"
    elif case == "no support":
        args = [FLIES, "--support-keypoints", fly_keypoints]
        message = "no support"
    else:  # a folder of frames whose sixth frame is larger: the five before it are written, whole
        from escape_fast.data.video import open_frames

        frames = tmp_path / "frames"
        frames.mkdir()
        for n, frame in open_frames(FLIES).frames(0, 6):
            image = Image.fromarray(frame)
            (image.resize((400, 400)) if n == 5 else image).save(frames / f"{n:03d}.png")
        args = [frames, "--support-frame", 0, "--support-keypoints", fly_keypoints, "--batch-size", 1]
        message = "frames: frame 5 is 400 x 400 pixels, the first was 384 x 384"
    assert _track(args + ["--out", out]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "%|" not in line and line.strip()]
    assert len(err) == 1 and err[0].startswith("escape_fast.track: error: ") and message in err[0], err  # + the bar
    if case == "frames change size":
        result = json.loads((out / "frames.json").read_text())
        assert [f["frame"] for f in result["frames"]] == [0, 1, 2, 3, 4]
        assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    else:
        assert not out.exists() or not any(out.iterdir())


def test_smoother_starts_afresh_after_a_jump_or_a_gap():
    t = np.arange(100.0)
    points = np.zeros((100, 1, 2))
    points[:, 0, 0] = np.where(t < 50, 100.0, 400.0)  # the tracker moved to another place at frame 50
    use = np.ones((100, 1), bool)
    use[20:40] = False  # a gap longer than max_gap
    points[40:50, 0, 0] = 200.0
    out = rts_smooth(t, points, np.ones((100, 1)), use, size=100.0)
    np.testing.assert_allclose(out[:20, 0, 0], 100.0, atol=1e-6)  # nothing of 200 leaks back over the gap
    np.testing.assert_allclose(out[40:50, 0, 0], 200.0, atol=1e-6)
    np.testing.assert_allclose(out[50:, 0, 0], 400.0, atol=1e-6)
