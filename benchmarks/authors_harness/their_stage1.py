"""One STAGE-1 (baseline) training step of the ESCAPE authors' code, recorded (escape_fast issue 29).

Run in the parity environment (their code needs mmcv 1.6.0 / mmpose 0.29.0):

    cd /work/parity/escape-tgt && ../env/bin/python ../their_stage1.py --out ../out/stage1 [--batch 4] [--seed 1]

What it does, all through THEIR code (github khoiucd/escape-tgt at /work/parity/escape-tgt):

(a) builds their stage-1 model from configs/mp100/baseline/baseline_split1.py
    (PrototypeDetector: mmpose ResNet-50, CustomDeconv, GlobalHead + JointsMSELoss).
    Changes to the config, all forced by this machine or the fixture:
      * model.pretrained = None: no ImageNet weights can be downloaded. The ResNet-50
        keeps PyTorch's default random init; the deconv head gets their own
        CustomDeconv.init_weights() (ConvT normal(std 0.001), BN (1, 0)), which is what
        their recipe does when `pretrained` is given (prototype_detector.py:62-67).
      * keypoint_head.keypoints_num = the number of base keypoints of the training json
        (1093 for MP-100 split 1; here the fixture's).
      * data.train.ann_file / img_prefix -> the fixture (MP-100 layout). Their GlobalDataset
        pads to max_kpt_num = 68 and cannot hold a category with more keypoints, so the
        fixture's face_wflw (98 keypoints) is left out of the training json written
        to OUT/train_le68.json; nothing else is changed.
      * samples_per_gpu = --batch (their 32), workers_per_gpu = 0 (their 12): with no
        worker processes the random augmentation is drawn in this process from the
        numpy generator that mmcv's set_random_seed(--seed, deterministic=True) seeds,
        as their train.py seeds it (seed 1). The drawn scale and rotation of every item
        are recorded in the batch file.
(b) saves its initial state_dict with mmcv.runner.save_checkpoint -> OUT/init.pth.
(c) takes the first batch of mmpose's build_dataloader(shuffle=True, drop_last=True,
    seed) over their GlobalDataset and train_pipeline (LoadImageFromFile,
    TopDownGetRandomScaleRotation(rot_factor 15, scale_factor 0.15), TopDownAffineFewShot,
    ToTensor, NormalizeTensor, TopDownGenerateTargetFewShot(sigma 2), Collect) -> OUT/batch.pt:
    img, target, target_weight, keypoint_index_onehot (what forward_train takes), the
    img_metas and the annotation id of each item, and their keypoint_index (the row of
    keypoint_head.keypoints of each category's keypoints). Also OUT/targets_probe.pt: their
    TopDownGenerateTargetFewShot on keypoints placed across and beyond the grid's edges.
(d) runs their training iteration as mmcv's EpochBasedRunner does it for iteration 0:
    build_optimizer(cfg.optimizer) (Adam, lr 5e-4, betas (0.9, 0.999), eps 1e-8, no
    weight decay), the StepLrUpdaterHook of cfg.lr_config (linear warm-up 500 iters, ratio
    0.001: the lr of iteration 0 is 5e-4 * 0.001), model.train() then model.train_step
    (BasePose: forward -> forward_train -> GlobalHead.get_loss, _parse_losses), then the
    body of mmcv's OptimizerHook.after_train_iter (zero_grad, backward, step; grad_clip
    None) with the gradients copied out between backward and step -> OUT/theirs.pt:
    losses, every parameter's gradient, the state_dict after the step (parameters and the
    BN buffers that the forward moved), the lr used, the heatmaps their head regressed
    and the features (recorded by a wrapper around get_loss and a forward hook: observers
    that change no computation).

No file of their code is modified; nothing is patched at run time (their training path
never calls .cuda(), and with numpy 1.26 their loaders need no fix).
"""

import argparse
import copy
import json
import logging
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
THEIR_CODE = os.path.join(HERE, "escape-tgt")
sys.path.insert(0, THEIR_CODE)

FIXTURE = "/work/shared/data/mp100_fixture"


def write_train_json(src: str, dst: str, max_kpt: int = 68) -> list:
    """The fixture's training json without the categories their dataset cannot pad to 68."""
    with open(src) as f:
        data = json.load(f)
    drop = {c["id"] for c in data["categories"] if len(c["keypoints"]) > max_kpt}
    dropped = [c["name"] for c in data["categories"] if c["id"] in drop]
    data["categories"] = [c for c in data["categories"] if c["id"] not in drop]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] not in drop]
    keep_images = {a["image_id"] for a in data["annotations"]}
    data["images"] = [i for i in data["images"] if i["id"] in keep_images]
    with open(dst, "w") as f:
        json.dump(data, f)
    return dropped


def plain(obj):
    """mmcv ConfigDicts as plain dicts and lists (so that the files load with weights_only=True)."""
    return json.loads(json.dumps(obj))


def ann_id_of(raw: dict, image_file: str, img_prefix: str, joints: np.ndarray, category_id: int) -> int:
    """The annotation id of a db item: same image, category and keypoints."""
    name = image_file[len(img_prefix):]
    image_id = [i["id"] for i in raw["images"] if i["file_name"] == name]
    assert len(image_id) == 1, name
    hits = []
    for a in raw["annotations"]:
        if a["image_id"] != image_id[0] or a["category_id"] != category_id:
            continue
        kp = np.asarray(a["keypoints"], dtype=np.float32).reshape(-1, 3)[:, :2]
        if np.array_equal(kp, joints[: len(kp)]):
            hits.append(a["id"])
    assert len(hits) >= 1, (name, category_id)
    return hits[0]  # several identical annotations (the fixture has none in one image) would be one item


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=1, help="their train.py's default")
    p.add_argument("--config", default=os.path.join(THEIR_CODE, "configs/mp100/baseline/baseline_split1.py"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the same on both sides)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)

    import escape  # noqa: F401  (registers their modules)
    import mmcv
    import mmpose
    from escape.datasets import build_dataset
    from mmcv import Config
    from mmcv.runner import EpochBasedRunner, build_optimizer, save_checkpoint, set_random_seed
    from mmpose.datasets import build_dataloader
    from mmpose.models import build_posenet

    ann = os.path.join(args.out, "train_le68.json")
    dropped = write_train_json(os.path.join(FIXTURE, "annotations/fixture_split1_train.json"), ann)
    img_prefix = os.path.join(FIXTURE, "images") + "/"

    cfg = Config.fromfile(args.config)
    cfg.model.pretrained = None
    cfg.data.train.ann_file = ann
    cfg.data.train.img_prefix = img_prefix
    cfg.seed = args.seed

    # their train.py: deterministic forced, seed set before the model and the datasets are built
    set_random_seed(args.seed, deterministic=True)
    dataset = build_dataset(cfg.data.train)
    cfg.model.keypoint_head.keypoints_num = dataset.keypoint_num
    cfg.data_cfg.num_output_channels = dataset.keypoint_num
    model = build_posenet(cfg.model)
    model.deconv.init_weights()  # what PrototypeDetector.init_weights does when pretrained is given
    save_checkpoint(model, os.path.join(args.out, "init.pth"),
                    meta=dict(seed=args.seed, config=cfg.pretty_text, note="issue 29 stage-1 parity: initial weights"))
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # (c) one batch from their loader and pipeline
    loader = build_dataloader(dataset, samples_per_gpu=args.batch, workers_per_gpu=0, num_gpus=1, dist=False,
                              shuffle=True, seed=args.seed, drop_last=True, pin_memory=False)
    data = next(iter(loader))
    metas = data["img_metas"].data[0]
    with open(ann) as f:
        raw = json.load(f)
    items = []
    for m in metas:
        items.append({
            "db_index": int(m["bbox_id"]),
            "ann_id": ann_id_of(raw, m["image_file"], img_prefix, dataset.db[m["bbox_id"]]["joints_3d"][:, :2],
                                int(m["category_id"])),
            "image_file": m["image_file"], "category_id": int(m["category_id"]),
            "center": np.asarray(m["center"]).tolist(), "center_dtype": str(np.asarray(m["center"]).dtype),
            "scale": np.asarray(m["scale"]).tolist(), "scale_dtype": str(np.asarray(m["scale"]).dtype),
            "scale_unaugmented": dataset.db[m["bbox_id"]]["scale"].tolist(),
            "rotation": float(m["rotation"]),
            "joints_3d": torch.from_numpy(np.asarray(m["joints_3d"], dtype=np.float32)),  # after the affine
            "joints_3d_visible": torch.from_numpy(np.asarray(m["joints_3d_visible"], dtype=np.float32)),
            "keypoint_index": list(m["keypoint_index"]),
        })
    batch = {
        "img": data["img"].clone(), "target": data["target"].clone(), "target_weight": data["target_weight"].clone(),
        "keypoint_index_onehot": data["keypoint_index_onehot"].clone(), "items": items,
        "keypoint_index": {int(c): list(v) for c, v in dataset.keypoint_index.items()},
        "ann_file": ann, "image_root": img_prefix, "dropped_categories": dropped,
        "pipeline": plain(cfg.train_pipeline), "seed": args.seed, "workers": 0,
    }
    torch.save(batch, os.path.join(args.out, "batch.pt"))

    # their target generator on keypoints placed across and beyond the grid's edges (and some
    # invisible): what escape_fast's targets and weights are compared with, cell by cell
    from escape.datasets.pipelines import TopDownGenerateTargetFewShot
    gen = [t for t in cfg.train_pipeline if t["type"] == "TopDownGenerateTargetFewShot"][0]
    generator = TopDownGenerateTargetFewShot(**{k: v for k, v in gen.items() if k != "type"})
    line = np.arange(-12.0, 76.0, 0.37) * 4.0  # input pixels: heatmap cells -12 .. 76
    pts = [(x, 128.3) for x in line] + [(101.7, y) for y in line] + [(x, x * 0.9 + 3.1) for x in line]
    probe_joints = np.zeros((len(pts), 3), dtype=np.float32)
    probe_joints[:, :2] = np.asarray(pts, dtype=np.float32)
    probe_vis = np.ones((len(pts), 3), dtype=np.float32)
    probe_vis[::7] = 0  # every 7th invisible
    probe_vis[:, 2] = 0
    res = generator({"joints_3d": probe_joints.copy(), "joints_3d_visible": probe_vis.copy(),
                     "ann_info": copy.deepcopy(dataset.ann_info)})
    torch.save({"joints_3d": torch.from_numpy(probe_joints), "joints_3d_visible": torch.from_numpy(probe_vis),
                "target": torch.from_numpy(res["target"]), "target_weight": torch.from_numpy(res["target_weight"]),
                "sigma": gen.get("sigma"), "image_size": dataset.ann_info["image_size"].tolist(),
                "heatmap_size": dataset.ann_info["heatmap_size"].tolist()},
               os.path.join(args.out, "targets_probe.pt"))

    # (d) their iteration 0
    observed = {}
    head = model.keypoint_head
    get_loss = head.get_loss

    def recording_get_loss(output, target, target_weight):
        observed["heatmaps"] = output.detach().clone()
        return get_loss(output, target, target_weight)

    head.get_loss = recording_get_loss
    model.deconv.register_forward_hook(lambda mod, inp, out: observed.__setitem__("features", out.detach().clone()))

    optimizer = build_optimizer(model, cfg.optimizer)
    logger = logging.getLogger("their_stage1")
    runner = EpochBasedRunner(model, optimizer=optimizer, work_dir=args.out, logger=logger,
                              max_epochs=cfg.total_epochs)
    runner.register_lr_hook(copy.deepcopy(cfg.lr_config))
    runner.call_hook("before_run")
    runner.call_hook("before_train_epoch")
    runner.call_hook("before_train_iter")
    lr_used = optimizer.param_groups[0]["lr"]

    model.train()  # EpochBasedRunner.train() does this
    data_batch = {"img": data["img"], "target": data["target"], "target_weight": data["target_weight"],
                  "keypoint_index_onehot": data["keypoint_index_onehot"], "img_metas": metas}
    outputs = model.train_step(data_batch, optimizer)
    # mmcv OptimizerHook.after_train_iter (grad_clip None)
    optimizer.zero_grad()
    outputs["loss"].backward()
    grads = {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    optimizer.step()
    after = {k: v.detach().clone() for k, v in model.state_dict().items()}

    theirs = {
        "loss": float(outputs["loss"].detach()), "loss_tensor": outputs["loss"].detach().clone(),
        "log_vars": {k: float(v) for k, v in outputs["log_vars"].items()}, "grads": grads, "state_after": after,
        "lr": lr_used, "optimizer": {k: (list(v) if isinstance(v, tuple) else v)
                                     for k, v in optimizer.param_groups[0].items() if k != "params"},
        "optimizer_type": type(optimizer).__name__,
        "heatmaps": observed["heatmaps"], "features": observed["features"],
        "versions": {"torch": str(torch.__version__), "numpy": np.__version__, "mmcv": mmcv.__version__,
                     "mmpose": mmpose.__version__, "python": sys.version.split()[0], "threads": args.threads},
        "config": plain({"optimizer": cfg.optimizer, "lr_config": cfg.lr_config,
                         "loss": cfg.model.keypoint_head.loss_keypoint, "data_cfg": cfg.data_cfg,
                         "samples_per_gpu_config": cfg.data.samples_per_gpu, "total_epochs": cfg.total_epochs}),
    }
    torch.save(theirs, os.path.join(args.out, "theirs.pt"))
    changed = sum(not torch.equal(init_state[k], after[k]) for k in after)
    print(f"their stage-1 step: loss {theirs['loss']:.9g} ({theirs['log_vars']}); lr {lr_used:.3g}; "
          f"{sum(g is not None for g in grads.values())}/{len(grads)} parameters with a gradient; "
          f"{changed}/{len(after)} state entries changed; batch {len(items)} items "
          f"(ann ids {[it['ann_id'] for it in items]}, rotations {[round(it['rotation'], 3) for it in items]}, "
          f"scales {[round(it['scale'][0], 5) for it in items]}); left out: {dropped}")
    print(f"wrote {args.out}/init.pth, batch.pt, theirs.pt, targets_probe.pt")


if __name__ == "__main__":
    main()
