"""The table of escape_fast's kernel ops: one entry per op, and everything derived from it.

Each op has one schema (csrc/ops.cpp), a C++ kernel per backend file that
registers it on its dispatch key (csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu), and
optionally a Triton kernel (a module of escape_fast.kernels registering
``escape_fast_triton::<op>`` with the same signature). :data:`OPS` names,
for each, its fake (meta) kernel, the op that computes its gradient and how
autograd is attached, and its Triton module. From it come:

* :data:`KERNEL_OPS`: the public ops that have kernels (escape_fast.ops);
* :data:`TRITON_MODULES`: op -> the Triton module that defines it
  (escape_fast.kernels.load);
* :func:`register_fakes` and :func:`register_autograd`: what escape_fast.ops
  attaches to the compiled ops and each Triton module to its own, so that
  both backends share one backward definition.

Which backends actually have a kernel is asked of the dispatcher at run time
(escape_fast._extension.has_kernel), so an op may exist on one backend only.
This module imports nothing of escape_fast: the Triton modules import it
without importing escape_fast.ops, which imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


# --------------------------------------------------------------------------
# fake kernels: the shapes and dtypes of the outputs
# --------------------------------------------------------------------------
def _decode_fake(maps, center, scale, rotation, kernel):
    b, k = maps.shape[:2]
    return maps.new_empty(b, k, 2), maps.new_empty(b, k)


def _fused_fake(features, prototypes, center, scale, rotation, kernel):
    b, k = prototypes.shape[:2]
    return features.new_empty(b, k, 2), features.new_empty(b, k)


def _heatmaps_fake(features, prototypes):
    b, _, h, w = features.shape
    return features.new_empty(b, prototypes.shape[1], h, w)


def _smooth_fake(features, kernel):
    return torch.empty_like(features, memory_format=torch.contiguous_format)


def _pool_fake(features, keypoints, visible, sigma):
    return features.new_empty(keypoints.shape[0], keypoints.shape[1], features.shape[1])


def _pool_backward_fake(grad, keypoints, visible, sigma, height, width):
    return grad.new_empty(grad.shape[0], grad.shape[2], height, width)


def _sinkhorn_fake(scores, bin_score, valid, iters):
    b, m, n = scores.shape
    work = torch.promote_types(scores.dtype, torch.float32)
    return (
        scores.new_empty(b, m + 1, n, dtype=work),
        scores.new_empty(b, iters, m + 1, dtype=work),
        scores.new_empty(b, iters, n, dtype=work),
    )


def _sinkhorn_backward_fake(grad, scores, bin_score, valid, u_hist, v_hist):
    return torch.empty_like(scores), torch.empty_like(bin_score)


# --------------------------------------------------------------------------
# autograd: each takes the forward op's qualified name and its backward op (or None)
# --------------------------------------------------------------------------
def _sinkhorn_autograd(forward: str, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        scores, bin_score, valid, _ = inputs
        _, u_hist, v_hist = output
        ctx.save_for_backward(scores, bin_score, valid, u_hist, v_hist)

    def backward(ctx, grad_logp, _gu, _gv):
        scores, bin_score, valid, u_hist, v_hist = ctx.saved_tensors
        grad_scores, grad_bin = backward_op(grad_logp.contiguous(), scores, bin_score, valid, u_hist, v_hist)
        return grad_scores, grad_bin, None, None

    torch.library.register_autograd(forward, backward, setup_context=setup_context)


def _pool_autograd(forward: str, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        features, keypoints, visible, sigma = inputs
        ctx.save_for_backward(keypoints, visible)
        ctx.sigma = sigma
        ctx.size = features.shape[-2:]

    def backward(ctx, grad):
        keypoints, visible = ctx.saved_tensors
        h, w = ctx.size
        return backward_op(grad.contiguous(), keypoints, visible, ctx.sigma, h, w), None, None, None

    torch.library.register_autograd(forward, backward, setup_context=setup_context)


def _heatmaps_autograd(forward: str, backward_op=None) -> None:
    # the gradient of an inner product is two more inner products: no kernel of its own
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad):
        features, prototypes = ctx.saved_tensors
        grad_features = torch.einsum("bkhw,bkc->bchw", grad, prototypes)
        grad_prototypes = torch.einsum("bkhw,bchw->bkc", grad, features)
        return grad_features, grad_prototypes

    torch.library.register_autograd(forward, backward, setup_context=setup_context)


# --------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class OpSpec:
    """One kernel op.

    ``fake``: its meta kernel; ``triton``: the module of escape_fast.kernels
    that defines its Triton kernel (None: no Triton kernel); ``autograd``:
    attaches its gradient, given the forward op's name and ``backward``'s op
    (None: not differentiable through this op); ``public``: reached through
    escape_fast.ops (False for a backward op)."""

    name: str
    fake: Callable
    triton: str | None = None
    autograd: Callable | None = None
    backward: str | None = None
    public: bool = True


OPS: tuple[OpSpec, ...] = (
    OpSpec("prototype_heatmaps", _heatmaps_fake, "heatmap", autograd=_heatmaps_autograd),
    OpSpec("decode_heatmaps", _decode_fake, "heatmap"),
    OpSpec("heatmap_decode", _fused_fake, "heatmap"),
    OpSpec("smooth_features", _smooth_fake),  # CPU only, no gradient: ops.smooth_features uses it when none is needed
    OpSpec("keypoint_pool", _pool_fake, "pool", autograd=_pool_autograd, backward="keypoint_pool_backward"),
    OpSpec("keypoint_pool_backward", _pool_backward_fake, "pool", public=False),
    OpSpec("sinkhorn_log", _sinkhorn_fake, "sinkhorn", autograd=_sinkhorn_autograd, backward="sinkhorn_log_backward"),
    OpSpec("sinkhorn_log_backward", _sinkhorn_backward_fake, "sinkhorn", public=False),
)
SPECS = {spec.name: spec for spec in OPS}
KERNEL_OPS = tuple(spec.name for spec in OPS if spec.public)
TRITON_MODULES = {spec.name: spec.triton for spec in OPS if spec.triton}


def register_fakes(namespace: str = "escape_fast") -> None:
    """The fake kernel of every op of ``namespace`` (the compiled ops; triton_op makes its own)."""
    for spec in OPS:
        if hasattr(getattr(torch.ops, namespace), spec.name):
            torch.library.register_fake(f"{namespace}::{spec.name}", spec.fake)


def register_autograd(namespace: str) -> None:
    """Attach autograd to the ops of ``namespace`` (escape_fast or escape_fast_triton) that exist there."""
    ops = getattr(torch.ops, namespace)
    for spec in OPS:
        if spec.autograd is None or not hasattr(ops, spec.name):
            continue
        if spec.backward is not None and not hasattr(ops, spec.backward):
            continue  # a forward without its backward kernel stays non-differentiable here
        spec.autograd(f"{namespace}::{spec.name}", getattr(ops, spec.backward) if spec.backward else None)
