"""The ESCAPE model and its inference: what evaluation, prediction and figures call.

* ``extractor`` (f_theta): features [B, C, h, w] of a crop (stages 1 and 3);
* ``super_keypoints`` (mu): [L, C] from stages 2 and 3;
* ``matcher_extractor`` (f_gamma) and ``matcher``: the matching network of
  stage 4 (absent before stage 4: then only MLE and MAP are possible);
* ``alpha_by_shots``: the support weight of MAP / ESCAPE chosen on the
  validation categories per shot count (when ``config["alpha"]`` is "val");
* ``base_categories``: the names of the categories it was trained on, so
  that an evaluation can refuse a test set that is not novel.

Inference, in the order a CAPE episode runs it (docs/method.md, "Inference"):

1. :meth:`EscapeModel.features`: feature maps of normalized crops, the
   Gaussian-pooled feature of each support keypoint, and the matching
   network's scores of each support image;
2. :meth:`EscapeModel.prototypes`: one prototype per keypoint of the support
   set, by MLE, MAP or ESCAPE (models/adapt.py);
3. :meth:`EscapeModel.smooth` then :meth:`EscapeModel.decode`: the
   decoder's mean filter on each query's features, then the heatmaps of the
   prototypes, their argmax and the map back to image pixels.

:meth:`EscapeModel.load` reads a model file, a training run folder or (None)
the built-in checkpoint, with ``weights_only=True``; :meth:`EscapeModel.save`
writes one atomically.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from escape_fast import checkpoint, ops
from escape_fast.distributed import autocast
from escape_fast.models.adapt import assignments, escape_prototypes, map_prototypes, mle_prototypes
from escape_fast.models.backbone import build_extractor
from escape_fast.models.matching import MatchingNetwork

MODEL_KEYS = ("config", "extractor", "super_keypoints")
METHODS = ("mle", "map", "escape")
DECODE_KERNEL = 15  # the side of the decoder's mean filter (docs/method.md, "Decoding")


def build_matcher(config: dict, num_super: int) -> MatchingNetwork:
    m = config.get("matching", {})
    return MatchingNetwork(
        num_super, dim=config["channels"], blocks=m.get("blocks", 6), heads=m.get("heads", 8),
        head_dim=m.get("head_dim", 64), mlp=m.get("mlp", 2048), grid=config["input_size"] // 4,
        iters=m.get("iters", 50),
    )


@torch.no_grad()
def extract(extractor: nn.Module, images: torch.Tensor, keypoints=None, visible=None, sigma: float = 2.0,
            amp: bool = True, backend: str = "auto"):
    """(features [B, C, h, w] float32 contiguous, pooled [B, K, C] or None) of
    one extractor on normalized crops; pooled needs ``keypoints`` (heatmap
    cells [B, K, 2]) and ``visible`` [B, K]."""
    # Convolutions run faster on channels-last input (oneDNN, cuDNN). The
    # extractor's own memory format is left alone: training validates with it.
    images = images.contiguous(memory_format=torch.channels_last)
    with autocast(images.device, amp):
        f = extractor(images)
    f = f.float().contiguous()
    if keypoints is None:
        return f, None
    return f, ops.keypoint_pool(f, keypoints, visible, sigma, backend=backend)


def model_path(path=None) -> str:
    """The model file behind a ``--checkpoint`` argument: None is the
    built-in checkpoint, a folder is a training run (its model.pt)."""
    if path is None:
        from escape_fast import builtin

        return builtin.checkpoint_path()
    path = os.fspath(path)
    return os.path.join(path, "model.pt") if os.path.isdir(path) else path


class EscapeModel(nn.Module):
    """f_theta + mu (+ f_gamma and the matching network after stage 4)."""

    def __init__(self, config: dict, extractor: nn.Module, super_keypoints: torch.Tensor | None = None,
                 matcher_extractor: nn.Module | None = None, matcher: MatchingNetwork | None = None,
                 alpha_by_shots: dict | None = None, base_categories=()):
        super().__init__()
        self.config = dict(config)
        self.extractor = extractor
        if super_keypoints is None:
            super_keypoints = torch.zeros(0, config["channels"])
        self.register_buffer("super_keypoints", super_keypoints.detach().clone())
        self.matcher_extractor = matcher_extractor
        self.matcher = matcher
        self.alpha_by_shots = {int(k): float(v) for k, v in (alpha_by_shots or {}).items()}
        self.base_categories = tuple(sorted(base_categories))
        self.path: str | None = None  # the file it was loaded from

    # ------------------------------------------------------------ building and files
    @classmethod
    def build(cls, config: dict, num_super: int = 0, with_matcher: bool = False, **fields) -> "EscapeModel":
        """Modules from the config alone (random weights; load a checkpoint next)."""
        c = config
        extractor = build_extractor(c["backbone"], weights=None, channels=c["channels"])
        matcher_extractor = matcher = None
        if with_matcher:
            matcher_extractor = build_extractor(c["backbone"], weights=None, channels=c["channels"])
            matcher = build_matcher(c, num_super)
        return cls(c, extractor, torch.zeros(num_super, c["channels"]), matcher_extractor, matcher, **fields)

    def to_checkpoint(self) -> dict:
        def cpu(state):  # a model.pt loads on a machine without the GPU it was made on
            return {k: v.detach().cpu() for k, v in state.items()}

        obj = {
            "config": self.config,
            "extractor": cpu(self.extractor.state_dict()),
            "super_keypoints": self.super_keypoints.detach().cpu(),
            "alpha_by_shots": dict(self.alpha_by_shots),
            "base_categories": list(self.base_categories),
        }
        if self.matcher is not None:
            obj["matcher_extractor"] = cpu(self.matcher_extractor.state_dict())
            obj["matcher"] = cpu(self.matcher.state_dict())
        return obj

    def save(self, path) -> None:
        checkpoint.save(self.to_checkpoint(), path, kind="model")

    @classmethod
    def load(cls, path=None, map_location="cpu") -> "EscapeModel":
        """A model file, a training run folder (its model.pt), or None: the built-in checkpoint."""
        path = model_path(path)
        obj = checkpoint.load(path, required=MODEL_KEYS, map_location=map_location)
        config = dict(obj["config"])
        # files written before these were fields kept them in the config
        fields = {"alpha_by_shots": obj.get("alpha_by_shots", config.pop("alpha_by_shots", None)),
                  "base_categories": obj.get("base_categories", config.pop("base_categories", ()))}
        sk = obj["super_keypoints"]
        model = cls.build(config, num_super=sk.shape[0], with_matcher="matcher" in obj, **fields)
        try:
            model.extractor.load_state_dict(obj["extractor"])
            model.super_keypoints.copy_(sk)
            if model.matcher is not None:
                model.matcher_extractor.load_state_dict(obj["matcher_extractor"])
                model.matcher.load_state_dict(obj["matcher"])
        except (RuntimeError, KeyError) as exc:
            raise checkpoint.CheckpointError(f"{path!r} does not match its own config: {exc}") from exc
        model.path = path
        return model

    # ------------------------------------------------------------ what it can do
    @property
    def input_size(self) -> int:
        return int(self.config["input_size"])

    @property
    def sigma(self) -> float:
        """Width (heatmap cells) of the Gaussian that pools keypoint features."""
        return float(self.config.get("sigma", 2.0))

    @property
    def methods(self) -> tuple[str, ...]:
        if self.super_keypoints.shape[0] == 0:
            return ("mle",)
        return METHODS if self.matcher is not None else ("mle", "map")

    def alpha_for(self, shots: int) -> float:
        """The support's weight alpha in eq. 7 / 10 for ``shots`` support images.

        ``config["alpha"]`` is a number, or "val": chosen per shot count on
        the validation categories at the end of training (eval.alpha), kept
        in ``alpha_by_shots``; other shot counts take the entry of the
        largest count not above them.
        """
        alpha = self.config.get("alpha", 0.5)
        if alpha != "val":
            return float(alpha)
        if not self.alpha_by_shots:
            raise checkpoint.CheckpointError(
                "alpha 'val' is chosen at the end of training, and this checkpoint has no choice stored "
                "(alpha_by_shots); train it to the end, or set its config's alpha to a number")
        below = [k for k in self.alpha_by_shots if k <= shots]
        return self.alpha_by_shots[max(below) if below else min(self.alpha_by_shots)]

    def check_method(self, method: str) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose mle, map or escape")
        if method not in self.methods:
            raise checkpoint.CheckpointError(
                f"{self.path or 'this model'}: method {method!r} needs stages this model lacks (it "
                f"supports {', '.join(self.methods)})")

    # ------------------------------------------------------------ inference
    @torch.no_grad()
    def features(self, images, keypoints=None, visible=None, amp=True, backend="auto", matcher=True):
        """Features of normalized crops [B, 3, S, S].

        Returns (features [B, C, S/4, S/4] float32, pooled [B, K, C],
        match_scores [B, K, L]). The last two need ``keypoints`` (heatmap
        cells [B, K, 2]) and ``visible`` [B, K] and are None without them;
        the matching network's scores of each image as a shot are None for a
        model without one, or with ``matcher=False`` (only ESCAPE needs them).
        """
        f, pooled = extract(self.extractor, images, keypoints, visible, self.sigma, amp, backend)
        scores = None
        if pooled is not None and matcher and self.matcher is not None:
            _, tokens = extract(self.matcher_extractor, images, keypoints, visible, self.sigma, amp, backend)
            scores = self.matcher.scores(tokens, keypoints, visible)
        return f, pooled, scores

    def prototypes(self, method: str, pooled, visible, match_scores=None, alpha=None) -> torch.Tensor:
        """Prototypes [D, K, C] of D support sets (pooled [D, S, K, C], visible [D, S, K]).

        ESCAPE needs the matching network's scores of each shot, ``match_scores``
        [D, S, K, L] (see :meth:`features`). ``alpha``: the support weight of
        MAP and ESCAPE; None takes the model's (:meth:`alpha_for`).
        """
        self.check_method(method)
        if method == "mle":
            return mle_prototypes(pooled, visible)
        mu = self.super_keypoints.to(pooled.dtype)
        if alpha is None:
            alpha = self.alpha_for(pooled.shape[1])
        if method == "map":
            return map_prototypes(pooled, visible, mu, alpha)[0]
        log_p = self.matcher.assign_scores(match_scores, visible)
        return escape_prototypes(pooled, visible, mu, log_p, alpha)

    def assignments(self, method: str, pooled, visible, match_scores=None):
        """Super-keypoint matched to each keypoint of D support sets: (index
        [D, K], -1 for none; weight [D, K]). "map": simple matching (weight
        1); "escape": the matching network's most likely super-keypoint and
        its probability."""
        if method not in ("map", "escape"):
            raise ValueError(f"assignments: method must be 'map' or 'escape', got {method!r}")
        self.check_method(method)
        log_p = self.matcher.assign_scores(match_scores, visible) if method == "escape" else None
        return assignments(pooled, visible, self.super_keypoints.to(pooled.dtype), log_p)

    @staticmethod
    def smooth(features: torch.Tensor) -> torch.Tensor:
        """The decoder's mean filter on every channel (once per query, see ops.smooth_features)."""
        return ops.smooth_features(features, DECODE_KERNEL)

    @staticmethod
    def decode(smoothed, prototypes, center, scale, rotation=None, backend="auto"):
        """Image coordinates [B, K, 2] and heatmap peaks [B, K] of prototypes
        [B, K, C] on features from :meth:`smooth`: the heatmap decoding of
        docs/method.md with the linear mean filter moved before the inner
        product (equal up to float rounding)."""
        return ops.heatmap_decode(smoothed, prototypes, center, scale, kernel=1, backend=backend, rotation=rotation)
