"""Finding the object in a query that has no box.

:func:`locate_object` is a generalized Hough transform over the supports'
layout: each keypoint's cosine map on a whole-image crop (softmax over the
crop, temperature SEARCH_TEMPERATURE) votes for the object's centre at the
offset the supports show between that keypoint and their box centre, at
each object size of SEARCH_SIZES; the centre and size with the most votes
give a box, shaped like the supports' boxes.

A search's box is coarse (a vote cell, six sizes), so the Predictor decodes
it and then refits: :func:`fit_layout` places the supports' layout on the
decoded keypoints (a similarity), and :func:`layout_box` turns that fit into
the box to decode again (escape_fast.predict.predictor.Predictor.search).
The tracker places its crops with the same fit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from escape_fast import ops

# the object sizes tried, as fractions of the whole-image crop's side
SEARCH_SIZES = (0.12, 0.18, 0.25, 0.35, 0.5, 0.7)
SEARCH_TEMPERATURE = 0.05  # of the keypoints' cosine maps (softmax) in the votes


@dataclass(frozen=True)
class SupportLayout:
    """Where the keypoints sit in the supports' boxes.

    ``offsets`` [K, 2]: each keypoint's mean offset from its supports' box
    centres in units of the box's longer side (NaN where no support shows
    it); ``aspect`` [2]: the supports' mean box (w, h) over that side."""

    offsets: np.ndarray
    aspect: np.ndarray

    @classmethod
    def of_supports(cls, keypoint_sets, boxes) -> SupportLayout:
        """From each support's KeypointSet and the box [x, y, w, h] it was cropped to."""
        rel, aspect = [], []
        for kps, (x, y, w, h) in zip(keypoint_sets, boxes):
            size = max(w, h)
            rel.append(np.where(kps.visible[:, None], (kps.keypoints - [x + w / 2, y + h / 2]) / size, np.nan))
            aspect.append([w / size, h / size])
        with warnings.catch_warnings():  # a keypoint visible in no support has no offset (NaN)
            warnings.simplefilter("ignore", RuntimeWarning)
            offsets = np.nanmean(np.stack(rel), 0)
        return cls(offsets, np.mean(aspect, 0))


@torch.no_grad()
def locate_object(smoothed: torch.Tensor, prototypes: torch.Tensor, layout: SupportLayout, known: np.ndarray,
                  crop, pixels_per_cell: float) -> np.ndarray | None:
    """The box [x, y, w, h] (image pixels) of the object in one whole-image
    crop, or None when fewer than two keypoints can vote.

    ``smoothed`` [1, C, G, G]: the crop's features after the decoder's mean
    filter; ``prototypes`` [K, C]; ``known`` [K]: keypoints some support
    shows; ``crop`` (data.transforms.Crop) maps grid cells to the image.
    """
    use = np.flatnonzero(np.isfinite(layout.offsets).all(1) & known)
    if len(use) < 2:
        return None
    dev = smoothed.device
    grid = smoothed.shape[-1]
    protos = torch.nn.functional.normalize(prototypes[use], dim=-1)[None]
    maps = ops.prototype_heatmaps(smoothed, protos.to(smoothed.dtype))[0]  # [k, G, G]
    k = maps.shape[0]
    prob = torch.softmax(maps.reshape(k, -1) / SEARCH_TEMPERATURE, dim=-1).reshape(k, 1, grid, grid)
    base = torch.arange(grid, device=dev, dtype=prob.dtype)
    cy, cx = torch.meshgrid(base, base, indexing="ij")
    offsets = torch.from_numpy(layout.offsets[use]).to(dev, prob.dtype)  # [k, 2]
    best = (-1.0, None, None)
    for frac in SEARCH_SIZES:
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
    center = crop.to_image(np.array([gx, gy], dtype=np.float64), (grid, grid))
    wh = size * pixels_per_cell * layout.aspect
    return np.array([center[0] - wh[0] / 2, center[1] - wh[1] / 2, wh[0], wh[1]])


def fit_layout(offsets: np.ndarray, points: np.ndarray, use: np.ndarray) -> tuple[np.ndarray, float, float] | None:
    """(centre [2], size, angle) of the similarity that best maps the support
    layout's ``offsets`` [K, 2] onto ``points`` [K, 2] over ``use`` [K], or
    None with fewer than two usable points. Least squares in the complex
    plane, mirrored or not (whichever fits better), once more without the
    points that fit worst (a mistaken keypoint should not move the box)."""
    use = use & np.isfinite(offsets).all(1) & np.isfinite(points).all(1)
    if use.sum() < 2:
        return None
    o_all = offsets[:, 0] + 1j * offsets[:, 1]
    p_all = points[:, 0] + 1j * points[:, 1]

    def solve(mask):
        best = None
        for o in (o_all, np.conj(o_all)):
            om, pm = o[mask].mean(), p_all[mask].mean()
            den = np.sum(np.abs(o[mask] - om) ** 2)
            if den <= 1e-12:
                continue
            a = np.sum(np.conj(o[mask] - om) * (p_all[mask] - pm)) / den
            resid = np.abs(pm + a * (o - om) - p_all)
            cost = float(np.sum(resid[mask] ** 2))
            if best is None or cost < best[0]:
                best = (cost, a, pm - a * om, resid, mask)
        return best

    fit = solve(use)
    if fit is None:
        return None
    if use.sum() >= 4:  # drop the points beyond twice the median residual and fit again
        resid = fit[3]
        keep = use & (resid <= 2 * np.median(resid[use]) + 1e-9)
        if keep.sum() >= 3:
            fit = solve(keep) or fit
    _, a, c, _, mask = fit
    # the size from the spreads: least squares shrinks |a| by every mislocated point it averages in
    spread = np.sqrt(np.sum(np.abs(p_all[mask] - p_all[mask].mean()) ** 2) /
                     np.sum(np.abs(o_all[mask] - o_all[mask].mean()) ** 2))
    if not spread > 1e-6:  # the points coincide: no size
        return None
    return np.array([c.real, c.imag]), float(spread), float(np.angle(a))


def layout_box(layout: SupportLayout, center: np.ndarray, size: float, angle: float, margin: float) -> np.ndarray:
    """The upright box [x, y, w, h] around the supports' box placed at
    ``center``, ``size`` (its longer side, pixels) and ``angle`` (radians),
    widened by ``margin`` (the bounding box of the turned support box)."""
    aw, ah = layout.aspect * size * margin
    c, s = abs(np.cos(angle)), abs(np.sin(angle))
    w, h = c * aw + s * ah, s * aw + c * ah
    return np.array([center[0] - w / 2, center[1] - h / 2, w, h])
