"""Models of ESCAPE: adaptation (MLE, MAP, ESCAPE) and the matching network."""

from escape_fast.models.adapt import (
    METHODS,
    blend,
    escape_prototypes,
    hungarian_assignment,
    map_prototypes,
    mle_prototypes,
    support_mean,
)
from escape_fast.models.matching import MatchingNetwork, matching_loss

__all__ = [
    "METHODS",
    "blend",
    "MatchingNetwork",
    "escape_prototypes",
    "hungarian_assignment",
    "map_prototypes",
    "matching_loss",
    "mle_prototypes",
    "support_mean",
]
