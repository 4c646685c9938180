"""Convert a model into an escape_fast model file.

    python -m escape_fast.convert escape_split1.pth runs/authors_split1/model.pt

The input is anything ``--checkpoint`` accepts: the ESCAPE authors'
released checkpoints (``baseline_splitN.pth``, ``finetune_splitN.pth``,
``escape_splitN.pth``; docs/authors.md), a training run, a model file or
``imagenet:NAME``. The output computes exactly as the input does and is read
with ``weights_only=True`` without numpy in the loop. ``--half`` stores the
weights in float16 (half the size; they are computed with in float32 again,
so results move by float16's rounding).
"""

from __future__ import annotations

import argparse
import os


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m escape_fast.convert",
                                description="Convert a model (for example one of the ESCAPE authors' checkpoints) "
                                            "into an escape_fast model file.")
    p.add_argument("model", help="the authors' .pth, a run folder, model.pt or imagenet:NAME")
    p.add_argument("out", help="the escape_fast model file to write (written atomically)")
    p.add_argument("--half", action="store_true", help="store the networks' weights in float16 (half the size)")
    return p.parse_args(argv)


def run(args) -> int:
    from escape_fast.models.escape import EscapeModel

    model = EscapeModel.load(args.model)
    if os.path.isdir(args.out):
        raise FileExistsError(f"{args.out}: is a folder; give the model file to write")
    model.save(args.out, half=args.half)
    size = os.path.getsize(args.out) / 1e6
    print(f"{args.out}: {', '.join(model.methods)} ({size:.1f} MB); evaluate it with python -m escape_fast.eval "
          f"--checkpoint {args.out}")
    return 0


def main(argv=None) -> int:
    from escape_fast import cli

    args = parse_args(argv)
    return cli.run_main("escape_fast.convert", lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
