"""Four-stage ESCAPE training (paper sec. 4-5; docs/method.md, "Training").

    python -m escape_fast.train --stage all --data DIR --split 1 --backbone resnet50 --out runs/split1

Stages (each resumable, each writing RUN_DIR/<stage>.pt):
  baseline  f_theta + one prototype per base keypoint, MSE on Gaussian targets
  cluster   kNN density-peaks clustering of the base keypoints' mean features (eq. 4)
  finetune  as baseline with one prototype per super-keypoint; then mu (prior.py)
  matching  f_gamma + the matching network, trained to assign base keypoints to super-keypoints
and RUN_DIR/model.pt, the model that eval, predict and plot load; alpha is
chosen on the validation categories after the stages that give MAP/ESCAPE.
One CPU, one GPU, or many through torchrun (DDP, NCCL or gloo; batch norm over
the global batch, so N processes train the same model as one).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

from escape_fast import checkpoint, cli, ops
from escape_fast import config as config_mod
from escape_fast.data import (
    BalancedCategorySampler,
    KeypointDataset,
    ShuffleSampler,
    load_for_run,
    make_loader,
    mp100_split_files,
)
from escape_fast.distributed import Runtime, autocast, sync_batchnorm
from escape_fast.errors import UsageError
from escape_fast.eval.alpha import check_alpha_data, choose_alpha
from escape_fast.files import remove_stale
from escape_fast.models.backbone import ensure_weights, hypercolumn_channels
from escape_fast.models.escape import EscapeModel, build_matcher, config_extractor
from escape_fast.models.losses import heatmap_loss, matching_loss
from escape_fast.models.training import HeatmapModel, MatchingModel
from escape_fast.prior import base_keypoint_means, base_keypoint_table, feature_prior, member_mean
from escape_fast.runlog import CSVLog

STAGES = ("baseline", "cluster", "finetune", "matching")


def lr_schedule(stage_cfg: dict, steps_per_epoch: int):
    """The lr factor of each step: a linear warm-up over ``warmup`` steps, then x gamma at each milestone epoch.

    ``warmup_rule`` "ours": (step + 1) / warmup, 1 from step warmup - 1 on. "mmcv" (the authors',
    mmcv 1.x's LrUpdaterHook with warmup='linear'): 1 - (1 - step / warmup) x (1 - warmup_ratio),
    warmup_ratio at step 0 and 1 from step warmup on, computed in mmcv's order of operations, so
    that with the step decay's factor 1 the lr is theirs to the bit (config.DEFAULTS).
    """
    warm = max(1, int(stage_cfg.get("warmup", 0)))
    milestones = [m * steps_per_epoch for m in stage_cfg.get("milestones", [])]
    gamma = stage_cfg.get("gamma", 0.1)
    if stage_cfg.get("warmup_rule", "ours") == "mmcv":
        ratio = float(stage_cfg.get("warmup_ratio", 0.001))
        iters = int(stage_cfg.get("warmup", 0))

        def warm_factor(step):
            return 1 - (1 - step / iters) * (1 - ratio) if step < iters else 1.0

        return lambda step: warm_factor(step) * gamma ** sum(step >= m for m in milestones)
    return lambda step: min(1.0, (step + 1) / warm) * gamma ** sum(step >= m for m in milestones)


def training_dataset(coco, cfg: dict, **kwargs) -> KeypointDataset:
    """The training items of a run: its crops (``rotated_crops``), augmentation (``augment``) and
    targets (``targets``)."""
    aug = cfg["augment"]
    return KeypointDataset(coco, input_size=cfg["input_size"], train=True, sigma=cfg["sigma"], seed=cfg["seed"],
                           scale_factor=aug["scale"], rotation_factor=aug["rotation"], flip=aug["flip"],
                           rotation_prob=aug["rotation_prob"], distribution=aug["distribution"],
                           targets=cfg["targets"], rotated_crops=cfg["rotated_crops"], **kwargs)


def training_sampler(coco, cfg: dict, rank: int = 0, world_size: int = 1):
    """The order of a training epoch (``sampling``): balanced over the base categories, or every instance shuffled."""
    if cfg["sampling"] == "shuffle":
        return ShuffleSampler(coco, seed=cfg["seed"], rank=rank, world_size=world_size)
    return BalancedCategorySampler(coco, per_category=cfg["per_category"], seed=cfg["seed"], rank=rank,
                                   world_size=world_size)


def make_optimizer(model: nn.Module, stage_cfg: dict, steps_per_epoch: int):
    """(optimizer, scheduler) of a stage: Adam at the stage's lr (torch's betas and eps, no weight
    decay) under :func:`lr_schedule`, stepped once per batch."""
    opt = torch.optim.Adam(model.parameters(), lr=stage_cfg["lr"])
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(stage_cfg, steps_per_epoch))


def train_step(run_model, loss_fn, batch: dict, opt, sched, device, amp: bool):
    """One training step of :func:`run_epochs`: the batch to ``device``, ``loss_fn(run_model,
    batch)`` (under autocast when ``amp``), backward, an optimizer and a scheduler step. Returns
    (loss, metrics); the gradients stay in each parameter's ``.grad`` until the next step."""
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    with autocast(device, amp):
        loss, metrics = loss_fn(run_model, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss, metrics


def run_epochs(stage: str, model: nn.Module, loss_fn, coco, cfg: dict, rt: Runtime, run_dir: str, log: CSVLog,
               validate=None):
    """Train ``model`` for cfg[stage]['epochs'] epochs with resume and validation.

    ``loss_fn(model, batch) -> (loss, {name: value})``. The stage checkpoint
    RUN_DIR/<stage>.pt holds the model, optimizer, schedule and epoch, and is
    rewritten atomically after every epoch.
    """
    from tqdm.auto import tqdm

    scfg, path = cfg[stage], os.path.join(run_dir, f"{stage}.pt")
    if rt.world > 1:
        model = sync_batchnorm(model, rt.device)
    model.to(rt.device)
    if rt.device.type == "cuda" and cfg["channels_last"]:
        model.to(memory_format=torch.channels_last)
    if cfg["batch_size"] % rt.world:
        raise config_mod.ConfigError(f"batch_size {cfg['batch_size']} is not divisible by {rt.world} processes")
    per_rank = cfg["batch_size"] // rt.world
    dataset = training_dataset(coco, cfg)
    sampler = training_sampler(coco, cfg, rank=rt.rank, world_size=rt.world)
    loader = make_loader(dataset, per_rank, sampler=sampler, num_workers=cfg["workers"], drop_last=True)
    if len(loader) == 0:
        raise config_mod.ConfigError(f"{coco.path}: fewer instances than one batch of {per_rank}")
    opt, sched = make_optimizer(model, scfg, len(loader))
    start_epoch, step = 0, 0
    if os.path.exists(path):
        state = checkpoint.load(path, kind=stage, required=["model", "optimizer", "scheduler", "epoch", "step"],
                                map_location=rt.device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, step = state["epoch"], state["step"]
        if rt.main:
            print(f"[{stage}] resuming after epoch {start_epoch} (step {step}) from {path}")
    ddp = model
    if rt.world > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda"
                                                  else None)
    run_model = torch.compile(ddp) if cfg["compile"] else ddp

    for epoch in range(start_epoch, scfg["epochs"]):
        model.train()
        sampler.set_epoch(epoch)
        bar = tqdm(loader, desc=f"{stage} epoch {epoch + 1}/{scfg['epochs']}", disable=not rt.main, leave=False)
        total, count = 0.0, 0
        for batch in bar:
            loss, metrics = train_step(run_model, loss_fn, batch, opt, sched, rt.device, cfg["amp"])
            step, count, total = step + 1, count + 1, total + float(loss.detach())
            bar.set_postfix(loss=f"{total / count:.5f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            for name, value in {"loss": float(loss.detach()), **metrics}.items():
                log.write(stage=stage, epoch=epoch + 1, step=step, name=name, value=f"{value:.6g}")
        if rt.main:
            msg = f"[{stage}] epoch {epoch + 1}: loss {total / max(count, 1):.6f}"
            if validate is not None and ((epoch + 1) % cfg["val_every"] == 0 or epoch + 1 == scfg["epochs"]):
                pck = validate(model)
                msg += f", val PCK@0.2 {pck:.4f}"
                log.write(stage=stage, epoch=epoch + 1, step=step, name="val_pck", value=f"{pck:.6f}")
            print(msg, flush=True)
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "epoch": epoch + 1, "step": step, "config": cfg}
            checkpoint.save(state, path, kind=stage)
        rt.barrier()
    return model


# --------------------------------------------------------------------------
# the stages
# --------------------------------------------------------------------------
def _validator(cfg, rt, val_coco, methods, make_model):
    """Mean PCK@0.2 on the val categories (1-shot, seeded episodes)."""
    from escape_fast.data import EpisodeSampler
    from escape_fast.eval.engine import evaluate

    if val_coco is None:
        return None
    sampler = EpisodeSampler(val_coco, shots=1, queries=cfg["val_queries"], draws=cfg["val_draws"],
                             seed=cfg["seed"], too_few="skip")
    if not sampler.episodes:
        return None
    # alpha 'val' is chosen once a stage ends: until then MAP / ESCAPE are monitored at 0.5
    alpha = 0.5 if cfg["alpha"] == "val" else None

    def validate(trained):
        model = make_model(trained).to(rt.device)
        res = evaluate(model, val_coco, sampler, methods=methods, device=rt.device, batch_size=cfg["batch_size"],
                       alpha=alpha)
        trained.train()
        return res[methods[-1]].summary.pck_main

    return validate


def heatmap_step(cfg):
    """The loss function of stages 1 and 3 (``heatmap_loss`` settings): HeatmapModel's heatmaps
    regressed onto the batch's targets, keypoints without a prototype weighted 0."""
    scale, slots = float(cfg["heatmap_loss"]["scale"]), cfg["heatmap_loss"]["slots"]

    def step(model, batch):
        heatmaps, has_proto = model(batch["image"], batch["category_index"])
        return heatmap_loss(heatmaps, batch["target"], batch["target_weight"] * has_proto, scale, slots), {}

    return step


def _extractor(cfg, state=None, weights=None):
    """f_theta or f_gamma of the config, with ``state`` (a state dict) loaded."""
    extractor = config_extractor(cfg, weights)
    if state is not None:
        extractor.load_state_dict(state)
    return extractor


@torch.no_grad()
def init_head(extractor: nn.Module, cfg) -> nn.Module:
    """A new f_theta's head as ``head_init`` says: PyTorch's initialization as built ("torch"), or
    the authors' ("normal": every transposed convolution of the head N(0, 0.001^2), as their
    CustomDeconv.init_weights; its batch norms are (1, 0) in both). A head without transposed
    convolutions is left as it is."""
    if cfg["head_init"] == "normal":
        for module in extractor.head.modules():
            if isinstance(module, nn.ConvTranspose2d):
                nn.init.normal_(module.weight, std=0.001)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    return extractor


def _load(run_dir, stage, *required):
    return checkpoint.load(os.path.join(run_dir, f"{stage}.pt"), kind=stage, required=required)


def _pooling(cfg) -> dict:
    """How base_keypoint_means and feature_prior crop and pool, from the run's config."""
    return dict(input_size=cfg["input_size"], sigma=cfg["sigma"], batch_size=cfg["batch_size"],
                workers=cfg["workers"], amp=bool(cfg["amp"]), pooling=cfg["pooling"])


def stage_baseline(cfg, rt, run_dir, train_coco, val_coco, log):
    table, _, keys = base_keypoint_table(train_coco)
    torch.manual_seed(cfg["seed"])  # the same initial weights in every process and every run
    extractor = init_head(_extractor(cfg, weights=cfg["weights"]), cfg)
    model = HeatmapModel(extractor, torch.randn(len(keys), cfg["channels"]) * 1e-3, table)
    validate = _validator(cfg, rt, val_coco, ("mle",), lambda m: EscapeModel(cfg, m.extractor))
    return run_epochs("baseline", model, heatmap_step(cfg), train_coco, cfg, rt, run_dir, log, validate)


@torch.no_grad()
def stage_cluster(cfg, rt, run_dir, train_coco, log):
    """Mean pooled feature (or prototype) of each base keypoint, then ops.cluster_keypoints."""
    base = _load(run_dir, "baseline", "model")
    table, owner, keys = base_keypoint_table(train_coco)
    ccfg = cfg["cluster"]
    if ccfg["source"] == "prototypes":
        vectors = base["model"]["prototypes"].float()
        seen = torch.ones(len(keys), dtype=torch.bool)
    else:  # "features" (config.CHOICES)
        extractor = _extractor(cfg, checkpoint.sub_state(base["model"], "extractor")).to(rt.device)
        vectors, seen = base_keypoint_means(extractor, train_coco, rt.device, progress=rt.main,
                                            **_pooling(cfg))
    idx = torch.nonzero(seen).squeeze(1).cpu()
    super_kps, assign_seen = ops.cluster_keypoints(vectors.cpu()[idx], owner[idx], ccfg["threshold"], ccfg["k"],
                                                   growth=ccfg["growth"])
    assignment = torch.full((len(keys),), -1, dtype=torch.long)
    assignment[idx] = assign_seen
    if rt.main:
        checkpoint.save({"super_keypoints": super_kps, "assignment": assignment, "vectors": vectors.cpu(),
                         "keys": torch.tensor(keys), "config": cfg}, os.path.join(run_dir, "cluster.pt"),
                        kind="cluster")
        print(f"[cluster] {len(keys)} base keypoints ({int(seen.sum())} seen) -> {super_kps.shape[0]} super-keypoints "
              f"(threshold {ccfg['threshold']}, k {ccfg['k']}, growth {ccfg['growth']})", flush=True)
        log.write(stage="cluster", epoch=0, step=0, name="super_keypoints", value=super_kps.shape[0])
    rt.barrier()


def stage_finetune(cfg, rt, run_dir, train_coco, val_coco, log):
    """Stage 1's training at the super-keypoint level; at its end, mu in the fine-tuned feature space."""
    clusters, base = _load(run_dir, "cluster", "super_keypoints", "assignment"), _load(run_dir, "baseline", "model")
    table, _, _ = base_keypoint_table(train_coco)
    assignment, num_super = clusters["assignment"], clusters["super_keypoints"].shape[0]
    super_table = torch.where(table >= 0, assignment[table.clamp_min(0)], table)
    init = member_mean(base["model"]["prototypes"].float(), assignment, num_super)
    # f_theta goes on from stage 1's, or starts again from the trunk's pretrained weights (the
    # authors'); a fresh head is seeded as stage 1's is, so every process and every run starts alike
    if cfg["finetune"]["init"] == "pretrained":
        torch.manual_seed(cfg["seed"])
        extractor = init_head(_extractor(cfg, weights=cfg["weights"]), cfg)
    else:
        extractor = _extractor(cfg, checkpoint.sub_state(base["model"], "extractor"))
    model = HeatmapModel(extractor, init, super_table)
    # monitoring takes the prior from 10 images per category, not a pass over the whole training set
    sample = [i for c in train_coco.category_ids for i in train_coco.instances_of(c)[:10]]

    def with_prior(m):
        if cfg["prior_source"] == "detectors":
            return EscapeModel(cfg, m.extractor, m.prototypes.detach().float())
        mu = feature_prior(m.extractor, train_coco, rt.device, assignment, num_super, instances=sample,
                           **_pooling(cfg))
        return EscapeModel(cfg, m.extractor, mu)

    validate = _validator(cfg, rt, val_coco, ("mle", "map"), with_prior)
    model = run_epochs("finetune", model, heatmap_step(cfg), train_coco, cfg, rt, run_dir, log, validate)
    # the prior is stored beside the trained weights (every epoch's save drops it, so a
    # finetune.pt that holds it is one of these very weights)
    path = os.path.join(run_dir, "finetune.pt")
    if rt.main:
        state = checkpoint.load(path, kind="finetune", required=["model"])
        if "super_keypoints" not in state:
            mu = feature_prior(model.extractor, train_coco, rt.device, assignment, num_super,
                               **_pooling(cfg))
            checkpoint.save({**state, "super_keypoints": mu}, path, kind="finetune")
    rt.barrier()
    return model


def _finetuned(cfg, run_dir):
    """The fine-tuned f_theta and mu: in its feature space, or its detectors (prior_source, docs/authors.md)."""
    ft = _load(run_dir, "finetune", "model")
    extractor = _extractor(cfg, checkpoint.sub_state(ft["model"], "extractor"))
    if cfg["prior_source"] == "detectors":
        return extractor, ft["model"]["prototypes"].float()
    if "super_keypoints" not in ft:
        raise checkpoint.CheckpointError(
            f"{os.path.join(run_dir, 'finetune.pt')}: no super-keypoints in feature space (fine-tuning writes "
            "them when it ends, since 2026-11-24); run the finetune stage again (--stage finetune --resume)")
    return extractor, ft["super_keypoints"].float()


def stage_matching(cfg, rt, run_dir, train_coco, val_coco, log):
    clusters = _load(run_dir, "cluster", "super_keypoints", "assignment")
    extractor, mu = _finetuned(cfg, run_dir)
    table, _, _ = base_keypoint_table(train_coco)
    labels_table = torch.where(table >= 0, clusters["assignment"][table.clamp_min(0)], table)
    gamma = _extractor(cfg, extractor.state_dict())  # f_gamma starts from the fine-tuned f_theta: it knows keypoints
    torch.manual_seed(cfg["seed"])
    model = MatchingModel(gamma, build_matcher(cfg, mu.shape[0]), cfg["sigma"], cfg["pooling"])
    model.register_buffer("labels_table", labels_table)

    def step_fn(run_model, batch):
        log_p, used = run_model(batch["image"], batch["keypoints"], batch["visible"])
        labels = model.labels_table[batch["category_index"]]
        loss, acc = matching_loss(log_p, labels, used & (labels >= 0))
        return loss, {"accuracy": float(acc)}

    validate = _validator(cfg, rt, val_coco, ("mle", "map", "escape"),
                          lambda m: EscapeModel(cfg, extractor.to(rt.device), mu, m.extractor, m.matcher))
    return run_epochs("matching", model, step_fn, train_coco, cfg, rt, run_dir, log, validate)


def assemble(cfg, run_dir, train_coco) -> EscapeModel:
    """The model of the stage checkpoints that exist (what model.pt holds)."""
    mu, gamma, matcher = None, None, None
    if os.path.exists(os.path.join(run_dir, "finetune.pt")):
        extractor, mu = _finetuned(cfg, run_dir)
    else:
        extractor = _extractor(cfg, checkpoint.sub_state(_load(run_dir, "baseline", "model")["model"], "extractor"))
    if mu is not None and os.path.exists(os.path.join(run_dir, "matching.pt")):
        state = _load(run_dir, "matching", "model")["model"]
        gamma = _extractor(cfg, checkpoint.sub_state(state, "extractor"))
        matcher = build_matcher(cfg, mu.shape[0])
        matcher.load_state_dict(checkpoint.sub_state(state, "matcher"))
    # the test categories must be novel: eval refuses a test set that shares categories with these
    names = [train_coco.categories[c].name for c in train_coco.category_ids]
    return EscapeModel(cfg, extractor, mu, gamma, matcher, base_categories=names)


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m escape_fast.train",
        description="Train ESCAPE in four stages (baseline, cluster, finetune, matching) on an MP-100-format "
                    "dataset. Resumable; runs under torchrun for several processes or GPUs.",
    )
    p.add_argument("--stage", choices=(*STAGES, "all"), default="all", help="stage to run (default: all, in order)")
    p.add_argument("--data", help="dataset root with annotations/ and images/ (MP-100 layout)")
    p.add_argument("--split", type=cli.split_argument, default=(None,),
                   help="MP-100 split 1..5, or all: the five in turn, each in its own run folder "
                        "(--out with '{split}' in it, e.g. --out 'runs/split{split}')")
    p.add_argument("--backbone", help="resnet50 | resnet18 | efficientnet_lite0 | dinov2_vits14")
    p.add_argument("--weights", help="trunk weights: imagenet, none, or a state-dict file")
    p.add_argument("--out", required=True, help="run folder (created; config, checkpoints and log go there)")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML file of settings (see "
                   "escape_fast.config.DEFAULTS; repeatable, later ones win; escape_fast/assets/recipes/authors.yaml: "
                   "the authors' recipe)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set baseline.epochs=2 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoints (also without one yet: then it "
                        "starts; a job that torchrun restarts after a lost process resumes by itself)")
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile the training models")
    p.add_argument("--bad-images", choices=("raise", "skip"), default="raise",
                   help="an image that is missing or cannot be decoded: stop with an error naming it (default), "
                        "or check every image first and leave those instances out, counting them")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return cli.run_main("escape_fast.train", lambda: run(args))


def run(args) -> int:
    splits = args.split
    if len(splits) > 1 and "{split}" not in args.out:
        raise UsageError("--split all trains five runs: put '{split}' in --out, e.g. --out 'runs/split{split}'")
    # torchrun --max-restarts starts the processes again after one was lost: they continue the run
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    for split in splits:
        train_split(args, split, args.out.replace("{split}", str(split)) if split else args.out,
                    args.resume or restarted)
    return 0


def train_split(args, split, run_dir: str, resume: bool) -> None:
    """Every stage asked for, of one split, into ``run_dir``."""
    saved = os.path.join(run_dir, "config.yaml")
    if os.path.exists(saved) and not resume:
        raise UsageError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    overrides = [config_mod.parse_override(s) for s in args.set]
    overrides += [{key: getattr(args, key)} for key in ("data", "backbone", "device") if getattr(args, key) is not None]
    overrides += [{"split": split}] if split is not None else []
    if args.weights is not None:
        overrides.append({"weights": None if args.weights.lower() == "none" else args.weights})
    overrides += [{"compile": True}] if args.compile else []
    base = config_mod.resolve(saved) if resume and os.path.exists(saved) else None
    cfg = config_mod.resolve(args.config, overrides, base=base)
    if cfg["head"] == "hypercolumn":  # its channels are the trunk's stage widths
        cfg["channels"] = hypercolumn_channels(cfg["backbone"], tuple(cfg["stages"]))
    stages = STAGES if args.stage == "all" else (args.stage,)
    if "baseline" in stages:  # before any work: say now if the trunk's weights cannot be had here
        ensure_weights(cfg["backbone"], cfg["weights"])
    if not cfg["data"]:
        raise config_mod.ConfigError("no data: pass --data DIR (an MP-100-format root)")
    files = mp100_split_files(cfg["data"], cfg["split"], need=("train",))  # val is optional
    rt = Runtime(cfg["device"])
    os.makedirs(run_dir, exist_ok=True)
    if rt.main:
        remove_stale(run_dir)  # temporary files of a killed run
        config_mod.save(cfg, saved)
    train_coco = load_for_run(files["train"], args.bad_images, cfg["workers"])
    val_coco = load_for_run(files["val"], args.bad_images, cfg["workers"]) if files["val"].is_file() else None
    check_alpha_data(cfg["alpha"], val_coco, cfg["val_queries"], cfg["seed"])  # before hours of training
    log = CSVLog(os.path.join(run_dir, "log.csv"), rt.main)
    run_stage = {"baseline": stage_baseline, "finetune": stage_finetune, "matching": stage_matching}
    for stage in stages:
        t0 = time.time()
        if stage == "cluster":
            stage_cluster(cfg, rt, run_dir, train_coco, log)
        else:
            run_stage[stage](cfg, rt, run_dir, train_coco, val_coco, log)
        if rt.main:
            model = assemble(cfg, run_dir, train_coco)
            # MAP / ESCAPE change with finetune.pt and matching.pt only: choose alpha after
            # those stages (and after the last one run, so that its model.pt is complete)
            if (cfg["alpha"] == "val" and model.methods != ("mle",)
                    and (stage in ("finetune", "matching") or stage == stages[-1])):
                choose_alpha(model, val_coco, rt.device, cfg["val_queries"], cfg["seed"], cfg["batch_size"])
            model.save(os.path.join(run_dir, "model.pt"))
            print(f"[{stage}] done in {time.time() - t0:.1f}s; model.pt has methods {', '.join(model.methods)}",
                  flush=True)
        rt.barrier()
    rt.close()


if __name__ == "__main__":
    sys.exit(main())
