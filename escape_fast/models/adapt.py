"""Keypoint prototypes for a novel category from its support set (docs/method.md, "Blending the prior").

Three estimators of the prototype w_r of each support keypoint r:

* MLE (eq. 2): the mean support feature over the shots where r is visible;
* MAP (eq. 7): a Hungarian assignment of the keypoints to distinct
  super-keypoints by cosine distance, then ``alpha * mean + (1 - alpha) * mu``;
* ESCAPE (eq. 10): ``alpha * mean + (1 - alpha) * sum_z Q_rz mu_z`` with Q the
  soft assignment of the matching network.

Shapes: B episodes, S shots, K keypoints, C channels, L super-keypoints.

Where mu comes from (``prior_source``; docs/method.md, "The prior"). By
default, as in the authors' code, mu_z is the super-keypoint detector trained
in stage 3: a heatmap prototype, at the heatmap's scale (median norm 0.35
against 1.49 for a support feature on the built-in model). With
``prior_source: features``, the paper's reading of sec. 4.1 (o ~ N(zeta_r,
phi^2), zeta_r ~ N(mu_z, sigma^2)), mu_z is the mean of its members' mean
unit features under the fine-tuned extractor (``prior.feature_prior``).

Scale (``prior_scale``). By default the prior is blended as it is (the
authors' blend), so its norm acts as a second weight beside alpha.
``prior_scale: support`` brings it to the norm of the support mean first
(``blend``): a heatmap's argmax depends only on the prototype's direction,
which leaves alpha the only weight. The matching cost of MAP is the cosine
distance either way. alpha comes from EscapeModel.alpha_for; which prior won
on validation is in benchmarks/RESULTS.md, "The authors' recipe".
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def support_mean(features: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean keypoint feature over the shots where it is visible.

    Args:
        features (Tensor[B, S, K, C]): pooled support keypoint features.
        visible (Tensor[B, S, K]): bool.
    Returns:
        (Tensor[B, K, C], Tensor[B, K] bool): the means (0 where never visible)
        and whether each keypoint is visible in at least one shot.
    """
    if features.dim() != 4 or visible.shape != features.shape[:3]:
        raise ValueError(
            f"support_mean: features must be [B, S, K, C] and visible [B, S, K], got "
            f"{list(features.shape)} and {list(visible.shape)}"
        )
    vis = visible.to(features.dtype)[..., None]
    count = vis.sum(1)
    return (features * vis).sum(1) / count.clamp_min(1.0), count[..., 0] > 0


def mle_prototypes(features: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """MLE prototypes [B, K, C] (eq. 2)."""
    return support_mean(features, visible)[0]


def blend(means: torch.Tensor, prior: torch.Tensor, alpha: float, rescale: bool = True) -> torch.Tensor:
    """``alpha * means + (1 - alpha) * prior`` with the prior rescaled to the
    norm of the support mean (see the module's note on scale; ``rescale=False``:
    as it is, the authors' blend); [..., C]."""
    if not rescale:
        return alpha * means + (1 - alpha) * prior
    scale = means.norm(dim=-1, keepdim=True) / prior.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return alpha * means + (1 - alpha) * prior * scale


def hungarian_assignment(means: torch.Tensor, valid: torch.Tensor, super_keypoints: torch.Tensor) -> torch.Tensor:
    """Assignment [B, K] of each valid keypoint to a distinct super-keypoint.

    Minimizes the total squared distance between the L2-normalized keypoint
    means [B, K, C] and super-keypoints [L, C] (that is, the total cosine
    distance; scipy's linear_sum_assignment, exact). Keypoints that are
    invalid, or left over when more keypoints than super-keypoints are
    valid, get -1.
    """
    unit = torch.nn.functional.normalize
    mu = unit(super_keypoints.double(), dim=-1)
    # one [B * K, L] distance matrix rather than B batches against copies of mu (10x faster at
    # B = 200; the distances agree to about 1e-15)
    flat = unit(means.double(), dim=-1).reshape(-1, means.shape[-1])
    dist = (torch.cdist(flat, mu) ** 2).reshape(*means.shape[:2], -1)
    dist = dist.cpu().numpy()
    valid_np = valid.cpu().numpy()
    out = np.full(valid_np.shape, -1, dtype=np.int64)
    for b in range(dist.shape[0]):
        rows = np.flatnonzero(valid_np[b])
        if rows.size == 0:
            continue
        r, c = linear_sum_assignment(dist[b, rows])
        out[b, rows[r]] = c
    return torch.from_numpy(out).to(means.device)


def map_prototypes(
    features: torch.Tensor, visible: torch.Tensor, super_keypoints: torch.Tensor, alpha: float = 0.5,
    rescale: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAP prototypes [B, K, C] (eq. 7) and the assignment [B, K] used (``rescale``: see :func:`blend`)."""
    means, valid = support_mean(features, visible)
    assign = hungarian_assignment(means, valid, super_keypoints)
    prior = super_keypoints[assign.clamp_min(0)]
    matched = (assign >= 0)[..., None]
    return torch.where(matched, blend(means, prior, alpha, rescale), means), assign


def escape_prototypes(
    features: torch.Tensor,
    visible: torch.Tensor,
    super_keypoints: torch.Tensor,
    log_assignment: torch.Tensor,
    alpha: float = 0.5,
    rescale: bool = True,
) -> torch.Tensor:
    """ESCAPE prototypes [B, K, C] (eq. 10; ``rescale``: see :func:`blend`).

    Args:
        log_assignment (Tensor[B, K + 1, L]): the matching network's transport
            output (ops.sinkhorn_log: a converged keypoint row sums to 1 in
            probability); the dustbin row is not used.
    """
    means, valid = support_mean(features, visible)
    k = means.shape[1]
    q = log_assignment[:, :k].exp().to(means.dtype)
    prior = q @ super_keypoints.to(means.dtype)
    return torch.where(valid[..., None], blend(means, prior, alpha, rescale), means)


def assignments(features: torch.Tensor, visible: torch.Tensor, super_keypoints: torch.Tensor,
                log_assignment: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The super-keypoint each keypoint is matched to: (index [B, K], -1
    for none; weight [B, K]). Without ``log_assignment``: the Hungarian
    assignment of MAP (weight 1); with the matching network's
    ``log_assignment`` [B, K + 1, L]: each row's most likely super-keypoint
    and its probability (for keypoints visible in some shot)."""
    means, valid = support_mean(features, visible)
    if log_assignment is None:
        index = hungarian_assignment(means, valid, super_keypoints)
        return index, (index >= 0).to(means.dtype)
    weight, index = log_assignment[:, : means.shape[1]].exp().max(-1)
    return torch.where(valid, index, torch.full_like(index, -1)), weight
