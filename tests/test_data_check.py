"""python -m escape_fast.data.check: every problem kind planted in a copy of the fixture (or of a small
synthetic MP-100) is found, named and counted, and the exit code says whether the data set is usable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from escape_fast.data.check import check_dataset
from escape_fast.data.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("ESCAPE_FAST_FIXTURE", ROOT.parent / "shared" / "data" / "mp100_fixture"))
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"MP-100 fixture not found at {FIXTURE}")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "ESCAPE_FAST_NO_CUDA": "1"}


def _run(*args):
    return subprocess.run([sys.executable, "-m", "escape_fast.data.check", *map(str, args), "--quiet",
                           "--workers", "0"], env=ENV, capture_output=True, text=True, timeout=300, check=False)


def _edit(path: Path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@pytest.fixture
def fixture_copy(tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(FIXTURE, dst)
    return dst


def _kinds(report):
    return {(p.severity, p.kind): p for p in report.problems}


@needs_fixture
def test_the_fixture_is_usable():
    report = check_dataset(FIXTURE)
    assert report.usable and report.images == 53 and report.categories == 21
    assert not [p for p in report.problems if p.severity in ("error", "bad image", "dropped")]


@needs_fixture
def test_every_planted_problem_is_found(fixture_copy):
    ann = fixture_copy / "annotations"
    test = ann / "fixture_split1_test.json"
    data = json.loads(test.read_text())
    im0, im1 = data["images"][0], data["images"][1]
    a0, a1, a2, a3 = data["annotations"][:4]

    (fixture_copy / "images" / im0["file_name"]).unlink()  # a missing image
    (fixture_copy / "images" / im1["file_name"]).write_bytes(b"not an image")  # an undecodable one

    def plant(d):
        d["annotations"][0]["keypoints"] = d["annotations"][0]["keypoints"][:-3]  # one keypoint short
        d["annotations"][1]["bbox"] = [10_000, 10_000, 5, 5]  # a box wholly outside its image
        kps = d["annotations"][2]["keypoints"]
        j = next(i for i in range(0, len(kps), 3) if kps[i + 2] > 0)
        kps[j] = -40.0  # a visible keypoint left of the image
        d["annotations"].append(dict(d["annotations"][3]))  # a duplicate annotation id
        d["images"].append(dict(d["images"][2]))  # a duplicate image id
    _edit(test, plant)

    def rename(d):  # the same category with other keypoint names in another file
        cid = a3["category_id"]
        cat = next(c for c in d["categories"] if c["id"] == cid)
        cat["keypoints"] = [f"renamed_{n}" for n in cat["keypoints"]]
    _edit(ann / "fixture_all.json", rename)

    report = check_dataset(fixture_copy)
    kinds = _kinds(report)
    assert kinds["bad image", "missing image file"].id == im0["id"]
    assert kinds["bad image", "undecodable image"].id == im1["id"]
    assert kinds["error", "keypoint count differs from the category's"].id == a0["id"]
    assert kinds["dropped", "box with no area inside the image"].id == a1["id"]
    assert kinds["warning", "visible keypoint outside the image"].id == a2["id"]
    assert kinds["error", "duplicate annotation id"].id == a3["id"]
    assert kinds["error", "duplicate image id"].id == data["images"][2]["id"]
    assert kinds["error", "category differs between files"].id == a3["category_id"]
    assert not report.usable
    # the instances on the two bad images are what --bad-images skip would drop
    on_bad = sum(a["image_id"] in (im0["id"], im1["id"]) for a in data["annotations"])
    on_bad += sum(a["image_id"] in (im0["id"], im1["id"]) for a in
                  json.loads((ann / "fixture_all.json").read_text())["annotations"])
    assert 0 < report.dropped_instances <= on_bad


@needs_fixture
def test_wrong_image_size_and_unreadable_file(fixture_copy):
    ann = fixture_copy / "annotations"
    sizes = {}

    def resize(d):
        d["images"][0]["width"] += 7
        sizes["id"] = d["images"][0]["id"]
    _edit(ann / "fixture_split1_val.json", resize)
    (ann / "broken.json").write_text("{ not json")
    kinds = _kinds(check_dataset(fixture_copy))
    assert ("error", "unreadable annotation file") in kinds
    # the size disagrees with the image itself, and with the other files naming it
    assert ("bad image", "image size differs from the file's width / height") in kinds \
        or ("error", "image size differs between files") in kinds
    assert kinds["error", "image size differs between files"].id == sizes["id"]


@needs_fixture
def test_command_exit_codes_report_and_json(fixture_copy, tmp_path):
    ok = _run(fixture_copy, "--json", tmp_path / "ok.json")
    assert ok.returncode == 0, ok.stderr
    assert "usable: 0 error(s), 0 bad image(s)" in ok.stdout
    assert json.loads((tmp_path / "ok.json").read_text())["usable"] is True

    test = fixture_copy / "annotations" / "fixture_split1_test.json"
    first = json.loads(test.read_text())["images"][0]
    (fixture_copy / "images" / first["file_name"]).unlink()
    bad = _run(fixture_copy, "--json", tmp_path / "bad.json")
    assert bad.returncode == 2
    line = next(x for x in bad.stdout.splitlines() if "missing image file" in x)
    assert "bad image" in line and str(first["id"]) in line
    assert "--bad-images skip would drop" in bad.stdout
    report = json.loads((tmp_path / "bad.json").read_text())
    assert report["usable"] is False
    assert any(p["kind"] == "missing image file" and p["id"] == first["id"] for p in report["problems"])
    skip = _run(fixture_copy, "--bad-images", "skip")
    assert skip.returncode == 0 and "NOT usable" not in skip.stdout

    nothing = _run(tmp_path / "nowhere")
    assert nothing.returncode == 2 and "no annotations/ folder" in nothing.stderr
    assert len(nothing.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def small_mp100(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp100")
    generate(root, size="small", seed=2, progress=False, instances=2)
    return root


def test_mp100_counts_against_the_published_ones(small_mp100, tmp_path):
    report = check_dataset(small_mp100, images=False)
    assert report.usable and report.mp100["categories"] == 100
    assert report.mp100["splits"] == {s: {"train": 70, "val": 10, "test": 20} for s in range(1, 6)}
    assert "  split 3: 70 / 10 / 20 train / val / test categories (published 70 / 10 / 20)" in report.lines()

    root = tmp_path / "mp100"
    shutil.copytree(small_mp100 / "annotations", root / "annotations")
    (root / "annotations" / "mp100_split4_val.json").unlink()
    train, test = root / "annotations" / "mp100_split2_train.json", root / "annotations" / "mp100_split2_test.json"
    moved = json.loads(train.read_text())["annotations"][0]

    def leak(d):  # a training category's annotation in the test part
        d["annotations"].append({**moved, "id": 10**9})
        d["images"] += [im for im in json.loads(train.read_text())["images"] if im["id"] == moved["image_id"]]
        if all(c["id"] != moved["category_id"] for c in d["categories"]):
            d["categories"] += [c for c in json.loads(train.read_text())["categories"]
                                if c["id"] == moved["category_id"]]
    _edit(test, leak)
    report = check_dataset(root, images=False)
    kinds = _kinds(report)
    assert kinds["error", "missing MP-100 split file"].file == "mp100_split4_val.json"
    assert kinds["error", "category in two parts of a split"].id == moved["category_id"]
    assert not report.usable
    assert any("<- differs" in line for line in report.lines())
