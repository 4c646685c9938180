"""The built-in benchmark and checkpoint, so everything runs without downloads.

* ``dataset_root()``: the synthetic benchmark (escape_fast.data.synthetic,
  size "small", seed 0), generated on first use into a cache folder
  (``$ESCAPE_FAST_CACHE``, else ``~/.cache/escape_fast``). It is written to a
  temporary folder and renamed into place, so an interrupted generation never
  leaves a partial benchmark behind.
* ``checkpoint_path()``: the model shipped inside the package
  (escape_fast/assets/builtin.pt), trained on that benchmark by the command
  in README.md.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

BUILTIN_SIZE = "small"
BUILTIN_SEED = 0
ASSETS = Path(__file__).resolve().parent / "assets"


def cache_dir() -> Path:
    return Path(os.environ.get("ESCAPE_FAST_CACHE", Path.home() / ".cache" / "escape_fast"))


def dataset_root(progress: bool = True, size: str = BUILTIN_SIZE, seed: int = BUILTIN_SEED) -> str:
    """Path of the built-in synthetic benchmark, generated if missing."""
    from escape_fast.data import synthetic

    root = cache_dir() / f"synthetic-{size}-seed{seed}"
    marker = root / "COMPLETE"
    if marker.exists():
        return str(root)
    if root.exists():  # an old partial folder (should not happen: we rename atomically)
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        if progress:
            print(f"generating the built-in synthetic benchmark into {root} (once)")
        synthetic.generate(tmp, size=size, seed=seed, workers=min(4, os.cpu_count() or 1), progress=progress)
        (tmp / "COMPLETE").write_text("ok\n")
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(root)


def checkpoint_path() -> str:
    path = ASSETS / "builtin.pt"
    if not path.exists():
        raise FileNotFoundError(
            f"the built-in checkpoint {path} is missing from this installation; train one with the command in "
            "README.md and pass --checkpoint RUN_DIR"
        )
    return str(path)
