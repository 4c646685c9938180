"""The standard CAPE evaluation, fast.

    python -m escape_fast.eval --episodes 60000

With no --data it evaluates the built-in synthetic benchmark (generated into
a cache folder on first use) with the built-in checkpoint; with --data DIR
--split N --checkpoint RUN_DIR it evaluates MP-100 or any dataset in its
format. Episodes follow the standard protocol (docs/method.md, "Evaluation"): for each test
category, seeded draws of S supports + Q queries; --episodes counts
(support set, query) pairs, spread evenly over the categories.

Under torchrun the categories are sharded over processes and the merged
result equals the single-process one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

from escape_fast import builtin, cli
from escape_fast import config as config_mod
from escape_fast.data import DataError, EpisodeSampler, draws_for_episodes, load_for_run, mp100_split_files
from escape_fast.distributed import Runtime, inference_batch_size
from escape_fast.errors import UsageError
from escape_fast.eval.engine import EvalResult, PairResults, evaluate_many, evaluate_reference, summarize
from escape_fast.eval.metrics import THRESHOLDS, paired_difference
from escape_fast.eval.table import build_table, markdown
from escape_fast.files import atomic_write, write_json
from escape_fast.models.escape import EscapeModel


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m escape_fast.eval",
        description="Evaluate a CAPE model on the standard episode protocol (PCK@0.2 and more). "
                    "Without --data: the built-in synthetic benchmark and the built-in checkpoint.",
    )
    p.add_argument("--episodes", type=int, default=60000,
                   help="(support set, query) pairs, spread evenly over the test categories (default 60000)")
    p.add_argument("--data", help="dataset root in MP-100 layout (default: the built-in synthetic benchmark)")
    p.add_argument("--split", type=cli.split_argument, default=(1,),
                   help="MP-100 split 1..5, or all: every split, with one table of all (default 1)")
    p.add_argument("--annotations", help="a test annotation file to use instead of the split's")
    p.add_argument("--checkpoint", help="run folder, model.pt, one of the ESCAPE authors' .pth files, or "
                                        "imagenet:NAME[=FILE] (a training-free pretrained trunk, see README; "
                                        "default: the built-in checkpoint); '{split}' in it stands for each "
                                        "split's number, e.g. --split all --checkpoint 'runs/split{split}'")
    p.add_argument("--shots", type=int, nargs="+", default=[1],
                   help="supports per episode, 1 or 5 (default 1); several (--shots 1 5) are evaluated in turn, "
                        "with one table of all")
    p.add_argument("--queries", type=int, default=15, help="queries per support draw (default 15)")
    p.add_argument("--method", choices=("mle", "map", "escape", "all"), default=None,
                   help="prototype estimate (default: the best the model has, escape for the built-in one; all: "
                        "every one it has, side by side)")
    p.add_argument("--alpha", type=float, default=None,
                   help="support weight of MAP / ESCAPE in [0, 1], instead of the checkpoint's (chosen on "
                        "validation categories when it was trained; the authors' code fixes 0.5)")
    p.add_argument("--seed", type=int, default=0, help="episode seed (default 0)")
    p.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda", "triton", "reference"),
                   help="op implementation (default auto)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--batch-size", type=int, help="images per feature-extraction batch (default: 32 on a GPU; on "
                                                  "the CPU, 16 at 128 px, fewer for larger inputs)")
    p.add_argument("--workers", type=int, default=2, help="data loading processes")
    p.add_argument("--reference", action="store_true",
                   help="the straightforward way: features recomputed per episode, reference ops, one episode "
                        "at a time (a baseline for speed and a check of the fast path)")
    p.add_argument("--too-few", choices=("raise", "skip"), default="raise",
                   help="a test category with fewer than shots + queries instances: stop with an error (default) "
                        "or leave it out with a warning")
    p.add_argument("--bad-images", choices=("raise", "skip"), default="raise",
                   help="an image that is missing or cannot be decoded: stop with an error naming it (default), "
                        "or check every image first and leave those instances out, counting them")
    p.add_argument("--allow-base-categories", action="store_true",
                   help="evaluate even if some test categories were training (base) categories of the checkpoint; "
                        "the result is then not a novel-category result")
    p.add_argument("--out", help="write the report as JSON to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def method_differences(results: dict[str, EvalResult]) -> dict[str, tuple[float, float]]:
    """{"escape-mle": (mean, half-width)}: PCK@0.2 differences between the
    methods on the same pairs, with paired 95% intervals over support draws."""
    methods = list(results)
    main = THRESHOLDS.index(results[methods[0]].summary.main_threshold)
    out = {}
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            ra, rb = results[a], results[b]
            if not (torch.equal(ra.category_ids, rb.category_ids) and torch.equal(ra.draws, rb.draws)):
                continue  # not the same pairs in the same order
            out[f"{b}-{a}"] = paired_difference(ra.scores[main], rb.scores[main], ra.category_ids, ra.draws)
    return out


def format_report(results: dict[str, EvalResult], coco, shots: int, alpha: float | None = None,
                  differences: dict | None = None) -> str:
    methods = list(results)
    first = results[methods[0]].summary
    lines = [f"{first.num_pairs} (support set, query) pairs, {first.num_draws} support draws, {shots}-shot"]
    if alpha is not None:
        lines.append(f"MAP / ESCAPE support weight alpha = {alpha:.3f} (eq. 7 / 10)")
    head = f"{'category':<34}" + "".join(f"{m.upper():>10}" for m in methods)
    lines += ["", head, "-" * len(head)]
    for cat_id in sorted(first.per_category):
        name = coco.categories[cat_id].name[:33]
        lines.append(f"{name:<34}" + "".join(f"{100 * results[m].summary.per_category[cat_id][0.2]:>10.2f}"
                                              for m in methods))
    lines.append("-" * len(head))
    lines.append(f"{'PCK@0.2 (mean over pairs)':<34}" + "".join(f"{100 * results[m].summary.pck_main:>10.2f}"
                                                                 for m in methods))
    lines.append(f"{'95% CI over draws':<34}" + "".join(
        f"{'±' + format(100 * (results[m].summary.ci95[1] - results[m].summary.pck_main), '.2f'):>10}"
        for m in methods))
    for t in THRESHOLDS:
        lines.append(f"{'PCK@' + str(t):<34}" + "".join(f"{100 * results[m].summary.pck[t]:>10.2f}"
                                                        for m in methods))
    lines.append(f"{'mPCK':<34}" + "".join(f"{100 * results[m].summary.mpck:>10.2f}" for m in methods))
    lines.append("")
    for name, (mean, half) in (differences or {}).items():
        b, a = name.upper().split("-")
        lines.append(f"{b + ' - ' + a + ' (paired 95% CI)':<34}{100 * mean:>+10.2f} ± {100 * half:.2f}")
    if len(methods) > 1:
        lines.append("")
    for m in methods:
        sec = results[m].seconds
        total = sum(sec.values())
        phases = ", ".join(f"{k} {v:.2f}s" for k, v in sec.items())
        lines.append(f"{m}: {total:.2f}s, {first.num_pairs / max(total, 1e-9):,.0f} pairs/s ({phases})")
    return "\n".join(lines)


def evaluate_sharded(model, coco, samplers, methods, rt: Runtime, args, batch_size: int) -> list[dict] | None:
    """Categories dealt round-robin over the torchrun processes, results
    gathered on rank 0 in the single-process order (bit for bit the same:
    feature batches never mix categories); one result dict per sampler."""
    mine = sorted({c for s in samplers for c in s.category_ids})[rt.rank :: rt.world]
    raw = evaluate_many(model, coco, samplers, methods, rt.device, args.backend, batch_size, args.workers,
                        progress=None, categories=mine, summarize_results=False, alpha=args.alpha)
    gathered = [None] * rt.world
    dist.all_gather_object(gathered, raw)
    if not rt.main:
        return None
    out = []
    for k in range(len(samplers)):
        results = {}
        for m in methods:
            pairs = PairResults.concat([g[k][m][0] for g in gathered])
            order = torch.argsort(pairs.category_ids, stable=True)  # category id order, draws in order within
            pairs = PairResults(pairs.scores[:, order], pairs.predictions[order], pairs.category_ids[order],
                                pairs.draws[order])
            seconds = {p: max(g[k][m][1][p] for g in gathered) for p in gathered[0][k][m][1]}
            results[m] = summarize(m, pairs, seconds)
        out.append(results)
    return out


def check_novel(model: EscapeModel, coco) -> None:
    """A CAPE result counts only on categories the model has not been trained
    on; the model lists its base categories (models made before that field
    existed are not checked)."""
    base = set(model.base_categories)
    seen = sorted(coco.categories[c].name for c in coco.category_ids if coco.categories[c].name in base)
    if seen:
        raise DataError(
            f"{model.path} was trained on {len(seen)} of the test categories of {coco.path} ({', '.join(seen[:8])}"
            f"{', ...' if len(seen) > 8 else ''}): wrong --split or --checkpoint? Pass --allow-base-categories "
            "to evaluate anyway"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    return cli.run_main("escape_fast.eval", lambda: run(args))


def run(args) -> int:
    from tqdm.auto import tqdm

    progress = None if args.quiet else tqdm
    t_start = time.perf_counter()
    if args.annotations and len(args.split) > 1:
        raise UsageError("--annotations names one test file: give it with one --split, not all")
    for shots in args.shots:
        if shots < 1:
            raise UsageError(f"--shots: a shot count is a positive integer, got {shots}")
    if args.alpha is not None:
        try:
            config_mod.check_alpha(args.alpha)
        except config_mod.ConfigError as exc:
            raise UsageError(f"--alpha: {exc}") from None
    if args.reference and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--reference runs in one process; start it without torchrun")
    if args.data is None and args.annotations is None:
        root = builtin.dataset_root(progress=not args.quiet)
    else:  # with --annotations alone there is no need for the built-in benchmark
        root = args.data
    several = len(args.split) * len(args.shots) > 1
    rt = Runtime(args.device)
    reports = []
    try:
        for split in args.split:
            ann = args.annotations or str(mp100_split_files(root, split, need=("test",))["test"])
            coco = load_for_run(ann, args.bad_images, args.workers, progress)
            checkpoint = args.checkpoint.replace("{split}", str(split)) if args.checkpoint else None
            model = EscapeModel.load(checkpoint)
            if not args.allow_base_categories:
                check_novel(model, coco)
            model.to(rt.device)
            methods = model.methods if args.method == "all" else (args.method or model.methods[-1],)
            for m in methods:
                model.check_method(m)
            # the support weight of MAP / ESCAPE (a checkpoint that lacks it fails here, before the work)
            alphas = {shots: (args.alpha if args.alpha is not None else model.alpha_for(shots))
                      if set(methods) & {"map", "escape"} else None for shots in args.shots}
            samplers = [episode_sampler(args, coco, shots) for shots in args.shots]
            batch_size = args.batch_size or inference_batch_size(rt.device, model.input_size)
            setup_seconds = time.perf_counter() - t_start
            if args.reference:
                per_shots = [{m: evaluate_reference(model, coco, s.episodes, m, rt.device, args.alpha)
                              for m in methods} for s in samplers]
            elif rt.world == 1:  # a split's features are extracted once for all its shot counts
                per_shots = evaluate_many(model, coco, samplers, methods, rt.device, args.backend, batch_size,
                                          args.workers, progress=progress, alpha=args.alpha)
            else:
                per_shots = evaluate_sharded(model, coco, samplers, methods, rt, args, batch_size)
            if rt.main:
                for sampler, results in zip(samplers, per_shots):
                    if several:
                        print(f"\n=== split {split}, {sampler.shots}-shot: {model.path} ===")
                    reports.append(report_of(args, root, ann, coco, model, None if args.annotations else split,
                                             sampler, results, alphas[sampler.shots], rt, setup_seconds, t_start))
            t_start = time.perf_counter()
    finally:
        rt.close()
    if not rt.main:
        return 0
    if not several:
        if args.out:
            write_json(args.out, reports[0])
        return 0
    table = build_table(reports)
    print("\n" + markdown(table))
    if args.out:
        write_json(args.out, {"table": table, "runs": reports})
        with atomic_write(os.path.splitext(args.out)[0] + ".md") as f:
            f.write(markdown(table) + "\n")
    return 0


def episode_sampler(args, coco, shots: int) -> EpisodeSampler:
    """The episodes of ``coco`` at ``shots`` under the command's --episodes, --queries, --seed, --too-few."""
    try:
        draws = draws_for_episodes(args.episodes, len(coco.category_ids), args.queries)
    except UsageError as exc:  # named as argparse names an option
        raise UsageError(f"--episodes: {exc}") from None
    return EpisodeSampler(coco, shots=shots, queries=args.queries, draws=draws, seed=args.seed,
                          too_few=args.too_few)


def report_of(args, root, ann, coco, model: EscapeModel, split, sampler: EpisodeSampler, results: dict, alpha,
              rt: Runtime, setup_seconds: float, t_start: float) -> dict:
    """One evaluation's report (a test file at one shot count), printed and returned."""
    differences = method_differences(results)
    print(format_report(results, coco, sampler.shots, alpha, differences))
    print(f"setup (data and model loading) {setup_seconds:.2f}s; total {time.perf_counter() - t_start:.2f}s")
    # "results" depend only on the model, the data and the episodes: two runs of one
    # evaluation write identical sections; machine and timings are kept apart
    return {
        "data": root, "annotations": ann, "split": split, "checkpoint": model.path, "shots": sampler.shots,
        "queries": args.queries, "episodes": sampler.num_pairs, "alpha": alpha, "seed": args.seed,
        "reference": args.reference,
        "results": {m: r.as_dict() for m, r in results.items()},
        "differences": differences,
        "category_names": {c: coco.categories[c].name for c in coco.category_ids},
        "timing": {"backend": args.backend, "device": str(rt.device), "setup_seconds": setup_seconds,
                   **{m: r.timing() for m, r in results.items()}},
    }


if __name__ == "__main__":
    sys.exit(main())
