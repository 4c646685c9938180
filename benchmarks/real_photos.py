"""How well models predict keypoints on real photographs: one command.

    python benchmarks/real_photos.py [--data DIR --ann FILE] [--shots 1 5] [--models builtin imagenet:NAME RUN_DIR ...]

On an MP-100-format data set of real photographs (default: the photo
fixture ../shared/data/mp100_fixture, 21 categories; benchmarks/animals has
lab animals with a validation and a test part), each query is predicted
from ``--shots`` supports of its category taken from other photographs
(1-shot: every ordered (support, query) pair; k-shot: for each query, k
supports drawn with a fixed seed). Each model adapts to the supports (their
annotated keypoints and boxes) through escape_fast.Predictor, the path
users take, and predicts the query twice: with the query's box given, and
without it (the whole photograph, the Predictor's object search). The
trivial baseline copies the supports' mean keypoints, relative to their
boxes, into the query's box (or the whole photograph): a model must beat it
to be looking at the image.

Reported: PCK@0.2 (keypoints visible in the query and some support, within
0.2 x the longer side of the query's box; without a box, against the
best-matching instance of the category in the photograph, since several may
be shown) and mPCK (PCK at 0.05 ... 0.25 averaged), as the mean over
episodes and the mean over categories, with each model's difference from
the copy baseline on the same episodes (95% interval over support sets,
paired); a markdown table on stdout and, with --out, JSON.
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
from escape_fast.eval.metrics import THRESHOLDS, paired_difference, pck_curve
from escape_fast.files import write_json
from escape_fast.predict import KeypointSet, Predictor
from escape_fast.predict.predictor import SEARCH_REFITS, SEARCH_SCALES

DEFAULT_FIXTURE = Path(os.environ.get("ESCAPE_FAST_FIXTURE", ROOT.parent / "shared" / "data" / "mp100_fixture"))
DEFAULT_ANN = "fixture_all.json"
COPY = "copy support pose"
SIZE = (256, 256)  # any grid: the copy works in the crops' normalized coordinates
SEED = 0  # of the k-shot support draws


def pairs_of(coco, categories=None, max_per_category=None) -> list[tuple[int, int]]:
    """Ordered (support, query) instance pairs within each category, from
    different photographs (a support in the query's own photograph would
    let a search without a box find the support itself)."""
    return [(e[0][0], e[1]) for e in episodes_of(coco, 1, categories, max_per_category)]


def episodes_of(coco, shots: int, categories=None, max_per_category=None) -> list[tuple[tuple[int, ...], int]]:
    """(supports, query) episodes within each category: 1-shot, every ordered
    pair of instances in different photographs; k-shot, each query with k
    supports from other photographs drawn with SEED (queries whose category
    has fewer such instances are left out)."""
    rng = np.random.default_rng(SEED)
    out = []
    for c in coco.category_ids:
        if categories and coco.categories[c].name not in categories:
            continue
        members = coco.instances_of(c)
        image_of = {i: coco.instances[i].image_id for i in members}
        episodes = []
        for q in members:
            others = [s for s in members if image_of[s] != image_of[q]]
            if shots == 1:
                episodes += [((s,), q) for s in others]
            elif len(others) >= shots:
                episodes.append((tuple(int(s) for s in rng.choice(others, shots, replace=False)), q))
        out += episodes[:max_per_category] if max_per_category else episodes
    return out


def keypoint_set(coco, index: int) -> KeypointSet:
    inst = coco.instances[index]
    cat = coco.categories[inst.category_id]
    return KeypointSet(cat.keypoints, inst.keypoints.copy(), inst.visible.copy(), cat.limbs(), inst.bbox.copy(),
                       f"{coco.path}#{inst.ann_id}")


def copy_pose(coco, supports, query: int, query_box: bool) -> np.ndarray:
    """The supports' mean keypoints, relative to their boxes, placed in the
    query's box (or whole image); NaN where no support shows a keypoint."""
    grids = []
    for s in (supports,) if isinstance(supports, (int, np.integer)) else supports:
        inst = coco.instances[s]
        grid = Crop.of_box(inst.bbox, SIZE).to_grid(inst.keypoints, SIZE)
        grids.append(np.where(inst.visible[:, None], grid, np.nan))
    with warnings.catch_warnings():  # a keypoint no support shows stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        grid = np.nanmean(np.stack(grids), 0)
    q = coco.instances[query]
    box = q.bbox if query_box else np.array([0.0, 0.0, q.image.width, q.image.height])
    return Crop.of_box(box, SIZE).to_image(grid, SIZE)


def _supports(episode) -> tuple[int, ...]:
    s = episode[0]
    return (int(s),) if isinstance(s, (int, np.integer)) else tuple(s)


def score(coco, episodes, predictions, any_instance: bool = False) -> np.ndarray:
    """PCK at every threshold [T, E] of each episode's prediction [K, 2];
    ``episodes``: (support or supports, query).

    ``any_instance`` (queries without a box): a photograph may show several
    objects of the category (most of the human_body photos do), and without
    a box nothing says which one is meant, so the prediction is scored
    against each annotated instance of the category in that photograph and
    the best counts (the matching that multi-instance benchmarks use)."""
    by_image = defaultdict(list)
    for i, inst in enumerate(coco.instances):
        by_image[(inst.image_id, inst.category_id)].append(i)
    rows = []
    for episode, xy in zip(episodes, predictions):
        q = episode[1]
        pred = torch.from_numpy(np.nan_to_num(np.asarray(xy, dtype=np.float64), nan=-1e9))[None]
        shown = np.any([coco.instances[s].visible for s in _supports(episode)], 0)
        targets = by_image[(coco.instances[q].image_id, coco.instances[q].category_id)] if any_instance else [q]
        best = None
        for t in targets:
            qi = coco.instances[t]
            curve = pck_curve(pred, torch.from_numpy(qi.keypoints)[None], torch.from_numpy(shown & qi.visible)[None],
                              torch.tensor([qi.bbox_size]))
            if best is None or float(curve.mean()) > float(best.mean()):
                best = curve
        rows.append(best)
    return torch.cat(rows, 1).numpy() if rows else np.zeros((len(THRESHOLDS), 0))


def predict_episodes(predictor: Predictor, coco, episodes, query_box: bool) -> list[np.ndarray]:
    """The model's prediction of each episode's query: one adaptation per support set."""
    by_supports = defaultdict(list)
    for n, e in enumerate(episodes):
        by_supports[_supports(e)].append((n, e[1]))
    out = [None] * len(episodes)
    for supports, items in by_supports.items():
        predictor.adapt([coco.instances[s].image.path for s in supports], [keypoint_set(coco, s) for s in supports])
        queries = [coco.instances[q] for _, q in items]
        boxes = [qi.bbox.tolist() for qi in queries] if query_box else None
        for (n, _), result in zip(items, predictor.predict([qi.image.path for qi in queries], boxes)):
            if not result.ok:
                raise RuntimeError(result.error)
            out[n] = result.keypoints
    return out


def summarize(coco, episodes, scores: np.ndarray, baseline: np.ndarray | None = None) -> dict:
    """PCK@0.2 and mPCK over episodes and over categories; with ``baseline``
    (the copy's scores on the same episodes), the paired difference from it."""
    main = THRESHOLDS.index(0.2)
    per_cat = defaultdict(list)
    for n, e in enumerate(episodes):
        per_cat[coco.categories[coco.instances[e[1]].category_id].name].append(n)
    cats = {name: {"pck": float(scores[main, idx].mean()), "mpck": float(scores[:, idx].mean()), "pairs": len(idx)}
            for name, idx in sorted(per_cat.items())}
    out = {"pck": float(scores[main].mean()), "mpck": float(scores.mean()),
           "pck_categories": float(np.mean([c["pck"] for c in cats.values()])),
           "mpck_categories": float(np.mean([c["mpck"] for c in cats.values()])),
           "pairs": len(episodes), "per_category": cats}
    if baseline is not None and len(episodes):
        category = [coco.instances[e[1]].category_id for e in episodes]
        draw_of: dict = {}
        draws = [draw_of.setdefault(_supports(e), len(draw_of)) for e in episodes]
        diff, half = paired_difference(torch.from_numpy(baseline[main]), torch.from_numpy(scores[main]),
                                       torch.tensor(category), torch.tensor(draws))
        out["vs_copy"] = {"pck": diff, "ci95": half}
    return out


def run(data: Path, models, categories=None, max_per_category=None, device="cpu", log=print, ann=DEFAULT_ANN,
        shots=(1,), search_scales=SEARCH_SCALES, search_refits=SEARCH_REFITS, search_turn=True) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # annotations the loader skips are counted in its own warning
        coco = load_coco(data / "annotations" / ann)
    results, counts, copies = {}, {}, {}
    for k in shots:
        episodes = episodes_of(coco, k, categories, max_per_category)
        counts[k] = episodes
        for query_box in (True, False):
            key = f"{k}-shot {'box' if query_box else 'no box'}"
            copy = score(coco, episodes, [copy_pose(coco, _supports(e), e[1], query_box) for e in episodes],
                         not query_box)
            copies[key] = copy
            results[key] = {COPY: summarize(coco, episodes, copy)}
    for spec in models:
        predictor = Predictor(spec, device=device, search_scales=search_scales, search_refits=search_refits,
                              search_turn=search_turn)
        for method in predictor.model.methods:
            predictor.method = method
            for k in shots:
                episodes = counts[k]
                if not episodes:
                    continue
                for query_box in (True, False):
                    key = f"{k}-shot {'box' if query_box else 'no box'}"
                    t0 = time.perf_counter()
                    preds = predict_episodes(predictor, coco, episodes, query_box)
                    summary = summarize(coco, episodes, score(coco, episodes, preds, not query_box), copies[key])
                    summary["seconds"] = time.perf_counter() - t0
                    results[key][f"{spec} {method.upper()}"] = summary
                    log(f"{spec} {method} {key}: PCK@0.2 {100 * summary['pck']:.1f} (categories "
                        f"{100 * summary['pck_categories']:.1f}) in {summary['seconds']:.1f}s")
    return {"data": str(data), "annotations": ann, "episodes": {f"{k}-shot": len(v) for k, v in counts.items()},
            "search": {"scales": list(search_scales), "refits": search_refits, "turn": search_turn}, "results": results}


def table(report: dict) -> str:
    """One row per model and setting: PCK@0.2 over episodes and categories, mPCK, and the paired
    difference from copying the supports' pose."""
    lines = ["| setting | model | episodes | PCK@0.2 | categories | mPCK | vs copy (95% CI) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, rows in report["results"].items():
        for name, r in rows.items():
            vs = (f"{100 * r['vs_copy']['pck']:+.1f} ± {100 * r['vs_copy']['ci95']:.1f}" if "vs_copy" in r else "")
            lines.append(f"| {key} | {name} | {r['pairs']} | {100 * r['pck']:.1f} | {100 * r['pck_categories']:.1f} "
                         f"| {100 * r['mpck']:.1f} | {vs} |")
    return "\n".join(lines)


def category_table(report: dict, key: str = "1-shot box") -> str:
    models = list(report["results"][key])
    cats = list(report["results"][key][models[0]]["per_category"])
    lines = [f"| category ({key}) | episodes | " + " | ".join(models) + " |",
             "| --- | --- |" + " --- |" * len(models)]
    for c in cats:
        first = report["results"][key][models[0]]["per_category"][c]
        lines.append(f"| {c} | {first['pairs']} | " + " | ".join(
            f"{100 * report['results'][key][m]['per_category'][c]['pck']:.1f}" for m in models) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", "--fixture", dest="data", type=Path, default=DEFAULT_FIXTURE,
                   help="MP-100-format data set of photographs (default: the photo fixture)")
    p.add_argument("--ann", default=DEFAULT_ANN, help=f"annotation file under DATA/annotations (default {DEFAULT_ANN})")
    p.add_argument("--models", nargs="+", default=["imagenet:efficientnet_lite0", "builtin"],
                   help="checkpoints: builtin, imagenet:NAME (training-free), run folders or model files")
    p.add_argument("--shots", nargs="+", type=int, default=[1], help="supports per episode (default 1)")
    p.add_argument("--categories", nargs="+", help="only these categories")
    p.add_argument("--max-pairs-per-category", type=int, help="at most this many episodes per category (quick runs)")
    p.add_argument("--search-scales", nargs="+", type=float, default=list(SEARCH_SCALES),
                   help=f"the Predictor's object search (default {' '.join(map(str, SEARCH_SCALES))})")
    p.add_argument("--search-refits", type=int, default=SEARCH_REFITS,
                   help=f"the Predictor's refits of a searched box (default {SEARCH_REFITS})")
    p.add_argument("--search-upright", action="store_true",
                   help="the refit's crop stays upright (default: turned as the fitted supports' layout)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="write the report as JSON")
    p.add_argument("--per-category", action="store_true", help="also print per-category tables")
    args = p.parse_args(argv)
    if not (args.data / "annotations" / args.ann).is_file():
        print(f"error: no annotation file {args.data / 'annotations' / args.ann}", file=sys.stderr)
        return 2
    if min(args.shots) < 1:
        print(f"error: --shots must be positive, got {args.shots}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    report = run(args.data, args.models, args.categories, args.max_pairs_per_category, args.device,
                 log=lambda m: print(m, file=sys.stderr, flush=True), ann=args.ann, shots=tuple(args.shots),
                 search_scales=tuple(args.search_scales), search_refits=args.search_refits,
                 search_turn=not args.search_upright)
    print(table(report))
    if args.per_category:
        for key in report["results"]:
            if len(report["results"][key]) > 1 or key.endswith("box"):
                print()
                print(category_table(report, key))
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
