"""The authors' training as settings (issue 29; docs/authors.md, "Their training, step by step"):
the parts of their stage-1 step that can be checked by hand, without their code. Their code
itself was compared by benchmarks/authors_training_parity.py (RESULTS.md, "The authors'
training, side by side")."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from escape_fast import config as config_mod
from escape_fast import train
from escape_fast.data import KeypointDataset, ShuffleSampler, cell_targets, gaussian_targets, load_coco
from escape_fast.models.losses import heatmap_loss

RECIPE = os.path.join(os.path.dirname(__file__), "..", "escape_fast", "assets", "recipes", "authors.yaml")
G = np.exp(-np.arange(0, 73, dtype=np.float32) / np.float32(8.0))  # exp(-d^2 / (2 sigma^2)), sigma 2, float32


def _one(x, y, visible=True, size=(64, 64)):
    t, w = cell_targets(np.array([[x, y]]), np.array([visible]), size, 2.0)
    return t[0].numpy(), float(w[0])


# --------------------------------------------------------------------------
# targets: mmpose 0.29's TopDownGenerateTarget
# --------------------------------------------------------------------------
def test_the_gaussian_sits_on_the_rounded_cell():
    t, w = _one(10.4, 20.6)  # int(10.9) = 10, int(21.1) = 21
    assert w == 1.0 and t[21, 10] == 1.0 and t.max() == 1.0
    assert t[21, 11] == G[1] and t[20, 10] == G[1] and t[22, 12] == G[1 + 4]  # d^2 = 1 and 5 from (10, 21)
    assert t[21, 16] == G[36] and t[21, 17] == 0.0 and t[27, 10] == G[36] and t[28, 10] == 0.0  # cut at 3 sigma
    assert t.dtype == np.float32
    # a tie rounds up (int(6.5 + 0.5) = 7); the exact target peaks between the two cells
    t, _ = _one(6.5, 30.0)
    assert t[30, 7] == 1.0 and t[30, 6] == G[1]
    exact, _ = gaussian_targets(np.array([[6.5, 30.0]]), np.array([True]), (64, 64))
    assert exact[0, 30, 6] == exact[0, 30, 7] < 1.0


def test_negative_coordinates_truncate_toward_zero():
    t, w = _one(-0.7, 5.0)  # int(-0.2) = 0: cell 0, not -1
    assert w == 1.0 and t[5, 0] == 1.0
    t, w = _one(-1.6, 5.0)  # int(-1.1) = -1: the peak is off the grid, its neighbour on it
    assert w == 1.0 and t[5, 0] == G[1] and t.max() == G[1]


def test_weights_at_the_edges_of_the_grid():
    # left: mu = int(x + 0.5); the window [mu - 6, mu + 7) keeps the weight while mu + 7 >= 0
    t, w = _one(-7.0, 5.0)  # mu = int(-6.5) = -6: column 0 is 6 cells away
    assert w == 1.0 and t[5, 0] == G[36] and t[5, 1] == 0.0
    t, w = _one(-8.3, 5.0)  # mu = int(-7.8) = -7: br = 0, weight 1 with an all-zero map (their code)
    assert w == 1.0 and not t.any()
    t, w = _one(-8.6, 5.0)  # mu = int(-8.1) = -8: br = -1 < 0, weight 0
    assert w == 0.0 and not t.any()
    # right: ul = mu - 6 must stay below W = 64
    t, w = _one(69.4, 5.0)  # mu = 69: ul = 63, the window's first column is the grid's last
    assert w == 1.0 and t[5, 63] == G[36] and t[5, 62] == 0.0
    t, w = _one(69.6, 5.0)  # mu = 70: ul = 64 >= W
    assert w == 0.0 and not t.any()
    # escape_fast's own targets drop all three that their code keeps
    _, w_exact = gaussian_targets(np.array([[-7.0, 5.0], [-8.3, 5.0], [69.4, 5.0]]), np.ones(3, bool), (64, 64))
    assert w_exact.tolist() == [0.0, 0.0, 0.0]
    # the same along y, and an invisible keypoint has no target at all
    t, w = _one(5.0, -7.0)
    assert w == 1.0 and t[0, 5] == G[36]
    t, w = _one(10.4, 20.6, visible=False)
    assert w == 0.0 and not t.any()


def test_the_dataset_makes_the_authors_targets_from_float32_keypoints(tmp_path):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "images" / "a.png")
    doc = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 64, 64],
                            "keypoints": [10, 0.5, 2, 40, 30, 2, 5, 5, 0]}],
           "categories": [{"id": 1, "name": "c", "keypoints": ["a", "b", "c"]}]}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    coco = load_coco(tmp_path / "t.json", tmp_path / "images")
    s = KeypointDataset(coco, input_size=64, targets="cell")[0]
    # cleaned box [0, 0, 63, 63]: centre 31.5, side 63 x 1.25 = 78.75 -> 64 px, 16 cells:
    # cell = (x - 31.5 + 39.375) * 64 / 78.75 / 4
    for k, (x, y) in enumerate([(10, 0.5), (40, 30)]):
        cx, cy = ((np.array([x, y]) - 31.5 + 39.375) * 64 / 78.75 / 4)
        peak = divmod(int(s["target"][k].argmax()), 16)
        assert peak == (int(cy + 0.5), int(cx + 0.5)) and s["target"][k].max() == 1.0
    assert s["target_weight"].tolist() == [1.0, 1.0, 0.0]


def test_a_rotated_crop_matrix_in_their_float64_arithmetic():
    import cv2

    from escape_fast.data.transforms import crop_matrix

    rng = np.random.default_rng(0)
    for _ in range(50):
        center = rng.uniform(0, 500, 2).astype(np.float32).astype(np.float64)
        scale = np.full(2, np.float32(rng.uniform(0.2, 3.0)), dtype=np.float64)
        rotation = float(np.clip(rng.standard_normal() * 15, -30, 30))
        # their get_affine_transform under numpy 1: the rotated half side and the sum with the
        # float32 centre in float64, stored as float32 once
        half = float(np.float32(np.float32(scale[0]) * np.float32(200.0))) * -0.5
        theta = np.pi * rotation / 180
        src = np.zeros((3, 2), np.float32)
        src[0] = center
        src[1] = center + np.array([0.0 * np.cos(theta) - half * np.sin(theta),
                                    0.0 * np.sin(theta) + half * np.cos(theta)])
        src[2] = src[1] + np.array([-(src[0] - src[1])[1], (src[0] - src[1])[0]], np.float32)
        dst = np.array([[128, 128], [128, 0], [0, 0]], np.float32)
        theirs = cv2.getAffineTransform(src, dst)
        assert np.array_equal(crop_matrix(center, scale, rotation, (256, 256), float64=True), theirs)
        # an unrotated crop is the same in both arithmetics
        assert np.array_equal(crop_matrix(center, scale, 0.0, (256, 256), float64=True),
                              crop_matrix(center, scale, 0.0, (256, 256)))
    assert config_mod.resolve([RECIPE])["rotated_crops"] == "float64"
    assert config_mod.resolve()["rotated_crops"] == "float32"


# --------------------------------------------------------------------------
# the loss: mmpose 0.29's JointsMSELoss has no 0.5
# --------------------------------------------------------------------------
def _their_joints_mse(output, target, target_weight):
    """mmpose 0.29's JointsMSELoss(use_target_weight=True), written out: per keypoint slot the
    mean over the batch and the cells of w x (pred - gt)^2, summed over the slots / K."""
    b, k = output.shape[:2]
    loss = 0.0
    for j in range(k):
        err = (output[:, j].reshape(b, -1) - target[:, j].reshape(b, -1)) ** 2
        loss += (err * target_weight[:, j, None]).mean()
    return loss / k


def test_the_authors_loss_has_no_half():
    heatmaps = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]], [[5.0, 5.0], [5.0, 5.0]]]])  # [1, 2, 2, 2]
    target = torch.zeros(1, 2, 2, 2)
    weight = torch.tensor([[1.0, 0.0]])  # slot 1 does not count
    # (1 + 4 + 0 + 1) / (1 x 2 slots x 2 x 2 cells) = 0.75
    assert float(heatmap_loss(heatmaps, target, weight, scale=1.0)) == 0.75
    assert float(_their_joints_mse(heatmaps, target, weight)) == 0.75
    assert float(heatmap_loss(heatmaps, target, weight)) == 0.375  # escape_fast's default: 0.5 x
    # their every category is padded to 68 slots: the sum over 68 x 2 x 2 cells
    assert float(heatmap_loss(heatmaps, target, weight, scale=1.0, slots=68)) == pytest.approx(6 / (68 * 4), rel=1e-7)
    padded = torch.cat([heatmaps, torch.zeros(1, 66, 2, 2)], 1), torch.zeros(1, 68, 2, 2)
    w68 = torch.cat([weight, torch.zeros(1, 66)], 1)
    torch.testing.assert_close(heatmap_loss(heatmaps, target, weight, 1.0, 68), heatmap_loss(*padded, w68, 1.0))
    torch.testing.assert_close(heatmap_loss(*padded, w68, 1.0, 68), _their_joints_mse(*padded, w68))


def test_the_recipe_trains_with_the_authors_loss():
    cfg = config_mod.resolve([RECIPE])
    assert cfg["heatmap_loss"] == {"scale": 1.0, "slots": 68}
    assert config_mod.resolve()["heatmap_loss"] == {"scale": 0.5, "slots": None}

    class Model(nn.Module):
        def forward(self, image, category_index):
            return image, torch.ones(image.shape[:2], dtype=torch.bool)

    batch = {"image": torch.ones(1, 68, 2, 2), "target": torch.zeros(1, 68, 2, 2),
             "target_weight": torch.ones(1, 68), "category_index": torch.zeros(1, dtype=torch.long)}
    assert float(train.heatmap_step(cfg)(Model(), batch)[0]) == 1.0
    assert float(train.heatmap_step(config_mod.resolve())(Model(), batch)[0]) == 0.5


# --------------------------------------------------------------------------
# the warm-up: mmcv's linear warm-up from 0.001 x lr
# --------------------------------------------------------------------------
def _lrs(stage_cfg, steps=(0, 1, 499, 500)):
    p = nn.Parameter(torch.zeros(1))
    opt, sched = train.make_optimizer(nn.ParameterList([p]), stage_cfg, steps_per_epoch=10_000)
    out = {}
    for step in range(max(steps) + 1):
        if step in steps:
            out[step] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    return out


def test_the_warmup_is_mmcvs():
    lrs = _lrs(config_mod.resolve([RECIPE])["baseline"])
    # lr x (1 - (1 - it / 500) x (1 - 0.001)), as mmcv's LrUpdaterHook computes it (to the bit)
    assert lrs == {it: 5e-4 * (1 - (1 - it / 500) * (1 - 0.001)) for it in (0, 1, 499)} | {500: 5e-4}
    assert lrs[0] == 5.000000000000005e-07  # the lr their code used in the parity run's step 0
    assert lrs[1] == pytest.approx(1.499e-6, rel=1e-12) and lrs[499] == pytest.approx(4.99001e-4, rel=1e-12)
    # escape_fast's own warm-up: lr x (step + 1) / 500
    assert _lrs(config_mod.resolve()["baseline"]) == pytest.approx({0: 1e-6, 1: 2e-6, 499: 5e-4, 500: 5e-4},
                                                                   rel=1e-12)
    for stage in ("baseline", "finetune", "matching"):
        assert config_mod.resolve([RECIPE])[stage]["warmup_rule"] == "mmcv"


# --------------------------------------------------------------------------
# their augmentation, sampling and head
# --------------------------------------------------------------------------
def _coco(tmp_path, n=12):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    doc = {"images": [{"id": 1, "file_name": "a.png", "width": 50, "height": 50}],
           "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1 + i % 2, "bbox": [5, 5, 30, 30],
                            "keypoints": [10, 10, 2, 20, 20, 2]} for i in range(n)],
           "categories": [{"id": c, "name": f"c{c}", "keypoints": ["a", "b"], "flip_pairs": [[0, 1]]} for c in (1, 2)]}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    return load_coco(tmp_path / "t.json", tmp_path / "images")


def test_their_augmentation_draws(tmp_path):
    coco = _coco(tmp_path)
    aug = config_mod.resolve([RECIPE])["augment"]
    assert aug == {"scale": 0.15, "rotation": 15.0, "rotation_prob": 0.6, "flip": False, "distribution": "normal"}
    ds = train.training_dataset(coco, config_mod.resolve([RECIPE]))
    base = KeypointDataset(coco).crop(0)
    crops = [ds.crop(0, draw=d) for d in range(2000)]
    assert all(c.float64 for c in crops) and not KeypointDataset(coco, train=True).crop(0).float64
    factors = np.array([c.scale[0] / base.scale[0] for c in crops])
    rotations = np.array([c.rotation for c in crops])
    assert factors.min() == pytest.approx(0.85) and factors.max() == pytest.approx(1.15)  # clipped at 1 -+ 0.15
    assert 0.15 < ((factors < 0.8501) | (factors > 1.1499)).mean() < 0.5  # a normal of sd 0.15: ~32% clipped
    assert np.abs(rotations).max() == 30.0 and 0.35 < (rotations == 0).mean() < 0.45  # 2 x 15; 40% unrotated
    assert not any(c.flip for c in crops)
    # their scale is float32: float32(scale) x float32(factor) (numpy 1's casting of mmpose's arrays)
    assert all(np.float32(c.scale[0]) == c.scale[0] for c in crops)
    # escape_fast's own augmentation is unchanged: U(-1, 1) draws from default_rng([seed, epoch, draw])
    ours = KeypointDataset(coco, train=True, seed=0)
    for d in range(20):
        s, r, f = np.random.default_rng([0, 0, d]).random(3)
        c = ours.crop(0, draw=d)
        assert np.array_equal(c.scale, base.scale * (1.0 + 0.15 * (2.0 * s - 1.0)))
        assert c.rotation == float(15.0 * (2.0 * r - 1.0)) and c.flip == (f < 0.5)


def test_shuffle_sampling_takes_every_instance_once(tmp_path):
    coco = _coco(tmp_path, n=13)
    sampler = train.training_sampler(coco, config_mod.resolve([RECIPE]))
    assert isinstance(sampler, ShuffleSampler) and len(sampler) == 13
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        items = list(sampler)
        assert sorted(i for i, _, _ in items) == list(range(13)) and [d for _, d, _ in items] == list(range(13))
        epochs.append([i for i, _, _ in items])
    assert epochs[0] != epochs[1]
    shards = [list(ShuffleSampler(coco, rank=r, world_size=3)) for r in range(3)]
    assert sorted(i for s in shards for i, _, _ in s) == list(range(13)) and [len(s) for s in shards] == [5, 4, 4]


@torch.no_grad()
def test_their_head_initialization():
    cfg = config_mod.resolve([RECIPE], [{"backbone": "tiny", "weights": None, "channels": 16}])
    torch.manual_seed(0)
    extractor = train.init_head(train._extractor(cfg), cfg)
    convs = [m for m in extractor.head.modules() if isinstance(m, nn.ConvTranspose2d)]
    norms = [m for m in extractor.head.modules() if isinstance(m, nn.BatchNorm2d)]
    assert convs and all(abs(float(m.weight.std()) - 0.001) < 2e-4 and abs(float(m.weight.mean())) < 1e-4
                         for m in convs)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any() for m in norms)
    torch.manual_seed(0)
    default = config_mod.resolve(overrides=[{"backbone": "tiny", "weights": None, "channels": 16}])
    plain = train.init_head(train._extractor(default), default)
    assert all(float(m.weight.std()) > 0.01 for m in plain.head.modules() if isinstance(m, nn.ConvTranspose2d))


def test_the_training_settings_accept_only_their_values():
    for key, value in (("targets", "round"), ("sampling", "uniform"), ("head_init", "zeros"),
                       ("augment.distribution", "gauss"), ("baseline.warmup_rule", "linear"),
                       ("heatmap_loss.scale", 0), ("heatmap_loss.slots", 0), ("augment.rotation_prob", 1.5),
                       ("augment.flip", "maybe"), ("finetune.warmup_ratio", -1)):
        with pytest.raises(config_mod.ConfigError, match=key.replace(".", r"\.")):
            config_mod.resolve(overrides=[config_mod.parse_override(f"{key}={value}")])
    recipe = config_mod.resolve([RECIPE])
    assert (recipe["targets"], recipe["sampling"], recipe["batch_size"], recipe["amp"], recipe["head_init"]) == (
        "cell", "shuffle", 32, False, "normal")
