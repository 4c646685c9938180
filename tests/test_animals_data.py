"""The real-photo animal benchmark of benchmarks/animals (built by its build.py):
its annotation files load, its parts split by category, its images are there
at the sizes the annotations give, and its keypoints lie in their images."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from escape_fast.data import DataWarning, load_coco, load_image

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "animals" / "data"
ANN = DATA / "annotations"
PARTS = ("val", "test")


def _load(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # nothing may be skipped
        return load_coco(ANN / f"animals_{name}.json")


@pytest.fixture(scope="module")
def coco():
    return {name: _load(name) for name in ("all", *PARTS)}


def test_parts_split_by_category(coco):
    names = {part: {c.name for c in coco[part].categories.values()} for part in PARTS}
    assert not names["val"] & names["test"]
    assert names["val"] | names["test"] == {c.name for c in coco["all"].categories.values()}
    assert sum(len(coco[p]) for p in PARTS) == len(coco["all"])
    for part in PARTS:  # a part is the whole file's instances of its categories, same ids
        ids = {c for c in coco[part].categories}
        assert [i.ann_id for i in coco[part].instances] == [
            i.ann_id for i in coco["all"].instances if i.category_id in ids]
    species = {p: {c.name.split("_")[0] for c in coco[p].categories.values()} for p in PARTS}
    assert species["val"] == species["test"] == {"fly", "mouse"}


def test_categories_and_instances(coco):
    raw = json.loads((ANN / "animals_all.json").read_text())
    for c in raw["categories"]:
        assert c["split"] in PARTS and (DATA / "LICENSES" / f"{c['name']}.txt").is_file()
        k = len(c["keypoints"])
        assert all(1 <= a <= k and 1 <= b <= k for a, b in c["skeleton"])  # 1-based, as in COCO
    by_cat = {}
    for inst in coco["all"].instances:
        by_cat[inst.category_id] = by_cat.get(inst.category_id, 0) + 1
        assert inst.visible.sum() >= 4 and set(np.unique(inst.flags)) <= {0, 2}
        assert np.all(inst.keypoints[~inst.visible] == 0)
    assert set(by_cat) == set(coco["all"].categories) and min(by_cat.values()) >= 10


def test_images_exist_at_their_size(coco):
    for info in coco["all"].images.values():
        assert info.file_name.split("/")[0] in {c.name for c in coco["all"].categories.values()}
        rgb = load_image(info.path, info.id, (info.width, info.height))  # raises on another size
        assert rgb.shape == (info.height, info.width, 3) and rgb.dtype == np.uint8


def test_keypoints_inside_images_and_boxes(coco):
    for inst in coco["all"].instances:
        xy = inst.keypoints[inst.visible]
        assert np.all((xy >= 0) & (xy < [inst.image.width, inst.image.height]))
    raw = json.loads((ANN / "animals_all.json").read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in raw["images"]}
    for a in raw["annotations"]:  # the box as written: the keypoints' padded extent, inside the image
        kps = np.asarray(a["keypoints"], dtype=float).reshape(-1, 3)
        xy = kps[kps[:, 2] > 0, :2]
        x, y, bw, bh = a["bbox"]
        w, h = sizes[a["image_id"]]
        assert a["num_keypoints"] == len(xy)
        assert np.all((xy >= [x, y]) & (xy <= [x + bw, y + bh]))
        assert x >= 0 and y >= 0 and x + bw <= w - 1 + 1e-6 and y + bh <= h - 1 + 1e-6
