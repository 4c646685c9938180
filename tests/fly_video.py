"""The real fly video of shared/ that the video tests use, and one fly annotated on its frame 0."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VIDEOS = Path(os.environ.get("ESCAPE_FAST_VIDEOS", ROOT.parent / "shared" / "data" / "videos"))
FLIES = VIDEOS / "flies_pair_384px.mp4"
needs_video = pytest.mark.skipif(not FLIES.is_file(), reason=f"fly video not found at {FLIES}")

# the right-hand fly of frame 0 of flies_pair_384px.mp4, annotated by eye for the tests
FLY = {"names": ["head", "thorax", "wing_tips", "foreleg_tip", "midleg_tip", "hindleg_tip"],
       "keypoints": [[205, 188], [228, 188], [286, 200], [208, 164], [232, 148], [267, 236]],
       "skeleton": [[0, 1], [1, 2], [1, 3], [1, 4], [1, 5]], "box": [195, 140, 100, 105]}
