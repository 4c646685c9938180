"""Plain-PyTorch reference of every escape_fast op: the written specification.

Every fast backend (C++ CPU, CUDA, Triton) is tested against these functions.
They favour clarity over speed, work in float32 and float64, and are
differentiable by autograd where the op has a gradient. Shapes follow docs/method.md:
B batch, C channels, H x W heatmap grid, K keypoints, L super-keypoints.

Conventions shared by all backends
----------------------------------
* Heatmap cell (x, y) has integer coordinates; keypoints given "in heatmap-cell
  units" are float (x, y) pairs in that frame.
* A crop is described as in mmpose 0.x: ``center`` [B, 2] in original image
  pixels, ``scale`` [B, 2] = padded box size / 200, ``rotation`` [B] in degrees.
  Heatmap point p maps to the image as
  ``center + R(rotation) @ ((p - [W/2, H/2]) * 200 * scale / [W, H])``,
  which for rotation 0 is ``x * 200 s_x / W + c_x - 100 s_x``.
* The Gaussian of a keypoint at (x, y) is
  ``exp(-((px - x)^2 + (py - y)^2) / (2 sigma^2))`` on the cells with
  ``|px - x| <= 3 sigma`` and ``|py - y| <= 3 sigma`` (zero elsewhere), the
  truncation every heatmap codebase uses; pooling only reads that window.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# mmpose's unit of crop scale: a crop's ``scale`` is its padded box size / PIXEL_STD pixels. The
# C++/CUDA kernels (csrc/heatmap_common.h) and the Triton kernel (kernels/heatmap.py) use the same.
PIXEL_STD = 200.0

__all__ = [
    "cluster_keypoints",
    "decode_heatmaps",
    "fuse_shot_scores",
    "gaussian_heatmaps",
    "heatmap_decode",
    "heatmap_to_image",
    "keypoint_pool",
    "knn",
    "prototype_heatmaps",
    "sinkhorn_log",
    "smooth_heatmaps",
]


# --------------------------------------------------------------------------
# a. prototype heatmaps (eq. 1)
# --------------------------------------------------------------------------
def prototype_heatmaps(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """features [B, C, H, W], prototypes [B, K, C] -> heatmaps [B, K, H, W]."""
    return torch.einsum("bchw,bkc->bkhw", features, prototypes)


# --------------------------------------------------------------------------
# b. decoding
# --------------------------------------------------------------------------
def smooth_heatmaps(heatmaps: torch.Tensor, kernel: int = 15) -> torch.Tensor:
    """Mean filter over the in-image part of a kernel x kernel window.

    Zero padding, divided by the number of in-image cells (not kernel^2), so a
    constant map stays constant up to its border.
    """
    b, k, h, w = heatmaps.shape
    flat = heatmaps.reshape(b * k, 1, h, w)
    pad = kernel // 2
    box = torch.ones(1, 1, kernel, kernel, dtype=heatmaps.dtype, device=heatmaps.device)
    summed = F.conv2d(flat, box, padding=pad)
    ones = torch.ones(1, 1, h, w, dtype=heatmaps.dtype, device=heatmaps.device)
    count = F.conv2d(ones, box, padding=pad)
    return (summed / count).reshape(b, k, h, w)


def heatmap_to_image(
    points: torch.Tensor,
    center: torch.Tensor,
    scale: torch.Tensor,
    heatmap_size: tuple[int, int],
    rotation: torch.Tensor | None = None,
) -> torch.Tensor:
    """Map heatmap-cell coordinates [B, K, 2] back to original image pixels.

    heatmap_size is (W, H), the convention of escape_fast.data (and mmpose).
    center, scale [B, 2]; rotation [B] degrees or None.
    """
    w, h = heatmap_size
    size = torch.tensor([w, h], dtype=points.dtype, device=points.device)
    offset = (points - size / 2) * (PIXEL_STD * scale[:, None, :] / size)
    if rotation is not None:
        theta = torch.deg2rad(rotation.to(points.dtype))
        cos, sin = torch.cos(theta)[:, None], torch.sin(theta)[:, None]
        ox, oy = offset[..., 0], offset[..., 1]
        offset = torch.stack((ox * cos - oy * sin, ox * sin + oy * cos), dim=-1)
    return offset + center[:, None, :]


def decode_heatmaps(
    heatmaps: torch.Tensor,
    center: torch.Tensor,
    scale: torch.Tensor,
    kernel: int = 15,
    rotation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Heatmaps [B, K, H, W] -> (image coordinates [B, K, 2], peak values [B, K]).

    1. smooth with the kernel x kernel in-image mean filter;
    2. argmax, the first maximum in row-major order on ties;
    3. when 1 < x < W - 1 and 1 < y < H - 1, shift x by
       0.25 * sign(h[y, x+1] - h[y, x-1]) and y likewise, on the smoothed map;
    4. map back through the crop (heatmap_to_image).
    The peak value is the smoothed map at the integer argmax, or NaN when
    the smoothed map holds a NaN or an infinity (the public ops read the
    peaks to learn of non-finite input).
    """
    b, k, h, w = heatmaps.shape
    smooth = smooth_heatmaps(heatmaps, kernel)
    flat = smooth.reshape(b, k, h * w)
    values, index = flat.max(dim=-1)  # torch returns the first maximum on ties
    values = torch.where(torch.isfinite(flat).all(-1), values, torch.nan)
    x = index % w
    y = index // w
    coords = torch.stack((x, y), dim=-1).to(heatmaps.dtype)
    inside = (x > 1) & (x < w - 1) & (y > 1) & (y < h - 1)
    xr = x.clamp(1, w - 2)
    yr = y.clamp(1, h - 2)

    def at(yy, xx):
        return flat.gather(-1, (yy * w + xx).unsqueeze(-1)).squeeze(-1)

    dx = torch.sign(at(y, xr + 1) - at(y, xr - 1))
    dy = torch.sign(at(yr + 1, x) - at(yr - 1, x))
    shift = 0.25 * torch.stack((dx, dy), dim=-1) * inside.unsqueeze(-1)
    coords = coords + shift
    return heatmap_to_image(coords, center, scale, (w, h), rotation), values


def heatmap_decode(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    center: torch.Tensor,
    scale: torch.Tensor,
    kernel: int = 15,
    rotation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """decode_heatmaps(prototype_heatmaps(features, prototypes), ...)."""
    return decode_heatmaps(prototype_heatmaps(features, prototypes), center, scale, kernel, rotation)


# --------------------------------------------------------------------------
# c. Gaussian targets and Gaussian-weighted keypoint pooling
# --------------------------------------------------------------------------
def gaussian_heatmaps(
    keypoints: torch.Tensor,
    visible: torch.Tensor,
    heatmap_size: tuple[int, int],
    sigma: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated Gaussians [B, K, H, W] and target weights [B, K].

    keypoints [B, K, 2] in heatmap-cell units, visible [B, K] (bool or 0/1);
    heatmap_size is (W, H).
    A keypoint gets weight 0 (and an all-zero map) when it is invisible or its
    3-sigma window holds no cell of the grid.
    """
    w, h = heatmap_size
    dtype = keypoints.dtype if keypoints.is_floating_point() else torch.float32
    kp = keypoints.to(dtype)
    xs = torch.arange(w, dtype=dtype, device=kp.device)
    ys = torch.arange(h, dtype=dtype, device=kp.device)
    dx = xs.view(1, 1, 1, w) - kp[..., 0, None, None]
    dy = ys.view(1, 1, h, 1) - kp[..., 1, None, None]
    radius = 3.0 * sigma
    window = (dx.abs() <= radius) & (dy.abs() <= radius)
    g = torch.exp(-(dx * dx + dy * dy) / (2.0 * sigma * sigma)) * window
    weight = (visible.to(dtype) > 0) & window.flatten(2).any(-1)
    g = g * weight[..., None, None]
    return g, weight.to(dtype)


def keypoint_pool(
    features: torch.Tensor,
    keypoints: torch.Tensor,
    visible: torch.Tensor,
    sigma: float = 2.0,
) -> torch.Tensor:
    """Gaussian-weighted keypoint features (docs/method.md, "Keypoint features"): [B, C, H, W] -> [B, K, C].

    o_r = sum_p F[:, p] G_r[p] / sum_p G_r[p]; zero for keypoints with weight 0.
    """
    _, _, h, w = features.shape
    g, weight = gaussian_heatmaps(keypoints.to(features.dtype), visible, (w, h), sigma)
    norm = g.sum(dim=(-2, -1)).clamp_min(torch.finfo(features.dtype).tiny)
    pooled = torch.einsum("bchw,bkhw->bkc", features, g) / norm[..., None]
    return pooled * weight[..., None]


# --------------------------------------------------------------------------
# d. log-domain optimal transport with a dustbin row (docs/method.md, "Matching network")
# --------------------------------------------------------------------------
def sinkhorn_log(
    scores: torch.Tensor,
    bin_score: torch.Tensor,
    valid: torch.Tensor,
    iters: int = 50,
) -> torch.Tensor:
    """Log assignment [B, M + 1, N] from scores [B, M, N] (rows: keypoints).

    Row M is the dustbin, whose coupling score is ``bin_score`` (a tensor of
    one element, or [B]). Marginals: each valid row 1/N, the dustbin
    max(N - M_valid, 0)/N, each column 1/N. Invalid rows keep potential 0 and
    are left out of every column sum. Starting from zero potentials, each
    iteration updates the row potentials, then the column potentials. The
    result ``Z + u + v + log N`` makes a converged valid row sum to 1; an
    invalid row is ``Z + v + log N`` (it carries no meaning). Computed in at
    least float32, whatever the input dtype.
    """
    work = torch.promote_types(scores.dtype, torch.float32)
    z_kp = scores.to(work)
    b, m, n = z_kp.shape
    bins = bin_score.to(work).reshape(-1).expand(b) if bin_score.numel() == 1 else bin_score.to(work)
    z = torch.cat((z_kp, bins[:, None, None].expand(b, 1, n)), dim=1)  # [B, M+1, N]
    row_on = torch.cat((valid.bool(), torch.ones(b, 1, dtype=torch.bool, device=valid.device)), dim=1)

    log_n = math.log(n)
    m_valid = valid.bool().sum(dim=1).to(work)
    log_mu = torch.full((b, m + 1), -log_n, dtype=work, device=z.device)
    bin_mass = (n - m_valid).clamp_min(0.0)
    log_mu = torch.cat((log_mu[:, :m], torch.log(bin_mass)[:, None] - log_n), dim=1)
    log_nu = torch.full((b, n), -log_n, dtype=work, device=z.device)

    u = torch.zeros(b, m + 1, dtype=work, device=z.device)
    v = torch.zeros(b, n, dtype=work, device=z.device)
    neg_inf = torch.tensor(-math.inf, dtype=work, device=z.device)
    for _ in range(iters):
        u_new = log_mu - torch.logsumexp(z + v[:, None, :], dim=2)
        u = torch.where(row_on, u_new, torch.zeros_like(u_new))
        col_terms = torch.where(row_on[:, :, None], z + u[:, :, None], neg_inf)
        v = log_nu - torch.logsumexp(col_terms, dim=1)
    return z + u[:, :, None] + v[:, None, :] + log_n


def fuse_shot_scores(scores: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average score matrices over shots before the transport (docs/method.md, "Matching network").

    scores [B, S, M, N], visible [B, S, M] -> (scores [B, M, N], valid [B, M]).
    Each keypoint row is the mean over the shots in which it is visible; a
    keypoint visible in no shot gets a zero row and valid False.
    """
    vis = visible.to(scores.dtype)[..., None]
    count = vis.sum(dim=1)
    fused = (scores * vis).sum(dim=1) / count.clamp_min(1.0)
    return fused, count[..., 0] > 0


# --------------------------------------------------------------------------
# e. kNN and density-peaks clustering (docs/method.md, "Clustering")
# --------------------------------------------------------------------------
def _cosine(queries: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    return F.normalize(queries, dim=1) @ F.normalize(base, dim=1).T


def knn(
    queries: torch.Tensor,
    base: torch.Tensor,
    k: int,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine neighbours of each query row among the base rows.

    queries [N, C], base [M, C]; exclude = (query_labels [N], base_labels [M])
    forbids pairs with equal labels (the same-category rule). Returns
    (similarities [N, k] descending, indices [N, k] int64); ties go to the
    lower base index, and slots without a candidate hold (-inf, -1).
    """
    sim = _cosine(queries, base)
    if exclude is not None:
        qlab, blab = exclude
        sim = sim.masked_fill(qlab[:, None] == blab[None, :], -math.inf)
    n, m = sim.shape
    take = min(k, m)
    vals, idx = torch.sort(sim, dim=1, descending=True, stable=True)
    vals, idx = vals[:, :take], idx[:, :take]
    idx = idx.masked_fill(torch.isinf(vals), -1)
    if take < k:
        vals = torch.cat((vals, vals.new_full((n, k - take), -math.inf)), dim=1)
        idx = torch.cat((idx, idx.new_full((n, k - take), -1)), dim=1)
    return vals, idx


def drop_empty_clusters(assignment: torch.Tensor, n_clusters: int) -> tuple[torch.Tensor, int]:
    """(assignment renumbered without the clusters that have no member, in
    their order, the number left); "shared" growth can empty a cluster."""
    present = torch.bincount(assignment, minlength=n_clusters) > 0
    new_id = torch.cumsum(present.long(), 0) - 1
    return new_id[assignment], int(present.sum())


def cluster_keypoints(vectors: torch.Tensor, categories: torch.Tensor, threshold: float = 0.8, k: int = 6,
                      growth: str = "exclusive") -> tuple[torch.Tensor, torch.Tensor]:
    """kNN density-peaks clustering with the same-category rule (docs/method.md, "Clustering").

    vectors [N, C], categories [N] -> (super-keypoints [L, C], assignment [N]).
    Cosine similarity with same-category pairs forbidden; density = mean of the
    top-k similarities that exceed ``threshold`` (0 when none does). Until all
    are assigned, the unassigned vector of highest density (lowest index on
    ties) founds a cluster and takes its neighbours with similarity above the
    threshold, most similar first, never two of one category: with growth
    "exclusive" only unassigned ones (a category whose best is taken gives
    its next), with "shared" (the authors' rule) each category's most similar
    one even if it is assigned already, which moves it to the new cluster;
    clusters left with no member are dropped. Super-keypoint = mean of its
    members' vectors. Clusters are numbered in order of creation. Dense
    N x N: for the reference and small N only.
    """
    if growth not in ("exclusive", "shared"):
        raise ValueError(f"cluster_keypoints: growth must be 'exclusive' or 'shared', got {growth!r}")
    n = vectors.shape[0]
    if n == 0:
        return vectors.new_zeros(0, vectors.shape[1]), torch.zeros(0, dtype=torch.long, device=vectors.device)
    sim = _cosine(vectors, vectors)
    same = categories[:, None] == categories[None, :]
    sim = sim.masked_fill(same, -math.inf)  # also forbids i == i

    top, _ = knn(vectors, vectors, k, exclude=(categories, categories))
    above = top > threshold
    density = torch.where(above, top, torch.zeros_like(top)).sum(1) / above.sum(1).clamp_min(1)

    sim_cpu = sim.detach().cpu()
    order = sorted(range(n), key=lambda i: (-float(density[i]), i))
    cats = categories.detach().cpu().tolist()
    assignment = [-1] * n
    n_clusters = 0
    for peak in order:
        if assignment[peak] >= 0:
            continue
        assignment[peak] = n_clusters
        used = {cats[peak]}
        row = sim_cpu[peak]
        cand_vals, cand_idx = torch.sort(row, descending=True, stable=True)
        for s, j in zip(cand_vals.tolist(), cand_idx.tolist()):
            if not s > threshold:
                break
            if (growth == "shared" or assignment[j] < 0) and cats[j] not in used:
                assignment[j] = n_clusters
                used.add(cats[j])
        n_clusters += 1
    assign, n_clusters = drop_empty_clusters(torch.tensor(assignment, dtype=torch.long), n_clusters)
    assign = assign.to(vectors.device)
    sums = torch.zeros(n_clusters, vectors.shape[1], dtype=vectors.dtype, device=vectors.device)
    sums.index_add_(0, assign, vectors)
    counts = torch.bincount(assign, minlength=n_clusters).to(vectors.dtype)
    return sums / counts[:, None], assign
