"""The models that the training stages optimize (escape_fast.train).

* :class:`HeatmapModel` (stages 1 and 3): f_theta and a table of
  prototypes, one per base keypoint (stage 1) or per super-keypoint shared
  by its members (stage 3); its heatmaps are regressed onto Gaussians.
* :class:`MatchingModel` (stage 4): f_gamma and the matching network, the
  log assignment of an image's keypoints to the super-keypoints.

Both are parts of :class:`escape_fast.models.escape.EscapeModel` once
trained; they are not used at inference.
"""

from __future__ import annotations

import torch
from torch import nn

from escape_fast import ops
from escape_fast.models.escape import pool_keypoints, pooling_positions


class HeatmapModel(nn.Module):
    """f_theta + prototypes; ``table[category_index, k]`` is the prototype row
    of keypoint k of a category (-1: no prototype; its weight is zeroed)."""

    def __init__(self, extractor: nn.Module, prototypes: torch.Tensor, table: torch.Tensor):
        super().__init__()
        self.extractor = extractor
        self.prototypes = nn.Parameter(prototypes.clone())
        self.register_buffer("table", table.clone())

    def forward(self, images, category_index):
        """(heatmaps [B, K, h, w], has_prototype [B, K]) of a batch of crops."""
        feats = self.extractor(images).float()
        rows = self.table[category_index]  # [B, K]
        protos = self.prototypes[rows.clamp_min(0)]
        return ops.prototype_heatmaps(feats, protos), rows >= 0


class MatchingModel(nn.Module):
    """f_gamma + matching network: log assignment of an image's keypoints."""

    def __init__(self, extractor: nn.Module, matcher: nn.Module, sigma: float, pooling: str = "exact"):
        super().__init__()
        self.extractor, self.matcher, self.sigma, self.pooling = extractor, matcher, sigma, pooling

    def forward(self, images, keypoints, visible):
        """(log assignment [B, K + 1, L], used [B, K]) of keypoints (heatmap cells
        [B, K, 2], visible [B, K]), pooled as inference pools them (config
        ``pooling``): ``used`` are the visible ones whose pooling window
        reaches the grid, the rows the loss may look at."""
        feats = self.extractor(images).float()
        pooled, visible = pool_keypoints(feats, keypoints, visible, self.sigma, self.pooling)
        return self.matcher(pooled, pooling_positions(keypoints, self.pooling), visible), visible
