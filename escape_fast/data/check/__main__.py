"""Check a data set in MP-100's layout: ``python -m escape_fast.data.check ROOT``."""

from __future__ import annotations

import argparse
import os
import sys

from escape_fast import cli
from escape_fast.data.check import check_dataset
from escape_fast.files import write_json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m escape_fast.data.check",
        description="Check every annotation file under ROOT/annotations and every image it names under "
                    "ROOT/images: one line per kind of problem with counts and the first ids, and for MP-100 "
                    "the counts against the published ones. Exit 0 when the data set is usable, 2 when not.",
    )
    parser.add_argument("root", help="data set folder (annotations/*.json, images/)")
    parser.add_argument("--json", help="write every problem to this JSON file")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="image-decoding processes (default: the CPU count, at most 8)")
    parser.add_argument("--bad-images", choices=("raise", "skip"), default="raise",
                        help="as in train and eval: with 'skip', missing or undecodable images do not make the "
                             "data set unusable (their instances would be dropped; the report counts them)")
    parser.add_argument("--no-images", action="store_true", help="check the annotation files only")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return cli.run_main(parser.prog, lambda: _check(args))


def _check(args) -> int:
    from tqdm.auto import tqdm

    report = check_dataset(args.root, args.workers, None if args.quiet else tqdm, args.bad_images,
                           images=not args.no_images)
    if args.json:
        write_json(args.json, report.as_dict())
    print("\n".join(report.lines()))
    if args.json:
        print(f"every problem: {args.json}", file=sys.stderr)
    return 0 if report.usable else 2


if __name__ == "__main__":
    raise SystemExit(main())
