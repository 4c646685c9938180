"""Models of ESCAPE (docs/architecture.md): the whole model and its inference
(escape.py), feature extractors (backbone.py), prototype estimators
(adapt.py), the matching network (matching.py), and what only training
uses (training.py, losses.py)."""

from escape_fast.models.adapt import (
    blend,
    escape_prototypes,
    hungarian_assignment,
    map_prototypes,
    mle_prototypes,
    support_mean,
)
from escape_fast.models.escape import EscapeModel
from escape_fast.models.losses import heatmap_loss, matching_loss
from escape_fast.models.matching import MatchingNetwork

__all__ = [
    "EscapeModel",
    "MatchingNetwork",
    "blend",
    "escape_prototypes",
    "heatmap_loss",
    "hungarian_assignment",
    "map_prototypes",
    "matching_loss",
    "mle_prototypes",
    "support_mean",
]
