"""escape_fast's stage-1 training step against the ESCAPE authors' code: same weights, same batch (issue 29).

The comparison has two halves. They run in two environments, so this script never imports
their code:

1. Their half runs outside this repository, in its own environment: github khoiucd/escape-tgt
   with mmcv 1.6.0 (built without ops), mmpose 0.29.0, numpy 1.26 and torch's CPU path. Its
   script (their_stage1.py, kept beside their code, not here) builds their stage-1 model from
   configs/mp100/baseline/baseline_split1.py with random weights. It then writes four files to
   DIR:

     cd PARITY/escape-tgt && ../env/bin/python ../their_stage1.py --out DIR [--batch 4] [--seed 1]

   * DIR/init.pth: their initial PrototypeDetector, as mmcv's save_checkpoint writes it.
   * DIR/batch.pt: the first batch of their training loader. It went through their GlobalDataset
     and train_pipeline, with the random scale and rotation drawn under their seed and recorded
     per item. It holds img, target, target_weight, keypoint_index_onehot and img_metas, the
     annotation id of each item, their prototype row of each category's keypoints, and the
     training json it read.
   * DIR/theirs.pt: their iteration 0. This is mmcv's Adam from their config at the lr that
     their warm-up hook gives iteration 0, then train_step (their forward_train and
     JointsMSELoss), then backward and step. It holds the loss, every parameter's gradient, the
     state dict after the step, and the heatmaps and features they computed.
   * DIR/targets_probe.pt: their target generator (TopDownGenerateTargetFewShot, sigma 2) on
     keypoints placed across and beyond the heatmap's edges, some of them invisible.

2. This half runs in escape_fast's own environment:

     python benchmarks/authors_training_parity.py --dir DIR [--out parity.json] [--defaults]

   It loads DIR/init.pth through the authors' loader (EscapeModel.load, models/authors.py) and
   puts that f_theta into the stage-1 extractor that train.py builds from the settings
   (DEFAULTS <- recipes/authors.yaml; --defaults: DEFAULTS alone, escape_fast's own recipe, to
   see what the recipe changes). It takes the prototypes from their keypoint_head.keypoints,
   reordered to escape_fast's base_keypoint_table of the same training json, and builds stage
   1's HeatmapModel from these. Then it runs train.train_step with train.heatmap_step(settings)
   (HeatmapModel + losses.heatmap_loss under the ``heatmap_loss`` settings) and the optimizer
   and schedule of train.make_optimizer under the ``baseline`` settings, at the lr that the
   schedule gives step 0: nothing is overridden. This is the code path of train.py's stage 1.
   The step runs on THEIR batch tensors (images, targets, target weights); the category of
   each item comes from escape_fast's own KeypointDataset.

   It reports, as a table and as JSON:
   * the loss and the lr of step 0, theirs and escape_fast's;
   * the largest relative gradient difference over the parameters, with its name, and how many
     gradients are bit-identical;
   * the weights and BN buffers after the step: the relative difference of the updated weights
     and of the update itself (w_after - w_init);
   * escape_fast's data path (KeypointDataset under the ``targets`` and ``rotated_crops``
     settings) on the same annotations with their drawn augmentation (center, scale, rotation):
     the image, keypoint, target and weight differences, and their loss evaluated on
     escape_fast's targets; and escape_fast's targets (the ``targets`` setting) against their
     generator on the probe.

Relative difference of tensors a (ours) and b (theirs): ||a - b|| / ||b|| (Frobenius); the
element-wise figure is max |a - b| / max |b|. Float32 on the CPU; --threads sets torch's CPU
threads (their half used 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "escape_fast", "assets", "recipes", "authors.yaml")


def _load(path: str):
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: not found (run their half first; see the docstring)")
    return torch.load(path, map_location="cpu", weights_only=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Norm-relative and element-wise relative difference of a (ours) against b (theirs)."""
    a, b = a.detach().double(), b.detach().double()
    d = (a - b).abs()
    nb, mb = float(b.norm()), float(b.abs().max()) if b.numel() else 0.0
    return {"rel": float(d.norm()) / nb if nb > 0 else (0.0 if float(d.norm()) == 0 else math.inf),
            "max_abs": float(d.max()) if d.numel() else 0.0,
            "elem_rel": float(d.max()) / mb if mb > 0 else (0.0 if float(d.max()) == 0 else math.inf),
            "norm_theirs": nb}


def worst(rows: dict, key: str = "rel") -> tuple[str, dict]:
    name = max(rows, key=lambda n: rows[n][key])
    return name, rows[name]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", required=True, help="the folder their half wrote (init.pth, batch.pt, theirs.pt)")
    p.add_argument("--config", action="append", default=None, metavar="FILE",
                   help=f"settings files on DEFAULTS (default: {os.path.relpath(RECIPE, ROOT)})")
    p.add_argument("--defaults", action="store_true",
                   help="escape_fast's own recipe (DEFAULTS alone): what differs without the authors' settings")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the comparison as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from escape_fast import config as config_mod
    from escape_fast import train
    from escape_fast.data import KeypointDataset, load_coco
    from escape_fast.data.transforms import cell_targets, gaussian_targets
    from escape_fast.models import authors
    from escape_fast.models.escape import EscapeModel
    from escape_fast.models.losses import heatmap_loss
    from escape_fast.models.training import HeatmapModel
    from escape_fast.prior import base_keypoint_table

    d = args.dir
    ckpt = os.path.join(d, "init.pth")
    batch, theirs = _load(os.path.join(d, "batch.pt")), _load(os.path.join(d, "theirs.pt"))
    probe_file = os.path.join(d, "targets_probe.pt")
    probe = _load(probe_file) if os.path.isfile(probe_file) else None
    state0 = _load(ckpt)["state_dict"]
    settings = [] if args.defaults else (args.config or [RECIPE])
    cfg = config_mod.resolve(settings)
    scfg, loss_cfg = cfg["baseline"], cfg["heatmap_loss"]
    cpu = torch.device("cpu")

    # ---- the data: escape_fast's reading of the same training json ---------------------------
    coco = load_coco(batch["ann_file"], batch["image_root"])
    table, _, keys = base_keypoint_table(coco)
    k_pad = int(batch["target"].shape[1])
    if table.shape[1] != k_pad:
        raise SystemExit(f"escape_fast pads this json to {table.shape[1]} keypoints, their batch to {k_pad}: "
                         "HeatmapModel's table and their targets would not line up")
    # their prototype row of each of our base keypoints (category id, k)
    their_row = torch.tensor([batch["keypoint_index"][c][k] for c, k in keys])
    theirs_protos = state0["keypoint_head.keypoints"]
    if theirs_protos.shape[0] != len(keys) or sorted(their_row.tolist()) != list(range(len(keys))):
        raise SystemExit(f"their {theirs_protos.shape[0]} prototypes are not a reordering of our {len(keys)} base "
                         "keypoints")
    items = batch["items"]
    index_of = {inst.ann_id: i for i, inst in enumerate(coco.instances)}
    idx = [index_of[it["ann_id"]] for it in items]

    class TheirDraws(KeypointDataset):
        """escape_fast's dataset, its augmentation replaced by their drawn center, scale and rotation."""

        def crop(self, index, draw=None, epoch=None):
            it = items[idx.index(index)]
            base = super().crop(index, draw, epoch)  # train=False: the unaugmented crop of the box
            return dataclasses.replace(base, center=np.asarray(it["center"], dtype=np.float64),
                                       scale=np.asarray(it["scale"], dtype=np.float64),
                                       rotation=float(it["rotation"]), flip=False)

    ours_ds = TheirDraws(coco, input_size=cfg["input_size"], train=False, sigma=cfg["sigma"], num_keypoints=k_pad,
                         targets=cfg["targets"], rotated_crops=cfg["rotated_crops"])
    ours_items = [ours_ds[i] for i in idx]
    category_index = torch.tensor([int(x["category_index"]) for x in ours_items])
    # their one-hot picks, for every slot of every item, the prototype our table picks
    onehot = batch["keypoint_index_onehot"]
    picks_agree = all(
        (onehot[b, k].argmax() == their_row[table[category_index[b], k]]).item() if table[category_index[b], k] >= 0
        else onehot[b, k].sum().item() == 0
        for b in range(len(items)) for k in range(k_pad))

    # ---- the models ------------------------------------------------------------------------------
    loaded = EscapeModel.load(ckpt)  # the authors' loader: their f_theta in escape_fast's extractor
    extractor_state = {k: v.clone() for k, v in loaded.extractor.state_dict().items()}

    def build() -> HeatmapModel:
        extractor = train._extractor(cfg, state=extractor_state)  # what stage_baseline builds, with their weights
        return HeatmapModel(extractor, theirs_protos[their_row].float(), table)

    def their_name(ours: str) -> str:
        if ours == "prototypes":
            return "keypoint_head.keypoints"
        return authors._extractor_key(ours[len("extractor."):])

    def theirs_as_ours(their_tensor: torch.Tensor, ours: str) -> torch.Tensor:
        return their_tensor[their_row] if ours == "prototypes" else their_tensor

    step_batch = {"image": batch["img"], "target": batch["target"], "target_weight": batch["target_weight"][..., 0],
                  "category_index": category_index}
    steps_per_epoch = len(train.training_sampler(coco, cfg)) // cfg["batch_size"]

    # train.py's stage-1 step under the settings: their lr of step 0 must come from the schedule
    model = build()
    model.train()  # run_epochs puts the model in train mode: BN on batch statistics
    opt, sched = train.make_optimizer(model, scfg, max(1, steps_per_epoch))
    lr_used = opt.param_groups[0]["lr"]
    loss_t, _ = train.train_step(model, train.heatmap_step(cfg), step_batch, opt, sched, cpu, cfg["amp"])
    our_grads = {n: q.grad.detach().clone() for n, q in model.named_parameters() if q.grad is not None}
    after = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "table"}

    # ---- loss and gradients ----------------------------------------------------------------------
    their_loss, our_loss = float(theirs["loss_tensor"].double()), float(loss_t.detach().double())
    loss = {"theirs": their_loss, "ours": our_loss, "ratio_ours_theirs": our_loss / their_loss,
            "rel_diff": abs(our_loss - their_loss) / abs(their_loss),
            "bit_identical": bool(torch.equal(loss_t.detach().float(), theirs["loss_tensor"].float()))}
    lr = {"theirs": theirs["lr"], "ours": lr_used, "bit_identical": lr_used == theirs["lr"]}
    grads, ratios = {}, []
    for name, g in our_grads.items():
        t = theirs_as_ours(theirs["grads"][their_name(name)], name)
        grads[name] = {**rel(g, t), "bit_identical": bool(torch.equal(g, t))}
        nz = t.abs() > 1e-3 * t.abs().max()
        if nz.any():
            ratios.append(float((g[nz].double() / t[nz].double()).median()))
    # Adam divides by sqrt(v) + eps: where |g| is near eps, a factor on the loss changes the step
    eps = float(theirs["optimizer"].get("eps", 1e-8))
    all_g = torch.cat([g.detach().abs().flatten().double() for n, g in theirs["grads"].items() if g is not None])
    grad_scale = {"adam_eps": eps, "median_abs_grad_theirs": float(all_g.median()),
                  "share_below_10_eps": float((all_g < 10 * eps).double().mean()),
                  "share_below_100_eps": float((all_g < 100 * eps).double().mean())}
    missing_grads = sorted({their_name(k) for k in our_grads} ^ {
        n for n, g in theirs["grads"].items() if g is not None})

    # ---- the optimizer step ----------------------------------------------------------------------
    init = {k: v for k, v in build().state_dict().items() if k != "table"}
    weights, updates, buffers = {}, {}, {}
    for name, mine in after.items():
        t = theirs_as_ours(theirs["state_after"][their_name(name)], name)
        if name in our_grads:  # a parameter (state-dict names are parameter names)
            weights[name] = {**rel(mine, t), "bit_identical": bool(torch.equal(mine, t))}
            t0 = init[name]
            updates[name] = rel(mine.double() - t0.double(), t.double() - t0.double())
        elif mine.is_floating_point():
            buffers[name] = {**rel(mine, t), "bit_identical": bool(torch.equal(mine, t))}
        else:
            buffers[name] = {"rel": 0.0 if torch.equal(mine, t) else math.inf, "max_abs": float((mine - t).abs().max()),
                             "elem_rel": 0.0, "norm_theirs": float(t.double().norm()),
                             "bit_identical": bool(torch.equal(mine, t))}

    # ---- escape_fast's data path on their draws --------------------------------------------------
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    data_rows = []
    our_targets, our_weights = [], []
    for b, (it, mine) in enumerate(zip(items, ours_items)):
        base = KeypointDataset.crop(ours_ds, idx[b])  # the unaugmented crop of the box
        img_levels = ((mine["image"] - batch["img"][b]) * std * 255.0).abs()
        vis_t = it["joints_3d_visible"][:, 0] > 0
        kc = coco.categories[it["category_id"]].num_keypoints
        kp_t = it["joints_3d"][:, :2] / 4.0
        kp_d = (mine["keypoints"][:kc].double() - kp_t[:kc].double()).norm(dim=-1)[vis_t[:kc]]
        w_o, w_t = mine["target_weight"], batch["target_weight"][b, :, 0]
        both = (w_o > 0) & (w_t > 0)
        t_d = (mine["target"] - batch["target"][b]).abs()
        data_rows.append({
            "ann_id": it["ann_id"], "category_id": it["category_id"], "keypoints": kc,
            "visible": int(vis_t.sum()),
            "center_unaugmented_max_abs": float(np.abs(base.center - np.asarray(it["center"])).max()),
            "scale_unaugmented_max_abs": float(np.abs(base.scale - np.asarray(it["scale_unaugmented"])).max()),
            "scale_factor": float(it["scale"][0] / it["scale_unaugmented"][0]), "rotation": it["rotation"],
            "image_max_abs_levels": float(img_levels.max()),
            "image_pixels_over_half_level": int((img_levels > 0.5).any(0).sum()),
            "keypoint_max_abs_cells": float(kp_d.max()) if kp_d.numel() else 0.0,
            "weights_differ": int((w_o != w_t).sum()),
            "targets_bit_identical": bool(torch.equal(mine["target"], batch["target"][b])),
            "target_rel": rel(mine["target"], batch["target"][b])["rel"],
            "target_max_abs": float(t_d.max()), "target_max_abs_where_both_weighted": float(
                t_d[both].max()) if both.any() else 0.0,
        })
        our_targets.append(mine["target"])
        our_weights.append(mine["target_weight"])
    our_t, our_w = torch.stack(our_targets), torch.stack(our_weights)
    h = theirs["heatmaps"]
    loss_their_targets = float(heatmap_loss(h, batch["target"], batch["target_weight"][..., 0], loss_cfg["scale"],
                                            loss_cfg["slots"]))
    loss_our_targets = float(heatmap_loss(h, our_t, our_w, loss_cfg["scale"], loss_cfg["slots"]))
    data = {"items": data_rows, "their_heatmaps_loss_on_their_targets": loss_their_targets,
            "their_heatmaps_loss_on_our_targets": loss_our_targets,
            "loss_rel_change_with_our_targets": (loss_our_targets - loss_their_targets) / loss_their_targets}

    probe_out = None
    if probe is not None:
        kp_cells = probe["joints_3d"][:, :2].double() / (probe["image_size"][0] / probe["heatmap_size"][0])
        vis = probe["joints_3d_visible"][:, 0] > 0
        make = cell_targets if cfg["targets"] == "cell" else gaussian_targets
        g, w = make(kp_cells.numpy(), vis.numpy(), tuple(probe["heatmap_size"]), float(cfg["sigma"]))
        tw = probe["target_weight"][:, 0]
        differ = (w != tw).nonzero().flatten().tolist()
        both = (w > 0) & (tw > 0)
        peak_t = probe["target"][both].flatten(1).argmax(1)
        peak_o = g[both].flatten(1).argmax(1)
        moved = (peak_t != peak_o).nonzero().flatten()
        side = probe["heatmap_size"][0]
        peak_examples = [[round(float(v), 3) for v in kp_cells[both][i]] + [int(peak_t[i] % side),
                          int(peak_t[i] // side), int(peak_o[i] % side), int(peak_o[i] // side)]
                         for i in moved.tolist()]
        probe_out = {
            "points": len(w), "invisible": int((~vis).sum()), "sigma_theirs": probe["sigma"],
            "sigma_ours": cfg["sigma"], "targets_ours": cfg["targets"],
            "bit_identical": bool(torch.equal(g, probe["target"]) and torch.equal(w, tw)),
            "weight_1_theirs": int((tw > 0).sum()), "weight_1_ours": int((w > 0).sum()),
            "weights_differ": len(differ),
            "weights_differ_at_cells": [[round(float(v), 3) for v in kp_cells[i]] + [float(tw[i]), float(w[i])]
                                        for i in differ],
            "their_weight_1_with_all_zero_target": int(((tw > 0) & (probe["target"].flatten(1).amax(1) == 0)).sum()),
            "target_max_abs_where_both_weighted": float((g[both] - probe["target"][both]).abs().max()),
            "peak_cell_differs": int((peak_t != peak_o).sum()), "both_weighted": int(both.sum()),
            "peak_differs_at": peak_examples,
        }

    # ---- report ----------------------------------------------------------------------------------
    def count_identical(rows):
        return f"{sum(r['bit_identical'] for r in rows.values())}/{len(rows)} bit-identical"

    g_name, g_fig = worst(grads)
    print(f"their half: {theirs['versions']}; batch {len(items)} items (ann ids {[it['ann_id'] for it in items]}), "
          f"input {tuple(batch['img'].shape[-2:])}, {k_pad} keypoint slots, {len(keys)} base keypoints")
    print(f"escape_fast: settings {[os.path.relpath(f, ROOT) for f in settings] or 'DEFAULTS'}, "
          f"{len(our_grads)} parameters with a gradient (theirs {sum(g is not None for g in theirs['grads'].values())}"
          f"), their one-hot picks our table's prototype in every slot: {picks_agree}; steps per epoch "
          f"{steps_per_epoch} ({cfg['sampling']} sampling, batch {cfg['batch_size']})")
    print()
    print(f"{'':34} {'theirs':>14} {'escape_fast':>14} {'ours/theirs':>12} {'rel. diff':>10}")
    print(f"{'loss':34} {their_loss:14.9g} {our_loss:14.9g} {loss['ratio_ours_theirs']:12.9f} {loss['rel_diff']:10.3g}")
    print(f"{'lr of step 0':34} {theirs['lr']:14.9g} {lr_used:14.9g} {lr_used / theirs['lr']:12.9f} "
          f"{abs(lr_used - theirs['lr']) / theirs['lr']:10.3g}")
    print(f"median gradient ratio ours/theirs over the parameters: {np.median(ratios):.9f} "
          f"(min {min(ratios):.9f}, max {max(ratios):.9f})")
    print()
    print(f"{'largest relative difference':34} {'||a-b||/||b||':>14} {'max|a-b|/max|b|':>16}  parameter")
    print(f"{'gradients':34} {g_fig['rel']:14.3g} {worst(grads, 'elem_rel')[1]['elem_rel']:16.3g}  "
          f"{g_name} ({their_name(g_name)}); {count_identical(grads)}")
    for what, rows in (("updated weights", weights), ("update w1 - w0", updates),
                       ("BN buffers after the step", buffers)):
        name, fig = worst(rows)
        extra = f"; {count_identical(rows)}" if rows and "bit_identical" in next(iter(rows.values())) else ""
        print(f"{what:34} {fig['rel']:14.3g} {worst(rows, 'elem_rel')[1]['elem_rel']:16.3g}  {name}{extra}")
    print(f"their gradients: median |g| {grad_scale['median_abs_grad_theirs']:.3g}; "
          f"{100 * grad_scale['share_below_10_eps']:.1f}% of the elements below 10 x Adam's eps "
          f"({grad_scale['adam_eps']:g}), {100 * grad_scale['share_below_100_eps']:.1f}% below 100 x")
    within = {"loss": loss["rel_diff"] <= 1e-5, "gradients": g_fig["rel"] <= 1e-4,
              "weights": max(f["rel"] for f in weights.values()) <= 1e-4,
              "updates": max(f["rel"] for f in updates.values()) <= 1e-4}
    print(f"issue 29's tolerances (loss 1e-5, gradients, weights and updates 1e-4 relative): {within}")
    print()
    print(f"escape_fast's data path (KeypointDataset, targets {cfg['targets']!r}) on the same annotations and their "
          "drawn center/scale/rotation:")
    print(f"  {'ann':>4} {'K':>3} {'vis':>3} {'s-factor':>8} {'rot':>7} {'img max':>7} {'px>0.5':>6} {'kp cells':>8} "
          f"{'w differ':>8} {'target max':>10} {'(both w)':>9} {'targets =':>9}")
    for r in data_rows:
        print(f"  {r['ann_id']:>4} {r['keypoints']:>3} {r['visible']:>3} {r['scale_factor']:8.5f} {r['rotation']:7.3f} "
              f"{r['image_max_abs_levels']:7.3f} {r['image_pixels_over_half_level']:>6} "
              f"{r['keypoint_max_abs_cells']:8.2e} {r['weights_differ']:>8} {r['target_max_abs']:10.4f} "
              f"{r['target_max_abs_where_both_weighted']:9.4f} {r['targets_bit_identical']!s:>9}")
    print(f"  their heatmaps: loss on their targets {loss_their_targets:.9g}, on escape_fast's {loss_our_targets:.9g} "
          f"({100 * data['loss_rel_change_with_our_targets']:+.4f}%)")
    if probe_out:
        print(f"  target probe ({probe_out['points']} points, {probe_out['invisible']} invisible, sigma theirs "
              f"{probe_out['sigma_theirs']} ours {probe_out['sigma_ours']}, targets {cfg['targets']!r}): bit-identical "
              f"{probe_out['bit_identical']}; weight 1 theirs {probe_out['weight_1_theirs']}, ours "
              f"{probe_out['weight_1_ours']}; {probe_out['weights_differ']} weights differ; theirs weight 1 with an "
              f"all-zero target: {probe_out['their_weight_1_with_all_zero_target']}; where both weigh: target max "
              f"|diff| {probe_out['target_max_abs_where_both_weighted']:.4f}, peak cell differs "
              f"{probe_out['peak_cell_differs']}/{probe_out['both_weighted']}")
        if probe_out["weights_differ"]:
            print("  weights that differ at heatmap cells (x, y, theirs, ours): "
                  f"{probe_out['weights_differ_at_cells']}")
        if probe_out["peak_cell_differs"]:
            print(f"  peak cells that differ (x, y, their peak x, y, our peak x, y): {probe_out['peak_differs_at']}")

    if args.out:
        record = {
            "dir": os.path.abspath(d), "versions_theirs": theirs["versions"], "torch_ours": str(torch.__version__),
            "settings": [os.path.relpath(f, ROOT) for f in settings],
            "batch": {"items": len(items), "ann_ids": [it["ann_id"] for it in items], "input": list(batch["img"].shape),
                      "keypoint_slots": k_pad, "base_keypoints": len(keys), "their_onehot_matches_table": picks_agree},
            "loss": loss, "lr": lr, "median_gradient_ratio": float(np.median(ratios)),
            "gradients_worst": {"parameter": g_name, **g_fig}, "gradient_scale": grad_scale, "gradients": grads,
            "gradient_name_mismatch": missing_grads, "within_tolerances": within,
            "step": {"worst_weight": dict(zip(("parameter", "figures"), worst(weights))),
                     "worst_update": dict(zip(("parameter", "figures"), worst(updates))),
                     "worst_buffer": dict(zip(("buffer", "figures"), worst(buffers))),
                     "weights": weights, "updates": updates, "buffers": buffers},
            "optimizer_theirs": theirs["optimizer"], "schedule_ours": {k: scfg[k] for k in scfg},
            "heatmap_loss_ours": loss_cfg, "steps_per_epoch_ours": steps_per_epoch,
            "data_path": data, "target_probe": probe_out,
        }
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
