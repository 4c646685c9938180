"""The synthetic benchmark: same seed -> same bytes, MP-100 layout and valid
COCO that the loader reads without skipping anything, splits like MP-100,
ground-truth parts consistent with the annotations, pixels that match the
keypoints (EXIF-rotated files included)."""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from escape_fast.data import (
    DataWarning,
    EpisodeSampler,
    KeypointDataset,
    load_coco,
    load_image,
    mp100_split_files,
    synthetic,
)
from escape_fast.data.synthetic import __main__ as synthetic_command


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(root / "a", seed=3, instances=3, progress=False)
    return root


def test_same_seed_same_bytes(bench, tmp_path):
    # in another process layout (2 workers) and another folder: same bytes
    synthetic_command.main(["--out", str(tmp_path / "b"), "--seed", "3", "--instances", "3", "--workers", "2", "--quiet"])
    a, b = _digest(bench / "a"), _digest(tmp_path / "b")
    assert len(a) == 100 * 3 + 15 + 1
    assert a == b
    # and another seed gives other images
    img, _, _ = synthetic.render_instance(synthetic._world(4)[1][0], 0, 4, 64)
    img3, _, _ = synthetic.render_instance(synthetic._world(3)[1][0], 0, 3, 64)
    assert not np.array_equal(img, img3)


def test_layout_coco_validity_and_splits(bench):
    root = bench / "a"
    parts = json.loads((root / "synthetic_parts.json").read_text())
    tests = []
    for split in range(1, 6):
        files = mp100_split_files(root, split)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DataWarning)  # nothing is skipped
            sets = {m: load_coco(p) for m, p in files.items()}
        n = {m: len(c.categories) for m, c in sets.items()}
        assert n == {"train": 70, "val": 10, "test": 20}
        ids = {m: set(c.categories) for m, c in sets.items()}
        assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
        fam = {c["id"]: c["family"] for c in parts["categories"]}
        # every family is both in the base and in the novel categories
        assert {fam[c] for c in ids["test"]} == {fam[c] for c in ids["train"]} == set(synthetic.FAMILY_NAMES)
        tests.append(ids["test"])
        for c in sets.values():
            assert len(c) == 3 * len(c.categories)
            for inst in c.instances:
                assert inst.image.file_name.startswith(c.categories[inst.category_id].name + "/")
            for cat in c.categories.values():
                meta = parts["categories"][cat.id - 1]
                assert meta["name"] == cat.name
                assert len(meta["keypoint_part_type"]) == len(meta["keypoint_super_keypoint"]) == cat.num_keypoints
                # left/right mates share the motif but not the super-keypoint
                for i, j in cat.flip_pairs:
                    assert meta["keypoint_part_type"][i] == meta["keypoint_part_type"][j]
                    assert meta["keypoint_super_keypoint"][i] != meta["keypoint_super_keypoint"][j]
                    assert {meta["keypoint_side"][i], meta["keypoint_side"][j]} == {"L", "R"}
                assert len(set(meta["keypoint_super_keypoint"])) == cat.num_keypoints
    # disjoint test categories over the five splits, covering all 100
    assert sum(len(t) for t in tests) == 100 and len(set().union(*tests)) == 100
    ks = [len(c["keypoint_part_type"]) for c in parts["categories"]]
    assert min(ks) >= 3 and max(ks) <= 40 and len(set(ks)) > 5


def test_file_formats_and_loading_through_the_pipeline(bench):
    root = bench / "a"
    coco = load_coco(root / "annotations" / "mp100_split1_train.json")
    formats = {}
    for im in coco.images.values():
        with Image.open(im.path) as pil:
            formats.setdefault((pil.format, pil.mode, 0x0112 in pil.getexif()), im.path)
    kinds = set(formats)
    assert ("JPEG", "RGB", False) in kinds and ("PNG", "RGB", False) in kinds
    assert any(m == "L" for _, m, _ in kinds) or any(m == "RGBA" for _, m, _ in kinds)
    ds = KeypointDataset(coco, input_size=64)
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and item["keypoints"].shape[0] == coco.max_keypoints


def test_pixels_match_the_annotation_even_when_exif_rotated(tmp_path):
    """The file on disk decodes (EXIF applied) to the rendered image."""
    world = synthetic._world(0)[1]
    cat = world[0]
    img, kps, bbox = synthetic.render_instance(cat, 1, 0, 96)
    for exif in (False, True):
        data, ext = synthetic._encode(img, "jpg", exif)
        with Image.open(io.BytesIO(data)) as raw:
            assert (0x0112 in raw.getexif()) == exif
        path = tmp_path / f"{exif}.{ext}"
        path.write_bytes(data)
        back = load_image(str(path), 1, (96, 96))
        assert np.abs(back.astype(int) - img.astype(int)).mean() < 8  # JPEG loss only
    vis = kps[:, 2] > 0
    assert vis.any() and np.all(kps[~vis, :2] == 0)
    x, y, w, h = bbox
    assert 0 <= x and 0 <= y and x + w <= 96 and y + h <= 96


def test_small_size_is_protocol_ready():
    """The default small size has enough instances for 5-shot episodes."""
    assert synthetic.SIZES["small"]["instances"] >= 5 + 15
    assert synthetic.SIZES["small"]["image_size"] == 128


def test_generated_benchmark_runs_episodes(tmp_path):
    synthetic.generate(tmp_path, seed=1, instances=6, progress=False)
    coco = load_coco(tmp_path / "annotations" / "mp100_split2_test.json")
    s = EpisodeSampler(coco, shots=1, queries=5, draws=2, seed=0)
    assert len(s) == 40
