"""Top-down keypoint dataset, the balanced training sampler and the loader.

One item is one annotated instance: its image decoded (once, then kept in a
small per-process cache so that instances of the same image that come
together in a batch share one decode), cropped by one cv2.warpAffine to the
input size, normalized, with Gaussian targets on the heatmap grid. Shapes
are padded to ``num_keypoints`` (default: the largest category in play).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import threading
from collections import OrderedDict

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from escape_fast.data.coco import CocoKeypoints, load_image
from escape_fast.data.transforms import Crop, cell_targets, gaussian_targets, heatmap_grid, normalize_image
from escape_fast.errors import DataError

__all__ = ["BalancedCategorySampler", "KeypointDataset", "KeypointLoader", "ShuffleSampler", "make_loader"]

AUGMENT_DISTRIBUTIONS = ("uniform", "normal")
TARGETS = ("exact", "cell")
ROTATED_CROPS = ("float32", "float64")


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    w, h = size
    return int(w), int(h)


class KeypointDataset(Dataset):
    """Top-down crops of the instances of a :class:`CocoKeypoints`.

    Args:
        coco: the loaded annotations.
        input_size: crop size, an int or (width, height); 256 by default.
        heatmap_size: target grid (width, height); default input_size / 4.
        sigma: Gaussian sigma in heatmap cells (2).
        train: training augmentation: scale x U(1 - scale_factor,
            1 + scale_factor), rotation U(-rotation_factor, rotation_factor)
            degrees and, when ``flip`` and the category declares flip pairs,
            a horizontal flip with probability 1/2 (pairs swapped).
        rotation_prob: the probability that a training crop is rotated (1:
            always; else its rotation is 0).
        distribution: "uniform" (above) or "normal", mmpose 0.29's
            TopDownGetRandomScaleRotation (the authors'): scale x
            clip(1 + scale_factor N(0, 1), 1 - scale_factor, 1 + scale_factor),
            kept in float32 as mmpose keeps it, and rotation
            clip(rotation_factor N(0, 1), -2 rotation_factor, 2 rotation_factor)
            with probability ``rotation_prob``.
        targets: "exact" (Gaussians on the keypoints' positions,
            :func:`gaussian_targets`) or "cell" (the authors', mmpose 0.29's:
            on the rounded cells, from float32 keypoints, :func:`cell_targets`).
        rotated_crops: "float32" (escape_fast's) or "float64" (the authors'
            arithmetic of a rotated crop's matrix, theirs to the bit;
            transforms.crop_matrix). Unrotated crops are the same in both.
        num_keypoints: padded K (default: the largest category in ``coco``).
            Pass the same value (e.g. 68) to datasets that are batched
            together.
        normalize: ImageNet-normalized float32 images (default) or raw uint8
            [3, H, W] to normalize on the GPU (transforms.normalize_batch).
        seed: augmentation seed. The draw of item ``i`` comes from
            ``default_rng([seed, epoch, i])`` (``set_epoch``), or from the
            ``(i, draw)`` pair a sampler such as BalancedCategorySampler
            yields: ``default_rng([seed, epoch, draw])``, so augmentations do
            not depend on the number of workers.
        cache_size: decoded images kept per process.

    An item is a dict of tensors:
        image [3, H, W], target [K, h, w], target_weight [K] (0 for padding,
        invisible keypoints and keypoints whose Gaussian misses the grid),
        keypoints [K, 2] (heatmap cells, the input of keypoint pooling),
        keypoints_image [K, 2] float64 (original pixels, unflipped order),
        visible [K] bool (in the crop's keypoint order), keypoint_mask [K]
        bool (slot exists for the category), center [2], scale [2],
        rotation [] (float64), flip [] bool, bbox [4] float64 (cleaned box),
        bbox_size [] (max(w, h)), category_id, category_index (position in
        id order), ann_id, image_id, index.
    An instance whose image cannot be read gives ``{"error": message,
    "index": index}`` instead of raising: an exception raised in a loader
    worker reaches the main process as a multi-line traceback, while
    :class:`KeypointLoader` raises this one-line DataError there.
    Predictions on an unflipped crop map back with
    escape_fast.reference.heatmap_to_image(points, center, scale,
    (w, h), rotation) or Crop.to_image.
    """

    def __init__(
        self,
        coco: CocoKeypoints,
        input_size=256,
        heatmap_size=None,
        sigma: float = 2.0,
        train: bool = False,
        scale_factor: float = 0.15,
        rotation_factor: float = 15.0,
        flip: bool = True,
        rotation_prob: float = 1.0,
        distribution: str = "uniform",
        targets: str = "exact",
        rotated_crops: str = "float32",
        num_keypoints: int | None = None,
        normalize: bool = True,
        padding: float = 1.25,
        seed: int = 0,
        cache_size: int = 8,
    ):
        self.coco = coco
        self.input_size = _pair(input_size)
        if heatmap_size is None:
            heatmap_size = heatmap_grid(self.input_size)
        self.heatmap_size = _pair(heatmap_size)
        self.sigma = float(sigma)
        self.train = bool(train)
        self.scale_factor = float(scale_factor)
        self.rotation_factor = float(rotation_factor)
        self.flip = bool(flip)
        self.rotation_prob = float(rotation_prob)
        if distribution not in AUGMENT_DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {', '.join(AUGMENT_DISTRIBUTIONS)}, got {distribution!r}")
        if targets not in TARGETS:
            raise ValueError(f"targets must be one of {', '.join(TARGETS)}, got {targets!r}")
        if rotated_crops not in ROTATED_CROPS:
            raise ValueError(f"rotated_crops must be one of {', '.join(ROTATED_CROPS)}, got {rotated_crops!r}")
        self.distribution, self.targets, self.rotated_crops = distribution, targets, rotated_crops
        k_max = coco.max_keypoints
        self.num_keypoints = k_max if num_keypoints is None else int(num_keypoints)
        if self.num_keypoints < k_max:
            raise ValueError(
                f"num_keypoints={self.num_keypoints} is below the largest category of {coco.path} ({k_max})"
            )
        self.normalize = bool(normalize)
        self.padding = float(padding)
        self.seed = int(seed)
        self.epoch = 0
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cat_index = {cid: i for i, cid in enumerate(coco.category_ids)}
        self._flip_perm = {cid: c.flip_permutation() for cid, c in coco.categories.items()}

    def __len__(self) -> int:
        return len(self.coco.instances)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draws (workers that are not persistent see it)."""
        self.epoch = int(epoch)

    # ------------------------------------------------------------------
    def image(self, image_id: int) -> np.ndarray:
        """Decoded RGB image, from the per-process cache when recent."""
        img = self._cache.get(image_id)
        if img is not None:
            self._cache.move_to_end(image_id)
            return img
        info = self.coco.images[image_id]
        img = load_image(info.path, image_id, (info.width, info.height))
        if self.cache_size > 0:
            self._cache[image_id] = img
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return img

    def crop(self, index: int, draw: int | None = None, epoch: int | None = None) -> Crop:
        """The crop of item ``index`` (with this epoch's augmentation when training)."""
        inst = self.coco.instances[index]
        crop = Crop.of_box(inst.bbox, self.input_size, self.padding)
        if self.rotated_crops == "float64":
            crop = dataclasses.replace(crop, float64=True)
        if not self.train:
            return crop
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch, index if draw is None else draw])
        sf, rf = self.scale_factor, self.rotation_factor
        if self.distribution == "normal":  # mmpose 0.29's TopDownGetRandomScaleRotation
            n_s, n_r = rng.standard_normal(2)
            u, f = rng.random(2)
            factor = np.clip(n_s * sf + 1, 1 - sf, 1 + sf)
            # their scale is a float32 array times a float64 scalar, float32 under numpy 1's casting
            scale = (crop.scale.astype(np.float32) * np.float32(factor)).astype(np.float64)
            rotation = float(np.clip(n_r * rf, -rf * 2, rf * 2)) if u <= self.rotation_prob else 0.0
        else:
            s, r, f = rng.random(3)
            scale = crop.scale * (1.0 + sf * (2.0 * s - 1.0))
            rotation = float(rf * (2.0 * r - 1.0))
            if self.rotation_prob < 1.0 and rng.random() > self.rotation_prob:
                rotation = 0.0
        return dataclasses.replace(
            crop, scale=scale, rotation=rotation,
            flip=bool(self.flip and self._flip_perm[inst.category_id] is not None and f < 0.5))

    def __getitem__(self, item):
        if isinstance(item, (tuple, list)):
            index, draw = int(item[0]), int(item[1])
            epoch = int(item[2]) if len(item) > 2 else None
        else:
            index, draw, epoch = int(item), None, None
        inst = self.coco.instances[index]
        crop = self.crop(index, draw, epoch)
        try:
            img = self.image(inst.image_id)
        except DataError as exc:
            return {"error": f"{exc} (annotation id {inst.ann_id})", "index": index}
        pixels = crop.warp(img, self.input_size)
        if self.normalize:
            image = normalize_image(pixels)
        else:
            image = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

        k = self.num_keypoints
        kc = inst.keypoints.shape[0]
        kp_img = inst.keypoints
        visible = inst.visible
        # heatmap cells are input pixels times heatmap/input size (without a
        # flip this is the crop map at the heatmap size; with one, the mirror
        # x -> W_in - 1 - x of the input pixels carries over exactly)
        ratio = np.array(self.heatmap_size, dtype=np.float64) / np.array(self.input_size, dtype=np.float64)
        kp_hm = crop.to_grid(kp_img, self.input_size) * ratio
        if crop.flip:
            perm = self._flip_perm[inst.category_id]
            kp_hm, visible = kp_hm[perm], visible[perm]
        kp = np.zeros((k, 2), dtype=np.float32)
        vis = np.zeros(k, dtype=bool)
        kp[:kc] = np.where(visible[:, None], kp_hm, 0.0)
        vis[:kc] = visible
        # Gaussians of the category's own keypoints only; padding stays zero
        target = torch.zeros(k, self.heatmap_size[1], self.heatmap_size[0], dtype=torch.float32)
        weight = torch.zeros(k, dtype=torch.float32)
        if self.targets == "cell":
            target[:kc], weight[:kc] = self._cell_targets(inst, crop, visible)
        else:
            target[:kc], weight[:kc] = gaussian_targets(kp[:kc], vis[:kc], self.heatmap_size, self.sigma)
        kp_image = np.zeros((k, 2), dtype=np.float64)
        kp_image[:kc] = kp_img
        mask = np.zeros(k, dtype=bool)
        mask[:kc] = True
        return {
            "image": image,
            "target": target,
            "target_weight": weight,
            "keypoints": torch.from_numpy(kp),
            "keypoints_image": torch.from_numpy(kp_image),
            "visible": torch.from_numpy(vis),
            "keypoint_mask": torch.from_numpy(mask),
            "center": torch.from_numpy(crop.center),
            "scale": torch.from_numpy(np.asarray(crop.scale, dtype=np.float64)),
            "rotation": torch.tensor(crop.rotation, dtype=torch.float64),
            "flip": torch.tensor(crop.flip),
            "bbox": torch.from_numpy(inst.bbox.copy()),
            "bbox_size": torch.tensor(inst.bbox_size, dtype=torch.float64),
            "category_id": inst.category_id,
            "category_index": self._cat_index[inst.category_id],
            "ann_id": inst.ann_id,
            "image_id": inst.image_id,
            "index": index,
        }

    def _cell_targets(self, inst, crop: Crop, visible: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The authors' targets of an instance (``targets="cell"``), in the crop's keypoint order:
        their keypoints are float32, mapped to the input crop one by one by the crop's float64
        matrix (their affine_transform) and stored as float32 again, then divided by the stride."""
        matrix = np.array(crop.matrix(self.input_size))
        points = inst.keypoints.astype(np.float32)
        mapped = np.zeros(points.shape, dtype=np.float32)
        for i, (x, y) in enumerate(points):
            if inst.visible[i]:  # their TopDownAffine maps the visible keypoints only
                mapped[i] = matrix @ np.array([x, y, 1.0])
        if crop.flip:
            mapped = mapped[self._flip_perm[inst.category_id]]
        stride = np.array(self.input_size, dtype=np.float64) / np.array(self.heatmap_size, dtype=np.float64)
        return cell_targets(mapped / stride, visible, self.heatmap_size, self.sigma)


class BalancedCategorySampler(Sampler):
    """Training sampler that balances base categories.

    Each epoch takes ``per_category`` instances of every category (default:
    the mean number of instances per category), cycling through a fresh
    shuffle of the category's images so that no instance repeats before all
    have been seen. Instances of one image stay next to each other (one
    decode), and the image groups of all categories are shuffled together.
    Yields ``(index, draw, epoch)`` tuples for :class:`KeypointDataset`:
    ``draw`` is the position in the epoch, so augmentations follow from
    (seed, epoch, draw) whatever the number of workers. Call
    ``set_epoch(e)`` before each epoch (as with DistributedSampler).
    ``rank`` / ``world_size`` take every world_size-th item of the epoch.
    """

    def __init__(
        self,
        coco: CocoKeypoints,
        per_category: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.coco = coco
        cats = coco._by_category()
        self.categories = sorted(c for c in cats if cats[c])
        if not self.categories:
            raise DataError(f"{coco.path}: no instances to sample")
        if per_category is None:
            per_category = max(1, round(len(coco) / len(self.categories)))
        self.per_category = int(per_category)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.epoch = 0
        # category -> list of image groups (instance indices), image id order
        self._groups: dict[int, list[list[int]]] = {}
        for c in self.categories:
            by_image: dict[int, list[int]] = {}
            for i in cats[c]:
                by_image.setdefault(coco.instances[i].image_id, []).append(i)
            self._groups[c] = [by_image[k] for k in sorted(by_image)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_indices(self) -> list[int]:
        """The instance indices of the whole epoch (all ranks), in order."""
        chunks: list[list[int]] = []
        for c in self.categories:
            groups = self._groups[c]
            rng = np.random.default_rng([self.seed, self.epoch, c])
            taken = 0
            while taken < self.per_category:
                order = rng.permutation(len(groups))
                for g in order:
                    group = groups[g][: self.per_category - taken]
                    chunks.append(group)
                    taken += len(group)
                    if taken >= self.per_category:
                        break
        rng = np.random.default_rng([self.seed, self.epoch, 2**32 - 1])
        order = rng.permutation(len(chunks))
        return [i for o in order for i in chunks[o]]

    def __iter__(self):
        indices = self.epoch_indices()
        for draw in range(self.rank, len(indices), self.world_size):
            yield (indices[draw], draw, self.epoch)

    def __len__(self) -> int:
        total = self.per_category * len(self.categories)
        return math.ceil((total - self.rank) / self.world_size)


class ShuffleSampler(Sampler):
    """Training sampler that takes every instance once per epoch, in a seeded random order.

    The authors' sampling (mmpose's shuffled DataLoader over all training
    instances); categories are as frequent as their instances. Yields
    ``(index, draw, epoch)`` like :class:`BalancedCategorySampler`, whose
    interface it shares (``set_epoch``, ``rank`` / ``world_size``).
    """

    def __init__(self, coco: CocoKeypoints, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.coco = coco
        if len(coco.instances) == 0:
            raise DataError(f"{coco.path}: no instances to sample")
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_indices(self) -> list[int]:
        """The instance indices of the whole epoch (all ranks), in order."""
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.coco.instances)).tolist()

    def __iter__(self):
        indices = self.epoch_indices()
        for draw in range(self.rank, len(indices), self.world_size):
            yield (indices[draw], draw, self.epoch)

    def __len__(self) -> int:
        return math.ceil((len(self.coco.instances) - self.rank) / self.world_size)


def collate(items: list[dict]) -> dict:
    """default_collate of the readable items; the messages of the others in "errors"."""
    errors = [it["error"] for it in items if "error" in it]
    good = [it for it in items if "error" not in it]
    batch = default_collate(good) if good else {}
    batch["errors"] = errors
    return batch


class KeypointLoader(DataLoader):
    """A DataLoader of :class:`KeypointDataset` items (with :func:`collate`)
    that raises, in the main process, the one-line DataError of the first
    item whose image could not be read (file, image id, annotation id)."""

    def __init__(self, dataset, **kwargs):
        kwargs.setdefault("collate_fn", collate)
        super().__init__(dataset, **kwargs)

    def __iter__(self):
        for batch in super().__iter__():
            if batch["errors"]:
                raise DataError(batch["errors"][0])
            del batch["errors"]
            yield batch


# A worker's tensors reach the main process through the worker's
# multiprocessing resource-sharer thread; when the main process stops (Ctrl-C,
# SIGTERM) while a batch is in flight, that thread's connection is reset or its
# pipe broken, and it would print the traceback (through sys.excepthook): an
# end, not an error. Workers keep quiet about those and only those.
_PARENT_LEFT = (ConnectionError, EOFError)


def _quiet_excepthook(kind, value, tb) -> None:
    if not isinstance(value, _PARENT_LEFT):
        sys.__excepthook__(kind, value, tb)


def _quiet_thread_excepthook(args) -> None:
    if not isinstance(args.exc_value, _PARENT_LEFT):
        threading.__excepthook__(args)


def _init_worker(worker_id: int) -> None:
    sys.excepthook = _quiet_excepthook
    threading.excepthook = _quiet_thread_excepthook


def make_loader(
    dataset: KeypointDataset,
    batch_size: int = 16,
    sampler=None,
    shuffle: bool = False,
    num_workers: int = 2,
    drop_last: bool = False,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = None,
    batch_sampler=None,
) -> KeypointLoader:
    """A :class:`KeypointLoader` over ``dataset`` with worker processes.

    Each worker decodes with PIL, crops with cv2.warpAffine and builds the
    targets with torch (one thread each: OpenCV's pool is off, see
    escape_fast.data.transforms, and torch uses one thread in workers).
    ``sampler`` (e.g. :class:`BalancedCategorySampler`) overrides
    ``shuffle``; ``batch_sampler`` (lists of indices) overrides both and
    ``batch_size``.
    """
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    kwargs = {}
    if num_workers > 0:
        kwargs["prefetch_factor"] = prefetch_factor or 4
        kwargs["persistent_workers"] = persistent_workers
    if batch_sampler is not None:
        kwargs["batch_sampler"] = batch_sampler
    else:
        kwargs.update(batch_size=batch_size, sampler=sampler, shuffle=shuffle if sampler is None else False,
                      drop_last=drop_last)
    if num_workers > 0:
        kwargs["worker_init_fn"] = _init_worker
    return KeypointLoader(dataset, num_workers=num_workers, pin_memory=pin_memory, **kwargs)
