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

from escape_fast.files import atomic_write

FORMAT = "escape_fast"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with the reason and the file."""


def save(obj: dict, path: str | os.PathLike, kind: str) -> None:
    """Atomically write ``obj`` (plus the header) to ``path``."""
    from escape_fast import __version__

    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "escape_fast": __version__, "kind": kind, **obj}
    with atomic_write(path, "wb") as f:
        torch.save(payload, f)


def load(path: str | os.PathLike, kind: str | None = None, required: Iterable[str] = (),
         map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save`, checking header and keys."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated file, pickle with code objects, not torch at all
        raise CheckpointError(f"checkpoint {path!r} cannot be read safely: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not an escape_fast checkpoint (no '{FORMAT}' header)")
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
