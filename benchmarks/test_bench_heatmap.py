"""Timings of heatmap + decode on an MP-100 query batch: features
[15, 256, 64, 64] with K = 17 and 68 prototypes per query, kernel 15.

Cases ending in "-checked" time the public op with its defaults (the NaN /
Inf checks on, see escape_fast.ops.CHECK_FINITE) beside the same kernel
with the checks off, the evaluation's hot path: their ratio is the cost of
the checks (target: at most 1.10).

Each case first checks its result against the reference (peak values, which
do not depend on argmax ties), then times it; CUDA timings synchronize the
device. Run with

    python -m pytest benchmarks/test_bench_heatmap.py --benchmark-enable

(under the default --benchmark-disable every case runs once, as a smoke test).
"""

from __future__ import annotations

import os

import pytest
import torch

from escape_fast import ops, reference

B, C, H, W = 15, 256, 64, 64
KERNEL = 15
HAS_CUDA = torch.cuda.is_available()


def _inputs(k: int, device: str):
    gen = torch.Generator().manual_seed(k)
    feats = torch.randn(B, C, H, W, generator=gen)
    protos = torch.randn(B, k, C, generator=gen) / C**0.5
    center = torch.rand(B, 2, generator=gen) * 200 + 100
    scale = torch.rand(B, 2, generator=gen) + 1.0
    rotation = torch.zeros(B)
    return [t.to(device) for t in (feats, protos, center, scale, rotation)]


# name -> (device, op, backend); op "split" is prototype_heatmaps + decode_heatmaps
CASES = {
    "cpu-fused-checked": ("cpu", "heatmap_decode", "cpu"),
    "cuda-fused-checked": ("cuda", "heatmap_decode", "cuda"),
    "triton-fused-checked": ("cuda", "heatmap_decode", "triton"),
    "cpu-decode-only-checked": ("cpu", "decode_heatmaps", "cpu"),
    "reference-cpu": ("cpu", "split", "reference"),
    "reference-cuda": ("cuda", "split", "reference"),
    "cpu-fused": ("cpu", "heatmap_decode", "cpu"),
    "cpu-split": ("cpu", "split", "cpu"),
    "cuda-fused": ("cuda", "heatmap_decode", "cuda"),
    "triton-fused": ("cuda", "heatmap_decode", "triton"),
    "reference-decode-only-cpu": ("cpu", "decode_heatmaps", "reference"),
    "reference-decode-only-cuda": ("cuda", "decode_heatmaps", "reference"),
    "cpu-decode-only": ("cpu", "decode_heatmaps", "cpu"),
    "cuda-decode-only": ("cuda", "decode_heatmaps", "cuda"),
    "triton-decode-only": ("cuda", "decode_heatmaps", "triton"),
}


def _skip_reason(device: str, op: str, backend: str) -> str | None:
    if device == "cuda" and not HAS_CUDA:
        return "no CUDA device"
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1: interpreter timings mean nothing"
    for name in ("prototype_heatmaps", "decode_heatmaps") if op == "split" else (op,):
        if not ops.available(name, backend, device):
            return f"{backend} backend of {name} not available on {device} (escape_fast.info())"
    return None


def _runner(device: str, op: str, backend: str, k: int):
    feats, protos, center, scale, rotation = _inputs(k, device)
    if op == "heatmap_decode":
        return lambda: ops.heatmap_decode(feats, protos, center, scale, KERNEL, backend=backend, rotation=rotation)
    if op == "decode_heatmaps":
        maps = reference.prototype_heatmaps(feats, protos)
        return lambda: ops.decode_heatmaps(maps, center, scale, KERNEL, backend=backend, rotation=rotation)
    return lambda: ops.decode_heatmaps(
        ops.prototype_heatmaps(feats, protos, backend=backend), center, scale, KERNEL, backend=backend,
        rotation=rotation,
    )


@pytest.mark.parametrize("k", [17, 68])
@pytest.mark.parametrize("case", list(CASES))
def test_heatmap_decode(benchmark, case, k):
    device, op, backend = CASES[case]
    reason = _skip_reason(device, op, backend)
    if reason:
        pytest.skip(reason)
    # the evaluation's hot path runs without checks; "-checked" cases time the public defaults
    ops.CHECK_FINITE = case.endswith("-checked")
    try:
        run = _runner(device, op, backend, k)
        # correctness first: peak values against the reference (in float64)
        feats, protos, center, scale, rotation = (t.double() for t in _inputs(k, device))
        _, want = reference.heatmap_decode(feats, protos, center, scale, KERNEL, rotation)
        _, got = run()
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)

        def timed():
            out = run()
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        benchmark.extra_info.update(
            {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "threads": torch.get_num_threads(),
             "features": [B, C, H, W], "K": k, "kernel": KERNEL, "torch": torch.__version__}
        )
        rounds = 30 if device == "cuda" else 3
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
    finally:
        ops.CHECK_FINITE = True
