"""Build escape_fast._C: C++ CPU kernels always, CUDA kernels when possible.

The CUDA part is built when torch is a CUDA build and a CUDA toolkit is found:

* the toolkit root is CUDA_HOME (or CUDA_PATH) when set, else the folder
  behind the ``nvcc`` on the PATH, following symlinks and wrapper scripts
  that ``exec`` the real nvcc, else /usr/local/cuda;
* the CUDA library headers that torch's own headers include (cusparse.h,
  cublas_v2.h, ...) are taken from the toolkit, or else from the NVIDIA
  wheels that ``pip install torch`` put into site-packages/nvidia/ (their
  include folders go on CPATH, after the toolkit's own headers).

When the CUDA part cannot be built (CPU-only torch, no toolkit, missing
headers, or a compile error), the CPU kernels are built alone, the reason is
printed in one line and stored for ``escape_fast.info()``, and the install
succeeds. ``FORCE_CUDA=1`` makes any of those an error instead.

Environment:
  FORCE_CUDA=1                 the CUDA kernels or a failed install
  ESCAPE_FAST_NO_CUDA=1        never build the CUDA sources
  ESCAPE_FAST_CUDA_ARCHS="8.0;9.0"   target architectures (default sm_80, sm_90)
  ESCAPE_FAST_NO_EXTENSION=1   skip the extension (pure-Python install)
  CUDA_HOME=/path/to/toolkit   the toolkit root, when the search above picks the wrong one
"""

import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
FORCE_CUDA = os.environ.get("FORCE_CUDA") == "1"
BUILD_NOTE = os.path.join(ROOT, "escape_fast", "_build_note.py")  # read by escape_fast.info()


def _log(msg: str) -> None:
    print(f"[escape_fast build] {msg}", file=sys.stderr, flush=True)


def _write_note(cuda: str, build_lib: str | None = None) -> None:
    """What the CUDA part of the build did, for escape_fast.info() (pip hides
    build output): in the source tree, and in ``build_lib`` for a wheel."""
    for path in (BUILD_NOTE, build_lib and os.path.join(build_lib, "escape_fast", "_build_note.py")):
        if path and os.path.isdir(os.path.dirname(path)):
            with open(path, "w") as f:
                f.write('"""Written by setup.py at build time: what happened to the CUDA kernels."""\n')
                f.write(f"CUDA = {cuda!r}\n")


def _toolkit_root(path: str | None) -> str | None:
    """``path`` if it is a CUDA toolkit root (bin/nvcc, include/cuda_runtime.h, lib64 or lib)."""
    if not path:
        return None
    path = os.path.realpath(path)
    ok = (os.path.isfile(os.path.join(path, "bin", "nvcc"))
          and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))
          and any(glob.glob(os.path.join(path, lib, "libcudart.so*")) for lib in ("lib64", "lib")))
    return path if ok else None


def _nvcc_targets(nvcc: str) -> list[str]:
    """The nvcc an nvcc on the PATH stands for: itself, its symlink target, or
    the absolute nvcc paths a small wrapper script runs (``exec /opt/cuda/bin/nvcc "$@"``)."""
    real = os.path.realpath(nvcc)
    found = [real]
    try:
        if os.path.getsize(real) < 16384:
            with open(real, errors="replace") as f:
                text = f.read()
            if text.startswith("#!"):
                found += [p for p in re.findall(r"(/[^\s'\"]*/nvcc)\b", text) if os.path.isfile(p)]
    except OSError:
        pass
    return found


def find_cuda_home() -> tuple[str | None, str]:
    """(toolkit root or None, where it came from / why none was found)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            root = _toolkit_root(os.environ[var])
            if root:
                return root, f"{var}={os.environ[var]}"
            return None, f"{var}={os.environ[var]} is not a CUDA toolkit (no bin/nvcc, include/cuda_runtime.h, lib64)"
    nvcc = shutil.which("nvcc")
    if nvcc:
        for target in _nvcc_targets(nvcc):
            root = _toolkit_root(os.path.dirname(os.path.dirname(target)))
            if root:
                return root, f"behind {nvcc}"
    root = _toolkit_root("/usr/local/cuda")
    if root:
        return root, "/usr/local/cuda"
    return None, "no CUDA toolkit found (no nvcc on the PATH, CUDA_HOME unset, no /usr/local/cuda)"


def wheel_include_dirs() -> list[str]:
    """Header folders of the NVIDIA wheels that a CUDA build of torch depends on
    (nvidia/cu13/include for CUDA 13, nvidia/<library>/include for CUDA 12)."""
    dirs = []
    for site in sys.path:
        base = os.path.join(site, "nvidia")
        if os.path.isdir(base):
            dirs += sorted(d for d in glob.glob(os.path.join(base, "*", "include")) if os.path.isdir(d))
    return list(dict.fromkeys(dirs))


def _cuda_plan() -> tuple[bool, str]:
    """(build CUDA?, the reason when not), setting CUDA_HOME and CPATH for the build."""
    if os.environ.get("ESCAPE_FAST_NO_CUDA") == "1":
        return False, "ESCAPE_FAST_NO_CUDA=1"
    import torch

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    root, where = find_cuda_home()
    if root is None:
        return False, where
    # torch.utils.cpp_extension reads CUDA_HOME when it is first imported
    os.environ["CUDA_HOME"] = root
    header_dirs = [os.path.join(root, "include"), *wheel_include_dirs()]
    missing = [h for h in ("cuda_runtime.h", "cusparse.h", "cublas_v2.h")
               if not any(os.path.isfile(os.path.join(d, h)) for d in header_dirs)]
    if missing:
        return False, (f"{', '.join(missing)} not found in {root}/include or site-packages/nvidia/*/include "
                       f"(torch's CUDA headers include them)")
    extra = [d for d in wheel_include_dirs() if d not in os.environ.get("CPATH", "").split(os.pathsep)]
    if extra:  # searched after the toolkit's own include folder, which nvcc passes with -I
        os.environ["CPATH"] = os.pathsep.join(filter(None, [os.environ.get("CPATH"), *extra]))
    _log(f"CUDA toolkit {root} ({where}); CUDA headers of the wheels: {', '.join(extra) or 'none needed'}")
    return True, ""


def _skip_line(reason: str) -> str:
    return f"CUDA kernels skipped: {reason}. CPU kernels only; set FORCE_CUDA=1 to insist on CUDA"


def _extensions():
    if os.environ.get("ESCAPE_FAST_NO_EXTENSION") == "1":
        _log("ESCAPE_FAST_NO_EXTENSION=1: building no extension (reference ops only)")
        return [], {}
    try:
        import torch  # noqa: F401
    except ImportError:
        _log("torch is not importable at build time: no extension (install torch first, then "
             "pip install --no-build-isolation -e .)")
        return [], {}
    want_cuda, reason = _cuda_plan()
    if not want_cuda and FORCE_CUDA:
        raise RuntimeError(f"FORCE_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3", "-std=c++20", *openmp]
    common = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=list(openmp))

    def cpu_extension():
        return CppExtension("escape_fast._C", cpu_sources, extra_compile_args={"cxx": cxx_flags}, **common)

    class Build(BuildExtension):
        """A failed CUDA compile falls back to the CPU kernels (unless FORCE_CUDA=1)."""

        def build_extension(self, ext):
            if not getattr(ext, "escape_fast_cuda", False):
                return super().build_extension(ext)
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - compile errors come as several types
                if FORCE_CUDA:
                    raise
                line = _skip_line(f"compiling them failed ({type(exc).__name__}: {str(exc).splitlines()[0]}; "
                                  "the compiler's messages are above)")
                _log(line)
                _write_note(f"skipped: compiling them failed ({type(exc).__name__})", self.build_lib)
                ext.sources = list(cpu_sources)
                ext.define_macros = [m for m in ext.define_macros if m[0] != "ESCAPE_FAST_WITH_CUDA"]
                ext.escape_fast_cuda = False
                super().build_extension(ext)

    cmdclass = {"build_ext": Build.with_options(use_ninja=True)}
    if not want_cuda:
        line = _skip_line(reason)
        _log(line)
        _write_note(f"skipped: {reason}")
        return [cpu_extension()], cmdclass
    archs = os.environ.get("ESCAPE_FAST_CUDA_ARCHS", "8.0;9.0")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    nvcc_flags = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]
    if os.environ.get("ESCAPE_FAST_PTXAS_VERBOSE") == "1":
        nvcc_flags.append("-Xptxas=-v")  # registers, shared memory and spills per kernel
    ext = CUDAExtension("escape_fast._C", cpu_sources + cuda_sources,
                        define_macros=[("ESCAPE_FAST_WITH_CUDA", None)],
                        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, **common)
    ext.escape_fast_cuda = True
    _write_note(f"built for {archs.replace(';', ', ')} with the toolkit at {os.environ['CUDA_HOME']}")
    _log(f"building CPU ({len(cpu_sources)} files) + CUDA ({len(cuda_sources)} files) for archs {archs}")
    return [ext], cmdclass


if __name__ == "__main__":  # pip runs setup.py as __main__; tests import its functions
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
