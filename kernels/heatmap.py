"""Triton kernels of the heatmap ops (specification: escape_fast/reference.py).

Registers ``escape_fast_triton::prototype_heatmaps``, ``decode_heatmaps`` and
the fused ``heatmap_decode`` with the signatures of csrc/ops.cpp.

One program decodes one (b, k) map held whole in registers as a
[BLOCK_H, BLOCK_W] block (powers of two >= 16, masked to H x W):

* the in-image box filter is two small matmuls with 0/1 band matrices,
  ``rows = map @ Bw`` then ``Bh @ rows`` (the tensor cores do the window sums;
  ``input_precision="ieee"`` keeps float32 exact instead of TF32), and the
  in-image cell count is the product of the band matrices' column/row sums;
* the argmax takes the maximum, then the smallest row-major index holding it,
  so ties go to the first maximum explicitly (no reliance on tl.argmax's
  tie rule);
* the quarter-cell shift reads the neighbours by masked sums over the block.

The fused kernel computes the map from the features (a loop over channels,
BLOCK_C at a time) and decodes it without ever storing it. Grids larger than
about 128 x 128 make the per-program block large and slow; the C++/CUDA
kernels are the fast path there. float32 and float64 are supported (Triton's
dot has an fp64 path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from escape_fast.reference import PIXEL_STD as _PIXEL_STD

PIXEL_STD = tl.constexpr(_PIXEL_STD)  # a module global that a Triton kernel reads must be a constexpr


@triton.jit
def _decode_block(
    hm,  # [BLOCK_H, BLOCK_W] map, zero outside H x W
    b,
    bk,
    H,
    W,
    R,
    center_ptr,
    scale_ptr,
    rot_ptr,
    coord_ptr,
    value_ptr,
    stride_cb,
    stride_cd,
    stride_sb,
    stride_sd,
    stride_rb,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    dtype = hm.dtype
    ys = tl.arange(0, BLOCK_H)
    xs = tl.arange(0, BLOCK_W)
    # Band matrices: Bw[j, x] = 1 where cell j is in the image and |j - x| <= R.
    bw = (tl.abs(xs[:, None] - xs[None, :]) <= R) & (xs[:, None] < W)
    bh = (tl.abs(ys[:, None] - ys[None, :]) <= R) & (ys[None, :] < H)
    bw = bw.to(dtype)
    bh = bh.to(dtype)
    rows = tl.dot(hm, bw, input_precision="ieee", out_dtype=dtype)
    summed = tl.dot(bh, rows, input_precision="ieee", out_dtype=dtype)
    count = tl.sum(bh, axis=1)[:, None] * tl.sum(bw, axis=0)[None, :]
    valid = (ys[:, None] < H) & (xs[None, :] < W)
    smooth = summed / tl.where(valid, count, 1.0)

    # First maximum in row-major order of the H x W map.
    flat = ys[:, None] * W + xs[None, :]
    masked = tl.where(valid, smooth, float("-inf"))
    best_v = tl.max(tl.max(masked, axis=1), axis=0)
    # a NaN or infinite cell makes the peak NaN (the public op's finite check reads the peaks)
    finite = (smooth == smooth) & (tl.abs(smooth) < float("inf"))
    all_finite = tl.min(tl.min(tl.where(valid & ~finite, 0, 1), axis=1), axis=0)
    big = H * W
    best = tl.min(tl.min(tl.where(masked == best_v, flat, big), axis=1), axis=0)
    x = best % W
    y = best // W

    # Quarter-cell shift on the smoothed map, only strictly inside the border.
    kept = tl.where(valid, smooth, 0.0)
    right = tl.sum(tl.sum(tl.where(flat == best + 1, kept, 0.0), axis=1), axis=0)
    left = tl.sum(tl.sum(tl.where(flat == best - 1, kept, 0.0), axis=1), axis=0)
    down = tl.sum(tl.sum(tl.where(flat == best + W, kept, 0.0), axis=1), axis=0)
    up = tl.sum(tl.sum(tl.where(flat == best - W, kept, 0.0), axis=1), axis=0)
    dx = (right > left).to(dtype) - (right < left).to(dtype)
    dy = (down > up).to(dtype) - (down < up).to(dtype)
    inside = (x > 1) & (x < W - 1) & (y > 1) & (y < H - 1)
    px = x.to(dtype) + tl.where(inside, 0.25 * dx, 0.0)
    py = y.to(dtype) + tl.where(inside, 0.25 * dy, 0.0)

    # Crop inverse map, in the operation order of reference.heatmap_to_image.
    cx = tl.load(center_ptr + b * stride_cb)
    cy = tl.load(center_ptr + b * stride_cb + stride_cd)
    sx = tl.load(scale_ptr + b * stride_sb)
    sy = tl.load(scale_ptr + b * stride_sb + stride_sd)
    rot = tl.load(rot_ptr + b * stride_rb)
    # W and H as dtype (zeros_like + int also works where Triton made W a constexpr).
    wf = tl.zeros_like(sx) + W
    hf = tl.zeros_like(sy) + H
    ox = (px - wf / 2.0) * ((PIXEL_STD * sx) / wf)
    oy = (py - hf / 2.0) * ((PIXEL_STD * sy) / hf)
    theta = rot * 0.017453292519943295  # deg2rad, the constant rounded to dtype
    c = tl.cos(theta)
    s = tl.sin(theta)
    tl.store(coord_ptr + bk * 2, ox * c - oy * s + cx)
    tl.store(coord_ptr + bk * 2 + 1, ox * s + oy * c + cy)
    tl.store(value_ptr + bk, tl.where(all_finite > 0, best_v, float("nan")))


@triton.jit
def _decode_kernel(
    src_ptr,  # FUSED: features [B, C, H, W]; else heatmaps [B, K, H, W]
    proto_ptr,  # FUSED: prototypes [B, K, C]; else unused
    center_ptr,
    scale_ptr,
    rot_ptr,
    coord_ptr,
    value_ptr,
    C,
    H,
    W,
    K,
    R,
    stride_sb,
    stride_s1,  # channel stride of the features, or keypoint stride of the heatmaps
    stride_sh,
    stride_sw,
    stride_pb,
    stride_pk,
    stride_pc,
    stride_cb,
    stride_cd,
    stride_sclb,
    stride_scld,
    stride_rb,
    FUSED: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """One program decodes map (b, k): computed from the features (FUSED, the
    map never leaves registers) or read from the heatmaps."""
    bk = tl.program_id(0)
    b = bk // K
    k = bk % K
    ys = tl.arange(0, BLOCK_H)
    xs = tl.arange(0, BLOCK_W)
    pix = (ys[:, None] < H) & (xs[None, :] < W)
    pix_off = ys[:, None] * stride_sh + xs[None, :] * stride_sw
    if FUSED:
        cs = tl.arange(0, BLOCK_C)
        hm = tl.zeros((BLOCK_H, BLOCK_W), dtype=src_ptr.dtype.element_ty)
        # BLOCK_C channel planes are loaded per step (coalesced along x) and
        # reduced against their prototype weights
        for c0 in range(0, C, BLOCK_C):
            ch = c0 + cs
            w = tl.load(proto_ptr + b * stride_pb + k * stride_pk + ch * stride_pc, mask=ch < C, other=0.0)
            f = tl.load(
                src_ptr + b * stride_sb + ch[:, None, None] * stride_s1 + pix_off[None, :, :],
                mask=(ch[:, None, None] < C) & pix[None, :, :],
                other=0.0,
            )
            hm += tl.sum(w[:, None, None] * f, axis=0)
    else:
        hm = tl.load(src_ptr + b * stride_sb + k * stride_s1 + pix_off, mask=pix, other=0.0)
    _decode_block(
        hm, b, bk, H, W, R, center_ptr, scale_ptr, rot_ptr, coord_ptr, value_ptr,
        stride_cb, stride_cd, stride_sclb, stride_scld, stride_rb, BLOCK_H, BLOCK_W,
    )


@triton.jit
def _prototype_heatmaps_kernel(
    feat_ptr,
    proto_ptr,
    out_ptr,
    C,
    W,
    HW,
    K,
    stride_fb,
    stride_fc,
    stride_fh,
    stride_fw,
    stride_pb,
    stride_pk,
    stride_pc,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # One program per (b, k, BLOCK_P pixels); the output is contiguous.
    bk = tl.program_id(0)
    b = bk // K
    k = bk % K
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < HW
    p_off = (p // W) * stride_fh + (p % W) * stride_fw
    cs = tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_P,), dtype=feat_ptr.dtype.element_ty)
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + cs
        w = tl.load(proto_ptr + b * stride_pb + k * stride_pk + ch * stride_pc, mask=ch < C, other=0.0)
        f = tl.load(
            feat_ptr + b * stride_fb + ch[:, None] * stride_fc + p_off[None, :],
            mask=(ch[:, None] < C) & p_ok[None, :],
            other=0.0,
        )
        acc += tl.sum(w[:, None] * f, axis=0)
    tl.store(out_ptr + bk * HW + p, acc, mask=p_ok)


# --------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------
def _block(n: int) -> int:
    # tl.dot needs every dimension >= 16.
    return max(16, triton.next_power_of_2(max(n, 1)))


def _check_features(op: str, features: torch.Tensor, prototypes: torch.Tensor) -> None:
    if features.dim() != 4:
        raise ValueError(f"{op}: features must be [B, C, H, W], got {tuple(features.shape)}")
    if prototypes.dim() != 3 or prototypes.shape[0] != features.shape[0] or prototypes.shape[2] != features.shape[1]:
        raise ValueError(
            f"{op}: prototypes must be [B, K, C] with B={features.shape[0]} C={features.shape[1]}, "
            f"got {tuple(prototypes.shape)}"
        )
    if features.dtype not in (torch.float32, torch.float64) or prototypes.dtype != features.dtype:
        raise TypeError(f"{op}: features and prototypes must both be float32 or float64, got "
                        f"{features.dtype} and {prototypes.dtype}")


def _check_crop(op, ref, b, center, scale, rotation, kernel):
    if tuple(center.shape) != (b, 2) or tuple(scale.shape) != (b, 2) or tuple(rotation.shape) != (b,):
        raise ValueError(
            f"{op}: center, scale must be [B, 2] and rotation [B] with B={b}, got "
            f"{tuple(center.shape)}, {tuple(scale.shape)}, {tuple(rotation.shape)}"
        )
    if any(t.dtype != ref.dtype for t in (center, scale, rotation)):
        raise TypeError(f"{op}: center, scale and rotation must have dtype {ref.dtype}")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"{op}: kernel must be a positive odd int, got {kernel}")


@triton_op("escape_fast_triton::prototype_heatmaps", mutates_args=())
def prototype_heatmaps(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    _check_features("prototype_heatmaps", features, prototypes)
    b, c, h, w = features.shape
    k = prototypes.shape[1]
    out = features.new_empty(b, k, h, w)
    if out.numel() == 0:
        return out
    block_p = 128
    grid = (b * k, triton.cdiv(h * w, block_p))
    wrap_triton(_prototype_heatmaps_kernel)[grid](
        features, prototypes, out, c, w, h * w, k,
        *features.stride(), *prototypes.stride(),
        BLOCK_C=8, BLOCK_P=block_p,
    )
    return out


@triton_op("escape_fast_triton::decode_heatmaps", mutates_args=())
def decode_heatmaps(
    heatmaps: torch.Tensor, center: torch.Tensor, scale: torch.Tensor, rotation: torch.Tensor, kernel: int
) -> tuple[torch.Tensor, torch.Tensor]:
    op = "decode_heatmaps"
    if heatmaps.dim() != 4 or heatmaps.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: heatmaps must be a float32/float64 [B, K, H, W], got {heatmaps.dtype} "
                         f"{tuple(heatmaps.shape)}")
    b, k, h, w = heatmaps.shape
    _check_crop(op, heatmaps, b, center, scale, rotation, kernel)
    if b * k and h * w == 0:
        raise ValueError(f"{op}: empty heatmaps {tuple(heatmaps.shape)} have no maximum")
    return _decode(heatmaps, None, center, scale, rotation, k, kernel)


@triton_op("escape_fast_triton::heatmap_decode", mutates_args=())
def heatmap_decode(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    center: torch.Tensor,
    scale: torch.Tensor,
    rotation: torch.Tensor,
    kernel: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    op = "heatmap_decode"
    _check_features(op, features, prototypes)
    b, c, h, w = features.shape
    k = prototypes.shape[1]
    _check_crop(op, features, b, center, scale, rotation, kernel)
    if b * k and h * w == 0:
        raise ValueError(f"{op}: empty feature grid {tuple(features.shape)} has no maximum")
    return _decode(features, prototypes, center, scale, rotation, k, kernel)


def _decode(src, prototypes, center, scale, rotation, k: int, kernel: int):
    """Launch _decode_kernel: fused when ``prototypes`` is given (``src`` the
    features), else on the heatmaps ``src``."""
    b, c, h, w = src.shape
    coords = src.new_empty(b, k, 2)
    values = src.new_empty(b, k)
    if b * k == 0:
        return coords, values
    fused = prototypes is not None
    protos = prototypes if fused else src  # an unused pointer of the right type
    proto_strides = prototypes.stride() if fused else (0, 0, 0)
    wrap_triton(_decode_kernel)[(b * k,)](
        src, protos, center, scale, rotation, coords, values,
        c, h, w, k, min(kernel // 2, max(h, w)),
        *src.stride(), *proto_strides, *center.stride(), *scale.stride(), *rotation.stride(),
        FUSED=fused, BLOCK_C=4, BLOCK_H=_block(h), BLOCK_W=_block(w), num_warps=8,
    )
    return coords, values


from escape_fast.registry import register_autograd  # noqa: E402  (after the ops above exist)

register_autograd("escape_fast_triton")
