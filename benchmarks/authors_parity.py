"""escape_fast against the ESCAPE authors' running code, keypoint by keypoint (issue 15).

    python benchmarks/authors_parity.py --theirs THEIR_PREDICTIONS.json --checkpoint escape_split1.pth \\
        --method escape --ann ANN.json [--images DIR] [--out parity.json]

THEIR_PREDICTIONS.json is what their test code predicted for a list of
episodes with the same checkpoint, images and boxes: a JSON object whose
"episodes" are {"supports": [annotation ids], "query": annotation id,
"keypoints": [[x, y], ...] in original image pixels, "maxvals": [score, ...]}. (The harness that
produced it runs github khoiucd/escape-tgt with mmcv 1.6 and mmpose 0.29;
it is kept outside this repository, and docs/authors.md says how the
figures below were made.) This script predicts the same episodes with
escape_fast (EscapeModel.load on the same file, the fast evaluation path,
float32) and reports how many keypoints land within 0.5 px of theirs, over
the keypoints their query marks visible and over all. Episodes where their
code gave NaN are counted apart and left out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--theirs", required=True, help="their predictions (see above)")
    p.add_argument("--checkpoint", required=True, help="the same weights they ran")
    p.add_argument("--method", required=True, choices=("mle", "map", "escape"))
    p.add_argument("--ann", required=True, help="the COCO annotation file of the episodes")
    p.add_argument("--images", help="image folder (default: images/ beside annotations/)")
    p.add_argument("--tolerance", type=float, default=0.5, help="pixels (default 0.5)")
    p.add_argument("--out", help="write the comparison as JSON here")
    args = p.parse_args(argv)

    from escape_fast.data import Episode, load_coco
    from escape_fast.eval.engine import predict_episodes
    from escape_fast.models.escape import EscapeModel

    with open(args.theirs) as f:
        theirs = json.load(f)["episodes"]
    coco = load_coco(args.ann, args.images)
    row_of = {inst.ann_id: n for n, inst in enumerate(coco.instances)}
    model = EscapeModel.load(args.checkpoint).eval()
    episodes = []
    for n, e in enumerate(theirs):
        missing = [a for a in (*e["supports"], e["query"]) if a not in row_of]
        if missing:
            raise SystemExit(f"{args.theirs}: episode {n}: annotation(s) {missing} not in {args.ann}")
        episodes.append(Episode(coco.instances[row_of[e["query"]]].category_id, n,
                                tuple(row_of[a] for a in e["supports"]), (row_of[e["query"]],)))
    with torch.no_grad():
        ours = predict_episodes(model, coco, episodes, args.method, "cpu", amp=False)
    dist_vis, dist_all, per_episode, not_finite = [], [], [], []
    for n, (e, mine) in enumerate(zip(theirs, ours)):
        k = len(e["keypoints"])
        points = torch.tensor([[math.nan if v is None else v for v in p] for p in e["keypoints"]],
                              dtype=torch.float64)
        peaks = torch.tensor([math.nan if v is None else v for v in e.get("maxvals", [0.0])], dtype=torch.float64)
        # their code gave NaN heatmaps (scores written as null or NaN): nothing to compare
        if not (torch.isfinite(points).all() and torch.isfinite(peaks).all()):
            not_finite.append(n)
            continue
        d = (mine[0, :k].double() - points).norm(dim=-1)
        query = coco.instances[row_of[e["query"]]]
        vis = torch.from_numpy(query.visible[:k].copy())
        dist_all.append(d)
        dist_vis.append(d[vis])
        per_episode.append({"supports": e["supports"], "query": e["query"], "max_px": float(d.max()),
                            "ours": mine[0, :k].tolist()})
    d_all, d_vis = torch.cat(dist_all), torch.cat(dist_vis)
    tol = args.tolerance
    summary = {
        "checkpoint": os.path.abspath(args.checkpoint), "method": args.method, "episodes": len(theirs),
        "episodes_compared": len(theirs) - len(not_finite), "episodes_theirs_not_finite": not_finite,
        "keypoints": int(d_all.numel()), "visible_keypoints": int(d_vis.numel()), "tolerance_px": tol,
        "within_tolerance_visible": float((d_vis <= tol).double().mean()),
        "within_tolerance_all": float((d_all <= tol).double().mean()),
        "median_px": float(d_all.median()), "max_px": float(d_all.max()),
        "distinct_points_theirs": len({tuple(p) for e in theirs for p in e["keypoints"]}),
    }
    for key, value in summary.items():
        print(f"{key:>26}: {value}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "episodes": per_episode}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
