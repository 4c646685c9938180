"""The public wrappers: input checks that say what they got, backend choice, info()."""

from __future__ import annotations

import io
import os

import pytest
import torch

import escape_fast
from escape_fast import ops, reference


def _pool_inputs(b=2, k=3, c=4, h=8, w=8):
    return torch.randn(b, c, h, w), torch.rand(b, k, 2) * 8, torch.ones(b, k, dtype=torch.bool)


def test_wrong_keypoint_shape_names_the_argument():
    f, kp, vis = _pool_inputs()
    with pytest.raises(ValueError, match=r"keypoints must be \[B, K, 2\].*\[2, 3, 3\]"):
        ops.keypoint_pool(f, torch.rand(2, 3, 3), vis)


def test_batch_mismatch_is_reported_with_its_origin():
    f, kp, vis = _pool_inputs()
    with pytest.raises(ValueError, match=r"B=2 \(from an earlier argument\)"):
        ops.keypoint_pool(f, kp[:1], vis)


def test_nan_in_features_is_reported_where_pooling_reads():
    f, kp, vis = _pool_inputs()
    kp[0, 0] = torch.tensor([2.0, 3.0])
    f[0, 1, 3, 2] = float("nan")  # inside keypoint 0's window
    with pytest.raises(ValueError, match="features contains NaN"):
        ops.keypoint_pool(f, kp, vis)
    # a NaN that no window reads neither reaches the output nor stops the op
    # (finding it would mean reading all of the features: see ops.CHECK_FINITE)
    f, kp, vis = torch.randn(1, 4, 32, 32), torch.tensor([[[5.0, 5.0]]]), torch.ones(1, 1, dtype=torch.bool)
    f[0, 0, 30, 30] = float("nan")
    assert torch.isfinite(ops.keypoint_pool(f, kp, vis)).all()


def test_mixed_devices_are_reported():
    f, kp, vis = _pool_inputs()
    with pytest.raises(ValueError, match="one device.*meta"):
        ops.keypoint_pool(f, kp.to("meta"), vis)


def test_integer_features_and_bad_arguments_are_rejected():
    f, kp, vis = _pool_inputs()
    with pytest.raises(TypeError, match="floating-point"):
        ops.keypoint_pool(f.long(), kp, vis)
    with pytest.raises(ValueError, match="kernel must be a positive odd int"):
        ops.decode_heatmaps(torch.rand(1, 2, 8, 8), torch.zeros(1, 2), torch.ones(1, 2), kernel=4)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.prototype_heatmaps(f, torch.rand(2, 3, 4), backend="gpu")
    with pytest.raises(ValueError, match="bin_score must be a scalar or \\[B\\]"):
        ops.sinkhorn_log(torch.rand(2, 3, 4), torch.zeros(3), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one column"):
        ops.sinkhorn_log(torch.rand(2, 3, 0), 0.0, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="threshold"):
        ops.cluster_keypoints(torch.rand(5, 3), torch.arange(5), threshold=1.5)


def test_unavailable_backend_raises_instead_of_falling_back():
    f, kp, vis = _pool_inputs()
    with pytest.raises(ops.BackendUnavailable, match="cuda"):
        ops.keypoint_pool(f, kp, vis, backend="cuda")


def test_reference_backend_equals_the_reference_module():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 5, 9, 9, generator=g)
    w = torch.randn(2, 3, 5, generator=g)
    c, s = torch.rand(2, 2, generator=g) * 50, torch.rand(2, 2, generator=g) + 0.2
    got = ops.heatmap_decode(f, w, c, s, backend="reference")
    want = reference.heatmap_decode(f, w, c, s)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    scores = torch.randn(2, 4, 6, generator=g)
    valid = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(
        ops.sinkhorn_log(scores, 0.5, valid, backend="reference"),
        reference.sinkhorn_log(scores, torch.tensor(0.5), valid),
    )


def test_auto_backend_is_resolved_and_reported():
    for op in ops.KERNEL_OPS:
        chosen = ops.resolve(op, "auto", "cpu")
        assert chosen in ("cpu", "reference")
        assert (chosen == "cpu") == ops.available(op, "cpu", "cpu")
    buf = io.StringIO()
    table = escape_fast.info(file=buf)
    text = buf.getvalue()
    assert "escape_fast" in text and "torch" in text and "sinkhorn_log" in text
    assert table["ops"]["sinkhorn_log@cpu"]["auto"] == ops.resolve("sinkhorn_log", "auto", "cpu")


def test_cpu_isa_choice_is_reported_forced_and_checked():
    """The CPU kernels' instruction set: the best this CPU has unless
    ESCAPE_FAST_CPU_ISA forces one at load; use_cpu_isa sets one for a block."""
    import subprocess
    import sys

    if not ops.cpu_isas():
        pytest.skip("the compiled extension is not built")
    isas = ops.cpu_isas()
    assert isas[0] == "baseline" and set(isas) <= set(ops.CPU_ISAS)
    assert ops.cpu_isa() == isas[-1]
    with ops.use_cpu_isa("baseline"):
        assert ops.cpu_isa() == "baseline"
    assert ops.cpu_isa() == isas[-1]
    missing = [isa for isa in ops.CPU_ISAS if isa not in isas]
    for isa in missing:
        with pytest.raises(ops.BackendUnavailable, match=isa):
            with ops.use_cpu_isa(isa):
                pass
    code = "from escape_fast import ops; print(ops.cpu_isa())"
    env = {k: v for k, v in os.environ.items() if k != "ESCAPE_FAST_CPU_ISA"}
    forced = subprocess.run([sys.executable, "-c", code], env={**env, "ESCAPE_FAST_CPU_ISA": "baseline"},
                            capture_output=True, text=True, check=True)
    assert forced.stdout.strip() == "baseline"
    bad = subprocess.run([sys.executable, "-c", code], env={**env, "ESCAPE_FAST_CPU_ISA": "sse9"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown CPU ISA 'sse9'" in bad.stderr


def test_every_cpu_isa_variant_gives_the_same_pooling_and_decoding_bits():
    """Pooling and the filter / argmax / crop map compile without FMA
    contraction: their results do not depend on the CPU they ran on."""
    if len(ops.cpu_isas()) < 2:
        pytest.skip("this CPU runs one ISA variant only")
    torch.manual_seed(0)
    feats = torch.randn(3, 16, 20, 24)
    kp, vis = torch.rand(3, 5, 2) * 22, torch.rand(3, 5) > 0.2
    maps = torch.randn(3, 5, 20, 24)
    center, scale, rot = torch.rand(3, 2) * 100, torch.rand(3, 2) + 0.5, torch.rand(3) * 30
    outs = {}
    for isa in ops.cpu_isas():
        with ops.use_cpu_isa(isa):
            outs[isa] = (ops.keypoint_pool(feats, kp, vis, 2.0, backend="cpu"),
                         *ops.decode_heatmaps(maps, center, scale, 5, backend="cpu", rotation=rot))
    for isa, out in outs.items():
        for got, want in zip(out, outs["baseline"]):
            assert torch.equal(got, want), isa


@pytest.mark.parametrize("shape", [(2, 5, 16, 16), (1, 7, 20, 24), (3, 2, 5, 9), (1, 1, 1, 1), (0, 3, 4, 4)])
def test_smooth_features_kernel_gives_the_torch_paths_bits(shape, dtype):
    """The CPU kernel of smooth_features (every ISA variant) equals the torch
    path's two avg_pool2d exactly, on contiguous and strided inputs; a
    gradient still flows through the torch path."""
    if not ops.available("smooth_features", "cpu", "cpu"):
        pytest.skip("the compiled extension is not built")
    wide = torch.randn(shape[0], shape[1], shape[2], shape[3] * 2, dtype=dtype)
    for feats in (wide[..., : shape[3]].contiguous(), wide[..., ::2]):
        for kernel in (3, 5, 15, 41):
            want = ops.smooth_features(feats, kernel, backend="reference")
            for isa in ops.cpu_isas():
                with ops.use_cpu_isa(isa):
                    got = ops.smooth_features(feats, kernel, backend="cpu")
                assert got.is_contiguous() and torch.equal(got, want), (isa, kernel)
            assert torch.equal(ops.smooth_features(feats, kernel), want)  # auto takes the kernel here
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: ops.smooth_features(t, 3), (x,))
