"""escape_fast.neighbors: kNN with label exclusion and density-peaks clustering vs the reference."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, tol

from escape_fast import neighbors, ops, reference

needs_faiss = pytest.mark.skipif(not neighbors.HAVE_FAISS, reason=f"faiss not importable ({neighbors.FAISS_ERROR})")

# (backend, FAISS index): every exact path of neighbors.knn / cluster_keypoints
EXACT_PATHS = [
    pytest.param(("cpu", "auto"), id="torch-cpu"),
    pytest.param(
        ("cuda", "auto"), id="torch-cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
    ),
    pytest.param(("faiss", "flat"), id="faiss-flat", marks=needs_faiss),
    # IVF visiting every list is an exact search through the IVF + IDSelector code
    pytest.param(("faiss", "ivf-all"), id="faiss-ivf-all-lists", marks=needs_faiss),
]


def _options(path, m):
    backend, index = path
    if index == "ivf-all":
        nlist = max(1, min(8, m // 40))
        return backend, {"index": "ivf", "nlist": nlist, "nprobe": nlist}
    if backend == "faiss":
        return backend, {"index": index}
    return backend, {}


def _device(path):
    return torch.device("cuda" if path[0] == "cuda" else "cpu")


def planted(n_centers, per, n_cats, dim, noise=0.35, extra=0, dtype=torch.float64, seed=0):
    """Vectors around random centers (cosine within a center ~0.9) plus pure noise."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_centers, dim, generator=g, dtype=dtype)
    v = centers.repeat_interleave(per, 0) + noise * torch.randn(n_centers * per, dim, generator=g, dtype=dtype)
    v = torch.cat((v, torch.randn(extra, dim, generator=g, dtype=dtype)))
    cats = torch.randint(0, n_cats, (v.shape[0],), generator=g)
    perm = torch.randperm(v.shape[0], generator=g)
    return v[perm], cats[perm]


def assert_knn_equal(got, want, dtype):
    """Same indices (up to exact near-ties of the reference) and close values."""
    gv, gi = got
    wv, wi = want
    assert gv.shape == wv.shape and gi.dtype == torch.long
    assert torch.equal(torch.isinf(gv), torch.isinf(wv))
    assert torch.equal(gi == -1, torch.isinf(wv))
    finite = torch.isfinite(wv)
    torch.testing.assert_close(gv[finite], wv[finite], **(tol(dtype) if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}))
    bad = (gi != wi).nonzero()
    for r, j in bad.tolist():  # only where the reference has a near-tie at that slot
        row = wv[r, torch.isfinite(wv[r])]
        gaps = (row - wv[r, j]).abs()
        assert (gaps < 1e-6).sum() > 1, f"row {r} slot {j}: got {gi[r, j]}, want {wi[r, j]}"


# --------------------------------------------------------------------------
# knn
# --------------------------------------------------------------------------
@pytest.mark.parametrize("path", EXACT_PATHS)
@pytest.mark.parametrize("n_centers, per, extra, k", [(10, 6, 20, 5), (40, 10, 100, 16)])
@pytest.mark.parametrize("with_labels", [True, False], ids=["exclude", "plain"])
def test_knn_matches_reference(path, n_centers, per, extra, k, with_labels, dtype):
    v, cats = planted(n_centers, per, 6, 24, extra=extra, dtype=dtype, seed=n_centers)
    device = _device(path)
    v, cats = v.to(device), cats.to(device)
    queries, qcats = v[: len(v) // 2], cats[: len(v) // 2]
    exclude = (qcats, cats) if with_labels else None
    backend, opts = _options(path, len(v))
    got = neighbors.knn(queries, v, k, exclude, backend=backend, **opts)
    assert_knn_equal(got, reference.knn(queries, v, k, exclude), dtype)


@pytest.mark.parametrize("path", EXACT_PATHS)
def test_knn_fewer_candidates_than_k(path, dtype):
    v, cats = planted(3, 4, 3, 8, dtype=dtype)  # 12 vectors, 3 categories
    device = _device(path)
    v, cats = v.to(device), cats.to(device)
    backend, opts = _options(path, len(v))
    for k in (11, 12, 20):
        got = neighbors.knn(v, v, k, (cats, cats), backend=backend, **opts)
        want = reference.knn(v, v, k, (cats, cats))
        assert_knn_equal(got, want, dtype)
        assert torch.isinf(got[0][:, -1]).all()  # every row is padded
    # a query label absent from the base, and a base of one label only
    got = neighbors.knn(v, v[:5], 3, (torch.full_like(cats, 99), torch.zeros_like(cats[:5])), backend=backend, **opts)
    assert_knn_equal(got, reference.knn(v, v[:5], 3, (torch.full_like(cats, 99), torch.zeros_like(cats[:5]))), dtype)
    got = neighbors.knn(v, v[:5], 3, (torch.zeros_like(cats), torch.zeros_like(cats[:5])), backend=backend, **opts)
    assert (got[1] == -1).all() and torch.isinf(got[0]).all()


def _sign_vectors(n, dim, g):
    """Rows with four entries +-1 (norm 2): normalized dot products are
    multiples of 1/4, exact in any summation order, so ties are exact."""
    x = torch.zeros(n, dim, dtype=torch.float64)
    for r in range(n):
        cols = torch.randperm(dim, generator=g)[:4]
        x[r, cols] = torch.randint(0, 2, (4,), generator=g).double() * 2 - 1
    return x


@pytest.mark.parametrize("path", EXACT_PATHS)
def test_knn_ties_go_to_the_lower_index(path, dtype):
    g = torch.Generator().manual_seed(1)
    base = _sign_vectors(40, 6, g).to(dtype)
    queries = _sign_vectors(12, 6, g).to(dtype)
    labels, qlabels = torch.arange(40) % 3, torch.arange(12) % 4
    device = _device(path)
    backend, opts = _options(path, len(base))
    for exclude in (None, (qlabels, labels)):
        want = reference.knn(queries, base, 9, exclude)
        assert (want[0][:, 1:] == want[0][:, :-1]).any()  # the case is exercised
        ex = None if exclude is None else (exclude[0].to(device), exclude[1].to(device))
        vals, idx = neighbors.knn(queries.to(device), base.to(device), 9, ex, backend=backend, **opts)
        assert torch.equal(idx.cpu(), want[1])
        assert torch.equal(vals.cpu(), want[0])


def test_knn_through_public_op_and_backend_errors():
    v, cats = planted(5, 4, 3, 8, dtype=torch.float32)
    want = reference.knn(v, v, 4, (cats, cats))
    for backend in ("auto", "cpu"):
        assert_knn_equal(ops.knn(v, v, 4, (cats, cats), backend=backend), want, torch.float32)
    with pytest.raises(ops.BackendUnavailable, match="cuda"):
        ops.knn(v, v, 4, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):  # no Triton kNN kernel: not a backend
        ops.knn(v, v, 4, backend="triton")
    empty = neighbors.knn(v[:0], v, 3, backend="cpu")
    assert empty[0].shape == (0, 3) and empty[1].shape == (0, 3)


def test_torch_block_merge_and_tie_repair():
    """Small blocks: many block merges, and a block whose k-th value is tied."""
    g = torch.Generator().manual_seed(2)
    base = _sign_vectors(63, 5, g)  # few distinct similarities: many exact ties
    queries = _sign_vectors(20, 5, g)
    labels = torch.arange(63) % 4
    qlabels = torch.arange(20) % 5
    searcher = neighbors.TorchSearcher(base, labels, torch.float64)
    searcher.block_q, searcher.block_b = 8, 10
    repaired = []
    block_topk = searcher._block_topk

    def spy(sim, k):  # record blocks whose k-th value is tied beyond topk's picks
        kth = sim.topk(min(k, sim.shape[1]), dim=1).values[:, -1:]
        repaired.append(bool(((sim == kth).sum(1) > 1).any()))
        return block_topk(sim, k)

    searcher._block_topk = spy
    got = searcher.search(queries, qlabels, 6)
    want = reference.knn(queries, base, 6, (qlabels, labels))
    assert any(repaired)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


# --------------------------------------------------------------------------
# cluster_keypoints
# --------------------------------------------------------------------------
def assert_valid_clustering(vectors, cats, result, threshold, growth="exclusive"):
    supers, assign = result
    n = len(vectors)
    assert assign.shape == (n,) and assign.dtype == torch.long
    n_clusters = supers.shape[0]
    assert n == 0 or (assign.min() >= 0 and assign.max() == n_clusters - 1)
    sizes = torch.bincount(assign, minlength=n_clusters)
    assert (sizes > 0).all()  # every cluster has a member; every vector exactly one cluster
    for c in range(n_clusters):  # same-category rule
        members = cats[assign == c]
        assert len(members.unique()) == len(members)
    sums = torch.zeros_like(supers).index_add_(0, assign, vectors)
    torch.testing.assert_close(supers, sums / sizes[:, None].to(vectors.dtype))
    if growth == "shared":  # a later peak may take a cluster's founder: the rule below need not hold
        return
    # every member of a cluster is above the threshold with some other member
    unit = torch.nn.functional.normalize(vectors, dim=1)
    for c in range(min(n_clusters, 30)):
        idx = (assign == c).nonzero().squeeze(1)
        if len(idx) > 1:
            sim = unit[idx] @ unit[idx].T
            assert (sim.fill_diagonal_(-2).max(1).values > threshold).all()


@pytest.mark.parametrize("path", EXACT_PATHS)
@pytest.mark.parametrize(
    "n_centers, per, n_cats, extra, k_grow",
    [(8, 5, 4, 10, None), (30, 12, 8, 50, None), (30, 12, 8, 50, 2), (60, 20, 25, 0, 4)],
    ids=["tiny", "medium", "medium-requery", "many-cats-requery"],
)
@pytest.mark.parametrize("growth", ["exclusive", "shared"])
def test_cluster_matches_reference(path, n_centers, per, n_cats, extra, k_grow, growth, dtype, monkeypatch):
    v, cats = planted(n_centers, per, n_cats, 16, extra=extra, dtype=dtype, seed=per)
    device = _device(path)
    backend, opts = _options(path, len(v))
    # count the single-peak re-queries (list used up while still above the threshold)
    calls = []
    make = neighbors.make_searcher

    def counting(*args, **kwargs):
        s = make(*args, **kwargs)
        search = s.search
        s.search = lambda q, lab, k: calls.append(len(q)) or search(q, lab, k)
        return s

    monkeypatch.setattr(neighbors, "make_searcher", counting)
    got = neighbors.cluster_keypoints(v.to(device), cats.to(device), 0.8, 6, backend=backend, k_grow=k_grow,
                                      growth=growth, **opts)
    want = reference.cluster_keypoints(v, cats, 0.8, 6, growth)
    assert torch.equal(got[1].cpu(), want[1])
    torch.testing.assert_close(got[0].cpu(), want[0], **tol(dtype))
    assert_valid_clustering(v, cats, (got[0].cpu(), got[1].cpu()), 0.8, growth)
    assert want[0].shape[0] < len(v) * 0.7  # the planted clusters were found (not all singletons)
    if k_grow is not None:
        assert calls.count(1) > 0, "expected re-queries of peaks whose list ran out"


@pytest.mark.parametrize("path", EXACT_PATHS)
def test_cluster_edge_cases(path):
    device = _device(path)
    backend, opts = _options(path, 5)
    v = torch.randn(5, 4, dtype=torch.float64, device=device)
    # one category: no pair is allowed, every vector is its own cluster, in density order (all 0: index order)
    supers, assign = neighbors.cluster_keypoints(v, torch.zeros(5, dtype=torch.long, device=device), backend=backend, **opts)
    assert torch.equal(assign.cpu(), torch.arange(5)) and torch.equal(supers, v)
    supers, assign = neighbors.cluster_keypoints(v[:0], torch.zeros(0, dtype=torch.long, device=device), backend=backend)
    assert supers.shape == (0, 4) and assign.shape == (0,)
    supers, assign = neighbors.cluster_keypoints(v[:1], torch.zeros(1, dtype=torch.long, device=device), backend=backend, **opts)
    assert torch.equal(assign.cpu(), torch.zeros(1, dtype=torch.long))
    # identical vectors of distinct categories: one cluster
    same = v[:1].expand(4, 4).clone()
    supers, assign = neighbors.cluster_keypoints(same, torch.arange(4, device=device), backend=backend, **opts)
    assert torch.equal(assign.cpu(), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("backend", ["cpu", pytest.param("faiss", marks=needs_faiss)])
def test_cluster_is_deterministic_and_public_op_dispatches(backend):
    v, cats = planted(20, 8, 6, 16, extra=30, dtype=torch.float32, seed=3)
    first = ops.cluster_keypoints(v, cats, 0.8, 6, backend="cpu" if backend == "cpu" else "auto")
    for _ in range(2):
        again = neighbors.cluster_keypoints(v, cats, 0.8, 6, backend=backend)
        assert torch.equal(again[1], first[1]) and torch.equal(again[0], first[0])
    assert_valid_clustering(v, cats, first, 0.8)


@needs_faiss
def test_ivf_default_probes_give_a_valid_close_clustering():
    v, cats = planted(100, 20, 30, 32, extra=200, dtype=torch.float32, seed=4)
    got = neighbors.cluster_keypoints(v, cats, 0.8, 6, backend="faiss", index="ivf")
    assert_valid_clustering(v, cats, got, 0.8)
    want = reference.cluster_keypoints(v, cats, 0.8, 6)
    # approximate neighbours: the number of clusters stays close to the exact one
    assert abs(got[0].shape[0] - want[0].shape[0]) <= 0.05 * want[0].shape[0]


@needs_faiss
def test_moderately_large_torch_and_faiss_agree():
    # float64: FAISS re-scores its float32 candidates, so both paths are exact
    v, cats = planted(1000, 18, 70, 32, extra=2000, dtype=torch.float64, seed=5)  # 20000 vectors
    torch_result = neighbors.cluster_keypoints(v, cats, 0.8, 6, backend="cpu")
    faiss_result = neighbors.cluster_keypoints(v, cats, 0.8, 6, backend="faiss", index="flat")
    assert torch.equal(torch_result[1], faiss_result[1])
    torch.testing.assert_close(torch_result[0], faiss_result[0])
    assert 1000 <= torch_result[0].shape[0] < 5000
    # float32: the engines round differently (near-equal densities could swap
    # peaks), so there the neighbour lists are compared
    v32 = v.float()
    k_t = neighbors.knn(v32[:1000], v32, 8, (cats[:1000], cats), backend="cpu")
    k_f = neighbors.knn(v32[:1000], v32, 8, (cats[:1000], cats), backend="faiss", index="flat")
    assert_knn_equal(k_f, k_t, torch.float32)
