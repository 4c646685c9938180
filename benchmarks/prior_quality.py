"""How much the learned super-keypoints know about parts (issue 6, point 7).

    python benchmarks/prior_quality.py --run RUN_DIR --data SYNTHETIC_DIR

The built-in synthetic benchmark knows the truth: ``synthetic_parts.json``
gives the ground-truth super-keypoint (family part + side) of every keypoint.
This script reads the stage-2 output of a training run (``cluster.pt``: the
vector of every base keypoint, eq. 4, and its cluster) and reports

* nearest-neighbour purity: for each base keypoint, its most similar (cosine)
  keypoint of *another* category; how often it is the same ground-truth
  super-keypoint, the same part type (either side) and the same family;
* the adjusted Rand index (ARI) of the clusters against the truth, with the
  number of clusters and how many keypoints are left alone;
* cluster purity: the share of each cluster's members that carry its most
  common ground-truth label (weighted by size).

A prior can only help MAP and ESCAPE when these are high: if a keypoint's
neighbours in feature space are other parts, the super-keypoint it is
matched to says nothing about where that part is.

With ``--novel`` it also measures the matching of novel keypoints (the test
categories of split 1, one support instance at a time): how often MAP's
Hungarian assignment and ESCAPE's matching network (row argmax) pick a
super-keypoint whose members are mostly the keypoint's own ground-truth
part. That is the E-step's accuracy; a wrong match pulls the prototype
toward another part.

With ``--sweep T [T ...]`` it clusters again at each threshold, with both
growth rules, from both sources a run has (the base keypoints' mean
features in ``cluster.pt``; the stage-1 prototypes in ``baseline.pt``), and
prints the number of clusters, the ARI and the cluster purity of each: the
threshold that suits one trunk's features does not suit another's
(benchmarks/RESULTS.md, "The cluster threshold").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

import numpy as np
import torch


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """ARI of two labelings (Hubert and Arabie 1985), from the contingency table."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)

    def pairs(x):
        return (x * (x - 1) // 2).sum()

    n = len(a)
    index = pairs(table)
    rows, cols = pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / (n * (n - 1) / 2)
    top = (rows + cols) / 2
    return float((index - expected) / (top - expected)) if top != expected else 1.0


def read_parts(data: str) -> dict:
    """{category id: its entry of synthetic_parts.json}."""
    with open(os.path.join(data, "synthetic_parts.json")) as f:
        return {c["id"]: c for c in json.load(f)["categories"]}


def truth(meta: dict, keys: np.ndarray) -> dict[str, np.ndarray]:
    out = {"super": [], "type": [], "family": []}
    for cat, k in keys:
        c = meta[int(cat)]
        out["super"].append(c["keypoint_super_keypoint"][k])
        out["type"].append(c["keypoint_part_type"][k])
        out["family"].append(c["family"])
    return {name: np.asarray(v) for name, v in out.items()}


def report(vectors: torch.Tensor, keys: np.ndarray, assignment: np.ndarray, gt: dict) -> dict:
    x = torch.nn.functional.normalize(vectors.double(), dim=1)
    sim = x @ x.T
    cats = torch.as_tensor(keys[:, 0])
    sim[cats[:, None] == cats[None, :]] = -np.inf  # neighbours from other categories only
    nn_idx = sim.argmax(1).numpy()
    out = {f"nn_same_{name}": float((v[nn_idx] == v).mean()) for name, v in gt.items()}
    clustered = assignment >= 0
    out["clusters"] = len(np.unique(assignment[clustered]))
    out["base_keypoints"] = len(assignment)
    out["ari"] = adjusted_rand_index(assignment[clustered], gt["super"][clustered])
    out["ari_part_type"] = adjusted_rand_index(assignment[clustered], gt["type"][clustered])
    majority = 0
    for c in np.unique(assignment[clustered]):
        members = gt["super"][assignment == c]
        majority += Counter(members.tolist()).most_common(1)[0][1]
    out["cluster_purity"] = majority / max(1, int(clustered.sum()))
    return out


def sweep(run: str, clusters: dict, gt: dict, thresholds: list[float]) -> list[dict]:
    """Clusters again at each threshold (see the module's note); one row per setting.
    ``clusters``: the run's cluster.pt."""
    from escape_fast.neighbors import cluster_keypoints

    keys, k = clusters["keys"].numpy(), int(clusters["config"]["cluster"]["k"])
    sources = {"features": clusters["vectors"].float()}
    if os.path.exists(os.path.join(run, "baseline.pt")):
        base = torch.load(os.path.join(run, "baseline.pt"), map_location="cpu", weights_only=True)
        sources["prototypes"] = base["model"]["prototypes"].float()
    cats = torch.as_tensor(keys[:, 0])
    rows = []
    for source, vectors in sources.items():
        for growth in ("exclusive", "shared"):
            for t in thresholds:
                _, assignment = cluster_keypoints(vectors, cats, threshold=t, k=k, growth=growth)
                r = report(vectors, keys, assignment.numpy(), gt)
                rows.append({"source": source, "growth": growth, "threshold": t} |
                            {name: r[name] for name in ("clusters", "ari", "cluster_purity")})
                print(f"{source:>10} {growth:>9} {t:5.2f}: {r['clusters']:4d} clusters, ARI {r['ari']:.3f}, "
                      f"purity {r['cluster_purity']:.3f}", flush=True)
    return rows


@torch.no_grad()
def novel_matching(run: str, data: str, parts: dict, clusters: dict, max_instances: int = 10) -> dict:
    """Share of visible novel keypoints matched to a super-keypoint of their own part (see above)."""
    from escape_fast.data import load_coco, mp100_split_files
    from escape_fast.eval.engine import build_bank
    from escape_fast.models.escape import EscapeModel

    model = EscapeModel.load(os.path.join(run, "model.pt")).eval()
    keys, assignment = clusters["keys"].tolist(), clusters["assignment"]
    majority = {}
    for z in range(int(assignment.max()) + 1):
        members = [parts[c]["keypoint_super_keypoint"][k] for c, k in
                   (keys[i] for i in torch.nonzero(assignment == z).flatten().tolist())]
        if members:
            majority[z] = Counter(members).most_common(1)[0][0]
    coco = load_coco(str(mp100_split_files(data, 1, need=("test",))["test"]))
    instances = [i for c in coco.category_ids for i in coco.instances_of(c)[:max_instances]]
    bank = build_bank(model, coco, instances, torch.device("cpu"))
    hits = {"map": 0, "escape": 0}
    total = 0
    for inst, row in bank.rows.items():
        truth_k = parts[coco.instances[inst].category_id]["keypoint_super_keypoint"]
        vis = bank.visible[row, : len(truth_k)]
        one = slice(row, row + 1)  # this instance as a 1-shot support set
        support = bank.support[one, None]
        picks = {m: model.assignments(m, support.pooled, support.visible, support.match_scores)[0][0]
                 for m in model.methods if m != "mle"}
        for k in torch.nonzero(vis).flatten().tolist():
            total += 1
            for name, pick in picks.items():
                hits[name] += majority.get(int(pick[k]), -1) == truth_k[k]
    out = {f"novel_match_{name}": hits[name] / max(1, total) for name in hits}
    return out | {"novel_keypoints": total}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="training run folder with cluster.pt")
    parser.add_argument("--data", required=True, help="synthetic benchmark folder with synthetic_parts.json")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--novel", action="store_true",
                        help="also measure MAP's and ESCAPE's matching of the test keypoints (split 1)")
    parser.add_argument("--sweep", type=float, nargs="+", metavar="T", default=None,
                        help="also cluster again at these thresholds (both growth rules, both sources)")
    args = parser.parse_args(argv)
    obj = torch.load(os.path.join(args.run, "cluster.pt"), map_location="cpu", weights_only=True)
    keys = obj["keys"].numpy()
    parts = read_parts(args.data)
    gt = truth(parts, keys)
    res = report(obj["vectors"], keys, obj["assignment"].numpy(), gt)
    res["cluster_config"] = obj["config"]["cluster"]
    if args.novel:
        res.update(novel_matching(args.run, args.data, parts, obj))
    if args.sweep:
        res["sweep"] = sweep(args.run, obj, gt, args.sweep)
    for k, v in res.items():
        if k == "sweep":
            continue
        print(f"{k:>16}: {v:.3f}" if isinstance(v, float) else f"{k:>16}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
