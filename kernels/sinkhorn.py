"""Log-domain Sinkhorn with a dustbin row (docs/method.md, "Matching network") in Triton.

One program per problem holds the whole padded (M + 1) x N coupling matrix
as a [BLOCK_M, BLOCK_N] tile in registers and runs every iteration on it, so
Z is read from global memory once per call instead of twice per iteration;
row and column logsumexps are tile reductions along axis 1 and axis 0. This
suits the problem sizes of ESCAPE (M + 1 = 69 rows, N up to a few hundred);
for much larger tiles the compiler spills and the CUDA kernel (which streams
Z from L2) is the one to use.

Semantics are those of escape_fast.reference.sinkhorn_log, and the backward
is the reverse replay described in csrc/cuda/sinkhorn.cu. float32 (and
float64 where the Triton build supports it; tests cover float32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _logsumexp(x, AXIS: tl.constexpr):
    # -inf when every term is -inf: the shift falls back to 0 so that no
    # -inf - -inf = NaN appears, and log(0) = -inf does the rest.
    mx = tl.max(x, axis=AXIS)
    shift = tl.where(mx == -float("inf"), 0.0, mx)
    if AXIS == 1:
        s = tl.sum(tl.exp(x - shift[:, None]), axis=1)
    else:
        s = tl.sum(tl.exp(x - shift[None, :]), axis=0)
    return shift + tl.log(s)


@triton.jit
def _load_problem(scores_ptr, bin_ptr, valid_ptr, uh_ptr, vh_ptr, M, N, iters, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Problem b = program 0: Z [BLOCK_M, BLOCK_N] with the dustbin row M = bin,
    the on rows, log_mu, log N, the row and column indices and masks, and
    the problem's history rows (u [iters, M + 1], v [iters, N]).

    Every tensor is contiguous (the wrappers make it so): scores [B, M, N],
    bins [B], valid [B, M]; so are the outputs, log_p [B, M + 1, N] and the
    histories [B, iters, M + 1] and [B, iters, N]."""
    b = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    is_kp = rows < M
    col_in = cols < N
    valid = tl.load(valid_ptr + b * M + rows, mask=is_kp, other=0) != 0
    on = valid | (rows == M)
    m_valid = tl.sum(valid.to(tl.int32), axis=0)
    bin_score = tl.load(bin_ptr + b)
    z = tl.load(
        scores_ptr + b * M * N + rows[:, None] * N + cols[None, :],
        mask=is_kp[:, None] & col_in[None, :],
        other=0.0,
    )
    z = tl.where((rows == M)[:, None], bin_score, z)
    # log N in the working dtype (a float argument would be float32 only)
    log_n = tl.log(tl.full([], N, z.dtype))
    # dustbin marginal max(N - M_valid, 0) / N; log(0) = -inf when the
    # keypoints fill every column
    mass = tl.maximum(N - m_valid, 0).to(z.dtype)
    log_mu = tl.where(rows == M, tl.log(mass) - log_n, -log_n).to(z.dtype)
    u_hist = uh_ptr + b * iters * (M + 1)
    v_hist = vh_ptr + b * iters * N
    return b, z, bin_score, on, log_mu, log_n, rows, cols, col_in, rows <= M, u_hist, v_hist


@triton.jit
def _sinkhorn_fwd_kernel(
    scores_ptr, bin_ptr, valid_ptr, logp_ptr, uh_ptr, vh_ptr, M, N, iters,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b, z, bin_score, on, log_mu, log_n, rows, cols, col_in, row_in, u_hist, v_hist = _load_problem(
        scores_ptr, bin_ptr, valid_ptr, uh_ptr, vh_ptr, M, N, iters, BLOCK_M, BLOCK_N)
    u = tl.zeros([BLOCK_M], dtype=z.dtype)
    v = tl.zeros([BLOCK_N], dtype=z.dtype)
    for t in range(iters):
        # row step over the real columns; off rows keep u = 0
        x = tl.where(col_in[None, :], z + v[None, :], -float("inf"))
        u = tl.where(on, log_mu - _logsumexp(x, 1), 0.0)
        # column step over the on rows; padded columns are held at 0
        y = tl.where(on[:, None], z + u[:, None], -float("inf"))
        v = tl.where(col_in, -log_n - _logsumexp(y, 0), 0.0)
        tl.store(u_hist + t * (M + 1) + rows, u, mask=row_in)
        tl.store(v_hist + t * N + cols, v, mask=col_in)
    out = z + u[:, None] + v[None, :] + log_n
    tl.store(logp_ptr + b * (M + 1) * N + rows[:, None] * N + cols[None, :], out, mask=row_in[:, None] & col_in[None, :])


@triton.jit
def _sinkhorn_bwd_kernel(
    grad_ptr, scores_ptr, bin_ptr, valid_ptr, uh_ptr, vh_ptr, gs_ptr, gbin_ptr, M, N, iters,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b, z, bin_score, on, log_mu, log_n, rows, cols, col_in, row_in, u_hist, v_hist = _load_problem(
        scores_ptr, bin_ptr, valid_ptr, uh_ptr, vh_ptr, M, N, iters, BLOCK_M, BLOCK_N)
    tile_in = row_in[:, None] & col_in[None, :]
    on_tile = on[:, None] & col_in[None, :]
    g = tl.load(grad_ptr + b * (M + 1) * N + rows[:, None] * N + cols[None, :], mask=tile_in, other=0.0)
    # log_p = Z + u + v + log N: dZ starts at grad, du_T is the row sum on the
    # on rows (an invalid row's u is fixed at 0), dv_T the column sum over all rows
    dz = g
    du = tl.where(on, tl.sum(g, axis=1), 0.0)
    dv = tl.sum(g, axis=0)
    for i in range(iters):
        t = iters - i  # 1-based iteration being undone
        u = tl.load(u_hist + (t - 1) * (M + 1) + rows, mask=row_in, other=0.0)
        v = tl.load(v_hist + (t - 1) * N + cols, mask=col_in, other=0.0)
        # v_0 = 0: the index is clamped so that no address before the history is formed
        vp = tl.load(v_hist + tl.maximum(t - 2, 0) * N + cols, mask=col_in & (t >= 2), other=0.0)
        # column step: Pc = exp(Z + u_t + v_t + log N), normalised over the on rows by v_t
        pc = tl.where(on_tile, tl.exp(z + u[:, None] + v[None, :] + log_n), 0.0)
        g_col = dv[None, :] * pc
        dz -= g_col
        du = du - tl.sum(g_col, axis=1)
        # row step: Pr = softmax_c(Z + v_{t-1}) with normaliser log_mu - u_t; the
        # dustbin with no mass (log_mu = -inf) has the constant row bin, whose
        # normaliser is bin + logsumexp(v_{t-1})
        lse_bin = bin_score + _logsumexp(tl.where(col_in, vp, -float("inf"))[None, :], 1)
        no_mass = log_mu == -float("inf")
        lse = tl.where(no_mass, lse_bin, log_mu - tl.where(no_mass, 0.0, u))
        pr = tl.where(on_tile, tl.exp(z + vp[None, :] - lse[:, None]), 0.0)
        g_row = du[:, None] * pr
        dz -= g_row
        dv = -tl.sum(g_row, axis=0)
        du = tl.zeros([BLOCK_M], dtype=z.dtype)  # u_{t-1} only feeds v_{t-1}
    tl.store(gs_ptr + b * M * N + rows[:, None] * N + cols[None, :], dz, mask=(rows < M)[:, None] & col_in[None, :])
    gbin = tl.sum(tl.sum(tl.where((rows == M)[:, None] & col_in[None, :], dz, 0.0), axis=1), axis=0)
    tl.store(gbin_ptr + b, gbin)


def _blocks(m: int, n: int) -> tuple[int, int, int]:
    # powers of two for the tile; at least 16 so that every layout Triton
    # picks has whole warps along each axis
    block_m = max(16, triton.next_power_of_2(m + 1))
    block_n = max(16, triton.next_power_of_2(n))
    elems = block_m * block_n
    num_warps = 4 if elems <= 4096 else 8 if elems <= 16384 else 16
    return block_m, block_n, num_warps


def _check(op: str, scores, bin_score, valid):
    if scores.dim() != 3:
        raise ValueError(f"{op}: scores must be [B, M, N], got {tuple(scores.shape)}")
    b, m, n = scores.shape
    if n < 1:
        raise ValueError(f"{op}: scores needs at least one column, got {tuple(scores.shape)}")
    if scores.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: scores must be float32 or float64, got {scores.dtype}")
    if tuple(bin_score.shape) != (b,) or bin_score.dtype != scores.dtype:
        raise ValueError(f"{op}: bin_score must be [B] = [{b}] of {scores.dtype}, got {tuple(bin_score.shape)} "
                         f"of {bin_score.dtype}")
    if tuple(valid.shape) != (b, m) or valid.dtype != torch.bool:
        raise ValueError(f"{op}: valid must be bool [B, M] = [{b}, {m}], got {tuple(valid.shape)} of {valid.dtype}")


@torch.library.triton_op("escape_fast_triton::sinkhorn_log", mutates_args=())
def sinkhorn_log(
    scores: torch.Tensor, bin_score: torch.Tensor, valid: torch.Tensor, iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check("sinkhorn_log", scores, bin_score, valid)
    if iters < 0:
        raise ValueError(f"sinkhorn_log: iters must be >= 0, got {iters}")
    b, m, n = scores.shape
    log_p = scores.new_empty(b, m + 1, n)
    u_hist = scores.new_empty(b, iters, m + 1)
    v_hist = scores.new_empty(b, iters, n)
    if b == 0:
        return log_p, u_hist, v_hist
    block_m, block_n, num_warps = _blocks(m, n)
    torch.library.wrap_triton(_sinkhorn_fwd_kernel)[(b,)](
        scores.contiguous(), bin_score.contiguous(), valid.to(torch.uint8).contiguous(), log_p, u_hist, v_hist,
        m, n, iters, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return log_p, u_hist, v_hist


@torch.library.triton_op("escape_fast_triton::sinkhorn_log_backward", mutates_args=())
def sinkhorn_log_backward(
    grad: torch.Tensor,
    scores: torch.Tensor,
    bin_score: torch.Tensor,
    valid: torch.Tensor,
    u_history: torch.Tensor,
    v_history: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check("sinkhorn_log_backward", scores, bin_score, valid)
    b, m, n = scores.shape
    iters = u_history.shape[1] if u_history.dim() == 3 else -1
    if tuple(grad.shape) != (b, m + 1, n):
        raise ValueError(f"sinkhorn_log_backward: grad must be [B, M + 1, N] = [{b}, {m + 1}, {n}], "
                         f"got {tuple(grad.shape)}")
    if tuple(u_history.shape) != (b, iters, m + 1) or tuple(v_history.shape) != (b, iters, n):
        raise ValueError(f"sinkhorn_log_backward: histories must be [B, iters, M + 1] and [B, iters, N], got "
                         f"{tuple(u_history.shape)} and {tuple(v_history.shape)}")
    grad_scores = scores.new_empty(b, m, n)
    grad_bin = bin_score.new_empty(b)
    if b == 0:
        return grad_scores, grad_bin
    block_m, block_n, num_warps = _blocks(m, n)
    torch.library.wrap_triton(_sinkhorn_bwd_kernel)[(b,)](
        grad.contiguous(), scores.contiguous(), bin_score.contiguous(), valid.to(torch.uint8).contiguous(),
        u_history.contiguous(), v_history.contiguous(), grad_scores, grad_bin,
        m, n, iters, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return grad_scores, grad_bin


from escape_fast.registry import register_autograd  # noqa: E402  (after the ops above exist)

register_autograd("escape_fast_triton")
