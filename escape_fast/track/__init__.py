"""Keypoints through a video: one annotated frame, every frame tracked.

:class:`Tracker` follows the object of an adapted
escape_fast.predict.Predictor from frame to frame (tracker.py);
:func:`smooth_track` filters the result over time (smoothing.py); the
command ``python -m escape_fast.track`` reads videos and writes the files of
escape_fast.track.outputs.
"""

from escape_fast.track.smoothing import SmoothingConfig, rts_smooth, smooth_track
from escape_fast.track.tracker import TrackedFrame, Tracker, TrackingConfig, fit_layout

__all__ = ["SmoothingConfig", "TrackedFrame", "Tracker", "TrackingConfig", "fit_layout", "rts_smooth",
           "smooth_track"]
