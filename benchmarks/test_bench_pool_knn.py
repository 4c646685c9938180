"""Timings of keypoint pooling, kNN with label exclusion and density-peaks clustering.

* keypoint_pool: features [15, 256, 64, 64], K = 68 keypoints, sigma 2;
  forward, and forward + backward, per backend beside the reference.
* knn: N = 1e4, 1e5, 1e6 vectors of dimension 256 (70 categories, same-label
  pairs excluded), every vector queried against all, k = 16; FAISS flat,
  FAISS IVF, the torch engine, and the reference where an N x N matrix fits.
* cluster_keypoints: 1e6 vectors with FAISS IVF (the reference would need a
  1e6 x 1e6 matrix).

Each case checks its result first (pooling against the reference; kNN
against the reference or an exact engine on a sample of rows), then times
it; CUDA timings synchronize the device. Run with

    python -m pytest benchmarks/test_bench_pool_knn.py --benchmark-enable

Under the default --benchmark-disable every case runs once as a smoke test,
except the CPU cases that take minutes, which are skipped with their reason.
"""

from __future__ import annotations

import os

import pytest
import torch

from escape_fast import neighbors, ops, reference

HAS_CUDA = torch.cuda.is_available()
B, C, H, W, K, SIGMA = 15, 256, 64, 64, 68, 2.0


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------
# keypoint_pool
# --------------------------------------------------------------------------
POOL_CASES = {  # name -> (device, backend)
    "reference-cpu": ("cpu", "reference"),
    "cpu": ("cpu", "cpu"),
    "reference-cuda": ("cuda", "reference"),
    "cuda": ("cuda", "cuda"),
    "triton": ("cuda", "triton"),
}


def _pool_skip(device: str, backend: str) -> str | None:
    if device == "cuda" and not HAS_CUDA:
        return "no CUDA device"
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1: interpreter timings mean nothing"
    if not ops.available("keypoint_pool", backend, device):
        return f"{backend} backend of keypoint_pool not available on {device} (escape_fast.info())"
    return None


def _pool_inputs(device: str):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(B, C, H, W, generator=g)
    kp = torch.rand(B, K, 2, generator=g) * torch.tensor([W - 1.0, H - 1.0])
    vis = torch.rand(B, K, generator=g) > 0.1
    grad = torch.randn(B, K, C, generator=g)
    return [t.to(device) for t in (feats, kp, vis, grad)]


@pytest.mark.parametrize("pass_", ["forward", "forward+backward"])
@pytest.mark.parametrize("case", list(POOL_CASES))
def test_keypoint_pool(benchmark, case, pass_):
    device, backend = POOL_CASES[case]
    reason = _pool_skip(device, backend)
    if reason:
        pytest.skip(reason)
    feats, kp, vis, grad = _pool_inputs(device)
    want = reference.keypoint_pool(feats, kp, vis, SIGMA)
    torch.testing.assert_close(ops.keypoint_pool(feats, kp, vis, SIGMA, backend=backend), want, rtol=1e-4, atol=1e-5)
    benchmark.group = f"keypoint_pool {pass_} [15, 256, 64, 64] K=68"
    if pass_ == "forward":

        def run():
            out = ops.keypoint_pool(feats, kp, vis, SIGMA, backend=backend)
            _sync(device)
            return out

    else:
        leaf = feats.clone().requires_grad_()

        def run():
            leaf.grad = None
            ops.keypoint_pool(leaf, kp, vis, SIGMA, backend=backend).backward(grad)
            _sync(device)
            return leaf.grad

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)


# --------------------------------------------------------------------------
# knn and cluster_keypoints
# --------------------------------------------------------------------------
DIM, N_CATS, KNN_K, PER_CENTER = 256, 70, 16, 50
_DATA: dict = {}


def planted(n: int, device: str = "cpu"):
    """n vectors around n / 50 random centers (cosine ~0.9 within a center), 70 categories."""
    if n not in _DATA:
        g = torch.Generator().manual_seed(n)
        centers = torch.randn(max(1, n // PER_CENTER), DIM, generator=g)
        v = centers.repeat_interleave(PER_CENTER, 0)[:n]
        v.add_(torch.randn(n, DIM, generator=g), alpha=0.33)
        cats = torch.randint(0, N_CATS, (n,), generator=g)
        perm = torch.randperm(n, generator=g)
        _DATA.clear()  # keep one size in memory (1e6 x 256 floats is 1 GiB)
        _DATA[n] = (v[perm], cats[perm])
    v, cats = _DATA[n]
    return v.to(device), cats.to(device)


# name -> (device, backend for neighbors.knn, FAISS index)
KNN_CASES = {
    "reference-cpu": ("cpu", "reference", None),
    "faiss-flat": ("cpu", "faiss", "flat"),
    "faiss-ivf": ("cpu", "faiss", "ivf"),
    "torch-cpu": ("cpu", "cpu", None),
    "reference-cuda": ("cuda", "reference", None),
    "torch-cuda": ("cuda", "cuda", None),
    "faiss-gpu-flat": ("cuda", "faiss", "flat"),
}
MINUTES_ON_CPU = "takes a minute or more on a CPU; run with --benchmark-enable to time it"


def _knn_skip(case: str, n: int, disabled: bool) -> str | None:
    device, backend, index = KNN_CASES[case]
    if device == "cuda" and not HAS_CUDA:
        return "no CUDA device"
    if backend == "faiss" and not neighbors.HAVE_FAISS:
        return f"faiss not importable ({neighbors.FAISS_ERROR})"
    if case == "faiss-gpu-flat" and not neighbors.FAISS_GPU:
        return "faiss has no GPU support here (faiss-cpu)"
    if backend == "reference" and n > 20000:
        return f"the reference builds an N x N similarity matrix: {n}^2 entries do not fit"
    if device == "cpu" and backend in ("cpu", "faiss") and index != "ivf" and n >= 1_000_000:
        return "exact search of 1e6 x 1e6 pairs (5e14 flops) takes hours on a CPU"
    if device == "cpu" and disabled and n >= 100_000:
        return MINUTES_ON_CPU
    return None


@pytest.mark.parametrize("n", [10_000, 100_000, 1_000_000], ids=["1e4", "1e5", "1e6"])
@pytest.mark.parametrize("case", list(KNN_CASES))
def test_knn(benchmark, case, n):
    reason = _knn_skip(case, n, benchmark.disabled)
    if reason:
        pytest.skip(reason)
    device, backend, index = KNN_CASES[case]
    v, cats = planted(n, device)
    opts = {"index": index} if index else {}
    if backend == "reference":
        fn = lambda: reference.knn(v, v, KNN_K, (cats, cats))
    else:
        fn = lambda: neighbors.knn(v, v, KNN_K, (cats, cats), backend=backend, **opts)

    def run():
        out = fn()
        _sync(device)
        return out

    benchmark.group = f"knn N={n:.0e} dim 256 k={KNN_K} with exclusion"
    vals, idx = benchmark.pedantic(run, rounds=1 if n > 10_000 else 3, iterations=1)
    # check 200 rows against the exact answer (IVF: the recall of the top-1)
    rows = torch.arange(0, n, max(1, n // 200), device=device)[:200]
    exact = neighbors.knn(v[rows], v, KNN_K, (cats[rows], cats), backend=device)
    if index == "ivf":
        recall = (idx[rows, 0] == exact[1][:, 0]).float().mean().item()
        benchmark.extra_info["top1_recall"] = recall
        assert recall > 0.9
    else:
        torch.testing.assert_close(vals[rows], exact[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n", [1_000_000], ids=["1e6"])
def test_cluster_keypoints_faiss_ivf(benchmark, n):
    if not neighbors.HAVE_FAISS:
        pytest.skip(f"faiss not importable ({neighbors.FAISS_ERROR})")
    if benchmark.disabled:
        pytest.skip(MINUTES_ON_CPU)
    v, cats = planted(n)
    benchmark.group = "cluster_keypoints N=1e6 dim 256, 70 categories"
    supers, assign = benchmark.pedantic(
        lambda: neighbors.cluster_keypoints(v, cats, 0.8, 6, backend="faiss", index="ivf"), rounds=1, iterations=1
    )
    benchmark.extra_info["clusters"] = int(supers.shape[0])
    assert assign.shape == (n,) and int(assign.min()) == 0 and int(assign.max()) == supers.shape[0] - 1
    # the planted centers are recovered: far fewer clusters than vectors
    assert supers.shape[0] < n // 10
