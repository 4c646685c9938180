"""The keypoint file of a support image: what predict, the demo and plot read.

A keypoint file is either

* the simple format, a JSON object::

      {"names":     ["nose", "left eye", "right eye", "tail"],
       "keypoints": [[120.5, 80.0], [110, 70], [130, 70, 0], null],
       "skeleton":  [["nose", "left eye"], [0, 2]],
       "box":       [50, 40, 200, 180]}

  ``keypoints`` (required): one entry per keypoint, ``[x, y]`` in pixels of
  the image as it is displayed (EXIF orientation applied), ``[x, y, v]``
  with v = 0 for "not visible" (1 and 2 are visible, as in COCO), or
  ``null``. ``names`` (optional, default "0", "1", ...): distinct strings.
  ``skeleton`` (optional): limbs as pairs of 0-based indices or of names.
  ``box`` (optional, also spelled ``bbox``): the object's box ``[x, y, w,
  h]``; without it the whole image is the crop. An ``image`` field may note
  the image's name; it is not read.
* or a COCO keypoint file (MP-100's format, escape_fast.data.coco) from which
  one annotation is taken: ``file.json#ID`` names annotation ID; otherwise
  the file's only annotation, or the only one on an image with the support
  image's file name. Names and skeleton come from its category (a skeleton
  that uses index 0 is read as 0-based, otherwise as COCO's 1-based), its
  box is the crop unless a box is given.

Bad input raises :class:`escape_fast.errors.DataError` naming the file.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from escape_fast.data.coco import load_coco, read_json
from escape_fast.errors import DataError

__all__ = ["SIMPLE_FIELDS", "KeypointSet", "as_keypoint_set", "load_keypoints", "parse_box", "parse_keypoints"]

SIMPLE_FIELDS = ("names", "keypoints", "skeleton", "box", "bbox", "image")


@dataclass(frozen=True)
class KeypointSet:
    """The annotation of one support: K keypoints in image pixels.

    ``keypoints`` [K, 2] float64 ((0, 0) where not visible), ``visible`` [K]
    bool, ``names`` K strings, ``skeleton`` 0-based index pairs, ``box``
    [x, y, w, h] or None (whole image), ``source`` what it was read from.
    """

    names: tuple[str, ...]
    keypoints: np.ndarray
    visible: np.ndarray
    skeleton: tuple[tuple[int, int], ...] = ()
    box: np.ndarray | None = None
    source: str = "<keypoints>"

    def __len__(self) -> int:
        return len(self.names)


def _number(value) -> bool:
    """A finite real number (numpy scalars included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def parse_box(value, where: str, name: str = "box") -> np.ndarray:
    """A box [x, y, w, h] of 4 finite numbers with a positive width and height."""
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(_number(v) for v in value):
        raise DataError(f"{where}: '{name}' is {value!r}; expected [x, y, w, h] (4 finite numbers)")
    box = np.asarray(value, dtype=np.float64)
    if box[2] <= 0 or box[3] <= 0:
        raise DataError(f"{where}: '{name}' {value!r} has a width or height that is not positive")
    return box


def _skeleton(raw, names, where: str) -> tuple[tuple[int, int], ...]:
    """Limbs as 0-based index pairs from pairs of indices or names."""
    if not isinstance(raw, (list, tuple)):
        raise DataError(f"{where}: 'skeleton' is a {type(raw).__name__}; expected a list of pairs")
    index = {n: i for i, n in enumerate(names)}
    k = len(names)
    limbs = []
    for limb in raw:
        ends = []
        if isinstance(limb, (list, tuple)) and len(limb) == 2:
            for e in limb:
                if isinstance(e, str) and e in index:
                    ends.append(index[e])
                elif isinstance(e, int) and not isinstance(e, bool) and 0 <= e < k:
                    ends.append(e)
        if len(ends) != 2:
            raise DataError(f"{where}: skeleton limb {limb!r} is not a pair of keypoint names or 0-based indices "
                            f"below {k}")
        limbs.append((ends[0], ends[1]))
    return tuple(limbs)


def parse_keypoints(data, where: str = "<keypoints>") -> KeypointSet:
    """A :class:`KeypointSet` from the simple format (a dict as read from JSON)."""
    if not isinstance(data, dict) or "keypoints" not in data:
        raise DataError(f"{where}: expected an object with a 'keypoints' list (the simple format, see "
                        "escape_fast.data.keypoint_file) or a COCO file with 'annotations' and 'categories'")
    unknown = sorted(set(data) - set(SIMPLE_FIELDS))
    if unknown:
        raise DataError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; the simple format has "
                        f"{', '.join(SIMPLE_FIELDS)}")
    raw = data["keypoints"]
    if not isinstance(raw, (list, tuple)) or len(raw) == 0:
        raise DataError(f"{where}: 'keypoints' must be a non-empty list of [x, y], [x, y, v] or null")
    k = len(raw)
    names = data.get("names")
    if names is None:
        names = [str(i) for i in range(k)]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{where}: 'names' must be a list of non-empty strings")
    if len(names) != k:
        raise DataError(f"{where}: {len(names)} names for {k} keypoints")
    if len(set(names)) != k:
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"{where}: keypoint names must be distinct; repeated: {', '.join(dup)}")
    xy = np.zeros((k, 2), dtype=np.float64)
    visible = np.zeros(k, dtype=bool)
    for i, p in enumerate(raw):
        if p is None:
            continue
        ok = isinstance(p, (list, tuple)) and len(p) in (2, 3) and all(_number(v) for v in p)
        if not ok or (len(p) == 3 and p[2] not in (0, 1, 2)):
            raise DataError(f"{where}: keypoint {i} ('{names[i]}') is {p!r}; expected [x, y], [x, y, v] with v "
                            "0, 1 or 2, or null")
        if len(p) == 2 or p[2] > 0:
            xy[i], visible[i] = p[:2], True
    skeleton = _skeleton(data.get("skeleton", []), names, where)
    box = None
    for key in ("box", "bbox"):
        if data.get(key) is not None:
            box = parse_box(data[key], where, key)
    return KeypointSet(tuple(names), xy, visible, skeleton, box, where)


def _coco_annotation(path: str, data: dict, ann_id: int | None, image) -> KeypointSet:
    """One annotation of a COCO keypoint file (see the module docstring);
    ``data`` is the file's JSON."""
    with warnings.catch_warnings():  # skipped annotations are reported below if they are the one asked for
        warnings.simplefilter("ignore")
        coco = load_coco(path, check_images=False)
    if ann_id is not None:
        chosen = [inst for inst in coco.instances if inst.ann_id == ann_id]
        if not chosen:
            raise DataError(f"{path}: no usable annotation id {ann_id} (absent, or skipped on loading: no visible "
                            "keypoint or a box with no area inside its image)")
    elif len(coco.instances) == 1:
        chosen = coco.instances
    else:
        name = Path(image).name if isinstance(image, (str, os.PathLike)) else None
        chosen = [inst for inst in coco.instances if name is not None and Path(inst.image.file_name).name == name]
        if len(chosen) > 1:  # the same file name in several folders: use the longer path match
            chosen = [inst for inst in chosen if str(Path(image).as_posix()).endswith(inst.image.file_name)]
        if len(chosen) != 1:
            what = f"image '{name}'" if name else "an image given as an array"
            raise DataError(f"{path}: {len(coco.instances)} usable annotations and {len(chosen)} of them on "
                            f"{what}; name one as {path}#ANNOTATION_ID")
    inst = chosen[0]
    cat = coco.categories[inst.category_id]
    where = f"{path}#{inst.ann_id}"
    skeleton = _skeleton([list(p) for p in cat.limbs()], cat.keypoints, f"{where} (category '{cat.name}')")
    # the box as written: make_crop cleans every box once, as load_coco does
    raw_box = next(a["bbox"] for a in data["annotations"] if a.get("id") == inst.ann_id)
    return KeypointSet(cat.keypoints, inst.keypoints.copy(), inst.visible.copy(), skeleton,
                       np.asarray(raw_box, dtype=np.float64), where)


def load_keypoints(path, image=None) -> KeypointSet:
    """Read a keypoint file: the simple format or ``coco.json[#ANNOTATION_ID]``.

    ``image`` (the support image's path) picks the annotation of a COCO file
    that has several."""
    path = os.fspath(path)
    ann_id = None
    if not os.path.exists(path) and "#" in path:
        path, _, ident = path.rpartition("#")
        if not ident.isdigit():
            raise DataError(f"{path}#{ident}: the part after '#' must be an annotation id (an integer)")
        ann_id = int(ident)
    data = read_json(path, "keypoint file")
    if isinstance(data, dict) and "annotations" in data and "categories" in data:
        return _coco_annotation(path, data, ann_id, image)
    if ann_id is not None:
        raise DataError(f"{path}: '#{ann_id}' selects an annotation of a COCO file, but this is not one")
    return parse_keypoints(data, path)


def as_keypoint_set(kp, image=None) -> KeypointSet:
    """A :class:`KeypointSet` from what the Predictor accepts: a KeypointSet, a
    keypoint file path, a dict in the simple format or an array [K, 2] / [K, 3]."""
    if isinstance(kp, KeypointSet):
        return kp
    if isinstance(kp, (str, os.PathLike)):
        return load_keypoints(kp, image)
    if isinstance(kp, dict):
        return parse_keypoints(kp)
    arr = np.asarray(kp, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] not in (2, 3):
        raise DataError(f"support keypoints: an array must be [K, 2] or [K, 3], got shape {list(arr.shape)}")
    return parse_keypoints({"keypoints": arr.tolist()}, "<array>")
