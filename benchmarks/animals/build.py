"""Build the small real-photo animal keypoint benchmark (benchmarks/animals/data).

    # 1. get the source files (each checked against its git blob hash): from local
    #    clones or mirrors of the repositories, else from raw.githubusercontent.com
    python benchmarks/animals/build.py fetch --dest /tmp/animals_src [--git DIR]
    # 2. write the data set in MP-100's layout
    python benchmarks/animals/build.py build --src /tmp/animals_src --out benchmarks/animals/data

Every source is a public repository's test or example data under a licence
that allows redistribution (SOURCES below: repository, commit, paths, blob
hashes, licence); SLEAP's own (fly_pair_sleap, mouse_minsession, the
validation part) limits it to academic and research use, the others
(BSD-3-Clause, Apache-2.0: the test part) do not. ``--src`` holds the files at their repository paths under
one folder per repository, ``<owner>+<name>/<path>`` (what ``fetch`` writes),
e.g. ``/tmp/animals_src/talmolab+dreem/tests/data/sleap/single_fly.slp``.

What ``build`` writes (benchmarks/animals/README.md has the details):

* ``images/<category>/<video>_<frame>.jpg``: the chosen frames at their
  original resolution, JPEG quality 90 (single-channel: every source is grey;
  escape_fast.data.load_image decodes them to RGB);
* ``annotations/animals_all.json`` (every category), ``animals_val.json`` and
  ``animals_test.json`` (disjoint categories; see SPLIT_REASON), COCO keypoints as in
  MP-100: v = 2 for a labelled keypoint, (0, 0, 0) for a missing one or one
  outside the image; the box is the labelled keypoints' extent padded on
  every side by 10 % of its longer side and clipped to the image's pixels
  ([0, width - 1] x [0, height - 1], as escape_fast's box cleaning does);
  skeletons 1-based as in COCO, ``flip_pairs`` 0-based;
* ``LICENSES/<category>.txt``: the licence of each source repository.

Frames: only user-labelled instances (SLEAP's ``user_instances``; the
DeepPoseKit set has no other kind) with at least MIN_KEYPOINTS labelled
keypoints inside the image. Of each video (and of the DeepPoseKit set) the
labelled frames are walked in order and a frame is kept when every animal in
it differs from every animal of the frames kept so far by at least
MIN_POSE_CHANGE in posture (pose_change: the mean distance of the common
keypoints, each pose centred on its mean, over the longer side of the box;
an animal that walks without changing posture does not count as new): the
sources label long runs of consecutive, nearly identical frames, and a
support and query that are near-duplicates would make copying the support
pose look good. The output is a function of
the source files and the library versions (PyAV's decoder, Pillow's JPEG
encoder) alone.

Needs sleap-io (the .slp files), h5py (DeepPoseKit's .h5), PyAV (the videos)
and Pillow, all in the project's venv.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIN_KEYPOINTS = 4
MIN_POSE_CHANGE = 0.075  # see select()
PAD = 0.10  # of the keypoints' extent's longer side, on every side
JPEG_QUALITY = 90
ID_BLOCK = 10000


@dataclass(frozen=True)
class Source:
    id: int  # category id, fixed: a part's file does not depend on which other sources are built
    category: str
    species: str
    split: str  # "val" or "test"
    repo: str  # owner/name on GitHub
    commit: str
    licence: str
    licence_file: str  # path in the repository at ``commit``
    files: dict[str, str]  # path in the repository -> git blob hash (the licence file among them)
    kind: str  # "slp" (SLEAP labels + videos) or "dpk" (DeepPoseKit annotation set)
    labels: str  # how the keypoints were made, as far as the source says
    description: str


SOURCES = [
    Source(
        id=1, category="fly_dreem", species="Drosophila melanogaster", split="test",
        repo="talmolab/dreem", commit="a86db9859a7b1bee784043f36c766e078e9fe094",
        licence="BSD-3-Clause", licence_file="LICENSE",
        files={
            "LICENSE": "f3858dc02a41ad6ffa673a39d3e9313cac5e0b7c",
            "tests/data/sleap/single_fly.slp": "4b50bfd7337f0f75c77cd3f4c189f5ac7ff7b578",
            "tests/data/sleap/single_fly.mp4": "9239f26aadf3659b282d4307d3023b41895c48b3",
            "tests/data/sleap/two_flies.slp": "3df9fe20e322bf70aa83b3b51bb575227ec2872f",
            "tests/data/sleap/two_flies.mp4": "bc3939bf1185285d167c966fa3eeaa17c23dc55d",
            "tests/data/sleap/three_flies.slp": "e56d38de6d55f2f4b9adfe25c272b671b319ccf2",
            "tests/data/sleap/three_flies.mp4": "bcbe2d03d436898539d18aefbb31cdf36a36bd03",
        },
        kind="slp",
        labels="SLEAP user instances (none linked to a prediction) on all 128 consecutive frames of each "
               "clip: dreem's tracking ground truth, probably proofread; how it was made is not documented "
               "(two_flies' coordinates lie on a 0.04 px grid, the others' are free floats)",
        description="1, 2 and 3 flies in a 1024 x 1024 arena (three clips), 13 keypoints"),
    Source(
        id=2, category="fly_pair_sleap", species="Drosophila melanogaster", split="val",
        repo="talmolab/sleap", commit="a2738ec10ee5dd2c16df678edfddc1d0eb8aadc8",
        licence="Clear BSD, academic and research use only", licence_file="LICENSE",
        files={
            "LICENSE": "b4f01db043bb7e7974e72c628dedb937a3b531d7",
            "tests/data/tracks/clip.slp": "28250f36da4e9f6342f4e5155bf2dd510100279a",
            "tests/data/tracks/clip.mp4": "438de627221b3a20304f3c3ea87bf9a1cf0f930d",
        },
        kind="slp",
        labels="SLEAP user instances on all 1500 frames, every coordinate an odd multiple of 0.25 px: "
               "most likely a model's predictions stored as user instances (a tracking test file)",
        description="a courting pair of flies in a 1024 x 1024 arena (the rig of fly_dreem), 13 keypoints"),
    Source(
        id=3, category="fly_dpk", species="Drosophila melanogaster", split="test",
        repo="jgraving/DeepPoseKit-Data", commit="0aa5e3f5e8f9df63c48ba2bf491354472daa3e7e",
        licence="Apache-2.0", licence_file="LICENSE.md",
        files={
            "LICENSE.md": "427417b60d598d0099a7d786078c983f9dd6bd02",
            "datasets/fly/example_annotation_set.h5": "305a613710be5005e734b567b5c1bd865d7945fb",
            "datasets/fly/skeleton.csv": "9d1373a905c46e8f71b8bacb3006c676a50cb2f0",
        },
        kind="dpk",
        labels="model-initialised, not confirmed by a person: the set was added as a 'preinitialized "
               "example annotation set' right after a trained model (commit 0c60a57), and its "
               "'annotated' flags are all false",
        description="192 x 192 crops centred on one fly (the video behind MP-100's 'fly' category), "
                    "32 keypoints"),
    Source(
        id=4, category="mouse_samtrack", species="Mus musculus", split="test",
        repo="talmolab/sam-track", commit="fe8240ad816dfedd587ea1a44904795e04795365",
        licence="BSD-3-Clause", licence_file="LICENSE",
        files={
            "LICENSE": "867dec76b176da0d3831660d5e2a7a8ed40fa215",
            "tests/data/labels.15node.v004.gt_frames=10.gt_tracks=True.pr_frames=0.pr_tracks=False.slp":
                "48875366f6bc4e04e42ad8fdc87148b748dc38f6",
            "tests/data/mice.mp4": "56c0e9e89ad550adc0708a26b16018243b5b5eba",
        },
        kind="slp",
        labels="SLEAP user instances on 10 frames spread over the video, called ground truth by the "
               "commit that added them ('sparse GT frames'); free-float coordinates, as clicked",
        description="two mice in a home cage seen from above, 1024 x 768, 15 keypoints"),
    Source(
        id=5, category="mouse_minsession", species="Mus musculus", split="val",
        repo="talmolab/sleap", commit="ddeb0832eab6b5470811cc203f644758a599b1ab",
        licence="Clear BSD, academic and research use only", licence_file="LICENSE",
        files={
            "LICENSE": "b4f01db043bb7e7974e72c628dedb937a3b531d7",
            "tests/data/cameras/minimal_session/min_session_user_labeled.slp":
                "c7d8fb2dd2d61df7f43a03774a111547f716128a",
            **{f"tests/data/videos/min_session_{cam}.mp4": blob for cam, blob in (
                ("topL", "d5614a4022691603ca5a8668229fd693082029be"),
                ("top", "b3422b523c31154139b89770ccb373c6ec04be8d"),
                ("sideL", "639d010cbb138b83550c4f01e50916fb0dd2ea1a"),
                ("side", "f7977d7f5f378b6410c74a7d5edcc24a476fb325"),
                ("midL", "ee9699bdb1d2e7f65716cdf1acbd28ab41004b2b"),
                ("mid", "e845f8b12299aa0c6874529d53bb607fbf0bf558"),
                ("backL", "1edbaf6d4e29095ce772cfed40da614a0a543392"),
                ("back", "0e925d00f563e09b0c7065b4551521bb2393efc3"),
            )},
        },
        kind="slp",
        labels="SLEAP user instances that are exact copies of the predicted instances they were made "
               "from (every point identical): a model's predictions, not corrected",
        description="two mice (one white, one black) in an 8-camera rig, 1280 x 1024, one frame per "
                    "camera, 15 keypoints"),
]
SPLITS = ("val", "test")
SPLIT_REASON = (
    "val: fly_pair_sleap + mouse_minsession; test: fly_dreem + fly_dpk + mouse_samtrack. Both species "
    "are in both parts; the test part holds the categories with the better labels (mouse_samtrack's "
    "ground truth, fly_dreem's tracking ground truth), and only permissively licensed data "
    "(BSD-3-Clause, Apache-2.0), so that it can stay whatever becomes of the two research-only sources.")


# --------------------------------------------------------------------------
# fetching and checking the source files
# --------------------------------------------------------------------------
def blob_hash(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def repo_dir(src: Path, repo: str) -> Path:
    return src / repo.replace("/", "+")


def _from_git(root: Path, repo: str, blob: str) -> bytes | None:
    """A blob from a local clone or mirror of ``repo`` under ``root``, if there is one."""
    owner_name, name = repo.replace("/", "+"), repo.split("/")[1]
    for d in (root / owner_name / "repo", root / owner_name, root / name, root / f"{name}.git"):
        git_dir = d / ".git" if (d / ".git").exists() else d
        if git_dir.exists():
            r = subprocess.run(["git", f"--git-dir={git_dir}", "cat-file", "blob", blob], capture_output=True,
                               check=False)
            if r.returncode == 0:
                return r.stdout
    return None


def fetch(dest: Path, git_root: Path | None) -> None:
    for s in SOURCES:
        for path, blob in s.files.items():
            out = repo_dir(dest, s.repo) / path
            if out.is_file() and blob_hash(out.read_bytes()) == blob:
                continue
            data, how = (_from_git(git_root, s.repo, blob) if git_root else None), "git"
            if data is None:
                how = f"https://raw.githubusercontent.com/{s.repo}/{s.commit}/{path}"
                with urllib.request.urlopen(how, timeout=120) as r:
                    data = r.read()
            if blob_hash(data) != blob:
                raise SystemExit(f"{s.repo}:{path}: blob {blob_hash(data)} is not the expected {blob}")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
            print(f"{s.repo}:{path} <- {how} ({len(data):,} bytes)")


def check_sources(src: Path, sources) -> None:
    bad = []
    for s in sources:
        for path, blob in s.files.items():
            f = repo_dir(src, s.repo) / path
            if not f.is_file():
                bad.append(f"{f}: missing")
            elif blob_hash(f.read_bytes()) != blob:
                bad.append(f"{f}: not the version of {s.repo}@{s.commit[:8]} (blob {blob})")
    if bad:
        raise SystemExit("source files:\n  " + "\n  ".join(bad) + "\n(run: build.py fetch --dest SRC)")


# --------------------------------------------------------------------------
# reading the sources
# --------------------------------------------------------------------------
@dataclass
class Frame:
    stem: str  # file name stem: <video>_<frame>
    origin: str  # repo@commit:path#frame
    index: int  # frame (or image) index in its video
    width: int
    height: int
    instances: list[tuple[np.ndarray, str]]  # ([K, 2] with NaN where not labelled, track name)
    outside: int = 0  # labelled keypoints outside the image (set by build)


@dataclass
class Group:
    """The labelled frames of one video (or one image set) and how to get their pixels."""

    frames: list[Frame]
    pixels: object  # callable: set of frame indices -> {index: uint8 [H, W]}


def _flip_pairs(names: list[str]) -> list[list[int]]:
    """Left/right keypoints by name: an L/R, _L/_R, left/right or _left/_right in the name."""
    import re

    index = {n: i for i, n in enumerate(names)}
    pairs = set()
    for i, n in enumerate(names):
        for a, b in (("L", "R"), ("_left", "_right"), ("left", "right"), ("_L", "_R")):
            for m in re.finditer(re.escape(a), n):
                other = n[:m.start()] + b + n[m.end():]
                if other in index and other != n:
                    pairs.add(tuple(sorted((i, index[other]))))
    return [list(p) for p in sorted(pairs)]


def _video_size(video: Path) -> tuple[int, int]:
    import av

    with av.open(str(video)) as c:
        st = c.streams.video[0]
        return st.codec_context.width, st.codec_context.height


def _decoder(video: Path):
    def decode(wanted: set[int]) -> dict[int, np.ndarray]:
        import av

        out, i = {}, -1
        with av.open(str(video)) as c:
            for i, f in enumerate(c.decode(video=0)):
                if i in wanted:
                    out[i] = f.to_ndarray(format="gray")  # the videos are grey: Y is the picture
                if len(out) == len(wanted):
                    break
        missing = sorted(wanted - set(out))
        if missing:
            raise SystemExit(f"{video}: frames {missing[:5]} not in the video ({i + 1} decoded)")
        return out

    return decode


def read_slp(src: Path, s: Source):
    import sleap_io as sio

    base = repo_dir(src, s.repo)
    videos = [p for p in s.files if p.endswith(".mp4")]
    names, edges, groups = None, None, []
    for path in (p for p in s.files if p.endswith(".slp")):
        labels = sio.load_slp(str(base / path), open_videos=False)
        sk = labels.skeleton
        if names is None:
            names, edges = list(sk.node_names), [list(e) for e in sk.edge_inds]
        elif list(sk.node_names) != names:
            raise SystemExit(f"{path}: another skeleton than the source's first file")
        by_video: dict[str, list] = {}
        for lf in labels.labeled_frames:
            insts = [(ins.numpy().astype(np.float64), ins.track.name if ins.track else "")
                     for ins in lf.user_instances]  # numpy(): NaN where a point is missing or invisible
            if insts:
                by_video.setdefault(Path(lf.video.filename.replace("\\", "/")).name, []).append(
                    (lf.frame_idx, insts))
        vpaths = {Path(v).name: v for v in videos}
        for vname in sorted(by_video, key=lambda v: videos.index(vpaths[v])):  # the file list's order
            vpath = vpaths[vname]
            w, h = _video_size(base / vpath)
            frames = [Frame(f"{Path(vname).stem}_{idx:06d}", f"{s.repo}@{s.commit[:8]}:{vpath}#frame={idx}",
                            idx, w, h, insts) for idx, insts in sorted(by_video[vname], key=lambda t: t[0])]
            groups.append(Group(frames, _decoder(base / vpath)))
    return names, edges, groups


def read_dpk(src: Path, s: Source):
    import csv

    import h5py

    base = repo_dir(src, s.repo)
    h5 = next(p for p in s.files if p.endswith(".h5"))
    with open(base / next(p for p in s.files if p.endswith(".csv")), newline="") as f:
        rows = list(csv.DictReader(f))
    names = [r["name"] for r in rows]
    edges = [[names.index(r["parent"]), i] for i, r in enumerate(rows) if r["parent"]]
    with h5py.File(base / h5, "r") as f:
        images = f["images"][:, :, :, 0]
        kps = f["annotations"][:].astype(np.float64)  # [N, K, 2] x, y in the crop
    n, h, w = images.shape
    frames = [Frame(f"{Path(h5).stem}_{i:06d}", f"{s.repo}@{s.commit[:8]}:{h5}#image={i}", i, w, h, [(kps[i], "")])
              for i in range(n)]
    return names, edges, [Group(frames, lambda wanted: {i: images[i] for i in wanted})]


def clean(xy: np.ndarray, width: int, height: int) -> np.ndarray:
    """[K, 2] with NaN for keypoints not labelled or outside the image."""
    xy = np.where(np.isfinite(xy), xy, np.nan)
    inside = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < width) & (xy[:, 1] < height)
    xy[~inside] = np.nan
    return xy


def pose_change(a: np.ndarray, b: np.ndarray) -> float:
    """How far pose b is from pose a, wherever in the image each is: the mean distance of their
    common keypoints once each set is centred on its mean, over the longer side of a's box
    (infinite with fewer than 3 in common). Walking without changing posture is no change: the
    crops of the two would look alike."""
    common = np.isfinite(a).all(1) & np.isfinite(b).all(1)
    if common.sum() < 3:
        return np.inf
    ext = np.ptp(a[np.isfinite(a).all(1)], axis=0).max() * (1 + 2 * PAD)
    pa, pb = a[common] - a[common].mean(0), b[common] - b[common].mean(0)
    return float(np.linalg.norm(pa - pb, axis=1).mean() / max(ext, 1e-9))


def select(frames: list[Frame]) -> list[Frame]:
    """Frames in order, kept when the posture of every animal in it is at least MIN_POSE_CHANGE
    from that of every animal of the frames kept before it (pose_change); instances with fewer
    than MIN_KEYPOINTS keypoints are left out of the frame."""
    kept, seen = [], []
    for fr in frames:
        insts = [(xy, t) for xy, t in fr.instances if np.isfinite(xy).all(1).sum() >= MIN_KEYPOINTS]
        if not insts:
            continue
        nearest = [min((pose_change(xy, old) for old in seen), default=np.inf) for xy, _ in insts]
        if min(nearest) >= MIN_POSE_CHANGE:
            kept.append(Frame(fr.stem, fr.origin, fr.index, fr.width, fr.height, insts, fr.outside))
            seen += [xy for xy, _ in insts]
    return kept


# --------------------------------------------------------------------------
# writing the data set
# --------------------------------------------------------------------------
def box_of(xy: np.ndarray, width: int, height: int) -> list[float]:
    x0, y0 = xy.min(0)
    x1, y1 = xy.max(0)
    pad = PAD * max(x1 - x0, y1 - y0)
    x0, y0 = max(x0 - pad, 0.0), max(y0 - pad, 0.0)
    x1, y1 = min(x1 + pad, width - 1.0), min(y1 + pad, height - 1.0)
    return [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)]


def build(src: Path, out: Path, categories: list[str] | None) -> dict:
    from PIL import Image

    sources = [s for s in SOURCES if not categories or s.category in categories]
    check_sources(src, sources)
    for sub in ("images", "annotations", "LICENSES"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    (out / "annotations").mkdir(parents=True)
    (out / "LICENSES").mkdir()

    cats, images, anns, stats = [], [], [], {}
    for s in sources:
        cid, n_images, n_anns = s.id, 0, 0
        names, edges, groups = (read_slp if s.kind == "slp" else read_dpk)(src, s)
        cats.append({
            "id": cid, "name": s.category, "supercategory": "animals", "keypoints": names,
            "skeleton": [[a + 1, b + 1] for a, b in edges],  # 1-based, as in COCO
            "flip_pairs": _flip_pairs(names),
            "species": s.species, "split": s.split, "labels": s.labels,
            "source": f"https://github.com/{s.repo}/tree/{s.commit}", "license": s.licence,
        })
        shutil.copyfile(repo_dir(src, s.repo) / s.licence_file, out / "LICENSES" / f"{s.category}.txt")
        st = stats[s.category] = {"images": 0, "instances": 0, "keypoints": 0, "dropped_instances": 0,
                                  "outside_image": 0, "K": len(names), "split": s.split}
        folder = out / "images" / s.category
        folder.mkdir(parents=True)
        for group in groups:
            for fr in group.frames:  # keypoints outside the image count as not labelled
                raw = sum(int(np.isfinite(xy).all(1).sum()) for xy, _ in fr.instances)
                fr.instances = [(clean(xy, fr.width, fr.height), t) for xy, t in fr.instances]
                fr.outside = raw - sum(int(np.isfinite(xy).all(1).sum()) for xy, _ in fr.instances)
            kept = select(group.frames)
            by_index = {fr.index: fr for fr in group.frames}
            pixels = group.pixels({fr.index for fr in kept})
            for fr in kept:
                st["outside_image"] += by_index[fr.index].outside
                st["dropped_instances"] += len(by_index[fr.index].instances) - len(fr.instances)
                if pixels[fr.index].shape != (fr.height, fr.width):
                    raise SystemExit(f"{fr.origin}: decoded {pixels[fr.index].shape}, expected "
                                     f"{fr.height} x {fr.width}")
                n_images += 1
                image_id = ID_BLOCK * cid + n_images  # ids: category id x 10000 + a count
                file_name = f"{s.category}/{fr.stem}.jpg"
                Image.fromarray(pixels[fr.index]).save(out / "images" / file_name, quality=JPEG_QUALITY,
                                                         optimize=True)  # grey: mode L
                images.append({"id": image_id, "file_name": file_name, "width": fr.width, "height": fr.height,
                               "source": fr.origin})
                st["images"] += 1
                for xy, track in fr.instances:
                    ok = np.isfinite(xy).all(1)
                    flat = []
                    for (x, y), v in zip(xy, ok):
                        flat += [round(float(x), 3), round(float(y), 3), 2] if v else [0, 0, 0]
                    bbox = box_of(xy[ok], fr.width, fr.height)
                    n_anns += 1
                    anns.append({"id": ID_BLOCK * cid + n_anns, "image_id": image_id, "category_id": cid,
                                 "bbox": bbox, "area": round(bbox[2] * bbox[3], 2), "iscrowd": 0,
                                 "num_keypoints": int(ok.sum()), "keypoints": flat,
                                 **({"track": track} if track else {})})
                    st["instances"] += 1
                    st["keypoints"] += int(ok.sum())

    info = {
        "description": "escape_fast's real-photo animal keypoint benchmark (benchmarks/animals/README.md): "
                       "frames of public SLEAP and DeepPoseKit test/example data in MP-100's layout",
        "built_by": "benchmarks/animals/build.py",
        "bbox": f"labelled keypoints' extent padded by {PAD:.0%} of its longer side on every side, "
                "clipped to [0, width - 1] x [0, height - 1]",
        "min_keypoints": MIN_KEYPOINTS,
        "split": SPLIT_REASON,
    }
    about = {s.id: {"category": s.category, "repo": s.repo, "commit": s.commit, "files": list(s.files),
                    "license": s.licence, "labels": s.labels} for s in sources}

    def write(name: str, keep_cats: set[int]):
        keep_anns = [a for a in anns if a["category_id"] in keep_cats]
        keep_imgs = {a["image_id"] for a in keep_anns}
        doc = {"info": {**info, "sources": [about[c] for c in sorted(keep_cats)]},
               "images": [i for i in images if i["id"] in keep_imgs], "annotations": keep_anns,
               "categories": [c for c in cats if c["id"] in keep_cats]}
        with open(out / "annotations" / name, "w") as f:
            json.dump(doc, f, indent=None, separators=(",", ":"))
            f.write("\n")

    write("animals_all.json", {c["id"] for c in cats})
    for split in SPLITS:
        part = {c["id"] for c in cats if c["split"] == split}
        if part:
            write(f"animals_{split}.json", part)
    return stats


def table(stats: dict) -> str:
    lines = ["| category | split | images | instances | K | labelled keypoints |", "|---|---|---:|---:|---:|---:|"]
    for split in SPLITS:
        rows = {c: s for c, s in stats.items() if s["split"] == split}
        for c, s in rows.items():
            lines.append(f"| {c} | {split} | {s['images']} | {s['instances']} | {s['K']} | {s['keypoints']} |")
        lines.append(f"| *{split}* | | {sum(s['images'] for s in rows.values())} | "
                     f"{sum(s['instances'] for s in rows.values())} | | "
                     f"{sum(s['keypoints'] for s in rows.values())} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="get the source files (checked against their git blob hashes)")
    f.add_argument("--dest", type=Path, required=True, help="folder for <owner>+<name>/<path>")
    f.add_argument("--git", type=Path, help="folder of local clones or mirrors: <owner>+<name>/repo, "
                                            "<owner>+<name> or <name>[.git]; files not found there are "
                                            "downloaded from raw.githubusercontent.com")
    b = sub.add_parser("build", help="write the data set")
    b.add_argument("--src", type=Path, required=True, help="folder of <owner>+<name>/<path> (from fetch)")
    b.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    b.add_argument("--categories", nargs="+", choices=[s.category for s in SOURCES],
                   help="only these categories (default: all)")
    a = p.parse_args(argv)
    if a.cmd == "fetch":
        fetch(a.dest, a.git)
        return 0
    stats = build(a.src, a.out, a.categories)
    print(table(stats))
    dropped = {c: (s["dropped_instances"], s["outside_image"]) for c, s in stats.items()
               if s["dropped_instances"] or s["outside_image"]}
    if dropped:
        print(f"dropped instances (< {MIN_KEYPOINTS} keypoints) / keypoints outside the image:", dropped)
    size = sum(f.stat().st_size for f in a.out.rglob("*") if f.is_file())
    print(f"{a.out}: {size / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
