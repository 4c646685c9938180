"""Prediction on your own images: the Predictor, its object search and its outputs.

``python -m escape_fast.predict`` is the command (escape_fast/predict/__main__.py).
"""

from escape_fast.data.keypoint_file import KeypointSet, load_keypoints, parse_keypoints
from escape_fast.predict.outputs import write_outputs
from escape_fast.predict.predictor import MIN_SIDE, CropView, Prediction, Predictor, make_crop, read_image

__all__ = ["MIN_SIDE", "CropView", "KeypointSet", "Prediction", "Predictor", "load_keypoints", "make_crop",
           "parse_keypoints", "read_image", "write_outputs"]
