"""Adaptation methods and the matching network."""

from __future__ import annotations

import itertools

import torch

from escape_fast import ops
from escape_fast.models import (
    MatchingNetwork,
    blend,
    escape_prototypes,
    hungarian_assignment,
    map_prototypes,
    matching_loss,
    mle_prototypes,
)


def test_mle_is_the_mean_over_visible_shots():
    f = torch.tensor([[[[1.0, 0.0]], [[3.0, 2.0]], [[100.0, 100.0]]]])  # [1, 3 shots, 1 kp, 2]
    vis = torch.tensor([[[True], [True], [False]]])
    assert mle_prototypes(f, vis).tolist() == [[[2.0, 1.0]]]


def test_hungarian_is_the_optimal_distinct_assignment():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(1, 4, 3, generator=g)
    sk = torch.randn(6, 3, generator=g)
    valid = torch.tensor([[True, True, False, True]])
    assign = hungarian_assignment(means, valid, sk)[0].tolist()
    assert assign[2] == -1
    rows = [0, 1, 3]
    unit = torch.nn.functional.normalize
    best = min(  # the cost is the squared distance of directions: norms do not count
        itertools.permutations(range(6), 3),
        key=lambda p: sum(float(((unit(means[0, r], dim=0) - unit(sk[z], dim=0)) ** 2).sum())
                          for r, z in zip(rows, p)),
    )
    assert [assign[r] for r in rows] == list(best)
    # rescaling the super-keypoints (prototypes live at the heatmap's scale) changes nothing
    assert hungarian_assignment(means, valid, sk * 0.03)[0].tolist() == assign


def test_blend_brings_the_prior_to_the_support_scale():
    g = torch.Generator().manual_seed(2)
    means = torch.randn(3, 4, 8, generator=g) * 5.0
    prior = torch.randn(3, 4, 8, generator=g) * 0.1
    w = blend(means, prior, 0.5)
    unit = torch.nn.functional.normalize
    expected = 0.5 * means + 0.5 * unit(prior, dim=-1) * means.norm(dim=-1, keepdim=True)
    assert torch.allclose(w, expected, atol=1e-6)
    # prior and support of equal norm: eq. 7 as written
    same = prior / prior.norm(dim=-1, keepdim=True) * means.norm(dim=-1, keepdim=True)
    assert torch.allclose(blend(means, same, 0.3), 0.3 * means + 0.7 * same, atol=1e-5)
    # the prior's own scale does not matter
    assert torch.allclose(blend(means, prior * 40.0, 0.5), w, atol=1e-5)


def test_map_and_escape_blend_with_alpha():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(2, 1, 3, 4, generator=g)
    vis = torch.ones(2, 1, 3, dtype=torch.bool)
    sk = torch.randn(5, 4, generator=g)
    w, assign = map_prototypes(f, vis, sk, alpha=0.25)
    assert torch.allclose(w, blend(f[:, 0], sk[assign], 0.25))
    # a one-hot log assignment makes ESCAPE equal to MAP with the same matches
    log_q = torch.full((2, 4, 5), -torch.inf)
    log_q[:, :3].scatter_(2, assign[..., None], 0.0)
    assert torch.allclose(escape_prototypes(f, vis, sk, log_q, alpha=0.25), w)
    # alpha = 1 is MLE
    assert torch.allclose(escape_prototypes(f, vis, sk, log_q.softmax(-1).log(), alpha=1.0), f[:, 0])


def _small_net(num_super=7):
    return MatchingNetwork(num_super, dim=32, blocks=2, heads=2, head_dim=8, mlp=64, grid=16, iters=20,
                           backend="reference")


def test_matching_network_shapes_masks_and_multi_shot():
    torch.manual_seed(0)
    net = _small_net()
    feats = torch.randn(3, 5, 32)
    kps = torch.rand(3, 5, 2) * 16
    vis = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    log_p = net(feats, kps, vis)
    assert log_p.shape == (3, 6, 7) and torch.isfinite(log_p).all()
    # invisible keypoints do not change what the visible ones get
    feats2 = feats.clone()
    feats2[~vis] = torch.randn(int((~vis).sum()), 32) * 10
    assert torch.allclose(net(feats2, kps, vis)[0, :3], log_p[0, :3], atol=1e-5)
    # one shot through assign_scores equals the single-shot forward (on the
    # rows that carry meaning: visible keypoints and the dustbin)
    per_image = net.scores(feats, kps, vis)  # [3, 5, L]
    one = net.assign_scores(per_image[:, None], vis[:, None])
    rows = torch.cat((vis, torch.ones(3, 1, dtype=torch.bool)), 1)
    assert torch.allclose(one[rows], log_p[rows], atol=1e-5)
    # scores computed once per image and gathered into support sets (what the
    # evaluation does) equal the transport of the visibility-weighted mean of
    # the shots' scores, computed here by hand
    sets = torch.tensor([[0, 1], [2, 0], [1, 1]])
    gathered = net.assign_scores(per_image[sets], vis[sets])
    w = vis[sets].float()[..., None]
    fused = (per_image[sets] * w).sum(1) / w.sum(1).clamp_min(1)
    direct = ops.sinkhorn_log(fused, net.bin_score, vis[sets].any(1), net.iters)
    assert torch.allclose(direct, gathered, atol=1e-5, equal_nan=True)



def test_matching_scores_per_image_do_not_depend_on_the_batch():
    """The super-keypoint tokens run batch 1 until the first cross-attention
    and broadcast afterwards: each image's scores are those it gets alone,
    and every parameter (omega included) gets a gradient."""
    torch.manual_seed(1)
    net = _small_net()
    feats = torch.randn(4, 6, 32)
    kps = torch.rand(4, 6, 2) * 16
    vis = torch.rand(4, 6) > 0.3
    batch = net.scores(feats, kps, vis)
    for i in range(4):
        alone = net.scores(feats[i : i + 1], kps[i : i + 1], vis[i : i + 1])
        torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    batch.square().sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == ["bin_score"], missing  # the dustbin only enters the transport

def test_matching_network_learns_a_planted_assignment():
    torch.manual_seed(0)
    num_super, k = 7, 5
    protos = torch.randn(num_super, 32)
    net = _small_net(num_super)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(150):
        labels = torch.stack([torch.randperm(num_super)[:k] for _ in range(16)])
        feats = protos[labels] + 0.1 * torch.randn(16, k, 32)
        vis = torch.rand(16, k) > 0.2
        log_p = net(feats, torch.rand(16, k, 2) * 16, vis)
        loss, acc = matching_loss(log_p, labels, vis)
        if step == 0:
            first = loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    assert acc.item() > 2.0 / num_super  # well above chance (1 / L)


def test_matching_loss_hand_case():
    log_p = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5]]]))
    labels = torch.tensor([[0, 1]])
    valid = torch.tensor([[True, True]])
    loss, acc = matching_loss(log_p, labels, valid)
    expect = -(torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.8))) / 2 - torch.log(torch.tensor(0.5))
    assert torch.allclose(loss, expect) and acc.item() == 1.0


def test_an_episode_through_the_model_api():
    """encode -> adapt -> predict: the shapes each step promises, the
    location prior's positions, indexing support sets out of a bank, and the
    fast decoding (smoothed features) equal to the straightforward one."""
    from escape_fast.data.transforms import CropBatch
    from escape_fast.models.escape import EscapeModel

    torch.manual_seed(0)
    small = {"backbone": "tiny", "weights": None, "channels": 8, "input_size": 64, "decode_kernel": 5}
    images = torch.randn(4, 3, 64, 64)
    cells = torch.rand(4, 3, 2) * 15
    visible = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    crops = CropBatch(torch.rand(4, 2) * 100 + 50, torch.rand(4, 2) + 0.5, torch.zeros(4))
    for prior in (0.0, 2.0):
        model = EscapeModel.build({**small, "location_prior": prior}).eval()
        assert model.grid == 16
        features, bank = model.encode(images, cells, visible, amp=False)
        assert features.shape == (4, 8, 16, 16) and bank.pooled.shape == (4, 3, 8) and bank.match_scores is None
        draws = torch.tensor([[0, 1], [2, 3]])  # two 2-shot support sets out of the bank
        support = bank[draws]
        assert support.pooled.shape == (2, 2, 3, 8) and torch.equal(support.visible[1], bank.visible[2:])
        adapted = model.adapt(support, "mle")
        assert adapted.prototypes.shape == (2, 3, 8)
        assert adapted.known.tolist() == [[True, True, False], [True, True, True]]
        assert (adapted.positions is None) == (prior == 0)
        queries = torch.tensor([2, 0])  # query 2 against set 0, query 0 against set 1
        fast, peaks = model.predict(model.smooth(features[queries]), adapted, crops[queries])
        slow, _ = model.predict(features[queries], adapted, crops[queries], "reference", smoothed=False)
        assert fast.shape == (2, 3, 2) and peaks.shape == (2, 3)
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-3)
