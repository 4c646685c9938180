"""The Predictor: keypoints on your own images from one or a few annotated supports.

:class:`Predictor` loads a model once, adapts to a support set once
(:meth:`Predictor.adapt`) and predicts any number of queries in batches
(:meth:`Predictor.predict`). The keypoint files it reads are described in
escape_fast.data.keypoint_file; a query without a box is searched first
(escape_fast.predict.search).

Every box (given, from the file, or the whole image) is clipped to the
image the way escape_fast.data.coco cleans annotation boxes and padded by
1.25 into a square crop, exactly as the evaluation crops its instances.
Several supports (e.g. 5-shot) must have the same keypoints (same names).
A keypoint visible in no support gets no prediction (null coordinates).

Bad input raises :class:`escape_fast.errors.DataError` naming the file: a
missing or corrupt image, a malformed keypoint file, keypoints outside the
image or the crop, a support without a visible keypoint, an image or box
smaller than MIN_SIDE pixels. A support error stops the adaptation; a query
error is reported for that query while the other queries get their results.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from escape_fast import builtin, ops
from escape_fast.data.coco import clean_bbox, load_image
from escape_fast.data.keypoint_file import KeypointSet, as_keypoint_set, parse_box
from escape_fast.data.transforms import Crop, CropBatch, normalize_image
from escape_fast.distributed import inference_batch_size, resolve_device
from escape_fast.errors import DataError, DataWarning, UsageError
from escape_fast.models.escape import EscapeModel
from escape_fast.predict.search import SupportLayout, fit_layout, layout_box, locate_object

MIN_SIDE = 32  # pixels: a smaller image holds no usable object (a crop would upscale it 8x and more)
MIN_BOX_SIDE = 8  # pixels: a box of a real photograph may be thin (a lying animal), not this thin
# the object search of a query without a box (Predictor.search): the whole image is searched at these
# multiples of the model's input size (a small object covers few feature cells at 1x), each found box
# decoded and the best kept, then decoded again up to SEARCH_REFITS times in the box its keypoints imply
SEARCH_SCALES = (1.0, 2.0)
SEARCH_REFITS = 1
SEARCH_TURN = True  # a refit's crop is turned so that the object stands as in the supports
SEARCH_SAME_BOX = 0.7  # intersection over union above which two scales' boxes count as one
REFIT_MARGIN = 1.1  # the refitted support box is widened by this (then padded by 1.25, as every crop)
REFIT_SETTLED = 0.02  # a refit box within this fraction of the last box's side is not decoded again
CONFIDENT = 0.5  # relative score (score / the supports' own) of the keypoints a refit is fitted to


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


def make_crop(image: np.ndarray, box, input_size: int, name: str, rotation: float = 0.0) -> CropView:
    """Crop ``box`` ([x, y, w, h], default: the whole image) as the evaluation does,
    turned by ``rotation`` degrees about the box's centre (the crop's up is
    the image's up turned by it; escape_fast.track turns a crop so that the
    object stands as it does in the supports)."""
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise DataError(f"{name}: the image is {w} x {h} pixels; at least {MIN_SIDE} x {MIN_SIDE} is needed")
    box = np.array([0.0, 0.0, w, h]) if box is None else parse_box(list(box), name)
    clean = clean_bbox(box, w, h)
    if clean is None:
        raise DataError(f"{name}: box {box.tolist()} has no area inside the {w} x {h} image")
    if min(clean[2], clean[3]) < MIN_BOX_SIDE:
        raise DataError(f"{name}: the box {box.tolist()} (inside the image: {clean.tolist()}) is smaller than "
                        f"{MIN_BOX_SIDE} pixels on a side")
    size = (input_size, input_size)
    crop = Crop.of_box(clean, size)
    if rotation:
        crop = Crop(crop.center, crop.scale, float(rotation))
    return CropView(normalize_image(crop.warp(image, size)), crop, clean)


def box_iou(a, b) -> float:
    """Intersection over union of two boxes [x, y, w, h]."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return float(inter / union) if union > 0 else 0.0


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
        search_scales, search_refits, search_turn: the object search of
            queries without a box (:meth:`search`).

    >>> p = Predictor().adapt("dog.jpg", "dog.json")
    >>> for r in p.predict(["a.jpg", "b.jpg"]): print(r.image, r.keypoints)
    """

    def __init__(self, checkpoint=None, method: str | None = None, device=None, batch_size: int | None = None,
                 backend: str = "auto", amp: bool = True, search_scales=SEARCH_SCALES,
                 search_refits: int = SEARCH_REFITS, search_turn: bool = SEARCH_TURN):
        self.device = resolve_device(device)
        self.model = EscapeModel.load(builtin.PHOTO_MODEL if checkpoint is None else checkpoint)
        self.model.to(self.device).for_inference()
        self.checkpoint = self.model.path
        self.method = method or self.model.methods[-1]
        self.model.check_method(self.method)
        if batch_size is None:
            batch_size = inference_batch_size(self.device, self.model.input_size)
        if batch_size < 1:
            raise UsageError(f"batch_size must be positive, got {batch_size}")
        self.batch_size, self.backend, self.amp = int(batch_size), backend, amp
        if not search_scales or min(search_scales) <= 0 or search_refits < 0:
            raise UsageError(f"search_scales must be positive multiples of the input size and search_refits >= 0, "
                             f"got {search_scales} and {search_refits}")
        self.search_scales, self.search_refits = tuple(float(v) for v in search_scales), int(search_refits)
        self.search_turn = bool(search_turn)
        self.input_size = self.model.input_size
        self.supports: list[KeypointSet] = []
        self.prototypes = None

    # ---------------------------------------------------------------- support
    def _support_crop(self, image, kps: KeypointSet, box, name: str):
        """(image, crop, heatmap cells [K, 2], visible [K]) of one support, after
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
        grid = self.model.grid
        cells = crop.crop.to_grid(xy, (grid, grid))
        off = kps.visible & ((cells < 0) | (cells > grid - 1)).any(1)
        if off.any():
            bad = ", ".join(f"'{kps.names[i]}' at ({xy[i, 0]:g}, {xy[i, 1]:g})" for i in np.flatnonzero(off)[:5])
            what = (f"{where}: {int(off.sum())} of {int(kps.visible.sum())} visible keypoint(s) outside the crop of "
                    f"box {crop.box.tolist()} (padded by 1.25): {bad}")
            if off.sum() == kps.visible.sum():
                raise DataError(f"{what}; give a box that holds the keypoints")
            warnings.warn(f"{what}; left out of this support (give a box that holds them)", DataWarning, 2)
        return img, crop, cells, kps.visible & ~off

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
            raise UsageError(f"adapt: {len(images)} support images, {len(keypoints)} keypoint sets and "
                             f"{len(boxes)} boxes; give one of each per support")
        sets, pixels, crops, cells, shown = [], [], [], [], []
        for n, (image, kp, box) in enumerate(zip(images, keypoints, boxes)):
            name = _image_name(image, f"support #{n}")
            kps = as_keypoint_set(kp, image)
            if sets and kps.names != sets[0].names:
                raise DataError(f"{kps.source}: its keypoints ({len(kps)}: {', '.join(kps.names[:6])}...) differ "
                                f"from those of {sets[0].source} ({len(sets[0])}); every support needs the same")
            if shared and any(s.source == kps.source for s in sets):
                raise DataError(f"{kps.source}: chosen for two supports; one keypoint file for several supports "
                                "must be a COCO file with one annotation on each support image")
            img, crop, cell, vis = self._support_crop(image, kps, box, name)
            sets.append(kps)
            pixels.append(img)
            crops.append(crop)
            cells.append(cell)
            shown.append(vis)
        dev = self.device
        batch = torch.stack([c.tensor for c in crops]).to(dev)
        cells_t = torch.from_numpy(np.stack(cells)).float().to(dev)
        # the matching network runs only for ESCAPE (or for the figure's matches)
        _, support = self.model.encode(batch, cells_t, torch.from_numpy(np.stack(shown)).to(dev), self.amp,
                                       self.backend, matcher=self.method == "escape")
        self._support = support[None]  # one support set of S shots
        self._adapted = self.model.adapt(self._support, self.method)
        self.prototypes = self._adapted.prototypes[0]
        self.supports = sets
        self.support_crops = crops
        self._support_pixels = pixels  # decoded again by reference_scores
        self.support_images = [_image_name(im, f"support #{n}") for n, im in enumerate(images)]
        self.known = self._adapted.known[0].cpu().numpy()  # keypoints visible in some support
        self._layout = SupportLayout.of_supports(sets, [c.box for c in crops])  # for the object search
        self._reference = None  # reference_scores, computed at the first search
        return self

    @property
    def layout(self) -> SupportLayout:
        """Where the keypoints sit in the supports' boxes (the object search's and the tracker's geometry)."""
        self._need_support()
        return self._layout

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
        support = self._support
        if method == "escape" and support.match_scores is None and "escape" in self.model.methods:
            images = torch.stack([c.tensor for c in self.support_crops]).to(self.device)
            _, scored = self.model.encode(images, support.cells[0], support.visible[0], self.amp, self.backend)
            self._support = support = scored[None]
        index, weight = self.model.assignments(method, support.pooled, support.visible, support.match_scores)
        return index[0].cpu().numpy(), weight[0].float().cpu().numpy()

    def _need_support(self):
        if self.prototypes is None:
            raise RuntimeError("call Predictor.adapt(support images, keypoints) before predicting")

    # ---------------------------------------------------------------- queries
    @torch.no_grad()
    def predict(self, images, boxes=None, raise_errors: bool = False, names=None,
                rotations=None, location_prior: bool = True) -> list[Prediction]:
        """Keypoints of each query image (paths or RGB arrays), in batches.

        ``boxes``: None or one [x, y, w, h] (or None) per image. A query
        without a box is searched (:meth:`search`). A query
        that cannot be read gets a Prediction with ``error`` set (or, with
        ``raise_errors``, raises its DataError); the others are unaffected.
        ``names``: what messages and results call each image (default: its
        path, or "query #n" for an array); ``rotations``: None or one angle
        per image (degrees, see :func:`make_crop`) for the crops of given boxes;
        ``location_prior=False`` decodes without the model's location prior
        (where the crop's orientation is itself an estimate, the prior would
        confirm it).
        """
        self._need_support()
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        boxes = [None] * len(images) if boxes is None else list(boxes)
        if len(boxes) != len(images):
            raise UsageError(f"predict: {len(images)} images but {len(boxes)} boxes")
        if names is not None and len(names) != len(images):
            raise UsageError(f"predict: {len(images)} images but {len(names)} names")
        results: list[Prediction] = []
        for start in range(0, len(images), self.batch_size):
            chunk, crops, pixels, searched = [], [], [], []
            for n in range(start, min(start + self.batch_size, len(images))):
                result = Prediction(names[n] if names is not None else _image_name(images[n], f"query #{n}"))
                try:
                    img = read_image(images[n], result.image)
                    turn = 0.0 if rotations is None or boxes[n] is None else rotations[n]
                    crop = make_crop(img, boxes[n], self.input_size, result.image, turn)
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
            boxed = [i for i, is_searched in enumerate(searched) if not is_searched]
            if boxed:
                self._decode([chunk[i] for i in boxed], [crops[i] for i in boxed], location_prior)
            unboxed = [i for i, is_searched in enumerate(searched) if is_searched]
            if unboxed:
                self._search([chunk[i] for i in unboxed], [pixels[i] for i in unboxed], [crops[i] for i in unboxed],
                             location_prior)
        return results

    @torch.no_grad()
    def search(self, images, names=None, location_prior: bool = True) -> list[Prediction]:
        """Keypoints of images that have no box: :meth:`predict` without boxes.

        The whole image is searched at each of ``search_scales`` (multiples
        of the model's input size; :func:`~escape_fast.predict.search.locate_object`),
        each box found is decoded, and the one whose keypoints score best
        against the supports' own scores (the median over keypoints of
        score / :meth:`reference_scores`) is kept. Then, up to
        ``search_refits`` times, the supports' layout is fitted to its
        confident keypoints (:func:`~escape_fast.predict.search.fit_layout`)
        and the box that fit implies is decoded, turned by the fitted angle
        with ``search_turn`` (the crop's up is then the object's, as in the
        supports); it replaces the result if it scores at least as well.
        """
        return self.predict(images, None, names=names, location_prior=location_prior)

    def _quality(self, p: Prediction) -> float:
        """Median over known keypoints of score / reference score (-inf for a failed decode)."""
        if not p.ok:
            return -math.inf
        rel = p.scores[self.known] / self._reference[self.known]
        rel = rel[np.isfinite(rel)]
        return float(np.median(rel)) if rel.size else -math.inf

    def _decode_boxes(self, preds: list[Prediction], pixels: list[np.ndarray], boxes, location_prior: bool,
                      rotations=None) -> list[Prediction]:
        """A fresh Prediction of each (image, box[, rotation]) (an error where the box cannot be cropped)."""
        out, ok, crops = [], [], []
        rotations = [0.0] * len(boxes) if rotations is None else rotations
        for p, img, box, turn in zip(preds, pixels, boxes, rotations):
            trial = Prediction(p.image)
            try:
                crops.append(make_crop(img, box, self.input_size, p.image, turn))
                ok.append(trial)
            except DataError as e:
                trial.error = str(e)
            out.append(trial)
        for start in range(0, len(ok), self.batch_size):
            self._decode(ok[start:start + self.batch_size], crops[start:start + self.batch_size], location_prior)
        return out

    def _search(self, preds: list[Prediction], pixels: list[np.ndarray], wholes: list[CropView],
                location_prior: bool) -> None:
        """Fill ``preds`` (queries without a box; ``wholes`` their whole-image crops): see :meth:`search`."""
        if self._reference is None:
            self._reference = self.reference_scores()
        queries, boxes = [], []
        for scale in self.search_scales:
            side = max(8, round(scale * self.input_size))
            views = wholes if side == self.input_size else [
                make_crop(img, None, side, p.image) for p, img in zip(preds, pixels)]
            for q, box in enumerate(self.locate_many(views)):
                # a box that another scale already found (nearly) decodes (nearly) the same
                if box is not None and all(box_iou(box, b) < SEARCH_SAME_BOX
                                           for n, b in zip(queries, boxes) if n == q):
                    queries.append(q)
                    boxes.append(box)
        tried = self._decode_boxes([preds[q] for q in queries], [pixels[q] for q in queries], boxes, location_prior)
        best: list[Prediction | None] = [None] * len(preds)
        for q, trial in zip(queries, tried):
            if trial.ok and (best[q] is None or self._quality(trial) > self._quality(best[q])):
                best[q] = trial
        # where no keypoint could vote, or every box found was too small to crop: the whole image
        rest = [q for q, b in enumerate(best) if b is None]
        if rest:
            self._decode([preds[q] for q in rest], [wholes[q] for q in rest], location_prior)
            for q in rest:
                best[q] = preds[q]
        turns = [0.0] * len(preds)
        for _ in range(self.search_refits):
            redo, new_boxes, new_turns = [], [], []
            for q, p in enumerate(best):
                rel = p.scores / self._reference
                fit = (fit_layout(self._layout.offsets, p.keypoints, self.known & (rel >= CONFIDENT))
                       or fit_layout(self._layout.offsets, p.keypoints, self.known))
                if fit is None:
                    continue
                center, size, angle = fit
                # turned with the object (the network is not rotation-invariant, animals turn), or upright
                box = layout_box(self._layout, center, size, 0.0 if self.search_turn else angle, REFIT_MARGIN)
                turn = float(np.degrees(angle)) if self.search_turn else 0.0
                side = max(p.box[2], p.box[3])
                moved = np.abs(box - p.box).max() > REFIT_SETTLED * side or abs(turn - turns[q]) > 1.0
                if moved:  # a box that stays put decodes the same
                    redo.append(q)
                    new_boxes.append(box)
                    new_turns.append(turn)
            if not redo:
                break
            again = self._decode_boxes([preds[q] for q in redo], [pixels[q] for q in redo], new_boxes, location_prior,
                                       new_turns)
            for q, trial, turn in zip(redo, again, new_turns):
                if self._quality(trial) >= self._quality(best[q]):
                    best[q], turns[q] = trial, turn
        for p, b in zip(preds, best):
            p.keypoints, p.scores, p.box = b.keypoints, b.scores, b.box

    @torch.no_grad()
    def reference_scores(self) -> np.ndarray:
        """[K]: each keypoint's score when the supports themselves are decoded
        (in their boxes), averaged over the supports that show it; NaN for
        keypoints no support shows. What a query's scores are compared with
        to tell a found object from a lost one (escape_fast.track)."""
        self._need_support()
        found = self.predict(self._support_pixels, [c.box for c in self.support_crops], raise_errors=True,
                             names=self.support_images)
        scores = np.stack([np.where(kps.visible, p.scores, np.nan) for p, kps in zip(found, self.supports)])
        with warnings.catch_warnings():  # a keypoint that no support shows has no reference
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(scores, 0)

    @torch.no_grad()
    def locate(self, view: CropView) -> np.ndarray | None:
        """The box [x, y, w, h] of the object in a whole-image crop, or None
        (escape_fast.predict.search.locate_object)."""
        return self.locate_many([view])[0]

    @torch.no_grad()
    def locate_many(self, views: list[CropView]) -> list[np.ndarray | None]:
        """:meth:`locate` of several crops, through the trunk ``batch_size``
        at a time (the tiles of a frame searched by escape_fast.track: 21
        tiles in 4.8 s batched against 9.6 s one by one, same boxes)."""
        boxes = []
        for start in range(0, len(views), self.batch_size):
            chunk = views[start:start + self.batch_size]
            feats, _ = self.model.encode(torch.stack([v.tensor for v in chunk]).to(self.device), amp=self.amp,
                                         backend=self.backend)
            smoothed, grid = self.model.smooth(feats), feats.shape[-1]
            for n, view in enumerate(chunk):
                boxes.append(locate_object(smoothed[n:n + 1], self.prototypes, self._layout, self.known, view.crop,
                                           view.crop.pixels_per_cell(grid)))
        return boxes

    def _decode(self, preds: list[Prediction], crops: list[CropView], location_prior: bool = True):
        """Decode the crops of ``preds`` (with the model's location prior, if it has one).

        A keypoint's score is the cosine similarity of its prototype and the
        query's pooled feature at the predicted point, in [-1, 1]: higher is
        a closer match, and it falls when the object is not there."""
        dev = self.device
        feats, _ = self.model.encode(torch.stack([c.tensor for c in crops]).to(dev), amp=self.amp,
                                     backend=self.backend)
        b, grid = feats.shape[0], feats.shape[-1]
        adapted = self._adapted.map(lambda t: t.expand(b, *t.shape[1:]).contiguous())  # one set per query
        if not location_prior:
            adapted = dataclasses.replace(adapted, positions=None)
        # decoded as the evaluation decodes, so both agree
        xy, _ = self.model.predict(self.model.smooth(feats), adapted, CropBatch.of_crops([c.crop for c in crops], dev),
                                   self.backend)
        protos = adapted.prototypes
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

