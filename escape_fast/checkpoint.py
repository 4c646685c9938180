"""Checkpoints: written atomically, read with ``weights_only=True``, checked.

A checkpoint is a plain dict of tensors and plain Python values (so that
``torch.load(..., weights_only=True)`` can read it) with a header:

    {"format": "escape_fast", "format_version": 1, "escape_fast": "0.1.0",
     "kind": "baseline" | "cluster" | "finetune" | "matching" | ..., ...}

``save`` writes through escape_fast.files.atomic_write, so an interruption
never leaves a torn file.
``load`` says which file is wrong and how (not a checkpoint, another format
version, a missing key) instead of failing deep inside a model.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from escape_fast._version import __version__
from escape_fast.errors import CheckpointError
from escape_fast.files import atomic_write

FORMAT = "escape_fast"
FORMAT_VERSION = 1


def save(obj: dict, path: str | os.PathLike, kind: str) -> None:
    """Atomically write ``obj`` (plus the header) to ``path``."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "escape_fast": __version__, "kind": kind, **obj}
    with atomic_write(path, "wb") as f:
        torch.save(payload, f)


def _numpy_scalars() -> list:
    """What pickled numpy scalars need, under the names numpy 1 and 2 write:
    mmcv checkpoints (the authors' files) keep the best validation score in
    'meta' as a numpy.float64. Only scalars: no arrays, no code."""
    import numpy as np

    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    dtypes = [getattr(np.dtypes, n) for n in ("Float64DType", "Float32DType", "Float16DType", "Int64DType",
                                              "Int32DType", "BoolDType") if hasattr(np, "dtypes")]
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtypes]


def read(path: str | os.PathLike, map_location="cpu"):
    """The object in a torch file, read with ``weights_only=True`` (tensors,
    plain Python values and numpy scalars only); a clear error otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_scalars()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated file, pickle with code objects, not torch at all
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # torch's weights-only refusal is a paragraph; its one telling line names the global
        telling = [line for line in lines if "Unsupported global" in line or "WeightsUnpickler error" in line]
        reason = (telling or lines or [""])[0]
        raise CheckpointError(f"checkpoint {path!r} cannot be read safely: {type(exc).__name__}: {reason}") from exc


def load(path: str | os.PathLike, kind: str | None = None, required: Iterable[str] = (),
         map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save`, checking header and keys."""
    return check(read(path, map_location), path, kind, required)


def check(obj, path, kind: str | None = None, required: Iterable[str] = ()) -> dict:
    """``obj`` (read from ``path``) if it is an escape_fast checkpoint of
    ``kind`` with the ``required`` keys; a CheckpointError saying what is not."""
    path = os.fspath(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not an escape_fast checkpoint (no '{FORMAT}' header) nor one of the "
                              "ESCAPE authors' (backbone.*, deconv.*, keypoint_head.* weights)")
    if obj.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path!r} has checkpoint format {obj.get('format_version')} (written by escape_fast "
            f"{obj.get('escape_fast')}); this escape_fast {FORMAT_VERSION} reads format {FORMAT_VERSION} only"
        )
    if kind is not None and obj.get("kind") != kind:
        raise CheckpointError(f"{path!r} holds a {obj.get('kind')!r} checkpoint, expected {kind!r}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise CheckpointError(f"{path!r} lacks {', '.join(map(repr, missing))}")
    return obj


def sub_state(state: dict, prefix: str) -> dict:
    """The entries of a state dict under ``prefix.`` (a sub-module's state dict)."""
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
