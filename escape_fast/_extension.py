"""Loads the compiled extension escape_fast._C when it was built.

The package works without it (reference ops); ``escape_fast.info()`` says
which implementation each op uses and why the extension is missing.
"""

from __future__ import annotations

import importlib.util

import torch

LOADED = False
LOAD_ERROR: str | None = None

if importlib.util.find_spec("escape_fast._C") is None:
    LOAD_ERROR = "not compiled: run pip install --no-build-isolation -e . with torch installed"
else:
    try:  # importing the module runs the TORCH_LIBRARY registrations
        from escape_fast import _C  # noqa: F401

        LOADED = True
    except ImportError as exc:  # built against another torch, missing libraries
        LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when escape_fast::<op> has a compiled kernel for CPU or CUDA."""
    if not LOADED:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"escape_fast::{op}", dispatch_key)
    except RuntimeError:  # op not declared
        return False


def build_info() -> str:
    if not LOADED:
        return "not built"
    return torch.ops.escape_fast.build_info()


def cuda_note() -> str:
    """Whether the CUDA kernels were compiled, and why not (setup.py writes the reason)."""
    if LOADED and "+cuda" in build_info():
        return "compiled"
    try:
        from escape_fast._build_note import CUDA as note
    except ImportError:
        note = "no build note (built before setup.py recorded one)"
    if note.startswith("built"):  # the note says built, but this module has none: trust the module
        return f"not in this build of escape_fast._C (setup.py: {note})"
    return f"not compiled ({note}; FORCE_CUDA=1 at install time insists on them)"
