"""How fast a video is tracked end to end, against predicting its frames as image files.

    python benchmarks/bench_track_speed.py [--frames 300] [--video ../shared/data/videos/flies_two_1024px.mp4]

Makes a 640 x 480 clip of real footage (the two-fly arena video of shared/,
scaled to 640 x 640 and cut to 640 x 480, H.264), annotates one fly on its
frame 0 (positions read off the frame by eye, below), and times, one after
the other in this run:

1. ``python -m escape_fast.track CLIP --support-frame 0 ... --no-video``:
   decoding, crops, trunk, decoding, smoothing and every file but the
   labelled video, end to end (the process's whole wall time, model loading
   included, and the tool's own fps over the frames);
2. the labelled video alone (the same command without ``--no-video``, minus 1);
3. ``python -m escape_fast.predict --query frames/*.png``: the same frames
   extracted to PNG files, each searched (no box), as a user without a
   video command would;
4. peak memory (resident set) of the track command on a quarter of the
   frames and on all of them: it streams, so the two should be close.

Prints a markdown table; --out writes JSON. Name the CPU with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import cpu_name  # noqa: E402

from escape_fast.files import write_json  # noqa: E402

DEFAULT_VIDEO = ROOT.parent / "shared" / "data" / "videos" / "flies_two_1024px.mp4"
# the lower fly on frame 0 of the 640 x 480 clip (x, y in clip pixels)
FLY = {"names": ["head", "thorax", "wing_tips", "left_leg_tip", "right_leg_tip", "hind_leg_tip"],
       "keypoints": [[370, 470], [370, 455], [368, 413], [343, 463], [385, 455], [393, 437]],
       "skeleton": [[0, 1], [1, 2], [1, 3], [1, 4], [1, 5]], "box": [335, 405, 65, 75]}


def make_clip(video: Path, frames: int, folder: Path) -> tuple[Path, Path]:
    """(clip.mp4, folder of its frames as PNG)."""
    import av
    import cv2

    from escape_fast.data.video import open_frames

    clip, pngs = folder / "clip.mp4", folder / "frames"
    pngs.mkdir()
    with av.open(str(clip), "w") as out:
        stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 640, 480, "yuv420p"
        for n, frame in open_frames(video).frames(0, frames):
            small = cv2.resize(frame, (640, 640), interpolation=cv2.INTER_AREA)[80:560]
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(small), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    # the PNGs are the clip's own decoded frames, so both commands see the same pixels
    for n, frame in open_frames(clip):
        cv2.imwrite(str(pngs / f"{n:05d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    return clip, pngs


def timed(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds, proc.stdout


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    p.add_argument("--out", help="JSON report")
    args = p.parse_args(argv)
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clip, pngs = make_clip(args.video, args.frames, tmp)
        kp = tmp / "fly.json"
        kp.write_text(json.dumps(FLY))
        support = tmp / "support.png"
        os.link(pngs / "00000.png", support)
        track = [py, "-m", "escape_fast.track", str(clip), "--support-frame", "0", "--support-keypoints", str(kp)]
        quarter_s, _ = timed(track + ["--out", str(tmp / "t0"), "--stop", str(args.frames // 4), "--no-video"])
        rss_quarter = peak_rss_mib()
        track_s, track_out = timed(track + ["--out", str(tmp / "t1"), "--no-video"])
        rss_full = peak_rss_mib()
        summary = json.loads((tmp / "t1" / "clip.json").read_text())["summary"]
        video_s, _ = timed(track + ["--out", str(tmp / "t2")])
        predict_s, _ = timed([py, "-m", "escape_fast.predict", "--support", str(support), "--support-keypoints",
                              str(kp), "--query", *sorted(str(f) for f in pngs.iterdir()), "--out",
                              str(tmp / "p")])
    n = args.frames
    rows = {
        "track, end to end (process wall time)": {"seconds": track_s, "fps": n / track_s},
        "track, the tool's own frame loop": {"seconds": summary["seconds"], "fps": summary["fps"]},
        "labelled video (extra)": {"seconds": video_s - track_s, "fps": n / max(video_s - track_s, 1e-9)},
        "predict on the frames as PNG files": {"seconds": predict_s, "fps": n / predict_s},
    }
    report = {"cpu": cpu_name(), "frames": n, "size": "640 x 480",
              "rows": rows, "speedup_vs_predict": predict_s / track_s,
              "peak_rss_mib": {"quarter": rss_quarter, "all": rss_full},
              "low_confidence_share": summary["low_confidence_share"], "searches": summary["searches"]}
    print(f"\n{n} frames of 640 x 480 (real fly footage), {report['cpu']}\n")
    print("| run | seconds | frames / s |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['fps']:.1f} |")
    print(f"\ntrack is {report['speedup_vs_predict']:.1f}x predict on the same frames; peak memory "
          f"{rss_quarter:.0f} MiB ({n // 4} frames) and {rss_full:.0f} MiB ({n} frames); "
          f"{100 * summary['low_confidence_share']:.1f}% low-confidence points, {summary['searches']} searches")
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
