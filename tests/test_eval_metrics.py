"""PCK (docs/method.md, "Evaluation") against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from escape_fast.eval.metrics import (
    THRESHOLDS,
    pck_curve,
    pck_per_query,
    summarize_pck,
    valid_keypoints,
)


def test_strict_threshold_and_max_side_normalization():
    gt = torch.zeros(1, 4, 2, dtype=torch.float64)
    # box 100 x 40: threshold 0.2 * 100 = 20 px, strictly
    pred = torch.tensor([[[12.0, 16.0], [12.0, 15.99], [0.0, 19.0], [30.0, 0.0]]], dtype=torch.float64)
    valid = torch.ones(1, 4, dtype=torch.bool)
    assert float(pck_per_query(pred, gt, valid, torch.tensor([100.0]))) == pytest.approx(2 / 4)
    # numpy inputs work the same
    assert float(pck_per_query(pred.numpy(), gt.numpy(), valid.numpy(), np.array([100.0]))) == pytest.approx(0.5)
    # at 0.25 (25 px) the first three hit
    assert float(pck_per_query(pred, gt, valid, torch.tensor([100.0]), 0.25)) == pytest.approx(3 / 4)


def test_valid_keypoints_need_query_and_every_support():
    qv = torch.tensor([[1, 1, 1, 0, 1]], dtype=torch.bool)
    sv = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 1]], dtype=torch.bool)  # S = 2 shared
    mask = torch.tensor([1, 1, 1, 1, 0], dtype=torch.bool)  # slot 4 is padding
    assert valid_keypoints(qv, sv, mask).tolist() == [[True, False, False, False, False]]
    assert valid_keypoints(qv, sv[None]).tolist() == [[True, False, False, False, True]]


def test_query_without_valid_keypoint_scores_zero():
    pred = torch.zeros(2, 3, 2)
    gt = torch.zeros(2, 3, 2)
    valid = torch.tensor([[False] * 3, [True, False, False]])
    out = pck_per_query(pred, gt, valid, torch.tensor([10.0, 10.0]))
    assert out.tolist() == [0.0, 1.0]


def test_curve_hand_case():
    gt = torch.zeros(1, 5, 2, dtype=torch.float64)
    d = torch.tensor([4.0, 9.0, 14.0, 19.0, 24.0], dtype=torch.float64)  # box 100: thresholds 5..25 px
    pred = torch.stack((d, torch.zeros(5, dtype=torch.float64)), -1)[None]
    curve = pck_curve(pred, gt, torch.ones(1, 5, dtype=torch.bool), torch.tensor([100.0]))
    assert curve[:, 0].tolist() == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_summary_means_ci_and_mpck():
    # category 1: draw 0 -> queries 1, 0; draw 1 -> 1, 1. category 2: draw 0 -> 0.5, 0.5
    main = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.5], dtype=torch.float64)
    scores = torch.stack([main * 0.5, main, main, main, main])  # T = 5 thresholds
    s = summarize_pck(scores, [1, 1, 1, 1, 2, 2], [0, 0, 1, 1, 0, 0])
    assert s.pck[0.2] == pytest.approx(4 / 6)
    assert s.pck[0.05] == pytest.approx(2 / 6)
    assert s.mpck == pytest.approx((2 / 6 + 4 * 4 / 6) / 5)
    assert s.per_category[1][0.2] == pytest.approx(0.75) and s.per_category[2][0.2] == pytest.approx(0.5)
    draw_means = np.array([0.5, 1.0, 0.5])
    half = 1.96 * draw_means.std(ddof=1) / math.sqrt(3)
    assert s.ci95 == pytest.approx((4 / 6 - half, 4 / 6 + half))
    assert s.num_pairs == 6 and s.num_draws == 3 and s.pck_main == s.pck[0.2]
    assert s.as_dict()["pck"]["0.20"] == pytest.approx(4 / 6)


def test_summary_of_draws_matches_direct_computation():
    rng = np.random.default_rng(0)
    scores, cats, draws = [], [], []
    rows = []
    for cat in (4, 9):
        for draw in range(3):
            q, k = 5, 6
            gt = rng.uniform(0, 100, (q, k, 2))
            pred = gt + rng.normal(0, 12, (q, k, 2))
            qv = rng.random((q, k)) < 0.8
            sv = rng.random((1, k)) < 0.9
            size = rng.uniform(40, 120, q)
            scores.append(pck_curve(pred, gt, valid_keypoints(qv, sv), size))
            cats += [cat] * q
            draws += [draw] * q
            valid = qv & sv
            dist = np.linalg.norm(pred - gt, axis=-1)
            for t in THRESHOLDS:
                hit = ((dist < t * size[:, None]) & valid).sum(1)
                n = valid.sum(1)
                rows.append((t, cat, np.where(n > 0, hit / np.maximum(n, 1), 0.0)))
    s = summarize_pck(torch.cat(scores, 1), torch.tensor(cats), torch.tensor(draws))
    assert s.num_pairs == 30 and s.num_draws == 6
    for t in THRESHOLDS:
        allq = np.concatenate([r for tt, _, r in rows if tt == t])
        assert s.pck[t] == pytest.approx(allq.mean())
        for cat in (4, 9):
            cq = np.concatenate([r for tt, c, r in rows if tt == t and c == cat])
            assert s.per_category[cat][t] == pytest.approx(cq.mean())


def test_paired_difference_by_hand():
    from escape_fast.eval.metrics import paired_difference

    # two categories x two draws x two queries; b = a + a draw-dependent shift
    a = torch.tensor([0.5, 1.0, 0.0, 0.5, 1.0, 1.0, 0.25, 0.75], dtype=torch.float64)
    shift = torch.tensor([0.1, 0.1, 0.3, 0.3, 0.2, 0.2, 0.0, 0.0], dtype=torch.float64)
    cats = torch.tensor([1, 1, 1, 1, 2, 2, 2, 2])
    draws = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    mean, half = paired_difference(a, a + shift, cats, draws)
    per_draw = torch.tensor([0.1, 0.3, 0.2, 0.0], dtype=torch.float64)
    assert mean == pytest.approx(0.15)
    assert half == pytest.approx(1.96 * float(per_draw.std()) / math.sqrt(4))
    # a method against itself differs by exactly nothing
    assert paired_difference(a, a, cats, draws) == (0.0, 0.0)
    with pytest.raises(ValueError, match="paired_difference"):
        paired_difference(a, a[:4], cats, draws)
