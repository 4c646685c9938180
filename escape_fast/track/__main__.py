"""Track one animal's keypoints through videos from one or a few annotated frames.

    python -m escape_fast.track VIDEO [VIDEO ...] --support-frame 0 --support-keypoints frame0.json --out tracks/

A video is a file PyAV decodes (mp4, avi, mov, mkv, ...), a folder of
frames or a glob of them. Supports are frames of the first video
(``--support-frame N``) or other images (``--support IMG``), each with a
keypoint file (escape_fast.data.keypoint_file). Writes, per video, the
files of escape_fast.track.outputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from escape_fast import builtin, cli
from escape_fast.data.video import open_frames
from escape_fast.errors import DataError, UsageError
from escape_fast.files import remove_stale
from escape_fast.predict.predictor import Predictor
from escape_fast.track.outputs import (ProgressLog, likelihood, output_stem, read_progress, write_json_result,
                                       write_labeled_video, write_pose_files, write_trajectories)
from escape_fast.track.smoothing import SmoothingConfig, smooth_track
from escape_fast.track.tracker import Tracker, TrackingConfig

FLUSH_EVERY = 16  # frames between flushes of the progress file


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m escape_fast.track",
        description="Track one animal's keypoints through videos, from one or a few annotated frames (of the video "
                    "itself or other images). One animal per video: with several in view it follows the one found "
                    "on the first frame. Writes, per video, NAME.json, DeepLabCut NAME.escape_fast.h5/.csv, a SLEAP "
                    "NAME.analysis.h5, NAME.trajectories.png and NAME.labeled.mp4 to --out.",
        epilog="Keypoint file: {\"names\": [...], \"keypoints\": [[x, y], ...], \"skeleton\": [[0, 1], ...], "
               "\"box\": [x, y, w, h]} (see README.md). Ctrl-C keeps the frames done so far in complete files; "
               "--resume continues.")
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video file, folder of frames or glob of frames")
    p.add_argument("--support-frame", action="append", type=int, default=[], metavar="N",
                   help="frame N (from 0) of the first video (or --support-video) as a support; repeatable")
    p.add_argument("--support-video", metavar="VIDEO", help="the video that --support-frame reads (default: the first)")
    p.add_argument("--support", action="append", default=[], metavar="IMG", help="a support image; repeatable")
    p.add_argument("--support-keypoints", action="append", required=True, metavar="KP.json",
                   help="keypoint file of each support: those of --support-frame first, then of --support, in order")
    p.add_argument("--support-box", action="append", type=cli.box_argument, metavar="x,y,w,h",
                   help="object box of each support, in the same order (default: the keypoint file's box)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--start", type=int, default=0, help="first frame to track (default 0)")
    p.add_argument("--stop", type=int, help="track up to this frame, not included (default: the end)")
    p.add_argument("--step", type=int, default=1, help="track every STEP-th frame (default 1)")
    p.add_argument("--checkpoint", metavar="MODEL",
                   help=f"as in escape_fast.predict (default: {builtin.PHOTO_MODEL}, the model for photographs)")
    p.add_argument("--method", choices=("escape", "map", "mle"), help="prototype estimate (default: the model's best)")
    p.add_argument("--device", default="auto", help="auto (GPU when present) | cpu | cuda")
    p.add_argument("--batch-size", type=int, help="frames per trunk batch (default 4)")
    p.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda", "triton", "reference"))
    p.add_argument("--no-smooth", action="store_true", help="write the keypoints as decoded, without the smoother")
    p.add_argument("--no-video", action="store_true", help="do not write the labelled video")
    p.add_argument("--no-rotate", action="store_true", help="crop upright instead of turning crops with the animal")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the runs whose progress files are in --out")
    group.add_argument("--overwrite", action="store_true", help="start again where --out holds earlier results")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return cli.run_main("escape_fast.track", lambda: run(args))


def _supports(args):
    images, names = [], []
    if args.support_frame:
        source = open_frames(args.support_video or args.videos[0])
        for n in args.support_frame:
            images.append(source.frame(n))
            names.append(f"{source.name}#frame{n}")
    images += args.support
    names += args.support
    if not images:
        raise UsageError("no support: give --support-frame N (a frame of the video) or --support IMG, each with "
                         "--support-keypoints")
    if len(args.support_keypoints) != len(images):
        raise UsageError(f"{len(images)} supports but {len(args.support_keypoints)} --support-keypoints files; give "
                         "one per support (--support-frame first, then --support)")
    if args.support_box is not None and len(args.support_box) != len(images):
        raise UsageError(f"{len(args.support_box)} --support-box for {len(images)} supports; give one per support")
    return images, names


def _settings(args, predictor, video: str) -> dict:
    return {"video": os.path.abspath(video) if os.path.exists(video) else video, "start": args.start,
            "stop": args.stop, "step": args.step, "checkpoint": str(predictor.checkpoint), "method": predictor.method,
            "keypoint_names": list(predictor.names), "rotate": not args.no_rotate}


def track_video(args, predictor: Predictor, video: str, stem: str, on_progress=None,
                labeled_suffix: str = ".labeled.mp4") -> dict:
    """Track one video into the files at ``stem``; returns its summary.

    ``on_progress(phase, done, total)`` ("tracking" then "labelled video";
    total None when the video does not say) replaces the progress bars."""
    source = open_frames(video)
    progress_path = stem + ".progress.jsonl"
    settings = _settings(args, predictor, video)
    done = []
    if os.path.exists(progress_path):
        if args.resume:
            header, done = read_progress(progress_path)
            differ = [k for k in settings if header.get(k) != settings[k]]
            if differ:
                raise DataError(f"{progress_path}: made with other settings ({', '.join(differ)}: "
                                f"{[header.get(k) for k in differ]}); --overwrite starts again")
        elif not args.overwrite:
            raise UsageError(f"{progress_path} exists (an earlier run); --resume continues it, --overwrite starts "
                             "again")
    tracker = Tracker(predictor, TrackingConfig(rotate=not args.no_rotate), args.batch_size)
    tracker.resume(done)
    start = done[-1].index + args.step if done else args.start
    stop = args.stop if args.stop is not None else (source.count or None)
    total = None if stop is None else max(0, (stop - args.start + args.step - 1) // args.step)
    frames = list(done)
    log = ProgressLog(progress_path, settings, append=bool(done))
    from tqdm import tqdm

    bar = tqdm(total=total, initial=len(done), unit="frame", desc=os.path.basename(video), dynamic_ncols=True,
               file=sys.stderr, disable=on_progress is not None)
    t0, complete = time.perf_counter(), False
    try:
        for frame in tracker.track(source.frames(start, args.stop, args.step), name=source.name):
            log.add(frame)
            frames.append(frame)
            bar.update(1)
            if on_progress is not None:
                on_progress("tracking", len(frames), total)
            if len(frames) % FLUSH_EVERY == 0:
                log.flush()
        complete = True
    finally:
        log.close()
        bar.close()
        seconds = time.perf_counter() - t0
        if not complete and frames:
            print(f"escape_fast.track: {source.name}: stopped after frame {frames[-1].index} ({len(frames)} frames); "
                  f"writing them; --resume continues", file=sys.stderr, flush=True)
        summary = _write_results(args, predictor, tracker, source, frames, stem, seconds, len(frames) - len(done))
    if complete and not args.no_video and frames:
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


def _write_results(args, predictor, tracker, source, frames, stem, seconds, new_frames) -> dict:
    reference = tracker.reference
    ok = [f for f in frames if f.ok]
    smoothed = None if args.no_smooth else smooth_track(frames, reference, SmoothingConfig())
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
             "start": args.start, "stop": args.stop, "step": args.step}
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


def run(args) -> int:
    if args.step < 1 or args.start < 0 or (args.stop is not None and args.stop <= args.start):
        raise UsageError(f"--start {args.start} --stop {args.stop} --step {args.step}: not a range of frames")
    images, names = _supports(args)
    predictor = Predictor(args.checkpoint, args.method, args.device, args.batch_size, args.backend)
    predictor.adapt(images, args.support_keypoints, args.support_box)
    predictor.support_images = names
    os.makedirs(args.out, exist_ok=True)
    remove_stale(args.out)
    used: set = set()
    for video in args.videos:
        stem = output_stem(args.out, video, used)
        s = track_video(args, predictor, video, stem)
        print(f"{video}: {s['frames']} frames in {s['seconds']:.1f} s ({s['fps']} fps), "
              f"{100 * s['low_confidence_share']:.1f}% low-confidence points, {s['searches']} searches, "
              f"{s['failed']} failed, {s['skipped_undecodable']} undecodable; results in {stem}.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
