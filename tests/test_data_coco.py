"""Loading MP-100-format annotations: the real fixture end to end, and every
bad input of issue 4 point 6 (small broken files built in tmp_path)."""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from escape_fast.data import (
    DataError,
    DataWarning,
    EpisodeSampler,
    KeypointDataset,
    drop_unreadable_images,
    load_coco,
    load_image,
    make_loader,
    mp100_split_files,
)

FIXTURE = Path("/work/shared/data/mp100_fixture")
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"MP-100 fixture not found at {FIXTURE}")


# --------------------------------------------------------------------------
# the real fixture
# --------------------------------------------------------------------------
@needs_fixture
def test_fixture_loads_end_to_end():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # the fixture is clean: nothing skipped
        all_ = load_coco(FIXTURE / "annotations" / "fixture_all.json")
        parts = {m: load_coco(FIXTURE / "annotations" / f"fixture_split1_{m}.json") for m in ("train", "val", "test")}
    assert len(all_) == 63 and len(all_.categories) == 21 and len(all_.images) == 53
    assert [len(parts[m]) for m in ("train", "val", "test")] == [43, 8, 12]
    assert [len(parts[m].categories) for m in ("train", "val", "test")] == [13, 3, 5]
    # disjoint categories across train / val / test, together all of them
    ids = [set(parts[m].categories) for m in ("train", "val", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert ids[0] | ids[1] | ids[2] == set(all_.categories)
    assert all_.max_keypoints == 106  # face_lapa
    assert [i.ann_id for i in all_.instances] == sorted(i.ann_id for i in all_.instances)
    # annotation 2 (human_body): 11 v=2, 3 v=1, 3 v=0 -> 14 visible
    inst = next(i for i in all_.instances if i.ann_id == 2)
    assert inst.visible.sum() == 14 and inst.keypoints.shape == (17, 2)
    assert np.all(inst.keypoints[~inst.visible] == 0)
    np.testing.assert_allclose(inst.bbox, [38.08, 110.95, 173.71, 173.71])  # mmpose's w - 1
    # invisible keypoints stored as (-1, -1, 0) in face_lapa are zeroed
    lapa = [i for i in all_.instances if all_.categories[i.category_id].name == "face_lapa"]
    assert all(np.all(i.keypoints[~i.visible] == 0) for i in lapa)


@needs_fixture
def test_fixture_images_decode_to_rgb_of_the_annotated_size():
    coco = load_coco(FIXTURE / "annotations" / "fixture_all.json")
    modes = {}
    for im in coco.images.values():
        with Image.open(im.path) as pil:
            modes[pil.mode] = im.path
    assert {"RGB", "L", "P"} <= set(modes)  # JPEG colour + grayscale, palette PNG
    for mode, path in modes.items():
        im = next(i for i in coco.images.values() if i.path == path)
        rgb = load_image(path, im.id, (im.width, im.height))
        assert rgb.dtype == np.uint8 and rgb.shape == (im.height, im.width, 3)
    gray = load_image(modes["L"])
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])


@needs_fixture
def test_fixture_dataset_and_loader_with_workers():
    coco = load_coco(FIXTURE / "annotations" / "fixture_split1_test.json")
    ds = KeypointDataset(coco, input_size=128, train=True, num_keypoints=110)
    item = ds[0]
    assert item["image"].shape == (3, 128, 128) and item["image"].dtype == torch.float32
    assert item["target"].shape == (110, 32, 32) and item["target_weight"].shape == (110,)
    kc = coco.categories[item["category_id"]].num_keypoints
    assert item["keypoint_mask"].sum() == kc
    assert torch.all(item["target_weight"][kc:] == 0) and torch.all(item["target"][kc:] == 0)
    assert torch.all(item["target_weight"][~item["visible"]] == 0)
    loader = make_loader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    assert sum(len(b["ann_id"]) for b in batches) == len(coco)
    assert batches[0]["image"].shape == (4, 3, 128, 128)
    # workers give the same crops as the main process
    torch.testing.assert_close(batches[0]["image"][0], ds[0]["image"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="below the largest category"):
        KeypointDataset(coco, num_keypoints=5)


@needs_fixture
def test_mp100_split_files(tmp_path):
    with pytest.raises(DataError, match="mp100_split1_train.json"):
        mp100_split_files(FIXTURE, 1)
    with pytest.raises(DataError, match="splits 1..5"):
        mp100_split_files(FIXTURE, 6)
    (tmp_path / "annotations").mkdir()
    for m in ("train", "val", "test"):
        (tmp_path / "annotations" / f"mp100_split3_{m}.json").write_text("{}")
    files = mp100_split_files(tmp_path, 3)
    assert files["val"] == tmp_path / "annotations" / "mp100_split3_val.json"


# --------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------
def _dataset(tmp_path, n_ann=3, size=(40, 30)):
    """A valid tiny dataset: one category of 3 keypoints, one image per annotation."""
    (tmp_path / "annotations").mkdir(exist_ok=True)
    (tmp_path / "images" / "thing").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(1, n_ann + 1):
        name = f"thing/{i}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / "images" / name)
        images.append({"id": i, "file_name": name, "width": size[0], "height": size[1]})
        anns.append({
            "id": 100 + i, "image_id": i, "category_id": 7, "bbox": [5, 4, 20, 15],
            "keypoints": [10, 8, 2, 15, 10, 1, 0, 0, 0], "num_keypoints": 2,
        })
    cats = [{"id": 7, "name": "thing", "keypoints": ["a", "b", "c"], "skeleton": [[1, 2]], "flip_pairs": [[0, 2]]}]
    return {"images": images, "annotations": anns, "categories": cats}


def _write(tmp_path, doc, name="bad.json") -> Path:
    path = tmp_path / "annotations" / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_valid_tiny_dataset_loads(tmp_path):
    coco = load_coco(_write(tmp_path, _dataset(tmp_path)))
    assert len(coco) == 3
    assert coco.categories[7].flip_permutation().tolist() == [2, 1, 0]
    np.testing.assert_array_equal(coco.instances[0].visible, [True, True, False])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("annotations"), "no 'annotations' list"),
        (lambda d: d.__setitem__("images", {}), "'images' is a dict"),
        (lambda d: d["annotations"][1].pop("bbox"), "annotation id 102 has no 'bbox'"),
        (lambda d: d["annotations"][1].pop("id"), "annotation #1 \\(no id\\) has no 'id'"),
        (lambda d: d["annotations"][0].pop("keypoints"), "annotation id 101 has no 'keypoints'"),
        (lambda d: d["annotations"][2].__setitem__("keypoints", [1, 2, 2] * 4), "annotation id 103: 'keypoints' has 12"),
        (lambda d: d["annotations"][2].__setitem__("bbox", [1, 2, 3]), "annotation id 103: 'bbox' has 3 values"),
        (lambda d: d["annotations"][2].__setitem__("bbox", "box"), "annotation id 103: field 'bbox' has type str"),
        (lambda d: d["annotations"][0].__setitem__("keypoints", [1, 1, 3] * 3), "annotation id 101: visibility flags"),
        (lambda d: d["annotations"][0].__setitem__("image_id", 99), "annotation id 101 refers to unknown image id 99"),
        (lambda d: d["annotations"][0].__setitem__("category_id", 3), "annotation id 101 refers to unknown category"),
        (lambda d: d["annotations"][2].__setitem__("id", 101), "duplicate annotation id 101"),
        (lambda d: d["images"][1].__setitem__("id", 1), "duplicate image id 1"),
        (lambda d: d["categories"].append(copy.deepcopy(d["categories"][0])), "duplicate category id 7"),
        (lambda d: d["images"][0].pop("width"), "image id 1 has no 'width'"),
        (lambda d: d["images"][0].__setitem__("height", 0), "image id 1 .*size 40 x 0"),
        (lambda d: d["categories"][0].pop("keypoints"), "category id 7 has no 'keypoints'"),
        (lambda d: d["categories"][0].__setitem__("flip_pairs", [[0, 3]]), "category id 7 .*flip pair"),
        (lambda d: d["annotations"][0].__setitem__("bbox", [1, float("nan"), 3, 4]), "annotation id 101: 'bbox' holds NaN"),
    ],
)
def test_bad_annotation_file_raises_naming_file_and_id(tmp_path, mutate, message):
    doc = _dataset(tmp_path)
    mutate(doc)
    path = _write(tmp_path, doc)
    with pytest.raises(DataError, match=message) as err:
        load_coco(path)
    assert str(path) in str(err.value)


def test_malformed_json_and_missing_file(tmp_path):
    _dataset(tmp_path)
    path = _write(tmp_path, '{"images": [], "annotations": [')
    with pytest.raises(DataError, match="malformed JSON") as err:
        load_coco(path)
    assert str(path) in str(err.value)
    with pytest.raises(DataError, match="top level is a list"):
        load_coco(_write(tmp_path, "[]"))
    with pytest.raises(DataError, match="annotation file not found"):
        load_coco(tmp_path / "annotations" / "nope.json")


def test_missing_image_raises_or_is_skipped(tmp_path):
    doc = _dataset(tmp_path)
    (tmp_path / "images" / "thing" / "2.png").unlink()
    path = _write(tmp_path, doc)
    with pytest.raises(DataError, match="image id 2 \\(annotation id 102\\): image file not found") as err:
        load_coco(path)
    assert "thing/2.png" in str(err.value)
    with pytest.warns(DataWarning, match="skipped 1 annotation.*1 missing image file \\(annotation ids 102\\)"):
        coco = load_coco(path, on_missing_image="skip")
    assert [i.ann_id for i in coco.instances] == [101, 103]


def test_corrupt_image_raises_at_decode_naming_file_and_id(tmp_path):
    doc = _dataset(tmp_path)
    (tmp_path / "images" / "thing" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    good = tmp_path / "images" / "thing" / "3.png"
    good.write_bytes(good.read_bytes()[:60])  # truncated
    coco = load_coco(_write(tmp_path, doc))
    ds = KeypointDataset(coco, input_size=32)
    ds[0]
    # an item carries its error (a worker's exception would reach the main process as a traceback) ...
    assert re.search(r"image id 2 .*thing/2.png.*cannot decode.*\(annotation id 102\)$", ds[1]["error"])
    assert re.search(r"image id 3 .*thing/3.png.*cannot decode", ds[2]["error"])
    # ... and the loader raises it, one line, in the main process, with or without workers
    for workers in (0, 2):
        with pytest.raises(DataError, match=r"^image id 2 .*thing/2.png.*cannot decode[^\n]*annotation id 102\)$"):
            list(make_loader(ds, batch_size=3, num_workers=workers))
    kept, messages = drop_unreadable_images(coco, workers=2)
    assert [i.ann_id for i in kept.instances] == [101] and len(messages) == 2
    assert kept.skipped["unreadable image"] == 2 and "thing/2.png" in messages[0]


def test_image_of_another_size_raises(tmp_path):
    doc = _dataset(tmp_path)
    doc["images"][0]["width"] = 41
    coco = load_coco(_write(tmp_path, doc))
    with pytest.raises(DataError, match="image id 1 .*decoded size 40 x 30 .* differs from the annotation's 41 x 30"):
        next(iter(make_loader(KeypointDataset(coco, input_size=32), num_workers=0)))


def test_bad_boxes_and_empty_keypoints_are_skipped_and_counted(tmp_path):
    doc = _dataset(tmp_path, n_ann=6)
    a = doc["annotations"]
    a[0]["bbox"] = [50, 40, 10, 10]  # wholly outside the 40 x 30 image
    a[1]["bbox"] = [-30, 5, 20, 10]  # left of the image (mmpose would keep it)
    a[2]["bbox"] = [5, 5, 0, 10]  # zero width
    a[3]["keypoints"] = [0] * 9  # every keypoint zero
    a[4]["bbox"] = [-5, -5, 20, 15]  # partly outside: clipped, kept
    with pytest.warns(DataWarning) as rec:
        coco = load_coco(_write(tmp_path, doc))
    msg = str(rec[0].message)
    assert "skipped 4 annotation(s)" in msg
    assert "3 box with no area inside the image (annotation ids 101, 102, 103)" in msg
    assert "1 no visible keypoint (annotation ids 104)" in msg
    assert coco.skipped == {"box with no area inside the image": 3, "no visible keypoint": 1}
    assert [i.ann_id for i in coco.instances] == [105, 106]
    np.testing.assert_allclose(coco.instances[0].bbox, [0, 0, 14, 9])  # x2 = -5 + 20 - 1


def test_too_few_instances_for_episodes(tmp_path):
    coco = load_coco(_write(tmp_path, _dataset(tmp_path, n_ann=3)))
    with pytest.raises(DataError, match="fewer than S \\+ Q = 4 instances: id 7 \\('thing', 3\\)") as err:
        EpisodeSampler(coco, shots=1, queries=3, draws=2)
    assert str(tmp_path) in str(err.value)
    with pytest.warns(DataWarning, match="1 category has fewer than S \\+ Q = 4.*skipped"):
        sampler = EpisodeSampler(coco, shots=1, queries=3, draws=2, too_few="skip")
    assert len(sampler) == 0 and sampler.skipped_categories == [7]
    assert len(EpisodeSampler(coco, shots=1, queries=2, draws=2)) == 2


def test_exif_orientation_is_honoured(tmp_path):
    # the displayed image is 30 wide and 20 high with a white pixel at (x=25, y=3)
    display = np.zeros((20, 30, 3), np.uint8)
    display[3, 25] = 255
    stored = Image.fromarray(display).transpose(Image.Transpose.ROTATE_90)  # 20 x 30 on disk
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    stored.save(tmp_path / "r.png", exif=exif.tobytes())
    rgb = load_image(str(tmp_path / "r.png"), 1, (30, 20))
    assert rgb.shape == (20, 30, 3)
    np.testing.assert_array_equal(rgb, display)
    # grayscale + alpha and RGBA PNGs become RGB
    Image.fromarray(np.full((4, 5, 4), 200, np.uint8), "RGBA").save(tmp_path / "a.png")
    Image.fromarray(np.full((4, 5, 2), 90, np.uint8), "LA").save(tmp_path / "la.png")
    assert load_image(str(tmp_path / "a.png")).shape == (4, 5, 3)
    assert np.all(load_image(str(tmp_path / "la.png")) == 90)
