"""keypoint_pool / keypoint_pool_backward: every backend against escape_fast.reference.

TestKeypointPool runs the common checks of kernel_test_base.KernelOpTestBase
(its determinism check is on the backward, whose cells sum many keypoints)
and adds the backward kernel against autograd through the reference (random,
strided and empty inputs), constant maps, and that only the Gaussian windows
of the visible keypoints are read.
"""

from __future__ import annotations

import torch
from conftest import tol
from kernel_test_base import KernelOpTestBase, interpreted

from escape_fast import ops, reference

SHAPES = {"square": (2, 7, 5, 16, 16), "wide": (1, 9, 3, 11, 23)}  # (B, K, C, H, W)


def _inputs(b, k, c, h, w, dtype, device, seed=0, margin=4.0):
    """Random features and keypoints, some near or beyond the borders, ~20% invisible."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(b, c, h, w, generator=g, dtype=dtype)
    lo = torch.tensor([-margin, -margin], dtype=dtype)
    span = torch.tensor([w - 1 + 2 * margin, h - 1 + 2 * margin], dtype=dtype)
    keypoints = lo + torch.rand(b, k, 2, generator=g, dtype=dtype) * span
    visible = torch.rand(b, k, generator=g) > 0.2
    return features.to(device), keypoints.to(device), visible.to(device)


def _with_edge_keypoints(keypoints, visible, h, w, sigma):
    """Overwrite the first keypoints of image 0 with border cases."""
    r = 3.0 * sigma
    cases = [
        (0.0, 0.0),  # corner cell
        (w - 1.0, h - 1.0),  # opposite corner
        (-r, h / 2),  # window touches column 0 exactly (|0 - x| = r)
        (-r - 0.01, h / 2),  # window just misses the image: pools to 0
        (w - 1 + r, 2.5),  # right border exactly
        (w / 2, -1e6),  # far away
        (2.0, 3.0),  # integer position: window edges exactly at +-r
    ]
    kp, vis = keypoints.clone(), visible.clone()
    n = min(len(cases), kp.shape[1])
    for i in range(n):
        kp[0, i] = torch.tensor(cases[i], dtype=kp.dtype)
        vis[0, i] = True
    return kp, vis


class TestKeypointPool(KernelOpTestBase):
    op = "keypoint_pool"
    cases = {f"{name}-sigma{sigma:g}": (shape, sigma) for name, shape in SHAPES.items() for sigma in (1.0, 2.0, 3.0)}
    empty_cases = {"b0-k3": (0, 3), "b2-k0": (2, 0), "b0-k0": (0, 0)}
    compile_options = {"fullgraph": False}
    compile_tol = tol(torch.float32)

    def make_inputs(self, backend_device, dtype, case):
        (b, k, c, h, w), sigma = case
        f, kp, vis = _inputs(b, k, c, h, w, dtype, backend_device[1], seed=int(sigma))
        kp, vis = _with_edge_keypoints(kp, vis, h, w, sigma)
        return [(f, kp, vis, sigma)]

    def run(self, backend_device, features, keypoints, visible, sigma):
        return ops.keypoint_pool(features, keypoints, visible, sigma, backend=backend_device[0])

    def reference(self, features, keypoints, visible, sigma):
        return reference.keypoint_pool(features, keypoints, visible, sigma)

    def non_contiguous_inputs(self, backend_device, dtype):
        f, kp, vis = _inputs(3, 5, 4, 14, 12, dtype, backend_device[1], seed=7)
        f_nc = f.transpose(2, 3).contiguous().transpose(2, 3)[::2]  # strided H/W, every other image
        kp_nc = kp.flip(-1).contiguous().flip(-1)[::2]  # negative stride on x/y
        vis_nc = vis.t().contiguous().t()[::2]
        assert not f_nc.is_contiguous() and not vis_nc.is_contiguous()
        return [(f_nc, kp_nc, vis_nc, 2.0)]

    def empty_inputs(self, backend_device, dtype, empty_case):
        b, k = empty_case
        return (*_inputs(b, k, 4, 8, 8, dtype, backend_device[1]), 2.0)

    def grad_inputs(self, backend_device):
        f, kp, vis = _inputs(1, 5, 2, 9, 8, torch.float64, backend_device[1], seed=13)
        kp, vis = _with_edge_keypoints(kp, vis, 9, 8, 1.0)
        return [(lambda x: self.run(backend_device, x, kp, vis, 1.0), (f.requires_grad_(),))]

    def gradcheck_options(self, backend_device):
        # fast mode (random projections) keeps the interpreted Triton case short
        return {"eps": 1e-6, "atol": 1e-8, "fast_mode": interpreted(backend_device)}

    def opcheck_inputs(self, backend_device, dtype):
        device = backend_device[1]
        f, kp, vis = _inputs(2, 3, 4, 9, 7, dtype, device, seed=17)
        grad = torch.randn(2, 3, 4, dtype=dtype, device=device)
        return [
            (self.kernel(backend_device), (f.requires_grad_(), kp, vis, 2.0)),
            (self.kernel(backend_device, "keypoint_pool_backward"), (grad, kp, vis, 2.0, 9, 7)),
        ]

    def compile_inputs(self, backend_device):
        backend, device = backend_device
        f, kp, vis = _inputs(2, 5, 4, 12, 12, torch.float32, device, seed=19)

        def fn(x, p, v):
            return ops.keypoint_pool(x * 2.0, p, v, 2.0, backend=backend).sum(-1)

        return fn, (f, kp, vis)

    def deterministic_calls(self, backend_device):
        # The backward is where order could vary: with many keypoints on top
        # of each other, every cell sums many contributions.
        device = backend_device[1]
        _, kp, vis = _inputs(2, 24, 6, 10, 10, torch.float32, device, seed=11, margin=-3.0)
        grad = torch.randn(2, 24, 6, device=device)
        return [(self.kernel(backend_device, "keypoint_pool_backward"), (grad, kp, vis, 2.0, 10, 10))]

    # ----------------------------------------------------------------------
    # the backward kernel, against autograd through the reference
    # ----------------------------------------------------------------------
    def test_backward_matches_reference(self, backend_device, case, dtype):
        [(f, kp, vis, sigma)] = self.make_inputs(backend_device, dtype, case)
        b, c, h, w = f.shape
        grad = torch.randn(b, kp.shape[1], c, dtype=dtype, device=backend_device[1])
        fr = f.clone().requires_grad_()
        reference.keypoint_pool(fr, kp, vis, sigma).backward(grad)
        got_grad = self.kernel(backend_device, "keypoint_pool_backward")(grad, kp, vis, sigma, h, w)
        torch.testing.assert_close(got_grad, fr.grad, **tol(dtype))

    def test_non_contiguous_backward(self, backend_device, dtype):
        [(f_nc, kp_nc, vis_nc, sigma)] = self.non_contiguous_inputs(backend_device, dtype)
        grad = torch.randn(5, 2, 4, dtype=dtype, device=backend_device[1]).transpose(0, 1)  # [2, 5, 4] strided
        fr = f_nc.detach().clone().requires_grad_()
        reference.keypoint_pool(fr, kp_nc, vis_nc, sigma).backward(grad)
        got_grad = self.kernel(backend_device, "keypoint_pool_backward")(grad, kp_nc, vis_nc, sigma, 14, 12)
        torch.testing.assert_close(got_grad, fr.grad, **tol(dtype))

    def test_empty_backward(self, backend_device, empty_case, dtype):
        b, _ = empty_case
        f, kp, vis, sigma = self.empty_inputs(backend_device, dtype, empty_case)
        got = self.run(backend_device, f, kp, vis, sigma)
        grad = self.kernel(backend_device, "keypoint_pool_backward")(got, kp, vis, sigma, 8, 8)
        assert grad.shape == (b, 4, 8, 8) and (grad == 0).all()

    # ----------------------------------------------------------------------
    # op-specific cases
    # ----------------------------------------------------------------------
    def test_constant_map_pools_to_the_constant(self, backend_device, dtype):
        device = backend_device[1]
        b, k, c, h, w = 2, 6, 3, 12, 10
        _, kp, vis = _inputs(b, k, c, h, w, dtype, device, seed=3)
        kp, vis = _with_edge_keypoints(kp, vis, h, w, 2.0)
        f = torch.full((b, c, h, w), 2.5, dtype=dtype, device=device)
        got = self.run(backend_device, f, kp, vis, 2.0)
        _, weight = reference.gaussian_heatmaps(kp, vis, (w, h), 2.0)
        want = 2.5 * weight[..., None].expand(b, k, c)
        torch.testing.assert_close(got, want, **tol(dtype))
        assert weight.sum() > 0 and (weight == 0).any()  # both cases are exercised
        assert (got[~vis] == 0).all()

    def test_only_the_window_is_read(self, backend_device, dtype):
        """NaN outside the visible keypoints' windows must not reach the output."""
        b, k, c, h, w, sigma = 2, 4, 3, 20, 20, 1.0
        f, kp, vis = _inputs(b, k, c, h, w, dtype, backend_device[1], seed=5, margin=0.0)
        g, _ = reference.gaussian_heatmaps(kp, vis, (w, h), sigma)
        # the reference's window test as a mask (the Gaussian is > 0 on it)
        outside = (g > 0).sum(1, keepdim=True) == 0
        poisoned = f.masked_fill(outside.expand_as(f), float("nan"))
        got = self.kernel(backend_device)(poisoned, kp, vis, sigma)  # the op itself: the wrapper rejects NaN input
        torch.testing.assert_close(got, reference.keypoint_pool(f, kp, vis, sigma), **tol(dtype))
