"""Tracking one animal through a video with an adapted Predictor.

The object is found on the first frame by a search: the Predictor's object
search (escape_fast.predict.search) in the whole frame and in overlapping
tiles a few object sizes wide, each candidate decoded and the best kept.
After that each frame's crop comes from the frames before it: the
support's layout is fitted to the confident keypoints of the last good
frame (a similarity: centre, size, angle), moved on by the centre's
velocity, and its box, widened by a margin and turned so that the object
stands as in the supports, is decoded like a given box. Frames go through
the trunk in batches, each placed by the motion estimate, so frame t + 1
need not wait for frame t; a frame whose keypoints say the crop was
misplaced is decoded again where they say.

A frame whose scores fall below what the supports themselves score (the
median over keypoints of score / reference score under
``TrackingConfig.lost``) is searched again, and the better of the two
results is kept; when the search moved the object, the rest of the batch
is decoded again from there. While the object stays lost (out of view),
only one frame in ``search_every`` is searched.

One animal per video: the tracker follows one object; with several animals
in view it follows the one the first search found, and may change to
another at a re-search.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from escape_fast.errors import DataError
from escape_fast.predict.predictor import Prediction, Predictor, make_crop
from escape_fast.predict.search import fit_layout, layout_box

BATCH = 4  # frames per trunk batch (default)
TILE_OBJECTS = 3.0  # a search tile's side, in object sizes
REFINE_TURN = 15.0  # degrees between the crop's turn and the keypoints' that call for a second decode
SIZE_WEIGHT = 0.3  # of a new frame's fitted size, against the running estimate (in log terms)


@dataclass(frozen=True)
class TrackingConfig:
    """``margin``: the box from the fitted layout is widened by this factor
    (the crop then pads it by 1.25, as every crop); ``low``: a keypoint whose
    score is below ``low`` x its reference score is low-confidence (kept,
    marked, not used to place the next box nor by the smoother); ``lost``: a
    frame whose median relative score is below it is searched again;
    ``damping``: of the velocity in the motion estimate (1: constant velocity);
    ``rotate``: turn each crop so that the object stands as in the supports
    (by the angle fitted on the last good frame; the network is not
    rotation-invariant, and animals turn); ``refine``: decode a frame again
    when its keypoints put the object's centre more than this fraction of
    its size away from where the crop was placed (0: never);
    ``search_every``: while the object is not found, search one frame in
    this many (a search decodes some 30 crops); ``location_prior``: decode
    the turned crops with the model's location prior (which pulls keypoints
    to where the supports show them in the crop, and so also towards the
    crop's own turn)."""

    margin: float = 1.1
    low: float = 0.5
    lost: float = 0.6
    damping: float = 0.8
    rotate: bool = True
    refine: float = 0.25
    search_every: int = 2
    location_prior: bool = True


@dataclass
class TrackedFrame:
    """One frame's result: ``keypoints`` [K, 2] image pixels as decoded (NaN
    for keypoints no support shows), ``scores`` [K], ``confident`` [K]
    (score >= low x reference), ``box`` the decoded crop's box, ``searched``
    whether the whole frame was searched for the object, ``quality`` the
    median relative score; or ``error`` when the frame could not be decoded."""

    index: int
    keypoints: np.ndarray | None = None
    scores: np.ndarray | None = None
    confident: np.ndarray | None = None
    box: np.ndarray | None = None
    searched: bool = False
    quality: float = float("nan")
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_record(self) -> dict:
        """A JSON-able dict (the progress file's line; :meth:`of_record` reads it back)."""
        if not self.ok:
            return {"frame": self.index, "error": self.error}
        return {"frame": self.index, "keypoints": _nan_list(self.keypoints), "scores": _nan_list(self.scores),
                "confident": self.confident.tolist(), "box": self.box.tolist(), "searched": self.searched,
                "quality": None if not np.isfinite(self.quality) else float(self.quality)}

    @classmethod
    def of_record(cls, r: dict) -> TrackedFrame:
        if "error" in r:
            return cls(int(r["frame"]), error=str(r["error"]))
        return cls(int(r["frame"]), _nan_array(r["keypoints"]), _nan_array(r["scores"]),
                   np.asarray(r["confident"], dtype=bool), np.asarray(r["box"], dtype=np.float64),
                   bool(r["searched"]), float("nan") if r["quality"] is None else float(r["quality"]))


def _nan_list(a: np.ndarray):
    return np.where(np.isfinite(a), a, None).tolist()


def _nan_array(values) -> np.ndarray:
    return np.array(values, dtype=np.float64)  # None -> nan


@dataclass
class _Pose:
    """The support layout fitted to one frame: box centre [2], size (the
    support box's longer side, pixels) and angle (radians)."""

    index: int
    center: np.ndarray
    size: float
    angle: float


def prefetch(items: Iterable, depth: int) -> Iterator:
    """``items`` produced in a background thread, ``depth`` ahead (a video
    decoder releases the GIL, so decoding overlaps the network); exceptions
    reach the consumer in order."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", done))
        except BaseException as exc:  # handed to the consumer
            q.put(("error", exc))

    thread = threading.Thread(target=work, daemon=True, name="escape_fast-frames")
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join(timeout=5)


@dataclass
class TrackStats:
    frames: int = 0
    failed: int = 0
    searches: int = 0
    low_points: int = 0
    refined: int = 0
    known_points: int = 0


class Tracker:
    """Follow the object of an adapted :class:`Predictor` through a sequence of frames.

    >>> predictor = Predictor().adapt(support_frame, "support.json")
    >>> for result in Tracker(predictor).track(open_frames("video.mp4")):
    ...     print(result.index, result.keypoints)
    """

    def __init__(self, predictor: Predictor, config: TrackingConfig = TrackingConfig(), batch_size: int | None = None):
        self.predictor, self.config = predictor, config
        # frames of one batch are all placed from the frames before it: a few at a time, or the
        # motion estimate runs ahead of what it knows (16 frames of 128 px: the box trailed the animal)
        self.batch_size = int(batch_size or min(predictor.batch_size, BATCH))
        self.reference = predictor.reference_scores()  # raises when the predictor has no support yet
        self.known = predictor.known & np.isfinite(self.reference)
        self.stats = TrackStats()
        self._poses: list[_Pose] = []  # the last two good frames' fitted layouts
        self._size: float | None = None  # the running estimate of the object's size (pixels)
        # the prior goes with upright crops always, with turned ones as configured
        self._prior = config.location_prior or not config.rotate
        self._failed_searches_ago: int | None = None  # frames since a search found nothing

    # ----------------------------------------------------------- state
    def resume(self, done: Iterable[TrackedFrame]) -> None:
        """Continue after frames tracked earlier (e.g. read back from a progress
        file): the state is rebuilt as :meth:`track` left it after them."""
        for frame in done:
            if frame.searched:
                self._failed_searches_ago = 0 if self._lost(frame) else None
            elif self._failed_searches_ago is not None:
                self._failed_searches_ago += 1
            self._update(frame)

    def start_at(self, index: int, keypoints: np.ndarray, visible: np.ndarray) -> bool:
        """Start from a frame whose keypoints are known (a support annotated
        on the video itself): no search for the object there, and no risk of
        finding another animal first. False when they fix no pose (fewer than
        two visible keypoints)."""
        frame = TrackedFrame(index, np.asarray(keypoints, dtype=np.float64), self.reference.copy(),
                             np.asarray(visible, dtype=bool) & self.known, quality=1.0)
        before = len(self._poses)
        self._remember(frame)
        return len(self._poses) > before

    def _update(self, frame: TrackedFrame) -> None:
        """The state after a frame: a lost frame keeps where the object was
        last seen; a frame found by a search starts the motion afresh."""
        if self._lost(frame):
            self._forget()
            return
        if frame.searched:
            self._poses = []
        self._remember(frame)

    def _fit(self, frame: TrackedFrame) -> tuple[np.ndarray, float, float] | None:
        """(centre, size, angle) of the supports' layout on a frame's confident keypoints (:func:`fit_layout`)."""
        return fit_layout(self.predictor.layout.offsets, frame.keypoints, frame.confident & self.known)

    def _remember(self, frame: TrackedFrame) -> None:
        fit = self._fit(frame)
        if fit is None:
            return
        center, size, angle = fit
        if self._size is not None:
            # the animal's size changes slowly and one fit is noisy (a leg stretched, a search's coarse
            # box): it is averaged in, across searches too
            size = float(self._size * np.clip(size / self._size, 1 / 1.4, 1.4) ** SIZE_WEIGHT)
        self._size = size
        self._poses = (self._poses + [_Pose(frame.index, center, size, angle)])[-2:]

    def _forget(self) -> None:
        """The object was lost: keep where it was last seen, but not its velocity."""
        self._poses = self._poses[-1:]

    def _box_of(self, center: np.ndarray, size: float, angle: float, shape) -> tuple[np.ndarray | None, float]:
        """(box [x, y, w, h], crop rotation in degrees) of the support's box
        placed at ``center``, ``size`` and ``angle``; (None, 0) when it left the frame."""
        if self.config.rotate:  # the crop turns with the object: the support's box as it is
            box, turn = layout_box(self.predictor.layout, center, size, 0.0, self.config.margin), float(np.degrees(angle))
        else:  # the support's box turned by the angle, and its bounding box cropped upright
            box, turn = layout_box(self.predictor.layout, center, size, angle, self.config.margin), 0.0
        height, width = shape[:2]
        if not (0 <= center[0] < width and 0 <= center[1] < height):
            return None, 0.0  # the estimate left the frame: search it
        return box, turn

    def predicted_box(self, index: int, shape) -> tuple[np.ndarray | None, float]:
        """(box [x, y, w, h], rotation) to decode frame ``index`` in, from the
        motion estimate; (None, 0) before the first good frame (search the whole frame)."""
        if not self._poses:
            return None, 0.0
        pose = self._poses[-1]
        center = pose.center
        if len(self._poses) == 2:
            prev = self._poses[0]
            velocity = (pose.center - prev.center) / max(pose.index - prev.index, 1)
            center = center + self.config.damping * velocity * (index - pose.index)
        return self._box_of(center, pose.size, pose.angle, shape)

    # ----------------------------------------------------------- results
    def _result(self, index: int, p: Prediction, searched: bool) -> TrackedFrame:
        if not p.ok:
            return TrackedFrame(index, error=p.error, searched=searched)
        rel = p.scores / self.reference
        known = self.known
        confident = known & (rel >= self.config.low)
        quality = float(np.median(rel[known])) if known.any() else float("nan")
        return TrackedFrame(index, p.keypoints, p.scores, confident, p.box, searched, quality)

    def _lost(self, frame: TrackedFrame) -> bool:
        return not frame.ok or not np.isfinite(frame.quality) or frame.quality < self.config.lost

    def _object_size(self) -> float:
        """The object's size in pixels: the last fitted one, else the supports' boxes' longer side."""
        if self._poses:
            return self._poses[-1].size
        return float(np.mean([max(c.box[2], c.box[3]) for c in self.predictor.support_crops]))

    def search_tiles(self, shape) -> list[np.ndarray]:
        """Boxes [x, y, w, h] to search: the whole frame, and overlapping
        tiles of TILE_OBJECTS x the object's size where the frame is larger
        (in a whole frame a small animal covers a few feature cells; tiles of
        half the frame's side instead lost 28 points of PCK on a validation
        video)."""
        height, width = shape[:2]
        tiles = [np.array([0.0, 0.0, width, height])]
        side = TILE_OBJECTS * self._object_size()
        if side < 0.75 * max(width, height):
            side = min(side, width, height)
            xs = np.linspace(0, width - side, int(np.ceil((width - side) / (side / 2))) + 1)
            ys = np.linspace(0, height - side, int(np.ceil((height - side) / (side / 2))) + 1)
            tiles += [np.array([x, y, side, side]) for y in ys for x in xs]
        return tiles

    def _may_search(self) -> bool:
        """After a search that found nothing, the next ``search_every`` - 1
        frames do without one (an animal out of view would cost a search per frame)."""
        return self._failed_searches_ago is None or self._failed_searches_ago >= self.config.search_every

    def _search(self, index: int, image: np.ndarray, name: str) -> TrackedFrame:
        frame = self._tiled_search(index, image, name)
        self._failed_searches_ago = 0 if self._lost(frame) else None
        return frame

    def _tiled_search(self, index: int, image: np.ndarray, name: str) -> TrackedFrame:
        """The object searched in the whole frame and in tiles of it
        (:meth:`search_tiles`; Predictor.locate in each), every candidate box
        decoded in one batch and the best kept, then decoded once more in
        the box its keypoints imply (a search's box is coarse)."""
        self.stats.searches += 1
        views = []
        for tile in self.search_tiles(image.shape):
            try:
                views.append(make_crop(image, tile, self.predictor.input_size, name))
            except DataError:  # a tile too small to crop
                continue
        candidates = [box for box in self.predictor.locate_many(views) if box is not None]
        if not candidates:  # no keypoints could vote: decode the whole frame
            candidates = [np.array([0.0, 0.0, image.shape[1], image.shape[0]])]
        found = self.predictor.predict([image] * len(candidates), candidates, names=[name] * len(candidates))
        frames = [self._result(index, p, True) for p in found]
        good = [f for f in frames if f.ok]
        if not good:
            return frames[0]
        frame = max(good, key=lambda f: f.quality)
        fit = self._fit(frame)
        if fit is None:
            return frame
        box, turn = self._box_of(*fit, image.shape)
        if box is None:
            return frame
        again = self._result(index, self.predictor.predict([image], [box], names=[name], rotations=[turn],
                                                           location_prior=self._prior)[0], True)
        return again if again.ok and again.quality >= frame.quality else frame

    def _account(self, frame: TrackedFrame) -> TrackedFrame:
        if self._failed_searches_ago is not None and not frame.searched:
            self._failed_searches_ago += 1
        s = self.stats
        s.frames += 1
        if not frame.ok:
            s.failed += 1
        else:
            s.known_points += int(self.known.sum())
            s.low_points += int((self.known & ~frame.confident).sum())
        return frame

    def _refine(self, batch, placed, decoded: list[TrackedFrame], names) -> list[TrackedFrame]:
        """Decode again, in one batch, the frames whose keypoints imply a box
        away from the one they were decoded in (the motion estimate was off:
        the centre by more than ``refine`` x the size, or the angle by more
        than REFINE_TURN); a second decode replaces the first if it scores
        at least as well."""
        if not self.config.refine:
            return decoded
        redo = []
        for n, (frame, (box, turn), (_, image)) in enumerate(zip(decoded, placed, batch)):
            if not frame.ok:
                continue
            fit = self._fit(frame)
            if fit is None:
                continue
            center, size, angle = fit
            moved = np.linalg.norm(center - (box[:2] + box[2:] / 2)) / size
            turned = abs((np.degrees(angle) - turn + 180) % 360 - 180) if self.config.rotate else 0.0
            if moved > self.config.refine or turned > REFINE_TURN:
                new_box, new_turn = self._box_of(center, size, angle, image.shape)
                if new_box is not None:
                    redo.append((n, new_box, new_turn))
        if redo:
            again = self.predictor.predict([batch[n][1] for n, _, _ in redo], [b for _, b, _ in redo],
                                           names=[names[n] for n, _, _ in redo], rotations=[t for _, _, t in redo],
                                           location_prior=self._prior)
            for (n, _, _), p in zip(redo, again):
                frame = self._result(decoded[n].index, p, False)
                if frame.ok and frame.quality >= decoded[n].quality:
                    decoded[n] = frame
            self.stats.refined += len(redo)
        return decoded

    # ----------------------------------------------------------- the loop
    def track(self, frames: Iterable[tuple[int, np.ndarray]], name: str = "video") -> Iterator[TrackedFrame]:
        """:class:`TrackedFrame` of each ``(index, RGB frame)``, in order.
        ``name`` names the frames in error messages (``name#frameN``)."""
        pending: list[tuple[int, np.ndarray]] = []
        source = iter(prefetch(frames, 2 * self.batch_size))
        exhausted = False
        while True:
            while not exhausted and len(pending) < self.batch_size:
                item = next(source, None)
                if item is None:
                    exhausted = True
                else:
                    pending.append(item)
            if not pending:
                return
            placed = []  # the leading pending frames that the motion estimate places
            for index, image in pending[:self.batch_size]:
                box, turn = self.predicted_box(index, image.shape)
                if box is None:
                    break
                placed.append((box, turn))
            if not placed:  # nothing to follow yet, or it left the frame: search the next frame
                index, image = pending.pop(0)
                nm = f"{name}#frame{index}"
                if self._may_search():
                    frame = self._search(index, image, nm)
                else:  # the whole frame, decoded after the Predictor's one-pass search
                    frame = self._result(index, self.predictor.predict([image], [None], names=[nm])[0], False)
                self._update(frame)
                yield self._account(frame)
                continue
            batch = pending[:len(placed)]
            names = [f"{name}#frame{i}" for i, _ in batch]
            results = self.predictor.predict([im for _, im in batch], [b for b, _ in placed], names=names,
                                             rotations=[t for _, t in placed], location_prior=self._prior)
            decoded = self._refine(batch, placed, [self._result(i, p, False) for (i, _), p in zip(batch, results)],
                                   names)
            used = 0
            for (index, image), frame, nm in zip(batch, decoded, names):
                used += 1
                if self._lost(frame) and self._may_search():  # search the frame; keep whichever scores better
                    again = self._search(index, image, nm)
                    if again.ok and (not frame.ok or again.quality > frame.quality):
                        frame = again
                        if not self._lost(frame):  # found it elsewhere: place the rest of the batch from here
                            self._update(frame)
                            yield self._account(frame)
                            break
                self._update(frame)
                yield self._account(frame)
            del pending[:used]
