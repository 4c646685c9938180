"""Prediction on real photographs (the MP-100 fixture) and every bad input of issue 7.

Support and query are different instances of one fixture category; the model
is the built-in checkpoint (tiny backbone, 128 px), so each test takes a
second or two on one CPU core.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from escape_fast import builtin
from escape_fast.data import DataError, DataWarning, Episode, load_coco
from escape_fast.data.coco import Category
from escape_fast.errors import UsageError
from escape_fast.eval.engine import predict_episodes
from escape_fast.predict import MIN_SIDE, Predictor, load_keypoints, parse_keypoints
from escape_fast.predict.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("ESCAPE_FAST_FIXTURE", ROOT.parent / "shared" / "data" / "mp100_fixture"))
pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"MP-100 fixture not found at {FIXTURE}")

ALL = FIXTURE / "annotations" / "fixture_all.json"
IMAGES = FIXTURE / "images" / "human_body"
SUPPORT = IMAGES / "000000000785.jpg"  # annotation 1, the file's only one on this image
QUERY = IMAGES / "000000040083.jpg"  # annotations 2 and 3: other people
QUERY2 = IMAGES / "000000197388.jpg"


@pytest.fixture(scope="module")
def predictor():
    return Predictor(device="cpu").adapt(str(SUPPORT), str(ALL))


def _simple_file(tmp_path, name="kp.json", **fields):
    data = {"names": ["a", "b", "c"], "keypoints": [[300, 100], [350, 200], [400, 300]], **fields}
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


# --------------------------------------------------------------------------
# the command on real photographs
# --------------------------------------------------------------------------
def test_command_writes_json_and_drawings_for_real_photographs(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "escape_fast.predict", "--support", str(SUPPORT), "--support-keypoints", str(ALL),
           "--query", str(QUERY), str(QUERY2), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "predictions.json").read_text())
    cat = load_coco(ALL).categories[1]
    assert report["keypoint_names"] == list(cat.keypoints) and report["method"] == "mle"
    assert report["checkpoint"] == builtin.PHOTO_MODEL  # the default model for photographs
    assert report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert report["skeleton"] == [list(limb) for limb in cat.limbs()]
    assert [q["image"] for q in report["queries"]] == [str(QUERY), str(QUERY2)]
    for q in report["queries"]:
        image = np.asarray(Image.open(q["image"]).convert("RGB"))
        h, w = image.shape[:2]
        # no box given: the box the search found (inside the image), and the predictions inside its crop
        bx, by, bw, bh = q["box"]
        assert 0 <= bx and 0 <= by and bw > 0 and bh > 0 and bx + bw <= w and by + bh <= h
        points = q["keypoints"]
        assert [p["name"] for p in points] == list(cat.keypoints)
        xy = np.array([[p["x"], p["y"]] for p in points])
        assert np.isfinite(xy).all() and all(-1 <= p["score"] <= 1 for p in points)
        half = 1.25 * max(bw, bh) / 2 + 1
        assert (np.abs(xy - [bx + bw / 2, by + bh / 2]) <= half).all()
        drawn = np.asarray(Image.open(out / q["drawing"]).convert("RGB"))
        assert drawn.shape == image.shape and (drawn != image).any()
    support_png = out / report["supports"][0]["drawing"]
    assert Image.open(support_png).size == Image.open(SUPPORT).size


def test_predictor_matches_the_evaluation_path(predictor):
    """Support and query cropped to their annotated boxes: the same
    predictions as the evaluation's episode of that pair."""
    coco = load_coco(ALL)
    rows = {inst.ann_id: i for i, inst in enumerate(coco.instances)}
    box = next(a["bbox"] for a in json.loads(ALL.read_text())["annotations"] if a["id"] == 2)  # as written
    # the built-in model's three methods, and the default photo model (MLE with its location prior)
    for checkpoint, method in (("builtin", "mle"), ("builtin", "map"), ("builtin", "escape"), (None, "mle")):
        p = Predictor(checkpoint, method=method, device="cpu").adapt(str(SUPPORT), str(ALL))
        got = p.predict([str(QUERY)], boxes=[box])[0].keypoints
        want = predict_episodes(p.model, coco, [Episode(1, 0, (rows[1],), (rows[2],))], method)[0][0, :17]
        np.testing.assert_allclose(got, want.double().numpy(), atol=1e-3, err_msg=f"{checkpoint} {method}")


def test_batches_arrays_and_several_supports_agree(predictor, tmp_path):
    one = [predictor.predict(str(q))[0].keypoints for q in (QUERY, QUERY2, QUERY)]
    batched = Predictor(device="cpu", batch_size=2).adapt(str(SUPPORT), str(ALL))
    arrays = [np.asarray(Image.open(q).convert("RGB")) for q in (QUERY, QUERY2, QUERY)]
    many = batched.predict(arrays)
    for a, b in zip(one, many):
        np.testing.assert_allclose(a, b.keypoints, atol=1e-3)
    assert many[0].image == "query #0"
    boxed = predictor.predict([str(QUERY)], boxes=[np.array([10, 20, 200, 150])])[0]  # numpy ints are numbers
    assert boxed.ok and boxed.box.tolist() == [10, 20, 199, 149]
    # two shots (5-shot works the same way): the keypoint file names the annotations
    two = Predictor(device="cpu").adapt([str(SUPPORT), str(IMAGES / "000000196141.jpg")],
                                        [str(ALL), f"{ALL}#4"])
    assert two.names == predictor.names and two.prototypes.shape == predictor.prototypes.shape
    assert not torch.allclose(two.prototypes, predictor.prototypes)
    assert two.predict(str(QUERY))[0].ok


def test_default_device_model_and_run_dir(tmp_path):
    p = Predictor()
    assert p.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert p.checkpoint == builtin.PHOTO_MODEL and p.method == "mle" and p.model.config.location_prior > 0
    assert Predictor("builtin").checkpoint == builtin.checkpoint_path() and Predictor("builtin").method == "escape"
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(builtin.checkpoint_path(), run / "model.pt")
    assert Predictor(run, method="map").checkpoint == str(run / "model.pt")
    with pytest.raises(ValueError, match="does not exist"):
        Predictor(tmp_path / "empty_run")


# --------------------------------------------------------------------------
# the keypoint file
# --------------------------------------------------------------------------
def test_simple_keypoint_format():
    kps = parse_keypoints({"names": ["nose", "eye", "ear", "tail"], "keypoints": [[1, 2], [3, 4, 2], [5, 6, 0], None],
                           "skeleton": [["nose", "eye"], [1, 2]], "bbox": [0, 0, 10, 10]})
    assert kps.names == ("nose", "eye", "ear", "tail")
    assert kps.visible.tolist() == [True, True, False, False]
    assert kps.keypoints[:2].tolist() == [[1, 2], [3, 4]] and kps.skeleton == ((0, 1), (1, 2))
    assert kps.box.tolist() == [0, 0, 10, 10]
    assert parse_keypoints({"keypoints": [[1, 2], [3, 4]]}).names == ("0", "1")


def test_coco_skeleton_one_or_zero_based():
    assert Category(1, "x", ("a", "b", "c"), ((1, 2), (2, 3))).limbs() == ((0, 1), (1, 2))
    assert Category(1, "x", ("a", "b", "c"), ((0, 1), (1, 2))).limbs() == ((0, 1), (1, 2))
    kps = load_keypoints(ALL, SUPPORT)
    assert kps.source == f"{ALL}#1" and kps.visible.sum() == 17 and kps.box is not None


@pytest.mark.parametrize("content, message", [
    ("{not json", "malformed JSON"),
    ('[1, 2]', "expected an object with a 'keypoints' list"),
    ('{"keypoints": []}', "non-empty list"),
    ('{"keypoints": [[1, "x"]]}', "keypoint 0 .* expected"),
    ('{"keypoints": [[1, 2, 5]]}', "v 0, 1 or 2"),
    ('{"keypoints": [[1, 2]], "names": ["a", "b"]}', "2 names for 1 keypoints"),
    ('{"keypoints": [[1, 2], [3, 4]], "names": ["a", "a"]}', "distinct"),
    ('{"keypoints": [[1, 2]], "skeleton": [[0, 3]]}', "skeleton limb"),
    ('{"keypoints": [[1, 2]], "box": [0, 0, -1, 5]}', "not positive"),
    ('{"keypoints": [[1, 2]], "skeletn": []}', "unknown field"),
])
def test_malformed_keypoint_file_names_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        load_keypoints(path)
    assert str(path) in str(err.value)


def test_keypoint_file_errors_on_the_command_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"keypoints": [[1, "x"]]}')
    rc = main(["--support", str(SUPPORT), "--support-keypoints", str(bad), "--query", str(QUERY),
               "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 2 and str(bad) in capsys.readouterr().err
    rc = main(["--support", str(SUPPORT), "--support-keypoints", str(tmp_path / "missing.json"), "--query",
               str(QUERY), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 2 and "missing.json: keypoint file not found" in capsys.readouterr().err


def test_coco_file_with_several_annotations_asks_for_an_id(tmp_path):
    with pytest.raises(DataError, match=r"4 of them on image '000000196141.jpg'; name one as .*#ANNOTATION_ID"):
        load_keypoints(ALL, IMAGES / "000000196141.jpg")
    with pytest.raises(DataError, match="no usable annotation id 999"):
        load_keypoints(f"{ALL}#999")


# --------------------------------------------------------------------------
# bad supports
# --------------------------------------------------------------------------
def test_support_keypoints_outside_the_image(tmp_path):
    w, h = Image.open(SUPPORT).size
    path = _simple_file(tmp_path, keypoints=[[300, 100], [w + 50, 200], [400, 300]])
    with pytest.raises(DataError, match=rf"outside the {w} x {h} image: 'b' at \({w + 50}, 200\)") as err:
        Predictor(device="cpu").adapt(str(SUPPORT), str(path))
    assert str(SUPPORT) in str(err.value) and str(path) in str(err.value)


def test_support_keypoints_outside_the_box(tmp_path):
    # some outside the crop of the box: left out of the support with a warning naming them
    path = _simple_file(tmp_path, box=[280, 50, 60, 60])
    with pytest.warns(DataWarning, match=r"2 of 3 visible keypoint\(s\) outside the crop of box .*'b' at"):
        predictor = Predictor(device="cpu").adapt(str(SUPPORT), str(path))
    assert predictor.known.tolist() == [True, False, False]
    result = predictor.predict([str(QUERY)])[0]
    assert np.isfinite(result.keypoints[0]).all() and np.isnan(result.keypoints[1:]).all()
    # all of them outside: nothing to adapt to, an error
    path = _simple_file(tmp_path, "far.json", box=[20, 20, 40, 40])
    with pytest.raises(DataError, match="3 of 3 visible keypoint.*outside the crop of box .* give a box that holds") \
            as err:
        Predictor(device="cpu").adapt(str(SUPPORT), str(path))
    assert str(path) in str(err.value)


def test_support_without_a_visible_keypoint(tmp_path):
    path = _simple_file(tmp_path, keypoints=[None, [1, 2, 0], None])
    with pytest.raises(DataError, match="no visible keypoint") as err:
        Predictor(device="cpu").adapt(str(SUPPORT), str(path))
    assert str(path) in str(err.value)


def test_missing_or_corrupt_support_image(tmp_path):
    path = _simple_file(tmp_path)
    with pytest.raises(DataError, match="nope.jpg: image file not found"):
        Predictor(device="cpu").adapt(str(tmp_path / "nope.jpg"), str(path))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(SUPPORT.read_bytes()[:300])
    with pytest.raises(DataError, match="corrupt.jpg: cannot decode image"):
        Predictor(device="cpu").adapt(str(corrupt), str(path))


def test_supports_with_different_keypoints(tmp_path):
    other = _simple_file(tmp_path, "other.json", names=["a", "b", "z"])
    with pytest.raises(DataError, match="differ from those of"):
        Predictor(device="cpu").adapt([str(SUPPORT), str(SUPPORT)], [str(_simple_file(tmp_path)), str(other)])


def test_tiny_support_image_is_refused_by_name(tmp_path):
    tiny = tmp_path / "tiny_support.png"
    Image.new("RGB", (40, MIN_SIDE - 1)).save(tiny)
    kps = tmp_path / "kp.json"
    kps.write_text(json.dumps({"names": ["a", "b"], "keypoints": [[5, 5], [20, 20]]}))
    with pytest.raises(DataError, match=f"tiny_support.png: the image is 40 x {MIN_SIDE - 1} pixels"):
        Predictor(device="cpu").adapt(str(tiny), str(kps))


# --------------------------------------------------------------------------
# bad queries: an error for that query, results for the others
# --------------------------------------------------------------------------
def test_bad_queries_get_errors_and_the_others_results(predictor, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(QUERY.read_bytes()[:500])
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (MIN_SIDE - 1, 40)).save(tiny)
    missing = tmp_path / "missing.jpg"
    queries = [str(QUERY), str(missing), str(corrupt), str(tiny), str(QUERY2)]
    results = predictor.predict(queries)
    assert [r.ok for r in results] == [True, False, False, False, True]
    assert "missing.jpg: image file not found" in results[1].error
    assert "corrupt.jpg: cannot decode image" in results[2].error
    assert f"tiny.png: the image is {MIN_SIDE - 1} x 40 pixels" in results[3].error
    np.testing.assert_allclose(results[0].keypoints, predictor.predict(str(QUERY))[0].keypoints, atol=1e-3)
    with pytest.raises(DataError, match="missing.jpg"):
        predictor.predict([str(missing)], raise_errors=True)
    small_box = predictor.predict([str(QUERY)], boxes=[[10, 10, 3, 30]])[0]
    assert "smaller than" in small_box.error


def test_bad_query_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "missing.jpg"
    rc = main(["--support", str(SUPPORT), "--support-keypoints", str(ALL), "--query", str(missing), str(QUERY),
               "--out", str(out), "--device", "cpu"])
    assert rc == 1 and "missing.jpg: image file not found" in capsys.readouterr().err
    report = json.loads((out / "predictions.json").read_text())
    assert "error" in report["queries"][0] and "keypoints" not in report["queries"][0]
    assert (out / report["queries"][1]["drawing"]).is_file()


# --------------------------------------------------------------------------
# queries without a box, scores
# --------------------------------------------------------------------------
def test_query_without_a_box_is_found_and_scored(predictor, tmp_path):
    """The default model finds the object in a query given without a box:
    the box it decodes lies around the annotated person, and its keypoints'
    scores (cosine similarities) fall when the object is not there."""
    coco = load_coco(ALL)
    truth = next(inst for inst in coco.instances if inst.ann_id == 1)  # the support itself, as a query
    found = predictor.predict([str(SUPPORT)])[0]
    x, y, w, h = found.box
    cx, cy = truth.bbox[0] + truth.bbox[2] / 2, truth.bbox[1] + truth.bbox[3] / 2
    assert x <= cx <= x + w and y <= cy <= y + h  # the found box holds the person's centre
    assert found.box[2] * found.box[3] < 0.8 * truth.image.width * truth.image.height  # not the whole image
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((240, 320, 3), 127, dtype=np.uint8)).save(blank)
    empty = predictor.predict([str(blank)])[0]
    assert np.nanmean(empty.scores) < np.nanmean(found.scores) - 0.2
    assert np.all(np.abs(found.scores[np.isfinite(found.scores)]) <= 1 + 1e-6)


def test_feature_batches_shrink_with_the_input_on_the_cpu():
    from escape_fast.distributed import inference_batch_size

    cpu = torch.device("cpu")
    assert [inference_batch_size(cpu, s) for s in (128, 256, 448, 2048)] == [16, 4, 1, 1]
    assert inference_batch_size(torch.device("cuda"), 256) == 32
    assert Predictor(device="cpu").batch_size == 4 and Predictor(device="cpu", batch_size=7).batch_size == 7


def test_search_refits_the_box_to_the_keypoints_of_a_small_object():
    """A person a third of a large photograph's height, pasted on another
    photograph: the search's vote box is coarse; refitted to the decoded
    keypoints (the support's box placed by a similarity, widened by
    REFIT_MARGIN), the box lies on the person's, and the keypoints land."""
    from escape_fast.predict.predictor import REFIT_MARGIN, box_iou

    coco = load_coco(ALL)
    support = next(inst for inst in coco.instances if inst.ann_id == 1)
    image = np.asarray(Image.open(SUPPORT).convert("RGB"))
    x, y, w, h = support.bbox
    x0, y0 = max(0, int(x - 0.3 * w)), max(0, int(y - 0.3 * h))
    patch = Image.fromarray(image[y0:min(image.shape[0], int(y + 1.3 * h)), x0:min(image.shape[1], int(x + 1.3 * w))])
    tiger = next(i for i in coco.instances if "tiger" in i.image.file_name).image.file_name
    canvas = Image.open(FIXTURE / "images" / tiger).convert("RGB").resize((1600, 1200))
    scale = 0.35 * 1200 / patch.height
    canvas.paste(patch.resize((round(patch.width * scale), round(patch.height * scale))), (900, 300))
    truth = (support.keypoints - [x0, y0]) * scale + [900, 300]
    tw, th = w * scale * REFIT_MARGIN, h * scale * REFIT_MARGIN
    cx, cy = (x - x0 + w / 2) * scale + 900, (y - y0 + h / 2) * scale + 300
    true_box = [cx - tw / 2, cy - th / 2, tw, th]
    ious = {}
    for refits in (0, 2):
        p = Predictor(device="cpu", search_refits=refits).adapt(str(SUPPORT), str(ALL))
        found = p.predict([np.asarray(canvas)])[0]
        ious[refits] = box_iou(found.box, true_box)
        if refits:
            miss = np.linalg.norm(found.keypoints - truth, axis=1)[support.visible]
            assert (miss < 0.2 * max(w, h) * scale).mean() >= 0.9
    assert ious[2] >= 0.8 and ious[2] > ious[0] + 0.1, ious


def test_search_settings_are_checked():
    with pytest.raises(UsageError, match="search_scales"):
        Predictor(device="cpu", search_scales=())
    with pytest.raises(UsageError, match="search_refits"):
        Predictor(device="cpu", search_refits=-1)


def test_bad_search_scale_on_the_command_line(tmp_path, capsys):
    rc = main(["--support", str(SUPPORT), "--support-keypoints", str(ALL), "--query", str(QUERY),
               "--out", str(tmp_path / "out"), "--device", "cpu", "--search-scales", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "search_scales" in err and len(err.strip().splitlines()) == 1
