"""The benchmark scripts run (at smoke sizes), so the GPU session that runs
them at full size does not find them broken."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    assert set(record["phases_s_last_run"]) == {"data", "features", "adaptation", "heatmaps", "metric"}
    assert 0.0 <= record["pck_0.2_untrained"] <= 1.0


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
