"""The super-keypoint prior: base keypoints, their mean features, and mu.

Stage 2 clusters the mean feature of every base keypoint (paper eq. 4);
stage 3 starts its super-keypoint detectors from the mean of their members'
stage-1 prototypes. When it ends, the prior mu of each super-keypoint is
either that detector (``prior_source: detectors``, the default, as in the
authors' code) or the mean of its members' mean features under the
fine-tuned extractor (``prior_source: features``, paper sec. 4.1-4.2;
:func:`feature_prior`); docs/method.md, "The prior". The figures use the
members' mean features.

Base keypoints are numbered category by category (id order), keypoint by
keypoint: :func:`base_keypoint_table` maps (category, keypoint) to that
number.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from escape_fast.data import KeypointDataset, make_loader
from escape_fast.errors import DataError


def base_keypoint_table(coco) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(table [categories, Kpad] -> global base keypoint index (-1: none),
    category of each base keypoint [P], keys [(category_id, k)])."""
    cats = coco.category_ids
    table = torch.full((len(cats), coco.max_keypoints), -1, dtype=torch.long)
    owner, keys = [], []
    for ci, c in enumerate(cats):
        for k in range(coco.categories[c].num_keypoints):
            table[ci, k] = len(keys)
            owner.append(c)
            keys.append((c, k))
    return table, torch.tensor(owner), keys


@torch.no_grad()
def base_keypoint_means(extractor, coco, device, input_size: int, sigma: float, batch_size: int = 16,
                        workers: int = 0, amp: bool = True, instances=None, unit: bool = False,
                        progress: bool = False, pooling: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean pooled feature of every base keypoint over the instances where it
    is visible (eq. 4): (vectors [P, C], seen [P] bool), in the order of
    :func:`base_keypoint_table`. ``instances`` limits the instances used;
    ``unit`` averages the L2-normalized features instead (directions);
    ``pooling`` is the model's convention (config ``pooling``)."""
    from tqdm.auto import tqdm

    from escape_fast.models.escape import extract, pool_keypoints

    table, _, keys = base_keypoint_table(coco)
    dataset = KeypointDataset(coco, input_size=input_size, train=False, sigma=sigma)
    if instances is not None:
        dataset = torch.utils.data.Subset(dataset, list(instances))
    loader = make_loader(dataset, batch_size, num_workers=workers)
    extractor.eval()
    sums, counts = None, torch.zeros(len(keys), device=device)
    table = table.to(device)
    for batch in tqdm(loader, desc="base keypoint features", disable=not progress, leave=False):
        features, _ = extract(extractor, batch["image"].to(device), amp=amp)
        pooled, vis = pool_keypoints(features, batch["keypoints"].to(device), batch["visible"].to(device), sigma,
                                     pooling)
        if unit:
            pooled = F.normalize(pooled, dim=-1)
        if sums is None:
            sums = torch.zeros(len(keys), pooled.shape[-1], device=device)
        rows = table[batch["category_index"].to(device)]
        use = vis & (rows >= 0)
        sums.index_add_(0, rows[use], pooled[use])
        counts.index_add_(0, rows[use], torch.ones_like(rows[use], dtype=counts.dtype))
    if sums is None:
        raise DataError(f"{coco.path}: no instances to compute base keypoint features from")
    return sums / counts.clamp_min(1)[:, None], counts > 0


def member_mean(vectors: torch.Tensor, assignment: torch.Tensor, num_super: int) -> torch.Tensor:
    """Mean [L, C] of the members' vectors (``assignment`` [P], -1 for
    keypoints left out; a super-keypoint without members stays 0). Stage 3
    starts from the mean of the members' stage-1 prototypes;
    :func:`feature_prior` takes the mean of their mean features.

    Why the prototypes and not the clustered vectors: when the clusters were
    made from mean features (cluster.source: features), those vectors are at
    the features' scale, ~20x the prototypes' on the built-in model, and
    heatmaps that start 400x too large wreck the first epochs; the members'
    prototypes have the heatmap's scale by construction.
    """
    used = assignment >= 0
    sums = torch.zeros(num_super, vectors.shape[1], dtype=vectors.dtype)
    sums.index_add_(0, assignment[used], vectors[used])
    counts = torch.bincount(assignment[used], minlength=num_super).clamp_min(1)
    return sums / counts[:, None].to(vectors.dtype)


@torch.no_grad()
def feature_prior(extractor, coco, device, assignment, num_super: int, input_size: int, sigma: float,
                  batch_size: int = 16, workers: int = 0, amp: bool = True, instances=None,
                  pooling: str = "exact") -> torch.Tensor:
    """Super-keypoints mu [L, C] in feature space (sec. 4.1-4.2).

    Sec. 4.1 models the features of keypoint r as o ~ N(zeta_r, phi^2) and
    zeta_r ~ N(mu_z, sigma^2): mu_z is the mean of its members' means zeta_r
    (eq. 4), here under the fine-tuned extractor. The adaptation matches and
    blends directions (models/adapt.py), so zeta_r is the mean of keypoint
    r's L2-normalized features. ``instances`` limits the images used.
    """
    zeta, seen = base_keypoint_means(extractor, coco, device, input_size, sigma, batch_size, workers, amp,
                                     instances, unit=True, pooling=pooling)
    member = seen.cpu() & (assignment >= 0)
    mu = member_mean(zeta.cpu(), torch.where(member, assignment, -1), num_super)
    empty = int((torch.bincount(assignment[member], minlength=num_super) == 0).sum())
    if empty:  # their members never appear visible in the training images: mu = 0, a prior of no direction
        print(f"[finetune] {empty} of {num_super} super-keypoints have no visible member; their mu is 0",
              flush=True)
    return mu
