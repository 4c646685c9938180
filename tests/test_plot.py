"""Every figure of ``python -m escape_fast.plot`` from a run: each command
writes a non-empty PNG; the data behind the figures is checked where it can
be (membership read from cluster.pt, the episode grid's predictions equal
the evaluation's)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from escape_fast import builtin, checkpoint
from escape_fast.data import load_coco
from escape_fast.eval.engine import evaluate, predict_episodes
from escape_fast.models.escape import EscapeModel
from escape_fast.plot import episodes_from_settings, load_members, main, members_from_run
from escape_fast.prior import base_keypoint_table

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("ESCAPE_FAST_FIXTURE", ROOT.parent / "shared" / "data" / "mp100_fixture"))
pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"MP-100 fixture not found at {FIXTURE}")

TRAIN = FIXTURE / "annotations" / "fixture_split1_train.json"
TEST = FIXTURE / "annotations" / "fixture_split1_test.json"
ALL = FIXTURE / "annotations" / "fixture_all.json"
SUPPORT = FIXTURE / "images" / "human_body" / "000000000785.jpg"


def _png(path: Path) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 10_000, path
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[0] > 200 and image.shape[1] > 200 and image.std() > 5  # something was drawn
    return image


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """An eval report of the built-in model on the fixture's test categories (1 query per draw)."""
    out = tmp_path_factory.mktemp("eval") / "report.json"
    proc = subprocess.run([sys.executable, "-m", "escape_fast.eval", "--annotations", str(TEST), "--queries", "1",
                           "--episodes", "15", "--method", "all", "--workers", "0", "--device", "cpu", "--quiet",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder: the built-in model and a stage-2 cluster.pt over the fixture's training keypoints."""
    run = tmp_path_factory.mktemp("run")
    shutil.copy(builtin.checkpoint_path(), run / "model.pt")
    mu = EscapeModel.load(run / "model.pt").super_keypoints
    _, _, keys = base_keypoint_table(load_coco(TRAIN))
    gen = torch.Generator().manual_seed(0)
    assignment = torch.randint(0, 12, (len(keys),), generator=gen)
    assignment[::17] = -1  # keypoints never seen in training
    vectors = mu[assignment.clamp_min(0)] + 0.1 * torch.randn(len(keys), mu.shape[1], generator=gen)
    checkpoint.save({"super_keypoints": mu, "assignment": assignment, "vectors": vectors, "keys": torch.tensor(keys),
                     "config": {"cluster": {"source": "features"}}}, run / "cluster.pt", kind="cluster")
    return run


def test_pck_bars(report, tmp_path):
    assert main(["pck", "--report", str(report), "--out", str(tmp_path / "pck.png")]) == 0
    _png(tmp_path / "pck.png")
    assert main(["pck", "--report", str(report), "--method", "mle,escape", "--out", str(tmp_path / "two.png")]) == 0
    _png(tmp_path / "two.png")


def test_pck_rejects_what_is_not_a_report(tmp_path, capsys):
    bad = tmp_path / "notareport.json"
    bad.write_text(json.dumps({"queries": []}))
    assert main(["pck", "--report", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert "notareport.json: not an evaluation report" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_episode_grid_shows_the_evaluated_predictions(report, tmp_path):
    assert main(["episodes", "--report", str(report), "--episodes", "0,3,6", "--device", "cpu", "--quiet",
                 "--out", str(tmp_path / "grid.png")]) == 0
    _png(tmp_path / "grid.png")
    # the grid's episodes and predictions are those of the evaluation
    settings = json.loads(report.read_text())
    coco = load_coco(TEST)
    sampler = episodes_from_settings(coco, settings["shots"], settings["queries"], settings["episodes"],
                                     settings["seed"])
    model = EscapeModel.load(settings["checkpoint"])
    full = evaluate(model, coco, sampler, ("escape",))["escape"].predictions  # pair p = episode p (Q = 1)
    chosen = [0, 3, 6, 14]
    got = predict_episodes(model, coco, [sampler[i] for i in chosen], "escape")
    for i, g in zip(chosen, got):
        k = coco.categories[sampler[i].category_id].num_keypoints
        np.testing.assert_allclose(g[0, :k], full[i, :k], atol=1e-3)


def test_episode_grid_from_settings_and_bad_indices(tmp_path, capsys):
    args = ["episodes", "--annotations", str(TEST), "--queries", "1", "--pairs", "10", "--method", "mle",
            "--device", "cpu", "--quiet"]
    assert main([*args, "--episodes", "1", "--out", str(tmp_path / "one.png")]) == 0
    Image.open(tmp_path / "one.png").verify()
    assert main([*args, "--episodes", "10", "--out", str(tmp_path / "bad.png")]) == 2
    assert "episodes must be in 0..9" in capsys.readouterr().err


def test_super_keypoint_map_from_a_model_and_a_dataset(tmp_path):
    assert main(["super-keypoints", "--annotations", str(TRAIN), "--per-category", "2", "--device", "cpu",
                 "--quiet", "--out", str(tmp_path / "map.png")]) == 0
    _png(tmp_path / "map.png")


def test_super_keypoint_map_from_a_run_folder(run_dir, tmp_path):
    members = members_from_run(str(run_dir), str(TRAIN))
    stored = checkpoint.load(run_dir / "cluster.pt", kind="cluster")
    assert torch.equal(members.assignment, stored["assignment"]) and "stage-2 clustering" in members.source
    z = int(stored["assignment"][0])
    assert 0 in members.of(z) and all(int(stored["assignment"][i]) == z for i in members.of(z))
    assert members.name(0) == ("human_body", "nose")  # category 1, keypoint 0 of the training file
    model = EscapeModel.load(run_dir / "model.pt")
    for ckpt in (str(run_dir), str(run_dir / "model.pt")):
        assert "stage-2 clustering" in load_members(ckpt, model, str(TRAIN), "cpu", show_progress=False).source
    assert main(["super-keypoints", "--checkpoint", str(run_dir), "--annotations", str(TRAIN), "--device", "cpu",
                 "--quiet", "--out", str(tmp_path / "run_map.png")]) == 0
    _png(tmp_path / "run_map.png")


def test_matching_figure(run_dir, tmp_path):
    for ckpt in ([], ["--checkpoint", str(run_dir)]):
        out = tmp_path / f"matching{len(ckpt)}.png"
        assert main(["matching", "--support", str(SUPPORT), "--support-keypoints", str(ALL), "--annotations",
                     str(TRAIN), "--per-category", "2", "--device", "cpu", "--quiet", *ckpt, "--out", str(out)]) == 0
        _png(out)
