"""Check a data set in MP-100's layout before a week of training on it.

``check_dataset(root)`` reads every annotation file under ``root/annotations``
and every image they name (under ``root/images``), and finds every problem at
once where the loaders (escape_fast.data.coco) stop at the first. Each problem
has a kind and a severity:

* ``error``: every run on the file stops on it (malformed JSON or fields,
  duplicate ids, annotations of unknown images or categories, a keypoint list
  of the wrong length, a category defined differently in two files, the
  parts of one MP-100 split sharing a category, a missing split file);
* ``bad image``: a missing, undecodable or wrongly sized image stops a run
  unless it is given ``--bad-images skip``, which drops its instances;
* ``dropped``: the loaders skip the annotation with a counted warning (a box
  with no area inside the image, no visible keypoint);
* ``warning``: usable, but worth a look (a visible keypoint outside its box
  or outside the image, a box reaching past the image).

The data set is usable when it has no error, and no bad image unless
``bad_images="skip"``. For MP-100 the report also sets the counts against
the published ones: 100 categories, five splits of 70 / 10 / 20.
"""

from __future__ import annotations

import os
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from escape_fast.data.coco import MP100_SPLITS, clean_bbox, default_image_root, load_image, read_json
from escape_fast.errors import DataError

SEVERITIES = ("error", "bad image", "dropped", "warning")
MP100_CATEGORIES = 100
MP100_PARTS = {"train": 70, "val": 10, "test": 20}
# <prefix>split<N>_<part>.json: the parts of one split (MP-100's own files have the prefix "mp100_")
_SPLIT_FILE = re.compile(r"^(.*)split(\d+)_(train|val|test)\.json$")
_EXAMPLES = 5


@dataclass(frozen=True)
class Problem:
    kind: str
    severity: str
    file: str  # the annotation file (its name under annotations/) or the image path
    id: int | str | None  # the annotation, image or category id it is about
    detail: str


@dataclass
class Report:
    root: str
    files: list[str]
    images: int
    annotations: int
    categories: int
    problems: list[Problem]
    mp100: dict | None
    bad_images: str
    seconds: float = 0.0
    # what ``--bad-images skip`` leaves out: instances on bad images
    dropped_instances: int = 0

    @property
    def usable(self) -> bool:
        blocking = {"error"} | ({"bad image"} if self.bad_images == "raise" else set())
        return not any(p.severity in blocking for p in self.problems)

    def by_kind(self) -> dict[tuple[str, str], list[Problem]]:
        groups: dict[tuple[str, str], list[Problem]] = {}
        for p in self.problems:
            groups.setdefault((p.severity, p.kind), []).append(p)
        return dict(sorted(groups.items(), key=lambda kv: (SEVERITIES.index(kv[0][0]), kv[0][1])))

    def as_dict(self) -> dict:
        return {"root": self.root, "usable": self.usable, "bad_images": self.bad_images,
                "seconds": self.seconds, "files": self.files, "images": self.images,
                "annotations": self.annotations, "categories": self.categories,
                "dropped_instances_with_skip": self.dropped_instances, "mp100": self.mp100,
                "summary": [{"severity": s, "kind": k, "count": len(ps)} for (s, k), ps in self.by_kind().items()],
                "problems": [asdict(p) for p in self.problems]}

    def lines(self) -> list[str]:
        out = [(f"{self.root}: {len(self.files)} annotation files, {self.images:,} images, "
                f"{self.annotations:,} annotations (over all files), {self.categories} categories "
                f"({self.seconds:.1f} s)")]
        groups = self.by_kind()
        if not groups:
            out.append("no problems found")
        for (severity, kind), problems in groups.items():
            files = sorted({p.file for p in problems})
            distinct = list(dict.fromkeys(p.id for p in problems if p.id is not None))
            ids = ", ".join(str(i) for i in distinct[:_EXAMPLES])
            more = ", ..." if len(distinct) > _EXAMPLES else ""
            where = files[0] if len(files) == 1 else f"{len(files)} files"
            out.append(f"  {severity:<9} {kind}: {len(problems):,} ({where}{'; ids ' + ids + more if ids else ''})"
                       + (f" e.g. {problems[0].detail}" if problems[0].detail else ""))
        if any(p.severity == "bad image" for p in self.problems):
            out.append(f"  --bad-images skip would drop {self.dropped_instances:,} instance(s) on "
                       f"{sum(p.severity == 'bad image' for p in self.problems):,} image(s)")
        if self.mp100 is not None:
            m = self.mp100
            out.append(f"MP-100: {m['categories']} categories (published {MP100_CATEGORIES})")
            for split, parts in m["splits"].items():
                got = " / ".join(str(parts.get(p, "missing")) for p in MP100_PARTS)
                want = " / ".join(str(n) for n in MP100_PARTS.values())
                flag = "" if all(parts.get(p) == n for p, n in MP100_PARTS.items()) else "  <- differs"
                out.append(f"  split {split}: {got} train / val / test categories (published {want}){flag}")
        verdict = "usable" if self.usable else "NOT usable"
        blocking = sum(p.severity == "error" for p in self.problems)
        out.append(f"{verdict}: {blocking} error(s), "
                   f"{sum(p.severity == 'bad image' for p in self.problems)} bad image(s)"
                   + (" (skipped: --bad-images skip)" if self.bad_images == "skip" else ""))
        return out


# --------------------------------------------------------------------------
# one annotation file
# --------------------------------------------------------------------------
@dataclass
class _FileContents:
    name: str
    categories: dict  # id -> (name, keypoint names)
    images: dict  # id -> (file_name, width, height)
    instances: list  # (annotation id, image id, category id) of the usable annotations
    annotations: int


def _is_int(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer()


def _check_file(path: Path, problems: list[Problem]) -> _FileContents | None:
    name = path.name

    def add(kind, severity, ident, detail=""):
        problems.append(Problem(kind, severity, name, ident, detail))

    try:
        data = read_json(path)
    except DataError as e:
        add("unreadable annotation file", "error", None, str(e))
        return None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        add("unreadable annotation file", "error", None, "top level lacks an 'images', 'annotations' or "
                                                         "'categories' list")
        return None

    categories: dict = {}
    for i, c in enumerate(data["categories"]):
        cid = c.get("id") if isinstance(c, dict) else None
        names = c.get("keypoints") if isinstance(c, dict) else None
        if not _is_int(cid) or not isinstance(c.get("name"), str) or not isinstance(names, list) or not names:
            add("malformed category", "error", cid if cid is not None else f"#{i}",
                "needs an integer 'id', a 'name' and a non-empty 'keypoints' list")
            continue
        cid = int(cid)
        if cid in categories:
            add("duplicate category id", "error", cid)
            continue
        categories[cid] = (c["name"], tuple(str(n) for n in names))

    images: dict = {}
    for i, im in enumerate(data["images"]):
        iid = im.get("id") if isinstance(im, dict) else None
        ok = (isinstance(im, dict) and _is_int(iid) and isinstance(im.get("file_name"), str)
              and _is_int(im.get("width")) and _is_int(im.get("height"))
              and im["width"] > 0 and im["height"] > 0)
        if not ok:
            add("malformed image entry", "error", iid if iid is not None else f"#{i}",
                "needs an integer 'id', a 'file_name' and positive integer 'width' and 'height'")
            continue
        iid = int(iid)
        if iid in images:
            add("duplicate image id", "error", iid)
            continue
        images[iid] = (im["file_name"], int(im["width"]), int(im["height"]))

    seen: set = set()
    instances = []
    for i, a in enumerate(data["annotations"]):
        aid = a.get("id") if isinstance(a, dict) else None
        if not isinstance(a, dict) or not _is_int(aid):
            add("malformed annotation", "error", f"#{i}", "no integer 'id'")
            continue
        aid = int(aid)
        if aid in seen:
            add("duplicate annotation id", "error", aid)
            continue
        seen.add(aid)
        iid, cid = a.get("image_id"), a.get("category_id")
        if not _is_int(iid) or int(iid) not in images:
            add("annotation of an unknown image", "error", aid, f"image_id {iid!r}")
            continue
        if not _is_int(cid) or int(cid) not in categories:
            add("annotation of an unknown category", "error", aid, f"category_id {cid!r}")
            continue
        iid, cid = int(iid), int(cid)
        k = len(categories[cid][1])
        try:
            bbox = np.asarray(a.get("bbox"), dtype=np.float64)
            kps = np.asarray(a.get("keypoints"), dtype=np.float64)
        except (TypeError, ValueError):
            add("malformed annotation", "error", aid, "'bbox' or 'keypoints' holds non-numbers")
            continue
        if bbox.shape != (4,) or not np.isfinite(bbox).all():
            add("malformed annotation", "error", aid, "'bbox' is not four finite numbers")
            continue
        if kps.ndim != 1 or kps.size != 3 * k:
            add("keypoint count differs from the category's", "error", aid,
                f"{kps.size} values, expected 3 x {k} for category {cid}")
            continue
        if not np.isfinite(kps).all():
            add("malformed annotation", "error", aid, "'keypoints' holds NaN or infinity")
            continue
        kps = kps.reshape(-1, 3)
        if not np.isin(kps[:, 2], (0.0, 1.0, 2.0)).all():
            add("malformed annotation", "error", aid, "visibility flags other than 0, 1, 2")
            continue
        _, width, height = images[iid]
        box = clean_bbox(bbox, width, height)
        if box is None or (_is_int(a.get("area")) and a["area"] <= 0):
            add("box with no area inside the image", "dropped", aid)
            continue
        visible = kps[:, 2] > 0
        if not visible.any() or a.get("num_keypoints") == 0 or not kps.any():
            add("no visible keypoint", "dropped", aid)
            continue
        x, y, w, h = bbox
        if x < 0 or y < 0 or x + w > width or y + h > height:
            add("box reaches past the image", "warning", aid)
        xy = kps[visible, :2]
        outside_image = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= width) | (xy[:, 1] >= height)
        outside_box = (xy[:, 0] < x) | (xy[:, 1] < y) | (xy[:, 0] > x + w) | (xy[:, 1] > y + h)
        if outside_image.any():
            j = int(np.flatnonzero(visible)[np.argmax(outside_image)])
            add("visible keypoint outside the image", "warning", aid,
                f"keypoint {j} at ({kps[j, 0]:g}, {kps[j, 1]:g}) in a {width} x {height} image")
        elif outside_box.any():
            j = int(np.flatnonzero(visible)[np.argmax(outside_box)])
            add("visible keypoint outside its box", "warning", aid,
                f"keypoint {j} at ({kps[j, 0]:g}, {kps[j, 1]:g}), box [{x:g}, {y:g}, {w:g}, {h:g}]")
        instances.append((aid, iid, cid))
    return _FileContents(name, categories, images, instances, len(data["annotations"]))


# --------------------------------------------------------------------------
# images, in parallel
# --------------------------------------------------------------------------
class _ImageProbe:
    """Map-style dataset: the problem kind and message of image ``i``, or ('', '')."""

    def __init__(self, entries: list[tuple[str, int, int, int]]):
        self.entries = entries  # (path, image id, width, height)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[str, str]:
        path, iid, width, height = self.entries[i]
        if not os.path.isfile(path):
            return "missing image file", path
        try:
            load_image(path, iid, (width, height))
        except DataError as e:
            kind = "image size differs from the file's width / height" if "decoded size" in str(e) else \
                "undecodable image"
            return kind, str(e)
        return "", ""


def _probe_images(entries, workers: int, progress):
    from torch.utils.data import DataLoader

    loader = DataLoader(_ImageProbe(entries), batch_size=8, num_workers=workers, collate_fn=list)
    bar = progress(total=len(entries), desc="images", unit="image") if progress else None
    results = []
    for chunk in loader:
        results += chunk
        if bar:
            bar.update(len(chunk))
    if bar:
        bar.close()
    return results


# --------------------------------------------------------------------------
# the data set
# --------------------------------------------------------------------------
def check_dataset(root: str | os.PathLike, workers: int = 0, progress=None, bad_images: str = "raise",
                  images: bool = True) -> Report:
    """Every problem of the data set at ``root`` (see the module docstring).
    ``workers``: image-decoding processes; ``images=False`` skips the images."""
    if bad_images not in ("raise", "skip"):
        raise ValueError(f"bad_images must be 'raise' or 'skip', got {bad_images!r}")
    start = time.perf_counter()
    root = Path(root)
    folder = root / "annotations"
    if not folder.is_dir():
        raise DataError(f"{root}: no annotations/ folder (a data set in MP-100's layout has "
                        "annotations/*.json and images/)")
    paths = sorted(folder.glob("*.json"))
    if not paths:
        raise DataError(f"{folder}: no annotation files (*.json)")
    problems: list[Problem] = []
    contents = [c for c in (_check_file(p, problems) for p in paths) if c is not None]

    # a category must mean the same thing in every file that has it
    first: dict[int, tuple[str, tuple, str]] = {}
    for c in contents:
        for cid, (name, kps) in c.categories.items():
            if cid not in first:
                first[cid] = (name, kps, c.name)
            elif first[cid][:2] != (name, kps):
                n0, k0, f0 = first[cid]
                what = (f"{len(kps)} keypoints against {len(k0)}" if len(kps) != len(k0) else
                        "other keypoint names" if name == n0 else f"name {name!r} against {n0!r}")
                problems.append(Problem("category differs between files", "error", c.name, cid,
                                        f"{what} in {f0}"))

    # the parts of an MP-100 split must not share categories, and every part must be there
    splits: dict[tuple[str, int], dict[str, set]] = defaultdict(dict)
    for c in contents:
        m = _SPLIT_FILE.match(c.name)
        if m:
            splits[m.group(1), int(m.group(2))][m.group(3)] = {cid for _, _, cid in c.instances}
    for (prefix, split), parts in sorted(splits.items()):
        names = list(parts)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                for cid in sorted(parts[a] & parts[b]):
                    problems.append(Problem("category in two parts of a split", "error",
                                            f"{prefix}split{split}_{a}.json", cid, f"also in {prefix}split{split}_{b}"))
    mp100 = None
    if any(prefix == "mp100_" for prefix, _ in splits):
        for split in MP100_SPLITS:
            for part in MP100_PARTS:
                if not (folder / f"mp100_split{split}_{part}.json").is_file():
                    problems.append(Problem("missing MP-100 split file", "error",
                                            f"mp100_split{split}_{part}.json", None, ""))
        ours = {split: parts for (prefix, split), parts in sorted(splits.items()) if prefix == "mp100_"}
        used = set().union(*(cats for parts in ours.values() for cats in parts.values()))
        mp100 = {"categories": len(used),
                 "splits": {s: {p: len(parts[p]) for p in MP100_PARTS if p in parts} for s, parts in ours.items()}}

    # images: each distinct file once, against the size its first annotation file gives it
    image_root = default_image_root(paths[0])
    entries, where, instances_on = {}, {}, defaultdict(int)
    for c in contents:
        for _, iid, _ in c.instances:
            instances_on[str(image_root / c.images[iid][0])] += 1
        for iid, (file_name, width, height) in c.images.items():
            path = str(image_root / file_name)
            if path in entries:
                if entries[path][2:] != (width, height):
                    problems.append(Problem("image size differs between files", "error", c.name, iid,
                                            f"{file_name}: {width} x {height} against {entries[path][2]} x "
                                            f"{entries[path][3]} in {where[path]}"))
            else:
                entries[path], where[path] = (path, iid, width, height), c.name
    dropped = 0
    if images:
        ordered = list(entries.values())
        for (path, iid, _, _), (kind, message) in zip(ordered, _probe_images(ordered, workers, progress)):
            if kind:
                problems.append(Problem(kind, "bad image", path, iid, message))
                dropped += instances_on.get(path, 0)

    return Report(str(root), [p.name for p in paths], len(entries), sum(c.annotations for c in contents),
                  len(first), problems, mp100, bad_images, time.perf_counter() - start, dropped)
