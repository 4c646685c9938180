"""Build escape_fast._C: C++ CPU kernels always, CUDA kernels when possible.

Environment:
  FORCE_CUDA=1                 build the CUDA sources even when torch or the
                               machine reports no GPU (needs nvcc + CUDA torch)
  ESCAPE_FAST_NO_CUDA=1        never build the CUDA sources
  ESCAPE_FAST_CUDA_ARCHS="8.0;9.0"   target architectures (default sm_80, sm_90)
  ESCAPE_FAST_NO_EXTENSION=1   skip the extension (pure-Python install)
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"[escape_fast build] {msg}", file=sys.stderr)


def _extensions():
    if os.environ.get("ESCAPE_FAST_NO_EXTENSION") == "1":
        _log("ESCAPE_FAST_NO_EXTENSION=1: building no extension (reference ops only)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _log("torch is not importable at build time: no extension (install torch first, then "
             "pip install --no-build-isolation -e .)")
        return [], {}

    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    want_cuda = os.environ.get("FORCE_CUDA") == "1" or (
        torch.version.cuda is not None and CUDA_HOME is not None
    )
    if os.environ.get("ESCAPE_FAST_NO_CUDA") == "1":
        want_cuda = False
    if want_cuda and (CUDA_HOME is None or torch.version.cuda is None):
        _log(f"CUDA requested but CUDA_HOME={CUDA_HOME} torch.version.cuda={torch.version.cuda}: CPU only")
        want_cuda = False

    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3", "-std=c++20", *openmp]
    define_macros = []
    extra_link = list(openmp)
    if want_cuda:
        archs = os.environ.get("ESCAPE_FAST_CUDA_ARCHS", "8.0;9.0")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        define_macros.append(("ESCAPE_FAST_WITH_CUDA", None))
        nvcc_flags = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]
        if os.environ.get("ESCAPE_FAST_PTXAS_VERBOSE") == "1":
            nvcc_flags.append("-Xptxas=-v")  # registers, shared memory and spills per kernel
        ext = CUDAExtension(
            "escape_fast._C",
            cpu_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=extra_link,
        )
        _log(f"building CPU ({len(cpu_sources)} files) + CUDA ({len(cuda_sources)} files) for archs {archs}")
    else:
        ext = CppExtension(
            "escape_fast._C",
            cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link,
        )
        _log(f"building CPU only ({len(cpu_sources)} files)")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
