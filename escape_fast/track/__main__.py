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

from escape_fast import builtin, cli
from escape_fast.data.video import open_frames
from escape_fast.errors import UsageError
from escape_fast.files import remove_stale
from escape_fast.predict.predictor import Predictor
from escape_fast.track.outputs import output_stem
from escape_fast.track.run import TrackOptions, track_video


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


def run(args) -> int:
    if args.step < 1 or args.start < 0 or (args.stop is not None and args.stop <= args.start):
        raise UsageError(f"--start {args.start} --stop {args.stop} --step {args.step}: not a range of frames")
    images, names = _supports(args)
    predictor = Predictor(args.checkpoint, args.method, args.device, args.batch_size, args.backend)
    predictor.adapt(images, args.support_keypoints, args.support_box)
    predictor.support_images = names
    os.makedirs(args.out, exist_ok=True)
    remove_stale(args.out)
    options = TrackOptions(args.start, args.stop, args.step, args.batch_size, not args.no_smooth, not args.no_video,
                           not args.no_rotate, args.resume, args.overwrite)
    # the supports annotated on a video's own frames: tracking from one of them starts from its keypoints
    support_video = args.support_video or args.videos[0]
    annotated = dict(zip(args.support_frame, predictor.supports))
    used: set = set()
    for video in args.videos:
        stem = output_stem(args.out, video, used)
        s = track_video(options, predictor, video, stem, annotated=annotated if video == support_video else None)
        print(f"{video}: {s['frames']} frames in {s['seconds']:.1f} s ({s['fps']} fps), "
              f"{100 * s['low_confidence_share']:.1f}% low-confidence points, {s['searches']} searches, "
              f"{s['failed']} failed, {s['skipped_undecodable']} undecodable; results in {stem}.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
