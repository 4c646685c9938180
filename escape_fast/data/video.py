"""Frames of a video file or of a folder of images, streamed (never the whole video in memory).

:func:`open_frames` takes a video file (mp4, avi, mov, mkv, ..., decoded with
PyAV, the ``video`` extra), a folder of images or a glob of them, and gives
a :class:`FrameSource`: iterate it for ``(index, RGB uint8 [H, W, 3])`` over
``start:stop:step``, or ask it for one frame (:meth:`FrameSource.frame`, for
a support annotated on the video itself).

Bad input raises :class:`escape_fast.errors.DataError` naming the file and
the frame: a file that is not a readable video, a video without frames, a
frame index past the end, frames that change size. A frame that cannot be
decoded in the middle of a video is skipped with a DataWarning, counted in
``skipped``, and the others go on.
"""

from __future__ import annotations

import abc
import glob
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from escape_fast.data.coco import load_image
from escape_fast.errors import DataError, DataWarning

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _av():
    try:
        import av
    except ImportError as exc:
        raise DataError("reading a video needs PyAV: pip install -e \".[video]\" (or pip install av)") from exc
    return av


class FrameSource(abc.ABC):
    """The frames of one video or image sequence, streamed in order.

    ``name`` names it in messages; ``fps`` is the video's frame rate (None
    for images); ``count`` the number of frames the container declares (for
    images: the files; it may be 0 or approximate for some videos);
    ``size`` (width, height) of the first frame; ``skipped`` the frames that
    could not be decoded so far.
    """

    def __init__(self, name: str, fps: float | None, count: int, size: tuple[int, int]):
        self.name, self.fps, self.count, self.size = name, fps, count, size
        self.skipped = 0

    @abc.abstractmethod
    def _decode(self) -> Iterator[tuple[int, np.ndarray]]:
        """Every decodable frame with its index in the file, from the first."""

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        return self.frames()

    def frames(self, start: int = 0, stop: int | None = None, step: int = 1) -> Iterator[tuple[int, np.ndarray]]:
        """``(index, frame)`` for the frames start, start + step, ... before stop."""
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise DataError(f"{self.name}: frames {start}:{stop}:{step} is not a range (start >= 0, stop >= start, "
                            "step >= 1)")
        for index, frame in self._decode():
            if stop is not None and index >= stop:
                return
            if index >= start and (index - start) % step == 0:
                if frame.shape[1::-1] != self.size:
                    raise DataError(f"{self.name}: frame {index} is {frame.shape[1]} x {frame.shape[0]} pixels, the "
                                    f"first was {self.size[0]} x {self.size[1]}; frames must keep one size")
                yield index, frame

    def frame(self, index: int) -> np.ndarray:
        """One frame (for a support annotated on the video); an error past the end."""
        if index < 0:
            raise DataError(f"{self.name}: frame {index} does not exist (frames count from 0)")
        for _, frame in self.frames(index, index + 1):
            return frame
        raise DataError(f"{self.name}: frame {index} is past the end (it has {self.count} frames, 0 to "
                        f"{self.count - 1})")


class _Video(FrameSource):
    def __init__(self, path: str):
        av = _av()
        self.path, self.skipped = path, 0  # the probe below may skip packets already
        try:
            with av.open(path) as container:
                if not container.streams.video:
                    raise DataError(f"{path}: no video stream in this file")
                stream = container.streams.video[0]
                fps = float(stream.average_rate) if stream.average_rate else None
                count = int(stream.frames or 0)
                first = next(self._frames_of(container, stream, path), None)
        except (av.error.FFmpegError, OSError) as exc:
            raise DataError(f"{path}: not a readable video ({type(exc).__name__}: {exc})") from None
        if first is None:
            raise DataError(f"{path}: the video has no frame that can be decoded")
        super().__init__(path, fps, count, (first.shape[1], first.shape[0]))

    def _frames_of(self, container, stream, path):
        av = _av()
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.error.FFmpegError as exc:  # a damaged container: what was read stands
                warnings.warn(f"{path}: reading stopped after a damaged packet ({exc})", DataWarning, 2)
                return
            try:
                decoded = packet.decode()
            except av.error.FFmpegError:
                self.skipped += 1
                continue
            for frame in decoded:
                yield frame.to_ndarray(format="rgb24")

    def frame(self, index: int) -> np.ndarray:
        """One frame: found by seeking to the keyframe before it where the
        timestamps are those of a constant frame rate (exact: the frame
        whose timestamp is index / fps), else decoded from the start."""
        found = self._seek_frame(index) if index > 0 else None
        return found if found is not None else super().frame(index)

    def _seek_frame(self, index: int) -> np.ndarray | None:
        """Frame ``index`` by timestamp, or None where that cannot be trusted
        (no constant frame rate, no timestamps, a timestamp that is not on
        the frame grid, a frame of another size): decode from the start then."""
        av = _av()
        try:
            with av.open(self.path) as container:
                stream = container.streams.video[0]
                if not stream.average_rate or not stream.time_base:
                    return None
                per_frame = 1 / (float(stream.average_rate) * float(stream.time_base))  # timestamp units
                if abs(per_frame - round(per_frame)) > 1e-6:
                    return None
                target = (stream.start_time or 0) + index * round(per_frame)
                container.seek(target, stream=stream, backward=True, any_frame=False)
                for decoded in container.decode(stream):
                    if decoded.pts is None or decoded.pts > target:
                        return None
                    if decoded.pts == target:
                        pixels = decoded.to_ndarray(format="rgb24")
                        return pixels if pixels.shape[1::-1] == self.size else None
        except av.error.FFmpegError:
            return None
        return None

    def _decode(self):
        av = _av()
        skipped_before = self.skipped
        with av.open(self.path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # the decoder's own threads; frames still come in order
            for index, frame in enumerate(self._frames_of(container, stream, self.path)):
                yield index, frame
        if self.skipped > skipped_before:
            warnings.warn(f"{self.path}: {self.skipped - skipped_before} packet(s) could not be decoded and were "
                          "skipped", DataWarning, 2)


class _Images(FrameSource):
    def __init__(self, paths: list[str], name: str):
        if not paths:
            raise DataError(f"{name}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
        self.paths = paths
        first = load_image(paths[0])
        super().__init__(name, None, len(paths), (first.shape[1], first.shape[0]))

    def _decode(self):
        for index, path in enumerate(self.paths):
            try:
                yield index, load_image(path)
            except DataError as exc:
                self.skipped += 1
                warnings.warn(f"{exc}; frame {index} skipped", DataWarning, 2)


def open_frames(spec) -> FrameSource:
    """A video file, a folder of images (sorted by name) or a glob of images."""
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        paths = sorted(str(p) for p in Path(spec).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return _Images(paths, spec)
    if any(c in spec for c in "*?["):
        paths = sorted(p for p in glob.glob(spec) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
        return _Images(paths, spec)
    if not os.path.isfile(spec):
        raise DataError(f"{spec}: no such video file, folder or glob of images")
    return _Video(spec)
