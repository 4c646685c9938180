"""How well a video is tracked, against predicting every frame alone: synthetic videos with ground truth.

    python benchmarks/bench_track.py [--part val|test] [--videos 4] [--frames 300] [--shots 1] [--unboxed]

Each video (escape_fast.data.synthetic.video) shows one object of a
category the built-in checkpoint never trained on (split 1's validation
categories with ``--part val``, to choose settings; its test categories
with ``--part test``, to report), moving, turning and bending, crossed by an
occluder, standing still for a while, and leaving the view once. The
support is the first frame (or ``--shots`` frames spread over the video)
with its true keypoints and box. Compared on the same frames:

* ``copy support pose``: the support's keypoints copied into the true box;
* ``per frame, true box``: Predictor.predict of every frame with its true box;
* ``per frame, no box`` (with ``--unboxed``): the object searched in every frame;
* ``tracked``: escape_fast.track.Tracker, no box given (started from the
  support frame's keypoints, as ``python -m escape_fast.track`` starts on
  an annotated frame); ``tracked + smoothed``.

PCK@0.2 (visible keypoints, 0.2 x the true box's longer side), with a 95%
interval over videos; jitter: the median frame-to-frame movement of the
keypoints while the object stands still (pixels; the truth does not move);
recovery: frames from the object's return into view to the first frame
with PCK >= 0.5. Markdown on stdout, JSON with --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from escape_fast.data.synthetic import _splits, _world  # noqa: E402
from escape_fast.data.synthetic.video import keypoint_names, render_video, video_spec  # noqa: E402
from escape_fast.files import write_json  # noqa: E402
from escape_fast.predict import KeypointSet, Predictor  # noqa: E402
from escape_fast.track import SmoothingConfig, Tracker, TrackingConfig, smooth_track  # noqa: E402

COPY, BOXED, UNBOXED, TRACKED, SMOOTHED = ("copy support pose", "per frame, true box", "per frame, no box",
                                           "tracked", "tracked + smoothed")


def frame_pck(pred: np.ndarray, truth: np.ndarray, box: np.ndarray) -> tuple[int, int]:
    """(correct, visible) keypoints of one frame at 0.2 x the box's longer side."""
    vis = truth[:, 2] > 0
    if not vis.any():
        return 0, 0
    err = np.linalg.norm(pred[vis] - truth[vis, :2], axis=1)
    ok = np.isfinite(err) & (err <= 0.2 * max(box[2], box[3]))
    return int(ok.sum()), int(vis.sum())


def copy_pose(support_kps: np.ndarray, support_box: np.ndarray, box: np.ndarray) -> np.ndarray:
    rel = (support_kps[:, :2] - support_box[:2]) / support_box[2:]
    return box[:2] + rel * box[2:]


def keypoints_of(predictions, k: int) -> np.ndarray:
    """[N, K, 2], NaN for a query that failed (a true box wholly outside the frame)."""
    return np.stack([p.keypoints if p.ok else np.full((k, 2), np.nan) for p in predictions])


def run_video(spec, args, tracking: TrackingConfig, smoothing: SmoothingConfig) -> dict:
    frames = list(render_video(spec))
    images = [f[0] for f in frames]
    truth = np.stack([f[1] for f in frames])
    boxes = np.stack([f[2] for f in frames])
    names = keypoint_names(spec.category)
    in_view = [n for n in range(spec.frames) if (truth[n, :, 2] > 0).mean() >= 0.5]
    support_at = [in_view[round(i * (len(in_view) - 1) / max(args.shots, 1))] for i in range(args.shots)]
    predictor = Predictor("builtin", args.method, "cpu")
    sets = [KeypointSet(tuple(names), truth[n, :, :2].copy(), truth[n, :, 2] > 0, (), boxes[n].copy(), f"frame {n}")
            for n in support_at]
    predictor.adapt([images[n] for n in support_at], sets, [boxes[n] for n in support_at])
    out: dict[str, np.ndarray] = {}
    times: dict[str, float] = {}
    sx = truth[support_at[0]]
    out[COPY] = np.stack([copy_pose(sx, boxes[support_at[0]], b) for b in boxes])
    t = time.perf_counter()
    out[BOXED] = keypoints_of(predictor.predict(images, list(boxes)), len(names))
    times[BOXED] = time.perf_counter() - t
    if args.unboxed:
        t = time.perf_counter()
        out[UNBOXED] = keypoints_of(predictor.predict(images), len(names))
        times[UNBOXED] = time.perf_counter() - t
    tracker = Tracker(predictor, tracking)
    # as the command does when the support is the first frame tracked: start from its keypoints
    tracker.start_at(-1, truth[0, :, :2], truth[0, :, 2] > 0)
    t = time.perf_counter()
    tracked = list(tracker.track(enumerate(images), f"video {spec.video}"))
    times[TRACKED] = time.perf_counter() - t
    out[TRACKED] = np.stack([f.keypoints for f in tracked])
    out[SMOOTHED] = smooth_track(tracked, tracker.reference, smoothing)
    result = {"category": spec.category, "video": spec.video, "frames": spec.frames, "supports": support_at,
              "searches": tracker.stats.searches, "low_confidence": tracker.stats.low_points /
              max(tracker.stats.known_points, 1), "seconds": times, "methods": {}}
    s0, s1 = spec.still
    back = next((n for n in range(spec.away[1], spec.frames) if (truth[n, :, 2] > 0).mean() >= 0.5), None)
    for name, pred in out.items():
        counts = np.array([frame_pck(pred[n], truth[n], boxes[n]) for n in range(spec.frames)])
        per_frame = counts[:, 0] / np.maximum(counts[:, 1], 1)
        still = pred[s0:s1 + 1]
        vis = truth[s0:s1 + 1, :, 2] > 0
        steps = np.linalg.norm(np.diff(still, axis=0), axis=-1)[(vis[1:] & vis[:-1])]
        recovery = None
        if back is not None:
            good = [n for n in range(back, spec.frames) if counts[n, 1] and per_frame[n] >= 0.5]
            recovery = (good[0] - back) if good else spec.frames - back
        result["methods"][name] = {"pck": float(counts[:, 0].sum() / max(counts[:, 1].sum(), 1)),
                                   "jitter": float(np.nanmedian(steps)) if steps.size else None,
                                   "recovery": recovery}
    return result


def summarize(results: list[dict]) -> dict:
    table = {}
    for name in results[0]["methods"]:
        pck = np.array([r["methods"][name]["pck"] for r in results]) * 100
        half = 1.96 * pck.std(ddof=1) / np.sqrt(len(pck)) if len(pck) > 1 else float("nan")
        jit = [r["methods"][name]["jitter"] for r in results if r["methods"][name]["jitter"] is not None]
        rec = [r["methods"][name]["recovery"] for r in results if r["methods"][name]["recovery"] is not None]
        table[name] = {"pck": float(pck.mean()), "pck_ci95": float(half), "jitter_px": float(np.median(jit)) if jit
                       else None, "recovery_frames": float(np.median(rec)) if rec else None}
    if TRACKED in table and BOXED in table:  # paired: tracked minus per-frame with the true box, per video
        d = np.array([r["methods"][SMOOTHED]["pck"] - r["methods"][BOXED]["pck"] for r in results]) * 100
        table["smoothed - true box"] = {"pck": float(d.mean()), "pck_ci95": float(1.96 * d.std(ddof=1) /
                                        np.sqrt(len(d))) if len(d) > 1 else float("nan")}
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("val", "test"), default="test",
                   help="split 1's validation categories (choose settings) or its test categories (report)")
    p.add_argument("--videos", type=int, default=4, help="videos, one category each")
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--method", default=None, help="mle | map | escape (default: the checkpoint's best)")
    p.add_argument("--unboxed", action="store_true", help="also predict every frame without a box (slow)")
    p.add_argument("--low", type=float, default=TrackingConfig.low)
    p.add_argument("--lost", type=float, default=TrackingConfig.lost)
    p.add_argument("--margin", type=float, default=TrackingConfig.margin)
    p.add_argument("--measurement", type=float, default=SmoothingConfig.measurement)
    p.add_argument("--acceleration", type=float, default=SmoothingConfig.acceleration)
    p.add_argument("--refine", type=float, default=TrackingConfig.refine)
    p.add_argument("--search-every", type=int, default=TrackingConfig.search_every)
    p.add_argument("--no-prior", action="store_true", help="decode turned crops without the location prior")
    p.add_argument("--no-rotate", action="store_true", help="upright crops (the tracker turns them by default)")
    p.add_argument("--out", help="JSON report")
    args = p.parse_args(argv)
    _, cats = _world(0)
    cat_ids = _splits(cats)[0][args.part][:args.videos]
    tracking = TrackingConfig(margin=args.margin, low=args.low, lost=args.lost, rotate=not args.no_rotate,
                              refine=args.refine, search_every=args.search_every,
                              location_prior=not args.no_prior)
    smoothing = SmoothingConfig(args.measurement, args.acceleration)
    results = []
    for v, cid in enumerate(cat_ids):
        r = run_video(video_spec(cid, v, args.frames), args, tracking, smoothing)
        results.append(r)
        print(f"video {v} (category {cid}): " + ", ".join(f"{k} {m['pck'] * 100:.1f}" for k, m in
                                                           r["methods"].items()) + f"; searches {r['searches']}",
              file=sys.stderr, flush=True)
    table = summarize(results)
    print(f"\n{args.part} part: {len(results)} videos x {args.frames} frames, {args.shots}-shot\n")
    print("| method | PCK@0.2 | 95% CI | still jitter (px) | recovery (frames) |\n|---|---|---|---|---|")
    for name, row in table.items():
        jit = "" if row.get("jitter_px") is None else f"{row['jitter_px']:.2f}"
        rec = "" if row.get("recovery_frames") is None else f"{row['recovery_frames']:.0f}"
        print(f"| {name} | {row['pck']:.1f} | ±{row['pck_ci95']:.1f} | {jit} | {rec} |")
    if args.out:
        write_json(args.out, {"settings": vars(args), "table": table, "videos": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
