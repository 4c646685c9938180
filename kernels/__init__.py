"""Triton kernels of escape_fast, installed as ``escape_fast.kernels``.

Each module registers its ops with ``torch.library.triton_op`` under the
namespace ``escape_fast_triton`` with the same signature as the C++ schema in
csrc/ops.cpp, so that ``escape_fast.ops`` can reach them with
``backend="triton"`` and ``torch.compile`` can see through them. Triton runs
on CUDA devices, and on the CPU under ``TRITON_INTERPRET=1`` (for tests).
"""

from __future__ import annotations

import importlib
import os

from escape_fast.registry import TRITON_MODULES

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
    TRITON_ERROR = None
except ImportError as exc:  # e.g. macOS, Windows, aarch64 without wheels
    HAVE_TRITON = False
    TRITON_ERROR = f"{type(exc).__name__}: {exc}"

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# op name -> module in this package that registers escape_fast_triton::<op> (the op table's)
OP_MODULES = TRITON_MODULES


def load(op: str):
    """Import the module of ``op`` and return escape_fast_triton::<op>, or None."""
    if not HAVE_TRITON or op not in OP_MODULES:
        return None
    importlib.import_module(f"{__name__}.{OP_MODULES[op]}")
    return getattr(torch_ops_namespace(), op, None)


def torch_ops_namespace():
    import torch

    return torch.ops.escape_fast_triton

