"""Top-down crop geometry, the exact inverse map, normalization, targets.

The crop follows escape_fast.reference.heatmap_to_image (mmpose 0.x): a crop
is ``center`` [x, y] in original pixels, ``scale`` [sx, sy] = padded box size
/ 200 and ``rotation`` in degrees, and a point p of an output grid of size
(W, H) (the input crop or the heatmap) sits in the image at

    center + R(rotation) @ ((p - [W/2, H/2]) * 200 * scale / [W, H]).

:func:`crop_matrix` is the exact inverse of that map (image -> grid), which
is what cv2.warpAffine needs; points come back with :func:`grid_to_image`.
A flipped crop composes ``x -> W - 1 - x`` (a mirror of the pixel array)
after the crop map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from escape_fast import reference

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "HEATMAP_STRIDE",
    "PIXEL_STD",
    "Crop",
    "CropBatch",
    "apply_affine",
    "box_to_center_scale",
    "cell_targets",
    "crop_matrix",
    "gaussian_targets",
    "grid_to_image",
    "heatmap_grid",
    "image_to_grid",
    "normalize_batch",
    "normalize_image",
    "warp_crop",
]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

PIXEL_STD = reference.PIXEL_STD  # mmpose's unit of scale

# The model's heatmap geometry: every feature map and heatmap is the input crop at stride 4.
HEATMAP_STRIDE = 4


def heatmap_grid(input_size):
    """The heatmap side (an int) or (width, height) of an input crop of that side or size."""
    if isinstance(input_size, (tuple, list)):
        return tuple(int(s) // HEATMAP_STRIDE for s in input_size)
    return int(input_size) // HEATMAP_STRIDE

# OpenCV's own thread pool does not survive fork(): a DataLoader worker forked
# while the pool exists can deadlock in its first OpenCV call (seen in
# pthread_cond_destroy). The crops are small and the loader's worker
# processes give the parallelism, so the pool is turned off for the process.
cv2.setNumThreads(0)


def box_to_center_scale(bbox, aspect_ratio: float, padding: float = 1.25) -> tuple[np.ndarray, np.ndarray]:
    """Box [x, y, w, h] -> (center [2], scale [2]) of the top-down crop.

    The box is padded to ``aspect_ratio`` = crop width / height (the shorter
    side grows), then both sides are multiplied by ``padding`` (1.25), and
    scale = size / 200 (docs/method.md, "Data and crops"). Both are rounded
    to float32 where mmpose's loader rounds them (it keeps them as float32
    arrays), so that a crop is the authors' to the pixel (docs/authors.md).
    """
    x, y, w, h = (float(v) for v in bbox)
    center = np.array([x + 0.5 * w, y + 0.5 * h], dtype=np.float32)
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    else:
        w = h * aspect_ratio
    scale = np.array([w / PIXEL_STD, h / PIXEL_STD], dtype=np.float32) * np.float32(padding)
    return center.astype(np.float64), scale.astype(np.float64)


def _forward_linear(scale, rotation: float, size) -> np.ndarray:
    """2 x 2 matrix A of grid -> image: x_img = A @ (p - size/2) + center."""
    w, h = size
    theta = math.radians(float(rotation))
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]], dtype=np.float64)
    return rot @ np.diag([PIXEL_STD * scale[0] / w, PIXEL_STD * scale[1] / h])


def _mmpose_matrix(center, scale, rotation: float, size, float64: bool = False) -> np.ndarray:
    """image -> grid as mmpose 0.x's get_affine_transform makes it: three
    float32 points (the centre, the centre plus half the crop's side rotated
    up, and a third at a right angle) solved by cv2.getAffineTransform.

    ``float64``: the second point as the authors' code computes it under
    numpy 1 (their mmpose 0.29): the angle pi * rotation / 180, the rotated
    half side and its sum with the float32 centre in float64, rounded to
    float32 once. Without it, the products are float32 (numpy 2's casting of
    a float32 side): a rotated crop's matrix is up to 0.008 grid px (2e-6
    relative) off theirs. An unrotated crop is the same either way.
    """
    if float64:
        theta = np.pi * float(rotation) / 180
        c, s = float(np.cos(theta)), float(np.sin(theta))
        side = np.float32(np.float32(scale[0]) * np.float32(PIXEL_STD))
        half = float(side) * -0.5
        up_src = np.array([0.0 * c - half * s, 0.0 * s + half * c])  # (0, -side/2) rotated by theta, float64
    else:
        theta = math.radians(float(rotation))
        c, s = math.cos(theta), math.sin(theta)
        side = np.float32(np.float32(scale[0]) * np.float32(PIXEL_STD))
        up_src = np.array([-s * (side * -0.5), c * (side * -0.5)])  # (0, -side/2) rotated by theta
    dst_w, dst_h = float(size[0]), float(size[1])
    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0] = np.asarray(center, dtype=np.float32)
    src[1] = (src[0].astype(np.float64) if float64 else src[0]) + up_src
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = dst[0] + np.array([0.0, dst_w * -0.5])
    for pts in (src, dst):  # the third point: the first turned 90 degrees about the second
        d = pts[0] - pts[1]
        pts[2] = pts[1] + np.array([-d[1], d[0]], dtype=np.float32)
    return cv2.getAffineTransform(src, dst)


def crop_matrix(center, scale, rotation: float, size, flip: bool = False, inverse: bool = False,
                float64: bool = False) -> np.ndarray:
    """2 x 3 float64 affine matrix of the crop map.

    ``size`` is the grid's (width, height). Default: image -> grid (what
    cv2.warpAffine takes), the exact inverse of :func:`grid_to_image`; with
    ``inverse=True``: grid -> image. ``flip`` mirrors the grid
    (x -> width - 1 - x) after the crop map. A crop whose scale has the
    grid's aspect ratio (every box crop) is computed as mmpose computes it,
    from float32 points, so that its pixels are the authors' exactly; the
    map is the same up to float32 rounding (~1e-5 px). ``float64``: a
    rotated crop's second point in the authors' float64 arithmetic
    (:func:`_mmpose_matrix`), theirs to the bit.
    """
    center = np.asarray(center, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    w, h = size
    half = np.array([w / 2.0, h / 2.0])
    if math.isclose(scale[0] * h, scale[1] * w, rel_tol=1e-6):
        inv = _mmpose_matrix(center, scale, rotation, size, float64)
        fwd = np.linalg.inv(np.vstack([inv, [0.0, 0.0, 1.0]]))[:2]
    else:
        a = _forward_linear(scale, rotation, size)
        # grid -> image: x = A p + (center - A half)
        fwd = np.concatenate([a, (center - a @ half)[:, None]], axis=1)
        # image -> grid: p = A^-1 (x - center) + half, A^-1 = diag(size / (200 s)) R^T
        theta = math.radians(float(rotation))
        c, s = math.cos(theta), math.sin(theta)
        a_inv = np.diag([w / (PIXEL_STD * scale[0]), h / (PIXEL_STD * scale[1])]) @ np.array(
            [[c, s], [-s, c]], dtype=np.float64
        )
        inv = np.concatenate([a_inv, (half - a_inv @ center)[:, None]], axis=1)
    if flip:
        mirror = np.array([[-1.0, 0.0, w - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        inv = (mirror @ np.vstack([inv, [0.0, 0.0, 1.0]]))[:2]
        fwd = (np.vstack([fwd, [0.0, 0.0, 1.0]]) @ mirror)[:2]  # mirror is its own inverse
    return fwd if inverse else inv


def apply_affine(matrix: np.ndarray, points) -> np.ndarray:
    """Apply a 2 x 3 matrix to points [..., 2] (float64)."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ matrix[:, :2].T + matrix[:, 2]


def grid_to_image(points, center, scale, rotation: float, size, flip: bool = False) -> np.ndarray:
    """Grid points [..., 2] -> original image pixels (reference.heatmap_to_image
    for one crop, in float64 numpy; ``size`` is (width, height))."""
    return apply_affine(crop_matrix(center, scale, rotation, size, flip=flip, inverse=True), points)


def image_to_grid(points, center, scale, rotation: float, size, flip: bool = False) -> np.ndarray:
    """Original image pixels [..., 2] -> grid points: inverse of grid_to_image."""
    return apply_affine(crop_matrix(center, scale, rotation, size, flip=flip), points)


def warp_crop(image: np.ndarray, matrix: np.ndarray, size) -> np.ndarray:
    """Affine crop of an HxWx3 uint8 image to ``size`` (width, height):
    bilinear, zero outside the image (cv2.warpAffine, C++ speed)."""
    return cv2.warpAffine(
        image,
        matrix.astype(np.float64),
        (int(size[0]), int(size[1])),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )


@dataclass(frozen=True)
class Crop:
    """One top-down crop, the map of every crop in escape_fast (training
    items, evaluation, prediction, figures): ``center`` [2] in image pixels,
    ``scale`` [2] = padded box size / 200, ``rotation`` in degrees, ``flip``.
    ``size`` arguments are the grid's (width, height): the input crop or the
    heatmap of the same crop. ``float64``: a rotated crop's matrix in the
    authors' float64 arithmetic (:func:`crop_matrix`; the training setting
    ``rotated_crops``)."""

    center: np.ndarray
    scale: np.ndarray
    rotation: float = 0.0
    flip: bool = False
    float64: bool = False

    @classmethod
    def of_box(cls, box, size, padding: float = 1.25) -> Crop:
        """The crop of box [x, y, w, h] for a grid of ``size``: centred on the
        box, padded to the grid's aspect ratio, then by ``padding``."""
        center, scale = box_to_center_scale(box, size[0] / size[1], padding)
        return cls(center, scale)

    def matrix(self, size) -> np.ndarray:
        """2 x 3 image -> grid affine matrix (what cv2.warpAffine takes)."""
        return crop_matrix(self.center, self.scale, self.rotation, size, flip=self.flip, float64=self.float64)

    def warp(self, image: np.ndarray, size) -> np.ndarray:
        """The crop's pixels [size[1], size[0], 3] (bilinear, zero outside the image)."""
        return warp_crop(image, self.matrix(size), size)

    def to_grid(self, points, size) -> np.ndarray:
        """Image pixels [..., 2] -> grid points."""
        return apply_affine(self.matrix(size), points)

    def pixels_per_cell(self, side: int) -> float:
        """Image pixels per cell, along x, of a square grid of ``side`` cells on this crop."""
        return PIXEL_STD * float(self.scale[0]) / side

    def to_image(self, points, size) -> np.ndarray:
        """Grid points [..., 2] -> image pixels: the exact inverse of :meth:`to_grid`."""
        return apply_affine(crop_matrix(self.center, self.scale, self.rotation, size, flip=self.flip,
                                        inverse=True, float64=self.float64), points)


@dataclass(frozen=True)
class CropBatch:
    """The crops of B heatmaps as tensors, what decoding maps cells back to
    the image with: ``center`` [B, 2], ``scale`` [B, 2] (as in :class:`Crop`)
    and ``rotation`` [B] in degrees or None (no rotation). Indexing indexes
    every field."""

    center: torch.Tensor
    scale: torch.Tensor
    rotation: torch.Tensor | None = None

    def __getitem__(self, index) -> CropBatch:
        return CropBatch(self.center[index], self.scale[index],
                         None if self.rotation is None else self.rotation[index])

    @classmethod
    def of_crops(cls, crops, device=None, dtype=torch.float32) -> CropBatch:
        """From :class:`Crop` objects (unflipped; no rotation tensor when none is rotated)."""
        center = torch.from_numpy(np.stack([c.center for c in crops])).to(device=device, dtype=dtype)
        scale = torch.from_numpy(np.stack([c.scale for c in crops])).to(device=device, dtype=dtype)
        rotation = None
        if any(c.rotation for c in crops):
            rotation = torch.tensor([float(c.rotation) for c in crops], device=device, dtype=dtype)
        return cls(center, scale, rotation)


def normalize_image(crop: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] RGB -> float32 [3, H, W] with ImageNet mean/std."""
    x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).to(torch.float32).div_(255.0)
    mean = torch.from_numpy(IMAGENET_MEAN)[:, None, None]
    std = torch.from_numpy(IMAGENET_STD)[:, None, None]
    return x.sub_(mean).div_(std)


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] (e.g. from a loader with ``normalize=False``, on
    the GPU) -> float32 normalized like :func:`normalize_image`."""
    mean = torch.as_tensor(IMAGENET_MEAN, device=images.device)[:, None, None]
    std = torch.as_tensor(IMAGENET_STD, device=images.device)[:, None, None]
    return (images.to(torch.float32) / 255.0 - mean) / std


def gaussian_targets(
    keypoints: np.ndarray, visible: np.ndarray, heatmap_size, sigma: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets [K, H, W] and weights [K] (float32) for keypoints [K, 2] in
    heatmap cells; ``heatmap_size`` is (width, height). Calls
    escape_fast.reference.gaussian_heatmaps so that targets are exactly the
    Gaussians the pooling op reads."""
    w, h = heatmap_size
    kp = torch.from_numpy(np.asarray(keypoints, dtype=np.float32))[None]
    vis = torch.from_numpy(np.asarray(visible, dtype=bool))[None]
    g, weight = reference.gaussian_heatmaps(kp, vis, (int(w), int(h)), sigma)
    return g[0], weight[0]


def cell_targets(cells, visible, heatmap_size, sigma: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' training targets [K, H, W] and weights [K] (float32): mmpose 0.29's
    TopDownGenerateTarget (MSRA, no unbiased encoding), which their TopDownGenerateTargetFewShot
    copies, computed as they compute it.

    ``cells`` [K, 2] are the keypoints in heatmap cells (float64: their float32 input-pixel
    keypoints divided by the stride), ``heatmap_size`` (width, height). Each visible keypoint
    gets the Gaussian exp(-d^2 / (2 sigma^2)) (float32) of the cell mu = int(cells + 0.5),
    ``int`` truncating toward zero (-0.7 gives 0, not -1), cut to the window of 3 sigma around
    mu. Its weight is 1 unless the window's integer corners ul = int(mu - 3 sigma) and
    br = int(mu + 3 sigma + 1) lie off the grid (ul >= W or H, or br < 0): a keypoint whose
    window only touches the grid from outside (br = 0) keeps weight 1 with an all-zero map.
    Invisible keypoints get weight 0 and a zero map.
    """
    w, h = (int(v) for v in heatmap_size)
    sigma = float(sigma)
    cells = np.asarray(cells, dtype=np.float64).reshape(-1, 2)
    visible = np.asarray(visible).reshape(-1)
    k = cells.shape[0]
    target = np.zeros((k, h, w), dtype=np.float32)
    weight = np.zeros(k, dtype=np.float32)
    tmp_size = sigma * 3
    size = 2 * tmp_size + 1
    x = np.arange(0, size, 1, np.float32)
    y = x[:, None]
    x0 = y0 = size // 2
    g = np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2))  # float32, as theirs
    for j in range(k):
        if not visible[j] > 0:
            continue
        mu_x, mu_y = int(cells[j, 0] + 0.5), int(cells[j, 1] + 0.5)
        ul = [int(mu_x - tmp_size), int(mu_y - tmp_size)]
        br = [int(mu_x + tmp_size + 1), int(mu_y + tmp_size + 1)]
        if ul[0] >= w or ul[1] >= h or br[0] < 0 or br[1] < 0:
            continue
        weight[j] = 1.0
        g_x = max(0, -ul[0]), min(br[0], w) - ul[0]
        g_y = max(0, -ul[1]), min(br[1], h) - ul[1]
        img_x = max(0, ul[0]), min(br[0], w)
        img_y = max(0, ul[1]), min(br[1], h)
        target[j][img_y[0]:img_y[1], img_x[0]:img_x[1]] = g[g_y[0]:g_y[1], g_x[0]:g_x[1]]
    return torch.from_numpy(target), torch.from_numpy(weight)
