"""What a tracking run writes for each video, in the formats the field's tools read.

For a video ``NAME`` in the output folder:

* ``NAME.progress.jsonl``: the run's settings, then one line per frame as it
  is tracked (raw keypoints, scores, box); an interrupted run keeps it, and
  ``--resume`` continues from its last complete line;
* ``NAME.json``: escape_fast's own result (raw and smoothed keypoints,
  scores, low-confidence marks, boxes, re-searches, per frame);
* ``NAME.escape_fast.h5`` and ``.csv``: DeepLabCut's single-animal layout
  (scorer / bodyparts / coords x, y, likelihood), written by ``movement``;
* ``NAME.analysis.h5``: a SLEAP analysis file, written by ``movement``;
* ``NAME.trajectories.png``: each keypoint's x and y over time;
* ``NAME.labeled.mp4``: the video with the skeleton drawn, low scores dimmed
  (the demo page writes ``NAME.labeled.webm``, which browsers play).

Every file is written whole under a temporary name and renamed, so a file
is complete or absent. The likelihood in the DeepLabCut and SLEAP files is
the keypoint's score relative to what the supports score (1: as sure as on
the annotated frame), clipped to [0, 1], so a DeepLabCut ``pcutoff`` reads
as usual.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from escape_fast.errors import DataError
from escape_fast.files import atomic_path, atomic_write, write_json
from escape_fast.track.tracker import TrackedFrame

SCORER = "escape_fast"


# --------------------------------------------------------------------------
# the progress file
# --------------------------------------------------------------------------
class ProgressLog:
    """Appends one JSON line per tracked frame, flushed as it goes, after a
    header line of settings; :func:`read_progress` reads it back."""

    def __init__(self, path: str, header: dict, append: bool = False):
        self.path = path
        self._file = open(path, "a" if append else "w", encoding="utf-8")
        if not append:
            self._write({"header": header})

    def _write(self, obj) -> None:
        self._file.write(json.dumps(obj) + "\n")

    def add(self, frame: TrackedFrame) -> None:
        self._write(frame.as_record())

    def flush(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()


def read_progress(path: str) -> tuple[dict, list[TrackedFrame]]:
    """(header, frames) of a progress file; a torn last line (a killed run) is dropped."""
    header, frames = None, []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if n >= len(lines) - 2:  # the last line, cut by a kill
                break
            raise DataError(f"{path}: line {n + 1} is not JSON; the progress file is damaged") from None
        if header is None:
            if "header" not in obj:
                raise DataError(f"{path}: no header line; not a progress file of escape_fast.track")
            header = obj["header"]
        else:
            frames.append(TrackedFrame.of_record(obj))
    if header is None:
        raise DataError(f"{path}: empty progress file")
    return header, frames


# --------------------------------------------------------------------------
# result files
# --------------------------------------------------------------------------
def likelihood(frames: list[TrackedFrame], reference: np.ndarray) -> np.ndarray:
    """[T, K] relative score in [0, 1] (NaN for failed frames and unknown keypoints)."""
    k = len(reference)
    return np.stack([np.clip(f.scores / reference, 0, 1) if f.ok else np.full(k, np.nan) for f in frames])


def _dataset(positions: np.ndarray, confidence: np.ndarray, names, fps):
    from movement.io import load_poses

    return load_poses.from_numpy(positions.transpose(0, 2, 1)[..., None], confidence[..., None], [SCORER],
                                 list(names), fps=fps, source_software=SCORER)


def write_pose_files(stem: str, positions: np.ndarray, confidence: np.ndarray, names, fps) -> list[str]:
    """DeepLabCut .h5 and .csv and a SLEAP analysis .h5 of ``positions`` [T, K, 2]
    (NaN where not known) and ``confidence`` [T, K]; returns the paths."""
    try:
        from movement.io import save_poses
    except ImportError as exc:
        raise DataError("writing DeepLabCut and SLEAP files needs movement: pip install -e \".[video]\"") from exc
    ds = _dataset(positions, np.nan_to_num(confidence, nan=0.0), names, fps)
    df = save_poses.to_dlc_style_df(ds, split_individuals=True)[SCORER]
    df.columns = df.columns.set_levels([SCORER], level="scorer")
    paths = []
    for suffix in (".escape_fast.h5", ".escape_fast.csv"):
        path = stem + suffix
        with atomic_path(path) as tmp:
            if suffix.endswith(".h5"):
                df.to_hdf(tmp, key="df_with_missing")
            else:
                df.to_csv(tmp, sep=",")
        paths.append(path)
    path = stem + ".analysis.h5"
    with atomic_path(path) as tmp:
        save_poses.to_sleap_analysis_file(ds, tmp)
    paths.append(path)
    return paths


def write_json_result(path: str, video: dict, names, skeleton, frames: list[TrackedFrame], smoothed, reference,
                      stats: dict) -> None:
    entries = []
    for n, f in enumerate(frames):
        entry = f.as_record()
        if f.ok:
            entry["smoothed"] = np.where(np.isfinite(smoothed[n]), smoothed[n], None).tolist()
        entries.append(entry)
    write_json(path, {
        "video": video, "keypoint_names": list(names), "skeleton": [list(s) for s in skeleton],
        "reference_scores": np.where(np.isfinite(reference), reference, None).tolist(),
        "coordinates": "image pixels of the frame (x right, y down)",
        "score": "cosine similarity of the keypoint's prototype and the frame's feature at the prediction; "
                 "'confident' is score >= low x the reference score (what the supports score)",
        "smoothed": "keypoints after the RTS smoother (confident points; the others as decoded), null if off",
        "summary": stats, "frames": entries,
    }, indent=None)


def write_trajectories(path: str, frames: list[TrackedFrame], positions: np.ndarray, names, fps) -> None:
    """A PNG of each keypoint's x and y over time, low-confidence points faint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from escape_fast.drawing import keypoint_colors

    t = np.array([f.index for f in frames], dtype=np.float64)
    unit = "frame"
    if fps:
        t, unit = t / fps, "s"
    confident = np.stack([f.confident if f.ok else np.zeros(len(names), bool) for f in frames])
    colors = keypoint_colors(len(names)) / 255.0
    fig, axes = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True, constrained_layout=True)
    for axis, ax, label in ((0, axes[0], "x (px)"), (1, axes[1], "y (px)")):
        for k, name in enumerate(names):
            v = positions[:, k, axis]
            ax.plot(t, np.where(confident[:, k], v, np.nan), color=colors[k], lw=1.0, label=name)
            ax.plot(t[~confident[:, k]], v[~confident[:, k]], ".", color=colors[k], alpha=0.25, ms=2)
        ax.set_ylabel(label)
        ax.invert_yaxis() if axis == 1 else None
    axes[1].set_xlabel(f"time ({unit})")
    axes[0].legend(ncol=min(6, len(names)), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 1.35))
    axes[0].set_title("keypoints over time (dots: low confidence)", fontsize=9)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def write_labeled_video(path: str, source, frames: list[TrackedFrame], positions: np.ndarray, skeleton,
                        fps: float | None, progress=None) -> None:
    """The tracked frames of ``source`` (a FrameSource) with their keypoints
    drawn (low-confidence ones dimmed): H.264 in an .mp4 (MPEG-4 where the
    build has no x264), VP8 in a .webm (what every browser plays).
    ``progress()`` is called after each frame."""
    import av

    from escape_fast.drawing import draw_pose, keypoint_colors

    by_index = {f.index: n for n, f in enumerate(frames)}
    if not by_index:
        return
    first, last = min(by_index), max(by_index)
    step = frames[1].index - frames[0].index if len(frames) > 1 else 1
    k = positions.shape[1]
    colors = keypoint_colors(k)
    dim = (colors.astype(np.float64) * 0.35 + 90).astype(np.uint8)
    width, height = source.size
    with atomic_path(path) as tmp:
        with av.open(tmp, "w") as container:
            if path.endswith(".webm"):
                stream = container.add_stream("libvpx", rate=round(fps or 25),
                                              options={"deadline": "realtime", "cpu-used": "8"})
                stream.bit_rate = 4_000_000
            else:
                stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4",
                                              rate=round(fps or 25))
            stream.width, stream.height = width + width % 2, height + height % 2
            stream.pix_fmt = "yuv420p"
            for index, image in source.frames(first, last + 1, max(step, 1)):
                n = by_index.get(index)
                if n is not None and frames[n].ok:
                    f = frames[n]
                    known = np.isfinite(positions[n, :, 0])
                    shown = draw_pose(image, positions[n], known & f.confident, skeleton, colors=colors)
                    low = known & ~f.confident
                    if low.any():  # dimmed dots, no limbs
                        shown = draw_pose(shown, positions[n], low, (), colors=dim)
                    image = shown
                if image.shape[1] != stream.width or image.shape[0] != stream.height:
                    image = np.pad(image, ((0, stream.height - image.shape[0]), (0, stream.width - image.shape[1]),
                                           (0, 0)))
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                    container.mux(packet)
                if progress is not None:
                    progress()
            for packet in stream.encode():
                container.mux(packet)


def output_stem(out_dir: str, video_name: str, used: set) -> str:
    """``out_dir/NAME`` for a video, unique among the run's videos."""
    base = Path(video_name.rstrip("/")).stem or "video"
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in base)
    name, n = base, 1
    while name in used:
        n += 1
        name = f"{base}-{n}"
    used.add(name)
    return os.path.join(out_dir, name)
