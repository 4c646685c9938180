"""prototype_heatmaps, decode_heatmaps and the fused heatmap_decode against
escape_fast.reference, on every backend (cpu / cuda / triton).

TestPrototypeHeatmaps, TestHeatmapDecode and TestDecodeHeatmaps run the common
checks of kernel_test_base.KernelOpTestBase (gradcheck for prototype_heatmaps
only, as decoding is an argmax; TestHeatmapDecode.test_compile traces all
three ops in one graph). Both decoders add planted peaks, exact ties,
non-finite input and bad arguments; the fused one also decoding pre-smoothed
features. Module-level tests cover smooth_features, the public ops' finite
checks and the CUDA fallback for grids too large for shared memory.

Decoded keypoints are compared cell by cell: the integer argmax cell of each
result is recovered by inverting the crop map (the quarter-cell shift never
moves a point by half a cell). A cell that differs from the reference's (an
argmax flip) is allowed only where the reference's smoothed map holds a
near-tie there; everywhere else coordinates and values must match. Planted
Gaussian peaks and exact ties must give no flip at all.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import HAS_CUDA, tol
from kernel_test_base import KernelOpTestBase

from escape_fast import ops, reference

KERNELS = {"kernel15": 15, "kernel3": 3, "kernel1": 1}  # mean-filter sizes
EMPTY = {"b0-k3": (0, 3), "b2-k0": (2, 0)}  # (B, K)

# Coordinates are image pixels (hundreds): absolute tolerance in pixels.
COORD_TOL = {torch.float32: {"rtol": 1e-5, "atol": 2e-3}, torch.float64: {"rtol": 1e-10, "atol": 1e-8}}
# Two smoothed values closer than this (relative to the peak) count as a tie.
TIE_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def _tiny(backend, device) -> bool:
    """Triton on the CPU runs in the interpreter: keep its cases tiny."""
    return backend == "triton" and device.type == "cpu"


def _shapes(backend, device):
    """(B, C, H, W, K) cases."""
    if _tiny(backend, device):
        return [(2, 8, 16, 16, 3), (1, 8, 12, 20, 1)]
    return [(2, 16, 64, 64, 17), (1, 8, 64, 64, 68), (3, 24, 20, 24, 1), (1, 40, 20, 24, 68)]


def _crop(b, dtype, device):
    center = torch.randn(b, 2, dtype=dtype, device=device) * 50 + 200
    scale = torch.rand(b, 2, dtype=dtype, device=device) + 0.5
    rotation = torch.randn(b, dtype=dtype, device=device) * 30  # nonzero
    return center, scale, rotation


def _cells(coords, center, scale, rotation, h, w):
    """Integer heatmap cells [B, K, 2] (x, y) of image coordinates: inverts
    reference.heatmap_to_image and rounds away the quarter-cell shift."""
    c64 = coords.double()
    off = c64 - center.double()[:, None, :]
    theta = torch.deg2rad(rotation.double())[:, None]
    cos, sin = torch.cos(theta), torch.sin(theta)
    ox = off[..., 0] * cos + off[..., 1] * sin
    oy = -off[..., 0] * sin + off[..., 1] * cos
    size = torch.tensor([w, h], dtype=torch.float64, device=coords.device)
    p = torch.stack((ox, oy), dim=-1) / (200.0 * scale.double()[:, None, :] / size) + size / 2
    return p.round().long()


def _check_decoded(out, ref, smooth, center, scale, rotation, dtype, allow_ties=True):
    """Compare (coords, values) with the reference; returns the flip count."""
    coords, values = out
    ref_coords, ref_values = ref
    b, k, h, w = smooth.shape
    assert coords.shape == (b, k, 2) and values.shape == (b, k)
    assert coords.dtype == dtype and values.dtype == dtype
    cells = _cells(coords, center, scale, rotation, h, w)
    ref_cells = _cells(ref_coords, center, scale, rotation, h, w)
    flip = (cells != ref_cells).any(-1)
    n_flips = int(flip.sum())
    if n_flips:
        assert allow_ties, f"{n_flips} argmax flips where none is allowed"
        x = cells[..., 0].clamp(0, w - 1)
        y = cells[..., 1].clamp(0, h - 1)
        inside = (cells[..., 0] >= 0) & (cells[..., 0] < w) & (cells[..., 1] >= 0) & (cells[..., 1] < h)
        at = smooth.reshape(b, k, h * w).gather(-1, (y * w + x)[..., None])[..., 0]
        gap = (ref_values - at).abs() / ref_values.abs().clamp_min(1.0)
        tie = inside & (gap <= TIE_TOL[dtype])
        assert bool(tie[flip].all()), f"{n_flips} argmax flips, not all at near-ties (gaps {gap[flip].tolist()})"
    keep = ~flip
    torch.testing.assert_close(coords[keep], ref_coords[keep], **COORD_TOL[dtype])
    torch.testing.assert_close(values[keep], ref_values[keep], **tol(dtype))
    return n_flips


def _planted(b, k, h, w, dtype, device):
    """Heatmaps with one Gaussian peak per map (off-grid centres, so the
    quarter-cell shift is non-zero) on weak noise."""
    ys = torch.arange(h, dtype=dtype, device=device)[:, None]
    xs = torch.arange(w, dtype=dtype, device=device)[None, :]
    cx = torch.randint(2, w - 2, (b, k, 1, 1), device=device).to(dtype) + 0.3
    cy = torch.randint(2, h - 2, (b, k, 1, 1), device=device).to(dtype) - 0.3
    amp = torch.rand(b, k, 1, 1, dtype=dtype, device=device) + 1.0
    g = amp * torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * 2.0**2))
    return g + 1e-3 * torch.rand(b, k, h, w, dtype=dtype, device=device)


def _planted_features(b, c, h, w, k, dtype, device):
    """Features built so that the heatmaps are planted Gaussians: prototypes
    with orthonormal rows P, features P^T G, so P (P^T G) = G."""
    c = max(c, k)
    maps = _planted(b, k, h, w, dtype, device)
    q, _ = torch.linalg.qr(torch.randn(b, c, k, dtype=torch.float64, device=device))
    protos = q.transpose(1, 2).to(dtype)  # [B, K, C], orthonormal rows
    feats = torch.einsum("bkc,bkhw->bchw", q.transpose(1, 2), maps.double()).to(dtype)
    return feats, protos


def _strided_problem(backend_device, dtype):
    """Channels-last features, transposed prototypes, strided crop (the largest shape)."""
    name, device = backend_device
    b, c, h, w, k = _shapes(name, device)[-1]
    feats = torch.randn(b, h, w, c, dtype=dtype, device=device).permute(0, 3, 1, 2)
    protos = torch.randn(b, c, k, dtype=dtype, device=device).transpose(1, 2)
    center = (torch.randn(b, 4, dtype=dtype, device=device) * 50)[:, ::2]
    scale = (torch.rand(b, 4, dtype=dtype, device=device) + 0.5)[:, 1::2]
    rotation = (torch.randn(b, 2, dtype=dtype, device=device) * 30)[:, 1]
    assert not (feats.is_contiguous() or center.is_contiguous() or scale.is_contiguous())
    return feats, protos, center, scale, rotation


def _empty_problem(backend_device, dtype, empty_case):
    b, k = empty_case
    c, h, w = 8, 16, 16
    device = backend_device[1]
    feats = torch.randn(b, c, h, w, dtype=dtype, device=device)
    protos = torch.randn(b, k, c, dtype=dtype, device=device)
    return feats, protos, *_crop(b, dtype, device)


def _opcheck_problem(backend_device, dtype):
    b, c, h, w, k = 2, 8, 16, 12, 3
    device = backend_device[1]
    feats = torch.randn(b, c, h, w, dtype=dtype, device=device)
    protos = torch.randn(b, k, c, dtype=dtype, device=device)
    return feats, protos, *_crop(b, dtype, device)


def _tie_problem(backend_device, dtype):
    """Map 0 constant: every cell ties -> cell (0, 0). Map 1: two equal
    isolated peaks; the first in row-major order has the larger x, so a
    column-major or last-index search picks the other. The sums are exact
    (integers), so the smoothed peaks tie exactly for every kernel size."""
    device, h, w = _tie_grid(backend_device)
    maps = torch.zeros(1, 2, h, w, dtype=dtype, device=device)
    maps[0, 0] = 3.0
    maps[0, 1, 3, w - 5] = 4.0
    maps[0, 1, h - 4, 4] = 4.0
    return maps, *_tie_crop(dtype, device)


def _tie_grid(backend_device):
    """(device, h, w) of the tie problems: smaller where the backend is interpreted."""
    name, device = backend_device
    return (device, 12, 20) if _tiny(name, device) else (device, 20, 24)


def _tie_crop(dtype, device):
    center = torch.zeros(1, 2, dtype=dtype, device=device)
    scale = torch.full((1, 2), 0.5, dtype=dtype, device=device)
    rotation = torch.zeros(1, dtype=dtype, device=device)
    return center, scale, rotation


def _tie_point(x, y, h, w, scale):
    """Image coordinates [1, 1, 2] of heatmap point (x, y) under _tie_crop."""
    size = torch.tensor([w, h], dtype=scale.dtype, device=scale.device)
    cell = torch.tensor([x, y], dtype=scale.dtype, device=scale.device)
    return ((cell - size / 2) * (200.0 * scale[0] / size)).reshape(1, 1, 2)


def _assert_first_maxima(out, maps, scale, kernel, dtype):
    """The decoded peaks of _tie_problem's maps are their first maxima."""
    h, w = maps.shape[-2:]
    coords, values = out
    torch.testing.assert_close(coords[:, 0:1], _tie_point(0, 0, h, w, scale), rtol=0, atol=1e-9)
    # a kernel x kernel plateau of equal values: its top-left cell, then
    # the quarter-cell shift towards the plateau (none for kernel 1)
    r, q = kernel // 2, 0.25 if kernel > 1 else 0.0
    torch.testing.assert_close(coords[:, 1:2], _tie_point(w - 5 - r + q, 3 - r + q, h, w, scale), rtol=0, atol=1e-9)
    assert float(values[0, 0]) == 3.0
    assert float(values[0, 1]) == float(torch.tensor(4.0, dtype=dtype) / kernel**2)


def _nonfinite_problem(backend_device, bad):
    """Features whose item 1 holds one non-finite value: every map of item 1
    sees it (a -inf feature gives +-inf or NaN products)."""
    device = backend_device[1]
    dtype = torch.float32
    b, c, h, w, k = 2, 8, 16, 16, 3
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(b, c, h, w, dtype=dtype, generator=g).to(device)
    protos = torch.randn(b, k, c, dtype=dtype, generator=g).to(device)
    center, scale, rotation = _crop(b, dtype, device)
    feats[1, 3, 5, 7] = bad
    return feats, protos, center, scale, rotation


def _assert_nan_peaks_of_item_1(peaks):
    assert torch.isfinite(peaks[0]).all()
    assert torch.isnan(peaks[1]).all()


NONFINITE = pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])


# --------------------------------------------------------------------------
# prototype_heatmaps
# --------------------------------------------------------------------------
class TestPrototypeHeatmaps(KernelOpTestBase):
    op = "prototype_heatmaps"
    empty_cases = EMPTY
    opcheck_dtypes = (torch.float32, torch.float64)
    test_compile = None  # compiled with both decoders in TestHeatmapDecode.test_compile

    def make_inputs(self, backend_device, dtype, case):
        name, device = backend_device
        return [
            (torch.randn(b, c, h, w, dtype=dtype, device=device), torch.randn(b, k, c, dtype=dtype, device=device))
            for b, c, h, w, k in _shapes(name, device)
        ]

    def run(self, backend_device, feats, protos):
        return ops.prototype_heatmaps(feats, protos, backend=backend_device[0])

    def reference(self, feats, protos):
        return reference.prototype_heatmaps(feats, protos)

    def assert_matches(self, out, expected, inputs, dtype):
        assert out.shape == expected.shape and out.dtype == dtype
        torch.testing.assert_close(out, expected, **tol(dtype))

    def non_contiguous_inputs(self, backend_device, dtype):
        """Channels-last features, transposed prototypes, on every shape."""
        strided = []
        for feats, protos in self.make_inputs(backend_device, dtype, None):
            feats_nc = feats.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
            protos_nc = protos.transpose(1, 2).contiguous().transpose(1, 2)
            assert not feats_nc.is_contiguous() and (protos.shape[1] == 1 or not protos_nc.is_contiguous())
            strided.append((feats_nc, protos_nc))
        return strided

    def empty_inputs(self, backend_device, dtype, empty_case):
        return _empty_problem(backend_device, dtype, empty_case)[:2]

    def grad_inputs(self, backend_device):
        device = backend_device[1]
        # small: the numerical Jacobian calls the op twice per input element
        feats = torch.randn(2, 3, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
        protos = torch.randn(2, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
        return [(functools.partial(self.run, backend_device), (feats, protos))]

    def opcheck_inputs(self, backend_device, dtype):
        feats, protos = _opcheck_problem(backend_device, dtype)[:2]
        op = self.kernel(backend_device)
        return [(op, (feats, protos)), (op, (feats.clone().requires_grad_(), protos.clone().requires_grad_()))]


# --------------------------------------------------------------------------
# heatmap_decode: prototype heatmaps, mean filter and argmax in one kernel
# --------------------------------------------------------------------------
class TestHeatmapDecode(KernelOpTestBase):
    op = "heatmap_decode"
    cases = KERNELS
    empty_cases = EMPTY
    opcheck_dtypes = (torch.float32, torch.float64)
    compile_options = {"fullgraph": True}
    test_gradcheck = None  # the decoded argmax has no gradient

    def make_inputs(self, backend_device, dtype, kernel):
        name, device = backend_device
        inputs = []
        for b, c, h, w, k in _shapes(name, device):
            feats = torch.randn(b, c, h, w, dtype=dtype, device=device)
            protos = torch.randn(b, k, c, dtype=dtype, device=device)
            center, scale, rotation = _crop(b, dtype, device)
            inputs.append((feats, protos, center, scale, kernel, rotation))
        return inputs

    def run(self, backend_device, feats, protos, center, scale, kernel, rotation):
        return ops.heatmap_decode(feats, protos, center, scale, kernel, backend=backend_device[0], rotation=rotation)

    def reference(self, feats, protos, center, scale, kernel, rotation):
        return reference.heatmap_decode(feats, protos, center, scale, kernel, rotation)

    def assert_matches(self, out, expected, inputs, dtype, allow_ties=True):
        """Returns (argmax flips, keypoints)."""
        feats, protos, center, scale, kernel, rotation = inputs
        smooth = reference.smooth_heatmaps(reference.prototype_heatmaps(feats, protos), kernel)
        flips = _check_decoded(out, expected, smooth, center, scale, rotation, dtype, allow_ties)
        return flips, protos.shape[0] * protos.shape[1]

    def assert_all_matched(self, results, dtype):
        """At most 1% argmax flips over all shapes, all at near-ties."""
        flips, total = sum(f for f, _ in results), sum(n for _, n in results)
        assert flips <= max(1, total // 100), f"{flips} of {total} argmaxes flipped"

    def non_contiguous_inputs(self, backend_device, dtype):
        feats, protos, center, scale, rotation = _strided_problem(backend_device, dtype)
        return [(feats, protos, center, scale, kernel, rotation) for kernel in (15, 3)]

    def empty_inputs(self, backend_device, dtype, empty_case):
        feats, protos, center, scale, rotation = _empty_problem(backend_device, dtype, empty_case)
        return feats, protos, center, scale, 15, rotation

    def opcheck_inputs(self, backend_device, dtype):
        feats, protos, center, scale, rotation = _opcheck_problem(backend_device, dtype)
        return [(self.kernel(backend_device), (feats, protos, center, scale, rotation, 3))]

    def compile_inputs(self, backend_device):
        """One graph of all three ops: the fused decode and the split one."""
        fused = self.kernel(backend_device)
        heatmaps = self.kernel(backend_device, "prototype_heatmaps")
        decode = self.kernel(backend_device, "decode_heatmaps")

        def fn(f, p, cen, sc, rot):
            return fused(f, p, cen, sc, rot, 15), decode(heatmaps(f, p) * 2.0, cen, sc, rot, 3)

        dtype = torch.float32
        b, c, h, w, k = 2, 8, 20, 24, 5
        device = backend_device[1]
        feats = torch.randn(b, c, h, w, dtype=dtype, device=device)
        protos = torch.randn(b, k, c, dtype=dtype, device=device)
        return fn, (feats, protos, *_crop(b, dtype, device))

    def test_decoding_smoothed_features_equals_decoding(self, backend_device, dtype):
        """heatmap_decode(smooth_features(F), P, kernel=1) == heatmap_decode(F, P),
        up to argmax flips at near-ties (the sums run in another order)."""
        results = []
        for inputs in self.make_inputs(backend_device, dtype, 15):
            feats, protos, center, scale, _, rotation = inputs
            out = self.run(backend_device, ops.smooth_features(feats, 15), protos, center, scale, 1, rotation)
            results.append(self.assert_matches(out, self.reference(*inputs), inputs, dtype))
        self.assert_all_matched(results, dtype)

    @pytest.mark.parametrize("kernel", [15, 3])
    def test_planted_peaks_no_flips(self, backend_device, kernel, dtype):
        name, device = backend_device
        for b, c, h, w, k in _shapes(name, device):
            feats, protos = _planted_features(b, c, h, w, k, dtype, device)
            center, scale, rotation = _crop(b, dtype, device)
            inputs = (feats, protos, center, scale, kernel, rotation)
            out = self.run(backend_device, *inputs)
            self.assert_matches(out, self.reference(*inputs), inputs, dtype, allow_ties=False)

    def test_ties_take_first_maximum(self, backend_device, dtype):
        """Features = the tie maps as channels and identity prototypes, so the
        heatmaps are the maps exactly (products by 1 and 0)."""
        maps, center, scale, rotation = _tie_problem(backend_device, dtype)
        eye = torch.eye(2, dtype=dtype, device=maps.device)[None]
        for kernel in (3, 1):
            out = self.run(backend_device, maps, eye, center, scale, kernel, rotation)
            _assert_first_maxima(out, maps, scale, kernel, dtype)

    def test_ties_of_one_channel_take_first_maximum(self, backend_device, dtype):
        """Heatmap = channel 0 (prototype (1, 0, 0)), two equal peaks."""
        device, h, w = _tie_grid(backend_device)
        feats = torch.randn(1, 3, h, w, dtype=dtype, device=device)
        feats[0, 0] = 0.0
        feats[0, 0, 2, w - 3] = 2.0
        feats[0, 0, h - 3, 3] = 2.0
        protos = torch.tensor([[[1.0, 0.0, 0.0]]], dtype=dtype, device=device)
        center, scale, rotation = _tie_crop(dtype, device)
        coords, values = self.run(backend_device, feats, protos, center, scale, 3, rotation)
        # the 3 x 3 plateau's top-left cell (w - 4, 1) is on the border row: no shift
        torch.testing.assert_close(coords[0, 0], _tie_point(w - 4, 1, h, w, scale)[0, 0], rtol=0, atol=1e-9)
        assert float(values[0, 0]) == float(torch.tensor(2.0, dtype=dtype) / 9)

    @NONFINITE
    def test_nonfinite_feature_gives_a_nan_peak(self, backend_device, bad):
        """The public ops learn of non-finite features from the peaks (ops.CHECK_FINITE):
        every kernel, like the reference, must make such a map's peak NaN, and only its."""
        feats, protos, center, scale, rotation = _nonfinite_problem(backend_device, bad)
        _, peaks = self.kernel(backend_device)(feats, protos, center, scale, rotation, 3)
        _assert_nan_peaks_of_item_1(peaks)

    def test_bad_arguments_raise(self, backend_device):
        device = backend_device[1]
        op = self.kernel(backend_device)
        feats = torch.randn(1, 4, 8, 8, device=device)
        protos = torch.randn(1, 2, 4, device=device)
        center, scale, rotation = _crop(1, torch.float32, device)
        with pytest.raises((RuntimeError, ValueError)):
            op(feats, protos, center, scale, rotation, 4)  # even kernel
        with pytest.raises((RuntimeError, ValueError)):
            op(feats, torch.randn(1, 2, 5, device=device), center, scale, rotation, 3)


# --------------------------------------------------------------------------
# decode_heatmaps: mean filter and argmax of given heatmaps
# --------------------------------------------------------------------------
class TestDecodeHeatmaps(KernelOpTestBase):
    op = "decode_heatmaps"
    cases = KERNELS
    empty_cases = EMPTY
    opcheck_dtypes = (torch.float32, torch.float64)
    test_gradcheck = None  # the decoded argmax has no gradient
    test_compile = None  # compiled with the fused op in TestHeatmapDecode.test_compile

    def make_inputs(self, backend_device, dtype, kernel):
        name, device = backend_device
        inputs = []
        for b, _, h, w, k in _shapes(name, device):
            maps = torch.randn(b, k, h, w, dtype=dtype, device=device)
            center, scale, rotation = _crop(b, dtype, device)
            inputs.append((maps, center, scale, kernel, rotation))
        return inputs

    def run(self, backend_device, maps, center, scale, kernel, rotation):
        return ops.decode_heatmaps(maps, center, scale, kernel, backend=backend_device[0], rotation=rotation)

    def reference(self, maps, center, scale, kernel, rotation):
        return reference.decode_heatmaps(maps, center, scale, kernel, rotation)

    def assert_matches(self, out, expected, inputs, dtype, allow_ties=True):
        maps, center, scale, kernel, rotation = inputs
        smooth = reference.smooth_heatmaps(maps, kernel)
        return _check_decoded(out, expected, smooth, center, scale, rotation, dtype, allow_ties)

    def non_contiguous_inputs(self, backend_device, dtype):
        feats, protos, center, scale, rotation = _strided_problem(backend_device, dtype)
        maps = reference.prototype_heatmaps(feats, protos).transpose(2, 3).contiguous().transpose(2, 3)
        return [(maps, center, scale, kernel, rotation) for kernel in (15, 3)]

    def empty_inputs(self, backend_device, dtype, empty_case):
        feats, protos, center, scale, rotation = _empty_problem(backend_device, dtype, empty_case)
        maps = ops.prototype_heatmaps(feats, protos, backend=backend_device[0])
        return maps, center, scale, 15, rotation

    def opcheck_inputs(self, backend_device, dtype):
        feats, protos, center, scale, rotation = _opcheck_problem(backend_device, dtype)
        maps = torch.randn(protos.shape[:2] + feats.shape[2:], dtype=dtype, device=feats.device)
        return [(self.kernel(backend_device), (maps, center, scale, rotation, 5))]

    @pytest.mark.parametrize("kernel", [15, 3])
    def test_planted_peaks_no_flips(self, backend_device, kernel, dtype):
        name, device = backend_device
        for b, _, h, w, k in _shapes(name, device):
            maps = _planted(b, k, h, w, dtype, device)
            center, scale, rotation = _crop(b, dtype, device)
            inputs = (maps, center, scale, kernel, rotation)
            out = self.run(backend_device, *inputs)
            self.assert_matches(out, self.reference(*inputs), inputs, dtype, allow_ties=False)

    def test_ties_take_first_maximum(self, backend_device, dtype):
        maps, center, scale, rotation = _tie_problem(backend_device, dtype)
        for kernel in (3, 1):
            out = self.run(backend_device, maps, center, scale, kernel, rotation)
            _assert_first_maxima(out, maps, scale, kernel, dtype)

    @NONFINITE
    def test_nonfinite_map_gives_a_nan_peak(self, backend_device, bad):
        """As the fused op's test, on the heatmaps of those features; the
        reference's decoder must agree."""
        feats, protos, center, scale, rotation = _nonfinite_problem(backend_device, bad)
        heat = reference.prototype_heatmaps(feats, protos)
        _, peaks = self.kernel(backend_device)(heat, center, scale, rotation, 3)
        _assert_nan_peaks_of_item_1(peaks)
        _, peaks = reference.decode_heatmaps(heat, center, scale, 3, rotation)
        _assert_nan_peaks_of_item_1(peaks)

    def test_bad_arguments_raise(self, backend_device):
        device = backend_device[1]
        maps = torch.randn(1, 4, 8, 8, device=device)
        center, scale, rotation = _crop(1, torch.float32, device)
        with pytest.raises((RuntimeError, ValueError, TypeError)):
            self.kernel(backend_device)(maps, center.double(), scale, rotation, 3)


# --------------------------------------------------------------------------
# smooth_features, the public ops' finite checks, the CUDA fallback
# --------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", [15, 3, 1])
@pytest.mark.parametrize("b, c, h, w", [(2, 16, 32, 32), (1, 8, 64, 64), (3, 5, 7, 20), (1, 4, 5, 3)])
def test_smooth_features_is_the_reference_filter(b, c, h, w, kernel, dtype, device):
    """Every channel filtered like reference.smooth_heatmaps filters a map,
    including maps smaller than the window and non-contiguous input."""
    feats = torch.randn(b, c, w, h, dtype=dtype, device=device).transpose(2, 3)  # non-contiguous
    out = ops.smooth_features(feats, kernel)
    assert out.shape == feats.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, reference.smooth_heatmaps(feats, kernel), **tol(dtype))


def test_smooth_features_bad_input():
    with pytest.raises(ValueError, match="smooth_features: features must be"):
        ops.smooth_features(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="kernel"):
        ops.smooth_features(torch.zeros(1, 2, 4, 4), 4)
    with pytest.raises(TypeError, match="floating"):
        ops.smooth_features(torch.zeros(1, 2, 4, 4, dtype=torch.int64))


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_large_grid_falls_back():
    """A grid whose tile does not fit in shared memory takes the unfused path."""
    if not ops.available("heatmap_decode", "cuda", "cuda"):
        pytest.skip("cuda backend of heatmap_decode not built")
    dtype = torch.float64
    b, c, h, w, k = 1, 4, 160, 140, 2  # 2 x 160 x 140 doubles > 227 KiB
    feats = torch.randn(b, c, h, w, dtype=dtype, device="cuda")
    protos = torch.randn(b, k, c, dtype=dtype, device="cuda")
    center, scale, rotation = _crop(b, dtype, "cuda")
    ref = reference.heatmap_decode(feats, protos, center, scale, 15, rotation)
    smooth = reference.smooth_heatmaps(reference.prototype_heatmaps(feats, protos), 15)
    out = ops.heatmap_decode(feats, protos, center, scale, 15, backend="cuda", rotation=rotation)
    assert _check_decoded(out, ref, smooth, center, scale, rotation, dtype) == 0
    out = ops.decode_heatmaps(reference.prototype_heatmaps(feats, protos), center, scale, 15, backend="cuda",
                              rotation=rotation)
    assert _check_decoded(out, ref, smooth, center, scale, rotation, dtype) == 0


def test_cells_inverse_is_exact():
    """The test's own helper: _cells inverts reference.heatmap_to_image."""
    b, k, h, w = 3, 4, 20, 24
    cells = torch.stack((torch.randint(0, w, (b, k)), torch.randint(0, h, (b, k))), -1)
    center, scale, rotation = _crop(b, torch.float32, "cpu")
    shifted = cells.float() + 0.25 * torch.randint(-1, 2, (b, k, 2)).float()
    coords = reference.heatmap_to_image(shifted, center, scale, (w, h), rotation)
    assert torch.equal(_cells(coords, center, scale, rotation, h, w), cells)
    assert math.isfinite(float(coords.abs().max()))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_public_ops_name_the_nonfinite_argument(backend):
    g = torch.Generator().manual_seed(6)
    feats, protos = torch.randn(2, 8, 16, 16, generator=g), torch.randn(2, 3, 8, generator=g)
    center, scale = torch.full((2, 2), 100.0), torch.ones(2, 2)
    bad = feats.clone()
    bad[1, 2, 3, 4] = float("inf")
    with pytest.raises(ValueError, match="heatmap_decode: features contains Inf"):
        ops.heatmap_decode(bad, protos, center, scale, backend=backend)
    with pytest.raises(ValueError, match="decode_heatmaps: heatmaps contains Inf"):
        ops.decode_heatmaps(reference.prototype_heatmaps(bad, protos), center, scale, backend=backend)
    with pytest.raises(ValueError, match="prototype_heatmaps: features contains Inf"):
        ops.prototype_heatmaps(bad, protos, backend=backend)
    nan_protos = protos.clone()
    nan_protos[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="heatmap_decode: prototypes contains NaN"):
        ops.heatmap_decode(feats, nan_protos, center, scale, backend=backend)
    with pytest.raises(ValueError, match="heatmap_decode: scale contains NaN"):
        ops.heatmap_decode(feats, protos, center, torch.full((2, 2), float("nan")), backend=backend)
    with ops.finite_checks(False):  # off: no check, no error
        ops.heatmap_decode(bad, protos, center, scale, backend=backend)


def test_finite_check_reads_no_full_size_mask(monkeypatch):
    """The default check must not build a [B, C, H, W] boolean mask of the
    features (that alone cost 4x the fused decode at the MP-100 shape): it
    reads the [B, K] peaks and reduces the small arguments."""
    feats, protos = torch.randn(3, 16, 32, 32), torch.randn(3, 5, 16)
    center, scale = torch.full((3, 2), 100.0), torch.ones(3, 2)
    sizes = []
    real = torch.isfinite

    def spy(t):
        sizes.append(t.numel())
        return real(t)

    monkeypatch.setattr(torch, "isfinite", spy)
    ops.heatmap_decode(feats, protos, center, scale)
    ops.decode_heatmaps(torch.randn(3, 5, 32, 32), center, scale)
    assert sizes and max(sizes) <= 3 * 5  # at most the peaks, elementwise
