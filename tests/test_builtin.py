"""The built-in benchmark cache and the out-of-the-box evaluation command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from escape_fast import builtin
from escape_fast.data import synthetic


def test_interrupted_generation_leaves_no_partial_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ESCAPE_FAST_CACHE", str(tmp_path))

    def interrupted(out, **kwargs):
        (out / "annotations").mkdir()
        (out / "annotations" / "half.json").write_text("{")
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        builtin.dataset_root(progress=False)
    assert list(tmp_path.iterdir()) == []


def test_help_of_the_commands():
    for module in ("escape_fast.eval", "escape_fast.train", "escape_fast.data.synthetic"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage" in proc.stdout.lower(), module


def test_eval_runs_out_of_the_box(tmp_path):
    env = {**os.environ, "ESCAPE_FAST_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "escape_fast.eval", "--episodes", "300", "--method", "all",
                           "--quiet", "--out", str(tmp_path / "r.json")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / f"synthetic-v{synthetic.VERSION}-small-seed0"
    assert "ESCAPE" in proc.stdout and (root / "COMPLETE").exists()
    assert (tmp_path / "r.json").exists()


def test_damaged_cache_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ESCAPE_FAST_CACHE", str(tmp_path))
    root = tmp_path / f"synthetic-v{synthetic.VERSION}-small-seed0"
    root.mkdir()
    (root / "COMPLETE").write_text("ok\n")  # marked complete, but the files are gone
    with pytest.raises(builtin.CacheError, match="damaged.*delete that folder"):
        builtin.dataset_root(progress=False)
    env = {**os.environ, "ESCAPE_FAST_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "escape_fast.eval", "--episodes", "300", "--quiet"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "damaged" in proc.stderr and "Traceback" not in proc.stderr


def test_unwritable_cache_names_the_folder(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("ESCAPE_FAST_CACHE", str(blocker / "cache"))  # a folder inside a file cannot exist
    with pytest.raises(builtin.CacheError, match="ESCAPE_FAST_CACHE"):
        builtin.dataset_root(progress=False)
