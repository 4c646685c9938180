"""The whole ESCAPE model: what the evaluation and prediction need.

* ``extractor`` (f_theta): features [B, C, h, w] of a crop (stages 1 and 3);
* ``super_keypoints`` (mu): [L, C] from stages 2 and 3;
* ``matcher_extractor`` (f_gamma) and ``matcher``: the matching network of
  stage 4 (absent before stage 4: then only MLE and MAP are possible).

``EscapeModel.from_checkpoint`` / ``to_checkpoint`` use escape_fast.checkpoint
(weights_only loading; the config inside rebuilds the modules).
"""

from __future__ import annotations

import torch
from torch import nn

from escape_fast import checkpoint
from escape_fast.models.backbone import build_extractor
from escape_fast.models.matching import MatchingNetwork

MODEL_KEYS = ("config", "extractor", "super_keypoints")


def build_matcher(config: dict, num_super: int) -> MatchingNetwork:
    m = config.get("matching", {})
    return MatchingNetwork(
        num_super, dim=config["channels"], blocks=m.get("blocks", 6), heads=m.get("heads", 8),
        head_dim=m.get("head_dim", 64), mlp=m.get("mlp", 2048), grid=config["input_size"] // 4,
        iters=m.get("iters", 50),
    )


class EscapeModel(nn.Module):
    """f_theta + mu (+ f_gamma and the matching network after stage 4)."""

    def __init__(self, config: dict, extractor: nn.Module, super_keypoints: torch.Tensor | None = None,
                 matcher_extractor: nn.Module | None = None, matcher: MatchingNetwork | None = None):
        super().__init__()
        self.config = dict(config)
        self.extractor = extractor
        if super_keypoints is None:
            super_keypoints = torch.zeros(0, config["channels"])
        self.register_buffer("super_keypoints", super_keypoints.detach().clone())
        self.matcher_extractor = matcher_extractor
        self.matcher = matcher

    @classmethod
    def build(cls, config: dict, num_super: int = 0, with_matcher: bool = False) -> "EscapeModel":
        """Modules from the config alone (random weights; load a checkpoint next)."""
        c = config
        extractor = build_extractor(c["backbone"], weights=None, channels=c["channels"])
        matcher_extractor = matcher = None
        if with_matcher:
            matcher_extractor = build_extractor(c["backbone"], weights=None, channels=c["channels"])
            matcher = build_matcher(c, num_super)
        return cls(c, extractor, torch.zeros(num_super, c["channels"]), matcher_extractor, matcher)

    def alpha_for(self, shots: int) -> float:
        """The support's weight alpha in eq. 7 / 10 for ``shots`` support images.

        ``config["alpha"]`` is a number (SPEC 7: 0.5), or "val": chosen per
        shot count on the validation categories at the end of training
        (train.choose_alpha), stored as ``config["alpha_by_shots"]``; other
        shot counts take the entry of the largest count not above them.
        """
        alpha = self.config.get("alpha", 0.5)
        if alpha != "val":
            return float(alpha)
        by_shots = {int(k): float(v) for k, v in (self.config.get("alpha_by_shots") or {}).items()}
        if not by_shots:
            raise checkpoint.CheckpointError(
                "alpha 'val' is chosen at the end of training, and this checkpoint has no choice stored "
                "(config alpha_by_shots); train it to the end, or set its config's alpha to a number")
        below = [k for k in by_shots if k <= shots]
        return by_shots[max(below) if below else min(by_shots)]

    @property
    def methods(self) -> tuple[str, ...]:
        if self.super_keypoints.shape[0] == 0:
            return ("mle",)
        return ("mle", "map", "escape") if self.matcher is not None else ("mle", "map")

    def to_checkpoint(self) -> dict:
        def cpu(state):  # a model.pt loads on a machine without the GPU it was made on
            return {k: v.detach().cpu() for k, v in state.items()}

        obj = {
            "config": self.config,
            "extractor": cpu(self.extractor.state_dict()),
            "super_keypoints": self.super_keypoints.detach().cpu(),
        }
        if self.matcher is not None:
            obj["matcher_extractor"] = cpu(self.matcher_extractor.state_dict())
            obj["matcher"] = cpu(self.matcher.state_dict())
        return obj

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu") -> "EscapeModel":
        obj = checkpoint.load(path, required=MODEL_KEYS, map_location=map_location)
        sk = obj["super_keypoints"]
        model = cls.build(obj["config"], num_super=sk.shape[0], with_matcher="matcher" in obj)
        try:
            model.extractor.load_state_dict(obj["extractor"])
            model.super_keypoints.copy_(sk)
            if model.matcher is not None:
                model.matcher_extractor.load_state_dict(obj["matcher_extractor"])
                model.matcher.load_state_dict(obj["matcher"])
        except (RuntimeError, KeyError) as exc:
            raise checkpoint.CheckpointError(f"{path!r} does not match its own config: {exc}") from exc
        return model
