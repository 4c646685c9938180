"""What a prediction run writes: predictions.json and a drawing of each support and query."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from escape_fast.errors import DataError
from escape_fast.files import write_json
from escape_fast.predict.predictor import Prediction, Predictor, read_image


def _png_name(image: str, used: set, prefix: str = "") -> str:
    """A PNG file name from an image name that no other output uses (x.jpg -> x.png, then x-2.png, ...)."""
    stem = prefix + (Path(image).stem or "image")
    name, n = f"{stem}.png", 1
    while name in used:
        n += 1
        name = f"{stem}-{n}.png"
    used.add(name)
    return name


def _readable(name: str):
    """The image at path ``name`` for drawing, or None (an array given from Python has no path)."""
    try:
        return read_image(name, name) if os.path.isfile(name) else None
    except DataError:
        return None


def write_outputs(predictor: Predictor, results: list[Prediction], out_dir: str, labels: bool = False) -> str:
    """predictions.json and the drawings (each support and query) in ``out_dir``; returns the JSON path."""
    from escape_fast.drawing import draw_pose, save_png

    os.makedirs(out_dir, exist_ok=True)
    names, skeleton = predictor.names, predictor.skeleton
    numbers = [str(i) for i in range(len(names))] if labels else None
    used = {"predictions.png"}

    def draw(name, xy, valid, prefix=""):
        image = _readable(name)
        if image is None:
            return None
        png = _png_name(name, used, prefix)
        save_png(draw_pose(image, xy, valid, skeleton, numbers), os.path.join(out_dir, png))
        return png

    supports = [{"image": name, "keypoints": kps.source, "box": crop.box.tolist(),
                 "drawing": draw(name, kps.keypoints, kps.visible, "support-")}
                for name, kps, crop in zip(predictor.support_images, predictor.supports, predictor.support_crops)]
    queries = []
    for r in results:
        entry = r.as_dict(names)
        if r.ok:
            entry["drawing"] = draw(r.image, r.keypoints, np.isfinite(r.keypoints[:, 0]))
        queries.append(entry)
    report = {
        "checkpoint": predictor.checkpoint, "method": predictor.method, "device": str(predictor.device),
        "keypoint_names": list(names), "skeleton": [list(limb) for limb in skeleton],
        "coordinates": "image pixels (x right, y down) of the image as displayed (EXIF orientation applied)",
        "score": "cosine similarity of the keypoint's prototype and the query's feature at the prediction, in "
                 "[-1, 1] (higher is a closer match; low when the object is not there)",
        "supports": supports, "queries": queries,
    }
    path = os.path.join(out_dir, "predictions.json")
    write_json(path, report)
    return path

