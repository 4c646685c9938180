"""Timings of sinkhorn_log: every backend beside the reference.

Batches of 64 problems of 69 x L (68 keypoint rows + the dustbin, L
super-keypoints), 50 iterations, forward and forward + backward:

    python -m pytest benchmarks/test_bench_sinkhorn.py --benchmark-enable

Each case first checks the backend against the reference on its inputs, then
times it with the device synchronised; pytest-benchmark reports medians.
"""

from __future__ import annotations

import pytest
import torch

from escape_fast import ops

B, M, ITERS = 64, 68, 50
LENGTHS = (100, 300, 1000)
HAS_CUDA = torch.cuda.is_available()


def _cases():
    params = []
    for backend in ("reference", "cpu", "cuda", "triton"):
        device = "cpu" if backend == "cpu" else "cuda" if HAS_CUDA else "cpu"
        if backend == "reference" and HAS_CUDA:
            params.append(pytest.param(("reference", "cuda"), id="reference-cuda"))
            device = "cpu"
        reason = None
        if backend == "triton" and not HAS_CUDA:
            reason = "Triton timings need a CUDA device (the interpreter is not a benchmark)"
        elif backend == "cuda" and not HAS_CUDA:
            reason = "no CUDA device"
        elif not ops.available("sinkhorn_log", backend, device):
            reason = f"{backend} backend of sinkhorn_log not available on {device} (escape_fast.info())"
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param((backend, device), id=f"{backend}-{device}", marks=marks))
    return params


def _inputs(length, device, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    scores = (torch.randn(B, M, length, generator=gen) / 4).to(device)
    valid = (torch.rand(B, M, generator=gen) > 0.2).to(device)
    bin_score = torch.tensor(1.0, device=device)
    if requires_grad:
        scores.requires_grad_()
        bin_score.requires_grad_()
    return scores, bin_score, valid


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _run(benchmark, fn, device, rounds):
    def timed():
        out = fn()
        _sync(device)
        return out

    if not benchmark.disabled:
        timed()  # warm-up: compilation, allocator, caches
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)


def _rounds(backend, device, length):
    if torch.device(device).type == "cuda":
        return 50
    return 3 if length >= 1000 else 5


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("backend_device", _cases())
def test_forward(benchmark, backend_device, length):
    backend, device = backend_device
    scores, bin_score, valid = _inputs(length, device)
    with torch.no_grad():
        out = ops.sinkhorn_log(scores, bin_score, valid, ITERS, backend=backend)
        ref = ops.sinkhorn_log(scores, bin_score, valid, ITERS, backend="reference")
    fin = ref.isfinite()
    torch.testing.assert_close(out[fin], ref[fin], rtol=1e-4, atol=1e-4)
    benchmark.group = f"sinkhorn_log forward 64 x 69 x {length}, {ITERS} iters"
    benchmark.extra_info.update(backend=backend, device=str(device), length=length)

    def fn():
        with torch.no_grad():
            return ops.sinkhorn_log(scores, bin_score, valid, ITERS, backend=backend)

    _run(benchmark, fn, device, _rounds(backend, device, length))


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("backend_device", _cases())
def test_forward_backward(benchmark, backend_device, length):
    backend, device = backend_device
    if backend == "reference" and torch.device(device).type == "cpu" and length >= 1000 and benchmark.disabled:
        pytest.skip("reference autograd on the CPU at L = 1000 keeps ~3 GB of intermediates; runs with --benchmark-enable")
    scores, bin_score, valid = _inputs(length, device, requires_grad=True)
    grad = torch.randn(B, M + 1, length, generator=torch.Generator().manual_seed(1)).to(device)
    benchmark.group = f"sinkhorn_log forward+backward 64 x 69 x {length}, {ITERS} iters"
    benchmark.extra_info.update(backend=backend, device=str(device), length=length)

    def fn():
        out = ops.sinkhorn_log(scores, bin_score, valid, ITERS, backend=backend)
        return torch.autograd.grad(out, scores, grad)[0]

    got = fn()
    if backend != "reference":  # checked on the first problems (reference autograd is memory-hungry)
        s4 = scores[:4].detach().requires_grad_()
        ref = ops.sinkhorn_log(s4, bin_score, valid[:4], ITERS, backend="reference")
        want = torch.autograd.grad(ref, s4, grad[:4])[0]
        torch.testing.assert_close(got[:4], want, rtol=1e-3, atol=1e-3 * max(1.0, want.abs().max().item()))
    _run(benchmark, fn, device, _rounds(backend, device, length))

