"""The machine a benchmark ran on, in words: CPU model, threads, vector instruction sets and the
variant escape_fast's CPU kernels use (timings are only comparable on the same machine)."""

from __future__ import annotations

import platform

import torch


def cpu_name() -> str:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    vector = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    from escape_fast import ops

    return (f"{model}, {torch.get_num_threads()} threads, {' '.join(vector) or 'no AVX'}; "
            f"CPU kernels {ops.cpu_isa()}")
