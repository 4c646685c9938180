"""The C++ CPU kernels per instruction-set variant, side by side in one run.

    python benchmarks/bench_cpu_isa.py [--repeat 7]

Times heatmap_decode (fused), decode_heatmaps, keypoint_pool (forward and
backward) and sinkhorn_log (forward and backward) at the shapes of
benchmarks/RESULTS.md, "Kernels, CPU", under every variant this CPU runs
(escape_fast.ops.cpu_isas) and the reference, after checking each variant
against the reference. Prints a markdown table naming the CPU model and its
vector extensions; best-of-N milliseconds (N = --repeat).
"""

from __future__ import annotations

import argparse
import time

import torch
from machine import cpu_name

from escape_fast import ops


def best_ms(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def cases():
    g = torch.Generator().manual_seed(0)
    b, c, h, w, k = 15, 256, 64, 64, 17
    feats, protos = torch.randn(b, c, h, w, generator=g), torch.randn(b, k, c, generator=g)
    center, scale = torch.rand(b, 2, generator=g) * 200 + 100, torch.rand(b, 2, generator=g) + 0.5
    rotation = torch.zeros(b)
    maps = torch.randn(b, k, h, w, generator=g)
    kp, vis = torch.rand(b, 68, 2, generator=g) * 63, torch.rand(b, 68, generator=g) > 0.1
    scores = torch.randn(64, 69, 300, generator=g)
    bins, valid = torch.ones(64), torch.rand(64, 69, generator=g) > 0.2
    grad_pool = torch.randn(b, 68, c, generator=g)

    def pool_backward(backend):
        x = feats.clone().requires_grad_()
        ops.keypoint_pool(x, kp, vis, 2.0, backend=backend).backward(grad_pool)
        return x.grad

    def sinkhorn_backward(backend):
        s = scores.clone().requires_grad_()
        ops.sinkhorn_log(s, bins, valid, 50, backend=backend).sum().backward()
        return s.grad

    return {
        "heatmap_decode [15, 256, 64, 64], K 17": lambda be: ops.heatmap_decode(
            feats, protos, center, scale, 15, backend=be, rotation=rotation),
        "decode_heatmaps [15, 17, 64, 64]": lambda be: ops.decode_heatmaps(
            maps, center, scale, 15, backend=be, rotation=rotation),
        "keypoint_pool K 68, forward": lambda be: ops.keypoint_pool(feats, kp, vis, 2.0, backend=be),
        "keypoint_pool K 68, forward + backward": pool_backward,
        "sinkhorn_log 64 x 69 x 300, forward": lambda be: ops.sinkhorn_log(scores, bins, valid, 50, backend=be),
        "sinkhorn_log 64 x 69 x 300, forward + backward": sinkhorn_backward,
    }


def check(name, isa, got, want) -> None:
    """Against the reference: the decoders' peaks to float tolerance and at most
    1% of their argmaxes elsewhere (near-ties of random maps may round either
    way); every other output to float tolerance."""
    if isinstance(want, tuple):  # (coords, peaks) of a decoder
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4, msg=f"{name} ({isa}): peaks")
        moved = ((got[0] - want[0]).abs().amax(-1) > 1e-2).float().mean().item()
        assert moved <= 0.01, f"{name} ({isa}): {100 * moved:.1f}% of the argmaxes differ from the reference"
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"{name} ({isa})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=7, help="timed runs per case; the best counts (default 7)")
    args = p.parse_args(argv)
    isas = ops.cpu_isas()
    if not isas:
        raise SystemExit("the compiled extension is not built")
    print(f"CPU: {cpu_name()}; default variant: {ops.cpu_isa()}\n")
    print("| case | reference | " + " | ".join(isas) + " | best vs reference |")
    print("| --- | --- | " + " | ".join("---" for _ in isas) + " | --- |")
    with ops.finite_checks(False):  # as the evaluation's hot loop runs them
        for name, fn in cases().items():
            want = fn("reference")
            row = []
            for isa in isas:
                with ops.use_cpu_isa(isa):
                    check(name, isa, fn("cpu"), want)
                    row.append(best_ms(lambda: fn("cpu"), args.repeat))
            ref = best_ms(lambda: fn("reference"), max(2, args.repeat // 3))
            cells = " | ".join(f"{t:.1f}" for t in row)
            print(f"| {name} | {ref:.1f} | {cells} | {ref / min(row):.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
