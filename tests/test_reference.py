"""The reference ops against hand-computed cases and their defining properties."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tol

from escape_fast import reference as ref


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------
# prototype heatmaps
# --------------------------------------------------------------------------
def test_prototype_heatmaps_is_the_inner_product(dtype):
    g = _gen(1)
    f = torch.randn(2, 5, 3, 4, generator=g, dtype=dtype)
    w = torch.randn(2, 3, 5, generator=g, dtype=dtype)
    h = ref.prototype_heatmaps(f, w)
    assert h.shape == (2, 3, 3, 4)
    b, k, y, x = 1, 2, 2, 3
    assert torch.allclose(h[b, k, y, x], (f[b, :, y, x] * w[b, k]).sum(), **tol(dtype))


# --------------------------------------------------------------------------
# smoothing and decoding
# --------------------------------------------------------------------------
def test_smoothing_divides_by_in_image_cells(dtype):
    m = torch.arange(9, dtype=dtype).reshape(1, 1, 3, 3)
    s = ref.smooth_heatmaps(m, kernel=3)
    # corner (0, 0): mean of cells 0, 1, 3, 4; edge (0, 1): mean of 0,1,2,3,4,5; center: mean of all
    assert s[0, 0, 0, 0].item() == pytest.approx((0 + 1 + 3 + 4) / 4)
    assert s[0, 0, 0, 1].item() == pytest.approx((0 + 1 + 2 + 3 + 4 + 5) / 6)
    assert s[0, 0, 1, 1].item() == pytest.approx(4.0)
    const = torch.full((1, 2, 20, 17), 3.5, dtype=dtype)
    assert torch.allclose(ref.smooth_heatmaps(const, 15), const, **tol(dtype))


def test_decode_hand_case_quarter_shift_and_crop_map(dtype):
    h = torch.zeros(1, 1, 16, 16, dtype=dtype)
    h[0, 0, 7, 5] = 10.0
    h[0, 0, 7, 6] = 4.0  # right neighbour larger than left -> +0.25 in x
    h[0, 0, 6, 5] = 2.0  # upper neighbour larger than lower -> -0.25 in y
    center = torch.tensor([[100.0, 50.0]], dtype=dtype)
    scale = torch.tensor([[0.64, 0.64]], dtype=dtype)  # 128 px box -> 8 px per cell
    coords, values = ref.decode_heatmaps(h, center, scale, kernel=1)
    assert values.item() == 10.0
    # x_img = x * 200 * s / W + c - 100 s = 8 x + 36 ; y_img = 8 y - 14
    assert coords[0, 0].tolist() == pytest.approx([8 * 5.25 + 36, 8 * 6.75 - 14])


def test_decode_no_shift_at_the_border_and_first_maximum_on_ties(dtype):
    h = torch.zeros(1, 2, 8, 8, dtype=dtype)
    h[0, 0, 1, 3] = 5.0  # y = 1 is not inside 1 < y < H - 1: no shift at all
    h[0, 0, 1, 4] = 1.0
    h[0, 1, 4, 6] = 2.0  # two equal maxima: the first in row-major order wins
    h[0, 1, 2, 5] = 2.0
    center = torch.tensor([[4.0, 4.0]], dtype=dtype)
    scale = torch.tensor([[8 / 200, 8 / 200]], dtype=dtype)  # 1 px per cell, origin at 0
    coords, _ = ref.decode_heatmaps(h, center, scale, kernel=1)
    assert coords[0, 0].tolist() == [3.0, 1.0]
    assert coords[0, 1].tolist() == [5.0, 2.0]
    # a constant map: the first cell
    flat = torch.ones(1, 1, 8, 8, dtype=dtype)
    c2, _ = ref.decode_heatmaps(flat, center, scale, kernel=15)
    assert c2[0, 0].tolist() == [0.0, 0.0]


def test_planted_gaussians_come_back_within_a_quarter_cell(dtype):
    g = _gen(3)
    b, k, size = 3, 12, 64
    kp = 4 + torch.rand(b, k, 2, generator=g, dtype=dtype) * (size - 8)
    maps, _ = ref.gaussian_heatmaps(kp, torch.ones(b, k), (size, size), sigma=2.0)
    center = torch.full((b, 2), size / 2, dtype=dtype)
    scale = torch.full((b, 2), size / 200, dtype=dtype)  # identity crop: image = cells
    coords, _ = ref.decode_heatmaps(maps, center, scale, kernel=1)
    err = (coords - kp).abs()
    # integer argmax (<= 0.5) then a quarter step toward the true side
    assert err.max() <= 0.25 + 1e-6, err.max()
    # the 15 x 15 smoothing keeps a broad, untruncated peak (as a network
    # predicts) in place to within half a cell, away from the border
    kp = 10 + torch.rand(b, k, 2, generator=g, dtype=dtype) * (size - 20)
    cells = torch.arange(size, dtype=dtype)
    d2 = (cells.view(1, 1, 1, -1) - kp[..., 0, None, None]) ** 2 + (cells.view(1, 1, -1, 1) - kp[..., 1, None, None]) ** 2
    broad = torch.exp(-d2 / (2 * 4.0**2))
    coords15, _ = ref.decode_heatmaps(broad, center, scale, kernel=15)
    assert (coords15 - kp).abs().max() <= 0.5 + 1e-6


def test_crop_map_round_trip_with_rotation(dtype):
    g = _gen(4)
    b = 5
    pts = torch.rand(b, 7, 2, generator=g, dtype=dtype) * 64
    center = torch.rand(b, 2, generator=g, dtype=dtype) * 500
    scale = 0.5 + torch.rand(b, 2, generator=g, dtype=dtype)
    rot = (torch.rand(b, generator=g, dtype=dtype) - 0.5) * 60
    img = ref.heatmap_to_image(pts, center, scale, (64, 64), rot)
    # invert by hand: rotate back by -rot, then undo the scaling
    off = img - center[:, None]
    th = torch.deg2rad(-rot)[:, None]
    back = torch.stack((off[..., 0] * th.cos() - off[..., 1] * th.sin(),
                        off[..., 0] * th.sin() + off[..., 1] * th.cos()), -1)
    cells = back / (200 * scale[:, None] / 64) + 32
    assert torch.allclose(cells, pts, atol=1e-4 if dtype == torch.float32 else 1e-10)
    # rotation 0 is the formula x * 200 s / W + c - 100 s (docs/method.md, "Conventions")
    flat = ref.heatmap_to_image(pts, center, scale, (64, 64))
    expect = pts * 200 * scale[:, None] / 64 + center[:, None] - 100 * scale[:, None]
    assert torch.allclose(flat, expect, **tol(dtype))


def test_heatmap_decode_is_decode_of_heatmaps(dtype):
    g = _gen(5)
    f = torch.randn(2, 6, 12, 10, generator=g, dtype=dtype)
    w = torch.randn(2, 4, 6, generator=g, dtype=dtype)
    c, s = torch.rand(2, 2, dtype=dtype) * 100, torch.rand(2, 2, dtype=dtype) + 0.5
    a = ref.heatmap_decode(f, w, c, s, 5)
    b = ref.decode_heatmaps(ref.prototype_heatmaps(f, w), c, s, 5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------
# Gaussian targets and pooling
# --------------------------------------------------------------------------
def test_gaussian_targets_window_and_weights(dtype):
    kp = torch.tensor([[[10.0, 10.0], [10.3, 20.7], [-7.0, 5.0], [30.0, 30.0]]], dtype=dtype)
    vis = torch.tensor([[1, 1, 1, 0]])
    g, w = ref.gaussian_heatmaps(kp, vis, (32, 32), sigma=2.0)
    assert w.tolist() == [[1.0, 1.0, 0.0, 0.0]]  # outside the grid's reach / invisible
    assert g[0, 0, 10, 10].item() == 1.0
    assert g[0, 0, 10, 16].item() == pytest.approx(math.exp(-36 / 8))  # 3 sigma: inside
    assert g[0, 0, 10, 17].item() == 0.0  # beyond 3 sigma: truncated
    assert g[0, 2].abs().sum() == 0 and g[0, 3].abs().sum() == 0


def test_pooling_constant_map_and_hand_value(dtype):
    f = torch.full((2, 3, 16, 16), 2.5, dtype=dtype)
    kp = torch.tensor([[[0.0, 0.0], [7.3, 9.9]], [[15.0, 3.0], [100.0, 1.0]]], dtype=dtype)
    vis = torch.tensor([[True, True], [True, True]])
    out = ref.keypoint_pool(f, kp, vis)
    assert torch.allclose(out[:, :1], torch.full_like(out[:, :1], 2.5), **tol(dtype))
    assert torch.allclose(out[0], torch.full_like(out[0], 2.5), **tol(dtype))
    assert out[1, 1].abs().sum() == 0  # window entirely outside: zero
    # a map equal to x pools to the Gaussian-weighted mean of x over the
    # truncated window |px - 7.3| <= 6, i.e. px = 2..13
    xs = torch.arange(16, dtype=dtype).expand(1, 1, 16, 16)
    o = ref.keypoint_pool(xs, torch.tensor([[[7.3, 8.0]]], dtype=dtype), torch.ones(1, 1, dtype=torch.bool))
    wts = {px: math.exp(-((px - 7.3) ** 2) / 8) for px in range(2, 14)}
    assert o.item() == pytest.approx(sum(px * w for px, w in wts.items()) / sum(wts.values()), abs=1e-5)
    o = ref.keypoint_pool(xs, torch.tensor([[[7.0, 8.0]]], dtype=dtype), torch.ones(1, 1, dtype=torch.bool))
    assert o.item() == pytest.approx(7.0, abs=1e-5)  # symmetric window


def test_pooling_invisible_is_zero_and_gradcheck():
    g = _gen(6)
    f = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64, requires_grad=True)
    kp = torch.rand(2, 4, 2, generator=g, dtype=torch.float64) * 11
    vis = torch.tensor([[True, False, True, True], [False, False, True, True]])
    out = ref.keypoint_pool(f, kp, vis)
    assert out[0, 1].abs().sum() == 0 and out[1, :2].abs().sum() == 0
    assert torch.autograd.gradcheck(lambda x: ref.keypoint_pool(x, kp, vis, 1.5), (f,))


# --------------------------------------------------------------------------
# log-domain optimal transport
# --------------------------------------------------------------------------
def _problem(b, m, n, seed, p_valid=0.8, dtype=torch.float64):
    g = _gen(seed)
    scores = torch.randn(b, m, n, generator=g, dtype=dtype)
    valid = torch.rand(b, m, generator=g) < p_valid
    bins = torch.randn(b, generator=g, dtype=dtype)
    return scores, bins, valid


def test_sinkhorn_hand_case_single_cell():
    # one keypoint, one super-keypoint: the keypoint takes all the mass and the
    # dustbin has none (mass max(N - M_valid, 0) / N = 0 -> log 0 = -inf).
    out = ref.sinkhorn_log(torch.tensor([[[1.7]]]), torch.tensor(0.3), torch.tensor([[True]]), iters=3)
    assert out[0, 0, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert out[0, 1, 0].item() == -math.inf


def test_sinkhorn_marginals_at_convergence():
    scores, bins, valid = _problem(4, 9, 20, seed=7)
    valid[3] = False  # a problem with every row masked
    out = ref.sinkhorn_log(scores, bins, valid, iters=500)
    p = out.exp()
    n = scores.shape[2]
    # each valid keypoint row sums to 1 after the +log N shift
    rows = p[:, :-1].sum(-1)
    assert torch.allclose(rows[valid], torch.ones_like(rows[valid]), atol=1e-8)
    # the dustbin row carries (N - M_valid) / N of the mass, i.e. N - M_valid after the shift
    m_valid = valid.sum(1).double()
    assert torch.allclose(p[:, -1].sum(-1), n - m_valid, atol=1e-7)
    # every column gets 1 / N (1 after the shift), counting valid rows and the dustbin only
    cols = (p[:, :-1] * valid[..., None]).sum(1) + p[:, -1]
    assert torch.allclose(cols, torch.ones_like(cols), atol=1e-8)


def test_sinkhorn_masked_rows_are_inert():
    scores, bins, valid = _problem(3, 8, 12, seed=8)
    out = ref.sinkhorn_log(scores, bins, valid)
    noisy = scores.clone()
    noisy[~valid] = torch.randn(int((~valid).sum()), 12, dtype=scores.dtype) * 50
    out2 = ref.sinkhorn_log(noisy, bins, valid)
    keep = torch.cat((valid, torch.ones(3, 1, dtype=torch.bool)), 1)
    assert torch.allclose(out[keep], out2[keep], atol=1e-12)


def _dense_sinkhorn(z, mu, nu, iters):
    """Plain-domain matrix scaling, written independently of the log version."""
    k = z.exp()
    r = torch.ones(k.shape[0], dtype=z.dtype)
    c = torch.ones(k.shape[1], dtype=z.dtype)
    for _ in range(iters):
        r = mu / (k @ c)
        c = nu / (k.T @ r)
    return r[:, None] * k * c[None, :]


def test_sinkhorn_agrees_with_dense_matrix_scaling():
    scores, bins, _ = _problem(3, 6, 15, seed=9)
    valid = torch.ones(3, 6, dtype=torch.bool)
    iters = 37  # not converged: the iteration itself must agree
    out = ref.sinkhorn_log(scores, bins, valid, iters)
    n, m = 15, 6
    for b in range(3):
        z = torch.cat((scores[b], bins[b].expand(1, n)), 0)
        mu = torch.tensor([1.0 / n] * m + [(n - m) / n], dtype=torch.float64)
        nu = torch.full((n,), 1.0 / n, dtype=torch.float64)
        p = _dense_sinkhorn(z, mu, nu, iters)
        assert torch.allclose(out[b], p.log() + math.log(n), atol=1e-10)


def test_sinkhorn_more_keypoints_than_columns_has_no_nan():
    scores, bins, valid = _problem(2, 10, 4, seed=10, p_valid=1.0)
    scores.requires_grad_(True)
    out = ref.sinkhorn_log(scores, bins, valid, iters=10)
    assert torch.isneginf(out[:, -1]).all()
    assert torch.isfinite(out[:, :-1]).all()
    out[:, :-1].sum().backward()
    assert torch.isfinite(scores.grad).all()


def test_sinkhorn_low_precision_input_computes_in_float32():
    scores, bins, valid = _problem(2, 5, 7, seed=11, dtype=torch.float32)
    out16 = ref.sinkhorn_log(scores.bfloat16(), bins.bfloat16(), valid)
    assert out16.dtype == torch.float32
    out32 = ref.sinkhorn_log(scores.bfloat16().float(), bins.bfloat16().float(), valid)
    assert torch.equal(out16, out32)


def test_sinkhorn_gradcheck():
    scores, bins, valid = _problem(2, 4, 6, seed=12)
    valid[1, 0] = False
    scores.requires_grad_(True)
    bins.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s, b: ref.sinkhorn_log(s, b, valid, iters=8), (scores, bins))


def test_fuse_shot_scores_averages_visible_shots():
    s = torch.tensor([[[[1.0], [10.0]], [[3.0], [20.0]], [[5.0], [30.0]]]])  # [1, 3 shots, 2 kp, 1]
    vis = torch.tensor([[[True, False], [True, False], [False, False]]])
    fused, valid = ref.fuse_shot_scores(s, vis)
    assert fused[0, :, 0].tolist() == [2.0, 0.0]
    assert valid.tolist() == [[True, False]]


# --------------------------------------------------------------------------
# kNN and clustering
# --------------------------------------------------------------------------
def test_knn_exclusion_ties_and_padding():
    base = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    q = torch.tensor([[1.0, 0.0]])
    sims, idx = ref.knn(q, base, k=3)
    assert idx.tolist() == [[0, 1, 3]]  # 0 and 1 tie at 1.0: lower index first
    sims, idx = ref.knn(q, base, k=5, exclude=(torch.tensor([7]), torch.tensor([7, 7, 1, 2])))
    assert idx.tolist() == [[3, 2, -1, -1, -1]]
    assert sims[0, 0].item() == pytest.approx(math.sqrt(0.5))
    assert torch.isneginf(sims[0, 2:]).all()


def _planted(n_clusters=6, n_categories=5, dim=16, noise=0.05, seed=13, drop=0.2):
    g = _gen(seed)
    centers = torch.nn.functional.normalize(torch.randn(n_clusters, dim, generator=g), dim=1)
    vecs, cats, truth = [], [], []
    for c in range(n_categories):
        for z in range(n_clusters):
            if torch.rand(1, generator=g).item() < drop:
                continue
            vecs.append(centers[z] + noise * torch.randn(dim, generator=g))
            cats.append(c)
            truth.append(z)
    return torch.stack(vecs), torch.tensor(cats), torch.tensor(truth)


def test_clustering_recovers_planted_clusters():
    vecs, cats, truth = _planted()
    sk, assign = ref.cluster_keypoints(vecs, cats, threshold=0.8, k=3)
    # same partition as the truth (labels may be renumbered)
    for a in range(len(truth)):
        for b in range(len(truth)):
            assert (assign[a] == assign[b]) == (truth[a] == truth[b])
    # super-keypoint = mean of members
    for z in range(sk.shape[0]):
        assert torch.allclose(sk[z], vecs[assign == z].mean(0), atol=1e-6)


def test_clustering_rules_on_random_vectors():
    g = _gen(14)
    vecs = torch.randn(120, 8, generator=g)
    cats = torch.randint(0, 6, (120,), generator=g)
    sk, assign = ref.cluster_keypoints(vecs, cats, threshold=0.5, k=6)
    assert assign.shape == (120,) and (assign >= 0).all()  # every vector assigned once
    assert sk.shape[0] == int(assign.max()) + 1
    for z in range(sk.shape[0]):
        members = cats[assign == z]
        assert len(members) == len(set(members.tolist()))  # one per category
    sk2, assign2 = ref.cluster_keypoints(vecs, cats, threshold=0.5, k=6)
    assert torch.equal(assign, assign2) and torch.equal(sk, sk2)  # deterministic


def test_clustering_threshold_one_gives_singletons():
    vecs, cats, _ = _planted()
    sk, assign = ref.cluster_keypoints(vecs, cats, threshold=1.0)
    assert sk.shape[0] == len(vecs)
    # the highest-density vector founds cluster 0; with no density all are ordered by index
    assert assign.tolist() == list(range(len(vecs)))


def _at_angles(degrees):
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], 1)


def test_clustering_growth_rules_by_hand():
    # P (category 0) at 0 deg, Q (2) at 30, b1 (1) at 20, b2 (1) at -25; cosine = cos(angle)
    vecs, cats = _at_angles([0.0, 30.0, 20.0, -25.0]), torch.tensor([0, 2, 1, 1])
    # densities (above 0.8): b1 (.985, .940) > Q (.985, .866) > b2 (.906) > P (.940, .906, .866)
    # b1 founds cluster 0 and takes Q and P; b2 founds cluster 1, where only P is above 0.8:
    # "exclusive" leaves P with b1, "shared" (the authors' rule) moves it to b2
    _, exclusive = ref.cluster_keypoints(vecs, cats, threshold=0.8, k=6, growth="exclusive")
    assert exclusive.tolist() == [0, 0, 0, 1]
    sk, shared = ref.cluster_keypoints(vecs, cats, threshold=0.8, k=6, growth="shared")
    assert shared.tolist() == [1, 0, 0, 1]
    torch.testing.assert_close(sk[1], (vecs[0] + vecs[3]) / 2)
    with pytest.raises(ValueError, match="growth"):
        ref.cluster_keypoints(vecs, cats, growth="greedy")


def test_drop_empty_clusters_keeps_the_order():
    assign, n = ref.drop_empty_clusters(torch.tensor([0, 3, 3, 1]), 5)
    assert assign.tolist() == [0, 2, 2, 1] and n == 3
