"""Four-stage ESCAPE training (SPEC 3 to 6).

    python -m escape_fast.train --stage all --data DIR --split 1 --backbone resnet50 --out runs/split1

Stages (each resumable, each writing RUN_DIR/<stage>.pt):
  baseline  f_theta + one prototype per base keypoint, MSE on Gaussian targets
  cluster   mean keypoint feature of every base keypoint (eq. 4), kNN
            density-peaks clustering into L super-keypoints
  finetune  as baseline, but each base keypoint uses its super-keypoint's
            prototype (initialized from the clusters); the result is mu
  matching  f_gamma + the matching network, trained to assign base
            keypoints to their super-keypoints
and RUN_DIR/model.pt, the model that escape_fast.eval and predict load.

Runs on one CPU, one GPU, or many through torchrun (DistributedDataParallel:
NCCL on GPU, gloo on CPU); the global batch is split over the processes and
batch-norm statistics are computed over the global batch, so N processes
train the same model as one.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from escape_fast import checkpoint, cli, config as config_mod, ops
from escape_fast.data import (BalancedCategorySampler, DataError, KeypointDataset, load_for_run, make_loader,
                              mp100_split_files)
from escape_fast.files import remove_stale
from escape_fast.models.backbone import build_extractor, ensure_weights
from escape_fast.models.escape import EscapeModel, build_matcher
from escape_fast.models.matching import matching_loss

STAGES = ("baseline", "cluster", "finetune", "matching")


# --------------------------------------------------------------------------
# processes and devices
# --------------------------------------------------------------------------
class Runtime:
    """Rank, world size and device of this process (torchrun sets the env)."""

    def __init__(self, device_arg: str = "auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_arg == "auto":
            device_arg = "cuda" if torch.cuda.is_available() else "cpu"
        if device_arg.startswith("cuda"):
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device(device_arg)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """Batch norm over the global batch on CPU (gloo), where torch's
    SyncBatchNorm is CUDA-only: the sums, then the centred squared sums, are
    all-reduced. (One pass with E[x^2] - E[x]^2 loses float32 digits when
    the mean is large against the spread, and Adam turns that into visibly
    different weights after an epoch.)"""

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        count = torch.tensor([x.numel() // c], dtype=x.dtype, device=x.device)
        sums = all_reduce(torch.cat((x.sum((0, 2, 3)), count)))
        n = sums[-1]
        mean = sums[:c] / n
        centred = x - mean[None, :, None, None]
        var = all_reduce(centred.square().sum((0, 2, 3))) / n
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean)
            self.running_var.mul_(1 - m).add_(m * var * n / (n - 1))
            self.num_batches_tracked.add_(1)
        y = centred * torch.rsqrt(var[None, :, None, None] + self.eps)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GlobalBatchNorm2d):
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats).to(device)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            sync_batchnorm(child, device)
    return module


# --------------------------------------------------------------------------
# models trained by the stages
# --------------------------------------------------------------------------
class HeatmapModel(nn.Module):
    """f_theta + prototypes; ``table[category_index, k]`` is the prototype row
    of keypoint k of a category (-1: no prototype; its weight is zeroed)."""

    def __init__(self, extractor: nn.Module, prototypes: torch.Tensor, table: torch.Tensor):
        super().__init__()
        self.extractor = extractor
        self.prototypes = nn.Parameter(prototypes.clone())
        self.register_buffer("table", table.clone())

    def forward(self, images, category_index):
        feats = self.extractor(images).float()
        rows = self.table[category_index]  # [B, K]
        protos = self.prototypes[rows.clamp_min(0)]
        return ops.prototype_heatmaps(feats, protos), rows >= 0


class MatchingModel(nn.Module):
    """f_gamma + matching network: log assignment of an image's keypoints."""

    def __init__(self, extractor: nn.Module, matcher: nn.Module, sigma: float):
        super().__init__()
        self.extractor, self.matcher, self.sigma = extractor, matcher, sigma

    def forward(self, images, keypoints, visible):
        feats = self.extractor(images).float()
        pooled = ops.keypoint_pool(feats, keypoints, visible, self.sigma)
        return self.matcher(pooled, keypoints, visible)


def heatmap_loss(heatmaps, target, weight):
    """0.5 x weighted MSE over every cell of every keypoint slot (mmpose's convention)."""
    return 0.5 * (weight[..., None, None] * (heatmaps - target) ** 2).mean()


def base_keypoint_table(coco) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(table [categories, Kpad] -> global base keypoint index, category of each
    base keypoint [P], keys [(category_id, k)])."""
    cats = coco.category_ids
    table = torch.full((len(cats), coco.max_keypoints), -1, dtype=torch.long)
    owner, keys = [], []
    for ci, c in enumerate(cats):
        for k in range(coco.categories[c].num_keypoints):
            table[ci, k] = len(keys)
            owner.append(c)
            keys.append((c, k))
    return table, torch.tensor(owner), keys


# --------------------------------------------------------------------------
# the training loop shared by the stages
# --------------------------------------------------------------------------
class CSVLog:
    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(os.path.dirname(path), "tensorboard"))
            except Exception:  # tensorboard not installed
                self.tb = None

    def write(self, **row):
        if not self.enabled:
            return
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["time", "stage", "epoch", "step", "name", "value"])
            if new:
                w.writeheader()
            w.writerow({"time": f"{time.time():.1f}", **row})
        if self.tb is not None:
            self.tb.add_scalar(f"{row['stage']}/{row['name']}", row["value"], row["step"])


def lr_schedule(stage_cfg: dict, steps_per_epoch: int):
    """Linear warm-up over ``warmup`` steps, then x gamma at each milestone epoch."""
    warm = max(1, int(stage_cfg.get("warmup", 0)))
    milestones = [m * steps_per_epoch for m in stage_cfg.get("milestones", [])]
    gamma = stage_cfg.get("gamma", 0.1)

    def factor(step):
        f = min(1.0, (step + 1) / warm)
        return f * gamma ** sum(step >= m for m in milestones)

    return factor


def _autocast(rt: Runtime, cfg: dict):
    if cfg["amp"] and rt.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def run_epochs(stage: str, model: nn.Module, loss_fn, coco, cfg: dict, rt: Runtime, run_dir: str, log: CSVLog,
               validate=None, extra_state=None):
    """Train ``model`` for cfg[stage]['epochs'] epochs with resume and validation.

    ``loss_fn(model, batch) -> (loss, {name: value})``. The stage checkpoint
    RUN_DIR/<stage>.pt holds the model, optimizer, schedule and epoch, and is
    rewritten atomically after every epoch.
    """
    from tqdm.auto import tqdm

    scfg = cfg[stage]
    path = os.path.join(run_dir, f"{stage}.pt")
    if rt.world > 1:
        model = sync_batchnorm(model, rt.device)
    model.to(rt.device)
    if rt.device.type == "cuda" and cfg["channels_last"]:
        model.to(memory_format=torch.channels_last)
    if cfg["batch_size"] % rt.world:
        raise ValueError(f"batch_size {cfg['batch_size']} is not divisible by {rt.world} processes")
    per_rank = cfg["batch_size"] // rt.world
    dataset = KeypointDataset(coco, input_size=cfg["input_size"], train=True, sigma=cfg["sigma"], seed=cfg["seed"])
    sampler = BalancedCategorySampler(coco, per_category=cfg["per_category"], seed=cfg["seed"], rank=rt.rank,
                                      world_size=rt.world)
    loader = make_loader(dataset, per_rank, sampler=sampler, num_workers=cfg["workers"], drop_last=True)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"{coco.path}: fewer instances than one batch of {per_rank}")
    opt = torch.optim.Adam(model.parameters(), lr=scfg["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(scfg, steps_per_epoch))
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
            batch = {k: v.to(rt.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            with _autocast(rt, cfg):
                loss, metrics = loss_fn(run_model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            total += float(loss.detach())
            count += 1
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
                     "epoch": epoch + 1, "step": step, "config": cfg, **(extra_state or {})}
            checkpoint.save(state, path, kind=stage)
        rt.barrier()
    return model


# --------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------
def _validator(cfg, rt, val_coco, methods, make_model):
    """Mean PCK@0.2 on the val categories (1-shot, seeded episodes)."""
    if val_coco is None:
        return None
    from escape_fast.data import EpisodeSampler
    from escape_fast.evaluation import evaluate

    sampler = EpisodeSampler(val_coco, shots=1, queries=cfg["val_queries"], draws=cfg["val_draws"],
                             seed=cfg["seed"], too_few="skip")
    if not sampler.episodes:
        return None

    # alpha 'val' is only chosen once a stage ends (choose_alpha): until then
    # MAP / ESCAPE are monitored at SPEC 7's 0.5
    alpha = 0.5 if cfg["alpha"] == "val" else None

    def validate(trained):
        model = make_model(trained).to(rt.device)
        res = evaluate(model, val_coco, sampler, methods=methods, device=rt.device, batch_size=cfg["batch_size"],
                       alpha=alpha)
        trained.train()
        return res[methods[-1]].summary.pck_main

    return validate


ALPHA_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
ALPHA_SHOTS = (1, 5)
ALPHA_DRAWS = 100  # support draws per val category (x val_queries pairs per category and alpha)


def check_alpha_data(cfg, val_coco) -> None:
    """alpha 'val' needs a validation category with 1 + val_queries instances."""
    from escape_fast.data import EpisodeSampler

    if cfg["alpha"] != "val":
        return
    if val_coco is None:
        raise config_mod.ConfigError("alpha 'val' needs the split's validation categories, and this data has "
                                     "no val annotation file; set alpha to a number")
    sampler = EpisodeSampler(val_coco, shots=1, queries=cfg["val_queries"], draws=1, seed=cfg["seed"],
                             too_few="skip")
    if not sampler.episodes:
        raise config_mod.ConfigError(f"alpha 'val': no category of {val_coco.path} has 1 + {cfg['val_queries']} "
                                     f"instances to choose alpha with; set alpha to a number")


@torch.no_grad()
def choose_alpha(model: EscapeModel, val_coco, cfg, device) -> dict:
    """alpha 'val': for 1 and 5 shots, the ALPHA_GRID value that gives the
    best PCK@0.2 on the validation categories, for ESCAPE (MAP for a model
    without a matching network); on ties the larger alpha (the less prior).
    Stores {shots: alpha} in ``model.config["alpha_by_shots"]`` and returns it;
    a shot count that no validation category has enough instances for is
    left out (alpha_for falls back to fewer shots)."""
    from escape_fast.data import EpisodeSampler
    from escape_fast.data.metrics import THRESHOLDS
    from escape_fast.evaluation import Timer, build_bank, evaluate_pairs

    if val_coco is None:
        raise config_mod.ConfigError("alpha 'val' needs the split's validation categories, and this data has "
                                     "no val annotation file; set alpha to a number")
    method = "escape" if "escape" in model.methods else "map"
    model.to(device).eval()
    instances = [i for c in val_coco.category_ids for i in val_coco.instances_of(c)]
    bank = build_bank(model, val_coco, instances, device, cfg["batch_size"], matcher=method == "escape")
    main = THRESHOLDS.index(0.2)
    chosen = {}
    for shots in ALPHA_SHOTS:
        sampler = EpisodeSampler(val_coco, shots=shots, queries=cfg["val_queries"], draws=ALPHA_DRAWS,
                                 seed=cfg["seed"], too_few="skip")
        if not sampler.episodes:  # alpha_for then uses the choice of fewer shots
            print(f"[alpha] {shots}-shot: no validation category has {shots} + {cfg['val_queries']} "
                  f"instances; not chosen", flush=True)
            continue
        scores = {}
        for alpha in ALPHA_GRID:
            pairs = evaluate_pairs(model, val_coco, sampler, method, device, bank=bank, timer=Timer(device),
                                   alpha=alpha)
            scores[alpha] = float(pairs.scores[main].mean())
        chosen[shots] = max(reversed(ALPHA_GRID), key=lambda a: scores[a])
        listing = ", ".join(f"{a:g}: {100 * p:.2f}" for a, p in scores.items())
        print(f"[alpha] {shots}-shot val PCK@0.2 of {method.upper()} by alpha: {listing} -> {chosen[shots]:g}",
              flush=True)
    if not chosen:
        raise ValueError(f"{val_coco.path}: no validation category has {min(ALPHA_SHOTS)} + {cfg['val_queries']} "
                         f"instances to choose alpha with; set alpha to a number")
    model.config["alpha_by_shots"] = chosen
    return chosen


def stage_baseline(cfg, rt, run_dir, train_coco, val_coco, log):
    table, _, keys = base_keypoint_table(train_coco)
    torch.manual_seed(cfg["seed"])  # the same initial weights in every process and every run
    extractor = build_extractor(cfg["backbone"], weights=cfg["weights"], channels=cfg["channels"])
    protos = torch.randn(len(keys), cfg["channels"]) * 1e-3
    model = HeatmapModel(extractor, protos, table)
    validate = _validator(cfg, rt, val_coco, ("mle",), lambda m: EscapeModel(cfg, m.extractor))
    return run_epochs("baseline", model, _heatmap_step, train_coco, cfg, rt, run_dir, log, validate)


def _heatmap_step(model, batch):
    heatmaps, has_proto = model(batch["image"], batch["category_index"])
    weight = batch["target_weight"] * has_proto
    return heatmap_loss(heatmaps, batch["target"], weight), {}


@torch.no_grad()
def base_keypoint_means(extractor, coco, cfg, device, instances=None, show_progress=True, unit=False):
    """Mean pooled feature of every base keypoint over the instances where it
    is visible (eq. 4): (vectors [P, C], seen [P] bool), in the order of
    :func:`base_keypoint_table`. ``instances`` limits the instances used;
    ``unit`` averages the L2-normalized features instead (directions)."""
    from tqdm.auto import tqdm

    from escape_fast.evaluation import extract

    table, _, keys = base_keypoint_table(coco)
    dataset = KeypointDataset(coco, input_size=cfg["input_size"], train=False, sigma=cfg["sigma"])
    if instances is not None:
        dataset = torch.utils.data.Subset(dataset, list(instances))
    loader = make_loader(dataset, cfg["batch_size"], num_workers=cfg["workers"])
    holder = EscapeModel(cfg, extractor)  # what extract() reads: the extractor and sigma
    sums = torch.zeros(len(keys), cfg["channels"], device=device)
    counts = torch.zeros(len(keys), device=device)
    table = table.to(device)
    for batch in tqdm(loader, desc="base keypoint features", disable=not show_progress, leave=False):
        vis = batch["visible"].to(device)
        _, pooled, _ = extract(holder, batch["image"].to(device), batch["keypoints"].to(device), vis,
                               amp=bool(cfg["amp"]), matcher=False)
        if unit:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        rows = table[batch["category_index"].to(device)]
        use = vis & (rows >= 0)
        sums.index_add_(0, rows[use], pooled[use])
        counts.index_add_(0, rows[use], torch.ones_like(rows[use], dtype=counts.dtype))
    return sums / counts.clamp_min(1)[:, None], counts > 0


@torch.no_grad()
def stage_cluster(cfg, rt, run_dir, train_coco, log):
    """Mean pooled feature of each base keypoint over its training instances
    (eq. 4), then ops.cluster_keypoints."""
    base = checkpoint.load(os.path.join(run_dir, "baseline.pt"), kind="baseline", required=["model"])
    table, owner, keys = base_keypoint_table(train_coco)
    extractor = build_extractor(cfg["backbone"], weights=None, channels=cfg["channels"])
    model = HeatmapModel(extractor, torch.zeros(len(keys), cfg["channels"]), table)
    model.load_state_dict(base["model"])
    model.to(rt.device).eval()
    ccfg = cfg["cluster"]
    if ccfg["source"] == "prototypes":
        vectors = model.prototypes.detach().float()
        seen = torch.ones(len(keys), dtype=torch.bool, device=vectors.device)
    elif ccfg["source"] == "features":
        vectors, seen = base_keypoint_means(model.extractor, train_coco, cfg, rt.device, show_progress=rt.main)
    else:
        raise config_mod.ConfigError(f"cluster.source must be 'features' or 'prototypes', got {ccfg['source']!r}")
    idx = torch.nonzero(seen).squeeze(1)
    super_kps, assign_seen = ops.cluster_keypoints(vectors[idx].cpu(), owner[idx.cpu()], ccfg["threshold"],
                                                   ccfg["k"])
    assignment = torch.full((len(keys),), -1, dtype=torch.long)
    assignment[idx.cpu()] = assign_seen
    if rt.main:
        checkpoint.save({"super_keypoints": super_kps, "assignment": assignment, "vectors": vectors.cpu(),
                         "keys": torch.tensor(keys), "config": cfg}, os.path.join(run_dir, "cluster.pt"),
                        kind="cluster")
        print(f"[cluster] {len(keys)} base keypoints ({int(seen.sum())} seen) -> {super_kps.shape[0]} "
              f"super-keypoints (threshold {ccfg['threshold']}, k {ccfg['k']})", flush=True)
        log.write(stage="cluster", epoch=0, step=0, name="super_keypoints", value=super_kps.shape[0])
    rt.barrier()


def _load_clusters(run_dir):
    return checkpoint.load(os.path.join(run_dir, "cluster.pt"), kind="cluster",
                           required=["super_keypoints", "assignment"])


def stage_finetune(cfg, rt, run_dir, train_coco, val_coco, log):
    clusters = _load_clusters(run_dir)
    base = checkpoint.load(os.path.join(run_dir, "baseline.pt"), kind="baseline", required=["model"])
    table, _, keys = base_keypoint_table(train_coco)
    extractor = build_extractor(cfg["backbone"], weights=None, channels=cfg["channels"])
    extractor.load_state_dict(_sub_state(base["model"], "extractor"))
    assignment = clusters["assignment"]
    super_table = torch.where(table >= 0, assignment[table.clamp_min(0)], table)
    num_super = clusters["super_keypoints"].shape[0]
    init = member_mean(base["model"]["prototypes"].float(), assignment, num_super)
    model = HeatmapModel(extractor, init, super_table)

    # monitoring takes the prior from 10 images per category, not a pass over the whole training set
    sample = [i for c in train_coco.category_ids for i in train_coco.instances_of(c)[:10]]

    def with_prior(m):
        mu = feature_prior(m.extractor, train_coco, cfg, rt.device, assignment, num_super, sample)
        return EscapeModel(cfg, m.extractor, mu)

    validate = _validator(cfg, rt, val_coco, ("mle", "map"), with_prior)
    model = run_epochs("finetune", model, _heatmap_step, train_coco, cfg, rt, run_dir, log, validate)
    # the prior in the fine-tuned feature space, stored beside the trained prototypes (every
    # epoch's save drops it, so a finetune.pt that holds it is one of these very weights)
    path = os.path.join(run_dir, "finetune.pt")
    if rt.main:
        state = checkpoint.load(path, kind="finetune", required=["model"])
        if "super_keypoints" not in state:
            mu = feature_prior(model.extractor, train_coco, cfg, rt.device, assignment, num_super)
            checkpoint.save({**state, "super_keypoints": mu}, path, kind="finetune")
    rt.barrier()
    return model


@torch.no_grad()
def feature_prior(extractor, coco, cfg, device, assignment, num_super: int, instances=None) -> torch.Tensor:
    """Super-keypoints mu [L, C] in feature space (sec. 4.1-4.2).

    Sec. 4.1 models the features of keypoint r as o ~ N(zeta_r, phi^2) and
    zeta_r ~ N(mu_z, sigma^2): mu_z is the mean of its members' means zeta_r
    (eq. 4), here under the fine-tuned extractor. The adaptation matches and
    blends directions (models/adapt.py), so zeta_r is the mean of keypoint
    r's L2-normalized features. ``instances`` limits the images used.
    """
    extractor.eval()
    zeta, seen = base_keypoint_means(extractor, coco, cfg, device, instances, show_progress=False, unit=True)
    member = seen.cpu() & (assignment >= 0)
    mu = member_mean(zeta.cpu(), torch.where(member, assignment, -1), num_super)
    empty = int((torch.bincount(assignment[member], minlength=num_super) == 0).sum())
    if empty:  # their members never appear visible in the training images: mu = 0, a prior of no direction
        print(f"[finetune] {empty} of {num_super} super-keypoints have no visible member; their mu is 0",
              flush=True)
    return mu


def member_mean(prototypes: torch.Tensor, assignment: torch.Tensor, num_super: int) -> torch.Tensor:
    """Mean [L, C] of the members' vectors (``assignment`` [P], -1 for
    keypoints left out; a super-keypoint without members stays 0). Stage 3
    starts from the mean of the members' stage-1 prototypes; feature_prior
    takes the mean of their mean features.

    This is SPEC 5's "initialized from the cluster vectors" when the clusters
    were made from the prototypes. When they were made from mean features
    (cluster.source: features), those vectors are at the features' scale,
    ~20x the prototypes' on the built-in model, and heatmaps that start 400x
    too large wreck the first epochs; the members' prototypes have the
    heatmap's scale by construction.
    """
    used = assignment >= 0
    sums = torch.zeros(num_super, prototypes.shape[1], dtype=prototypes.dtype)
    sums.index_add_(0, assignment[used], prototypes[used])
    counts = torch.bincount(assignment[used], minlength=num_super).clamp_min(1)
    return sums / counts[:, None].to(prototypes.dtype)


def _sub_state(state: dict, prefix: str) -> dict:
    """The entries of ``state`` under ``prefix.`` (a sub-module's state dict)."""
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}


def _finetuned(cfg, run_dir):
    """The fine-tuned f_theta and the super-keypoints mu in its feature space."""
    path = os.path.join(run_dir, "finetune.pt")
    ft = checkpoint.load(path, kind="finetune", required=["model"])
    if "super_keypoints" not in ft:
        raise checkpoint.CheckpointError(
            f"{path}: no super-keypoints in feature space (fine-tuning writes them when it ends, since "
            f"2026-11-24); run the finetune stage again (--stage finetune --resume)")
    extractor = build_extractor(cfg["backbone"], weights=None, channels=cfg["channels"])
    extractor.load_state_dict(_sub_state(ft["model"], "extractor"))
    return extractor, ft["super_keypoints"].float()


def stage_matching(cfg, rt, run_dir, train_coco, val_coco, log):
    clusters = _load_clusters(run_dir)
    extractor, mu = _finetuned(cfg, run_dir)
    table, _, _ = base_keypoint_table(train_coco)
    labels_table = torch.where(table >= 0, clusters["assignment"][table.clamp_min(0)], table)
    # f_gamma starts from the fine-tuned f_theta: it already knows keypoints
    gamma = build_extractor(cfg["backbone"], weights=None, channels=cfg["channels"])
    gamma.load_state_dict(extractor.state_dict())
    torch.manual_seed(cfg["seed"])
    model = MatchingModel(gamma, build_matcher(cfg, mu.shape[0]), cfg["sigma"])
    model.register_buffer("labels_table", labels_table)

    def step_fn(run_model, batch):
        log_p = run_model(batch["image"], batch["keypoints"], batch["visible"])
        labels = model.labels_table[batch["category_index"]]
        valid = batch["visible"] & (labels >= 0)
        loss, acc = matching_loss(log_p, labels, valid)
        return loss, {"accuracy": float(acc)}

    validate = _validator(cfg, rt, val_coco, ("mle", "map", "escape"),
                          lambda m: EscapeModel(cfg, extractor.to(rt.device), mu, m.extractor, m.matcher))
    return run_epochs("matching", model, step_fn, train_coco, cfg, rt, run_dir, log, validate)


def assemble(cfg, run_dir, train_coco) -> EscapeModel:
    """model.pt from the stage checkpoints that exist."""
    base = checkpoint.load(os.path.join(run_dir, "baseline.pt"), kind="baseline", required=["model"])
    extractor = build_extractor(cfg["backbone"], weights=None, channels=cfg["channels"])
    mu, gamma, matcher = None, None, None
    # the test categories must be novel: eval refuses a test set that shares categories with these
    cfg = {**cfg, "base_categories": sorted(train_coco.categories[c].name for c in train_coco.category_ids)}
    if os.path.exists(os.path.join(run_dir, "finetune.pt")):
        extractor, mu = _finetuned(cfg, run_dir)
    else:
        extractor.load_state_dict(_sub_state(base["model"], "extractor"))
    if mu is not None and os.path.exists(os.path.join(run_dir, "matching.pt")):
        mstate = checkpoint.load(os.path.join(run_dir, "matching.pt"), kind="matching", required=["model"])
        gamma = build_extractor(cfg["backbone"], weights=None, channels=cfg["channels"])
        matcher = build_matcher(cfg, mu.shape[0])
        gamma.load_state_dict(_sub_state(mstate["model"], "extractor"))
        matcher.load_state_dict(_sub_state(mstate["model"], "matcher"))
    return EscapeModel(cfg, extractor, mu, gamma, matcher)


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------
def annotation_files(cfg) -> dict:
    if not cfg["data"]:
        raise config_mod.ConfigError("no data: pass --data DIR (an MP-100-format root)")
    return mp100_split_files(cfg["data"], cfg["split"], need=("train",))  # val is optional (alpha 'val' checks)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m escape_fast.train",
        description="Train ESCAPE in four stages (baseline, cluster, finetune, matching) on an MP-100-format "
                    "dataset. Resumable; runs under torchrun for several processes or GPUs.",
    )
    p.add_argument("--stage", choices=(*STAGES, "all"), default="all", help="stage to run (default: all, in order)")
    p.add_argument("--data", help="dataset root with annotations/ and images/ (MP-100 layout)")
    p.add_argument("--split", type=int, help="MP-100 split 1..5")
    p.add_argument("--backbone", help="resnet50 | resnet18 | efficientnet_lite0 | dinov2_vits14")
    p.add_argument("--weights", help="trunk weights: imagenet, none, or a state-dict file")
    p.add_argument("--out", required=True, help="run folder (created; config, checkpoints and log go there)")
    p.add_argument("--config", help="YAML file of settings (see escape_fast.config.DEFAULTS)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set baseline.epochs=2 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoints")
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
    run_dir = args.out
    saved = os.path.join(run_dir, "config.yaml")
    if os.path.exists(saved) and not args.resume:
        print(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out",
              file=sys.stderr)
        return 2
    overrides = [config_mod.parse_override(s) for s in args.set]
    for key in ("data", "split", "backbone", "device"):
        if getattr(args, key) is not None:
            overrides.append({key: getattr(args, key)})
    if args.weights is not None:
        overrides.append({"weights": None if args.weights.lower() == "none" else args.weights})
    if args.compile:
        overrides.append({"compile": True})
    base = config_mod.resolve(saved) if args.resume and os.path.exists(saved) else None
    cfg = config_mod.resolve(args.config, overrides, base=base)
    stages = STAGES if args.stage == "all" else (args.stage,)
    if "baseline" in stages:  # before any work: say now if the trunk's weights cannot be had here
        ensure_weights(cfg["backbone"], cfg["weights"])
    rt = Runtime(cfg["device"])
    os.makedirs(run_dir, exist_ok=True)
    if rt.main:
        remove_stale(run_dir)  # temporary files of a killed run
    if rt.main:
        config_mod.save(cfg, saved)
    files = annotation_files(cfg)
    train_coco = load_for_run(files["train"], args.bad_images, cfg["workers"])
    val_coco = load_for_run(files["val"], args.bad_images, cfg["workers"]) if os.path.exists(files["val"]) else None
    check_alpha_data(cfg, val_coco)  # before hours of training, not after
    log = CSVLog(os.path.join(run_dir, "log.csv"), rt.main)
    for stage in stages:
        t0 = time.time()
        if stage == "baseline":
            stage_baseline(cfg, rt, run_dir, train_coco, val_coco, log)
        elif stage == "cluster":
            stage_cluster(cfg, rt, run_dir, train_coco, log)
        elif stage == "finetune":
            stage_finetune(cfg, rt, run_dir, train_coco, val_coco, log)
        elif stage == "matching":
            stage_matching(cfg, rt, run_dir, train_coco, val_coco, log)
        if rt.main:
            model = assemble(cfg, run_dir, train_coco)
            # MAP / ESCAPE change with finetune.pt and matching.pt only: choose alpha after
            # those stages (and after the last one run, so that its model.pt is complete)
            if (cfg["alpha"] == "val" and model.methods != ("mle",)
                    and (stage in ("finetune", "matching") or stage == stages[-1])):
                choose_alpha(model, val_coco, cfg, rt.device)
            checkpoint.save(model.to_checkpoint(), os.path.join(run_dir, "model.pt"), kind="model")
            print(f"[{stage}] done in {time.time() - t0:.1f}s; model.pt has methods {', '.join(model.methods)}",
                  flush=True)
        rt.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
