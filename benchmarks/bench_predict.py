"""The Predictor's speed on real photographs (issue 24's predictor targets).

    python benchmarks/bench_predict.py [--queries 100] [--repeat 2] [--out bench_predict.json]

Adapts the default photo model (``Predictor()``) to one support of the MP-100
fixture's largest category, then times ``predict`` on ``--queries`` of its
photos (cycled when the category has fewer), decoded into memory first so
that image decoding is not timed: once with each query's box, once without
(the object search, the Predictor's default: SEARCH_SCALES and SEARCH_REFITS),
and once without a box through the simplest search (the whole image at the
input size, no refit: the Predictor's search before 2026-12-08), so that the
search's cost is measured side by side. Each is repeated ``--repeat`` times,
alternating, and every time is reported; the summary takes the best. The JSON record names the
machine (CPU model, instruction sets, threads) and the versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("ESCAPE_FAST_FIXTURE", ROOT.parent / "shared" / "data" / "mp100_fixture"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=100, help="queries per timing (default 100)")
    p.add_argument("--repeat", type=int, default=2, help="timings of each kind, alternating (default 2)")
    p.add_argument("--checkpoint", default=None, help="as in predict (default: the photo model)")
    p.add_argument("--out", default="bench_predict.json", help="JSON record to write")
    args = p.parse_args(argv)
    if not FIXTURE.is_dir():
        print(f"error: the MP-100 fixture is not at {FIXTURE} (set ESCAPE_FAST_FIXTURE)", file=sys.stderr)
        return 2

    import torch
    from PIL import Image

    import escape_fast
    from escape_fast.data import load_coco
    from escape_fast.predict import Predictor

    coco = load_coco(str(FIXTURE / "annotations" / "fixture_all.json"), check_images=False)
    by_cat: dict[int, list] = {}
    for inst in coco.instances:
        by_cat.setdefault(inst.category_id, []).append(inst)
    group = max(by_cat.values(), key=len)
    support, rest = group[0], group[1:]
    chosen = [rest[i % len(rest)] for i in range(args.queries)]
    images = {i.image.file_name: np.asarray(Image.open(FIXTURE / "images" / i.image.file_name).convert("RGB"))
              for i in group}
    queries = [images[i.image.file_name] for i in chosen]
    boxes = [[float(v) for v in i.bbox] for i in chosen]
    kp = {"keypoints": [[float(x), float(y)] if v else None for (x, y), v in zip(support.keypoints, support.visible)],
          "box": [float(v) for v in support.bbox]}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        predictor = Predictor(args.checkpoint, device="cpu").adapt([images[support.image.file_name]], [kp])
        predictor.predict(queries[:4], boxes[:4])  # warm-up: first calls allocate and pick kernels
        times = {"boxed": [], "unboxed": [], "unboxed, simplest search": []}
        default_search = predictor.search_scales, predictor.search_refits
        for _ in range(args.repeat):
            for kind in times:
                simplest = kind == "unboxed, simplest search"
                predictor.search_scales, predictor.search_refits = ((1.0,), 0) if simplest else default_search
                t0 = time.perf_counter()
                predictor.predict(queries, boxes if kind == "boxed" else None)
                times[kind].append(time.perf_counter() - t0)

    record = {
        "machine": cpu_name(), "platform": platform.platform(),
        "versions": {"escape_fast": escape_fast.__version__, "torch": torch.__version__},
        "category": coco.categories[support.category_id].name, "queries": args.queries,
        "search": {"scales": list(default_search[0]), "refits": default_search[1]},
        "seconds": times, "best": {k: min(v) for k, v in times.items()},
    }
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(record["machine"])
    for kind, ts in times.items():
        print(f"{args.queries} {kind} queries: " + ", ".join(f"{t:.2f} s" for t in ts) + f" (best {min(ts):.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
