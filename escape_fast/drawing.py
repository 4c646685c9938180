"""Keypoints and skeletons drawn onto images (OpenCV, at the image's own resolution).

Shared by ``escape_fast.predict`` (one PNG per query) and ``escape_fast.plot``
(the panels of the figures), so a keypoint has the same colour in every
picture: keypoint r of K gets hue r / K.
"""

from __future__ import annotations

import colorsys

import cv2
import numpy as np
from PIL import Image

from escape_fast.files import atomic_write


def keypoint_colors(k: int) -> np.ndarray:
    """[K, 3] uint8 RGB, one evenly spaced hue per keypoint."""
    return np.array(
        [[round(255 * c) for c in colorsys.hsv_to_rgb(r / max(k, 1), 0.85, 1.0)] for r in range(k)], dtype=np.uint8
    ).reshape(k, 3)


def draw_pose(image: np.ndarray, keypoints, valid=None, skeleton=(), labels=None, colors=None,
              radius: int | None = None) -> np.ndarray:
    """A copy of ``image`` (RGB uint8 [H, W, 3]) with keypoints and limbs drawn.

    Args:
        keypoints: [K, 2] pixel coordinates (x, y).
        valid: [K] bool, the keypoints to draw (default all).
        skeleton: 0-based index pairs; a limb is drawn when both ends are valid.
        labels: optional [K] strings written beside the keypoints (e.g. numbers).
        colors: [K, 3] RGB (default :func:`keypoint_colors`).
        radius: of the dots in pixels (default: from the image size).
    Sizes follow the image's size, so small and large photographs both read well.
    """
    out = np.ascontiguousarray(image, dtype=np.uint8).copy()
    pts = np.asarray(keypoints, dtype=np.float64).reshape(-1, 2)
    k = len(pts)
    valid = np.ones(k, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    colors = keypoint_colors(k) if colors is None else np.asarray(colors, dtype=np.uint8)
    side = max(out.shape[0], out.shape[1])
    radius = max(2, round(side / 120)) if radius is None else int(radius)
    thick = max(1, round(side / 300))
    # cv2 draws on integer pixels; 4 fractional bits keep sub-pixel positions
    shift = 4
    fixed = np.round(np.nan_to_num(pts) * (1 << shift)).astype(np.int64)
    for a, b in skeleton:
        if 0 <= a < k and 0 <= b < k and valid[a] and valid[b]:
            color = tuple(int(v) for v in (colors[a].astype(int) + colors[b].astype(int)) // 2)
            cv2.line(out, tuple(map(int, fixed[a])), tuple(map(int, fixed[b])), color, thick, cv2.LINE_AA, shift)
    for r in np.flatnonzero(valid):
        center = tuple(map(int, fixed[r]))
        cv2.circle(out, center, radius * (1 << shift), tuple(int(v) for v in colors[r]), -1, cv2.LINE_AA, shift)
        cv2.circle(out, center, radius * (1 << shift), (0, 0, 0), max(1, thick // 2), cv2.LINE_AA, shift)
        if labels is not None:
            org = (int(pts[r, 0]) + radius + 1, int(pts[r, 1]) - radius - 1)
            scale = max(0.35, side / 1500)
            cv2.putText(out, str(labels[r]), org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
            cv2.putText(out, str(labels[r]), org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick,
                        cv2.LINE_AA)
    return out


def save_png(image: np.ndarray, path) -> None:
    """Write an RGB uint8 image as PNG."""
    with atomic_write(path, "wb") as f:
        Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(f, format="PNG")
