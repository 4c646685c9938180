"""The ESCAPE authors' recipe, one difference at a time, on the built-in benchmark (issue 15).

    python benchmarks/recipe_ablation.py --out runs/ablation [--episodes 60000]

Trains the built-in model's configuration (escape_fast/assets/builtin.yaml)
with escape_fast's earlier recipe ("ours": the members' mean features,
rescaled, and exclusive cluster growth) and, beside it, each difference of
docs/authors.md and all of them together
(escape_fast/assets/recipes/authors.yaml). Every variant pins the settings
it is about, so the table does not move when the defaults do; a variant
reuses the stage checkpoints of "ours" that its difference does not touch
(stage 1 is the same in all of them). "t0.95", (a) + (d) at the cluster
threshold 0.95, is the built-in checkpoint's recipe (README.md,
"Training"). Every model is
evaluated on the same episodes at 1 and 5 shots, with the alpha chosen on
validation categories and with the authors' fixed 0.5, and the
novel-keypoint matching rates are read with benchmarks/prior_quality.py
--novel. Writes OUT/ablation.json and prints the table that
benchmarks/RESULTS.md holds.

Difference (b), stage 3 from the trunk's ImageNet start, changes nothing
here: the built-in model's trunk is frozen and has no adapter, so stage 3
has no feature weights to start anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUILTIN_YAML = os.path.join(ROOT, "escape_fast", "assets", "builtin.yaml")
RECIPE_YAML = os.path.join(ROOT, "escape_fast", "assets", "recipes", "authors.yaml")

# settings the variants are made of, pinned so the table does not move when the defaults do
OURS_PRIOR = ["prior_source=features", "prior_scale=support"]
A_PRIOR = ["prior_source=detectors", "prior_scale=raw"]
EXCLUSIVE = ["cluster.growth=exclusive", "cluster.threshold=0.8"]


def shared(threshold: str) -> list[str]:
    return ["cluster.growth=shared", f"cluster.threshold={threshold}"]


# name: (what it is, --config files after builtin.yaml, --set overrides, stages reused from "ours")
VARIANTS = {
    "ours": ("escape_fast's earlier recipe: mu = the members' mean features, rescaled; exclusive growth", [],
             OURS_PRIOR + EXCLUSIVE, ()),
    "a_prior": ("(a) mu = the stage-3 detectors, blended raw", [], A_PRIOR + EXCLUSIVE,
                ("baseline", "cluster", "finetune", "matching")),
    "c_matcher": ("(c) their matching network, padded to 68", [],
                  ["matching.variant=authors", "matching.pad_to=68"] + OURS_PRIOR + EXCLUSIVE,
                  ("baseline", "cluster", "finetune")),
    "d_growth": ("(a) + (d) shared cluster growth", [], A_PRIOR + shared("0.8"), ("baseline",)),
    "e_pooling": ("(a) + (e) pooling on the rounded cell", [], A_PRIOR + EXCLUSIVE + ["pooling=cell"], ("baseline",)),
    "authors": ("(a)-(e) together: the authors' recipe", [RECIPE_YAML], ["alpha=val", "cluster.threshold=0.8"],
                ("baseline",)),
}
# (a) + (d) at other cluster thresholds (RESULTS.md, "The cluster threshold"); 0.95 is builtin.yaml's
for _t in ("0.9", "0.95", "1.0"):
    VARIANTS[f"t{_t}"] = (f"(a) + (d), cluster threshold {_t}", [], A_PRIOR + shared(_t), ("baseline",))


ORDER = ("a_prior", "authors", "c_matcher", "e_pooling", "d_growth", "t0.9", "t0.95", "t1.0")


def run(cmd, log):
    print("+", " ".join(cmd), flush=True)
    with open(log, "a") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[2]} failed (exit {proc.returncode}); see {log}")


def train(name, out, data, python):
    _, configs, sets, reused = VARIANTS[name]
    run_dir = os.path.join(out, name)
    if os.path.exists(os.path.join(run_dir, "model.pt")):
        return run_dir
    os.makedirs(run_dir, exist_ok=True)
    for stage in reused:
        shutil.copy2(os.path.join(out, "ours", f"{stage}.pt"), os.path.join(run_dir, f"{stage}.pt"))
    base = [python, "-m", "escape_fast.train", "--data", data, "--split", "1", "--out", run_dir,
            "--config", BUILTIN_YAML]
    for c in configs:
        base += ["--config", c]
    for s in sets:
        base += ["--set", s]
    log = os.path.join(out, f"{name}.log")
    if "matching" in reused:  # only the assembly (mu, alpha) differs: the last stage, resumed at its end
        run(base + ["--stage", "matching"], log)
        return run_dir
    todo = [s for s in ("baseline", "cluster", "finetune", "matching") if s not in reused]
    for i, stage in enumerate(todo):
        run(base + ["--stage", stage] + (["--resume"] if i else []), log)
    return run_dir


def evaluate(run_dir, shots, alpha, episodes, python, out_json):
    if not os.path.exists(out_json):
        cmd = [python, "-m", "escape_fast.eval", "--checkpoint", run_dir, "--method", "all", "--shots", str(shots),
               "--episodes", str(episodes), "--quiet", "--out", out_json]
        if alpha is not None:
            cmd += ["--alpha", str(alpha)]
        run(cmd, out_json + ".log")
    with open(out_json) as f:
        report = json.load(f)
    pck = {m: 100 * r["pck"][f"{r['main_threshold']:.2f}"] for m, r in report["results"].items()}
    diffs = {k: (100 * v[0], 100 * v[1]) for k, v in report["differences"].items()}
    return {"alpha": report["alpha"], "pck": pck, "differences": diffs}


def matching_rates(run_dir, data, python, out_json):
    if not os.path.exists(out_json):
        run([python, os.path.join(HERE, "prior_quality.py"), "--run", run_dir, "--data", data, "--novel",
             "--json", out_json], out_json + ".log")
    with open(out_json) as f:
        return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the runs, reports and ablation.json")
    p.add_argument("--data", default=os.path.expanduser("~/.cache/escape_fast/synthetic-v4-small-seed0"),
                   help="the built-in benchmark (generated by python -m escape_fast.eval on first use)")
    p.add_argument("--episodes", type=int, default=60000)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    python = sys.executable
    table = {}
    # "ours" first (the others reuse its stages), then the cheapest and the whole recipe
    names = ["ours", *[v for v in ORDER if v in args.variants and v != "ours"]]
    for name in names:
        run_dir = train(name, args.out, args.data, python)
        row = {"what": VARIANTS[name][0]}
        for shots in (1, 5):
            row[f"{shots}shot_val"] = evaluate(run_dir, shots, None, args.episodes, python,
                                               os.path.join(args.out, f"{name}_{shots}shot_val.json"))
            row[f"{shots}shot_0.5"] = evaluate(run_dir, shots, 0.5, args.episodes, python,
                                               os.path.join(args.out, f"{name}_{shots}shot_a05.json"))
        row["matching"] = matching_rates(run_dir, args.data, python, os.path.join(args.out, f"{name}_prior.json"))
        table[name] = row
        with open(os.path.join(args.out, "ablation.json"), "w") as f:
            json.dump(table, f, indent=1)
    print_table(table)
    return 0


def _diff(cell, key):
    d = cell["differences"].get(key)
    return "n/a" if d is None else f"{d[0]:+.2f} ± {d[1]:.2f}"


def print_table(table):
    print("| recipe | shots | alpha | MLE | MAP | ESCAPE | MAP - MLE | ESCAPE - MLE |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row in table.items():
        for shots in (1, 5):
            for tag in ("val", "0.5"):
                cell = row[f"{shots}shot_{tag}"]
                pck = cell["pck"]
                print(f"| {name} | {shots} | {cell['alpha']:.1f} | {pck['mle']:.2f} | {pck['map']:.2f} | "
                      f"{pck['escape']:.2f} | {_diff(cell, 'map-mle')} | {_diff(cell, 'escape-mle')} |")


if __name__ == "__main__":
    sys.exit(main())
