"""Choosing alpha, the support's weight in MAP and ESCAPE, on validation categories.

With ``alpha: val`` (the default), training ends by trying every value of
ALPHA_GRID on the split's validation categories, for 1 and 5 shots, and
keeps the best per shot count in the model (``EscapeModel.alpha_by_shots``);
docs/method.md ("Blending the prior") says why alpha is chosen, not fixed.
"""

from __future__ import annotations

import torch

from escape_fast.data import EpisodeSampler
from escape_fast.errors import ConfigError, DataError
from escape_fast.eval.engine import Timer, build_bank, evaluate_pairs
from escape_fast.eval.metrics import THRESHOLDS

# the whole range: the raw blend of the authors' detectors (prior_scale: raw) can want less
# support than 0.5, the rescaled prior more (benchmarks/RESULTS.md, "The authors' recipe")
ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))
ALPHA_SHOTS = (1, 5)
ALPHA_DRAWS = 100  # support draws per val category (x queries pairs per category and alpha)


def check_alpha_data(alpha, val_coco, queries: int, seed: int = 0) -> None:
    """alpha 'val' needs a validation category with 1 + ``queries`` instances
    (checked before training, not after it)."""
    if alpha != "val":
        return
    if val_coco is None:
        raise ConfigError("alpha 'val' needs the split's validation categories, and this data has "
                          "no val annotation file; set alpha to a number")
    sampler = EpisodeSampler(val_coco, shots=1, queries=queries, draws=1, seed=seed, too_few="skip")
    if not sampler.episodes:
        raise ConfigError(f"alpha 'val': no category of {val_coco.path} has 1 + {queries} "
                          f"instances to choose alpha with; set alpha to a number")


@torch.no_grad()
def choose_alpha(model, val_coco, device, queries: int = 15, seed: int = 0, batch_size: int = 16) -> dict:
    """For 1 and 5 shots, the ALPHA_GRID value that gives the best PCK@0.2
    on the validation categories, for ESCAPE (MAP for a model without a
    matching network); on ties the larger alpha (the less prior). Stores
    {shots: alpha} in ``model.alpha_by_shots`` and returns it; a shot count
    that no validation category has enough instances for is left out
    (alpha_for falls back to fewer shots)."""
    if val_coco is None:
        raise ConfigError("alpha 'val' needs the split's validation categories, and this data has "
                          "no val annotation file; set alpha to a number")
    method = "escape" if "escape" in model.methods else "map"
    model.to(device).eval()
    instances = [i for c in val_coco.category_ids for i in val_coco.instances_of(c)]
    bank = build_bank(model, val_coco, instances, device, batch_size, matcher=method == "escape")
    main = THRESHOLDS.index(0.2)
    chosen = {}
    for shots in ALPHA_SHOTS:
        sampler = EpisodeSampler(val_coco, shots=shots, queries=queries, draws=ALPHA_DRAWS, seed=seed,
                                 too_few="skip")
        if not sampler.episodes:  # alpha_for then uses the choice of fewer shots
            print(f"[alpha] {shots}-shot: no validation category has {shots} + {queries} instances; not chosen",
                  flush=True)
            continue
        scores = {}
        for alpha in ALPHA_GRID:
            pairs = evaluate_pairs(model, val_coco, sampler, method, bank, timer=Timer(device), alpha=alpha)
            scores[alpha] = float(pairs.scores[main].mean())
        chosen[shots] = max(reversed(ALPHA_GRID), key=lambda a: scores[a])
        listing = ", ".join(f"{a:g}: {100 * p:.2f}" for a, p in scores.items())
        print(f"[alpha] {shots}-shot val PCK@0.2 of {method.upper()} by alpha: {listing} -> {chosen[shots]:g}",
              flush=True)
    if not chosen:
        raise DataError(f"{val_coco.path}: no validation category has {min(ALPHA_SHOTS)} + {queries} "
                         f"instances to choose alpha with; set alpha to a number")
    model.alpha_by_shots = chosen
    return chosen
