"""End-to-end evaluation benchmark (issue 6): the built-in benchmark, 60,000 pairs.

    python benchmarks/bench_eval.py [--episodes 60000] [--reference-draws 2] [--out bench_eval.json]

1. generates the built-in synthetic benchmark into a fresh cache folder (timed);
2. runs ``python -m escape_fast.eval --episodes N`` in-process with the
   built-in checkpoint (timed end to end, setup included);
3. runs the --reference path on a subset of the same episodes (the first
   ``--reference-draws`` draws of every category), scales its time by pairs,
   and reports the speed-up; the subset's predictions are compared with the
   fast path's.
Medians over ``--repeat`` runs of step 2. Writes a JSON record with the
machine, versions and command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
from machine import cpu_name

import escape_fast
from escape_fast import builtin
from escape_fast.data import EpisodeSampler, draws_for_episodes, load_coco, mp100_split_files
from escape_fast.eval.engine import evaluate, evaluate_reference
from escape_fast.models.escape import EscapeModel


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=60000)
    p.add_argument("--method", default="escape")
    p.add_argument("--reference-draws", type=int, default=2, help="draws per category for the reference run")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default="bench_eval.json")
    args = p.parse_args(argv)

    cache = tempfile.mkdtemp(prefix="escape_fast_bench_")
    os.environ["ESCAPE_FAST_CACHE"] = cache
    t0 = time.perf_counter()
    root = builtin.dataset_root(progress=False)
    t_data = time.perf_counter() - t0

    from escape_fast.eval import __main__ as eval_cli

    totals = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        eval_cli.main(["--episodes", str(args.episodes), "--method", args.method, "--quiet",
                       "--out", os.path.join(cache, "report.json")])
        totals.append(time.perf_counter() - t0)
    with open(os.path.join(cache, "report.json")) as f:
        report = json.load(f)

    # reference on a subset of the same episodes, and the fast path on that subset
    coco = load_coco(mp100_split_files(root, 1)["test"])
    model = EscapeModel.load(builtin.checkpoint_path())
    draws = draws_for_episodes(args.episodes, len(coco.category_ids))
    full = EpisodeSampler(coco, shots=1, queries=15, draws=draws, seed=0)
    subset = EpisodeSampler(coco, shots=1, queries=15, draws=args.reference_draws, seed=0)
    assert all(a == b for a, b in zip(subset.episodes, [e for e in full.episodes if e.draw < args.reference_draws]))
    t0 = time.perf_counter()
    ref = evaluate_reference(model, coco, subset.episodes, args.method, "cpu")
    t_ref = time.perf_counter() - t0
    fast_subset = evaluate(model, coco, subset, (args.method,), "cpu")[args.method]
    k = ref.predictions.shape[1]
    flips = int(((fast_subset.predictions[:, :k] - ref.predictions).abs().amax(-1) > 1e-3).sum())
    ref_scaled = t_ref * full.num_pairs / subset.num_pairs
    t_eval = statistics.median(totals)
    record = {
        "command": " ".join([sys.executable, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "escape_fast": escape_fast.__version__,
        "threads": torch.get_num_threads(),
        "episodes": full.num_pairs,
        "data_generation_s": t_data,
        "eval_s_median": t_eval, "eval_s_all": totals,
        "end_to_end_s": t_data + t_eval,
        "phases_s": report["timing"][args.method]["seconds"],
        "pck_0.2": report["results"][args.method]["pck"]["0.20"],
        "reference_pairs": subset.num_pairs, "reference_s": t_ref,
        "reference_s_scaled_to_all": ref_scaled,
        "speedup_vs_reference": ref_scaled / t_eval,
        "reference_subset_pck": ref.summary.pck_main, "fast_subset_pck": fast_subset.summary.pck_main,
        "prediction_mismatches": flips, "predictions": int(ref.predictions.shape[0] * k),
    }
    print(json.dumps(record, indent=1))
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
