"""keypoint_pool / keypoint_pool_backward: every backend against escape_fast.reference."""

from __future__ import annotations

import pytest
import torch
from conftest import kernel_backends, tol

from escape_fast import ops, reference

BACKENDS = kernel_backends("keypoint_pool")

# Under TRITON_INTERPRET=1, torch.library.wrap_triton hands back the raw
# InterpretedFunction, which runs even on fake tensors: fake-tensor tracing
# (opcheck's fake/aot tests, torch.compile) of the Triton ops only works on CUDA.
NO_FAKE_TRACE = "Triton ops are not traceable with fake tensors under TRITON_INTERPRET=1 (CUDA only)"


def _interpreted(backend_device):
    backend, device = backend_device
    return backend == "triton" and device.type == "cpu"


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


def _run(backend_device, features, keypoints, visible, sigma):
    backend, _ = backend_device
    return ops.keypoint_pool(features, keypoints, visible, sigma, backend=backend)


def _backward_op(backend):
    if backend == "triton":
        return ops._triton_op("keypoint_pool_backward")
    return torch.ops.escape_fast.keypoint_pool_backward


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("sigma", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("shape", [(2, 7, 5, 16, 16), (1, 9, 3, 11, 23)], ids=["square", "wide"])
def test_forward_and_backward_match_reference(backend_device, sigma, shape, dtype):
    backend, device = backend_device
    b, k, c, h, w = shape
    f, kp, vis = _inputs(b, k, c, h, w, dtype, device, seed=int(sigma))
    kp, vis = _with_edge_keypoints(kp, vis, h, w, sigma)
    want = reference.keypoint_pool(f, kp, vis, sigma)
    got = _run(backend_device, f, kp, vis, sigma)
    torch.testing.assert_close(got, want, **tol(dtype))
    # backward: the op against autograd through the reference
    grad = torch.randn(b, k, c, dtype=dtype, device=device)
    fr = f.clone().requires_grad_()
    reference.keypoint_pool(fr, kp, vis, sigma).backward(grad)
    got_grad = _backward_op(backend)(grad, kp, vis, sigma, h, w)
    torch.testing.assert_close(got_grad, fr.grad, **tol(dtype))


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_constant_map_pools_to_the_constant(backend_device, dtype):
    backend, device = backend_device
    b, k, c, h, w = 2, 6, 3, 12, 10
    _, kp, vis = _inputs(b, k, c, h, w, dtype, device, seed=3)
    kp, vis = _with_edge_keypoints(kp, vis, h, w, 2.0)
    f = torch.full((b, c, h, w), 2.5, dtype=dtype, device=device)
    got = _run(backend_device, f, kp, vis, 2.0)
    _, weight = reference.gaussian_heatmaps(kp, vis, (w, h), 2.0)
    want = 2.5 * weight[..., None].expand(b, k, c)
    torch.testing.assert_close(got, want, **tol(dtype))
    assert weight.sum() > 0 and (weight == 0).any()  # both cases are exercised
    assert (got[~vis] == 0).all()


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_only_the_window_is_read(backend_device, dtype):
    """NaN outside the visible keypoints' windows must not reach the output."""
    backend, device = backend_device
    b, k, c, h, w, sigma = 2, 4, 3, 20, 20, 1.0
    f, kp, vis = _inputs(b, k, c, h, w, dtype, device, seed=5, margin=0.0)
    g, _ = reference.gaussian_heatmaps(kp, vis, (w, h), sigma)
    # the reference's window test as a mask (the Gaussian is > 0 on it)
    outside = (g > 0).sum(1, keepdim=True) == 0
    poisoned = f.masked_fill(outside.expand_as(f), float("nan"))
    fn = ops._triton_op("keypoint_pool") if backend == "triton" else torch.ops.escape_fast.keypoint_pool
    got = fn(poisoned, kp, vis, sigma)  # the op itself: the wrapper rejects NaN input
    torch.testing.assert_close(got, reference.keypoint_pool(f, kp, vis, sigma), **tol(dtype))


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_non_contiguous_inputs(backend_device, dtype):
    backend, device = backend_device
    f, kp, vis = _inputs(3, 5, 4, 14, 12, dtype, device, seed=7)
    f_nc = f.transpose(2, 3).contiguous().transpose(2, 3)[::2]  # strided H/W, every other image
    kp_nc = kp.flip(-1).contiguous().flip(-1)[::2]  # negative stride on x/y
    vis_nc = vis.t().contiguous().t()[::2]
    assert not f_nc.is_contiguous() and not vis_nc.is_contiguous()
    got = _run(backend_device, f_nc, kp_nc, vis_nc, 2.0)
    torch.testing.assert_close(got, reference.keypoint_pool(f_nc, kp_nc, vis_nc, 2.0), **tol(dtype))
    grad = torch.randn(5, 2, 4, dtype=dtype, device=device).transpose(0, 1)  # [2, 5, 4] strided
    fr = f_nc.detach().clone().requires_grad_()
    reference.keypoint_pool(fr, kp_nc, vis_nc, 2.0).backward(grad)
    got_grad = _backward_op(backend)(grad, kp_nc, vis_nc, 2.0, 14, 12)
    torch.testing.assert_close(got_grad, fr.grad, **tol(dtype))


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("b, k", [(0, 3), (2, 0), (0, 0)])
def test_empty(backend_device, b, k, dtype):
    backend, device = backend_device
    f, kp, vis = _inputs(b, k, 4, 8, 8, dtype, device)
    got = _run(backend_device, f, kp, vis, 2.0)
    assert got.shape == (b, k, 4) and got.dtype == dtype
    grad = _backward_op(backend)(got, kp, vis, 2.0, 8, 8)
    assert grad.shape == (b, 4, 8, 8) and (grad == 0).all()


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_backward_is_deterministic(backend_device):
    backend, device = backend_device
    # many keypoints on top of each other: every cell sums many contributions
    f, kp, vis = _inputs(2, 24, 6, 10, 10, torch.float32, device, seed=11, margin=-3.0)
    grad = torch.randn(2, 24, 6, device=device)
    first = _backward_op(backend)(grad, kp, vis, 2.0, 10, 10)
    for _ in range(3):
        assert torch.equal(_backward_op(backend)(grad, kp, vis, 2.0, 10, 10), first)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_gradcheck_through_public_op(backend_device):
    backend, device = backend_device
    f, kp, vis = _inputs(1, 5, 2, 9, 8, torch.float64, device, seed=13)
    kp, vis = _with_edge_keypoints(kp, vis, 9, 8, 1.0)
    f.requires_grad_()
    # fast mode (random projections) keeps the interpreted Triton case short
    assert torch.autograd.gradcheck(
        lambda x: ops.keypoint_pool(x, kp, vis, 1.0, backend=backend),
        (f,),
        eps=1e-6,
        atol=1e-8,
        fast_mode=_interpreted(backend_device),
    )


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_opcheck(backend_device):
    backend, device = backend_device
    f, kp, vis = _inputs(2, 3, 4, 9, 7, torch.float32, device, seed=17)
    if backend == "triton":
        fwd, bwd = ops._triton_op("keypoint_pool"), ops._triton_op("keypoint_pool_backward")
    else:
        fwd, bwd = torch.ops.escape_fast.keypoint_pool, torch.ops.escape_fast.keypoint_pool_backward
    grad = torch.randn(2, 3, 4, device=device)
    utils = ["test_schema", "test_autograd_registration"]
    if not _interpreted(backend_device):
        utils += ["test_faketensor", "test_aot_dispatch_dynamic"]  # NO_FAKE_TRACE
    torch.library.opcheck(fwd, (f.requires_grad_(), kp, vis, 2.0), test_utils=utils)
    torch.library.opcheck(bwd, (grad, kp, vis, 2.0, 9, 7), test_utils=utils)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_torch_compile_matches_eager(backend_device):
    backend, device = backend_device
    if _interpreted(backend_device):
        pytest.skip(NO_FAKE_TRACE)
    f, kp, vis = _inputs(2, 5, 4, 12, 12, torch.float32, device, seed=19)

    def fn(x, p, v):
        return ops.keypoint_pool(x * 2.0, p, v, 2.0, backend=backend).sum(-1)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=False)
    torch.testing.assert_close(compiled(f, kp, vis), fn(f, kp, vis), **tol(torch.float32))
