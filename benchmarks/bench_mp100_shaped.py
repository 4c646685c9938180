"""MP-100-shaped evaluation timing (issue 6, point 6): the GPU target is
60,000 pairs in at most 20 s, feature extraction included.

    python benchmarks/bench_mp100_shaped.py [--device cuda] [--episodes 60000] [--out mp100_shaped.json]
    python benchmarks/bench_mp100_shaped.py --smoke     # tiny sizes: checks the script on a CPU

It writes a dataset shaped like one MP-100 test split: 20 categories x 100
instances, photos a little larger than the 256 x 256 crop, K from 8 up to 68
keypoints per category. The photos are noise and the keypoints random: the
time does not depend on what the pictures show. The model is untrained but
of the paper's shape: ResNet-50 (random weights) with the deconvolution head
(C = 256, 64 x 64 grid), L = 100 super-keypoints, and a matching network of
6 blocks x 8 heads x 64, MLP 2048, 50 Sinkhorn iterations. The command then
times the fast evaluation path (what ``python -m escape_fast.eval`` runs) for
ESCAPE at 1 shot, from the crops on: dataset writing is reported apart.
Writes a JSON record with the machine, versions, command and phase times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time

import cv2
import numpy as np
import torch
from machine import cpu_name

import escape_fast
from escape_fast import config as config_mod
from escape_fast.data import EpisodeSampler, draws_for_episodes, load_coco
from escape_fast.eval.engine import evaluate_many
from escape_fast.models.escape import EscapeModel

FULL = {"categories": 20, "instances": 100, "max_keypoints": 68, "image": 320, "backbone": "resnet50",
        "input_size": 256, "channels": 256, "super": 100,
        "matching": {"blocks": 6, "heads": 8, "head_dim": 64, "mlp": 2048, "iters": 50}}
SMOKE = {"categories": 3, "instances": 20, "max_keypoints": 68, "image": 96, "backbone": "tiny",
         "input_size": 64, "channels": 16, "super": 12,
         "matching": {"blocks": 1, "heads": 2, "head_dim": 8, "mlp": 32, "iters": 10}}


def write_dataset(root: str, shape: dict, seed: int = 0) -> str:
    """Noise photos and random keypoints in MP-100's layout; returns the annotation file."""
    rng = np.random.default_rng(seed)
    size = shape["image"]
    counts = np.linspace(8, shape["max_keypoints"], shape["categories"]).round().astype(int)
    categories, images, annotations = [], [], []
    for c, k in enumerate(counts, start=1):
        name = f"shape_{c:02d}"
        os.makedirs(os.path.join(root, "images", name), exist_ok=True)
        categories.append({"id": c, "name": name, "supercategory": name,
                           "keypoints": [f"kp{j}" for j in range(k)], "skeleton": []})
        for n in range(shape["instances"]):
            file_name = f"{name}/{n:03d}.jpg"
            cv2.imwrite(os.path.join(root, "images", file_name),
                        rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            iid = len(images) + 1
            images.append({"id": iid, "file_name": file_name, "width": size, "height": size})
            x0, y0 = rng.uniform(0, size * 0.2, 2)
            w, h = rng.uniform(size * 0.5, size * 0.8, 2)
            pts = np.stack([rng.uniform(x0, x0 + w, k), rng.uniform(y0, y0 + h, k), np.full(k, 2.0)], 1)
            pts[rng.random(k) < 0.1] = 0.0  # some keypoints not annotated, as in MP-100
            annotations.append({"id": iid, "image_id": iid, "category_id": c, "iscrowd": 0,
                                "bbox": [float(x0), float(y0), float(w), float(h)], "area": float(w * h),
                                "keypoints": pts.round(2).reshape(-1).tolist(),
                                "num_keypoints": int((pts[:, 2] > 0).sum())})
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    path = os.path.join(root, "annotations", "mp100_shaped_test.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return path


def build_model(shape: dict, device) -> EscapeModel:
    cfg = config_mod.resolve(overrides=[{"backbone": shape["backbone"], "weights": None, "alpha": 0.5,
                                         "channels": shape["channels"], "input_size": shape["input_size"],
                                         "matching": shape["matching"]}])
    torch.manual_seed(0)
    model = EscapeModel.build(cfg, num_super=shape["super"], with_matcher=True)
    model.super_keypoints.copy_(torch.randn_like(model.super_keypoints))
    return model.to(device).eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--episodes", type=int, default=60000, help="(support set, query) pairs")
    p.add_argument("--batch-size", type=int, default=64, help="instances per feature-extraction batch")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="crop loader processes")
    p.add_argument("--repeat", type=int, default=3, help="timed runs (the median is reported)")
    p.add_argument("--shots", type=int, nargs="+", default=[1], help="shot counts, evaluated together (default 1)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script on a CPU")
    p.add_argument("--out", default="mp100_shaped.json")
    args = p.parse_args(argv)
    shape = SMOKE if args.smoke else FULL
    device = torch.device(args.device)

    root = tempfile.mkdtemp(prefix="escape_fast_mp100_shaped_")
    t0 = time.perf_counter()
    coco = load_coco(write_dataset(root, shape))
    t_data = time.perf_counter() - t0
    model = build_model(shape, device)
    n_cat = len(coco.category_ids)
    draws = draws_for_episodes(args.episodes, n_cat, 15)
    samplers = [EpisodeSampler(coco, shots=k, queries=15, draws=draws, seed=0) for k in args.shots]

    runs, phases = [], None
    for _ in range(args.repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        res = evaluate_many(model, coco, samplers, ("escape",), device, batch_size=args.batch_size,
                            workers=args.workers)
        runs.append(time.perf_counter() - t0)
        phases = {f"{k}-shot": r["escape"].seconds for k, r in zip(args.shots, res)}
    # peak memory of this process (the loader workers apart): features are held a category at a time
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    peak_gpu = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    record = {
        "command": " ".join([sys.executable, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "escape_fast": escape_fast.__version__,
        "shape": shape, "shots": args.shots, "pairs": samplers[0].num_pairs, "instances": n_cat * shape["instances"],
        "dataset_writing_s": t_data, "eval_s_median": sorted(runs)[len(runs) // 2], "eval_s_all": runs,
        "phases_s_last_run": phases, "peak_rss_gib": peak_rss, "peak_gpu_gib": peak_gpu,
        "pck_0.2_untrained": {f"{k}-shot": r["escape"].summary.pck_main for k, r in zip(args.shots, res)},
    }
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps({k: record[k] for k in ("device", "shots", "pairs", "instances", "eval_s_median",
                                             "phases_s_last_run", "peak_rss_gib", "peak_gpu_gib")},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
