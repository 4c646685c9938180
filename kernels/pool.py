"""Triton Gaussian-weighted keypoint pooling: ``escape_fast_triton::keypoint_pool``
and ``escape_fast_triton::keypoint_pool_backward`` (same schema as csrc/ops.cpp).

The Gaussian of a keypoint at (x, y) covers the cells with |px - x| <= 3 sigma
and |py - y| <= 3 sigma (escape_fast.reference). Both kernels address that
window as a fixed power-of-two tile of WIN candidate columns (and rows) that
starts one cell left of floor(x - 3 sigma); the exact window test, done in
the tensor's dtype like the reference, masks the tile. The normalizer is
(sum_x gx) * (sum_y gy) because the Gaussian factors per axis.

* forward: one program per (keypoint, BLOCK_C channels) walks the window row
  by row, loading a [BLOCK_C, WIN] tile per row (masked loads read only the
  in-image window).
* backward: a gather, one program per (image, BLOCK_P cells, BLOCK_C
  channels) that loops over the image's keypoints in order; each output
  element is produced by one program in a fixed order, so the gradient is
  deterministic without atomics.

float32 and float64 (tl.exp on float64 goes through libdevice on NVIDIA).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


def _window_tile(sigma: float) -> int:
    # The window spans at most floor(6 sigma) + 1 cells; the tile starts up to
    # two cells early (floor of a rounded x - 3 sigma, minus one) and needs a
    # power-of-two size for tl.arange.
    return triton.next_power_of_2(math.floor(6.0 * sigma) + 4)


@triton.jit
def _axis_weights(center, radius, two_s2, size, WIN: tl.constexpr):
    """Candidate cells [start, start + WIN) of one axis and their Gaussian
    factors (0 outside the window or the image)."""
    # Keypoints far outside are clamped to a place that is still outside (so
    # the int conversion cannot overflow); they keep an empty window.
    c = tl.minimum(tl.maximum(center, -2.0 * radius - 2.0), size + 2.0 * radius + 2.0)
    start = tl.floor(c - radius).to(tl.int32) - 1
    cells = start + tl.arange(0, WIN)
    d = cells.to(center.dtype) - center
    inside = (tl.abs(d) <= radius) & (cells >= 0) & (cells < size)
    g = tl.where(inside, tl.exp(-(d * d) / two_s2), 0.0)
    return start, g


@triton.jit
def _keypoint_window(keypoints_ptr, visible_ptr, bk, radius, two_s2, H, W, WIN: tl.constexpr):
    """Keypoint bk of the contiguous keypoints [B*K, 2] / visible [B*K]:
    (x, y, visible, window corner x0, y0, axis factors gx, gy, 1 / normalizer
    (0 for an invisible keypoint or an empty window))."""
    x = tl.load(keypoints_ptr + 2 * bk)
    y = tl.load(keypoints_ptr + 2 * bk + 1)
    vis = tl.load(visible_ptr + bk) != 0
    x0, gx = _axis_weights(x, radius, two_s2, W, WIN)
    y0, gy = _axis_weights(y, radius, two_s2, H, WIN)
    norm = tl.sum(gx, axis=0) * tl.sum(gy, axis=0)
    scale = tl.where(vis & (norm > 0), 1.0 / tl.where(norm > 0, norm, 1.0), 0.0)
    return x, y, vis, x0, y0, gx, gy, scale


@triton.jit
def _pool_forward_kernel(
    features_ptr, keypoints_ptr, visible_ptr, consts_ptr, out_ptr,
    K, C, H, W,
    stride_fb, stride_fc, stride_fh, stride_fw,
    BLOCK_C: tl.constexpr, WIN: tl.constexpr,
):
    bk = tl.program_id(0)
    b = (bk // K).to(tl.int64)  # 64-bit offsets: B * C * H * W may pass 2^31
    radius = tl.load(consts_ptr)
    two_s2 = tl.load(consts_ptr + 1)
    # an empty window or an invisible keypoint pools to zero (scale 0)
    x, y, vis, x0, y0, gx, gy, scale = _keypoint_window(keypoints_ptr, visible_ptr, bk, radius, two_s2, H, W, WIN)

    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    px = x0 + tl.arange(0, WIN)
    base = features_ptr + b * stride_fb + cs[:, None] * stride_fc + px[None, :] * stride_fw
    acc = tl.zeros((BLOCK_C,), dtype=gx.dtype)
    for j in range(WIN):
        py = y0 + j
        dy = py.to(y.dtype) - y
        row_on = (tl.abs(dy) <= radius) & (py >= 0) & (py < H) & vis
        # Row weights gx * gy: > 0 exactly on the in-image window (each factor
        # is >= exp(-4.5) there), so masked loads read only the window.
        w_row = gx * tl.where(row_on, tl.exp(-(dy * dy) / two_s2), 0.0)
        mask = (cs[:, None] < C) & (w_row > 0)[None, :]
        tile = tl.load(base + py * stride_fh, mask=mask, other=0.0)
        acc += tl.sum(tile * w_row[None, :], axis=1)
    tl.store(out_ptr + bk * C + cs, acc * scale, mask=cs < C)


@triton.jit
def _pool_backward_kernel(
    grad_ptr, keypoints_ptr, visible_ptr, consts_ptr, out_ptr,
    K, C, H, W, cell_blocks,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, WIN: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // cell_blocks).to(tl.int64)  # 64-bit offsets: B * C * H * W may pass 2^31
    cells = (pid % cell_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    cell_on = cells < H * W
    px = (cells % W).to(tl.float32)
    py = (cells // W).to(tl.float32)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_on = cs < C
    radius = tl.load(consts_ptr)
    two_s2 = tl.load(consts_ptr + 1)

    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=radius.dtype)
    for k in range(K):
        x, y, vis, _, _, _, _, scale = _keypoint_window(keypoints_ptr, visible_ptr, b * K + k, radius, two_s2, H, W,
                                                        WIN)
        dx = px.to(x.dtype) - x
        dy = py.to(y.dtype) - y
        on = (tl.abs(dx) <= radius) & (tl.abs(dy) <= radius) & cell_on
        w = tl.where(on, tl.exp(-(dx * dx + dy * dy) / two_s2) * scale, 0.0)
        g = tl.load(grad_ptr + (b * K + k) * C + cs, mask=c_on, other=0.0)
        acc += g[:, None] * w[None, :]
    out = out_ptr + (b * C + cs[:, None]) * (H * W) + cells[None, :]
    tl.store(out, acc, mask=c_on[:, None] & cell_on[None, :])


def _check(op: str, main: torch.Tensor, keypoints: torch.Tensor, visible: torch.Tensor, sigma: float):
    if main.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: float32 or float64 expected, got {main.dtype}")
    if keypoints.dtype != main.dtype:
        raise TypeError(f"{op}: keypoints must have dtype {main.dtype}, got {keypoints.dtype}")
    if visible.dtype != torch.bool:
        raise TypeError(f"{op}: visible must be bool, got {visible.dtype}")
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"{op}: sigma must be a positive finite float, got {sigma!r}")


def _consts(sigma: float, like: torch.Tensor) -> torch.Tensor:
    # Radius and 2 sigma^2 in the tensor's dtype, as the reference computes
    # them: a Python float kernel argument would be narrowed to float32.
    return torch.tensor([3.0 * sigma, 2.0 * sigma * sigma], dtype=like.dtype, device=like.device)


@torch.library.triton_op("escape_fast_triton::keypoint_pool", mutates_args=())
def keypoint_pool(features: torch.Tensor, keypoints: torch.Tensor, visible: torch.Tensor, sigma: float) -> torch.Tensor:
    _check("keypoint_pool", features, keypoints, visible, sigma)
    b, c, h, w = features.shape
    k = keypoints.shape[1]
    out = torch.zeros(b, k, c, dtype=features.dtype, device=features.device)
    if out.numel() == 0 or h == 0 or w == 0:
        return out
    block_c = 32
    grid = (b * k, triton.cdiv(c, block_c))
    torch.library.wrap_triton(_pool_forward_kernel)[grid](
        features, keypoints.contiguous(), visible.contiguous(), _consts(sigma, features), out,
        k, c, h, w,
        *features.stride(),
        BLOCK_C=block_c, WIN=_window_tile(sigma),
    )
    return out


@torch.library.triton_op("escape_fast_triton::keypoint_pool_backward", mutates_args=())
def keypoint_pool_backward(
    grad: torch.Tensor, keypoints: torch.Tensor, visible: torch.Tensor, sigma: float, height: int, width: int
) -> torch.Tensor:
    _check("keypoint_pool_backward", grad, keypoints, visible, sigma)
    b, k, c = grad.shape
    out = torch.zeros(b, c, height, width, dtype=grad.dtype, device=grad.device)
    if out.numel() == 0 or k == 0:
        return out
    # 128 cells x 32 channels of accumulators: 32 registers a thread at 4 warps.
    block_p, block_c = 128, 32
    cell_blocks = triton.cdiv(height * width, block_p)
    grid = (b * cell_blocks, triton.cdiv(c, block_c))
    torch.library.wrap_triton(_pool_backward_kernel)[grid](
        grad.contiguous(), keypoints.contiguous(), visible.contiguous(), _consts(sigma, grad), out,
        k, c, height, width, cell_blocks,
        BLOCK_P=block_p, BLOCK_C=block_c, WIN=_window_tile(sigma),
    )
    return out


from escape_fast.registry import register_autograd  # noqa: E402  (after the ops above exist)

register_autograd("escape_fast_triton")
