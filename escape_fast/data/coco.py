"""COCO-style keypoint annotations in MP-100's layout: reading and checking.

A dataset is one annotation file (``annotations/<name>.json``) plus an image
root (``images/`` beside ``annotations/`` by default), each image's
``file_name`` being relative to the image root, e.g.
``images/human_body/000000000785.jpg``. MP-100 ships 15 such files,
``mp100_split{1..5}_{train,val,test}.json`` (see :func:`mp100_split_files`);
the fixture and any user dataset use the same format under other names.

Fields read (docs/method.md, "Data and crops")
----------------------------
* ``images[i]``: ``id``, ``file_name``, ``width``, ``height`` (required).
* ``categories[i]``: ``id``, ``name``, ``keypoints`` (names; their number
  K_cat fixes the length of every annotation of the category) required;
  ``skeleton`` (index pairs, 1-based as in COCO or 0-based: see
  ``Category.limbs``) and ``flip_pairs`` (0-based
  index pairs of left/right keypoints, an escape_fast extension; flips are
  only used for categories that declare them) optional.
* ``annotations[j]``: ``id``, ``image_id``, ``category_id``, ``bbox``
  ``[x, y, w, h]``, ``keypoints`` flat ``[x, y, v] * K_cat`` required;
  ``num_keypoints`` and ``area`` optional. A keypoint is visible when v > 0
  (v = 1 "labelled but occluded" counts as visible, as in MP-100's metric);
  invisible keypoints get coordinates (0, 0).

Bad input policy
----------------
Errors (:class:`DataError`, a ``ValueError``) name the file and the image,
annotation or category id (or its position in the list when the id itself is
missing):

* malformed JSON, a missing top-level list, a missing or mistyped field;
* a keypoint array whose length is not 3 * K_cat, non-finite numbers,
  visibility flags other than 0, 1, 2; flip pairs out of range;
* duplicate image, annotation or category ids; an annotation pointing at an
  unknown image or category;
* a missing image file (``on_missing_image="raise"``, the default; with
  ``"skip"`` its annotations are skipped and counted);
* at decode time (:func:`load_image`): an unreadable or corrupt image, or one
  whose decoded size (after EXIF orientation) differs from the JSON's
  ``width`` / ``height`` (the annotations would not match its pixels).

Skipped with one :class:`DataWarning` per file that counts them by reason
(``CocoKeypoints.skipped`` keeps the counts):

* box cleaning (docs/method.md, "Data and crops"; mmpose's pixel convention): the box is
  clipped to the image as ``x1 = max(x, 0)``, ``x2 = min(x + w - 1,
  width - 1)`` (same for y) and kept as ``[x1, y1, x2 - x1, y2 - y1]``;
  boxes left with no area (zero or negative size, entirely outside the
  image, or ``area <= 0`` in the JSON) are dropped. For a box whose top-left
  corner lies inside the image this is exactly mmpose's ``clean_bbox``;
  mmpose keeps the width of a box that starts left of the image instead of
  clipping it, which keeps boxes lying wholly outside the image.
* annotations without any visible keypoint (``num_keypoints == 0``, every
  value zero, or every v == 0).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from escape_fast.errors import DataError, DataWarning

__all__ = [
    "MP100_SPLITS",
    "Category",
    "CocoKeypoints",
    "DataError",
    "DataWarning",
    "ImageInfo",
    "Instance",
    "drop_unreadable_images",
    "load_coco",
    "load_for_run",
    "load_image",
    "mp100_split_files",
]

MP100_SPLITS = (1, 2, 3, 4, 5)
_MODES = ("train", "val", "test")


@dataclass(frozen=True)
class Category:
    """One keypoint category: ``keypoints`` are the K_cat keypoint names."""

    id: int
    name: str
    keypoints: tuple[str, ...]
    skeleton: tuple[tuple[int, int], ...] = ()
    flip_pairs: tuple[tuple[int, int], ...] = ()
    supercategory: str = ""

    @property
    def num_keypoints(self) -> int:
        return len(self.keypoints)

    def limbs(self) -> tuple[tuple[int, int], ...]:
        """The skeleton as 0-based index pairs (for drawing).

        COCO's skeleton is 1-based, but some files (the MP-100 fixture among
        them) write 0-based limbs: a skeleton that uses index 0 is read as
        0-based, any other as 1-based."""
        flat = [v for limb in self.skeleton for v in limb]
        shift = 1 if flat and min(flat) >= 1 else 0
        return tuple((a - shift, b - shift) for a, b in self.skeleton)

    def flip_permutation(self) -> np.ndarray | None:
        """Index map that swaps each flip pair, or None without flip pairs."""
        if not self.flip_pairs:
            return None
        perm = np.arange(self.num_keypoints)
        for i, j in self.flip_pairs:
            perm[i], perm[j] = j, i
        return perm


@dataclass(frozen=True)
class ImageInfo:
    id: int
    file_name: str
    width: int
    height: int
    path: str  # absolute path: image root / file_name


@dataclass(frozen=True)
class Instance:
    """One cleaned annotation (one object in one image).

    ``bbox`` is the cleaned box [x, y, w, h] in original image pixels,
    ``keypoints`` [K_cat, 2] float64 image coordinates ((0, 0) where
    invisible), ``visible`` [K_cat] bool (v > 0), ``flags`` [K_cat] the raw v.
    """

    ann_id: int
    image_id: int
    category_id: int
    bbox: np.ndarray
    keypoints: np.ndarray
    visible: np.ndarray
    flags: np.ndarray
    image: ImageInfo = field(repr=False)

    @property
    def bbox_size(self) -> float:
        """max(w, h) of the cleaned box: PCK's normalizer (docs/method.md, "Evaluation")."""
        return float(max(self.bbox[2], self.bbox[3]))


@dataclass
class CocoKeypoints:
    """A loaded annotation file.

    ``instances`` are sorted by annotation id; ``categories`` maps id ->
    :class:`Category` in id order; ``images`` maps id -> :class:`ImageInfo`;
    ``skipped`` counts skipped annotations by reason.
    """

    path: str
    image_root: str
    categories: dict[int, Category]
    images: dict[int, ImageInfo]
    instances: list[Instance]
    skipped: Counter

    def __len__(self) -> int:
        return len(self.instances)

    @property
    def category_ids(self) -> list[int]:
        return sorted(self.categories)

    @property
    def max_keypoints(self) -> int:
        """K of the largest category: the padding size of a batch."""
        return max((c.num_keypoints for c in self.categories.values()), default=0)

    def instances_of(self, category_id: int) -> list[int]:
        """Indices into ``instances`` of one category, in annotation id order."""
        if category_id not in self.categories:
            raise KeyError(f"{self.path}: no category with id {category_id}")
        return self._by_category().get(category_id, [])

    def _by_category(self) -> dict[int, list[int]]:
        cache = self.__dict__.get("_by_cat")
        if cache is None:
            cache = {}
            for i, inst in enumerate(self.instances):
                cache.setdefault(inst.category_id, []).append(i)
            self.__dict__["_by_cat"] = cache
        return cache


# --------------------------------------------------------------------------
# MP-100 split files
# --------------------------------------------------------------------------
def mp100_split_files(root: str | os.PathLike, split: int, need=_MODES) -> dict[str, Path]:
    """Paths of MP-100 split ``split`` (1..5): {"train", "val", "test"} ->
    ``root/annotations/mp100_split{split}_{mode}.json``.

    Raises :class:`DataError` naming every missing file among those in
    ``need`` (the modes the caller reads: evaluation needs only "test").
    """
    if split not in MP100_SPLITS:
        raise DataError(f"MP-100 has splits 1..5, got {split!r}")
    root = Path(root)
    files = {mode: root / "annotations" / f"mp100_split{split}_{mode}.json" for mode in _MODES}
    missing = [str(files[m]) for m in need if not files[m].is_file()]
    if missing:
        raise DataError(f"MP-100 split {split}: missing annotation file(s): {', '.join(missing)}")
    return files


def default_image_root(ann_file: str | os.PathLike) -> Path:
    """``images/`` beside the ``annotations/`` folder holding ``ann_file``."""
    return Path(ann_file).resolve().parent.parent / "images"


# --------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------
def _where(kind: str, item, index: int) -> str:
    if isinstance(item, dict) and "id" in item:
        return f"{kind} id {item['id']!r}"
    return f"{kind} #{index} (no id)"


def _field(path, kind, item, index, name, types, required=True):
    if not isinstance(item, dict):
        raise DataError(f"{path}: {kind} #{index} is a {type(item).__name__}, not an object")
    if name not in item:
        if required:
            raise DataError(f"{path}: {_where(kind, item, index)} has no '{name}' field")
        return None
    value = item[name]
    if isinstance(value, bool) or not isinstance(value, types):
        raise DataError(
            f"{path}: {_where(kind, item, index)}: field '{name}' has type {type(value).__name__}, "
            f"expected {' or '.join(t.__name__ for t in types)}"
        )
    return value


def _int_id(path, kind, item, index, name="id") -> int:
    value = _field(path, kind, item, index, name, (int, float))
    if not float(value).is_integer():
        raise DataError(f"{path}: {_where(kind, item, index)}: '{name}' {value!r} is not an integer")
    return int(value)


def _numbers(path, kind, item, index, name, length=None) -> np.ndarray:
    value = _field(path, kind, item, index, name, (list, tuple))
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: {_where(kind, item, index)}: '{name}' holds non-numbers") from None
    if arr.ndim != 1 or (length is not None and arr.size != length):
        raise DataError(
            f"{path}: {_where(kind, item, index)}: '{name}' has {arr.size} values, expected {length}"
        )
    if not np.isfinite(arr).all():
        raise DataError(f"{path}: {_where(kind, item, index)}: '{name}' holds NaN or infinity")
    return arr


def read_json(path, what: str = "annotation file"):
    """The parsed JSON of ``path``; a missing file or malformed JSON is a
    DataError naming the file (``what`` says which kind of file it is)."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed JSON: {e}") from None


def _read_coco_json(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level is a {type(data).__name__}, expected an object")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(f"{path}: no '{key}' list at the top level")
        if not isinstance(data[key], list):
            raise DataError(f"{path}: '{key}' is a {type(data[key]).__name__}, expected a list")
    return data


def _new_id(path, kind, item, index, taken) -> int:
    """The integer id of ``item``, which no earlier item of its kind may have."""
    ident = _int_id(path, kind, item, index)
    if ident in taken:
        raise DataError(f"{path}: duplicate {kind} id {ident}")
    return ident


def _parse_categories(path, raw) -> dict[int, Category]:
    cats: dict[int, Category] = {}
    for i, c in enumerate(raw):
        cid = _new_id(path, "category", c, i, cats)
        name = _field(path, "category", c, i, "name", (str,))
        names = _field(path, "category", c, i, "keypoints", (list, tuple))
        if len(names) == 0:
            raise DataError(f"{path}: category id {cid} ('{name}') declares no keypoints")
        k = len(names)
        skeleton = _field(path, "category", c, i, "skeleton", (list, tuple), required=False) or []
        flips = _field(path, "category", c, i, "flip_pairs", (list, tuple), required=False) or []
        pairs = []
        seen = set()
        for p in flips:
            if (
                not isinstance(p, (list, tuple))
                or len(p) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in p)
                or not all(0 <= v < k for v in p)
                or p[0] == p[1]
                or p[0] in seen
                or p[1] in seen
            ):
                raise DataError(
                    f"{path}: category id {cid} ('{name}'): flip pair {p!r} is not two distinct unused "
                    f"0-based keypoint indices below {k}"
                )
            seen.update(p)
            pairs.append((int(p[0]), int(p[1])))
        try:
            skel = tuple((int(a), int(b)) for a, b in skeleton)
        except (TypeError, ValueError):
            raise DataError(f"{path}: category id {cid} ('{name}'): malformed skeleton") from None
        cats[cid] = Category(
            id=cid,
            name=name,
            keypoints=tuple(str(n) for n in names),
            skeleton=skel,
            flip_pairs=tuple(pairs),
            supercategory=str(c.get("supercategory", "")),
        )
    return dict(sorted(cats.items()))


def _parse_images(path, raw, image_root: Path) -> dict[int, ImageInfo]:
    images: dict[int, ImageInfo] = {}
    for i, im in enumerate(raw):
        iid = _new_id(path, "image", im, i, images)
        name = _field(path, "image", im, i, "file_name", (str,))
        width = _int_id(path, "image", im, i, "width")
        height = _int_id(path, "image", im, i, "height")
        if width <= 0 or height <= 0:
            raise DataError(f"{path}: image id {iid} ('{name}'): size {width} x {height} is not positive")
        images[iid] = ImageInfo(iid, name, width, height, str(image_root / name))
    return images


def clean_bbox(bbox: np.ndarray, width: int, height: int) -> np.ndarray | None:
    """Box cleaning (see the module docstring); None: no area."""
    x, y, w, h = (float(v) for v in bbox)
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2 = min(x + w - 1.0, width - 1.0)
    y2 = min(y + h - 1.0, height - 1.0)
    if w <= 0 or h <= 0 or not (x2 > x1 and y2 > y1):
        return None
    return np.array([x1, y1, x2 - x1, y2 - y1], dtype=np.float64)


def load_coco(
    ann_file: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    on_missing_image: str = "raise",
    check_images: bool = True,
) -> CocoKeypoints:
    """Read and check one COCO-style keypoint annotation file.

    Args:
        ann_file: the JSON file (e.g. ``.../annotations/mp100_split1_test.json``).
        image_root: folder that ``file_name`` is relative to; default
            ``images/`` beside the ``annotations/`` folder.
        on_missing_image: ``"raise"`` (default) or ``"skip"`` (skip that
            image's annotations with a counted warning).
        check_images: check that every annotated image file exists (a stat
            per image, no decoding).

    Returns a :class:`CocoKeypoints`. See the module docstring for what
    raises and what is skipped.
    """
    if on_missing_image not in ("raise", "skip"):
        raise ValueError(f"on_missing_image must be 'raise' or 'skip', got {on_missing_image!r}")
    path = Path(ann_file)
    root = Path(image_root) if image_root is not None else default_image_root(path)
    data = _read_coco_json(path)
    categories = _parse_categories(path, data["categories"])
    images = _parse_images(path, data["images"], root)

    skipped: Counter = Counter()
    examples: dict[str, list[int]] = {}

    def skip(reason: str, ann_id: int):
        skipped[reason] += 1
        examples.setdefault(reason, []).append(ann_id)

    missing_checked: dict[int, bool] = {}
    instances: list[Instance] = []
    ann_ids: set[int] = set()
    for i, a in enumerate(data["annotations"]):
        aid = _new_id(path, "annotation", a, i, ann_ids)
        ann_ids.add(aid)
        iid = _int_id(path, "annotation", a, i, "image_id")
        cid = _int_id(path, "annotation", a, i, "category_id")
        if iid not in images:
            raise DataError(f"{path}: annotation id {aid} refers to unknown image id {iid}")
        if cid not in categories:
            raise DataError(f"{path}: annotation id {aid} refers to unknown category id {cid}")
        cat = categories[cid]
        bbox = _numbers(path, "annotation", a, i, "bbox", 4)
        kps = _numbers(path, "annotation", a, i, "keypoints")
        if kps.size != 3 * cat.num_keypoints:
            raise DataError(
                f"{path}: annotation id {aid}: 'keypoints' has {kps.size} values, expected "
                f"3 x {cat.num_keypoints} for category id {cid} ('{cat.name}')"
            )
        kps = kps.reshape(-1, 3)
        flags = kps[:, 2]
        if not np.isin(flags, (0.0, 1.0, 2.0)).all():
            bad = sorted(set(flags[~np.isin(flags, (0.0, 1.0, 2.0))].tolist()))
            raise DataError(f"{path}: annotation id {aid}: visibility flags {bad} (expected 0, 1 or 2)")
        num = _field(path, "annotation", a, i, "num_keypoints", (int, float), required=False)
        area = _field(path, "annotation", a, i, "area", (int, float), required=False)

        image = images[iid]
        if check_images:
            if iid not in missing_checked:
                missing_checked[iid] = os.path.isfile(image.path)
            if not missing_checked[iid]:
                if on_missing_image == "raise":
                    raise DataError(
                        f"{path}: image id {iid} (annotation id {aid}): image file not found: {image.path}"
                    )
                skip("missing image file", aid)
                continue
        box = clean_bbox(bbox, image.width, image.height)
        if box is None or (area is not None and area <= 0):
            skip("box with no area inside the image", aid)
            continue
        visible = flags > 0
        if (num is not None and num == 0) or not kps.any() or not visible.any():
            skip("no visible keypoint", aid)
            continue
        xy = np.where(visible[:, None], kps[:, :2], 0.0)
        instances.append(
            Instance(aid, iid, cid, box, xy, visible, flags.astype(np.int8), image)
        )

    instances.sort(key=lambda inst: inst.ann_id)
    if skipped:
        detail = "; ".join(
            f"{n} {reason} (annotation ids {', '.join(map(str, examples[reason][:5]))}"
            f"{', ...' if n > 5 else ''})"
            for reason, n in skipped.items()
        )
        warnings.warn(f"{path}: skipped {sum(skipped.values())} annotation(s): {detail}", DataWarning, 2)
    return CocoKeypoints(str(path), str(root), categories, images, instances, skipped)


# --------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------
def load_image(path: str, image_id: int | None = None, expected_size: tuple[int, int] | None = None):
    """Decode an image to RGB uint8 [H, W, 3] with its EXIF orientation applied.

    JPEG, PNG (and whatever else PIL reads); grayscale, palette, RGBA (alpha
    dropped) and CMYK become RGB. ``expected_size`` (width, height) is checked
    against the oriented image. Raises :class:`DataError` naming the file and
    ``image_id`` when the file is missing, unreadable, corrupt or of another
    size.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    where = f"image id {image_id} ({path})" if image_id is not None else str(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            rgb = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{where}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: cannot decode image: {e}") from None
    if expected_size is not None:
        w, h = expected_size
        if rgb.shape[1] != w or rgb.shape[0] != h:
            raise DataError(
                f"{where}: decoded size {rgb.shape[1]} x {rgb.shape[0]} (after EXIF orientation) differs "
                f"from the annotation's {w} x {h}"
            )
    return rgb



class _ImageCheck:
    """Map-style dataset: the DataError message of image ``i`` of a list, or ''."""

    def __init__(self, images: list[ImageInfo]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> str:
        info = self.images[i]
        try:
            load_image(info.path, info.id, (info.width, info.height))
        except DataError as exc:
            return str(exc)
        return ""


def drop_unreadable_images(coco: CocoKeypoints, workers: int = 0, progress=None) -> tuple[CocoKeypoints, list[str]]:
    """``coco`` without the instances whose image cannot be decoded, and the
    error message of each dropped image.

    Every image is decoded once (in ``workers`` processes), so this is the
    explicit "skip" choice of the command-line tools (``--bad-images
    skip``); by default a bad image stops a run with its DataError.
    """
    from torch.utils.data import DataLoader

    images = [coco.images[i] for i in sorted({inst.image_id for inst in coco.instances})]
    loader = DataLoader(_ImageCheck(images), batch_size=16, num_workers=workers, collate_fn=list)
    bar = progress(total=len(images), desc="checking images", unit="image") if progress else None
    messages, bad = [], set()
    for chunk_start, chunk in zip(range(0, len(images), 16), loader):
        for info, msg in zip(images[chunk_start:], chunk):
            if msg:
                messages.append(msg)
                bad.add(info.id)
        if bar:
            bar.update(len(chunk))
    if bar:
        bar.close()
    if not bad:
        return coco, []
    kept = [inst for inst in coco.instances if inst.image_id not in bad]
    skipped = coco.skipped + Counter({"unreadable image": len(coco.instances) - len(kept)})
    return dataclasses.replace(coco, images={k: v for k, v in coco.images.items() if k not in bad},
                               instances=kept, skipped=skipped), messages


def load_for_run(ann_file, bad_images: str = "raise", workers: int = 0, progress=None,
                 check_images: bool = True) -> CocoKeypoints:
    """:func:`load_coco` with the command-line tools' ``--bad-images`` policy:
    "raise" (default: the first missing or undecodable image stops the run
    with its DataError, when it is read) or "skip" (such images are found
    up front, decoding each once, and their instances left out with a
    DataWarning that counts them)."""
    if bad_images not in ("raise", "skip"):
        raise ValueError(f"bad_images must be 'raise' or 'skip', got {bad_images!r}")
    if bad_images == "raise":
        return load_coco(ann_file, check_images=check_images)
    coco = load_coco(ann_file, on_missing_image="skip")
    kept, messages = drop_unreadable_images(coco, workers, progress)
    if messages:
        dropped = len(coco.instances) - len(kept.instances)
        warnings.warn(f"{coco.path}: skipped {dropped} instance(s) on {len(messages)} unreadable image(s) "
                      f"(--bad-images skip); first: {messages[0]}", DataWarning, 2)
    return kept
