"""The training losses: heatmap regression (stages 1 and 3) and the matching loss (stage 4)."""

from __future__ import annotations

import torch


def heatmap_loss(heatmaps: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """0.5 x weighted MSE over every cell of every keypoint slot (mmpose's convention).

    heatmaps, target [B, K, H, W]; weight [B, K] (0 for padding, invisible
    keypoints and keypoints without a prototype).
    """
    return 0.5 * (weight[..., None, None] * (heatmaps - target) ** 2).mean()


def matching_loss(log_p: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and accuracy of a transport output against super-keypoint labels.

    Args:
        log_p (Tensor[B, K + 1, L]): ops.sinkhorn_log output.
        labels (Tensor[B, K]): super-keypoint of each keypoint (from stage 2).
        valid (Tensor[B, K]): keypoints that take part.
    Returns:
        (loss, accuracy): minus the mean log P at each valid keypoint's label,
        plus minus the mean dustbin log P over super-keypoints that no valid
        keypoint of the image uses; accuracy of the row argmax on valid rows.
    """
    b, k1, n = log_p.shape
    k = k1 - 1
    valid = valid.bool()
    safe = labels.clamp(0, n - 1)
    picked = log_p[:, :k].gather(2, safe[..., None]).squeeze(-1)
    kp_loss = -(picked * valid).sum() / valid.sum().clamp_min(1)
    used = torch.zeros(b, n, dtype=torch.bool, device=log_p.device)
    used.scatter_(1, torch.where(valid, safe, torch.zeros_like(safe)), valid)
    unused = ~used
    bin_row = log_p[:, k].masked_fill(~unused, 0.0)
    bin_loss = -bin_row.sum() / unused.sum().clamp_min(1)
    correct = (log_p[:, :k].argmax(-1) == labels) & valid
    accuracy = correct.sum().to(log_p.dtype) / valid.sum().clamp_min(1)
    return kp_loss + bin_loss, accuracy
