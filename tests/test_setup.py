"""setup.py finds a CUDA toolkit behind an nvcc wrapper and the CUDA headers
of torch's NVIDIA wheels on its own (CI also installs the README's lines
verbatim, with CUDA_HOME and CPATH unset, and checks escape_fast.info())."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup_py(monkeypatch):
    spec = importlib.util.spec_from_file_location("escape_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the functions; setup() runs only as __main__
    for var in ("CUDA_HOME", "CUDA_PATH", "CPATH"):
        monkeypatch.delenv(var, raising=False)
    return module


def _toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "lib64").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "bin" / "nvcc").chmod(0o755)
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / "lib64" / "libcudart.so").write_text("")
    return root


def test_toolkit_behind_a_wrapper_script(setup_py, tmp_path, monkeypatch):
    toolkit = _toolkit(tmp_path / "opt" / "cuda-13.0")
    bin_dir = tmp_path / "usr" / "local" / "bin"  # the wrapper's parent is no toolkit
    bin_dir.mkdir(parents=True)
    wrapper = bin_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin:/bin")
    root, where = setup_py.find_cuda_home()
    assert root == str(toolkit.resolve()) and str(wrapper) in where


def test_toolkit_through_a_symlink_and_from_cuda_home(setup_py, tmp_path, monkeypatch):
    toolkit = _toolkit(tmp_path / "cuda")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    monkeypatch.setenv("PATH", str(bin_dir))
    assert setup_py.find_cuda_home()[0] == str(toolkit.resolve())
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    root, why = setup_py.find_cuda_home()
    assert root is None and "is not a CUDA toolkit" in why


def test_wheel_headers_go_on_cpath_after_the_toolkit(setup_py, tmp_path, monkeypatch):
    if setup_py.find_cuda_home()[0] is None:
        pytest.skip("no CUDA toolkit on this machine")
    import torch

    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build")
    site = tmp_path / "site"
    include = site / "nvidia" / "cu13" / "include"
    include.mkdir(parents=True)
    for header in ("cusparse.h", "cublas_v2.h"):
        (include / header).write_text("")
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    want, reason = setup_py._cuda_plan()
    assert want, reason
    assert str(include) in os.environ["CPATH"].split(os.pathsep)
    assert os.environ["CUDA_HOME"] == setup_py.find_cuda_home()[0]


def test_missing_cuda_headers_skip_cuda_with_the_reason(setup_py, tmp_path, monkeypatch):
    import torch

    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build")
    toolkit = _toolkit(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    monkeypatch.setattr(setup_py, "wheel_include_dirs", list)
    want, reason = setup_py._cuda_plan()
    assert not want and "cusparse.h" in reason and "site-packages/nvidia" in reason


def test_info_reports_the_cuda_kernels():
    import escape_fast

    note = escape_fast.info(file=open(os.devnull, "w"))["cuda_kernels"]
    assert note == "compiled" or note.startswith("not ")
