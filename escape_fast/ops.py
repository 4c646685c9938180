"""Public ops of escape_fast: typed wrappers, input checks, backend choice.

Every op takes ``backend=``:

* ``"reference"``: escape_fast.reference (plain PyTorch, the specification);
* ``"cpu"``: the C++ kernels of escape_fast._C (CPU tensors);
* ``"cuda"``: the CUDA kernels of escape_fast._C (CUDA tensors);
* ``"triton"``: the Triton kernels of escape_fast.kernels (CUDA tensors, or
  CPU tensors under TRITON_INTERPRET=1);
* ``"auto"`` (default): ``cuda`` then ``triton`` for CUDA tensors, ``cpu`` for
  CPU tensors, and the reference where no kernel exists. The choice is fixed
  per op and device and printed by ``escape_fast.info()``; asking for a
  backend that is not available raises instead of falling back.

Shapes: B batch, C channels, H x W heatmap grid, K (or M) keypoints, N (or L)
super-keypoints.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch

from escape_fast import _extension, reference, registry
from escape_fast.errors import BackendUnavailable

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
# knn and cluster_keypoints: "cpu"/"cuda" are the blocked torch path, "faiss" the FAISS index
# (no Triton kNN kernel exists, so "triton" is not one of them)
SEARCH_BACKENDS = ("auto", "cpu", "cuda", "faiss", "reference")

# Ops that have compiled / Triton kernels (the others are Python only), from the op table.
KERNEL_OPS = registry.KERNEL_OPS

# NaN / Inf checks. A check that reads a whole input would cost more than the
# op (at the MP-100 shape, torch.isfinite(features).all() takes 4x the fused
# decode), so each op checks its small arguments directly and learns about
# its large ones from its own small output: the decode kernels return a NaN
# peak for a map that holds a NaN or an infinity, a NaN feature that pooling
# reads makes its pooled vector NaN. Only then is the input read in full,
# to name it. ``finite_checks(False)`` turns them off altogether.
CHECK_FINITE = True


@contextlib.contextmanager
def finite_checks(enabled: bool):
    """Temporarily turn the NaN/Inf input checks on or off."""
    global CHECK_FINITE
    before, CHECK_FINITE = CHECK_FINITE, enabled
    try:
        yield
    finally:
        CHECK_FINITE = before


# --------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------
def _shape_str(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _expect(op: str, name: str, t, dims: Sequence[str | int], sizes: dict, floating: bool = True):
    """Check ``t`` against symbolic dims, binding new symbols into ``sizes``."""
    spec = "[" + ", ".join(str(d) for d in dims) + "]"
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor {spec}, got {type(t).__name__}")
    if t.dim() != len(dims):
        raise ValueError(f"{op}: {name} must be {spec}, got a {t.dim()}-d tensor {_shape_str(t)}")
    for axis, (d, s) in enumerate(zip(dims, t.shape)):
        if isinstance(d, int):
            if s != d:
                raise ValueError(f"{op}: {name} must be {spec}, got {_shape_str(t)} (dim {axis} is {s}, not {d})")
        elif d in sizes and sizes[d] != s:
            raise ValueError(
                f"{op}: {name} must be {spec} with {d}={sizes[d]} (from an earlier argument), got {_shape_str(t)}"
            )
        else:
            sizes[d] = s
    if floating and not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def _same_device(op: str, **tensors):
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}")


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``: one reduction that allocates no [t.shape] mask
    (a non-finite sum is confirmed elementwise, since large finite values
    can overflow it)."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def _finite(op: str, **tensors):
    """Raise naming the first argument that holds a NaN or an Inf (when checks are on)."""
    if not CHECK_FINITE:
        return
    for name, t in tensors.items():
        if not _all_finite(t):
            bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise ValueError(f"{op}: {name} contains {bad}")


def _finite_output(op: str, output: torch.Tensor, what: str, **inputs):
    """After an op whose ``output`` turns non-finite when its large inputs are
    (see CHECK_FINITE): name the input, or say that the result overflowed."""
    if CHECK_FINITE and not _all_finite(output):
        _finite(op, **inputs)
        raise ValueError(f"{op}: {what} are not finite although the inputs are (overflow)")


def _crop_args(op, center, scale, rotation, sizes):
    _expect(op, "center", center, ("B", 2), sizes)
    _expect(op, "scale", scale, ("B", 2), sizes)
    if rotation is None:
        rotation = center.new_zeros(sizes["B"])
    else:
        _expect(op, "rotation", rotation, ("B",), sizes)
    return center, scale, rotation


# --------------------------------------------------------------------------
# backend resolution
# --------------------------------------------------------------------------
def _triton_op(op: str):
    from escape_fast import kernels

    return kernels.load(op)


def _triton_usable(device: torch.device) -> bool:
    from escape_fast import kernels

    return kernels.HAVE_TRITON and (device.type == "cuda" or kernels.INTERPRET)


def available(op: str, backend: str, device: torch.device | str) -> bool:
    """Whether ``backend`` can run ``op`` on tensors of ``device``."""
    device = torch.device(device)
    if backend == "reference":
        return True
    if op not in KERNEL_OPS:
        return False
    if backend == "cpu":
        return device.type == "cpu" and _extension.has_kernel(op, "CPU")
    if backend == "cuda":
        return device.type == "cuda" and _extension.has_kernel(op, "CUDA")
    if backend == "triton":
        return op in registry.TRITON_MODULES and _triton_usable(device) and _triton_op(op) is not None
    return False


def resolve(op: str, backend: str, device: torch.device | str) -> str:
    """The backend that runs ``op`` for ``backend`` on ``device`` (never 'auto')."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
        for candidate in order:
            if available(op, candidate, device):
                return candidate
        return "reference"
    if not available(op, backend, device):
        raise BackendUnavailable(
            f"{op}: backend {backend!r} is not available for {device.type} tensors "
            f"(extension: {_extension.build_info()}; see escape_fast.info())"
        )
    return backend


CPU_ISAS = ("baseline", "avx2", "avx512")


def cpu_isas() -> tuple[str, ...]:
    """The instruction sets the C++ CPU kernels can run on this CPU, lowest
    first (csrc/cpu/isa.h: baseline x86-64, AVX2 + FMA, AVX-512); () without
    the compiled extension."""
    return tuple(torch.ops.escape_fast.cpu_isas()) if _extension.LOADED else ()


def cpu_isa() -> str | None:
    """The instruction set the C++ CPU kernels run now: the best of
    :func:`cpu_isas`, unless the environment variable ESCAPE_FAST_CPU_ISA
    forced one at load or :func:`use_cpu_isa` set one; None without the extension."""
    return torch.ops.escape_fast.cpu_isa() if _extension.LOADED else None


@contextlib.contextmanager
def use_cpu_isa(name: str):
    """Run the C++ CPU kernels compiled for ``name`` (one of :func:`cpu_isas`)
    inside the block, for tests and benchmarks; every variant computes the same
    op (up to the rounding of fused multiply-adds)."""
    if name not in cpu_isas():
        raise BackendUnavailable(f"CPU ISA {name!r} is not available here (this CPU runs: "
                                 f"{', '.join(cpu_isas()) or 'no compiled kernels'})")
    previous = torch.ops.escape_fast.set_cpu_isa(name)
    try:
        yield
    finally:
        torch.ops.escape_fast.set_cpu_isa(previous)


def _kernel(op: str, backend: str):
    if backend == "triton":
        return _triton_op(op)
    return getattr(torch.ops.escape_fast, op)


# autograd and fake kernels of the compiled ops (escape_fast.registry; each Triton module
# attaches autograd to its own)
if _extension.LOADED:
    registry.register_fakes("escape_fast")
    registry.register_autograd("escape_fast")


# --------------------------------------------------------------------------
# public ops
# --------------------------------------------------------------------------
def prototype_heatmaps(features: torch.Tensor, prototypes: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Heatmaps of prototypes on feature maps (eq. 1), differentiable in both inputs.

    Args:
        features (Tensor[B, C, H, W]): dense features.
        prototypes (Tensor[B, K, C]): one prototype per keypoint.
    Returns:
        Tensor[B, K, H, W]: ``H[b, k, y, x] = <features[b, :, y, x], prototypes[b, k]>``.
    """
    op, sizes = "prototype_heatmaps", {}
    _expect(op, "features", features, ("B", "C", "H", "W"), sizes)
    _expect(op, "prototypes", prototypes, ("B", "K", "C"), sizes)
    _same_device(op, features=features, prototypes=prototypes)
    _finite(op, prototypes=prototypes)
    chosen = resolve(op, backend, features.device)
    if chosen == "reference":
        heatmaps = reference.prototype_heatmaps(features, prototypes)
    else:
        heatmaps = _kernel(op, chosen)(features, prototypes)
    _finite_output(op, heatmaps.detach(), "heatmaps", features=features)
    return heatmaps


def decode_heatmaps(
    heatmaps: torch.Tensor,
    center: torch.Tensor,
    scale: torch.Tensor,
    kernel: int = 15,
    backend: str = "auto",
    rotation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keypoint locations from heatmaps (docs/method.md, "Decoding"), in original image pixels.

    Args:
        heatmaps (Tensor[B, K, H, W]): one map per keypoint.
        center (Tensor[B, 2]): crop center (x, y) in image pixels.
        scale (Tensor[B, 2]): padded box size / 200 (mmpose convention).
        kernel (int): odd side of the mean filter (15).
        rotation (Tensor[B] | None): crop rotation in degrees (0 at test time).
    Returns:
        (Tensor[B, K, 2], Tensor[B, K]): coordinates (x, y) and smoothed peak values.
    """
    op, sizes = "decode_heatmaps", {}
    _expect(op, "heatmaps", heatmaps, ("B", "K", "H", "W"), sizes)
    center, scale, rotation = _crop_args(op, center, scale, rotation, sizes)
    _check_kernel(op, kernel)
    _same_device(op, heatmaps=heatmaps, center=center, scale=scale, rotation=rotation)
    _finite(op, center=center, scale=scale, rotation=rotation)
    chosen = resolve(op, backend, heatmaps.device)
    if chosen == "reference":
        coords, peaks = reference.decode_heatmaps(heatmaps, center, scale, kernel, rotation)
    else:
        dtype = heatmaps.dtype
        coords, peaks = _kernel(op, chosen)(heatmaps, center.to(dtype), scale.to(dtype), rotation.to(dtype), kernel)
    _finite_output(op, peaks, "smoothed heatmaps", heatmaps=heatmaps)  # a non-finite map has a NaN peak
    return coords, peaks


def heatmap_decode(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    center: torch.Tensor,
    scale: torch.Tensor,
    kernel: int = 15,
    backend: str = "auto",
    rotation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``decode_heatmaps(prototype_heatmaps(features, prototypes), ...)``, fused.

    Args:
        features (Tensor[B, C, H, W]), prototypes (Tensor[B, K, C]),
        center (Tensor[B, 2]), scale (Tensor[B, 2]), kernel (int),
        rotation (Tensor[B] | None): as in the two ops above.
    Returns:
        (Tensor[B, K, 2], Tensor[B, K]): image coordinates and peak values.
    """
    op, sizes = "heatmap_decode", {}
    _expect(op, "features", features, ("B", "C", "H", "W"), sizes)
    _expect(op, "prototypes", prototypes, ("B", "K", "C"), sizes)
    center, scale, rotation = _crop_args(op, center, scale, rotation, sizes)
    _check_kernel(op, kernel)
    _same_device(op, features=features, prototypes=prototypes, center=center, scale=scale, rotation=rotation)
    _finite(op, prototypes=prototypes, center=center, scale=scale, rotation=rotation)
    chosen = resolve(op, backend, features.device)
    if chosen == "reference":
        coords, peaks = reference.heatmap_decode(features, prototypes, center, scale, kernel, rotation)
    else:
        dtype = features.dtype
        coords, peaks = _kernel(op, chosen)(
            features, prototypes.to(dtype), center.to(dtype), scale.to(dtype), rotation.to(dtype), kernel
        )
    _finite_output(op, peaks, "heatmaps", features=features)  # a non-finite map has a NaN peak
    return coords, peaks


def smooth_features(features: torch.Tensor, kernel: int = 15, backend: str = "auto") -> torch.Tensor:
    """The decoder's in-image mean filter applied to every feature channel.

    The filter is linear and a heatmap is linear in the features, so
    ``heatmap_decode(smooth_features(F, k), P, ..., kernel=1)`` equals
    ``heatmap_decode(F, P, ..., kernel=k)`` up to float rounding (argmax ties
    may rarely fall the other way). An evaluation decodes each query's
    feature map against hundreds of prototypes: filtering its C channels
    once replaces filtering every one of those heatmaps.

    Args:
        features (Tensor[B, C, H, W]), kernel (int): odd window side (15).
        backend: "cpu" (the C++ kernel, filtering each plane in place, the
            same bits as the torch path), or anything else: two avg_pool2d
            (differentiable; what "auto" runs on a GPU or when a gradient is
            needed).
    Returns:
        Tensor[B, C, H, W]: the mean over the in-image cells of each window.
    """
    op, sizes = "smooth_features", {}
    _expect(op, "features", features, ("B", "C", "H", "W"), sizes)
    _check_kernel(op, kernel)
    if kernel == 1:
        return features.contiguous()
    needs_grad = torch.is_grad_enabled() and features.requires_grad
    if backend in ("auto", "cpu") and not needs_grad and resolve(op, backend, features.device) == "cpu":
        return _kernel(op, "cpu")(features, kernel)
    pad = kernel // 2
    pool = torch.nn.functional.avg_pool2d
    # Separable: the product of the two 1-D in-image counts is the 2-D one.
    # Channels-last pooling vectorizes over channels (3x faster on CPU).
    x = features.contiguous(memory_format=torch.channels_last)
    rows = pool(x, (1, kernel), stride=1, padding=(0, pad), count_include_pad=False)
    return pool(rows, (kernel, 1), stride=1, padding=(pad, 0), count_include_pad=False).contiguous()


def _check_kernel(op: str, kernel: int):
    if not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"{op}: kernel must be a positive odd int, got {kernel!r}")


def keypoint_pool(
    features: torch.Tensor,
    keypoints: torch.Tensor,
    visible: torch.Tensor,
    sigma: float = 2.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Gaussian-weighted keypoint features (docs/method.md, "Keypoint features"), differentiable in ``features``.

    Args:
        features (Tensor[B, C, H, W]): dense features.
        keypoints (Tensor[B, K, 2]): (x, y) in heatmap-cell units.
        visible (Tensor[B, K]): bool (or 0/1); invisible keypoints pool to 0.
        sigma (float): Gaussian width in cells (window of +-3 sigma).
    Returns:
        Tensor[B, K, C]: ``sum_p F[:, p] G[p] / sum_p G[p]``.
    """
    op, sizes = "keypoint_pool", {}
    _expect(op, "features", features, ("B", "C", "H", "W"), sizes)
    _expect(op, "keypoints", keypoints, ("B", "K", 2), sizes)
    _expect(op, "visible", visible, ("B", "K"), sizes, floating=False)
    if not sigma > 0:
        raise ValueError(f"{op}: sigma must be > 0, got {sigma!r}")
    _same_device(op, features=features, keypoints=keypoints, visible=visible)
    _finite(op, keypoints=keypoints)
    chosen = resolve(op, backend, features.device)
    if chosen == "reference":
        pooled = reference.keypoint_pool(features, keypoints, visible, float(sigma))
    else:
        pooled = _kernel(op, chosen)(features, keypoints.to(features.dtype), visible.bool(), float(sigma))
    # a NaN or Inf inside a keypoint's window reaches its pooled vector; values outside every window are not read
    _finite_output(op, pooled.detach(), "pooled features", features=features)
    return pooled


def sinkhorn_log(
    scores: torch.Tensor,
    bin_score: torch.Tensor | float,
    valid: torch.Tensor,
    iters: int = 50,
    backend: str = "auto",
) -> torch.Tensor:
    """Log-domain optimal transport with a dustbin row (docs/method.md, "Matching network"), differentiable.

    Args:
        scores (Tensor[B, M, N]): keypoint x super-keypoint scores.
        bin_score (Tensor[] | Tensor[B] | float): the dustbin row's score.
        valid (Tensor[B, M]): bool; invalid rows are masked out.
        iters (int): Sinkhorn iterations (50).
    Returns:
        Tensor[B, M + 1, N]: log assignment shifted by +log N (a valid row sums
        to 1 at convergence); row M is the dustbin. At least float32.
    """
    op, sizes = "sinkhorn_log", {}
    _expect(op, "scores", scores, ("B", "M", "N"), sizes)
    _expect(op, "valid", valid, ("B", "M"), sizes, floating=False)
    if not isinstance(bin_score, torch.Tensor):
        bin_score = torch.tensor(float(bin_score), dtype=scores.dtype, device=scores.device)
    if bin_score.numel() not in (1, sizes["B"]) or bin_score.dim() > 1:
        raise ValueError(f"{op}: bin_score must be a scalar or [B] with B={sizes['B']}, got {_shape_str(bin_score)}")
    if sizes["N"] == 0:
        raise ValueError(f"{op}: scores must have at least one column (N >= 1), got {_shape_str(scores)}")
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"{op}: iters must be a non-negative int, got {iters!r}")
    _same_device(op, scores=scores, bin_score=bin_score, valid=valid)
    _finite(op, scores=scores, bin_score=bin_score)
    chosen = resolve(op, backend, scores.device)
    if chosen == "reference":
        return reference.sinkhorn_log(scores, bin_score, valid, iters)
    work = torch.promote_types(scores.dtype, torch.float32)
    bins = bin_score.to(work).reshape(-1).expand(sizes["B"]) if bin_score.numel() == 1 else bin_score.to(work)
    log_p, _, _ = _kernel(op, chosen)(scores.to(work), bins, valid.bool(), iters)
    return log_p


def fuse_shot_scores(scores: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average score matrices over shots (keypoints visible in that shot only).

    Args:
        scores (Tensor[B, S, M, N]), visible (Tensor[B, S, M]).
    Returns:
        (Tensor[B, M, N], Tensor[B, M] bool): fused scores and row validity.
    """
    op, sizes = "fuse_shot_scores", {}
    _expect(op, "scores", scores, ("B", "S", "M", "N"), sizes)
    _expect(op, "visible", visible, ("B", "S", "M"), sizes, floating=False)
    return reference.fuse_shot_scores(scores, visible)


def knn(
    queries: torch.Tensor,
    base: torch.Tensor,
    k: int,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine neighbours with an optional same-label exclusion.

    Args:
        queries (Tensor[N, C]), base (Tensor[M, C]): vectors (any norm).
        k (int): neighbours per query.
        exclude ((Tensor[N], Tensor[M]) | None): labels; equal labels never pair.
    Returns:
        (Tensor[N, k], Tensor[N, k] int64): similarities (descending) and base
        indices; (-inf, -1) where fewer than k candidates exist.
    """
    op, sizes = "knn", {}
    _expect(op, "queries", queries, ("N", "C"), sizes)
    _expect(op, "base", base, ("M", "C"), sizes)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"{op}: k must be a positive int, got {k!r}")
    if exclude is not None:
        _expect(op, "exclude[0] (query labels)", exclude[0], ("N",), sizes, floating=False)
        _expect(op, "exclude[1] (base labels)", exclude[1], ("M",), sizes, floating=False)
    _same_device(op, queries=queries, base=base)
    _finite(op, queries=queries, base=base)
    if backend not in SEARCH_BACKENDS:
        raise ValueError(f"{op}: backend must be one of {SEARCH_BACKENDS}, got {backend!r}")
    if backend == "reference":
        return reference.knn(queries, base, k, exclude)
    from escape_fast import neighbors

    return neighbors.knn(queries, base, k, exclude, backend=backend)


def cluster_keypoints(
    vectors: torch.Tensor,
    categories: torch.Tensor,
    threshold: float = 0.8,
    k: int = 6,
    backend: str = "auto",
    growth: str = "exclusive",
) -> tuple[torch.Tensor, torch.Tensor]:
    """kNN density-peaks clustering into super-keypoints (docs/method.md, "Clustering").

    Args:
        vectors (Tensor[N, C]): one vector per keypoint.
        categories (Tensor[N]): category of each vector; one category never
            appears twice in a cluster.
        threshold (float): cosine similarity a neighbour must exceed (0.8).
        k (int): neighbours in the density estimate (6).
        growth (str): "exclusive" (a cluster takes unassigned vectors only) or
            "shared" (the authors' rule: each category's most similar vector,
            even one another cluster holds; see reference.cluster_keypoints).
            The op's default is the paper's reading (docs/method.md; each vector
            in one cluster), the same default as reference.cluster_keypoints;
            training asks for "shared" (config ``cluster.growth``), which won
            on the validation categories (benchmarks/RESULTS.md).
    Returns:
        (Tensor[L, C], Tensor[N] int64): super-keypoints (mean of members) and
        the cluster of each vector.
    """
    op, sizes = "cluster_keypoints", {}
    _expect(op, "vectors", vectors, ("N", "C"), sizes)
    _expect(op, "categories", categories, ("N",), sizes, floating=False)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"{op}: k must be a positive int, got {k!r}")
    if not -1.0 <= threshold <= 1.0 or math.isnan(threshold):
        raise ValueError(f"{op}: threshold must be a cosine similarity in [-1, 1], got {threshold!r}")
    _same_device(op, vectors=vectors, categories=categories)
    _finite(op, vectors=vectors)
    if backend not in SEARCH_BACKENDS:
        raise ValueError(f"{op}: backend must be one of {SEARCH_BACKENDS}, got {backend!r}")
    if backend == "reference":
        return reference.cluster_keypoints(vectors, categories, threshold, k, growth)
    from escape_fast import neighbors

    return neighbors.cluster_keypoints(vectors, categories, threshold, k, backend=backend, growth=growth)
