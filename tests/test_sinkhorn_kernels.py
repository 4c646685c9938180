"""sinkhorn_log / sinkhorn_log_backward kernels (cpu, cuda, triton) against
escape_fast.reference.sinkhorn_log and autograd through it.

TestSinkhornLog runs the common checks of kernel_test_base.KernelOpTestBase
(forward log_p and the saved u / v histories) and adds the forward and
backward edge cases (all rows valid with M >= N, no row valid, iters = 0, an
empty batch), the backward kernel against autograd on the shape grid, and
bitwise layout independence of the backward.

Note on bin_score: with only a dustbin *row*, a constant row is absorbed by
its row potential in the first row step, so log_p does not depend on
bin_score once iters >= 1 and its exact gradient is 0; the kernels (like
autograd on the reference) return rounding residue there, which the
tolerances below are scaled for.
"""

from __future__ import annotations

import math
import os

import torch
from conftest import tol
from kernel_test_base import KernelOpTestBase, interpreted

from escape_fast import ops, reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# (M, N, iters): the grid of the brief, with fewer iterations for the big ones
SHAPES = [
    (1, 1, 7),
    (1, 100, 10),
    (17, 1, 10),
    (17, 100, 20),
    (68, 100, 20),
    (100, 100, 10),
    (68, 1000, 5),
    (100, 1000, 3),
]
# Triton under the interpreter is slow: tiny shapes only
TINY_SHAPES = [(1, 1, 3), (5, 7, 6), (17, 9, 4)]


def _op(backend: str, name: str = "sinkhorn_log"):
    return ops._kernel(name, backend)


def _shapes(backend):
    return TINY_SHAPES if backend == "triton" and INTERPRET else SHAPES


def _problem(b, m, n, dtype, device, mode="random", gen=None):
    scores = (torch.randn(b, m, n, generator=gen, dtype=torch.float64) * 2).to(dtype).to(device)
    bins = torch.randn(b, generator=gen, dtype=torch.float64).to(dtype).to(device)
    if mode == "random":
        valid = torch.rand(b, m, generator=gen) > 0.3
        if b > 1:
            valid[0] = False  # one problem with every row invalid
    elif mode == "full":
        valid = torch.ones(b, m, dtype=torch.bool)
    else:
        valid = torch.zeros(b, m, dtype=torch.bool)
    return scores, bins, valid.to(device)


def _history(scores, bins, valid, iters):
    """u and v after every iteration, by the reference's own loop (float64)."""
    z = torch.cat((scores, bins[:, None, None].expand(-1, 1, scores.shape[2])), dim=1).double()
    b, m1, n = z.shape
    on = torch.cat((valid, torch.ones(b, 1, dtype=torch.bool, device=valid.device)), dim=1)
    log_mu = torch.full((b, m1), -math.log(n), dtype=z.dtype, device=z.device)
    log_mu[:, -1] = torch.log((n - valid.sum(1).double()).clamp_min(0)) - math.log(n)
    u, v = torch.zeros(b, m1, dtype=z.dtype, device=z.device), torch.zeros(b, n, dtype=z.dtype, device=z.device)
    us, vs = [], []
    for _ in range(iters):
        u = torch.where(on, log_mu - torch.logsumexp(z + v[:, None], 2), 0.0)
        v = -math.log(n) - torch.logsumexp(torch.where(on[..., None], z + u[..., None], -math.inf), 1)
        us.append(u)
        vs.append(v)
    if not us:
        return z.new_zeros(b, 0, m1), z.new_zeros(b, 0, n)
    return torch.stack(us, 1), torch.stack(vs, 1)


def _assert_same_inf(actual, expected):
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected)), "-inf entries differ"
    assert not torch.isnan(actual).any(), "NaN in kernel output"


def _magnitude(expected):
    """max(1, the largest finite |value|): the atol scale of log_p."""
    finite = expected[expected.isfinite()]
    return max(1.0, finite.abs().max().item()) if finite.numel() else 1.0


def _close_finite(actual, expected, dtype, scale=1.0):
    _assert_same_inf(actual, expected)
    fin = torch.isfinite(expected)
    t = tol(dtype)
    torch.testing.assert_close(actual[fin], expected[fin].to(actual.dtype), rtol=t["rtol"], atol=t["atol"] * scale)


def _autograd_reference(scores, bins, valid, iters, grad):
    s = scores.detach().clone().requires_grad_()
    b = bins.detach().clone().requires_grad_()
    out = reference.sinkhorn_log(s, b, valid, iters)
    return torch.autograd.grad(out, (s, b), grad)


def _check_backward(backend, scores, bins, valid, iters, dtype, gen):
    """Kernel backward vs autograd through the reference on a random upstream gradient.

    float64: the autograd gradient, per-dtype tolerance. float32: the kernel's
    error against the float64 truth may be at most twice that of autograd in
    float32 (the flash-attention rule) plus rtol x the gradient's scale: the
    kernels take the softmax normalisers from the saved potentials instead of
    recomputing them, which costs a few ulp per iteration.
    """
    device = scores.device
    b, m, n = scores.shape
    log_p, u_hist, v_hist = _op(backend)(scores, bins, valid, iters)
    grad = torch.randn(b, m + 1, n, generator=gen, dtype=torch.float64).to(device)
    gs, gb = _op(backend, "sinkhorn_log_backward")(grad.to(dtype), scores, bins, valid, u_hist, v_hist)
    assert gs.shape == scores.shape and gb.shape == bins.shape and gs.dtype == dtype
    assert torch.isfinite(gs).all() and torch.isfinite(gb).all()
    true_s, true_b = _autograd_reference(scores.double(), bins.double(), valid, iters, grad)
    # grad_bin is 0 in exact arithmetic for iters >= 1: rounding residue of a
    # sum of ~N * iters terms of size |grad|
    eps = torch.finfo(dtype).eps
    bin_atol = 20 * eps * n * (iters + 1) * max(1.0, grad.abs().amax().item() if grad.numel() else 0.0)
    if dtype == torch.float64:
        scale = max(1.0, true_s.abs().amax().item() if true_s.numel() else 0.0)
        torch.testing.assert_close(gs, true_s, rtol=tol(dtype)["rtol"] * 10, atol=tol(dtype)["atol"] * scale * 10)
        torch.testing.assert_close(gb, true_b, rtol=1e-9, atol=bin_atol)
    else:
        ref_s, ref_b = _autograd_reference(scores, bins, valid, iters, grad.to(dtype))
        floor = tol(dtype)["rtol"] * max(1.0, true_s.abs().amax().item() if true_s.numel() else 0.0)
        err_kernel = (gs.double() - true_s).abs().amax().item() if gs.numel() else 0.0
        err_ref = (ref_s.double() - true_s).abs().amax().item() if gs.numel() else 0.0
        assert err_kernel <= 2 * err_ref + floor, f"grad_scores error {err_kernel:.3g} vs reference {err_ref:.3g}"
        torch.testing.assert_close(gb.double(), true_b, rtol=1e-4, atol=bin_atol)


EDGE_CASES = [(2, 6, 3, 5, "full"), (2, 4, 4, 3, "full"), (2, 5, 7, 4, "none"), (3, 5, 7, 0, "random"),
              (0, 5, 7, 4, "random")]  # (B, M, N, iters, mask)


def _strided_problem(dtype, device, gen):
    b, m, n, iters = 3, 5, 7, 6
    scores = torch.randn(b, n, m, generator=gen, dtype=dtype).to(device).transpose(1, 2)
    bins = torch.randn(2 * b, generator=gen, dtype=dtype).to(device)[::2]
    valid = (torch.rand(m, b, generator=gen) > 0.3).to(device).t()
    assert not (scores.is_contiguous() or bins.is_contiguous() or valid.is_contiguous())
    return scores, bins, valid, iters


class TestSinkhornLog(KernelOpTestBase):
    op = "sinkhorn_log"
    cases = {"random-mask": "random"}  # _problem's mask mode, over the shape grid
    empty_cases = {"b0": (0, 5, 7, 4)}  # (B, M, N, iters)
    opcheck_dtypes = (torch.float64,)
    compile_options = {"fullgraph": False, "backend": "aot_eager"}
    compile_tol = {"rtol": 1e-6, "atol": 1e-6}

    def make_inputs(self, backend_device, dtype, mode):
        backend, device = backend_device
        gen = torch.Generator().manual_seed(1)
        return [(*_problem(3, m, n, dtype, device, mode, gen), iters) for m, n, iters in _shapes(backend)]

    def run(self, backend_device, scores, bins, valid, iters):
        """The kernel itself: (log_p, u_hist, v_hist)."""
        return _op(backend_device[0])(scores, bins, valid, iters)

    def reference(self, scores, bins, valid, iters):
        return reference.sinkhorn_log(scores, bins, valid, iters)

    def assert_matches(self, out, expected, inputs, dtype):
        scores, bins, valid, iters = inputs
        b, m, n = scores.shape
        log_p, u_hist, v_hist = out
        assert log_p.shape == (b, m + 1, n) and log_p.dtype == dtype
        assert u_hist.shape == (b, iters, m + 1) and v_hist.shape == (b, iters, n)
        _close_finite(log_p, expected, dtype, scale=_magnitude(expected))
        u_ref, v_ref = _history(scores, bins, valid, iters)
        _close_finite(u_hist, u_ref, dtype, scale=10.0)
        _close_finite(v_hist, v_ref, dtype, scale=10.0)

    def non_contiguous_inputs(self, backend_device, dtype):
        return [_strided_problem(dtype, backend_device[1], torch.Generator().manual_seed(3))]

    def empty_inputs(self, backend_device, dtype, empty_case):
        b, m, n, iters = empty_case
        gen = torch.Generator().manual_seed(2)
        return (*_problem(b, m, n, dtype, backend_device[1], "random", gen), iters)

    def grad_inputs(self, backend_device):
        """Gradients to scores and to a learnable bin_score through
        escape_fast.ops.sinkhorn_log (the registered autograd)."""
        backend, device = backend_device
        gen = torch.Generator().manual_seed(6)
        # (B, M, N, iters, mode): random mask, M_valid >= N (the dustbin row is
        # -inf, so only the keypoint rows are checked), iters = 0 (where the
        # bin_score gradient is not zero)
        cases = [(2, 3, 4, 5, "random"), (2, 4, 3, 4, "full"), (2, 3, 4, 0, "random")]
        if interpreted(backend_device):  # every gradcheck probe is an interpreted launch
            cases = [(1, 3, 4, 5, "random"), (1, 3, 2, 3, "full")]
        pairs = []
        for b, m, n, iters, mode in cases:
            scores, _, valid = _problem(b, m, n, torch.float64, device, mode, gen)
            bin_score = torch.tensor(0.3, dtype=torch.float64, device=device, requires_grad=True)

            def fn(s, bs, valid=valid, iters=iters, m=m):
                return ops.sinkhorn_log(s, bs, valid, iters, backend=backend)[:, :m]

            pairs.append((fn, (scores.requires_grad_(), bin_score)))
        return pairs

    def gradcheck_options(self, backend_device):
        return {"eps": 1e-6, "atol": 1e-7, "rtol": 1e-6}

    def opcheck_inputs(self, backend_device, dtype):
        device = backend_device[1]
        gen = torch.Generator().manual_seed(7)
        forward, backward = self.kernel(backend_device), self.kernel(backend_device, "sinkhorn_log_backward")
        scores, bins, valid = _problem(2, 3, 5, dtype, device, gen=gen)
        scores.requires_grad_()
        bins.requires_grad_()
        with torch.no_grad():
            _, u_hist, v_hist = forward(scores, bins, valid, 4)
        grad = torch.randn(2, 4, 5, generator=gen, dtype=dtype).to(device)
        return [
            (forward, (scores, bins, valid, 4)),
            (backward, (grad, scores.detach(), bins.detach(), valid, u_hist, v_hist)),
        ]

    def compile_inputs(self, backend_device):
        backend, device = backend_device
        gen = torch.Generator().manual_seed(8)
        scores, bins, valid = _problem(2, 4, 6, torch.float32, device, gen=gen)

        def fn(s, bs):
            return ops.sinkhorn_log(s * 1.5, bs, valid, 5, backend=backend).exp().sum(dim=1)

        return fn, (scores.requires_grad_(), bins)

    # ----------------------------------------------------------------------
    # op-specific cases
    # ----------------------------------------------------------------------
    def test_forward_edge_cases(self, backend_device, dtype):
        """Every row valid with M >= N (dustbin mass 0: its row is -inf), all rows
        invalid, iters = 0, and an empty batch."""
        device = backend_device[1]
        gen = torch.Generator().manual_seed(2)
        for b, m, n, iters, mode in EDGE_CASES:
            scores, bins, valid = _problem(b, m, n, dtype, device, mode, gen)
            log_p, u_hist, v_hist = self.run(backend_device, scores, bins, valid, iters)
            expected = reference.sinkhorn_log(scores, bins, valid, iters)
            assert log_p.shape == expected.shape
            _close_finite(log_p, expected, dtype, scale=10.0)
            if mode == "full" and m >= n and iters > 0:
                assert torch.isneginf(log_p[:, m]).all() and torch.isneginf(u_hist[:, :, m]).all()
            u_ref, v_ref = _history(scores, bins, valid, iters)
            _close_finite(u_hist, u_ref, dtype, scale=10.0)
            _close_finite(v_hist, v_ref, dtype, scale=10.0)

    def test_backward_matches_autograd(self, backend_device, dtype):
        backend, device = backend_device
        gen = torch.Generator().manual_seed(4)
        for m, n, iters in _shapes(backend):
            scores, bins, valid = _problem(3, m, n, dtype, device, gen=gen)
            _check_backward(backend, scores, bins, valid, iters, dtype, gen)

    def test_backward_edge_cases(self, backend_device, dtype):
        backend, device = backend_device
        gen = torch.Generator().manual_seed(5)
        for b, m, n, iters, mode in EDGE_CASES:
            scores, bins, valid = _problem(b, m, n, dtype, device, mode, gen)
            _check_backward(backend, scores, bins, valid, iters, dtype, gen)

    def test_non_contiguous_backward(self, backend_device, dtype):
        """Strided inputs and upstream gradient give bitwise the gradients of their contiguous copies."""
        device = backend_device[1]
        gen = torch.Generator().manual_seed(3)
        scores, bins, valid, iters = _strided_problem(dtype, device, gen)
        b, m, n = scores.shape
        _, u_hist, v_hist = self.run(backend_device, scores, bins, valid, iters)
        grad = torch.randn(b, n, m + 1, generator=gen, dtype=dtype).to(device).transpose(1, 2)
        backward = self.kernel(backend_device, "sinkhorn_log_backward")
        gs, gb = backward(grad, scores, bins, valid, u_hist, v_hist)
        gs_c, gb_c = backward(grad.contiguous(), scores.contiguous(), bins.contiguous(), valid.contiguous(),
                              u_hist, v_hist)
        torch.testing.assert_close(gs, gs_c, rtol=0, atol=0)
        torch.testing.assert_close(gb, gb_c, rtol=0, atol=0)
