"""The training losses: heatmap regression (stages 1 and 3) and the matching loss (stage 4)."""

from __future__ import annotations

import torch


def heatmap_loss(heatmaps: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, scale: float = 0.5,
                 slots: int | None = None) -> torch.Tensor:
    """``scale`` x the weighted squared error, averaged over every cell of every keypoint slot.

    heatmaps, target [B, K, H, W]; weight [B, K] (0 for padding, invisible
    keypoints and keypoints without a prototype). ``slots``: None averages
    over the K slots of the batch; a number N divides the sum by B x N x H x W
    instead, as a batch padded to N slots would (the authors' pad every
    category to 68).

    The default scale 0.5 is the factor of the HRNet / Simple Baselines
    reference code (``loss += 0.5 * criterion(...)``), escape_fast's
    convention. It is not mmpose's: mmpose 0.29's JointsMSELoss, which the
    ESCAPE authors train with, has no 0.5, which is ``scale=1.0``
    (config ``heatmap_loss.scale``; docs/authors.md). Under Adam the factor
    is not a no-op: it moves the step of every gradient near Adam's eps.
    """
    loss = scale * (weight[..., None, None] * (heatmaps - target) ** 2).mean()
    if slots is not None and int(slots) != heatmaps.shape[1]:
        loss = loss * (heatmaps.shape[1] / int(slots))
    return loss


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
