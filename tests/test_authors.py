"""The authors' checkpoints (docs/authors.md): their key layout loads and
runs everywhere a checkpoint is accepted, a file of another kind gets one
clear error, and each step where their computation differs from
escape_fast's own is checked by hand.

The key names and shapes come from docs/authors_code/*.tsv, written by
reading their module definitions (not from escape_fast's key map), so a
wrong map fails here."""

from __future__ import annotations

import collections
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from escape_fast import checkpoint, reference
from escape_fast.models import blend
from escape_fast.data.transforms import CropBatch
from escape_fast.models.escape import Adapted, EscapeModel
from escape_fast.models.matching import AuthorsMatchingNetwork, authors_sincos

ROOT = Path(__file__).resolve().parents[1]
KEYS = ROOT / "docs" / "authors_code"
FIXTURE = ROOT.parent / "shared" / "data" / "mp100_fixture"
SUPER, BASE = 30, 40  # super-keypoints of the ESCAPE file, rows of the baseline's table


def _their_state(kind: str, seed: int = 0) -> collections.OrderedDict:
    """A state dict with the key names and shapes of their ``kind`` file
    ("baseline" or "escape"): small random weights, BN statistics that keep
    activations finite."""
    g = torch.Generator().manual_seed(seed)
    state = collections.OrderedDict()
    for line in (KEYS / f"authors_state_dict_keys_{kind}.tsv").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        dims = [SUPER if d == "'S'" else BASE if d == "'L'" else int(d)
                for d in shape.strip("[]").split(",") if d.strip()]
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100)
        elif key.endswith("running_var"):
            state[key] = torch.rand(dims, generator=g) + 0.5
        elif key.endswith(("running_mean", ".bias", "bin_score")):
            state[key] = torch.randn(dims, generator=g) * 0.1
        else:  # convolutions and linear layers at the scale of a fan-in initialization
            fan_in = max(1, math.prod(dims[1:])) if len(dims) > 1 else 1
            state[key] = torch.randn(dims, generator=g) / math.sqrt(fan_in)
    state._metadata = collections.OrderedDict({"": {"version": 1}})
    return state


def _save_mmcv(state, path, numpy1: bool = True):
    """What mmcv's save_checkpoint writes: state_dict, meta (with a numpy
    float64 score, pickled under numpy 1's module name when ``numpy1``) and
    the optimizer's state."""
    obj = {"state_dict": state,
           "meta": {"epoch": 60, "iter": 1000, "mmcv_version": "1.6.0", "config": "model = dict(...)",
                    "hook_msgs": {"best_score": np.float64(0.8435), "last_ckpt": "latest.pth"}},
           "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                         "param_groups": [{"lr": 5e-4, "betas": (0.9, 0.999), "eps": 1e-8, "params": [0],
                                           "foreach": None}]}}
    buf = io.BytesIO()
    torch.save(obj, buf)
    raw = buf.getvalue()
    if numpy1:  # numpy 2 writes numpy._core; the authors' files (2024) most likely numpy.core
        import zipfile

        src = zipfile.ZipFile(io.BytesIO(raw))
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
            for info in src.infolist():
                data = src.read(info)
                if info.filename.endswith("data.pkl"):
                    assert b"numpy._core.multiarray" in data
                    data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
                dst.writestr(info, data)
        raw = out.getvalue()
    Path(path).write_bytes(raw)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("authors")
    return {kind: _save_mmcv(_their_state(kind), folder / f"{kind}_split1.pth") for kind in ("baseline", "escape")}


# --------------------------------------------------------------------------
# their files load and run
# --------------------------------------------------------------------------
def test_their_files_load_with_weights_only(files):
    baseline = EscapeModel.load(files["baseline"])
    assert baseline.methods == ("mle",) and baseline.config.pooling == "cell"
    state = _their_state("escape")
    model = EscapeModel.load(files["escape"])
    assert model.methods == ("mle", "map", "escape") and model.alpha_for(1) == model.alpha_for(5) == 0.5
    torch.testing.assert_close(model.super_keypoints, state["keypoint_head.superkeypoints"])
    torch.testing.assert_close(model.matcher.omega.detach(), state["keypoint_head.omega"])
    torch.testing.assert_close(model.extractor.trunk.body[4][0].conv2.weight.detach(),
                               state["backbone.layer1.0.conv2.weight"])
    torch.testing.assert_close(model.matcher_extractor.head[6].weight.detach(),
                               state["keypoint_head.matching_network.deconv.deconv_layers.6.weight"])
    block = model.matcher.blocks[5]
    torch.testing.assert_close(block.cross_sk.to_v.weight.detach(),
                               state["keypoint_head.matching_network.GAT.layers.5.6.to_v.weight"])
    torch.testing.assert_close(block.ff_sk2[3].bias.detach(),
                               state["keypoint_head.matching_network.GAT.layers.5.7.net.3.bias"])


def test_their_files_predict_on_photographs_and_convert(files, tmp_path):
    from escape_fast.data.coco import load_coco
    from escape_fast.predict import KeypointSet, Predictor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coco = load_coco(FIXTURE / "annotations" / "fixture_all.json")
    support, query = coco.instances[0], coco.instances[1]  # two of one category
    assert support.category_id == query.category_id
    kps = KeypointSet(tuple(f"k{i}" for i in range(len(support.keypoints))), support.keypoints, support.visible,
                      box=support.bbox, source="fixture")
    predictor = Predictor(files["escape"], method="escape", device="cpu")
    predictor.adapt(support.image.path, kps)
    result = predictor.predict([query.image.path], [query.bbox.tolist()])[0]
    assert result.ok and np.isfinite(result.keypoints).all()

    out = tmp_path / "escape.pt"  # the converter: their file -> an escape_fast model file, same predictions
    from escape_fast.convert import main

    assert main([str(files["escape"]), str(out)]) == 0
    again = Predictor(out, method="escape", device="cpu").adapt(support.image.path, kps)
    np.testing.assert_allclose(again.predict([query.image.path], [query.bbox.tolist()])[0].keypoints,
                               result.keypoints, atol=1e-4)


# --------------------------------------------------------------------------
# files of another kind: one error that says what is wrong
# --------------------------------------------------------------------------
def test_wrong_files_name_what_is_missing(tmp_path):
    state = _their_state("baseline")
    del state["backbone.layer3.2.bn2.running_var"]
    with pytest.raises(checkpoint.CheckpointError, match=r"1 missing \(backbone.layer3.2.bn2.running_var\)"):
        EscapeModel.load(_save_mmcv(state, tmp_path / "a.pth"))
    state = _their_state("baseline")
    state["deconv.deconv_layers.0.weight"] = torch.zeros(512, 256, 4, 4)  # a ResNet-18 head
    with pytest.raises(checkpoint.CheckpointError, match=r"deconv.deconv_layers.0.weight \[512, 256, 4, 4\] "
                                                         r"\(expected \[2048, 256, 4, 4\]\)"):
        EscapeModel.load(_save_mmcv(state, tmp_path / "b.pth"))
    state = _their_state("baseline")
    state["keypoint_head.extra.weight"] = torch.zeros(3)
    with pytest.raises(checkpoint.CheckpointError, match="1 weights escape_fast does not know "
                                                         r"\(keypoint_head.extra.weight\)"):
        EscapeModel.load(_save_mmcv(state, tmp_path / "c.pth"))
    state = _their_state("escape")
    del state["keypoint_head.matching_network.GAT.layers.2.4.to_k.weight"]
    with pytest.raises(checkpoint.CheckpointError, match="authors' ESCAPE checkpoint: 1 missing"):
        EscapeModel.load(_save_mmcv(state, tmp_path / "d.pth"))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "e.pth")
    with pytest.raises(checkpoint.CheckpointError, match="e.pth' is not an escape_fast checkpoint.*nor one of"):
        EscapeModel.load(tmp_path / "e.pth")


def test_pickled_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"state_dict": _their_state("baseline"), "meta": {"x": Payload()}}, tmp_path / "evil.pth")
    with pytest.raises(checkpoint.CheckpointError, match="evil.pth.*cannot be read safely.*print"):
        EscapeModel.load(tmp_path / "evil.pth")


# --------------------------------------------------------------------------
# their steps, by hand
# --------------------------------------------------------------------------
def test_their_sincos_divides_by_half_minus_one():
    pe = authors_sincos(torch.tensor([0.0, 1.0, 5.0]), 8)  # half 4: frequencies 10000^(-i/3)
    freq = [10000.0 ** (-i / 3) for i in range(4)]
    want = [[math.sin(p * f) for f in freq] + [math.cos(p * f) for f in freq] for p in (0.0, 1.0, 5.0)]
    torch.testing.assert_close(pe, torch.tensor(want))


def test_cell_pooling_rounds_half_up_toward_zero_and_keeps_their_edge():
    model = EscapeModel.build(dict(_small_config(), pooling="cell", input_size=256))  # a 64 x 64 grid
    kp = torch.tensor([[[2.5, 2.49], [-0.4, -0.6], [-1.6, 10.0], [-7.4, 3.0], [-7.6, 3.0], [69.4, 3.0]]])
    torch.testing.assert_close(model.pooling_positions(kp),
                               torch.tensor([[[3.0, 2.0], [0.0, 0.0], [-1.0, 10.0], [-6.0, 3.0], [-7.0, 3.0],
                                              [69.0, 3.0]]]))
    # their target keeps a rounded centre in [-7, 69] (its window may be empty); sigma 2 -> 3 sigma = 6
    # (rounded: -8.0 -> -7, -8.6 -> -8, 69.4 -> 69, 69.5 -> 70)
    vis = model.support_visible(torch.tensor([[[-8.0, 3.0], [-8.6, 3.0], [69.4, 3.0], [69.5, 3.0]]]),
                                torch.ones(1, 4, dtype=torch.bool))
    assert vis.tolist() == [[True, False, True, False]]
    exact = EscapeModel.build(dict(_small_config(), input_size=256))  # ours: the window must reach a cell
    vis = exact.support_visible(torch.tensor([[[-6.0, 3.0], [-6.5, 3.0], [69.0, 3.0], [69.5, 3.0]]]),
                                torch.ones(1, 4, dtype=torch.bool))
    assert vis.tolist() == [[True, False, True, False]]


def test_nonpositive_peak_predicts_the_cell_before_the_corner():
    model = EscapeModel.build(dict(_small_config(), nonpositive_peak="corner"))
    feats = torch.rand(1, 4, 16, 16)
    protos = torch.stack([-torch.ones(4), torch.ones(4)])[None]  # peak < 0 for the first, > 0 for the second
    center, scale = torch.tensor([[50.0, 60.0]]), torch.tensor([[0.32, 0.32]])
    coords, peaks = model.predict(feats, Adapted(protos), CropBatch(center, scale))
    side = 200 * 0.32  # the crop's side in pixels; a cell is side / 16
    torch.testing.assert_close(coords[0, 0], torch.tensor([50 - side / 2 - side / 16, 60 - side / 2 - side / 16]))
    kept = EscapeModel.build(_small_config()).predict(feats, Adapted(protos), CropBatch(center, scale))[0]
    torch.testing.assert_close(coords[0, 1], kept[0, 1])
    assert peaks[0, 0] < 0 < peaks[0, 1]


def test_raw_blend_is_eq_10_as_written():
    means, prior = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    torch.testing.assert_close(blend(means, prior, 0.5, rescale=False), torch.tensor([[0.5, 2.0]]))
    torch.testing.assert_close(blend(means, prior, 0.5), torch.tensor([[0.5, 0.5]]))  # ours: prior at the mean's norm


def test_their_tokens_position_codes_clamp_and_scale():
    """With no attention blocks the scores are the tokens' inner products:
    keypoint token LN-Linear-LN(feature) + (their sincos of the rounded cell
    index + 1) for a visible keypoint, LN-Linear-LN(0) alone for an invisible
    one; super-keypoint tokens LN-Linear-LN(omega) + sincos(index), scaled
    together so the largest norm is at most 100; scores / sqrt(C)."""
    torch.manual_seed(0)
    c, grid = 8, 16
    net = AuthorsMatchingNetwork(3, dim=c, blocks=0, heads=2, head_dim=4, mlp=16, grid=grid, pad_to=5)
    with torch.no_grad():
        net.omega.mul_(1000)
        net.sk_embed[2].weight.fill_(60.0)  # super-keypoint tokens far above norm 100
    feats = torch.randn(1, 2, c)
    cells = torch.tensor([[[3.5, 2.2], [40.0, -3.0]]])  # the second: outside, clamped (and invisible)
    visible = torch.tensor([[True, False]])
    scores = net.scores(feats, cells, visible)
    kp0 = net.kp_embed(feats[0, 0]) + authors_sincos(torch.tensor(2.0 * grid + 4.0), c) + 1
    kp1 = net.kp_embed(torch.zeros(c))
    sk = net.sk_embed(net.omega) + authors_sincos(torch.arange(3.0), c)
    largest = sk.norm(dim=-1).max()
    assert largest > 100
    sk = sk * 100 / largest
    want = torch.stack([kp0 @ sk.T, kp1 @ sk.T]) / math.sqrt(c)
    torch.testing.assert_close(scores[0], want, rtol=1e-5, atol=1e-4)


def test_padded_tokens_take_part_in_attention():
    """Their attention masks nothing: the scores of the real keypoints depend
    on how many padding tokens follow them."""
    torch.manual_seed(0)
    net = AuthorsMatchingNetwork(4, dim=8, blocks=1, heads=2, head_dim=4, mlp=16, grid=16, pad_to=68).eval()
    feats, cells, vis = torch.randn(1, 3, 8), torch.rand(1, 3, 2) * 15, torch.ones(1, 3, dtype=torch.bool)
    with torch.no_grad():
        a = net.scores(feats, cells, vis)
        net.pad_to = 3
        b = net.scores(feats, cells, vis)
    assert not torch.allclose(a, b, atol=1e-4)


def test_corner_uses_the_reference_crop_map():
    # the cell (-1, -1) goes through the same crop map as every prediction
    pts = reference.heatmap_to_image(torch.tensor([[[-1.0, -1.0]]]), torch.tensor([[10.0, 20.0]]),
                                     torch.tensor([[1.0, 1.0]]), (64, 64))
    torch.testing.assert_close(pts, torch.tensor([[[10 - 100 - 200 / 64, 20 - 100 - 200 / 64]]]))


def _small_config() -> dict:
    return {"backbone": "tiny", "weights": None, "head": "deconv", "channels": 4, "input_size": 64, "sigma": 2.0,
            "decode_kernel": 1, "alpha": 0.5}


def test_parity_script_counts_what_agrees(files, tmp_path):
    """benchmarks/authors_parity.py against predictions written in their
    harness's format: our own predictions agree everywhere; one keypoint moved
    by 2 px and one episode with NaN scores are counted as such."""
    import subprocess
    import sys

    from escape_fast.data import Episode, load_coco
    from escape_fast.eval.engine import predict_episodes

    ann = FIXTURE / "annotations" / "fixture_all.json"
    coco = load_coco(ann)
    cat = coco.category_ids[0]
    rows = coco.instances_of(cat)[:3]
    model = EscapeModel.load(files["baseline"])
    episodes = [Episode(cat, 0, (rows[0],), (rows[1],)), Episode(cat, 1, (rows[1],), (rows[2],)),
                Episode(cat, 2, (rows[2],), (rows[0],))]
    preds = predict_episodes(model, coco, episodes, "mle", "cpu", amp=False)
    k = coco.categories[cat].num_keypoints
    theirs = [{"supports": [coco.instances[e.supports[0]].ann_id], "query": coco.instances[e.queries[0]].ann_id,
               "keypoints": p[0, :k].tolist(), "maxvals": [1.0] * k} for e, p in zip(episodes, preds)]
    theirs[0]["keypoints"][0][0] += 2.0
    theirs[2]["maxvals"][0] = None
    path = tmp_path / "theirs.json"
    path.write_text(json.dumps({"episodes": theirs}))
    out = tmp_path / "parity.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "authors_parity.py"), "--theirs", str(path),
                           "--checkpoint", str(files["baseline"]), "--method", "mle", "--ann", str(ann),
                           "--out", str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(out.read_text())["summary"]
    assert summary["episodes_compared"] == 2 and summary["episodes_theirs_not_finite"] == [2]
    assert summary["keypoints"] == 2 * k
    assert summary["within_tolerance_all"] == pytest.approx((2 * k - 1) / (2 * k))
    assert summary["max_px"] == pytest.approx(2.0, abs=1e-3)


def test_rows_past_pad_to_that_no_support_has_do_not_take_part():
    """A batch padded past 68 (a data set with a larger category) gives the
    68 real-or-padding tokens their loader would: the same scores as the
    category's rows alone, zeros for the extra rows."""
    g = torch.Generator().manual_seed(2)
    net = AuthorsMatchingNetwork(4, dim=8, blocks=1, heads=2, head_dim=4, mlp=16, grid=16, pad_to=6).eval()
    feats, cells = torch.randn(2, 5, 8, generator=g), torch.rand(2, 5, 2, generator=g) * 15
    vis = torch.ones(2, 5, dtype=torch.bool)
    vis[1, 4] = False
    with torch.no_grad():
        alone = net.scores(feats, cells, vis)
        wide = net.scores(torch.cat((feats, torch.zeros(2, 4, 8)), 1), torch.cat((cells, torch.zeros(2, 4, 2)), 1),
                          torch.cat((vis, torch.zeros(2, 4, dtype=torch.bool)), 1))
    torch.testing.assert_close(wide[:, :5], alone, rtol=0, atol=1e-6)
    assert wide.shape == (2, 9, 4) and (wide[:, 6:] == 0).all()  # row 5 is a padding token, as theirs
    # their frequencies: 1 / 10000^(i / (half - 1)), as float32
    half = 64
    want = 1.0 / torch.tensor(10000.0) ** (torch.arange(half, dtype=torch.float32) / (half - 1))
    torch.testing.assert_close(authors_sincos(torch.tensor([1.0]), 2 * half)[0, :half], torch.sin(want), rtol=0,
                               atol=0)
