"""Do the keypoint scores tell a hit from a miss? One command.

    python benchmarks/score_calibration.py [--data DIR --ann FILE] [--model imagenet:efficientnet_lite0] [--out F]

On the MP-100-format photo fixture, every ordered (support, query) pair of
one category is a 1-shot episode (as in benchmarks/real_photos.py), the
query's box given. Each predicted keypoint visible in both gets its score
(the cosine similarity at the prediction), its relative score (the score
over the one the support itself gets when decoded in its own box,
Predictor.reference_scores: what the video outputs' "confident" and
likelihood use) and whether it is a hit (within 0.2 x the query box's
longer side). For each threshold: the share of keypoints at or above it,
PCK among those and among the rest. A markdown table on stdout and, with
--out, JSON. The fixture is small and mostly human bodies, so the table
reports; it is not a place to choose a threshold by: benchmarks/animals has
a validation part for that (--data benchmarks/animals/data --ann animals_val.json).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from real_photos import DEFAULT_ANN, DEFAULT_FIXTURE, keypoint_set, pairs_of

from escape_fast.data import load_coco
from escape_fast.files import write_json
from escape_fast.predict import Predictor

RELATIVE = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
ABSOLUTE = (0.2, 0.3, 0.4, 0.5, 0.6)


def keypoint_outcomes(predictor: Predictor, coco, pairs) -> dict[str, np.ndarray]:
    """Per keypoint visible in support and query: score, relative score, hit, category."""
    by_support = defaultdict(list)
    for s, q in pairs:
        by_support[s].append(q)
    cols = defaultdict(list)
    for s, queries in by_support.items():
        predictor.adapt(coco.instances[s].image.path, keypoint_set(coco, s))
        reference = predictor.reference_scores()
        insts = [coco.instances[q] for q in queries]
        results = predictor.predict([qi.image.path for qi in insts], [qi.bbox.tolist() for qi in insts])
        for qi, r in zip(insts, results):
            if not r.ok:
                raise RuntimeError(r.error)
            use = coco.instances[s].visible & qi.visible & np.isfinite(r.scores)
            dist = np.linalg.norm(r.keypoints[use] - qi.keypoints[use], axis=1)
            cols["score"].append(r.scores[use])
            cols["relative"].append(r.scores[use] / reference[use])
            cols["hit"].append(dist <= 0.2 * qi.bbox_size)
            cols["category"].append(np.full(int(use.sum()), qi.category_id))
    return {k: np.concatenate(v) for k, v in cols.items()}


def threshold_rows(values: np.ndarray, hit: np.ndarray, thresholds) -> list[dict]:
    """Per threshold: share of keypoints at or above it, PCK above and below,
    and Youden's J (hits kept above minus misses kept above, as shares of
    each: how well the threshold separates them; 0 for a useless one)."""
    rows = []
    for t in thresholds:
        above = values >= t
        j = (float(above[hit].mean()) if hit.any() else 0.0) - (float(above[~hit].mean()) if (~hit).any() else 0.0)
        rows.append({"threshold": t, "share_above": float(above.mean()),
                     "pck_above": float(hit[above].mean()) if above.any() else None,
                     "pck_below": float(hit[~above].mean()) if (~above).any() else None, "youden_j": j})
    return rows


def run(fixture: Path, model: str, categories=None, device: str = "cpu", ann: str = DEFAULT_ANN,
        max_per_category=None) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # annotations the loader skips are counted in its own warning
        coco = load_coco(fixture / "annotations" / ann)
        pairs = pairs_of(coco, categories, max_per_category)
        out = keypoint_outcomes(Predictor(model, device=device), coco, pairs)
    return {"fixture": str(fixture), "annotations": ann, "model": model, "pairs": len(pairs), "keypoints": int(out["hit"].size),
            "pck": float(out["hit"].mean()),
            "relative": threshold_rows(out["relative"], out["hit"], RELATIVE),
            "absolute": threshold_rows(out["score"], out["hit"], ABSOLUTE)}


def table(rows: list[dict], what: str) -> str:
    def pct(v):
        return "" if v is None else f"{100 * v:.1f}"

    lines = [f"| {what} >= | share of keypoints | PCK@0.2 above | PCK@0.2 below | Youden's J |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['threshold']:.1f} | {pct(r['share_above'])} | {pct(r['pck_above'])} | {pct(r['pck_below'])} | "
              f"{r['youden_j']:.2f} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", "--fixture", dest="fixture", type=Path, default=DEFAULT_FIXTURE,
                   help="MP-100-format data set of photographs (default: the photo fixture)")
    p.add_argument("--ann", default=DEFAULT_ANN, help=f"annotation file under DATA/annotations (default {DEFAULT_ANN})")
    p.add_argument("--max-pairs-per-category", type=int, help="at most this many pairs per category")
    p.add_argument("--model", default="imagenet:efficientnet_lite0", help="as predict's --checkpoint")
    p.add_argument("--categories", nargs="+", help="only these categories")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="write the report as JSON")
    args = p.parse_args(argv)
    if not (args.fixture / "annotations" / args.ann).is_file():
        print(f"error: no annotation file {args.fixture / 'annotations' / args.ann}", file=sys.stderr)
        return 2
    report = run(args.fixture, args.model, args.categories, args.device, args.ann, args.max_pairs_per_category)
    print(f"{args.model}, 1 shot, box given: {report['pairs']} pairs, {report['keypoints']} keypoints, "
          f"PCK@0.2 {100 * report['pck']:.1f}\n")
    print(table(report["relative"], "relative score") + "\n")
    print(table(report["absolute"], "score"))
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
