"""escape_fast: ESCAPE (CVPR 2024) category-agnostic pose estimation, fast.

``escape_fast.ops`` holds the public ops (with ``backend=``),
``escape_fast.reference`` their plain-PyTorch specification,
``escape_fast.Predictor`` predicts keypoints on your own images (see
escape_fast.predict), and ``escape_fast.info()`` prints what was built and
which backend each op uses.
"""

from __future__ import annotations

from escape_fast import _extension, ops, reference
from escape_fast._version import __version__

__all__ = ["Predictor", "__version__", "info", "ops", "reference"]


def __getattr__(name):
    # Predictor pulls in the models and the data pipeline: imported on first use only
    if name == "Predictor":
        from escape_fast.predict import Predictor

        return Predictor
    raise AttributeError(f"module 'escape_fast' has no attribute {name!r}")


def info(file=None) -> dict:
    """Print (and return) versions, the build, and the backend of every op."""
    import platform
    import sys

    import torch

    from escape_fast import kernels

    lines = [
        f"escape_fast {__version__}",
        f"python {platform.python_version()} ({sys.platform}, {platform.machine()})",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}, GPU available: {torch.cuda.is_available()})",
        f"extension escape_fast._C: {_extension.build_info()}"
        + (f" ({_extension.LOAD_ERROR})" if _extension.LOAD_ERROR else ""),
        f"CUDA kernels: {_extension.cuda_note()}",
        f"CPU kernels' instruction set: {ops.cpu_isa()} (this CPU: {', '.join(ops.cpu_isas()) or '-'}; "
        "ESCAPE_FAST_CPU_ISA forces one)" if _extension.LOADED else "CPU kernels: not built",
    ]
    if kernels.HAVE_TRITON:
        import triton

        lines.append(f"triton {triton.__version__}" + (" (TRITON_INTERPRET=1)" if kernels.INTERPRET else ""))
    else:
        lines.append(f"triton: not installed ({kernels.TRITON_ERROR})")
    try:
        import faiss

        lines.append(f"faiss {faiss.__version__} (GPU resources: {hasattr(faiss, 'StandardGpuResources')})")
    except ImportError:
        lines.append("faiss: not installed (kNN uses the blocked torch path)")

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    table = {}
    lines.append("op backends (auto -> used; available):")
    for op in ops.KERNEL_OPS:
        for dev in devices:
            avail = [b for b in ("cpu", "cuda", "triton") if ops.available(op, b, dev)]
            used = ops.resolve(op, "auto", dev)
            table[f"{op}@{dev}"] = {"auto": used, "available": avail}
            lines.append(f"  {op:<20} {dev:<5} auto -> {used:<10} available: {', '.join(avail) or 'reference only'}")
    print("\n".join(lines), file=file)
    return {"version": __version__, "torch": torch.__version__, "build": _extension.build_info(),
            "cuda_kernels": _extension.cuda_note(), "cpu_isa": ops.cpu_isa(), "cpu_isas": list(ops.cpu_isas()),
            "ops": table}
