"""Shared fixtures: devices, dtypes, per-dtype tolerances, backend lists."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's interpreter on the CPU so
# that the one test command checks them everywhere (it must be set before the
# kernel modules are imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import escape_fast
from escape_fast import ops

HAS_CUDA = torch.cuda.is_available()

# Per-dtype tolerances (kornia's style): float32 kernels may reorder sums.
TOLERANCES = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-5},
    torch.float64: {"rtol": 1e-9, "atol": 1e-11},
}


def tol(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


@pytest.fixture(params=[torch.float32, torch.float64], ids=["f32", "f64"])
def dtype(request):
    return request.param


@pytest.fixture(params=devices())
def device(request):
    return torch.device(request.param)


def kernel_backends(op: str) -> list:
    """Every non-reference backend as a pytest param, skipped with the reason
    when it cannot run here (no GPU, extension not built, no Triton)."""
    params = []
    for backend, dev in (("cpu", "cpu"), ("cuda", "cuda"), ("triton", "cuda"), ("triton", "cpu")):
        if backend == "triton" and dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            reason = "Triton on CPU needs TRITON_INTERPRET=1"
        elif dev == "cuda" and not HAS_CUDA:
            reason = "no CUDA device"
        elif not ops.available(op, backend, dev):
            reason = f"{backend} backend of {op} not available on {dev} (escape_fast.info())"
        else:
            reason = None
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param((backend, torch.device(dev)), id=f"{backend}-{dev}", marks=marks))
    return params


def pytest_report_header(config):
    import io

    buf = io.StringIO()
    escape_fast.info(file=buf)
    return buf.getvalue().rstrip().splitlines()
