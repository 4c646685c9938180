"""Crop geometry against escape_fast.reference.heatmap_to_image, the exact
inverse map, cv2's pixel convention, flips, targets, augmentation and the
balanced sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from escape_fast import reference
from escape_fast.data import (
    BalancedCategorySampler,
    KeypointDataset,
    box_to_center_scale,
    crop_matrix,
    gaussian_targets,
    grid_to_image,
    image_to_grid,
    load_coco,
    make_loader,
    normalize_batch,
    normalize_image,
    warp_crop,
)


def _random_crops(rng, n):
    for _ in range(n):
        center = rng.uniform(0, 500, 2)
        scale = rng.uniform(0.2, 3.0, 2)
        rotation = float(rng.uniform(-45, 45))
        yield center, scale, rotation


@pytest.mark.parametrize("size", [(64, 64), (48, 64), (256, 192)])
def test_grid_to_image_matches_reference_and_round_trips(size):
    rng = np.random.default_rng(0)
    w, h = size
    for center, scale, rotation in _random_crops(rng, 20):
        pts = rng.uniform(-5, max(w, h) + 5, (7, 2))
        ref = reference.heatmap_to_image(
            torch.from_numpy(pts)[None],
            torch.from_numpy(center)[None],
            torch.from_numpy(scale)[None],
            (w, h),
            torch.tensor([rotation], dtype=torch.float64),
        )[0].numpy()
        mine = grid_to_image(pts, center, scale, rotation, size)
        np.testing.assert_allclose(mine, ref, rtol=0, atol=1e-9)
        # the forward crop matrix is the exact inverse, flipped or not
        for flip in (False, True):
            img_pts = grid_to_image(pts, center, scale, rotation, size, flip=flip)
            back = image_to_grid(img_pts, center, scale, rotation, size, flip=flip)
            np.testing.assert_allclose(back, pts, rtol=0, atol=1e-9)
        m = np.vstack([crop_matrix(center, scale, rotation, size), [0, 0, 1]])
        minv = np.vstack([crop_matrix(center, scale, rotation, size, inverse=True), [0, 0, 1]])
        np.testing.assert_allclose(m @ minv, np.eye(3), atol=1e-12)


def test_box_to_center_scale():
    center, scale = box_to_center_scale([10, 20, 100, 50], aspect_ratio=1.0)
    np.testing.assert_allclose(center, [60, 45])
    np.testing.assert_allclose(scale, [100 / 200 * 1.25, 100 / 200 * 1.25])
    center, scale = box_to_center_scale([0, 0, 30, 90], aspect_ratio=0.75)
    np.testing.assert_allclose(scale, [67.5 / 200 * 1.25, 90 / 200 * 1.25])


def test_warp_puts_image_points_where_the_map_says():
    """cv2.warpAffine with crop_matrix samples the image at grid_to_image(p):
    a smooth image's crop equals the image evaluated at the mapped points."""
    rng = np.random.default_rng(1)
    hh, ww = 300, 400
    yy, xx = np.mgrid[0:hh, 0:ww].astype(np.float64)
    # channels linear in x and y: bilinear interpolation is exact on them
    img = np.stack([xx * 0.5, yy * 0.6, 20 + 0.2 * xx + 0.3 * yy], -1)
    for center, scale, rotation in _random_crops(rng, 5):
        center = rng.uniform(150, 250, 2)
        scale = rng.uniform(0.3, 0.8, 2)
        size = (64, 48)
        crop = warp_crop(img.astype(np.float32), crop_matrix(center, scale, rotation, size), size)
        gy, gx = np.mgrid[0 : size[1], 0 : size[0]]
        pts = grid_to_image(np.stack([gx, gy], -1).reshape(-1, 2), center, scale, rotation, size)
        inside = (pts[:, 0] >= 0) & (pts[:, 0] <= ww - 1) & (pts[:, 1] >= 0) & (pts[:, 1] <= hh - 1)
        expect = np.stack([pts[:, 0] * 0.5, pts[:, 1] * 0.6, 20 + 0.2 * pts[:, 0] + 0.3 * pts[:, 1]], -1)
        got = crop.reshape(-1, 3)
        # cv2 quantizes sub-pixel positions to 1/32 px: error <= 0.6 * 1/32
        np.testing.assert_allclose(got[inside], expect[inside], atol=0.03)
        assert inside.mean() > 0.9


def _tiny(tmp_path, flip_pairs=((0, 2),)):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(tmp_path / "images" / "a.png")
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "width": 160, "height": 120}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [30, 20, 90, 70],
             "keypoints": [40, 30, 2, 75, 55, 2, 110, 80, 2, 0, 0, 0]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [10, 10, 50, 40],
             "keypoints": [20, 20, 2, 50, 45, 1]},
        ],
        "categories": [
            {"id": 1, "name": "sym", "keypoints": ["l", "c", "r", "x"], "flip_pairs": [list(p) for p in flip_pairs]},
            {"id": 2, "name": "plain", "keypoints": ["a", "b"]},
        ],
    }
    path = tmp_path / "annotations" / "t.json"
    path.write_text(json.dumps(doc))
    return load_coco(path)


def test_dataset_keypoints_round_trip_through_the_reference_inverse(tmp_path):
    coco = _tiny(tmp_path)
    ds = KeypointDataset(coco, input_size=(96, 128), train=True, flip=False, seed=5)
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            s = ds[i]
            assert s["rotation"] != 0
            v = s["visible"]
            back = reference.heatmap_to_image(
                s["keypoints"][None].double(), s["center"][None], s["scale"][None], (24, 32), s["rotation"][None]
            )[0]
            err = (back[v] - s["keypoints_image"][v]).abs().max()
            assert err < 1e-3, err
            # and through the input-size grid with the same map
            kp_in = s["keypoints"].double().numpy() * 4
            back_in = grid_to_image(kp_in, s["center"], s["scale"], float(s["rotation"]), (96, 128))
            np.testing.assert_allclose(back_in[v.numpy()], s["keypoints_image"][v].numpy(), atol=1e-3)


def test_test_mode_crop_is_the_padded_box(tmp_path):
    coco = _tiny(tmp_path)
    s = KeypointDataset(coco, input_size=256)[0]
    # cleaned box [30, 20, 89, 69]: square pad to 89, x 1.25
    np.testing.assert_allclose(s["center"], [30 + 89 / 2, 20 + 69 / 2])
    np.testing.assert_allclose(s["scale"], [89 * 1.25 / 200] * 2)
    assert float(s["rotation"]) == 0 and not bool(s["flip"])
    assert float(s["bbox_size"]) == 89


def test_flip_mirrors_the_crop_and_swaps_pairs(tmp_path):
    coco = _tiny(tmp_path)
    ds = KeypointDataset(coco, input_size=64, train=True, normalize=False, seed=0)
    flipped = None
    for epoch in range(20):
        ds.set_epoch(epoch)
        if bool(ds[0]["flip"]):
            flipped = epoch
            break
    assert flipped is not None
    s = ds[0]
    crop = ds.crop(0)
    assert crop.flip
    center, scale, rot = crop.center, crop.scale, crop.rotation
    plain = warp_crop(ds.image(1), crop_matrix(center, scale, rot, (64, 64)), (64, 64))
    mirrored = s["image"].permute(1, 2, 0).numpy()
    diff = np.abs(mirrored.astype(int) - plain[:, ::-1].astype(int))
    assert diff.mean() < 1.0  # same pixels up to cv2's sub-pixel rounding
    # keypoint 0 (left) of the flipped crop is the mirrored keypoint 2 (right)
    kp_plain = image_to_grid(coco.instances[0].keypoints, center, scale, rot, (16, 16))
    kp = s["keypoints"].double().numpy()
    h_in = 64 / 16
    np.testing.assert_allclose(kp[0], [(64 - 1 - kp_plain[2, 0] * h_in) / h_in, kp_plain[2, 1]], atol=1e-4)
    np.testing.assert_allclose(kp[1], [(64 - 1 - kp_plain[1, 0] * h_in) / h_in, kp_plain[1, 1]], atol=1e-4)
    assert s["visible"].tolist() == [True, True, True, False]
    # a category without flip pairs is never flipped
    assert not any(bool(ds[(1, d, 0)]["flip"]) for d in range(20))


def test_targets_are_the_reference_gaussians(tmp_path):
    coco = _tiny(tmp_path)
    ds = KeypointDataset(coco, input_size=64, train=True, seed=1, num_keypoints=6)
    s = ds[0]
    g, w = reference.gaussian_heatmaps(s["keypoints"][None], s["visible"][None], (16, 16), 2.0)
    torch.testing.assert_close(s["target"], g[0], rtol=0, atol=0)
    torch.testing.assert_close(s["target_weight"], w[0], rtol=0, atol=0)
    assert s["target_weight"][3:].sum() == 0 and s["keypoint_mask"].tolist() == [True] * 4 + [False] * 2
    t, wt = gaussian_targets(np.array([[3.0, 4.0], [-20.0, 5.0]]), np.array([True, True]), (16, 16))
    assert wt.tolist() == [1.0, 0.0] and float(t[0, 4, 3]) == 1.0


def test_normalization():
    crop = np.random.default_rng(0).integers(0, 256, (8, 6, 3), dtype=np.uint8)
    x = normalize_image(crop)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    expect = (torch.from_numpy(crop).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(x, expect)
    torch.testing.assert_close(normalize_batch(torch.from_numpy(crop).permute(2, 0, 1)[None])[0], expect)


def test_augmentation_is_the_same_with_and_without_workers(tmp_path):
    coco = _tiny(tmp_path)
    ds = KeypointDataset(coco, input_size=32, train=True, seed=2)
    sampler = BalancedCategorySampler(coco, per_category=3, seed=4)
    sampler.set_epoch(1)
    one = list(make_loader(ds, batch_size=4, sampler=sampler, num_workers=0))
    two = list(make_loader(ds, batch_size=4, sampler=sampler, num_workers=2))
    for a, b in zip(one, two):
        for key in ("image", "target", "rotation", "scale", "flip", "index"):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_balanced_sampler(tmp_path):
    coco = _tiny(tmp_path)
    sampler = BalancedCategorySampler(coco, per_category=5, seed=0)
    items = list(sampler)
    cats = [coco.instances[i].category_id for i, _, _ in items]
    assert cats.count(1) == 5 and cats.count(2) == 5 and len(sampler) == 10
    assert [d for _, d, _ in items] == list(range(10))
    assert list(sampler) == items  # deterministic
    sampler.set_epoch(1)
    other = list(sampler)
    assert [e for _, _, e in other] == [1] * 10
    shards = [list(BalancedCategorySampler(coco, 5, seed=0, rank=r, world_size=3)) for r in range(3)]
    assert sorted(x for s in shards for x in s) == sorted(items)
    assert [len(BalancedCategorySampler(coco, 5, seed=0, rank=r, world_size=3)) for r in range(3)] == [
        len(s) for s in shards
    ]


def test_box_crops_are_mmpose_s_to_the_float32():
    """A box crop (scale with the grid's aspect ratio) is computed from float32
    points as mmpose's get_affine_transform does, which the authors' loader
    warps with: it is the analytic map up to float32 rounding, for every
    rotation, and its centre and scale are float32 values."""
    from escape_fast.data.transforms import _forward_linear, apply_affine

    rng = np.random.default_rng(5)
    for _ in range(20):
        center, scale = box_to_center_scale([*rng.uniform(0, 300, 2), *rng.uniform(20, 200, 2)], 1.0)
        assert np.array_equal(center, center.astype(np.float32)) and np.array_equal(scale, scale.astype(np.float32))
        rotation = float(rng.uniform(-40, 40))
        size = (256, 256)
        a = _forward_linear(scale, rotation, size)
        analytic = np.concatenate([a, (center - a @ np.array([128.0, 128.0]))[:, None]], axis=1)
        np.testing.assert_allclose(crop_matrix(center, scale, rotation, size, inverse=True), analytic,
                                   rtol=0, atol=2e-4)
    # the three points of mmpose's recipe, at rotation 0: centre -> grid centre, half a side up -> top middle
    center, scale = np.array([50.825, 115.13]), np.array([0.59425, 0.59425])
    m = crop_matrix(center, scale, 0.0, (256, 256))
    c32 = center.astype(np.float32).astype(np.float64)
    side = float(np.float32(np.float32(scale[0]) * np.float32(200)))
    np.testing.assert_allclose(apply_affine(m, c32), [128, 128], atol=1e-9)
    np.testing.assert_allclose(apply_affine(m, [c32[0], float(np.float32(c32[1] - side / 2))]), [128, 0], atol=1e-9)
