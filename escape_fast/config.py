"""Run configuration: defaults, a YAML file, then ``--set key.sub=value`` overrides.

The resolved configuration is saved into the run folder (config.yaml) and
inside every checkpoint, so a run can be resumed and a model rebuilt.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field, fields

import yaml

from escape_fast.errors import ConfigError
from escape_fast.files import atomic_write

DEFAULTS: dict = {
    # data
    "data": None,  # MP-100-format root (annotations/, images/)
    "split": 1,
    "input_size": 256,
    "sigma": 2.0,
    "workers": 2,
    # the training targets: "exact" (a Gaussian on the keypoint's position, weight 0 when its 3-sigma
    # window misses the grid) or "cell" (the authors', mmpose 0.29's TopDownGenerateTarget: a
    # Gaussian on the cell int(x + 0.5), int truncating toward zero, and their integer window
    # bounds for the weight; docs/authors.md, "Their training, step by step")
    "targets": "exact",
    # the training augmentation: scale x (1 + scale * d_s), rotation * d_r degrees with probability
    # rotation_prob (else 0), a horizontal flip with probability 1/2 where the category has flip
    # pairs. distribution "uniform": d_s, d_r ~ U(-1, 1); "normal" (the authors', mmpose 0.29's
    # TopDownGetRandomScaleRotation): d_s ~ N(0, 1) clipped to [-1, 1], d_r ~ N(0, 1) clipped to [-2, 2]
    # a rotated training crop's matrix: "float32" (escape_fast's) or "float64" (the authors':
    # mmpose's get_affine_transform under numpy 1, to the bit; 2e-6 relative apart)
    "rotated_crops": "float32",
    "augment": {"scale": 0.15, "rotation": 15.0, "rotation_prob": 1.0, "flip": True, "distribution": "uniform"},
    # the instances of a training epoch: "balanced" (per_category instances of every base category)
    # or "shuffle" (the authors': every instance once, in a seeded random order)
    "sampling": "balanced",
    # the heatmap loss of stages 1 and 3: scale x the weighted squared error, averaged over the
    # batch's keypoint slots (slots null) or summed and divided by B x slots x H x W (the
    # authors' pad every category to 68). scale 0.5 is the HRNet reference code's factor;
    # mmpose 0.29's JointsMSELoss (the authors') has none: 1.0
    "heatmap_loss": {"scale": 0.5, "slots": None},
    # model
    "backbone": "resnet50",
    "weights": "imagenet",  # None, "imagenet" or a state-dict path for the trunk
    "channels": 256,  # of the deconv head; a hypercolumn has its trunk's widths
    # the initial weights of the head's transposed convolutions: "torch" (PyTorch's default) or
    # "normal" (the authors': N(0, 0.001^2), their CustomDeconv.init_weights)
    "head_init": "torch",
    # "deconv" (the paper's) or "hypercolumn" (a pretrained trunk's multi-scale maps at stride 4, docs/method.md)
    "head": "deconv",
    "stages": [8, 16, 32],  # the hypercolumn's trunk strides
    "adapter": False,  # the hypercolumn's trainable 1x1 convolution (starts at zero)
    "frozen_trunk": False,  # the trunk is not trained (and, with pip weights, not stored in checkpoints)
    "decode_kernel": 15,  # side of the decoder's mean filter, in heatmap cells
    "location_prior": 0.0,  # lambda of the decoder's location prior (0: none; docs/method.md)
    # support weight in eq. 7 / 10: "val" (chosen on the validation categories
    # at the end of training, see eval.alpha.choose_alpha) or a number in [0, 1]
    # (the authors' code fixes 0.5; docs/method.md, "Blending the prior")
    "alpha": "val",
    # where each keypoint's pooling Gaussian sits: "exact" (its position) or "cell" (the
    # authors': its rounded heatmap cell, their training target itself; docs/authors.md)
    "pooling": "exact",
    # mu of each super-keypoint: "detectors" (the authors': the stage-3 super-keypoint detectors)
    # or "features" (the mean of its members' mean unit features under the fine-tuned extractor,
    # paper eq. 4); the detectors, blended raw, won on validation categories (RESULTS.md)
    "prior_source": "detectors",
    # the prior in the blend: "raw" (the authors': as it is) or "support" (brought to the support
    # mean's norm)
    "prior_scale": "raw",
    # a heatmap whose peak is <= 0: "keep" its argmax, or "corner" (mmpose's cell (-1, -1))
    "nonpositive_peak": "keep",
    # run
    "seed": 0,
    "device": "auto",
    "amp": True,  # bf16 autocast on GPU
    "channels_last": True,  # on GPU
    "compile": False,
    "batch_size": 16,  # global batch (split over processes)
    "per_category": None,  # training instances per base category per epoch (None: the mean count)
    "val_every": 1,  # epochs
    "val_draws": 20,  # support draws per val category
    "val_queries": 15,
    # each stage's schedule: Adam at lr, a linear warm-up over ``warmup`` steps, x gamma at each
    # milestone epoch. warmup_rule "ours": lr x (step + 1) / warmup; "mmcv" (the authors', mmcv's
    # linear warm-up): lr x (1 - (1 - step / warmup) x (1 - warmup_ratio)), lr x warmup_ratio at step 0
    "baseline": {"epochs": 60, "lr": 5e-4, "warmup": 500, "milestones": [40, 50], "gamma": 0.1,
                 "warmup_rule": "ours", "warmup_ratio": 0.001},
    # growth: "shared" (the authors': a peak takes each category's best, even one already taken;
    # the default since it won on validation, benchmarks/RESULTS.md) or "exclusive" (unassigned
    # keypoints only, the next one of a category whose best is taken)
    "cluster": {"source": "features", "threshold": 0.8, "k": 6, "growth": "shared"},
    # init: stage 3 starts f_theta from stage 1's ("baseline") or again from the trunk's
    # pretrained weights ("pretrained", the authors')
    "finetune": {"epochs": 20, "lr": 1e-4, "warmup": 100, "milestones": [15], "gamma": 0.1,
                 "warmup_rule": "ours", "warmup_ratio": 0.001, "init": "baseline"},
    # variant: "ours" or "authors" (their tokens, blocks and norm clamp; pad_to: the keypoint
    # count their padded tokens bring every category to; docs/authors.md)
    "matching": {"epochs": 20, "lr": 1e-4, "warmup": 100, "milestones": [15], "gamma": 0.1,
                 "warmup_rule": "ours", "warmup_ratio": 0.001,
                 "blocks": 6, "heads": 8, "head_dim": 64, "mlp": 2048, "iters": 50,
                 "variant": "ours", "pad_to": 68},
}

# the values each named setting accepts (checked by resolve)
CHOICES = {
    ("pooling",): ("exact", "cell"),
    ("prior_source",): ("features", "detectors"),
    ("prior_scale",): ("support", "raw"),
    ("nonpositive_peak",): ("keep", "corner"),
    ("cluster", "source"): ("features", "prototypes"),
    ("cluster", "growth"): ("exclusive", "shared"),
    ("finetune", "init"): ("baseline", "pretrained"),
    ("matching", "variant"): ("ours", "authors"),
    ("targets",): ("exact", "cell"),
    ("augment", "distribution"): ("uniform", "normal"),
    ("rotated_crops",): ("float32", "float64"),
    ("sampling",): ("balanced", "shuffle"),
    ("head_init",): ("torch", "normal"),
    ("baseline", "warmup_rule"): ("ours", "mmcv"),
    ("finetune", "warmup_rule"): ("ours", "mmcv"),
    ("matching", "warmup_rule"): ("ours", "mmcv"),
}


def _merge(base: dict, update: dict, where: str, schema: dict | None = None) -> dict:
    """``base`` updated by ``update``; a string becomes a number where the
    setting's default in ``schema`` (DEFAULTS) is one."""
    schema = DEFAULTS if schema is None else schema
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key not in base:
            raise ConfigError(f"{where}: unknown setting {key!r} (known: {', '.join(sorted(base))})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {key!r} must be a mapping, got {value!r}")
            out[key] = _merge(base[key], value, f"{where}: {key}", schema.get(key, {}))
        else:
            out[key] = _coerce(schema.get(key, base[key]), value, f"{where}: {key}")
    return out


def _coerce(default, value, where: str):
    """Numbers written as strings ('1e-3' is a string to YAML 1.1) become numbers."""
    if isinstance(default, bool) or default is None or not isinstance(value, str):
        return value
    if isinstance(default, (int, float)):
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
        return int(number) if isinstance(default, int) and number.is_integer() else number
    return value


def parse_override(text: str) -> dict:
    """'baseline.epochs=2' -> {'baseline': {'epochs': 2}} (the value is read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw)
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def resolve(files=None, overrides=(), base: dict | None = None) -> dict:
    """DEFAULTS (or ``base``) <- each YAML file of ``files`` (one path or a
    list, later ones win) <- each override dict, checked."""
    cfg = copy.deepcopy(base if base is not None else DEFAULTS)
    for file in [files] if isinstance(files, str) else (files or []):
        if not os.path.isfile(file):
            raise ConfigError(f"config file {file!r} does not exist")
        with open(file) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: the top level must be a mapping")
        cfg = _merge(cfg, loaded, file)
    for o in overrides:
        cfg = _merge(cfg, o, "--set")
    check_alpha(cfg["alpha"])
    check_training(cfg)
    for path, allowed in CHOICES.items():
        value = cfg
        for part in path:
            value = value[part]
        if value not in allowed:
            raise ConfigError(f"{'.'.join(path)} must be one of {', '.join(allowed)}, got {value!r}")
    return cfg


def check_alpha(alpha) -> None:
    """The support weight of eq. 7 / 10: 'val' or a number in [0, 1]."""
    if alpha != "val" and not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 <= alpha <= 1):
        raise ConfigError(f"alpha must be 'val' or a number in [0, 1], got {alpha!r}")


def _number(value, where: str, low: float, high: float = float("inf"), low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        raise ConfigError(f"{where} must be a number {'>' if low_open else '>='} {low:g}"
                          f"{f' and <= {high:g}' if high != float('inf') else ''}, got {value!r}")


def check_training(cfg: dict) -> None:
    """The training settings that are numbers: heatmap_loss, augment and the warm-up ratios."""
    loss = cfg["heatmap_loss"]
    _number(loss["scale"], "heatmap_loss.scale", 0.0, low_open=True)
    slots = loss["slots"]
    if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
        raise ConfigError(f"heatmap_loss.slots must be null or a whole number >= 1, got {slots!r}")
    aug = cfg["augment"]
    _number(aug["scale"], "augment.scale", 0.0, 1.0)
    _number(aug["rotation"], "augment.rotation", 0.0)
    _number(aug["rotation_prob"], "augment.rotation_prob", 0.0, 1.0)
    if not isinstance(aug["flip"], bool):
        raise ConfigError(f"augment.flip must be true or false, got {aug['flip']!r}")
    for stage in ("baseline", "finetune", "matching"):
        _number(cfg[stage]["warmup_ratio"], f"{stage}.warmup_ratio", 0.0, 1.0)


def save(cfg: dict, path: str) -> None:
    with atomic_write(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)


# --------------------------------------------------------------------------
# the model's settings, typed
# --------------------------------------------------------------------------
# What a checkpoint written before a setting existed was computed with: EscapeModel.load fills
# these in (upgrade) for the keys its config lacks. Where the value differs from DEFAULTS, the
# default changed after such files were written:
# * alpha 0.5: a fixed support weight, before alpha "val" (chosen on the validation categories)
#   became the default;
# * prior_scale "support": the prior brought to the support mean's norm, before "raw" (the
#   authors' rule) won on validation and became the default.
# The others are the computation of those files as it still is the default.
LEGACY: dict = {
    "head": "deconv", "stages": [8, 16, 32], "adapter": False, "frozen_trunk": False, "sigma": 2.0,
    "decode_kernel": 15, "location_prior": 0.0, "alpha": 0.5, "pooling": "exact", "prior_source": "detectors",
    "prior_scale": "support", "nonpositive_peak": "keep",
    "matching": {"blocks": 6, "heads": 8, "head_dim": 64, "mlp": 2048, "iters": 50, "variant": "ours",
                 "pad_to": 68},
}


def upgrade(config: dict) -> dict:
    """A model's settings as stored in a checkpoint, with every key LEGACY
    names filled in where the file predates it (a copy; nothing else changes)."""
    out = copy.deepcopy(dict(config))
    for key, value in LEGACY.items():
        if isinstance(value, dict):
            out[key] = {**value, **(out.get(key) or {})}
        elif key not in out:
            out[key] = copy.deepcopy(value)
    return out


@dataclass(frozen=True)
class MatchingConfig:
    """The matching network's architecture (the ``matching`` settings without their training schedule)."""

    blocks: int = DEFAULTS["matching"]["blocks"]
    heads: int = DEFAULTS["matching"]["heads"]
    head_dim: int = DEFAULTS["matching"]["head_dim"]
    mlp: int = DEFAULTS["matching"]["mlp"]
    iters: int = DEFAULTS["matching"]["iters"]  # Sinkhorn iterations
    variant: str = DEFAULTS["matching"]["variant"]  # "ours" or "authors" (docs/authors.md)
    pad_to: int = DEFAULTS["matching"]["pad_to"]  # the authors' variant: keypoints per padded category


@dataclass(frozen=True)
class ModelConfig:
    """What an EscapeModel computes, as typed fields (the comments of DEFAULTS
    say what each means); the run's other settings (data, schedules, seeds)
    are not the model's. Built by :meth:`from_dict` from a run's resolved
    settings or a checkpoint's (after :func:`upgrade`)."""

    backbone: str = DEFAULTS["backbone"]
    weights: str | None = DEFAULTS["weights"]
    channels: int = DEFAULTS["channels"]
    head: str = DEFAULTS["head"]
    stages: tuple[int, ...] = tuple(DEFAULTS["stages"])
    adapter: bool = DEFAULTS["adapter"]
    frozen_trunk: bool = DEFAULTS["frozen_trunk"]
    input_size: int = DEFAULTS["input_size"]
    sigma: float = DEFAULTS["sigma"]
    decode_kernel: int = DEFAULTS["decode_kernel"]
    location_prior: float = DEFAULTS["location_prior"]
    alpha: float | str = DEFAULTS["alpha"]
    pooling: str = DEFAULTS["pooling"]
    prior_source: str = DEFAULTS["prior_source"]
    prior_scale: str = DEFAULTS["prior_scale"]
    nonpositive_peak: str = DEFAULTS["nonpositive_peak"]
    matching: MatchingConfig = field(default_factory=MatchingConfig)

    @classmethod
    def from_dict(cls, settings: dict) -> ModelConfig:
        """The model's fields of ``settings`` (missing ones take DEFAULTS; other keys are ignored)."""
        names = {f.name for f in fields(cls)} - {"matching"}
        values = {k: v for k, v in settings.items() if k in names}
        if "stages" in values:
            values["stages"] = tuple(int(s) for s in values["stages"])
        for key, kind in (("channels", int), ("input_size", int), ("decode_kernel", int), ("sigma", float),
                          ("location_prior", float), ("adapter", bool), ("frozen_trunk", bool)):
            if key in values:
                values[key] = kind(values[key])
        if values.get("alpha", "val") != "val":
            values["alpha"] = float(values["alpha"])
        m = settings.get("matching") or {}
        matching = MatchingConfig(**{f.name: m[f.name] for f in fields(MatchingConfig) if f.name in m})
        return cls(**values, matching=matching)

    def as_dict(self) -> dict:
        """The fields as plain values (lists for tuples), as a checkpoint's config stores them."""
        out = asdict(self)
        out["stages"] = list(self.stages)
        return out
