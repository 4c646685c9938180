"""The demo's server: one page, a small JSON API, and escape_fast.Predictor behind it.

    python -m escape_fast.demo [--port 8000] [--host 127.0.0.1] [--checkpoint RUN_DIR ...] [--device auto]

Everything the page shows goes through the same code as ``python -m
escape_fast.predict``: images are decoded by escape_fast.data.load_image (EXIF
orientation applied), keypoint files are read by
escape_fast.data.keypoint_file.parse_keypoints, supports and queries go through
Predictor.adapt / Predictor.predict, and the predictions are the JSON that
escape_fast.predict.write_outputs writes, with the uploads' file names as
image names and ``"drawing": null`` (the page draws).

API (JSON in and out; errors are ``{"error": one line, "code": ...}`` with a
4xx status, and the server logs one line for each):

    GET  /api/info                  models, their methods, the device, the bundled samples
    POST /api/images?name=F         the raw bytes of an image file -> {"id", "name", "width", "height",
                                    "display_width", "display_height"}: decoded once, kept for later calls
    GET  /api/images/ID             that image as the page shows it: a JPEG of at most --display-size
                                    pixels a side (large photos are shown downscaled, predicted in full)
    POST /api/keypoints?name=F      the text of a keypoint file -> it, read by parse_keypoints
    POST /api/adapt                 {"model", "method", "supports": [{"image": ID, "keypoints": {simple
                                    format}}]} -> {"token", "keypoint_names", "skeleton", "supports"}
    POST /api/predict               {"token", "model", "method", "queries": [{"image": ID, "box": null |
                                    [x, y, w, h]}]} -> predictions.json of escape_fast.predict
    POST /api/videos?name=F         the bytes of a video file -> {"id", "name", "frames", "fps", "width",
                                    "height"}: kept on the server's disk for tracking
    POST /api/videos/ID/frames/N    frame N of that video as an image to annotate -> as /api/images
    POST /api/track                 {"token", "model", "method", "video": ID} -> {"job"}: tracks the
                                    whole video in the background (escape_fast.track's code and files)
    GET  /api/track/JOB             {"state": running | done | error, "phase", "done", "total", "error",
                                    "summary", "files": [{"name", "url"}]}
    GET  /api/track/JOB/files/NAME  one of the job's files (the labelled .webm plays in the page)

Users do not share supports: /api/adapt stores a support set under a random
token, and /api/predict names the token. One Predictor per model is loaded at
start-up and shared; a lock per model guards it, and it adapts again only when
the token or the method differs from its last adaptation.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import secrets
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from escape_fast.data import load_image
from escape_fast.data.keypoint_file import KeypointSet, parse_keypoints
from escape_fast.errors import DataError, UserError
from escape_fast.predict import Predictor, write_outputs

log = logging.getLogger("escape_fast.demo")

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
SAMPLES = HERE / "samples"
DEFAULT = "photos"  # builtin.PHOTO_MODEL: the default Predictor model, the best on photographs
SYNTHETIC = "synthetic"  # the built-in checkpoint (MLE, MAP and ESCAPE; trained on the synthetic benchmark)


class DemoError(Exception):
    """A request the server refuses: an HTTP status, a one-line message for the
    page, and a code the page acts on (e.g. upload again after an eviction)."""

    def __init__(self, status: int, message: str, code: str = "bad_request"):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class Image:
    """An uploaded image: decoded once, at full resolution, for prediction."""

    name: str
    pixels: np.ndarray  # RGB uint8 [H, W, 3], exactly what escape_fast.data.load_image gives for the file
    display: bytes  # JPEG shown by the page (downscaled when large)
    display_size: tuple[int, int]  # (width, height)
    frame_of: tuple[str, int] | None = None  # (video id, frame index) for a frame of an uploaded video


@dataclass
class Video:
    """An uploaded video, on the server's disk (it is streamed, never held in memory)."""

    ident: str
    name: str
    path: str
    frames: int
    fps: float | None
    size: tuple[int, int]


@dataclass
class TrackJob:
    """One video being tracked in the background; the page polls it."""

    video: Video
    folder: str
    state: str = "running"
    phase: str = "starting"
    done: int = 0
    total: int | None = None
    error: str | None = None
    summary: dict | None = None
    files: list = field(default_factory=list)


@dataclass
class SupportSet:
    """What /api/adapt stored under a token: one user's supports."""

    names: list[str]  # the images' file names (the predictions name them)
    images: list[np.ndarray]
    keypoints: list[KeypointSet]
    frames: list = field(default_factory=list)  # per support: (video id, frame index), or None


@dataclass
class Model:
    """One loaded model, shared by every user; ``lock`` serializes its use."""

    name: str
    predictor: Predictor
    lock: threading.Lock = field(default_factory=threading.Lock)
    adapted: tuple | None = None  # (token, method) of the predictor's current support

    def __post_init__(self):
        # the model's best method; predictor.method changes with every request's method
        self.default_method = self.predictor.method

    @property
    def methods(self) -> list[str]:
        return list(self.predictor.model.methods)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _rename(text: str, kind: str, names: list[str]) -> str:
    """Predictor calls an image given as an array "support #N" / "query #N":
    put the uploaded file's name in its place."""
    return re.sub(rf"\b{kind} #(\d+)\b",
                  lambda m: names[int(m.group(1))] if int(m.group(1)) < len(names) else m.group(0), text)


def _model_names(checkpoints) -> list[str]:
    """A short distinct label per checkpoint: its run folder's name, else the file's stem."""
    labels = []
    for path in checkpoints:
        p = Path(path)
        if p.is_dir():
            label = p.name
        else:
            label = p.parent.name if p.name == "model.pt" and p.parent.name else p.stem
        label = label or str(p)
        base, n = label, 1
        while label in labels or label in (DEFAULT, SYNTHETIC):
            n += 1
            label = f"{base}-{n}"
        labels.append(label)
    return labels


class DemoService:
    """The demo's state and operations, independent of the web framework.

    Args:
        checkpoints: training run folders or model.pt files, served besides the
            built-in model.
        device, batch_size: as for :class:`escape_fast.Predictor`.
        display_size: the longest side of the image the page shows.
        max_image_mb: decoded uploads kept (least recently used dropped first;
            a support set keeps its own images).
        max_sessions: support sets kept (least recently used dropped first).
    """

    def __init__(self, checkpoints=(), device="auto", batch_size: int | None = None, display_size: int = 1600,
                 max_image_mb: int = 1024, max_sessions: int = 256):
        self.models: dict[str, Model] = {}
        # loaded once, here: a request never loads weights
        self.models[DEFAULT] = Model(DEFAULT, Predictor(None, None, device, batch_size))
        self.models[SYNTHETIC] = Model(SYNTHETIC, Predictor("builtin", None, device, batch_size))
        for label, path in zip(_model_names(checkpoints), checkpoints):
            self.models[label] = Model(label, Predictor(path, None, device, batch_size))
        self.display_size = int(display_size)
        self.max_image_bytes = int(max_image_mb) << 20
        self.max_sessions = int(max_sessions)
        self._images: OrderedDict[str, Image] = OrderedDict()
        self._image_bytes = 0
        self._sessions: OrderedDict[str, SupportSet] = OrderedDict()
        self._videos: dict[str, Video] = {}
        self._jobs: dict[str, TrackJob] = {}
        self._disk = tempfile.TemporaryDirectory(prefix="escape_fast_demo_")  # videos and tracks; gone at exit
        self._store = threading.Lock()  # guards _images, _sessions, _videos and _jobs

    # ------------------------------------------------------------------ info
    def info(self) -> dict:
        samples = None
        if (SAMPLES / "support.json").is_file():
            samples = {"support": {"image": "/samples/support.jpg", "keypoints": "/samples/support.json"},
                       "queries": [f"/samples/{p.name}" for p in sorted(SAMPLES.glob("query-*.jpg"))]}
        models = [{"name": m.name, "checkpoint": m.predictor.checkpoint, "methods": m.methods,
                   "default_method": m.default_method, "input_size": m.predictor.input_size}
                  for m in self.models.values()]
        device = str(next(iter(self.models.values())).predictor.device)
        return {"models": models, "device": device, "samples": samples, "display_size": self.display_size}

    def _model_and_method(self, request) -> tuple[Model, str]:
        """The model and method a request (a JSON object) names."""
        if not isinstance(request, dict):
            raise DemoError(400, "expected a JSON object")
        model = self._model(request.get("model"))
        return model, self._method(model, request.get("method"))

    def _model(self, name) -> Model:
        if name is None:
            return self.models[DEFAULT]
        if name not in self.models:
            raise DemoError(400, f"unknown model {name!r}; this server has {', '.join(self.models)}")
        return self.models[name]

    @staticmethod
    def _method(model: Model, method) -> str:
        if method is None:
            return model.default_method
        if method not in model.methods:
            raise DemoError(400, f"model '{model.name}' has no method {method!r}; it has "
                                 f"{', '.join(model.methods)}")
        return method

    # ---------------------------------------------------------------- images
    def add_image(self, name: str, data: bytes) -> dict:
        """Decode an uploaded file as escape_fast.predict would decode it from disk."""
        from PIL import Image as PILImage

        name = Path(name or "image").name or "image"  # a file name, never a path of the server's
        if not data:
            raise DataError(f"{name}: the file is empty")
        # load_image reads a path: the bytes go through the very same decoder from a private file
        with tempfile.TemporaryDirectory(prefix="escape_fast_demo_") as tmp:
            path = os.path.join(tmp, "upload")
            with open(path, "wb") as f:
                f.write(data)
            try:
                with warnings.catch_warnings():
                    # large photos are welcome
                    warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
                    pixels = load_image(path)
            except PILImage.DecompressionBombError as e:  # load_image lets this one through
                raise DataError(f"{name}: too many pixels to decode safely ({_one_line(e)})") from None
            except DataError as e:
                raise DataError(str(e).replace(path, name)) from None
        return self._keep_image(name, pixels)

    def _keep_image(self, name: str, pixels: np.ndarray, frame_of: tuple[str, int] | None = None) -> dict:
        """Keep decoded pixels as an image of the page (its display JPEG made once)."""
        from PIL import Image as PILImage

        h, w = pixels.shape[:2]
        # the page shows a JPEG of this decoded image, so what it shows is what is predicted (EXIF
        # orientation, CMYK, 16-bit PNG...), and a large photo travels back downscaled
        shown = PILImage.fromarray(pixels)
        if max(w, h) > self.display_size:
            shown.thumbnail((self.display_size, self.display_size), PILImage.Resampling.LANCZOS)
        buf = io.BytesIO()
        shown.save(buf, format="JPEG", quality=90)
        image = Image(name, pixels, buf.getvalue(), shown.size, frame_of)
        ident = secrets.token_urlsafe(12)
        with self._store:
            self._images[ident] = image
            self._image_bytes += pixels.nbytes
            while self._image_bytes > self.max_image_bytes and len(self._images) > 1:
                _, old = self._images.popitem(last=False)
                self._image_bytes -= old.pixels.nbytes
        log.info("image %s: %s, %d x %d", ident, name, w, h)
        return {"id": ident, "name": name, "width": w, "height": h, "display_width": shown.size[0],
                "display_height": shown.size[1]}

    def image(self, ident: str) -> Image:
        with self._store:
            image = self._images.get(ident)
            if image is not None:
                self._images.move_to_end(ident)
        if image is None:
            raise DemoError(410, f"image {ident} is no longer on the server (evicted or restarted); "
                                 "upload it again", "unknown_image")
        return image

    # ---------------------------------------------------------------- videos
    def add_video(self, name: str, data: bytes) -> dict:
        """Store an uploaded video and check that it can be read (escape_fast.data.video)."""
        from escape_fast.data.video import open_frames

        name = Path(name or "video.mp4").name or "video.mp4"
        if not data:
            raise DataError(f"{name}: the file is empty")
        ident = secrets.token_urlsafe(12)
        folder = os.path.join(self._disk.name, "videos", ident)
        os.makedirs(folder)
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(data)
        try:
            source = open_frames(path)
        except DataError as e:
            raise DataError(str(e).replace(path, name)) from None
        video = Video(ident, name, path, source.count, source.fps, source.size)
        with self._store:
            self._videos[ident] = video
        log.info("video %s: %s, %d frames of %d x %d", ident, name, video.frames, *video.size)
        return {"id": ident, "name": name, "frames": video.frames, "fps": video.fps, "width": video.size[0],
                "height": video.size[1]}

    def video(self, ident: str) -> Video:
        with self._store:
            video = self._videos.get(ident)
        if video is None:
            raise DemoError(410, f"video {ident} is no longer on the server (restarted); upload it again",
                            "unknown_video")
        return video

    def video_frame(self, ident: str, index: int) -> dict:
        """Frame ``index`` of a stored video, kept as an image (to annotate as a support)."""
        from escape_fast.data.video import open_frames

        video = self.video(ident)
        try:
            pixels = open_frames(video.path).frame(int(index))
        except DataError as e:
            raise DataError(str(e).replace(video.path, video.name)) from None
        return self._keep_image(f"{Path(video.name).stem}-frame{int(index)}.png", pixels, (ident, int(index)))

    def start_track(self, request: dict) -> dict:
        """Track a stored video with a stored support set, in a background thread."""
        model, method = self._model_and_method(request)
        video = self.video(request.get("video"))
        with self._store:
            support = self._sessions.get(request.get("token")) if isinstance(request.get("token"), str) else None
        if support is None:
            raise DemoError(410, "the support set is no longer on the server; send it again", "unknown_support")
        ident = secrets.token_urlsafe(12)
        job = TrackJob(video, os.path.join(self._disk.name, "tracks", ident), total=video.frames or None)
        os.makedirs(job.folder)
        with self._store:
            self._jobs[ident] = job
        thread = threading.Thread(target=self._track, args=(job, model, support, request.get("token"), method),
                                  daemon=True, name=f"track-{ident[:6]}")
        thread.start()
        return {"job": ident}

    def _track(self, job: TrackJob, model: Model, support: SupportSet, token: str, method: str) -> None:
        from escape_fast.track.outputs import output_stem
        from escape_fast.track.run import TrackOptions, track_video

        def progress(phase, done, total):
            job.phase, job.done, job.total = phase, done, total

        options = TrackOptions(overwrite=True)  # the command's defaults: every frame, smoothed
        start = time.perf_counter()
        try:
            with model.lock:  # the model is shared: other requests wait while it tracks
                self._adapt(model, support, token, method)
                stem = output_stem(job.folder, job.video.name, set())
                # as the command does: tracking that starts on an annotated frame starts from its keypoints
                annotated = {f[1]: kps for f, kps in zip(support.frames, model.predictor.supports)
                             if f is not None and f[0] == job.video.ident}
                summary = track_video(options, model.predictor, job.video.path, stem, progress,
                                      labeled_suffix=".labeled.webm", annotated=annotated)
        except UserError as e:
            job.error, job.state = _one_line(str(e).replace(job.video.path, job.video.name)), "error"
            log.warning("track %s refused: %s", job.video.name, job.error)
            return
        except Exception as e:  # a bug: the traceback to the log, one line to the page
            log.exception("tracking %s failed", job.video.name)
            job.error, job.state = f"internal error ({type(e).__name__}: {_one_line(e)}); see the server log", "error"
            return
        names = sorted(p for p in os.listdir(job.folder) if not p.startswith(".") and not p.endswith(".jsonl"))
        job.files = names
        job.summary = summary
        job.state = "done"
        log.info("tracked %s: %d frames in %.1f s", job.video.name, summary["frames"], time.perf_counter() - start)

    def job(self, ident: str) -> dict:
        with self._store:
            job = self._jobs.get(ident)
        if job is None:
            raise DemoError(404, f"no tracking job {ident} on this server", "unknown_job")
        return {"state": job.state, "phase": job.phase, "done": job.done, "total": job.total, "error": job.error,
                "summary": job.summary, "video": job.video.name,
                "files": [{"name": n, "url": f"/api/track/{ident}/files/{n}"} for n in job.files]}

    def job_file(self, ident: str, name: str) -> str:
        with self._store:
            job = self._jobs.get(ident)
        if job is None or name not in job.files:
            raise DemoError(404, f"no file {name!r} in tracking job {ident}", "unknown_file")
        return os.path.join(job.folder, name)

    # -------------------------------------------------------------- keypoints
    @staticmethod
    def read_keypoints(name: str, text: str) -> dict:
        """A keypoint file as parse_keypoints reads it, for the page's editor."""
        name = Path(name or "keypoints.json").name
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}: malformed JSON ({e})") from None
        kps = parse_keypoints(data, name)
        return {
            "names": list(kps.names),
            "keypoints": [[float(x), float(y)] if v else None for (x, y), v in zip(kps.keypoints.tolist(),
                                                                                     kps.visible.tolist())],
            "skeleton": [list(limb) for limb in kps.skeleton],
            "box": None if kps.box is None else kps.box.tolist(),
        }

    # ---------------------------------------------------------------- support
    def adapt(self, request: dict) -> dict:
        """Check and store a support set; returns its token."""
        model, method = self._model_and_method(request)
        supports = request.get("supports")
        if not isinstance(supports, list) or not supports:
            raise DataError("no support image: add one and place its keypoints")
        names, images, sets, frames = [], [], [], []
        for n, entry in enumerate(supports):
            if not isinstance(entry, dict):
                raise DemoError(400, f"support {n + 1}: expected an object with 'image' and 'keypoints'")
            image = self.image(entry.get("image"))
            kp = entry.get("keypoints")
            raw = kp.get("keypoints") if isinstance(kp, dict) else None
            # said in the page's words; anything malformed is left to parse_keypoints' messages
            if isinstance(raw, list) and all(p is None or (isinstance(p, list) and len(p) == 3 and p[2] == 0)
                                             for p in raw):
                raise DataError(f"{image.name}: no keypoint placed; click on the image to place at least one")
            # named like the file the page saves for this support, so messages and the report name it
            sets.append(parse_keypoints(kp, f"{Path(image.name).stem}.json"))
            names.append(image.name)
            images.append(image.pixels)
            frames.append(image.frame_of)
        support = SupportSet(names, images, sets, frames)
        token = secrets.token_urlsafe(16)
        with model.lock:  # checked by the model at once, so a bad support is reported here, not at predict
            self._adapt(model, support, token, method)
            result = {
                "token": token, "model": model.name, "method": method,
                "keypoint_names": list(model.predictor.names),
                "skeleton": [list(limb) for limb in model.predictor.skeleton],
                "supports": [{"image": name, "keypoints": kps.source, "box": crop.box.tolist()}
                             for name, kps, crop in zip(names, model.predictor.supports,
                                                        model.predictor.support_crops)],
            }
        with self._store:
            self._sessions[token] = support
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        log.info("support %s: %d-shot, %d keypoints (%s)", token[:8], len(names), len(sets[0]),
                 ", ".join(names))
        return result

    @staticmethod
    def _adapt(model: Model, support: SupportSet, token: str, method: str):
        """Adapt the shared predictor to a support set (caller holds model.lock)."""
        if model.adapted == (token, method):
            return
        model.adapted = None  # a failed adaptation leaves nothing half-set to reuse
        model.predictor.method = method  # a Predictor holds one method; the prototypes follow at adapt
        try:
            model.predictor.adapt(support.images, support.keypoints)
        except DataError as e:
            raise DataError(_rename(str(e), "support", support.names)) from None
        model.adapted = (token, method)

    # ---------------------------------------------------------------- queries
    def predict(self, request: dict) -> dict:
        """Predict queries with a stored support set: predict's predictions.json."""
        model, method = self._model_and_method(request)
        token = request.get("token")
        with self._store:
            support = self._sessions.get(token) if isinstance(token, str) else None
            if support is not None:
                self._sessions.move_to_end(token)
        if support is None:
            raise DemoError(410, "the support set is no longer on the server; send it again",
                            "unknown_support")
        queries = request.get("queries")
        if not isinstance(queries, list) or not queries:
            raise DataError("no query image: add one or more")
        images, boxes = [], []
        for n, q in enumerate(queries):
            if not isinstance(q, dict):
                raise DemoError(400, f"query {n + 1}: expected an object with 'image' and optional 'box'")
            images.append(self.image(q.get("image")))
            boxes.append(q.get("box"))
        names = [im.name for im in images]
        start = time.perf_counter()
        with model.lock:
            self._adapt(model, support, token, method)
            results = model.predictor.predict([im.pixels for im in images], boxes)
            report = self._report(model.predictor, results, support.names, names)
        for q in report["queries"]:
            if "error" in q:
                log.warning("query %s: %s", q["image"], _one_line(q["error"]))
        log.info("predicted %d queries (%s, %s, %d-shot) in %.2f s", len(names), model.name, method,
                 len(support.names), time.perf_counter() - start)
        return report

    @staticmethod
    def _report(predictor: Predictor, results, support_names, query_names) -> dict:
        """The predictions.json of ``python -m escape_fast.predict``, written by its own write_outputs.

        Images given as arrays have no file to draw on, so write_outputs writes
        only the JSON ("drawing": null); the uploads' names replace the
        "support #N" / "query #N" it calls arrays."""
        with tempfile.TemporaryDirectory(prefix="escape_fast_demo_") as tmp:
            report = json.loads(Path(write_outputs(predictor, results, tmp)).read_text())
        for kind, names, entries in (("support", support_names, report["supports"]),
                                     ("query", query_names, report["queries"])):
            for n, entry in enumerate(entries):
                entry["image"] = names[n]
                if "error" in entry:
                    entry["error"] = _rename(entry["error"], kind, names)
                else:
                    entry["drawing"] = None  # the page draws; no PNG is written or served
        return report


# --------------------------------------------------------------------------
# the web app (Starlette)
# --------------------------------------------------------------------------
def create_app(service: DemoService, max_upload_mb: int = 64):
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    limit = int(max_upload_mb) << 20

    def api(fn):
        """Run a handler; a refused request gets a JSON message and one log line."""

        async def endpoint(request):
            try:
                result = await fn(request)
                return result if isinstance(result, Response) else JSONResponse(result)
            except DemoError as e:
                status, message, code = e.status, e.message, e.code
            except UserError as e:  # bad input: the message names the file or the setting
                status, message, code = 400, str(e), "bad_input"
            except ClientDisconnect:
                return Response(status_code=499)
            except Exception as e:  # a bug: the traceback goes to the log, the page gets one line
                log.exception("%s %s failed", request.method, request.url.path)
                return JSONResponse({"error": f"internal error ({type(e).__name__}: {_one_line(e)}); see the "
                                              "server log", "code": "internal"}, 500)
            message = _one_line(message)
            log.warning("%s %s refused: %s", request.method, request.url.path, message)
            return JSONResponse({"error": message, "code": code}, status)

        return endpoint

    async def body(request) -> bytes:
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total <= limit:
                chunks.append(chunk)
        # an oversized body is read to its end all the same: a client (a browser's fetch too) that is
        # answered and cut off while it still sends sees a reset connection, not the message
        if total > limit:
            name = request.query_params.get("name", "the upload")
            raise DemoError(413, f"{name}: {total / 2**20:.1f} MiB is over the server's limit of "
                                 f"{max_upload_mb} MiB (--max-upload-mb)")
        return b"".join(chunks)

    async def json_body(request):
        try:
            return json.loads(await body(request))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DemoError(400, f"the request is not JSON ({e})") from None

    async def index(request):
        return FileResponse(STATIC / "index.html")

    async def info(request):
        return service.info()

    async def upload(request):
        data = await body(request)
        return await run_in_threadpool(service.add_image, request.query_params.get("name", "image"), data)

    async def display(request):
        image = service.image(request.path_params["ident"])
        # private: never cached by anything between the page and this server
        return Response(image.display, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    async def keypoints(request):
        text = (await body(request)).decode("utf-8", errors="replace")
        return service.read_keypoints(request.query_params.get("name", "keypoints.json"), text)

    async def adapt(request):
        return await run_in_threadpool(service.adapt, await json_body(request))

    async def predict(request):
        return await run_in_threadpool(service.predict, await json_body(request))

    async def add_video(request):
        data = await body(request)
        return await run_in_threadpool(service.add_video, request.query_params.get("name", "video.mp4"), data)

    async def video_frame(request):
        try:
            index = int(request.path_params["index"])
        except ValueError:
            raise DemoError(400, f"frame {request.path_params['index']!r} is not a frame number") from None
        return await run_in_threadpool(service.video_frame, request.path_params["ident"], index)

    async def start_track(request):
        return await run_in_threadpool(service.start_track, await json_body(request))

    async def job(request):
        return service.job(request.path_params["ident"])

    async def job_file(request):
        path = service.job_file(request.path_params["ident"], request.path_params["name"])
        return FileResponse(path, filename=os.path.basename(path))

    routes = [
        Route("/", index),
        Route("/favicon.ico", lambda request: Response(status_code=204)),  # none; spares a 404 in the console
        Route("/api/info", api(info)),
        Route("/api/images", api(upload), methods=["POST"]),
        Route("/api/images/{ident}", api(display)),
        Route("/api/keypoints", api(keypoints), methods=["POST"]),
        Route("/api/adapt", api(adapt), methods=["POST"]),
        Route("/api/predict", api(predict), methods=["POST"]),
        Route("/api/videos", api(add_video), methods=["POST"]),
        Route("/api/videos/{ident}/frames/{index}", api(video_frame), methods=["POST"]),
        Route("/api/track", api(start_track), methods=["POST"]),
        Route("/api/track/{ident}", api(job)),
        Route("/api/track/{ident}/files/{name}", api(job_file)),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    if SAMPLES.is_dir():
        routes.append(Mount("/samples", StaticFiles(directory=SAMPLES), name="samples"))
    return Starlette(routes=routes)


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m escape_fast.demo",
        description="A local web page to annotate support images, predict keypoints on query images and "
                    "download the predictions (the JSON of python -m escape_fast.predict).")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; the demo has no login)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="RUN_DIR",
                   help="a training run folder, model.pt or ESCAPE authors' .pth to offer besides the built-in model (repeatable)")
    p.add_argument("--device", default="auto", help="auto (GPU when present) | cpu | cuda")
    p.add_argument("--batch-size", type=int,
                   help="queries per batch (default: 32 on a GPU; on the CPU, 4 at 256 px, more for smaller inputs)")
    p.add_argument("--max-upload-mb", type=int, default=64, help="largest upload accepted (default 64 MiB)")
    p.add_argument("--display-size", type=int, default=1600,
                   help="longest side of the image shown in the page (default 1600; prediction uses the "
                        "full image)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        print(f"error: the demo needs the 'demo' extra ({e.name} is missing): pip install -e \".[demo]\"",
              file=sys.stderr)
        return 2
    try:
        service = DemoService(args.checkpoint, args.device, args.batch_size, args.display_size)
    except UserError as e:  # a missing or incompatible checkpoint, an unknown device
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = create_app(service, args.max_upload_mb)
    # bound here, before uvicorn starts, so that --port 0 can report the port it got
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    sock.listen(128)
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who reaches this address can use the demo (it has no login)",
                    args.host)
    models = "; ".join(f"{m['name']} ({', '.join(m['methods'])})" for m in service.info()["models"])
    print(f"escape_fast demo on http://{host}:{port}/  models: {models}; device {service.info()['device']}",
          flush=True)
    config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
