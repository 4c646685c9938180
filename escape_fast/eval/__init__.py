"""Evaluation of category-agnostic pose estimation on the standard episode protocol.

* :mod:`escape_fast.eval.metrics`: PCK at several thresholds, per category,
  with 95% intervals over support draws, and paired differences of methods;
* :mod:`escape_fast.eval.engine`: the fast evaluation (every instance's
  features once, episodes a category at a time) and the straightforward
  reference path, which give the same predictions;
* :mod:`escape_fast.eval.alpha`: alpha chosen on validation categories;
* ``python -m escape_fast.eval`` (:mod:`escape_fast.eval.__main__`): the
  command line.
"""

from escape_fast.eval.engine import (
    EvalResult,
    InstanceBank,
    PairResults,
    Timer,
    build_bank,
    category_banks,
    evaluate,
    evaluate_many,
    evaluate_pairs,
    evaluate_reference,
    predict_category,
    predict_episodes,
    summarize,
)
from escape_fast.eval.metrics import (
    THRESHOLDS,
    PCKSummary,
    paired_difference,
    pck_curve,
    pck_per_query,
    summarize_pck,
    valid_keypoints,
)

__all__ = [
    "THRESHOLDS",
    "EvalResult",
    "InstanceBank",
    "PCKSummary",
    "PairResults",
    "Timer",
    "build_bank",
    "category_banks",
    "evaluate",
    "evaluate_many",
    "evaluate_pairs",
    "evaluate_reference",
    "paired_difference",
    "pck_curve",
    "pck_per_query",
    "predict_category",
    "predict_episodes",
    "summarize",
    "summarize_pck",
    "valid_keypoints",
]
