"""Predict keypoints on your own images from one or a few annotated supports.

    python -m escape_fast.predict --support dog.jpg --support-keypoints dog.json \\
        --query other_dog.jpg more/*.jpg --out predictions/

The keypoint file's formats are in escape_fast.data.keypoint_file; the
Predictor behind this command is escape_fast.predict.Predictor.
"""

from __future__ import annotations

import argparse
import sys

from escape_fast import builtin, cli
from escape_fast.errors import UsageError
from escape_fast.predict.outputs import write_outputs
from escape_fast.predict.predictor import SEARCH_SCALES, Predictor


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m escape_fast.predict",
        description="Predict keypoints on query images from one or a few annotated support images of the same "
                    "kind of object. Writes predictions.json and one PNG per query (and per support) to --out.",
        epilog="Keypoint file: {\"names\": [...], \"keypoints\": [[x, y], [x, y, v], null, ...], \"skeleton\": "
               "[[0, 1], ...], \"box\": [x, y, w, h]} (names, skeleton, box optional), or a COCO keypoint file "
               "(file.json#ANNOTATION_ID picks one annotation). See README.md.",
    )
    p.add_argument("--support", action="append", required=True, metavar="IMG",
                   help="support image (repeat for several shots, e.g. 5)")
    p.add_argument("--support-keypoints", action="append", required=True, metavar="KP.json",
                   help="keypoint file of each support, in the order of --support (one COCO file may serve all)")
    p.add_argument("--support-box", action="append", type=cli.box_argument, metavar="x,y,w,h",
                   help="object box of each support (default: the keypoint file's box, else the whole image)")
    p.add_argument("--query", nargs="+", required=True, metavar="IMG", help="query image(s)")
    p.add_argument("--query-box", action="append", type=cli.box_argument, metavar="x,y,w,h",
                   help="object box of each query, in order ('none': whole image; default: whole images)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--checkpoint", metavar="MODEL",
                   help="training run folder, model.pt, one of the ESCAPE authors' .pth files, builtin (the built-in checkpoint) or imagenet:NAME[=FILE] "
                        f"(a training-free pretrained trunk: efficientnet_lite0/1/2, resnet50/18, dinov2_vits14/...; default: {builtin.PHOTO_MODEL}, the best on photographs)")
    p.add_argument("--method", choices=("escape", "map", "mle"),
                   help="prototype estimate (default: the best the model has, escape for the built-in one)")
    p.add_argument("--device", default="auto", help="auto (GPU when present) | cpu | cuda")
    p.add_argument("--batch-size", type=int,
                   help="queries per batch (default: 32 on a GPU; on the CPU, 4 at 256 px, more for smaller inputs)")
    p.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda", "triton", "reference"),
                   help="op implementation (default auto)")
    p.add_argument("--search-scales", nargs="+", type=float, default=list(SEARCH_SCALES), metavar="S",
                   help="a query without a box is searched in the whole image at these multiples of the model's "
                        f"input size (default {' '.join(f'{v:g}' for v in SEARCH_SCALES)}; 1 alone is faster, "
                        "a larger one finds smaller objects)")
    p.add_argument("--labels", action="store_true", help="write keypoint numbers beside the drawn keypoints")
    return p.parse_args(argv)



def main(argv=None) -> int:
    args = parse_args(argv)
    return cli.run_main("escape_fast.predict", lambda: run(args))


def run(args) -> int:
    supports, kp_files = args.support, args.support_keypoints
    if len(kp_files) not in (1, len(supports)):
        raise UsageError(f"{len(supports)} --support images but {len(kp_files)} --support-keypoints files; give "
                         "one per support")
    for name, opt, n in (("--support-box", args.support_box, len(supports)),
                         ("--query-box", args.query_box, len(args.query))):
        if opt is not None and len(opt) != n:
            raise UsageError(f"{len(opt)} {name} for {n} images; give one per image (none for the whole image)")
    predictor = Predictor(args.checkpoint, args.method, args.device, args.batch_size, args.backend,
                          search_scales=args.search_scales)
    keypoints = kp_files[0] if len(kp_files) == 1 else kp_files  # one COCO file may serve every support
    predictor.adapt(supports, keypoints, args.support_box)
    results = predictor.predict(args.query, args.query_box)
    path = write_outputs(predictor, results, args.out, args.labels)
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"error: {r.error}", file=sys.stderr)
    print(f"{len(results) - len(failed)} of {len(results)} queries predicted ({predictor.method}, "
          f"{len(supports)}-shot, {predictor.device}); results in {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
