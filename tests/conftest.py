"""Shared fixtures: devices, dtypes, per-dtype tolerances, backend lists."""

from __future__ import annotations

import os
import zlib

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


class BackendDevice(tuple):
    """(backend, device) of a kernel test; ``isa``: the CPU kernels' instruction
    set the test runs under (the cpu backend only, escape_fast.ops.use_cpu_isa)."""

    isa: str | None = None


def kernel_backends(op: str) -> list:
    """Every non-reference backend as a pytest param, skipped with the reason
    when it cannot run here (no GPU, extension not built, no Triton). The cpu
    backend comes once per instruction-set variant of its kernels
    (ops.CPU_ISAS), each run where this CPU has it: every variant is tested
    against the reference."""
    params = []
    for isa in ops.CPU_ISAS:
        value = BackendDevice(("cpu", torch.device("cpu")))
        value.isa = isa
        if not ops.available(op, "cpu", "cpu"):
            reason = f"cpu backend of {op} not available on cpu (escape_fast.info())"
        elif isa not in ops.cpu_isas():
            reason = f"this CPU has no {isa} (it runs {', '.join(ops.cpu_isas())})"
        else:
            reason = None
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(value, id=f"cpu-{isa}-cpu", marks=marks))
    for backend, dev in (("cuda", "cuda"), ("triton", "cuda"), ("triton", "cpu")):
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


@pytest.fixture(autouse=True)
def _seeded(request):
    """Random inputs that are the same on every run of a test (a failure can be
    reproduced), different from test to test."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _cpu_isa_of_the_case(request):
    """Run a kernel test of the cpu backend under the ISA variant its params name."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    isa = next((v.isa for v in params.values() if isinstance(v, BackendDevice) and v.isa), None)
    if isa is None:
        yield
        return
    with ops.use_cpu_isa(isa):
        yield


def pytest_report_header(config):
    import io

    buf = io.StringIO()
    escape_fast.info(file=buf)
    return buf.getvalue().rstrip().splitlines()
