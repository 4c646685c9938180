"""The benchmark scripts run (at smoke sizes), so the GPU session that runs
them at full size does not find them broken."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_mp100_shaped_benchmark_smoke(tmp_path):
    out = tmp_path / "mp100_shaped.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_mp100_shaped.py"), "--smoke",
                           "--episodes", "900", "--repeat", "2", "--workers", "0", "--device", "cpu",
                           "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["pairs"] == 900 and record["instances"] == 60
    assert record["shape"]["max_keypoints"] == 68 and record["device"] == "cpu"
    assert len(record["eval_s_all"]) == 2 and record["eval_s_median"] > 0
    assert set(record["phases_s_last_run"]["1-shot"]) == {"data", "features", "adaptation", "heatmaps", "metric"}
    assert 0.0 <= record["pck_0.2_untrained"]["1-shot"] <= 1.0 and record["peak_rss_gib"] > 0


def test_mp100_shaped_dataset_has_mp100_shape(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_mp100_shaped import FULL, SMOKE, write_dataset
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from escape_fast.data import load_coco

    coco = load_coco(write_dataset(str(tmp_path), {**SMOKE, "categories": 4, "instances": 5}))
    assert len(coco.category_ids) == 4 and len(coco.instances) == 20
    counts = sorted(coco.categories[c].num_keypoints for c in coco.category_ids)
    assert counts[0] == 8 and counts[-1] == 68  # K from 8 up to MP-100's 68
    assert FULL["categories"] == 20 and FULL["instances"] == 100 and FULL["input_size"] == 256


FIXTURE = Path(os.environ.get("ESCAPE_FAST_FIXTURE", ROOT.parent / "shared" / "data" / "mp100_fixture"))


def test_real_photo_benchmark_small(tmp_path):
    """benchmarks/real_photos.py on two of the fixture's categories: both
    settings (query box given and withheld), the copy baseline and every
    method of each model, per category, each model beside the copy on the
    same episodes."""
    import pytest

    if not (FIXTURE / "annotations" / "fixture_all.json").is_file():
        pytest.skip(f"MP-100 photo fixture not found at {FIXTURE}")
    out = tmp_path / "photos.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "real_photos.py"), "--categories", "fly",
                           "zebra_dpk", "--models", "imagenet:efficientnet_lite0", "builtin", "--out", str(out)],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["episodes"] == {"1-shot": 4} and set(report["results"]) == {"1-shot box", "1-shot no box"}
    names = {"copy support pose", "imagenet:efficientnet_lite0 MLE", "builtin MLE", "builtin MAP", "builtin ESCAPE"}
    for setting in report["results"].values():
        assert set(setting) == names
        for name, r in setting.items():
            assert 0 <= r["pck"] <= 1 and set(r["per_category"]) == {"fly", "zebra_dpk"}
            assert ("vs_copy" in r) == (name != "copy support pose")
    assert "| copy support pose |" in proc.stdout


def _real_photos_and_fixture():
    """benchmarks/real_photos.py as a module, and the fixture's annotations (skips without the fixture)."""
    import pytest

    if not (FIXTURE / "annotations" / "fixture_all.json").is_file():
        pytest.skip(f"MP-100 photo fixture not found at {FIXTURE}")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import real_photos
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from escape_fast.data import load_coco

    return real_photos, load_coco(FIXTURE / "annotations" / "fixture_all.json")


def test_real_photo_episodes_take_supports_from_other_photographs():
    """k-shot episodes: k distinct supports of the query's category, none
    from the query's own photograph; 1-shot: every such ordered pair."""
    real_photos, coco = _real_photos_and_fixture()
    for shots in (1, 3):
        episodes = real_photos.episodes_of(coco, shots, ["human_body"])
        assert episodes
        for supports, q in episodes:
            assert len(set(supports)) == shots
            assert all(coco.instances[s].category_id == coco.instances[q].category_id for s in supports)
            assert all(coco.instances[s].image_id != coco.instances[q].image_id for s in supports)
    members = coco.instances_of(coco.category_ids[0])
    expected = sum(coco.instances[s].image_id != coco.instances[q].image_id for s in members for q in members)
    assert len(real_photos.episodes_of(coco, 1, [coco.categories[coco.category_ids[0]].name])) == expected


def test_copying_a_pose_onto_its_own_instance_is_exact():
    real_photos, coco = _real_photos_and_fixture()
    i = coco.instances_of(coco.category_ids[0])[0]
    inst = coco.instances[i]
    copied = real_photos.copy_pose(coco, i, i, query_box=True)
    assert abs(copied[inst.visible] - inst.keypoints[inst.visible]).max() < 1e-6
    scores = real_photos.score(coco, [(i, i)], [copied])
    assert scores.shape == (5, 1) and (scores == 1).all()


def test_prior_quality_sweep_scores_clusters_against_the_truth(tmp_path):
    """benchmarks/prior_quality.py --sweep: 3 categories of the same 4 parts,
    each part's vectors near one axis. Any threshold between the parts'
    similarity (~0) and their members' (~1) recovers the parts exactly (ARI 1,
    purity 1); a threshold above every similarity leaves each keypoint alone."""
    import torch

    gen = torch.Generator().manual_seed(0)
    parts, cats = 4, 3
    vectors = torch.eye(parts).repeat(cats, 1) + 0.01 * torch.randn(parts * cats, parts, generator=gen)
    keys = torch.tensor([[c + 1, k] for c in range(cats) for k in range(parts)])
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"keys": keys, "vectors": vectors, "assignment": torch.arange(parts * cats),
                "config": {"cluster": {"source": "features", "threshold": 0.8, "k": 2, "growth": "shared"}}},
               run / "cluster.pt")
    meta = {"categories": [{"id": c + 1, "family": 0, "keypoint_super_keypoint": list(range(parts)),
                            "keypoint_part_type": list(range(parts))} for c in range(cats)]}
    (tmp_path / "synthetic_parts.json").write_text(json.dumps(meta))
    out = tmp_path / "quality.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prior_quality.py"), "--run", str(run),
                           "--data", str(tmp_path), "--sweep", "0.5", "1.0", "--json", str(out)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["growth"], r["threshold"]): r for r in json.loads(out.read_text())["sweep"]}
    # no baseline.pt in the run: the features only
    assert set(rows) == {(g, t) for g in ("exclusive", "shared") for t in (0.5, 1.0)}
    for growth in ("exclusive", "shared"):
        assert rows[growth, 0.5]["clusters"] == parts and rows[growth, 0.5]["ari"] == 1.0
        assert rows[growth, 0.5]["cluster_purity"] == 1.0
        assert rows[growth, 1.0]["clusters"] == parts * cats


def test_cpu_isa_benchmark_checks_and_times_every_variant():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cpu_isa.py"), "--repeat", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from escape_fast import ops

    header = next(line for line in proc.stdout.splitlines() if line.startswith("| case"))
    assert all(f" {isa} " in header for isa in ops.cpu_isas())
    assert sum(line.startswith("| ") for line in proc.stdout.splitlines()) == 2 + 6  # header, rule, six cases


def test_predict_parity_names_what_changed(tmp_path):
    fixture = ROOT.parent / "shared" / "data" / "mp100_fixture"
    if not fixture.is_dir():
        pytest.skip(f"MP-100 fixture not found at {fixture}")
    import numpy as np

    script = [sys.executable, str(ROOT / "benchmarks" / "predict_parity.py"), "--categories", "1", "--queries", "1"]
    first = subprocess.run([*script, "--out", str(tmp_path / "a.npz")], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    arrays = dict(np.load(tmp_path / "a.npz"))
    changed = next(k for k in arrays if k.endswith("-keypoints"))
    arrays[changed] = arrays[changed] + 0.5  # as a regression would move one query's keypoints
    np.savez(tmp_path / "b.npz", **arrays)
    again = subprocess.run([*script, "--out", str(tmp_path / "c.npz"), "--compare", str(tmp_path / "b.npz")],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 1 and f"1 of {len(arrays)} differ" in again.stdout and changed in again.stdout


def test_predict_benchmark_times_boxed_and_unboxed_queries(tmp_path):
    fixture = ROOT.parent / "shared" / "data" / "mp100_fixture"
    if not fixture.is_dir():
        pytest.skip(f"MP-100 fixture not found at {fixture}")
    out = tmp_path / "predict.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_predict.py"), "--queries", "3",
                           "--repeat", "2", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["queries"] == 3 and "threads" in record["machine"]
    assert record["search"]["refits"] >= 0
    for kind in ("boxed", "unboxed", "unboxed, simplest search"):
        assert len(record["seconds"][kind]) == 2 and record["best"][kind] == min(record["seconds"][kind]) > 0
        assert f"3 {kind} queries" in proc.stdout


def test_track_benchmark_scores_every_method_against_the_truth(tmp_path):
    out = tmp_path / "track.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_track.py"), "--part", "val", "--videos",
                           "1", "--frames", "30", "--out", str(out)], env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["table"]) == {"copy support pose", "per frame, true box", "tracked", "tracked + smoothed",
                                    "smoothed - true box"}
    video = report["videos"][0]
    assert video["frames"] == 30 and video["supports"] == [0]
    for name, row in video["methods"].items():
        assert 0 <= row["pck"] <= 1, name
    assert "| tracked + smoothed |" in proc.stdout


def test_track_speed_benchmark_times_track_and_predict(tmp_path):
    out = tmp_path / "speed.json"
    video = ROOT.parent / "shared" / "data" / "videos" / "flies_two_1024px.mp4"
    if not video.is_file():
        pytest.skip(f"fly video not found at {video}")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_track_speed.py"), "--frames", "8",
                           "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["frames"] == 8 and report["speedup_vs_predict"] > 0
    assert set(report["rows"]) == {"track, end to end (process wall time)", "track, the tool's own frame loop",
                                   "labelled video (extra)", "predict on the frames as PNG files"}
    assert report["peak_rss_mib"]["all"] > 0 and "threads" in report["cpu"]


def test_score_calibration_splits_keypoints_by_their_scores(tmp_path):
    """benchmarks/score_calibration.py on two of the fixture's categories:
    at each threshold the keypoints above and below it partition them, and
    the overall PCK is the share-weighted mean of the two sides."""
    if not (FIXTURE / "annotations" / "fixture_all.json").is_file():
        pytest.skip(f"MP-100 photo fixture not found at {FIXTURE}")
    out = tmp_path / "calibration.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "score_calibration.py"), "--categories", "fly",
                           "zebra_dpk", "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["pairs"] == 4 and report["keypoints"] > 0
    for kind in ("relative", "absolute"):
        for row in report[kind]:
            share = row["share_above"]
            above = row["pck_above"] if row["pck_above"] is not None else 0.0
            below = row["pck_below"] if row["pck_below"] is not None else 0.0
            assert abs(share * above + (1 - share) * below - report["pck"]) < 1e-9
        shares = [r["share_above"] for r in report[kind]]
        assert shares == sorted(shares, reverse=True)
    assert "| relative score >= |" in proc.stdout
