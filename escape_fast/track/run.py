"""Tracking one video into files: what ``python -m escape_fast.track`` and the demo page run.

:func:`track_video` streams a video through a :class:`Tracker`, appends
each frame to the progress file as it goes, and at the end (or when it is
stopped) writes the result files of escape_fast.track.outputs; a stopped
run continues with ``TrackOptions(resume=True)``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from escape_fast.data.video import open_frames
from escape_fast.errors import DataError, UsageError
from escape_fast.predict.predictor import Predictor
from escape_fast.track.outputs import (ProgressLog, likelihood, read_progress, write_json_result, write_labeled_video,
                                       write_pose_files, write_trajectories)
from escape_fast.track.smoothing import SmoothingConfig, smooth_track
from escape_fast.track.tracker import Tracker, TrackingConfig

FLUSH_EVERY = 16  # frames between flushes of the progress file


@dataclass(frozen=True)
class TrackOptions:
    """How one video is tracked: frames ``start:stop:step``, trunk batch
    size (None: the Tracker's), the smoother, the labelled video, turned
    crops; ``resume`` continues a progress file, ``overwrite`` starts again
    over one (neither: an existing progress file is an error)."""

    start: int = 0
    stop: int | None = None
    step: int = 1
    batch_size: int | None = None
    smooth: bool = True
    labeled_video: bool = True
    rotate: bool = True
    resume: bool = False
    overwrite: bool = False


def _settings(options: TrackOptions, predictor, video: str) -> dict:
    """What a progress file must have been made with for --resume to continue it."""
    return {"video": os.path.abspath(video) if os.path.exists(video) else video, "start": options.start,
            "stop": options.stop, "step": options.step, "checkpoint": str(predictor.checkpoint),
            "method": predictor.method, "keypoint_names": list(predictor.names), "rotate": options.rotate}


def track_video(options: TrackOptions, predictor: Predictor, video: str, stem: str, on_progress=None,
                labeled_suffix: str = ".labeled.mp4", annotated: dict | None = None) -> dict:
    """Track one video into the files at ``stem``; returns its summary.

    ``annotated``: {frame index: KeypointSet} of this video's frames that
    are supports; tracking that starts on one starts from its keypoints
    instead of searching for the object.

    ``on_progress(phase, done, total)`` ("tracking" then "labelled video";
    total None when the video does not say) replaces the progress bars."""
    source = open_frames(video)
    progress_path = stem + ".progress.jsonl"
    settings = _settings(options, predictor, video)
    done = []
    if os.path.exists(progress_path):
        if options.resume:
            header, done = read_progress(progress_path)
            differ = [k for k in settings if header.get(k) != settings[k]]
            if differ:
                raise DataError(f"{progress_path}: made with other settings ({', '.join(differ)}: "
                                f"{[header.get(k) for k in differ]}); --overwrite starts again")
        elif not options.overwrite:
            raise UsageError(f"{progress_path} exists (an earlier run); --resume continues it, --overwrite starts "
                             "again")
    tracker = Tracker(predictor, TrackingConfig(rotate=options.rotate), options.batch_size)
    if annotated and options.start in annotated:  # before resume: a resumed run rebuilds the same state
        kps = annotated[options.start]
        tracker.start_at(options.start - options.step, kps.keypoints, kps.visible)
    tracker.resume(done)
    start = done[-1].index + options.step if done else options.start
    stop = options.stop if options.stop is not None else (source.count or None)
    total = None if stop is None else max(0, (stop - options.start + options.step - 1) // options.step)
    frames = list(done)
    log = ProgressLog(progress_path, settings, append=bool(done))
    from tqdm import tqdm

    bar = tqdm(total=total, initial=len(done), unit="frame", desc=os.path.basename(video), dynamic_ncols=True,
               file=sys.stderr, disable=on_progress is not None)
    t0, complete = time.perf_counter(), False
    try:
        for frame in tracker.track(source.frames(start, options.stop, options.step), name=source.name):
            log.add(frame)
            frames.append(frame)
            bar.update(1)
            if on_progress is not None:
                on_progress("tracking", len(frames), total)
            if len(frames) % FLUSH_EVERY == 0:
                log.flush()
        complete = True
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (escape_fast.cli): say how far it got; the files follow
        if frames:
            print(f"escape_fast.track: {source.name}: stopped after frame {frames[-1].index} ({len(frames)} "
                  "frames); writing them; --resume continues", file=sys.stderr, flush=True)
        raise
    finally:
        # whatever ended the loop (a stop, a frame of another size), the frames done are written whole
        log.close()
        bar.close()
        seconds = time.perf_counter() - t0
        summary = _write_results(options, predictor, tracker, source, frames, stem, seconds, len(frames) - len(done))
    if complete and options.labeled_video and frames:
        video_bar = tqdm(total=len(frames), unit="frame", desc="labelled video", file=sys.stderr, dynamic_ncols=True,
                         disable=on_progress is not None)

        def drawn():
            video_bar.update(1)
            if on_progress is not None:
                on_progress("labelled video", video_bar.n, len(frames))

        try:
            write_labeled_video(stem + labeled_suffix, source, frames, summary.pop("_positions"),
                                predictor.skeleton, source.fps, drawn)
        finally:
            video_bar.close()
    summary.pop("_positions", None)
    return summary


def _write_results(options, predictor, tracker, source, frames, stem, seconds, new_frames) -> dict:
    reference = tracker.reference
    ok = [f for f in frames if f.ok]
    smoothed = None if not options.smooth else smooth_track(frames, reference, SmoothingConfig())
    raw = np.stack([f.keypoints if f.ok else np.full((len(reference), 2), np.nan) for f in frames]) \
        if frames else np.zeros((0, len(reference), 2))
    positions = raw if smoothed is None else smoothed
    known = tracker.known
    low = sum(int((known & ~f.confident).sum()) for f in ok)
    stats = {"frames": len(frames), "failed": len(frames) - len(ok), "seconds": round(seconds, 2),
             "fps": round(new_frames / seconds, 2) if seconds > 0 else None,
             "low_confidence_share": round(low / max(1, int(known.sum()) * len(ok)), 4),
             "searches": sum(f.searched for f in frames), "skipped_undecodable": source.skipped,
             "smoothed": smoothed is not None}
    video = {"file": source.name, "fps": source.fps, "size": list(source.size), "frames_declared": source.count,
             "start": options.start, "stop": options.stop, "step": options.step}
    if frames:
        write_json_result(stem + ".json", video, predictor.names, predictor.skeleton, frames,
                          positions if smoothed is not None else np.full_like(raw, np.nan), reference, stats)
        # the DeepLabCut and SLEAP files have a row per frame of the video from 0 to the last tracked one
        # (their index is the frame number; NaN where a frame was not tracked)
        index = np.array([f.index for f in frames])
        full = np.full((index[-1] + 1, *positions.shape[1:]), np.nan)
        full[index] = positions
        conf = np.full(full.shape[:2], np.nan)
        conf[index] = likelihood(frames, reference)
        write_pose_files(stem, full, conf, predictor.names, source.fps)
        write_trajectories(stem + ".trajectories.png", frames, positions, predictor.names, source.fps)
    stats["_positions"] = positions
    return stats
