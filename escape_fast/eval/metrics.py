"""PCK of the standard protocol (docs/method.md, "Evaluation"), vectorized in torch.

PCK@t of one query: among the keypoints visible in the query AND in every
support of its episode (and existing in the category), the fraction whose
prediction lies strictly within ``t * max(w, h)`` of the truth, in original
image pixels, where (w, h) is the query's cleaned box. A query with no such
keypoint scores 0. The reported PCK is the mean over all (episode, query)
pairs; per-category means, a 95% confidence interval and PCK at 0.05, 0.10,
0.15, 0.20, 0.25 with their mean (mPCK) come with it.

Confidence interval: the Q queries of one draw share their support set, so
they are not independent; the interval is the normal one over draws,
``mean +- 1.96 * std(draw means, ddof=1) / sqrt(number of draws)`` (every
draw has Q queries, so the mean of the draw means is the overall mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "THRESHOLDS",
    "PCKSummary",
    "paired_difference",
    "pck_curve",
    "pck_per_query",
    "summarize_pck",
    "valid_keypoints",
]

THRESHOLDS = (0.05, 0.10, 0.15, 0.20, 0.25)


def _t(x, dtype=torch.float64) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if dtype is not None else x
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def valid_keypoints(query_visible, support_visible, keypoint_mask=None) -> torch.Tensor:
    """Keypoints that count: visible in the query and in every support.

    query_visible [N, K], support_visible [N, S, K] (or [S, K] shared by all
    N queries), keypoint_mask [N, K] or [K] (existing slots) -> bool [N, K].
    """
    q = _t(query_visible, torch.bool)
    s = _t(support_visible, torch.bool)
    if s.dim() == 2:
        s = s.unsqueeze(0)
    valid = q & s.all(dim=-2)
    if keypoint_mask is not None:
        valid = valid & _t(keypoint_mask, torch.bool)
    return valid


def pck_curve(pred, gt, valid, bbox_size, thresholds=THRESHOLDS) -> torch.Tensor:
    """PCK of each query at each threshold: float64 [T, N].

    pred, gt [N, K, 2] original pixels; valid [N, K] (see valid_keypoints);
    bbox_size [N] = max(w, h) of each query's box.
    """
    pred, gt = _t(pred), _t(gt)
    valid = _t(valid, torch.bool)
    norm = _t(bbox_size)
    thr = _t(list(thresholds))
    dist = torch.linalg.vector_norm(pred - gt, dim=-1)  # [N, K]
    hits = (dist[None] < thr[:, None, None] * norm[None, :, None]) & valid[None]  # [T, N, K]
    count = valid.sum(-1).to(torch.float64)  # [N]
    return torch.where(count > 0, hits.sum(-1).to(torch.float64) / count.clamp_min(1), torch.zeros_like(count))


def pck_per_query(pred, gt, valid, bbox_size, threshold: float = 0.2) -> torch.Tensor:
    """PCK@threshold of each query: float64 [N] (0 with no valid keypoint)."""
    return pck_curve(pred, gt, valid, bbox_size, (threshold,))[0]


@dataclass
class PCKSummary:
    """Result of :func:`summarize_pck`; PCK values are fractions in [0, 1].

    ``pck`` maps threshold -> mean over (episode, query) pairs; ``mpck`` is
    the mean of those; ``per_category`` maps category id -> {threshold ->
    mean}; ``ci95`` is (low, high) of PCK at ``main_threshold`` over draws.
    """

    pck: dict[float, float]
    mpck: float
    per_category: dict[int, dict[float, float]]
    ci95: tuple[float, float]
    num_pairs: int
    num_draws: int
    main_threshold: float = 0.2
    extra: dict = field(default_factory=dict)

    @property
    def pck_main(self) -> float:
        return self.pck[self.main_threshold]

    def as_dict(self) -> dict:
        return {
            "pck": {f"{t:.2f}": v for t, v in self.pck.items()},
            "mpck": self.mpck,
            "per_category": {
                str(c): {f"{t:.2f}": v for t, v in d.items()} for c, d in self.per_category.items()
            },
            "ci95": list(self.ci95),
            "num_pairs": self.num_pairs,
            "num_draws": self.num_draws,
            "main_threshold": self.main_threshold,
        }


def _ci95_over_draws(values, cats, draws) -> tuple[float, int]:
    """Half-width of the 95% interval of the mean of ``values`` [N] over
    support draws ((category, draw) pairs), from the spread of the draw
    means; and the number of draws."""
    key = torch.stack((cats, draws), dim=1)
    _, dinv = torch.unique(key, dim=0, return_inverse=True)
    nd = int(dinv.max()) + 1
    dsum = torch.zeros(nd, dtype=torch.float64).index_add_(0, dinv, values.double())
    dmean = dsum / torch.bincount(dinv, minlength=nd).to(torch.float64)
    return (1.96 * float(dmean.std(unbiased=True)) / math.sqrt(nd) if nd > 1 else math.nan), nd


def paired_difference(scores_a, scores_b, category_ids, draw_ids) -> tuple[float, float]:
    """Mean of ``scores_b - scores_a`` (per-query PCK [N] of two methods on
    the same pairs) and the half-width of its 95% interval over support
    draws. Pairing removes the draw-to-draw spread that both methods share,
    so a difference well inside each method's own interval can still be sure."""
    a, b = _t(scores_a), _t(scores_b)
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"paired_difference: scores must be two [N] tensors, got {list(a.shape)} and "
                         f"{list(b.shape)}")
    diff = b - a
    return float(diff.mean()), _ci95_over_draws(diff, _t(category_ids, torch.int64), _t(draw_ids, torch.int64))[0]


def summarize_pck(scores, category_ids, draw_ids, thresholds=THRESHOLDS, main_threshold: float = 0.2):
    """Aggregate per-query PCK.

    scores [T, N] (pck_curve over all queries), category_ids [N], draw_ids
    [N] (the draw index within its category; (category, draw) names the
    support set). Returns a :class:`PCKSummary`.
    """
    scores = _t(scores)
    if scores.dim() == 1:
        scores = scores[None]
    thresholds = tuple(float(t) for t in thresholds)
    if scores.shape[0] != len(thresholds):
        raise ValueError(f"scores has {scores.shape[0]} rows for {len(thresholds)} thresholds")
    cats = _t(category_ids, torch.int64)
    draws = _t(draw_ids, torch.int64)
    n = scores.shape[1]
    if n == 0:
        raise ValueError("no queries to summarize")
    mean = scores.mean(dim=1)
    pck = {t: float(mean[i]) for i, t in enumerate(thresholds)}

    per_category = {}
    ucat, cinv = torch.unique(cats, return_inverse=True)
    csum = torch.zeros(len(thresholds), len(ucat), dtype=torch.float64).index_add_(1, cinv, scores)
    ccount = torch.bincount(cinv, minlength=len(ucat)).to(torch.float64)
    cmean = csum / ccount
    for j, c in enumerate(ucat.tolist()):
        per_category[c] = {t: float(cmean[i, j]) for i, t in enumerate(thresholds)}

    main = thresholds.index(float(main_threshold)) if float(main_threshold) in thresholds else None
    if main is None:
        raise ValueError(f"main_threshold {main_threshold} is not among the thresholds {thresholds}")
    half, nd = _ci95_over_draws(scores[main], cats, draws)
    centre = pck[thresholds[main]]
    return PCKSummary(
        pck=pck,
        mpck=float(mean.mean()),
        per_category=per_category,
        ci95=(centre - half, centre + half),
        num_pairs=n,
        num_draws=nd,
        main_threshold=thresholds[main],
    )
