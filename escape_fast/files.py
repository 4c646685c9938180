"""Writing files so that an interrupted run never leaves a torn one.

* :func:`atomic_write`: a file is written under a temporary name in its own
  folder, flushed to disk and renamed over the target; on any exception
  (Ctrl-C and SIGTERM included, see escape_fast.cli) the temporary file is
  removed. Checkpoints, configs, reports, predictions and figures all go
  through it.
* :func:`staged_folder`: the same for a folder (the generated benchmark).
* Temporary names carry the writer's process id, so :func:`remove_stale`
  can delete what a killed process (SIGKILL, power loss) left behind
  without touching the work of a process that is still running.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".tmp-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _writer_pid(name: str, prefix: str) -> int | None:
    """The process id in ``<prefix><pid>-<random>``, or None for another name."""
    head = name[len(prefix):].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def remove_stale(folder: str | os.PathLike, prefix: str = TEMP_PREFIX) -> list[str]:
    """Delete the temporary files and folders ``<prefix><pid>-...`` in ``folder``
    whose writing process is gone (also those of an older naming without a
    pid); returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid = _writer_pid(entry.name, prefix)
        if pid is not None and (pid == os.getpid() or _alive(pid)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(str(entry))
    return removed


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w"):
    """``with atomic_write(path, "wb") as f: ...``: ``path`` appears complete or not at all."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; ours are as readable as any file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_path(path: str | os.PathLike):
    """``with atomic_path(path) as tmp: library.save(tmp)``: for writers that
    take a path, not a file; ``tmp`` keeps ``path``'s suffix (libraries pick
    the format by it) and is renamed over ``path`` when the block ends, or
    removed on any exception."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    suffix = name[name.index("."):] if "." in name else ""  # all of it: x.analysis.h5 stays .analysis.h5
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=suffix, dir=folder)
    os.close(fd)
    os.unlink(tmp)  # some writers refuse a path that exists
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> None:
    """``obj`` as JSON, atomically (numbers and strings only: ``default=str`` for the rest)."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=indent, default=str)


@contextmanager
def staged_folder(final: str | os.PathLike):
    """``with staged_folder(out) as tmp: write into tmp``: renamed to ``out``
    when the block ends without an exception, deleted otherwise. ``out``
    must not exist yet. Stale stages of killed processes are removed first."""
    final = Path(final)
    prefix = f".{final.name}-"
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final.parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=final.parent))
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
