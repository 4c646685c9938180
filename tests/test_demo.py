"""The demo page (python -m escape_fast.demo): its API over HTTP, and the page in a real browser.

One server runs for the whole module (a subprocess on a free port, serving
the default photo model, the built-in checkpoint ("synthetic") and, as a
--checkpoint, a perturbed copy of it without a matching network). Every prediction it returns is checked against
escape_fast.Predictor / ``python -m escape_fast.predict`` on the same input.

The browser tests drive Debian's chromium (/usr/bin/chromium, or
$ESCAPE_FAST_CHROMIUM) with Playwright's Python package; without either they
skip and say why. ESCAPE_FAST_DEMO_SCREENSHOT=docs/demo.png makes the sample
test save the README's screenshot.
"""

from __future__ import annotations

import io
import json
import os
import queue
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fly_video import FLIES, FLY, needs_video

from escape_fast import builtin
from escape_fast.drawing import keypoint_colors
from escape_fast.predict import Predictor, parse_keypoints, write_outputs

pytest.importorskip("starlette", reason="the demo extra is not installed: pip install -e '.[demo]'")
pytest.importorskip("uvicorn", reason="the demo extra is not installed: pip install -e '.[demo]'")

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("ESCAPE_FAST_FIXTURE", ROOT.parent / "shared" / "data" / "mp100_fixture"))
ALL = FIXTURE / "annotations" / "fixture_all.json"
IMAGES = FIXTURE / "images" / "human_body"
SUPPORT = IMAGES / "000000000785.jpg"  # annotation 1: 17 visible keypoints
SUPPORT2 = IMAGES / "000000196141.jpg"  # annotation 4: another person, some keypoints not visible
QUERY = IMAGES / "000000040083.jpg"
SAMPLES = ROOT / "escape_fast" / "demo" / "samples"
CHROMIUM = os.environ.get("ESCAPE_FAST_CHROMIUM", "/usr/bin/chromium")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-proxy-server"]
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"MP-100 fixture not found at {FIXTURE}")
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the server is local: never a proxy


# --------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------
@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    checkpoint: Path  # the second model's run folder

    def log_lines(self, text: str) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if text in line]


def _perturbed_checkpoint(run: Path) -> Path:
    """The built-in model without its location prior, with its super-keypoints perturbed and no
    matching network: a second model whose predictions differ and which offers mle and map only."""
    obj = torch.load(builtin.checkpoint_path(), map_location="cpu", weights_only=True)
    obj.pop("matcher"), obj.pop("matcher_extractor")
    gen = torch.Generator().manual_seed(0)
    obj["config"] = {**obj["config"], "location_prior": 0.0}
    obj["super_keypoints"] = obj["super_keypoints"] * (1 + 0.2 * torch.randn(obj["super_keypoints"].shape,
                                                                            generator=gen))
    run.mkdir(parents=True)
    torch.save(obj, run / "model.pt")
    return run


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    run = _perturbed_checkpoint(tmp / "perturbed")
    log = tmp / "server.log"
    cmd = [sys.executable, "-m", "escape_fast.demo", "--port", "0", "--device", "cpu",
           "--checkpoint", str(run), "--max-upload-mb", "4"]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=tmp,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        first = lines.get(timeout=180)
    except queue.Empty:
        first = ""
    match = re.search(r"http://\S+/", first)
    if not match:
        proc.kill()
        pytest.fail(f"the demo server did not start: {first!r}\n{log.read_text()[-3000:]}")
    yield Server(match.group(0), proc, log, run)
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def call(server: Server, path: str, body=None, raw: bytes | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of a GET, or of a POST of JSON ``body`` or of ``raw`` bytes."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url.rstrip("/") + path, data=data)
    try:
        with OPENER.open(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def upload(server: Server, path: Path | None = None, data: bytes | None = None,
           name: str | None = None) -> dict:
    status, answer = call(server, f"/api/images?name={name or path.name}", raw=data or path.read_bytes())
    assert status == 200, answer
    return answer


def alive(server: Server):
    assert server.proc.poll() is None, "the server exited"
    assert call(server, "/api/info")[0] == 200


def annotation(ann_id: int) -> dict:
    """A fixture annotation in the simple keypoint format (what the page sends)."""
    coco = json.loads(ALL.read_text())
    ann = next(a for a in coco["annotations"] if a["id"] == ann_id)
    cat = next(c for c in coco["categories"] if c["id"] == ann["category_id"])
    k = ann["keypoints"]
    return {"names": cat["keypoints"],
            "skeleton": [[a, b] for a, b in cat["skeleton"]],  # 0-based in MP-100's file
            "keypoints": [[k[i], k[i + 1]] if k[i + 2] > 0 else None for i in range(0, len(k), 3)]}


def expected(supports, keypoints, queries, method=None, checkpoint=None, boxes=None) -> list:
    """Predictions of escape_fast.Predictor itself on the image files."""
    p = Predictor(checkpoint, method, device="cpu")
    p.adapt([str(s) for s in supports], [parse_keypoints(kp) for kp in keypoints])
    return p.predict([str(q) for q in queries], boxes)


def coords(query: dict) -> np.ndarray:
    return np.array([[np.nan if p["x"] is None else p["x"], np.nan if p["y"] is None else p["y"]]
                     for p in query["keypoints"]], dtype=np.float64)


def scores(query: dict) -> np.ndarray:
    return np.array([np.nan if p["score"] is None else p["score"] for p in query["keypoints"]],
                    dtype=np.float64)


# --------------------------------------------------------------------------
# the API
# --------------------------------------------------------------------------
def test_info_lists_models_methods_and_samples(server):
    status, info = call(server, "/api/info")
    assert status == 200
    models = {m["name"]: m for m in info["models"]}
    assert list(models) == ["photos", "synthetic", "perturbed"]
    assert models["photos"]["methods"] == ["mle"] and models["photos"]["checkpoint"] == builtin.PHOTO_MODEL
    assert models["synthetic"]["methods"] == ["mle", "map", "escape"]
    assert models["synthetic"]["default_method"] == "escape"
    assert models["synthetic"]["checkpoint"] == builtin.checkpoint_path()
    assert models["perturbed"]["methods"] == ["mle", "map"]  # no matching network: no escape
    assert info["device"] == "cpu"
    assert info["samples"]["queries"] == [f"/samples/query-{n}.jpg" for n in (1, 2, 3)]
    with OPENER.open(server.url + "samples/support.json") as r:  # served as shipped
        assert json.loads(r.read()) == json.loads((SAMPLES / "support.json").read_text())


def test_bundled_samples_are_a_support_and_queries():
    """The shipped samples: a support whose keypoint file predict reads, and queries it predicts."""
    kps = parse_keypoints(json.loads((SAMPLES / "support.json").read_text()), "support.json")
    assert len(kps) == 12 and kps.visible.all() and kps.box is None and len(kps.skeleton) == 11
    queries = sorted(SAMPLES.glob("query-*.jpg"))
    assert [q.name for q in queries] == ["query-1.jpg", "query-2.jpg", "query-3.jpg"]
    results = Predictor(device="cpu").adapt(str(SAMPLES / "support.jpg"), kps).predict([str(q) for q in queries])
    assert all(r.ok and np.isfinite(r.keypoints).all() for r in results)


@needs_fixture
def test_predictions_are_predicts_json(server, tmp_path):
    """The answer of /api/predict is predict's predictions.json for the same support and query
    (write_outputs on Predictor's results), with the uploads' names and no drawings."""
    kp = annotation(1)
    s, q = upload(server, SUPPORT), upload(server, QUERY)
    status, adapted = call(server, "/api/adapt", {"supports": [{"image": s["id"], "keypoints": kp}]})
    assert status == 200, adapted
    assert adapted["keypoint_names"] == kp["names"] and adapted["method"] == "mle"  # the default model's
    status, report = call(server, "/api/predict",
                          {"token": adapted["token"], "queries": [{"image": q["id"]}]})
    assert status == 200, report

    p = Predictor(device="cpu").adapt(str(SUPPORT), parse_keypoints(kp, "000000000785.json"))
    with open(write_outputs(p, p.predict([str(QUERY)]), str(tmp_path))) as f:
        want = json.load(f)
    assert list(report) == list(want)  # the same keys, in the same order
    for key in ("checkpoint", "method", "device", "keypoint_names", "skeleton", "coordinates", "score"):
        assert report[key] == want[key], key
    (rs,), (ws,) = report["supports"], want["supports"]
    assert rs == {**ws, "image": "000000000785.jpg", "drawing": None}
    (rq,), (wq,) = report["queries"], want["queries"]
    assert list(rq) == list(wq) and rq["image"] == "000000040083.jpg" and rq["drawing"] is None
    assert rq["box"] == wq["box"]  # no box given: the box the predictor's search found, the same
    assert [p["name"] for p in rq["keypoints"]] == kp["names"]
    np.testing.assert_allclose(coords(rq), coords(wq), atol=1e-6)
    np.testing.assert_allclose(scores(rq), scores(wq), atol=1e-6)


@needs_fixture
def test_methods_and_models_switch_on_one_support(server):
    """One support token, every model x method: each answer is that Predictor's, and they differ."""
    kp = annotation(1)
    s, q = upload(server, SUPPORT), upload(server, QUERY)
    token = call(server, "/api/adapt", {"supports": [{"image": s["id"], "keypoints": kp}]})[1]["token"]
    got = {}
    for model, checkpoint, methods in (("photos", None, ("mle",)), ("synthetic", "builtin", ("mle", "map", "escape")),
                                       ("perturbed", server.checkpoint, ("mle", "map"))):
        for method in methods:
            status, report = call(server, "/api/predict", {"token": token, "model": model, "method": method,
                                                           "queries": [{"image": q["id"]}]})
            assert status == 200, report
            assert report["method"] == method
            assert report["checkpoint"] == {None: builtin.PHOTO_MODEL, "builtin": builtin.checkpoint_path()}.get(
                checkpoint, str(checkpoint) + "/model.pt")
            want = expected([SUPPORT], [kp], [QUERY], method, checkpoint)[0]
            got[model, method] = coords(report["queries"][0])
            np.testing.assert_allclose(got[model, method], want.keypoints, atol=1e-4,
                                       err_msg=f"{model} {method}")
    values = list(got.values())
    # every model x method pair predicts visibly differently
    assert all(np.abs(a - b).max() > 1 for i, a in enumerate(values) for b in values[i + 1:])
    status, answer = call(server, "/api/predict", {"token": token, "model": "perturbed", "method": "escape",
                                                   "queries": [{"image": q["id"]}]})
    assert status == 400 and answer["error"] == "model 'perturbed' has no method 'escape'; it has mle, map"


@needs_fixture
def test_sessions_do_not_mix_supports(server):
    """Three users' support sets (two 1-shot, one 2-shot) predicted in interleaved, concurrent requests:
    each answer is its own support's prediction."""
    kp1, kp4 = annotation(1), annotation(4)
    s1, s4, q = upload(server, SUPPORT), upload(server, SUPPORT2), upload(server, QUERY)
    sessions = {
        "a": ([SUPPORT], [kp1], [{"image": s1["id"], "keypoints": kp1}]),
        "b": ([SUPPORT2], [kp4], [{"image": s4["id"], "keypoints": kp4}]),
        "ab": ([SUPPORT, SUPPORT2], [kp1, kp4], [{"image": s1["id"], "keypoints": kp1},
                                                 {"image": s4["id"], "keypoints": kp4}]),
    }
    tokens, want = {}, {}
    for name, (images, kps, supports) in sessions.items():
        status, answer = call(server, "/api/adapt", {"model": "synthetic", "method": "mle", "supports": supports})
        assert status == 200, answer
        tokens[name] = answer["token"]
        for method in ("mle", "escape"):
            want[name, method] = expected(images, kps, [QUERY], method, "builtin")[0].keypoints
    assert len(set(tokens.values())) == 3
    assert np.nanmax(np.abs(want["a", "mle"] - want["b", "mle"])) > 1  # a mix would show

    jobs = [(name, method) for _ in range(2) for name in sessions for method in ("mle", "escape")]

    def run(job):
        name, method = job
        status, report = call(server, "/api/predict", {"token": tokens[name], "model": "synthetic", "method": method,
                                                       "queries": [{"image": q["id"]}]})
        assert status == 200, report
        return job, report

    with ThreadPoolExecutor(4) as pool:
        for (name, method), report in pool.map(run, jobs):
            assert len(report["supports"]) == len(sessions[name][0])
            np.testing.assert_allclose(coords(report["queries"][0]), want[name, method], atol=1e-4,
                                       err_msg=f"session {name}, {method}")


@needs_fixture
def test_bad_inputs_get_one_line_and_the_server_keeps_running(server):
    kp = annotation(1)
    s, q = upload(server, SUPPORT), upload(server, QUERY)
    token = call(server, "/api/adapt", {"supports": [{"image": s["id"], "keypoints": kp}]})[1]["token"]
    outside = {**kp, "keypoints": [[700, 20]] + kp["keypoints"][1:]}
    cases = [
        ("/api/images?name=notes.txt", b"these are notes, not an image", 400,
         "notes.txt: cannot decode image"),
        ("/api/images?name=empty.jpg", b"", 400, "empty.jpg: the file is empty"),
        ("/api/images?name=huge.jpg", b"\0" * (5 << 20), 413, "over the server's limit of 4 MiB"),
        ("/api/keypoints?name=kp.json", b"{nope", 400, "kp.json: malformed JSON"),
        ("/api/keypoints?name=kp.json", b'{"keypoints": [[1, 2]], "names": ["a", "b"]}', 400,
         "kp.json: 2 names for 1 keypoints"),
        ("/api/adapt", b"not json", 400, "the request is not JSON"),
        ("/api/adapt", {"supports": [{"image": s["id"], "keypoints": {**kp, "keypoints": [None] * 17}}]}, 400,
         "000000000785.jpg: no keypoint placed; click on the image to place at least one"),
        ("/api/adapt", {"supports": [{"image": s["id"], "keypoints": outside}]}, 400,
         ("000000000785.jpg with keypoints 000000000785.json: keypoint(s) outside the 640 x 425 image: "
          "'nose' at (700, 20)")),
        ("/api/adapt", {"supports": []}, 400, "no support image"),
        ("/api/adapt", {"supports": [{"image": "gone", "keypoints": kp}]}, 410, "image gone is no longer"),
        ("/api/predict", {"token": "forged", "queries": [{"image": q["id"]}]}, 410,
         "support set is no longer"),
        ("/api/predict", {"token": token, "queries": []}, 400, "no query image"),
        ("/api/predict", {"token": token, "model": "resnet", "queries": [{"image": q["id"]}]}, 400,
         "unknown model 'resnet'; this server has photos, synthetic, perturbed"),
    ]
    for path, body, status, message in cases:
        raw = body if isinstance(body, bytes) else None
        got, answer = call(server, path, None if raw is not None else body, raw=raw)
        assert (got, message in answer.get("error", "")) == (status, True), (path, answer)
        assert "\n" not in answer["error"]
        assert len(server.log_lines(message)) == 1, (message, server.log.read_text()[-2000:])
        alive(server)
    # a query that cannot be cropped gets its error in the report; the other query is predicted
    status, report = call(server, "/api/predict", {"token": token, "queries": [
        {"image": q["id"], "box": [900, 900, 50, 50]}, {"image": q["id"], "box": [30, 100, 190, 190]}]})
    assert status == 200, report
    bad, good = report["queries"]
    assert bad == {"image": "000000040083.jpg", "error": "000000040083.jpg: box [900.0, 900.0, 50.0, 50.0] "
                                                         "has no area inside the 500 x 333 image"}
    assert good["box"][:2] == [30.0, 100.0] and np.isfinite(coords(good)).all()
    assert len(server.log_lines("query 000000040083.jpg: 000000040083.jpg: box [900.0")) == 1


@needs_fixture
def test_large_image_is_shown_downscaled_and_predicted_in_full(server, tmp_path):
    big = tmp_path / "big.jpg"
    small = Image.open(QUERY).convert("RGB")
    small.resize((small.width * 8, small.height * 8), Image.Resampling.BICUBIC).save(big, quality=80)
    info = upload(server, big)
    assert (info["width"], info["height"]) == (4000, 2664)
    assert (info["display_width"], info["display_height"]) == (1600, 1066)
    with OPENER.open(server.url + f"api/images/{info['id']}") as r:
        assert Image.open(io.BytesIO(r.read())).size == (1600, 1066)
    kp = annotation(1)
    s = upload(server, SUPPORT)
    token = call(server, "/api/adapt", {"supports": [{"image": s["id"], "keypoints": kp}]})[1]["token"]
    status, report = call(server, "/api/predict", {"token": token, "queries": [{"image": info["id"]}]})
    assert status == 200, report
    (q,) = report["queries"]
    x, y, w, h = q["box"]  # found in the full-resolution image, beyond the 1600 px shown
    assert 0 <= x and 0 <= y and x + w <= 4000 and y + h <= 2664 and (x + w > 1600 or y + h > 1066)
    np.testing.assert_allclose(coords(q), expected([SUPPORT], [kp], [big])[0].keypoints, atol=1e-4)


# --------------------------------------------------------------------------
# the page in a browser
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no browser: {CHROMIUM} not found (apt-get install chromium, or set "
                    "ESCAPE_FAST_CHROMIUM)")
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright's Python package is not installed (pip install playwright)")
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        except PlaywrightError as e:  # a chromium Playwright cannot drive
            pytest.skip(f"{CHROMIUM} does not start under Playwright: {str(e).splitlines()[0]}")
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1600, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(60_000)
    page.goto(server.url)
    page.wait_for_selector("body[data-ready]")
    yield page
    context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


def idle(page):
    page.wait_for_function("!document.body.dataset.busy")


def saved_json(page, selector: str, tmp_path: Path) -> tuple[Path, dict]:
    """Click a download button; (the file as saved under its suggested name, its JSON)."""
    with page.expect_download() as info:
        page.click(selector)
    download = info.value
    path = tmp_path / download.suggested_filename
    download.save_as(path)
    return path, json.loads(path.read_text())


def message(page) -> str:
    page.wait_for_selector("#message:not([hidden])")
    return page.inner_text("#message")


class SupportCanvas:
    """Image pixels to page positions on the support canvas, as the page scales it."""

    def __init__(self, page):
        canvas = page.locator("#support-canvas")
        canvas.wait_for(state="visible")
        self.page, self.box = page, canvas.bounding_box()
        self.sx = float(canvas.get_attribute("data-scale-x"))
        self.sy = float(canvas.get_attribute("data-scale-y"))

    def at(self, x, y):
        return self.box["x"] + x * self.sx, self.box["y"] + y * self.sy

    def click(self, x, y, **kw):
        self.page.mouse.click(*self.at(x, y), **kw)


def table_xy(page, row: int):
    cells = page.locator(f"#keypoint-table tbody tr:nth-child({row + 1}) td.num").all_inner_texts()
    return None if cells[1] == "—" else (float(cells[1]), float(cells[2]))


@needs_fixture
def test_browser_annotate_predict_and_download_match_the_predict_command(server, page, tmp_path):
    ann = np.array(annotation(1)["keypoints"], dtype=np.float64)  # 17 x 2, all visible
    page.set_input_files("#support-file", str(SUPPORT))
    canvas = SupportCanvas(page)
    assert 0.9 < canvas.sx < 3  # shown about full size: the clicks below do not land on earlier points
    for x, y in ann:
        canvas.click(x, y)
    assert page.locator("#keypoint-table tbody tr").count() == 17
    tol = 1 / canvas.sx + 0.01  # a click lands on a canvas pixel
    for r in range(17):
        assert np.abs(np.array(table_xy(page, r)) - ann[r]).max() <= tol, r

    # name a keypoint, link two, drag one, take one off and place it again
    page.fill("#keypoint-table tbody tr:nth-child(1) input", "nose")
    page.press("#keypoint-table tbody tr:nth-child(1) input", "Enter")
    page.keyboard.down("Shift")
    canvas.click(*ann[0])
    canvas.click(*ann[1])
    page.keyboard.up("Shift")
    assert page.inner_text("#skeleton") == "nose–1"
    page.mouse.move(*canvas.at(*ann[16]))
    page.mouse.down()
    page.mouse.move(*canvas.at(ann[16, 0] + 12, ann[16, 1] + 8), steps=4)
    page.mouse.up()
    moved = np.array(table_xy(page, 16))
    assert np.abs(moved - (ann[16] + [12, 8])).max() <= 2 * tol
    canvas.click(*ann[15], button="right")
    assert table_xy(page, 15) is None
    canvas.click(*ann[15])  # the next click places the keypoint taken off
    assert np.abs(np.array(table_xy(page, 15)) - ann[15]).max() <= tol

    # the object's box, dragged around the person (annotated box: 280.8, 44.7, 218.7 x 346.7)
    page.click("#box-mode")
    page.mouse.move(*canvas.at(270, 35))
    page.mouse.down()
    page.mouse.move(*canvas.at(510, 400), steps=4)
    page.mouse.up()

    kp_path, kp = saved_json(page, "#save-keypoints", tmp_path)
    assert kp_path.name == "000000000785.json" and kp["image"] == "000000000785.jpg"
    assert kp["names"] == ["nose"] + [str(i) for i in range(1, 17)] and kp["skeleton"] == [[0, 1]]
    xy = np.array(kp["keypoints"])
    assert np.abs(np.delete(xy, 16, 0) - np.delete(ann, 16, 0)).max() <= tol and (xy[16] == moved).all()
    assert np.abs(np.array(kp["box"]) - [270, 35, 240, 365]).max() <= 2 * tol

    page.set_input_files("#query-files", str(QUERY))
    page.wait_for_selector(".query-card[data-state=ready]")
    page.click("#predict")
    page.wait_for_selector(".query-card[data-state=done]")
    idle(page)
    assert page.locator(".query-card table.predictions tbody tr").count() == 17
    _, report = saved_json(page, "#download", tmp_path)

    # the page drew each keypoint in its colour where it was predicted: checked at the centre of every
    # point inside the image that no later (upper) point covers
    pred = coords(report["queries"][0])
    qsx = float(page.locator(".query-card canvas").get_attribute("data-scale-x"))
    inside = (pred >= 0).all(1) & (pred < [500, 333]).all(1)
    clear = [r for r in range(17) if inside[r] and all(np.hypot(*(pred[r] - pred[t])) * qsx > 12
                                                        for t in range(r + 1, 17))]
    assert clear
    rgb = page.evaluate("""(points) => {
        const c = document.querySelector('.query-card canvas'), d = window.devicePixelRatio || 1;
        const sx = +c.dataset.scaleX, sy = +c.dataset.scaleY, ctx = c.getContext('2d');
        const at = ([x, y]) => ctx.getImageData(Math.round(x * sx * d), Math.round(y * sy * d), 1, 1).data;
        return points.map((p) => Array.from(at(p)).slice(0, 3));
    }""", pred[clear].tolist())
    assert rgb == keypoint_colors(17)[clear].tolist()  # the colours of predict's drawings

    # the same support file, query and method through python -m escape_fast.predict
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "escape_fast.predict", "--support", str(SUPPORT),
                           "--support-keypoints", str(kp_path), "--query", str(QUERY), "--out", str(out),
                           "--device", "cpu", "--method", report["method"]],
                          check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = json.loads((out / "predictions.json").read_text())
    assert list(report) == list(want)
    for key in ("checkpoint", "method", "device", "keypoint_names", "skeleton", "coordinates", "score"):
        assert report[key] == want[key], key
    assert report["supports"][0]["box"] == want["supports"][0]["box"]
    # the drawn box was cropped (cleaned as escape_fast.data.coco cleans boxes)
    assert np.abs(np.array(want["supports"][0]["box"]) - kp["box"]).max() <= 1
    assert report["supports"][0]["keypoints"] == kp_path.name
    (rq,), (wq,) = report["queries"], want["queries"]
    assert list(rq) == list(wq) and rq["box"] == wq["box"]
    np.testing.assert_allclose(coords(rq), coords(wq), atol=1e-3)
    np.testing.assert_allclose(scores(rq), scores(wq), atol=1e-3)

    # the other model, another method, a third model: predicted again, and the results change
    page.select_option("#model", "synthetic")
    idle(page)
    _, mle = saved_json(page, "#download", tmp_path)
    assert mle["method"] == "mle" and mle["checkpoint"] == builtin.checkpoint_path()
    assert np.abs(coords(mle["queries"][0]) - coords(rq)).max() > 1
    page.select_option("#method", "escape")
    idle(page)
    _, escape = saved_json(page, "#download", tmp_path)
    assert escape["method"] == "escape" and np.abs(coords(escape["queries"][0]) - coords(mle["queries"][0])).max() > 1
    page.select_option("#method", "mle")
    idle(page)
    page.select_option("#model", "perturbed")
    idle(page)
    assert page.locator("#method option").all_inner_texts() == ["mle", "map"]
    _, other = saved_json(page, "#download", tmp_path)
    assert other["checkpoint"] == str(server.checkpoint / "model.pt") and other["method"] == "mle"
    assert np.abs(coords(other["queries"][0]) - coords(mle["queries"][0])).max() > 1
    assert "mle with the perturbed model, 1-shot, on cpu: 1 of 1 queries" in page.inner_text("#result-status")


@needs_fixture
def test_browser_bad_inputs_show_a_message(server, page, tmp_path):
    page.click("#predict")
    assert "Add a support image" in message(page)

    page.set_input_files("#support-file", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                                   "buffer": b"not an image"}])
    assert message(page).startswith("notes.txt: cannot decode image")
    assert page.locator("#support-tabs button").count() == 0
    assert len(server.log_lines("refused: notes.txt: cannot decode image")) >= 1

    page.set_input_files("#support-file", str(SUPPORT))
    page.wait_for_selector("#support-canvas:not([hidden])")
    page.click("#predict")
    assert message(page) == "Add one or more query images."

    big = tmp_path / "big.jpg"
    small = Image.open(QUERY).convert("RGB")
    small.resize((small.width * 8, small.height * 8), Image.Resampling.BICUBIC).save(big, quality=80)
    page.set_input_files("#query-files", str(big))
    page.wait_for_selector(".query-card[data-state=ready]")
    assert "4000 x 2664 px (shown at 1600 x 1066, predicted in full)" in page.inner_text(".query-card .size")
    shown = page.locator(".query-card canvas").bounding_box()
    assert shown["width"] < 800  # fits the page

    page.click("#predict")
    assert message(page) == "000000000785.jpg: no keypoint placed; click on the image to place at least one"

    outside = {**annotation(1), "keypoints": [[700, 20]] + annotation(1)["keypoints"][1:]}
    page.set_input_files("#keypoints-file", files=[{"name": "outside.json", "mimeType": "application/json",
                                                     "buffer": json.dumps(outside).encode()}])
    page.wait_for_function("document.querySelectorAll('#keypoint-table tbody tr').length === 17")
    page.click("#predict")
    assert "keypoint(s) outside the 640 x 425 image: 'nose' at (700, 20)" in message(page)

    page.set_input_files("#keypoints-file", files=[{"name": "broken.json", "mimeType": "application/json",
                                                     "buffer": b"{broken"}])
    assert message(page).startswith("broken.json: malformed JSON")

    page.set_input_files("#keypoints-file", files=[{"name": "good.json", "mimeType": "application/json",
                                                     "buffer": json.dumps(annotation(1)).encode()}])
    page.wait_for_function("document.querySelector('#keypoint-table tbody td.num:nth-child(4)').textContent"
                           " === '367.0'")
    page.click("#predict")
    page.wait_for_selector(".query-card[data-state=done]")
    idle(page)
    _, report = saved_json(page, "#download", tmp_path)
    x, y, w, h = report["queries"][0]["box"]  # predicted at full resolution
    assert 0 <= x and 0 <= y and x + w <= 4000 and y + h <= 2664 and (x + w > 1600 or y + h > 1066)
    alive(server)

    # the sample replaces this work rather than mixing with it
    page.click("#use-sample")
    page.wait_for_function("document.querySelectorAll('.query-card[data-state=done]').length === 3")
    idle(page)
    assert page.locator("#support-tabs button").all_inner_texts() == ["1: support.jpg"]
    assert page.locator(".query-card").count() == 3


def test_browser_sample_two_shots_and_screenshot(server, page, tmp_path):
    page.click("#use-sample")
    page.wait_for_function("document.querySelectorAll('.query-card[data-state=done]').length === 3")
    idle(page)
    status = page.inner_text("#result-status")
    assert "mle with the photos model, 1-shot, on cpu: 3 of 3 queries" in status
    shot = os.environ.get("ESCAPE_FAST_DEMO_SCREENSHOT")
    if shot:
        page.screenshot(path=shot)
    # a box drawn on the first query: predicted again inside it
    card = page.locator(".query-card").first
    card.locator(".box-mode").click()
    box = card.locator("canvas").bounding_box()
    sx = float(card.locator("canvas").get_attribute("data-scale-x"))
    page.mouse.move(box["x"] + 40 * sx, box["y"] + 30 * sx)
    page.mouse.down()
    page.mouse.move(box["x"] + 200 * sx, box["y"] + 230 * sx, steps=4)
    page.mouse.up()
    idle(page)
    _, boxed = saved_json(page, "#download", tmp_path)
    assert np.abs(np.array(boxed["queries"][0]["box"]) - [40, 30, 160, 200]).max() <= 1.5 / sx + 1
    for q in boxed["queries"][1:]:  # no box drawn: the predictor's search found one in the 256 x 256 image
        x, y, w, h = q["box"]
        assert 0 <= x and 0 <= y and 0 < w and 0 < h and x + w <= 256 and y + h <= 256

    _, kp = saved_json(page, "#save-keypoints", tmp_path)
    sample = json.loads((SAMPLES / "support.json").read_text())
    assert kp["names"] == sample["names"] and kp["skeleton"] == sample["skeleton"]
    assert kp["keypoints"] == [p[:2] for p in sample["keypoints"]]

    # a second support (one of the sample queries) with three of the keypoints placed: a 2-shot support
    page.set_input_files("#support-file", str(SAMPLES / "query-3.jpg"))
    page.wait_for_selector("#support-tabs button.current:text('2: query-3.jpg')")
    canvas = SupportCanvas(page)
    for x, y in ((125, 60), (120, 100), (118, 140)):
        canvas.click(x, y)
    assert [table_xy(page, r) is not None for r in range(4)] == [True, True, True, False]
    page.click("#predict")
    idle(page)
    assert "2-shot" in page.inner_text("#result-status")
    _, report = saved_json(page, "#download", tmp_path)
    assert [s["image"] for s in report["supports"]] == ["support.jpg", "query-3.jpg"]
    assert len(report["queries"]) == 3 and all("error" not in q for q in report["queries"])


# --------------------------------------------------------------------------
# videos
# --------------------------------------------------------------------------
TRACK_FILES = {".json", ".escape_fast.h5", ".escape_fast.csv", ".analysis.h5", ".trajectories.png", ".labeled.webm"}


@pytest.fixture(scope="module")
def fly_clip(tmp_path_factory):
    """The first 16 frames of the fly video, as a small mp4 (what a user uploads)."""
    av = pytest.importorskip("av")
    if not FLIES.is_file():
        pytest.skip(f"fly video not found at {FLIES}")
    from escape_fast.data.video import open_frames

    path = tmp_path_factory.mktemp("clip") / "flies.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=15)
        stream.width, stream.height, stream.pix_fmt = 384, 384, "yuv420p"
        for _, frame in open_frames(FLIES).frames(0, 16):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def wait_for_job(server, job: str, seconds: float = 300) -> dict:
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        status, answer = call(server, f"/api/track/{job}")
        assert status == 200, answer
        if answer["state"] != "running":
            return answer
        time.sleep(0.3)
    pytest.fail(f"tracking job {job} still running after {seconds} s")


@needs_video
def test_video_tracking_gives_the_track_commands_files(server, fly_clip, tmp_path):
    """Upload a video, annotate its frame 0, track it: the job's files are those of
    ``python -m escape_fast.track`` on the same video and keypoints, with the same keypoints."""
    from escape_fast.track.__main__ import main as track_main

    status, video = call(server, "/api/videos?name=flies.mp4", raw=fly_clip.read_bytes())
    assert status == 200, video
    assert (video["frames"], video["width"], video["height"]) == (16, 384, 384)
    status, frame = call(server, f"/api/videos/{video['id']}/frames/0", {})
    assert status == 200 and (frame["width"], frame["height"]) == (384, 384), frame
    status, adapted = call(server, "/api/adapt", {"supports": [{"image": frame["id"], "keypoints": FLY}]})
    assert status == 200, adapted
    status, started = call(server, "/api/track", {"token": adapted["token"], "video": video["id"]})
    assert status == 200, started
    done = wait_for_job(server, started["job"])
    assert done["state"] == "done", done
    assert done["summary"]["frames"] == 16
    names = {f["name"] for f in done["files"]}
    assert names == {"flies" + s for s in TRACK_FILES}, names
    url = next(f["url"] for f in done["files"] if f["name"] == "flies.json")
    with OPENER.open(server.url.rstrip("/") + url) as r:
        page_json = json.loads(r.read())
    kp = tmp_path / "fly.json"
    kp.write_text(json.dumps(FLY))
    assert track_main([str(fly_clip), "--support-frame", "0", "--support-keypoints", str(kp), "--out",
                       str(tmp_path / "cli"), "--no-video", "--device", "cpu"]) == 0
    cli_json = json.loads((tmp_path / "cli" / "flies.json").read_text())
    assert [f["keypoints"] for f in page_json["frames"]] == [f["keypoints"] for f in cli_json["frames"]]
    # bad input: a frame past the end, a file that is not a video, an unknown job
    status, answer = call(server, f"/api/videos/{video['id']}/frames/99", {})
    assert status == 400 and "flies.mp4: frame 99 is past the end" in answer["error"], answer
    status, answer = call(server, "/api/videos?name=notes.mp4", raw=b"not a video at all")
    assert status == 400 and answer["error"].startswith("notes.mp4: not a readable video"), answer
    assert call(server, "/api/track/nope")[0] == 404
    alive(server)


@needs_video
def test_browser_tracks_a_video_from_an_annotated_frame(server, page, fly_clip, tmp_path):
    kp = tmp_path / "fly.json"
    kp.write_text(json.dumps(FLY))
    page.set_input_files("#video-file", str(fly_clip))
    page.wait_for_function("document.querySelector('#video-status').textContent.includes('16 frames')")
    page.click("#annotate-frame")
    SupportCanvas(page)  # the frame is shown as the support to annotate
    page.set_input_files("#keypoints-file", str(kp))
    page.wait_for_function("document.querySelectorAll('#keypoint-table tbody tr').length === 6")
    page.click("#track")
    page.wait_for_selector("body[data-tracked]", timeout=300_000)
    assert "16 frames tracked" in page.inner_text("#video-status")
    links = page.locator("#track-files a").all_inner_texts()
    assert set(links) == {"flies" + s for s in TRACK_FILES}
    # the labelled video plays in the page: the browser decodes its first frame
    page.wait_for_function("document.querySelector('#track-video').readyState >= 2")
    assert page.eval_on_selector("#track-video", "v => v.videoWidth") == 384
