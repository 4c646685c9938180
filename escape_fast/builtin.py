"""The built-in benchmark and checkpoint, so everything runs without downloads.

* ``dataset_root()``: the synthetic benchmark (escape_fast.data.synthetic,
  size "small", seed 0), generated on first use into a cache folder
  (``$ESCAPE_FAST_CACHE``, else ``$XDG_CACHE_HOME/escape_fast``, else
  ``~/.cache/escape_fast``). It is written to a temporary folder and renamed
  into place, so an interrupted generation never leaves a partial benchmark
  behind.
* ``PHOTO_MODEL``: the default model on photographs (no file: a frozen
  ImageNet trunk whose weights install with pip);
* ``checkpoint_path()``: the model shipped inside the package
  (escape_fast/assets/builtin.pt), trained on that benchmark by the command
  in README.md.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from escape_fast.errors import CacheError
from escape_fast.files import remove_stale, staged_folder

# The default model for photographs (Predictor, predict, the demo): the training-free model of the
# ImageNet EfficientNet-Lite0 trunk, which installs with pip; best on real photographs in
# benchmarks/real_photos.py (benchmarks/RESULTS.md). The built-in checkpoint stays the default of
# the built-in (synthetic) benchmark, where it is the better one.
PHOTO_MODEL = "imagenet:efficientnet_lite0"
BUILTIN_SIZE = "small"
BUILTIN_SEED = 0
ASSETS = Path(__file__).resolve().parent / "assets"


def expected_files(root: Path) -> list[Path]:
    """The files a complete benchmark holds besides its images."""
    ann = [root / "annotations" / f"mp100_split{s}_{m}.json" for s in range(1, 6) for m in ("train", "val", "test")]
    return [*ann, root / "synthetic_parts.json"]


def cache_dir() -> Path:
    """$ESCAPE_FAST_CACHE, else $XDG_CACHE_HOME/escape_fast, else ~/.cache/escape_fast."""
    if os.environ.get("ESCAPE_FAST_CACHE"):
        return Path(os.environ["ESCAPE_FAST_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "escape_fast"
    return Path.home() / ".cache" / "escape_fast"


def dataset_root(progress: bool = True, size: str = BUILTIN_SIZE, seed: int = BUILTIN_SEED) -> str:
    """Path of the built-in synthetic benchmark, generated if missing."""
    from escape_fast.data import synthetic

    # the version is in the name: a cache of an older world is never mixed with a newer checkpoint
    root = cache_dir() / f"synthetic-v{synthetic.VERSION}-{size}-seed{seed}"
    marker = root / "COMPLETE"
    remove_stale(root.parent, f".{root.name}-")  # what a killed generation left behind
    if marker.exists():
        missing = [str(p) for p in expected_files(root) if not p.is_file()]
        if missing:
            raise CacheError(
                f"the built-in benchmark cache {root} is damaged ({len(missing)} files missing, e.g. {missing[0]}); "
                f"delete that folder and it is generated again on the next run"
            )
        return str(root)
    if root.exists():  # not marked complete: a folder someone else put there, or a very old partial one
        shutil.rmtree(root)
    if progress:
        print(f"generating the built-in synthetic benchmark into {root} (once)")
    # written under a temporary name and renamed: an interrupted generation leaves nothing
    # (and what a killed one left is removed here, see files.staged_folder)
    try:
        with staged_folder(root) as tmp:
            synthetic.generate(tmp, size=size, seed=seed, workers=min(4, os.cpu_count() or 1), progress=progress)
            (tmp / "COMPLETE").write_text("ok\n")
    except OSError as exc:
        if marker.exists():  # another process finished the same benchmark first
            return str(root)
        raise CacheError(
            f"cannot write the built-in benchmark cache under {root.parent} ({exc}); set ESCAPE_FAST_CACHE to a "
            "writable folder"
        ) from exc
    return str(root)


def checkpoint_path() -> str:
    path = ASSETS / "builtin.pt"
    if not path.exists():
        raise FileNotFoundError(
            f"the built-in checkpoint {path} is missing from this installation; train one with the command in "
            "README.md and pass --checkpoint RUN_DIR"
        )
    return str(path)
