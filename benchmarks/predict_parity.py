"""The Predictor's outputs on the MP-100 fixture, to check that a change keeps them.

    python benchmarks/predict_parity.py --out before.npz        # on the old code
    python benchmarks/predict_parity.py --out after.npz --compare before.npz

Runs the default photo model and the built-in checkpoint (MLE, MAP, ESCAPE)
on the fixture's first categories with six or more instances, 1 and 5
supports, each query with its box and without (the object search), and saves
every query's keypoints, scores and decoded box. ``--compare`` names every
array that differs (bit for bit, NaN equal to NaN) and exits 1 if any does.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("ESCAPE_FAST_FIXTURE", ROOT.parent / "shared" / "data" / "mp100_fixture"))


def predictions(categories: int = 2, queries: int = 3) -> dict[str, np.ndarray]:
    from escape_fast.data import load_coco
    from escape_fast.predict import Predictor

    coco = load_coco(str(FIXTURE / "annotations" / "fixture_all.json"), check_images=False)
    by_cat: dict[int, list] = {}
    for inst in coco.instances:
        by_cat.setdefault(inst.category_id, []).append(inst)
    chosen = [c for c in by_cat if len(by_cat[c]) >= 5 + queries][:categories]

    def image(inst):
        return str(FIXTURE / "images" / inst.image.file_name)

    def keypoints(inst):
        return {"keypoints": [[float(x), float(y)] if v else None for (x, y), v in zip(inst.keypoints, inst.visible)],
                "box": [float(v) for v in inst.bbox]}

    out = {}
    for checkpoint, methods in ((None, [None]), ("builtin", ["mle", "map", "escape"])):
        for method in methods:
            predictor = Predictor(checkpoint, method, device="cpu")
            for c in chosen:
                group = by_cat[c]
                for shots in (1, 5):
                    predictor.adapt([image(i) for i in group[:shots]], [keypoints(i) for i in group[:shots]])
                    rest = group[shots : shots + queries]
                    for boxed in (True, False):
                        boxes = [[float(v) for v in i.bbox] for i in rest] if boxed else None
                        results = predictor.predict([image(i) for i in rest], boxes)
                        key = f"{checkpoint or 'photo'}-{predictor.method}-cat{c}-{shots}shot-{'box' if boxed else 'search'}"
                        out[f"{key}-keypoints"] = np.stack([r.keypoints for r in results])
                        out[f"{key}-scores"] = np.stack([r.scores for r in results])
                        out[f"{key}-box"] = np.stack([r.box for r in results])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="npz file to write")
    p.add_argument("--compare", help="npz file of an earlier run to compare with")
    p.add_argument("--categories", type=int, default=2, help="fixture categories (default 2)")
    p.add_argument("--queries", type=int, default=3, help="queries per support set (default 3)")
    args = p.parse_args(argv)
    if not FIXTURE.is_dir():
        print(f"error: the MP-100 fixture is not at {FIXTURE} (set ESCAPE_FAST_FIXTURE)", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arrays = predictions(args.categories, args.queries)
    np.savez(args.out, **arrays)
    print(f"{len(arrays)} arrays in {args.out}")
    if args.compare:
        before = np.load(args.compare)
        differ = sorted(set(before.files) ^ set(arrays)) + [
            k for k in sorted(set(before.files) & set(arrays)) if not np.array_equal(before[k], arrays[k], equal_nan=True)]
        print(f"{len(differ)} of {len(arrays)} differ from {args.compare}" + (": " + ", ".join(differ[:10]) if differ else ""))
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
