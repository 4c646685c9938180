"""Data for escape_fast: MP-100-format datasets, crops, episodes, PCK.

Everything goes through one path, whether the data is MP-100, the small real
fixture, a user's COCO-style keypoint dataset or the built-in synthetic
benchmark (``python -m escape_fast.data.synthetic --out DIR``).

Loading (escape_fast.data.coco)
    ``load_coco(ann_file, image_root=None)`` -> :class:`CocoKeypoints`
    (checked, cleaned instances; errors name the file and id, skipped
    annotations are counted in a warning); ``mp100_split_files(root, split)``
    finds ``annotations/mp100_split{split}_{train,val,test}.json``;
    ``load_image`` decodes to RGB with EXIF orientation.

Top-down pipeline (escape_fast.data.dataset, escape_fast.data.transforms)
    ``KeypointDataset(coco, input_size=256, train=False, ...)``: crops,
    ImageNet normalization, Gaussian targets and weights padded to the
    largest category; ``make_loader`` (DataLoader with workers);
    ``BalancedCategorySampler`` for training; ``crop_matrix``,
    ``grid_to_image`` / ``image_to_grid``: the crop map of
    escape_fast.reference.heatmap_to_image and its exact inverse.

Protocol (escape_fast.data.episodes)
    ``EpisodeSampler(coco, shots, queries=15, draws=200, seed)``: seeded
    draws identical whatever the batching or number of processes;
    ``draws_for_episodes(60000, 20) == 200``. PCK and its intervals are
    escape_fast.eval.metrics.
"""

from __future__ import annotations

from escape_fast.data.coco import (
    MP100_SPLITS,
    Category,
    CocoKeypoints,
    DataError,
    DataWarning,
    ImageInfo,
    Instance,
    drop_unreadable_images,
    load_coco,
    load_for_run,
    load_image,
    mp100_split_files,
)
from escape_fast.data.dataset import (
    BalancedCategorySampler,
    KeypointDataset,
    KeypointLoader,
    ShuffleSampler,
    make_loader,
)
from escape_fast.data.episodes import Episode, EpisodeSampler, draws_for_episodes
from escape_fast.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    box_to_center_scale,
    cell_targets,
    crop_matrix,
    gaussian_targets,
    grid_to_image,
    image_to_grid,
    normalize_batch,
    normalize_image,
    warp_crop,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MP100_SPLITS",
    "BalancedCategorySampler",
    "Category",
    "CocoKeypoints",
    "DataError",
    "DataWarning",
    "Episode",
    "EpisodeSampler",
    "ImageInfo",
    "Instance",
    "KeypointDataset",
    "KeypointLoader",
    "ShuffleSampler",
    "box_to_center_scale",
    "cell_targets",
    "crop_matrix",
    "draws_for_episodes",
    "drop_unreadable_images",
    "gaussian_targets",
    "grid_to_image",
    "image_to_grid",
    "load_coco",
    "load_for_run",
    "load_image",
    "make_loader",
    "mp100_split_files",
    "normalize_batch",
    "normalize_image",
    "warp_crop",
]
