"""The model's typed settings: defaults from config.DEFAULTS, the upgrade of
older checkpoints, and the model computing with what its file says."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from escape_fast import config as config_mod
from escape_fast.config import DEFAULTS, LEGACY, MatchingConfig, ModelConfig, upgrade
from escape_fast.models.escape import EscapeModel

SMALL = {"backbone": "tiny", "weights": None, "channels": 8, "input_size": 64}


def test_model_config_defaults_are_the_run_defaults():
    c = ModelConfig()
    for f in dataclasses.fields(ModelConfig):
        if f.name == "matching":
            continue
        want = DEFAULTS[f.name]
        assert getattr(c, f.name) == (tuple(want) if isinstance(want, list) else want), f.name
    for f in dataclasses.fields(MatchingConfig):
        assert getattr(c.matching, f.name) == DEFAULTS["matching"][f.name], f.name
    assert ModelConfig.from_dict(config_mod.resolve()) == c  # a run's settings; the run-only keys are ignored


def test_from_dict_types_and_ignores_run_settings():
    c = ModelConfig.from_dict({**SMALL, "stages": [8, 16], "sigma": 3, "alpha": 1, "seed": 7, "data": "/x",
                               "matching": {"blocks": 2, "epochs": 5, "lr": 1e-3}})
    assert c.stages == (8, 16) and isinstance(c.sigma, float) and c.alpha == 1.0 and isinstance(c.alpha, float)
    assert c.matching.blocks == 2 and c.matching.heads == DEFAULTS["matching"]["heads"]
    assert ModelConfig.from_dict({"alpha": "val"}).alpha == "val"
    assert c.as_dict()["stages"] == [8, 16]


def test_upgrade_fills_only_missing_keys_with_their_old_values():
    old = {**SMALL, "matching": {"blocks": 3}}  # a file written before alpha, prior_scale, ... existed
    up = upgrade(old)
    assert up["alpha"] == 0.5 and up["prior_scale"] == "support"  # the two whose default changed since
    assert {k: up[k] for k in LEGACY if k != "matching"} == {k: v for k, v in LEGACY.items() if k != "matching"}
    assert up["matching"] == {**LEGACY["matching"], "blocks": 3}
    assert old == {**SMALL, "matching": {"blocks": 3}}  # the input is not changed
    new = config_mod.resolve()
    assert upgrade(new) == new  # a current run's settings have every key


def test_an_old_checkpoint_computes_with_its_old_values(tmp_path):
    model = EscapeModel.build(SMALL, num_super=4)
    model.super_keypoints.normal_()
    path = tmp_path / "old.pt"
    model.save(path)
    obj = torch.load(path, weights_only=True)
    for key in ("alpha", "prior_scale"):
        obj["config"].pop(key)  # as a file of before those settings holds it
    torch.save(obj, path)
    loaded = EscapeModel.load(path)
    assert loaded.config.alpha == 0.5 and loaded.alpha_for(1) == 0.5 and loaded.config.prior_scale == "support"
    pooled = torch.randn(1, 1, 3, 8)
    visible = torch.ones(1, 1, 3, dtype=torch.bool)
    rescaled = loaded.prototypes("map", pooled, visible)
    raw = EscapeModel.build({**SMALL, "alpha": 0.5, "prior_scale": "raw"}, num_super=4)
    raw.super_keypoints.copy_(loaded.super_keypoints)
    assert not torch.allclose(rescaled, raw.prototypes("map", pooled, visible))  # "support" is not "raw"
    assert loaded.settings["alpha"] == 0.5  # what it saves again says so


def test_a_model_never_silently_takes_an_unknown_matching_variant():
    with pytest.raises(ValueError, match="matching.variant"):
        EscapeModel.build({**SMALL, "matching": {"variant": "other"}}, num_super=2, with_matcher=True)
