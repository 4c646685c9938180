"""The authors' checkpoints (github khoiucd/escape-tgt) as escape_fast models.

Their released files (``baseline_splitN.pth``, ``finetune_splitN.pth``,
``escape_splitN.pth``) are mmcv checkpoints: ``{"state_dict", "meta",
"optimizer"}`` (only ``state_dict`` is needed). :func:`checkpoint_config`
gives the settings to build an :class:`~escape_fast.models.escape.EscapeModel`
from, and :func:`load_weights` maps their keys onto it; the config (:data:`AUTHORS_CONFIG`) makes it compute as their test code
does (docs/authors.md lists every convention and where it lives):

* f_theta: ``backbone.*`` (torchvision's ResNet-50 layout) and
  ``deconv.deconv_layers.*`` (three transposed convolutions, BN, ReLU);
* baseline and fine-tune files: MLE only, as their test configs run them
  (their ``keypoint_head.keypoints`` are training-time detectors, not used);
* ESCAPE files: ``keypoint_head.superkeypoints`` (mu),
  ``keypoint_head.omega`` and ``keypoint_head.matching_network.*`` (f_gamma,
  its own ResNet-50 and deconvolution head, and the transformer) as an
  :class:`~escape_fast.models.matching.AuthorsMatchingNetwork`; alpha 0.5.

Only names and shapes carry over; the computation is escape_fast's own.
"""

from __future__ import annotations

import os
import re

import torch

from escape_fast import checkpoint

# what their test configs do, as escape_fast settings (docs/authors.md)
AUTHORS_CONFIG = {
    "backbone": "resnet50", "weights": None, "head": "deconv", "channels": 256, "input_size": 256,
    "sigma": 2.0, "decode_kernel": 15, "location_prior": 0.0, "alpha": 0.5,
    "pooling": "cell",  # the Gaussian that pools a support keypoint sits on its rounded heatmap cell
    "prior_scale": "raw",  # the prior is blended as it is
    "nonpositive_peak": "corner",  # mmpose's decoder: a map whose peak is <= 0 predicts cell (-1, -1)
    "matching": {"variant": "authors", "pad_to": 68, "blocks": 6, "heads": 8, "head_dim": 64, "mlp": 2048,
                 "iters": 50},
}

MATCHER = "keypoint_head.matching_network."
# our matching block's parts, in the order of their GAT layer's eight modules
_BLOCK_PARTS = ("self_kp", "ff_kp1", "self_sk", "ff_sk1", "cross_kp", "ff_kp2", "cross_sk", "ff_sk2")


def is_authors_checkpoint(obj) -> bool:
    """An mmcv checkpoint (or a bare state dict) of the authors' PrototypeDetector."""
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    return isinstance(state, dict) and "backbone.conv1.weight" in state and any(
        k.startswith("deconv.deconv_layers.") for k in state)


def _extractor_key(ours: str, prefix: str = "") -> str:
    """Their name of a key of our ResNet-50 + deconvolution FeatureExtractor."""
    m = re.fullmatch(r"trunk\.body\.(\d+)\.(.+)", ours)
    if m:
        index, rest = int(m.group(1)), m.group(2)
        stem = {0: "conv1", 1: "bn1"}.get(index, f"layer{index - 3}")  # body: conv1, bn1, relu, maxpool, layer1-4
        return f"{prefix}backbone.{stem}.{rest}"
    m = re.fullmatch(r"head\.(\d+)\.(.+)", ours)
    if m:
        return f"{prefix}deconv.deconv_layers.{m.group(1)}.{m.group(2)}"
    raise KeyError(ours)


def _matcher_key(ours: str) -> str:
    """Their name of a key of our AuthorsMatchingNetwork."""
    if ours == "omega":
        return "keypoint_head.omega"
    if ours == "bin_score":
        return MATCHER + "bin_score"
    m = re.fullmatch(r"(kp|sk)_embed\.(.+)", ours)
    if m:
        return f"{MATCHER}to_embedding{1 if m.group(1) == 'kp' else 2}.{m.group(2)}"
    m = re.fullmatch(r"blocks\.(\d+)\.(\w+)\.(.+)", ours)
    if m:
        block, part, rest = m.groups()
        if part.startswith("ff_"):
            rest = "net." + rest  # their FeedForward wraps the same LN, Linear, GELU, Linear in .net
        elif rest.startswith("out."):
            rest = "to_" + rest
        return f"{MATCHER}GAT.layers.{block}.{_BLOCK_PARTS.index(part)}.{rest}"
    raise KeyError(ours)


def _take(module: torch.nn.Module, state: dict, name_of, path: str, what: str, used: set) -> None:
    """Load ``module`` from their ``state`` through the key map ``name_of``,
    with one error naming every missing key and every shape that differs;
    the keys read are added to ``used``."""
    ours = module.state_dict()
    missing, wrong, picked = [], [], {}
    for key, mine in ours.items():
        theirs = name_of(key)
        used.add(theirs)
        if theirs not in state:
            missing.append(theirs)
        elif tuple(state[theirs].shape) != tuple(mine.shape):
            wrong.append(f"{theirs} {list(state[theirs].shape)} (expected {list(mine.shape)})")
        else:
            picked[key] = state[theirs]
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
        if wrong:
            parts.append(f"shapes differ: {'; '.join(wrong[:3])}{'; ...' if len(wrong) > 3 else ''}")
        raise checkpoint.CheckpointError(f"{path!r} is not an authors' {what} checkpoint: {'; '.join(parts)}")
    module.load_state_dict(picked)


def kind_of(state: dict) -> str:
    """"escape" (a matching network and super-keypoints) or "prototypes" (baseline or fine-tune)."""
    return "escape" if "keypoint_head.superkeypoints" in state else "prototypes"


def checkpoint_config(obj: dict, path: str) -> tuple[dict, int]:
    """(escape_fast settings, number of super-keypoints: 0 for a baseline or
    fine-tune file) of one of the authors' checkpoint objects (as read by
    checkpoint.read): what to build the model from before :func:`load_weights`."""
    state = obj.get("state_dict", obj)
    if kind_of(state) == "escape":
        if MATCHER + "bin_score" not in state:
            raise checkpoint.CheckpointError(
                f"{path!r} has keypoint_head.superkeypoints but no {MATCHER}bin_score: not an authors' ESCAPE "
                "checkpoint")
        return {**AUTHORS_CONFIG, "authors_checkpoint": "escape"}, int(state["keypoint_head.superkeypoints"].shape[0])
    return {**AUTHORS_CONFIG, "authors_checkpoint": "prototypes"}, 0


def load_weights(model, obj: dict, path: str) -> None:
    """Load an authors' checkpoint object into ``model`` (an EscapeModel built
    from :func:`checkpoint_config`: its extractor, and for an ESCAPE file its
    matcher_extractor, matcher and super_keypoints), checking every key."""
    state = obj.get("state_dict", obj)
    kind = kind_of(state)
    # the baseline's and fine-tune's training-time detectors; ESCAPE's mu (read below)
    used = {"keypoint_head.keypoints", "keypoint_head.superkeypoints"}
    if kind == "escape":
        _take(model.matcher_extractor, state, lambda k: _extractor_key(k, MATCHER), path, "ESCAPE", used)
        _take(model.matcher, state, _matcher_key, path, "ESCAPE", used)
        model.super_keypoints.copy_(state["keypoint_head.superkeypoints"].float())
    # the ESCAPE file's own f_theta: its BN statistics moved on while the matching network trained
    what = "ESCAPE" if kind == "escape" else "baseline or fine-tune"
    _take(model.extractor, state, _extractor_key, path, what, used)
    unknown = sorted(set(state) - used)
    if unknown:  # another architecture: computing without these would not be their model
        raise checkpoint.CheckpointError(
            f"{path!r} is not an authors' {what} checkpoint: {len(unknown)} weights escape_fast does not know "
            f"({', '.join(unknown[:4])}{', ...' if len(unknown) > 4 else ''})")


# PCK@0.2 of their released files by split (1..5), as their README's results table gives them
# (1-shot and 5-shot; the same file serves both). Used to set their figures beside ours.
RELEASED_PCK = {
    ("baseline", 1): (84.35, 79.94, 79.91, 80.23, 79.33),
    ("baseline", 5): (90.37, 85.85, 84.87, 86.69, 85.53),
    ("finetune", 1): (84.16, 81.10, 80.21, 80.48, 79.70),
    ("finetune", 5): (90.23, 86.82, 84.94, 87.00, 85.83),
    ("escape", 1): (85.98, 82.72, 81.35, 82.00, 80.99),
    ("escape", 5): (91.19, 87.57, 85.46, 87.69, 86.42),
}
_RELEASED_NAME = re.compile(r"^(baseline|finetune|escape)_split([1-5])\.pth$")


def released_file(path) -> tuple[str, int] | None:
    """(kind, split) when ``path`` is named as one of their released files (``escape_split3.pth``)."""
    m = _RELEASED_NAME.match(os.path.basename(str(path or "")))
    return (m.group(1), int(m.group(2))) if m else None
