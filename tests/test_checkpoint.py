"""Checkpoints: atomic writes, safe loading, clear errors."""

from __future__ import annotations

import os

import pytest
import torch

from escape_fast import checkpoint


def test_round_trip_and_header(tmp_path):
    path = tmp_path / "run" / "ckpt.pt"
    checkpoint.save({"model": {"w": torch.arange(3.0)}, "step": 7, "config": {"lr": 5e-4}}, path, kind="baseline")
    obj = checkpoint.load(path, kind="baseline", required=["model", "step"])
    assert obj["step"] == 7 and torch.equal(obj["model"]["w"], torch.arange(3.0))
    assert obj["format_version"] == checkpoint.FORMAT_VERSION
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temporary left behind


def test_errors_name_the_file(tmp_path):
    good = tmp_path / "good.pt"
    checkpoint.save({"model": {}}, good, kind="baseline")
    with pytest.raises(checkpoint.CheckpointError, match="good.pt.*'baseline'.*expected 'matching'"):
        checkpoint.load(good, kind="matching")
    with pytest.raises(checkpoint.CheckpointError, match="good.pt.*lacks 'super_keypoints'"):
        checkpoint.load(good, required=["super_keypoints"])
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(checkpoint.CheckpointError, match="other.pt.*not an escape_fast checkpoint"):
        checkpoint.load(other)
    old = tmp_path / "old.pt"
    torch.save({"format": "escape_fast", "format_version": 0, "escape_fast": "0.0.1"}, old)
    with pytest.raises(checkpoint.CheckpointError, match="old.pt.*format 0"):
        checkpoint.load(old)
    torn = tmp_path / "torn.pt"
    torn.write_bytes(good.read_bytes()[:50])
    with pytest.raises(checkpoint.CheckpointError, match="torn.pt.*cannot be read"):
        checkpoint.load(torn)
    with pytest.raises(checkpoint.CheckpointError, match="nothing.pt.*does not exist"):
        checkpoint.load(tmp_path / "nothing.pt")


def test_code_in_a_pickle_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "escape_fast", "format_version": 1, "fn": os.getcwd}, evil)
    with pytest.raises(checkpoint.CheckpointError, match="evil.pt.*cannot be read safely"):
        checkpoint.load(evil)


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.save({"step": 1}, path, kind="baseline")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"step": 2}, path, kind="baseline")
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
