"""Predict keypoints on your own images from one or a few annotated supports.

    python -m escape_fast.predict --support dog.jpg --support-keypoints dog.json \\
        --query other_dog.jpg more/*.jpg --out predictions/

From Python, :class:`Predictor` loads a model once, adapts to a support set
once (:meth:`Predictor.adapt`) and predicts any number of queries in batches
(:meth:`Predictor.predict`).

The keypoint file (one per support) is either

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

Every box (given, from the file, or the whole image) is clipped to the
image the way escape_fast.data.coco cleans annotation boxes and padded by
1.25 into a square crop, exactly as the evaluation crops its instances.
Several supports (e.g. 5-shot) must have the same keypoints (same names).
A keypoint visible in no support gets no prediction (null coordinates).

Bad input raises :class:`escape_fast.data.DataError` naming the file: a
missing or corrupt image, a malformed keypoint file, keypoints outside the
image or the crop, a support without a visible keypoint, an image or box
smaller than MIN_SIDE pixels. A support error stops the adaptation; a query
error is reported for that query while the other queries get their results.
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from escape_fast import builtin, ops
from escape_fast.data.coco import DataError, DataWarning, clean_bbox, load_coco, load_image, read_json
from escape_fast.data.transforms import Crop, normalize_image
from escape_fast.distributed import inference_batch_size, resolve_device
from escape_fast.files import write_json
from escape_fast.models.escape import EscapeModel

MIN_SIDE = 32  # pixels: a smaller image holds no usable object (a crop would upscale it 8x and more)
MIN_BOX_SIDE = 8  # pixels: a box of a real photograph may be thin (a lying animal), not this thin
SIMPLE_FIELDS = ("names", "keypoints", "skeleton", "box", "bbox", "image")


# --------------------------------------------------------------------------
# keypoint files
# --------------------------------------------------------------------------
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


def _box(value, where: str, name: str = "box") -> np.ndarray:
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
                        "escape_fast.predict) or a COCO file with 'annotations' and 'categories'")
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
            box = _box(data[key], where, key)
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


def _as_keypoint_set(kp, image) -> KeypointSet:
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


# --------------------------------------------------------------------------
# images and crops
# --------------------------------------------------------------------------
def _image_name(image, fallback: str) -> str:
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else fallback


def read_image(image, name: str) -> np.ndarray:
    """RGB uint8 [H, W, 3] from a path (EXIF orientation applied) or an array."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(os.fspath(image))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise DataError(f"{name}: an image array must be RGB uint8 [H, W, 3], got {arr.dtype} {list(arr.shape)}")
    return arr


@dataclass
class CropView:
    """A normalized crop [3, S, S] of an image, the crop, and the box it came from."""

    tensor: torch.Tensor
    crop: Crop
    box: np.ndarray  # the box that was cropped, [x, y, w, h]


def make_crop(image: np.ndarray, box, input_size: int, name: str) -> CropView:
    """Crop ``box`` ([x, y, w, h], default: the whole image) as the evaluation does."""
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise DataError(f"{name}: the image is {w} x {h} pixels; at least {MIN_SIDE} x {MIN_SIDE} is needed")
    box = np.array([0.0, 0.0, w, h]) if box is None else _box(list(box), name)
    clean = clean_bbox(box, w, h)
    if clean is None:
        raise DataError(f"{name}: box {box.tolist()} has no area inside the {w} x {h} image")
    if min(clean[2], clean[3]) < MIN_BOX_SIDE:
        raise DataError(f"{name}: the box {box.tolist()} (inside the image: {clean.tolist()}) is smaller than "
                        f"{MIN_BOX_SIDE} pixels on a side")
    size = (input_size, input_size)
    crop = Crop.of_box(clean, size)
    return CropView(normalize_image(crop.warp(image, size)), crop, clean)


# --------------------------------------------------------------------------
# the predictor
# --------------------------------------------------------------------------
@dataclass
class Prediction:
    """The result for one query.

    ``keypoints`` [K, 2] float64 image pixels (NaN for keypoints visible in
    no support), ``scores`` [K] the cosine similarity of each keypoint's
    prototype and the query's feature at the prediction (in [-1, 1]: higher
    is a closer match, low when the object is not there; not a
    probability), ``box`` the box of the crop that was decoded (given,
    implied by a first pass, or the whole image); or ``error`` (and no
    keypoints) when the query could not be read.
    """

    image: str
    keypoints: np.ndarray | None = None
    scores: np.ndarray | None = None
    box: np.ndarray | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self, names) -> dict:
        if not self.ok:
            return {"image": self.image, "error": self.error}
        points = []
        for name, (x, y), s in zip(names, self.keypoints.tolist(), self.scores.tolist()):
            known = math.isfinite(x)
            points.append({"name": name, "x": x if known else None, "y": y if known else None,
                           "score": s if known else None})
        return {"image": self.image, "box": self.box.tolist(), "keypoints": points}


class Predictor:
    """Load a model once, adapt it to a support set once, predict many queries.

    Args:
        checkpoint: a training run folder (its model.pt), a model.pt,
            ``imagenet:NAME`` (a training-free model of an ImageNet trunk), or
            None: the default model for photographs (builtin.PHOTO_MODEL).
        method: "mle", "map" or "escape" (default: the best the model has).
        device: "cpu", "cuda", ... (default "auto": the GPU when there is one).
        batch_size: queries per feature-extraction batch (default:
            :func:`escape_fast.distributed.inference_batch_size`, 32 on a GPU
            and 4 at 256 px on the CPU, where larger batches ran slower).
        backend: op implementation (escape_fast.ops).

    >>> p = Predictor().adapt("dog.jpg", "dog.json")
    >>> for r in p.predict(["a.jpg", "b.jpg"]): print(r.image, r.keypoints)
    """

    def __init__(self, checkpoint=None, method: str | None = None, device=None, batch_size: int | None = None,
                 backend: str = "auto", amp: bool = True):
        self.device = resolve_device(device)
        self.model = EscapeModel.load(builtin.PHOTO_MODEL if checkpoint is None else checkpoint)
        self.model.to(self.device).eval()
        self.checkpoint = self.model.path
        self.method = method or self.model.methods[-1]
        self.model.check_method(self.method)
        if batch_size is None:
            batch_size = inference_batch_size(self.device, self.model.input_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size, self.backend, self.amp = int(batch_size), backend, amp
        self.input_size = self.model.input_size
        self.heatmap_size = (self.input_size // 4, self.input_size // 4)
        self.supports: list[KeypointSet] = []
        self.prototypes = None

    # ---------------------------------------------------------------- support
    def _support_crop(self, image, kps: KeypointSet, box, name: str):
        """(crop, heatmap cells [K, 2], visible [K]) of one support, after
        checking its keypoints: those outside the crop of its box are left
        out with a warning (they would pool nothing), none left is an error."""
        where = f"{name} with keypoints {kps.source}"
        if not kps.visible.any():
            raise DataError(f"{kps.source}: no visible keypoint; a support needs at least one")
        img = read_image(image, name)
        h, w = img.shape[:2]
        xy = kps.keypoints
        outside = kps.visible & ((xy[:, 0] < 0) | (xy[:, 0] > w) | (xy[:, 1] < 0) | (xy[:, 1] > h))
        if outside.any():
            bad = ", ".join(f"'{kps.names[i]}' at ({xy[i, 0]:g}, {xy[i, 1]:g})" for i in np.flatnonzero(outside)[:5])
            raise DataError(f"{where}: keypoint(s) outside the {w} x {h} image: {bad}")
        crop = make_crop(img, box if box is not None else kps.box, self.input_size, name)
        cells = crop.crop.to_grid(xy, self.heatmap_size)
        off = kps.visible & ((cells < 0) | (cells > np.array(self.heatmap_size) - 1)).any(1)
        if off.any():
            bad = ", ".join(f"'{kps.names[i]}' at ({xy[i, 0]:g}, {xy[i, 1]:g})" for i in np.flatnonzero(off)[:5])
            what = (f"{where}: {int(off.sum())} of {int(kps.visible.sum())} visible keypoint(s) outside the crop of "
                    f"box {crop.box.tolist()} (padded by 1.25): {bad}")
            if off.sum() == kps.visible.sum():
                raise DataError(f"{what}; give a box that holds the keypoints")
            warnings.warn(f"{what}; left out of this support (give a box that holds them)", DataWarning, 2)
        return crop, cells, kps.visible & ~off

    @torch.no_grad()
    def adapt(self, images, keypoints, boxes=None) -> Predictor:
        """Compute the keypoint prototypes of a support set.

        Args:
            images: one image or a list (paths, or RGB uint8 [H, W, 3] arrays).
            keypoints: one per image: a keypoint file path (simple format or
                ``coco.json[#ID]``), a dict in the simple format, an array
                [K, 2] / [K, 3], or a :class:`KeypointSet`; a single COCO file
                path may serve every image.
            boxes: None, or one [x, y, w, h] (or None) per image; a box given
                here wins over the keypoint file's.
        Returns self. Raises DataError naming the file on bad input.
        """
        shared = False
        if isinstance(images, (str, os.PathLike, np.ndarray)):  # one support
            images, keypoints, boxes = [images], [keypoints], [boxes]
        else:
            images = list(images)
            if isinstance(keypoints, (str, os.PathLike)):  # one COCO file for every support
                keypoints, shared = [keypoints] * len(images), len(images) > 1
            keypoints = list(keypoints)
            boxes = [None] * len(images) if boxes is None else list(boxes)
        if not images or len(keypoints) != len(images) or len(boxes) != len(images):
            raise ValueError(f"adapt: {len(images)} support images, {len(keypoints)} keypoint sets and "
                             f"{len(boxes)} boxes; give one of each per support")
        sets, crops, cells, shown = [], [], [], []
        for n, (image, kp, box) in enumerate(zip(images, keypoints, boxes)):
            name = _image_name(image, f"support #{n}")
            kps = _as_keypoint_set(kp, image)
            if sets and kps.names != sets[0].names:
                raise DataError(f"{kps.source}: its keypoints ({len(kps)}: {', '.join(kps.names[:6])}...) differ "
                                f"from those of {sets[0].source} ({len(sets[0])}); every support needs the same")
            if shared and any(s.source == kps.source for s in sets):
                raise DataError(f"{kps.source}: chosen for two supports; one keypoint file for several supports "
                                "must be a COCO file with one annotation on each support image")
            crop, cell, vis = self._support_crop(image, kps, box, name)
            sets.append(kps)
            crops.append(crop)
            cells.append(cell)
            shown.append(vis)
        dev = self.device
        batch = torch.stack([c.tensor for c in crops]).to(dev)
        cells_t = torch.from_numpy(np.stack(cells)).float().to(dev)
        vis = self.model.support_visible(cells_t, torch.from_numpy(np.stack(shown)).to(dev))
        # the matching network runs only for ESCAPE (or for the figure's matches)
        _, pooled, scores = self.model.features(batch, cells_t, vis, self.amp, self.backend,
                                                matcher=self.method == "escape")
        self._pooled, self._visible = pooled[None], vis[None]  # [1, S, ...]
        self._match_scores = None if scores is None else scores[None]
        self.prototypes = self.model.prototypes(self.method, self._pooled, self._visible, self._match_scores)[0]
        grid = self.input_size // 4
        self._positions = self.model.support_positions(cells_t[None], vis[None], grid)[0]  # for the location prior
        self.supports = sets
        self.support_crops = crops
        self._cells = cells
        self.support_images = [_image_name(im, f"support #{n}") for n, im in enumerate(images)]
        self.known = vis.any(0).cpu().numpy()  # keypoints visible in some support
        return self

    @property
    def names(self) -> tuple[str, ...]:
        return self.supports[0].names if self.supports else ()

    @property
    def skeleton(self) -> tuple[tuple[int, int], ...]:
        return self.supports[0].skeleton if self.supports else ()

    @torch.no_grad()
    def matches(self, method: str) -> tuple[np.ndarray, np.ndarray]:
        """Super-keypoint matched to each support keypoint: (index [K], -1 for
        none; weight [K]) by EscapeModel.assignments ("map" or "escape")."""
        self._need_support()
        if method == "escape" and self._match_scores is None and "escape" in self.model.methods:
            images = torch.stack([c.tensor for c in self.support_crops]).to(self.device)
            cells = torch.from_numpy(np.stack(self._cells)).float().to(self.device)
            _, _, scores = self.model.features(images, cells, self._visible[0], self.amp, self.backend)
            self._match_scores = scores[None]
        index, weight = self.model.assignments(method, self._pooled, self._visible, self._match_scores)
        return index[0].cpu().numpy(), weight[0].float().cpu().numpy()

    def _need_support(self):
        if self.prototypes is None:
            raise RuntimeError("call Predictor.adapt(support images, keypoints) before predicting")

    # ---------------------------------------------------------------- queries
    @torch.no_grad()
    def predict(self, images, boxes=None, raise_errors: bool = False) -> list[Prediction]:
        """Keypoints of each query image (paths or RGB arrays), in batches.

        ``boxes``: None or one [x, y, w, h] (or None) per image. In a query
        without a box the object is found first (:meth:`locate`), then its
        box is decoded like a given one. A query
        that cannot be read gets a Prediction with ``error`` set (or, with
        ``raise_errors``, raises its DataError); the others are unaffected.
        """
        self._need_support()
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        boxes = [None] * len(images) if boxes is None else list(boxes)
        if len(boxes) != len(images):
            raise ValueError(f"predict: {len(images)} images but {len(boxes)} boxes")
        results: list[Prediction] = []
        for start in range(0, len(images), self.batch_size):
            chunk, crops, pixels, searched = [], [], [], []
            for n in range(start, min(start + self.batch_size, len(images))):
                result = Prediction(_image_name(images[n], f"query #{n}"))
                try:
                    img = read_image(images[n], result.image)
                    crop = make_crop(img, boxes[n], self.input_size, result.image)
                except DataError as e:
                    if raise_errors:
                        raise
                    result.error = str(e)
                else:
                    chunk.append(result)
                    crops.append(crop)
                    pixels.append(img)
                    searched.append(boxes[n] is None)
                results.append(result)
            if not crops:
                continue
            # queries without a box: find the object in the whole image first (see locate), one at a
            # time: batching the search was slower on CPU (32 whole images: 1.7 s batched, 0.65 s one by one)
            for i, is_searched in enumerate(searched):
                if is_searched:
                    box = self.locate(crops[i])
                    if box is not None:
                        try:
                            crops[i] = make_crop(pixels[i], box, self.input_size, chunk[i].image)
                        except DataError:  # no area inside the image: keep the whole image
                            pass
            self._decode(chunk, crops)
        return results

    # the object sizes tried by locate, as fractions of the whole-image crop's side
    SEARCH_SIZES = (0.12, 0.18, 0.25, 0.35, 0.5, 0.7)
    SEARCH_TEMPERATURE = 0.05  # of the keypoints' cosine maps (softmax) in locate's votes

    @torch.no_grad()
    def locate(self, view: CropView) -> np.ndarray | None:
        """The box [x, y, w, h] of the object in a whole-image crop, or None.

        A generalized Hough transform over the supports' layout: each
        keypoint's cosine map (softmax over the crop, temperature
        SEARCH_TEMPERATURE) votes for the object's centre at the offset the
        supports show between that keypoint and their box centre, at each
        object size of SEARCH_SIZES; the centre and size with the most votes
        give the box, shaped like the supports' boxes."""
        rel, aspect = [], []
        for kps, crop in zip(self.supports, self.support_crops):
            x, y, w, h = crop.box
            size = max(w, h)
            rel.append(np.where(kps.visible[:, None], (kps.keypoints - [x + w / 2, y + h / 2]) / size, np.nan))
            aspect.append([w / size, h / size])
        with warnings.catch_warnings():  # a keypoint visible in no support has no offset (NaN)
            warnings.simplefilter("ignore", RuntimeWarning)
            u = np.nanmean(np.stack(rel), 0)  # [K, 2]: keypoint offsets from the box centre, in box sizes
        use = np.flatnonzero(np.isfinite(u).all(1) & self.known)
        if len(use) < 2:
            return None
        dev = self.device
        feats, _, _ = self.model.features(view.tensor[None].to(dev), amp=self.amp, backend=self.backend)
        grid = feats.shape[-1]
        protos = torch.nn.functional.normalize(self.prototypes[use], dim=-1)[None]
        maps = ops.prototype_heatmaps(self.model.smooth(feats), protos.to(feats.dtype))[0]  # [k, G, G]
        k = maps.shape[0]
        prob = torch.softmax(maps.reshape(k, -1) / self.SEARCH_TEMPERATURE, dim=-1).reshape(k, 1, grid, grid)
        base = torch.arange(grid, device=dev, dtype=prob.dtype)
        cy, cx = torch.meshgrid(base, base, indexing="ij")
        offsets = torch.from_numpy(u[use]).to(dev, prob.dtype)  # [k, 2]
        best = (-1.0, None, None)
        for frac in self.SEARCH_SIZES:
            size = frac * grid  # object size in grid cells
            px = cx[None] + size * offsets[:, 0, None, None]  # where keypoint k is if the centre is at (cx, cy)
            py = cy[None] + size * offsets[:, 1, None, None]
            where = torch.stack((2 * px / (grid - 1) - 1, 2 * py / (grid - 1) - 1), -1)  # [k, G, G, 2]
            votes = torch.nn.functional.grid_sample(prob, where, align_corners=True, padding_mode="zeros")
            votes = votes[:, 0].sum(0)  # [G, G]
            value, at = votes.flatten().max(0)
            if float(value) > best[0]:
                best = (float(value), size, (int(at) % grid, int(at) // grid))
        _, size, (gx, gy) = best
        center = view.crop.to_image(np.array([gx, gy], dtype=np.float64), (grid, grid))
        cell = 200.0 * view.crop.scale[0] / grid  # image pixels per grid cell
        wh = size * cell * np.mean(aspect, 0)
        return np.array([center[0] - wh[0] / 2, center[1] - wh[1] / 2, wh[0], wh[1]])

    def _decode(self, preds: list[Prediction], crops: list[CropView]):
        """Decode the crops of ``preds`` (with the model's location prior, if it has one).

        A keypoint's score is the cosine similarity of its prototype and the
        query's pooled feature at the predicted point, in [-1, 1]: higher is
        a closer match, and it falls when the object is not there."""
        dev = self.device
        feats, _, _ = self.model.features(torch.stack([c.tensor for c in crops]).to(dev), amp=self.amp,
                                          backend=self.backend)
        b, grid = feats.shape[0], feats.shape[-1]
        center = torch.from_numpy(np.stack([c.crop.center for c in crops])).float().to(dev)
        scale = torch.from_numpy(np.stack([c.crop.scale for c in crops])).float().to(dev)
        protos = self.prototypes[None].expand(b, -1, -1).contiguous()
        # decoded as the evaluation decodes, so both agree
        positions = self._positions[None].expand(b, -1, -1)
        xy, _ = self.model.decode(self.model.smooth(feats), protos, center, scale, backend=self.backend,
                                  positions=positions)
        coords = xy.double().cpu().numpy()
        cells = np.stack([c.crop.to_grid(xy, (grid, grid)) for c, xy in zip(crops, coords)])
        inside = (cells >= 0).all(-1) & (cells <= grid - 1).all(-1)
        found = ops.keypoint_pool(feats, torch.from_numpy(cells).float().to(dev),
                                  torch.from_numpy(inside).to(dev), self.model.sigma)
        cosine = torch.nn.functional.cosine_similarity(found, protos, dim=-1).double().cpu().numpy()
        for p, crop, xy, s in zip(preds, crops, coords, cosine):
            p.keypoints = np.where(self.known[:, None], xy, np.nan)
            p.scores = np.where(self.known, s, np.nan)
            p.box = crop.box


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------
def _parse_box(text: str) -> list[float] | None:
    if text.lower() == "none":
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"a box is x,y,w,h (four numbers) or none, got {text!r}")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m escape_fast.predict",
        description="Predict keypoints on query images from one or a few annotated support images of the same "
                    "kind of object. Writes predictions.json and one PNG per query (and per support) to --out.",
        epilog="Keypoint file: {\"names\": [...], \"keypoints\": [[x, y], [x, y, v], null, ...], \"skeleton\": "
               "[[0, 1], ...], \"box\": [x, y, w, h]} (names, skeleton, box optional), or a COCO keypoint file "
               "(file.json#ANNOTATION_ID picks one annotation). See README.md.",
    )
    p.add_argument("--support", action="append", required=True, metavar="IMG",
                   help="support image (repeat for several shots, e.g. 5)")
    p.add_argument("--support-keypoints", action="append", required=True, metavar="KP.json",
                   help="keypoint file of each support, in the order of --support (one COCO file may serve all)")
    p.add_argument("--support-box", action="append", type=_parse_box, metavar="x,y,w,h",
                   help="object box of each support (default: the keypoint file's box, else the whole image)")
    p.add_argument("--query", nargs="+", required=True, metavar="IMG", help="query image(s)")
    p.add_argument("--query-box", action="append", type=_parse_box, metavar="x,y,w,h",
                   help="object box of each query, in order ('none': whole image; default: whole images)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--checkpoint", metavar="MODEL",
                   help="training run folder, model.pt, one of the ESCAPE authors' .pth files, builtin (the built-in checkpoint) or imagenet:NAME[=FILE] "
                        f"(a training-free pretrained trunk: efficientnet_lite0/1/2, resnet50/18, dinov2_vits14/...; default: {builtin.PHOTO_MODEL}, the best on photographs)")
    p.add_argument("--method", choices=("escape", "map", "mle"),
                   help="prototype estimate (default: the best the model has, escape for the built-in one)")
    p.add_argument("--device", default="auto", help="auto (GPU when present) | cpu | cuda")
    p.add_argument("--batch-size", type=int,
                   help="queries per batch (default: 32 on a GPU; on the CPU, 4 at 256 px, more for smaller inputs)")
    p.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda", "triton", "reference"),
                   help="op implementation (default auto)")
    p.add_argument("--labels", action="store_true", help="write keypoint numbers beside the drawn keypoints")
    return p.parse_args(argv)


def _png_name(image: str, used: set, prefix: str = "") -> str:
    """A PNG file name from an image name that no other output uses (x.jpg -> x.png, then x-2.png, ...)."""
    stem = prefix + (Path(image).stem or "image")
    name, n = f"{stem}.png", 1
    while name in used:
        n += 1
        name = f"{stem}-{n}.png"
    used.add(name)
    return name


def _readable(name: str):
    """The image at path ``name`` for drawing, or None (an array given from Python has no path)."""
    try:
        return read_image(name, name) if os.path.isfile(name) else None
    except DataError:
        return None


def write_outputs(predictor: Predictor, results: list[Prediction], out_dir: str, labels: bool = False) -> str:
    """predictions.json and the drawings (each support and query) in ``out_dir``; returns the JSON path."""
    from escape_fast.drawing import draw_pose, save_png

    os.makedirs(out_dir, exist_ok=True)
    names, skeleton = predictor.names, predictor.skeleton
    numbers = [str(i) for i in range(len(names))] if labels else None
    used = {"predictions.png"}

    def draw(name, xy, valid, prefix=""):
        image = _readable(name)
        if image is None:
            return None
        png = _png_name(name, used, prefix)
        save_png(draw_pose(image, xy, valid, skeleton, numbers), os.path.join(out_dir, png))
        return png

    supports = [{"image": name, "keypoints": kps.source, "box": crop.box.tolist(),
                 "drawing": draw(name, kps.keypoints, kps.visible, "support-")}
                for name, kps, crop in zip(predictor.support_images, predictor.supports, predictor.support_crops)]
    queries = []
    for r in results:
        entry = r.as_dict(names)
        if r.ok:
            entry["drawing"] = draw(r.image, r.keypoints, np.isfinite(r.keypoints[:, 0]))
        queries.append(entry)
    report = {
        "checkpoint": predictor.checkpoint, "method": predictor.method, "device": str(predictor.device),
        "keypoint_names": list(names), "skeleton": [list(limb) for limb in skeleton],
        "coordinates": "image pixels (x right, y down) of the image as displayed (EXIF orientation applied)",
        "score": "cosine similarity of the keypoint's prototype and the query's feature at the prediction, in "
                 "[-1, 1] (higher is a closer match; low when the object is not there)",
        "supports": supports, "queries": queries,
    }
    path = os.path.join(out_dir, "predictions.json")
    write_json(path, report)
    return path


def main(argv=None) -> int:
    from escape_fast import cli

    args = parse_args(argv)
    return cli.run_main("escape_fast.predict", lambda: run(args))


def run(args) -> int:
    supports, kp_files = args.support, args.support_keypoints
    if len(kp_files) not in (1, len(supports)):
        print(f"error: {len(supports)} --support images but {len(args.support_keypoints)} --support-keypoints "
              "files; give one per support", file=sys.stderr)
        return 2
    for name, opt, n in (("--support-box", args.support_box, len(supports)),
                         ("--query-box", args.query_box, len(args.query))):
        if opt is not None and len(opt) != n:
            print(f"error: {len(opt)} {name} for {n} images; give one per image (none for the whole image)",
                  file=sys.stderr)
            return 2
    try:
        predictor = Predictor(args.checkpoint, args.method, args.device, args.batch_size, args.backend)
        keypoints = kp_files[0] if len(kp_files) == 1 else kp_files  # one COCO file may serve every support
        predictor.adapt(supports, keypoints, args.support_box)
    except ValueError as e:  # DataError and CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = predictor.predict(args.query, args.query_box)
    path = write_outputs(predictor, results, args.out, args.labels)
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"error: {r.error}", file=sys.stderr)
    print(f"{len(results) - len(failed)} of {len(results)} queries predicted ({predictor.method}, "
          f"{len(supports)}-shot, {predictor.device}); results in {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
