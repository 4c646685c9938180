"""How well models predict keypoints on real photographs: one command.

    python benchmarks/real_photos.py [--fixture DIR] [--models builtin imagenet:efficientnet_lite0 RUN_DIR ...]

On the MP-100-format photo fixture (../shared/data/mp100_fixture: 21
categories of real photographs), every ordered (support, query) pair of two
instances of one category is a 1-shot episode. Each model adapts to the
support (its annotated keypoints and box) through escape_fast.Predictor,
the path users take, and predicts the query twice: with the query's box
given, and without it (the whole photograph). The trivial baseline copies
the support's keypoints, relative to its box, into the query's box (or the
whole photograph): a model must beat it to be looking at the image.

Reported: PCK@0.2 (keypoints visible in both, within 0.2 x the longer side
of the query's box; without a box, against the best-matching instance of
the category in the photograph, since several may be shown) and mPCK (PCK at 0.05 ... 0.25 averaged), as the mean
over pairs and the mean over categories (the fixture has 132 pairs of
human bodies and 2 of most other categories), per category and overall;
a markdown table on stdout and, with --out, JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from escape_fast.data import load_coco
from escape_fast.data.transforms import Crop
from escape_fast.eval.metrics import THRESHOLDS, pck_curve
from escape_fast.files import write_json
from escape_fast.predict import KeypointSet, Predictor

DEFAULT_FIXTURE = Path(os.environ.get("ESCAPE_FAST_FIXTURE", ROOT.parent / "shared" / "data" / "mp100_fixture"))
COPY = "copy support pose"
SIZE = (256, 256)  # any grid: the copy works in the crops' normalized coordinates


def pairs_of(coco, categories=None, max_per_category=None) -> list[tuple[int, int]]:
    """Ordered (support, query) instance pairs within each category."""
    out = []
    for c in coco.category_ids:
        if categories and coco.categories[c].name not in categories:
            continue
        members = coco.instances_of(c)
        pairs = [(s, q) for s in members for q in members if s != q]
        out += pairs[:max_per_category] if max_per_category else pairs
    return out


def keypoint_set(coco, index: int) -> KeypointSet:
    inst = coco.instances[index]
    cat = coco.categories[inst.category_id]
    return KeypointSet(cat.keypoints, inst.keypoints.copy(), inst.visible.copy(), cat.limbs(), inst.bbox.copy(),
                       f"{coco.path}#{inst.ann_id}")


def copy_pose(coco, support: int, query: int, query_box: bool) -> np.ndarray:
    """The support's keypoints, relative to its box, placed in the query's box (or whole image)."""
    s, q = coco.instances[support], coco.instances[query]
    grid = Crop.of_box(s.bbox, SIZE).to_grid(s.keypoints, SIZE)
    box = q.bbox if query_box else np.array([0.0, 0.0, q.image.width, q.image.height])
    return Crop.of_box(box, SIZE).to_image(grid, SIZE)


def score(coco, pairs, predictions, any_instance: bool = False) -> np.ndarray:
    """PCK at every threshold [T, P] of each pair's prediction [K, 2].

    ``any_instance`` (queries without a box): a photograph may show several
    objects of the category (most of the human_body photos do), and without
    a box nothing says which one is meant, so the prediction is scored
    against each annotated instance of the category in that photograph and
    the best counts (the matching that multi-instance benchmarks use)."""
    by_image = defaultdict(list)
    for i, inst in enumerate(coco.instances):
        by_image[(inst.image_id, inst.category_id)].append(i)
    rows = []
    for (s, q), xy in zip(pairs, predictions):
        pred = torch.from_numpy(np.nan_to_num(np.asarray(xy, dtype=np.float64), nan=-1e9))[None]
        sv = coco.instances[s].visible
        targets = by_image[(coco.instances[q].image_id, coco.instances[q].category_id)] if any_instance else [q]
        best = None
        for t in targets:
            qi = coco.instances[t]
            curve = pck_curve(pred, torch.from_numpy(qi.keypoints)[None], torch.from_numpy(sv & qi.visible)[None],
                              torch.tensor([qi.bbox_size]))
            if best is None or float(curve.mean()) > float(best.mean()):
                best = curve
        rows.append(best)
    return torch.cat(rows, 1).numpy() if rows else np.zeros((len(THRESHOLDS), 0))


def predict_pairs(predictor: Predictor, coco, pairs, query_box: bool) -> list[np.ndarray]:
    """The model's prediction of each pair's query: one adaptation per support."""
    by_support = defaultdict(list)
    for n, (s, q) in enumerate(pairs):
        by_support[s].append((n, q))
    out = [None] * len(pairs)
    for s, items in by_support.items():
        inst = coco.instances[s]
        predictor.adapt(inst.image.path, keypoint_set(coco, s))
        queries = [coco.instances[q] for _, q in items]
        boxes = [qi.bbox.tolist() for qi in queries] if query_box else None
        for (n, _), result in zip(items, predictor.predict([qi.image.path for qi in queries], boxes)):
            if not result.ok:
                raise RuntimeError(result.error)
            out[n] = result.keypoints
    return out


def summarize(coco, pairs, scores: np.ndarray) -> dict:
    main = THRESHOLDS.index(0.2)
    per_cat = defaultdict(list)
    for (s, _), n in zip(pairs, range(len(pairs))):
        per_cat[coco.categories[coco.instances[s].category_id].name].append(n)
    cats = {name: {"pck": float(scores[main, idx].mean()), "mpck": float(scores[:, idx].mean()), "pairs": len(idx)}
            for name, idx in sorted(per_cat.items())}
    return {"pck": float(scores[main].mean()), "mpck": float(scores.mean()),
            "pck_categories": float(np.mean([c["pck"] for c in cats.values()])),
            "mpck_categories": float(np.mean([c["mpck"] for c in cats.values()])),
            "pairs": len(pairs), "per_category": cats}


def run(fixture: Path, models, categories=None, max_per_category=None, device="cpu", log=print) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # annotations the loader skips are counted in its own warning
        coco = load_coco(fixture / "annotations" / "fixture_all.json")
    pairs = pairs_of(coco, categories, max_per_category)
    results = {}
    for query_box in (True, False):
        key = "box" if query_box else "no box"
        copies = [copy_pose(coco, s, q, query_box) for s, q in pairs]
        results[key] = {COPY: summarize(coco, pairs, score(coco, pairs, copies, not query_box))}
    for spec in models:
        predictor = Predictor(spec, device=device)
        for method in predictor.model.methods:
            predictor.method = method
            for query_box in (True, False):
                t0 = time.perf_counter()
                preds = predict_pairs(predictor, coco, pairs, query_box)
                summary = summarize(coco, pairs, score(coco, pairs, preds, not query_box))
                summary["seconds"] = time.perf_counter() - t0
                results["box" if query_box else "no box"][f"{spec} {method.upper()}"] = summary
                log(f"{spec} {method} {'box' if query_box else 'no box'}: PCK@0.2 {100 * summary['pck']:.1f} "
                    f"(categories {100 * summary['pck_categories']:.1f}) in {summary['seconds']:.1f}s")
    return {"fixture": str(fixture), "pairs": len(pairs), "results": results}


def table(report: dict) -> str:
    lines = ["| model | box: PCK@0.2 pairs | box: categories | box: mPCK | no box: PCK@0.2 pairs | no box: "
             "categories | no box: mPCK |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in report["results"]["box"]:
        b, n = report["results"]["box"][name], report["results"]["no box"][name]
        lines.append(f"| {name} | {100 * b['pck']:.1f} | {100 * b['pck_categories']:.1f} | {100 * b['mpck']:.1f} | "
                     f"{100 * n['pck']:.1f} | {100 * n['pck_categories']:.1f} | {100 * n['mpck']:.1f} |")
    return "\n".join(lines)


def category_table(report: dict, key: str = "box") -> str:
    models = list(report["results"][key])
    cats = list(report["results"][key][models[0]]["per_category"])
    lines = ["| category | pairs | " + " | ".join(models) + " |", "| --- | --- |" + " --- |" * len(models)]
    for c in cats:
        first = report["results"][key][models[0]]["per_category"][c]
        lines.append(f"| {c} | {first['pairs']} | " + " | ".join(
            f"{100 * report['results'][key][m]['per_category'][c]['pck']:.1f}" for m in models) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixture", type=Path, default=DEFAULT_FIXTURE, help="MP-100-format photo fixture")
    p.add_argument("--models", nargs="+", default=["imagenet:efficientnet_lite0", "builtin"],
                   help="checkpoints: builtin, imagenet:NAME (training-free), run folders or model files")
    p.add_argument("--categories", nargs="+", help="only these categories")
    p.add_argument("--max-pairs-per-category", type=int, help="at most this many pairs per category (quick runs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="write the report as JSON")
    p.add_argument("--per-category", action="store_true", help="also print the per-category table (box given)")
    args = p.parse_args(argv)
    if not (args.fixture / "annotations" / "fixture_all.json").is_file():
        print(f"error: no photo fixture at {args.fixture} (annotations/fixture_all.json)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    report = run(args.fixture, args.models, args.categories, args.max_pairs_per_category, args.device,
                 log=lambda m: print(m, file=sys.stderr, flush=True))
    print(table(report))
    if args.per_category:
        print()
        print(category_table(report))
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
