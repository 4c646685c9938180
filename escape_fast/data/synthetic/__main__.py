"""Write the built-in synthetic benchmark: ``python -m escape_fast.data.synthetic --out DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from escape_fast import cli
from escape_fast.data.synthetic import SIZES, generate
from escape_fast.files import staged_folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m escape_fast.data.synthetic",
        description="Write the synthetic MP-100-format benchmark (15 split files, images, part labels).",
    )
    parser.add_argument("--out", required=True, help="output folder, created (annotations/, images/); it must not "
                                                      "exist yet or be empty")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes (the output does not depend on it)")
    parser.add_argument("--instances", type=int, default=None, help="instances per category (overrides --size)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return cli.run_main(parser.prog, lambda: _write(args))


def _write(args) -> int:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} already exists and is not an empty folder; choose a new folder")
    if out.is_dir():
        out.rmdir()  # empty: the finished benchmark is renamed into its place
    with staged_folder(out) as tmp:  # written elsewhere and renamed: a stopped run leaves no partial folder
        res = generate(tmp, args.size, args.seed, args.workers, progress=not args.quiet, instances=args.instances)
    print(f"wrote {len(res['annotations'])} annotation files under {out / 'annotations'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
