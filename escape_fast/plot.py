"""Figures of a model and of its evaluation, written as PNG (matplotlib, Agg).

    python -m escape_fast.plot super-keypoints [--checkpoint RUN_DIR] [--annotations FILE] --out map.png
    python -m escape_fast.plot matching --support IMG --support-keypoints KP.json [--checkpoint RUN_DIR] --out m.png
    python -m escape_fast.plot episodes --report report.json [--episodes 0,200,400] --out grid.png
    python -m escape_fast.plot pck --report report.json --out pck.png

* ``super-keypoints`` (the paper's Fig. 2 and 5): a 2-D PCA projection of the
  super-keypoints (triangles) and of their member base keypoints (crosses),
  coloured by super-keypoint; the largest super-keypoints are named with some
  of their members, and, when the base images can be read, a panel shows
  each one's members on their images.
* ``matching`` (Fig. 6): a support image and, for each of its keypoints, the
  super-keypoint that simple matching (MAP, Hungarian) and the matching
  network (ESCAPE) choose, shown by one member base keypoint.
* ``episodes`` (Fig. 7): rows of support / ground truth / prediction of
  chosen episodes of an evaluation (``eval --out report.json`` gives the
  settings, so the episodes are the evaluated ones).
* ``pck``: per-category PCK bars of an evaluation report, one colour per method.

Where the members of the super-keypoints come from
--------------------------------------------------
A training run folder holds ``cluster.pt`` (stage 2): every base keypoint's
vector, the cluster means and which cluster each keypoint joined. With
``--checkpoint RUN_DIR`` that clustering is shown as it happened: base
keypoints and cluster means from stage 1's model, before fine-tuning moved
the super-keypoints; the names come from the run's training annotations
(or ``--annotations``). A model file alone (the built-in checkpoint, a
``model.pt``) does not store membership; then the members are recomputed:
the mean feature of each keypoint of a dataset (``--annotations``, default
the built-in benchmark's training split), extracted by the model, joins the
super-keypoint by cosine similarity (the cost of MAP's matching: only
directions matter to a heatmap). The figure states
which of the two it shows; the projection is of unit vectors too.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from escape_fast import builtin, checkpoint, cli
from escape_fast.data import EpisodeSampler, draws_for_episodes, load_coco, load_for_run, mp100_split_files
from escape_fast.data.coco import load_image, read_json
from escape_fast.data.transforms import Crop
from escape_fast.distributed import resolve_device
from escape_fast.drawing import draw_pose
from escape_fast.errors import CheckpointError, DataError, UsageError
from escape_fast.eval.metrics import pck_per_query, valid_keypoints
from escape_fast.files import atomic_write
from escape_fast.models.escape import EscapeModel

PANEL = 192  # pixels of the side of an image panel


def save_figure(fig: Figure, out: str, dpi: int = 110) -> str:
    """Write ``fig`` as PNG through the Agg canvas (no pyplot, no global backend)."""
    FigureCanvasAgg(fig)
    with atomic_write(out, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
    return out


def crop_view(image: np.ndarray, box, points=None, valid=None, skeleton=(), size: int = PANEL, colors=None,
              labels=None, radius=None) -> np.ndarray:
    """The padded square crop of ``box`` at ``size`` px with image points drawn on it."""
    crop = Crop.of_box(box, (size, size))
    view = crop.warp(image, (size, size))
    if points is None:
        return view
    radius = max(3, size // 48) if radius is None else radius  # panels are small: dots a little larger
    return draw_pose(view, crop.to_grid(points, (size, size)), valid, skeleton, labels, colors, radius)


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width))


def _blank(ax, text=""):
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if text:
        ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=7, wrap=True, transform=ax.transAxes)


def _show(ax, image, title=None, xlabel=None, fontsize=8):
    ax.imshow(image)
    _blank(ax)
    if title:
        ax.set_title(title, fontsize=fontsize)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=fontsize - 1)


# --------------------------------------------------------------------------
# super-keypoints and their members
# --------------------------------------------------------------------------
@dataclass
class Members:
    """Base keypoints and the super-keypoint each belongs to.

    ``centers`` [L, C] are the super-keypoints in the space of ``vectors``
    [N, C] (one per base keypoint, ``keys`` (category id, keypoint index));
    ``assignment`` [N] (-1: none); ``coco`` the base annotations (names and
    images) or None; ``source`` says where the membership comes from.
    """

    centers: torch.Tensor
    vectors: torch.Tensor
    assignment: torch.Tensor
    keys: list
    coco: object
    source: str

    def name(self, i: int) -> tuple[str, str]:
        """(category name, keypoint name) of base keypoint i."""
        c, k = self.keys[i]
        if self.coco is None:
            return f"category {c}", f"keypoint {k}"
        cat = self.coco.categories[c]
        return cat.name, cat.keypoints[k]

    def of(self, z: int) -> list[int]:
        """Members of super-keypoint z, nearest to it first."""
        idx = torch.nonzero(self.assignment == z).squeeze(1)
        dist = -(_unit(self.vectors[idx]) @ _unit(self.centers[z]))
        return idx[torch.argsort(dist, stable=True)].tolist()

    def patch(self, i: int, size: int = PANEL // 2 + 32) -> np.ndarray | None:
        """Base keypoint i marked on the first instance where it is visible, or None."""
        if self.coco is None:
            return None
        c, k = self.keys[i]
        for j in self.coco.instances_of(c):
            inst = self.coco.instances[j]
            if inst.visible[k]:
                try:
                    image = load_image(inst.image.path, inst.image_id)
                except DataError:
                    return None
                return crop_view(image, inst.bbox, inst.keypoints[k : k + 1], None, (), size,
                                 np.array([[255, 40, 40]], dtype=np.uint8), radius=max(3, size // 24))
        return None


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def _quiet_coco(path, bad_images: str = "raise"):
    if bad_images == "skip":  # says how many instances it left out
        return load_for_run(path, "skip")
    with warnings.catch_warnings():  # skipped annotations do not matter for names and pictures
        warnings.simplefilter("ignore")
        return load_coco(path, check_images=False)


def members_from_run(run_dir: str, annotations: str | None = None) -> Members:
    """The stage-2 clustering stored in RUN_DIR/cluster.pt."""
    path = os.path.join(run_dir, "cluster.pt")
    clusters = checkpoint.load(path, kind="cluster", required=("super_keypoints", "assignment", "vectors", "keys"))
    cfg = clusters.get("config", {})
    keys = [tuple(int(v) for v in k) for k in clusters["keys"].tolist()]
    if annotations is None and cfg.get("data"):
        try:
            annotations = str(mp100_split_files(cfg["data"], cfg.get("split", 1), need=("train",))["train"])
        except DataError:
            annotations = None
    coco = _quiet_coco(annotations) if annotations else None
    if coco is not None:
        bad = [(c, k) for c, k in keys if c not in coco.categories or k >= coco.categories[c].num_keypoints]
        if bad:
            raise DataError(f"{annotations}: does not hold the base keypoints of {path} (e.g. category {bad[0][0]} "
                            f"keypoint {bad[0][1]}); pass the run's training annotations with --annotations")
    kind = {"prototypes": "prototypes", "features": "mean features"}.get(cfg.get("cluster", {}).get("source"), "vectors")
    source = (f"stage-2 clustering stored in {path}: base keypoint {kind} of the stage-1 model and their cluster "
              "means (before fine-tuning)")
    if coco is None:
        source += "; names unknown (pass --annotations)"
    return Members(clusters["super_keypoints"].float(), clusters["vectors"].float(), clusters["assignment"].long(),
                   keys, coco, source)


def members_from_data(model, coco, device, per_category: int = 10, show_progress: bool = True) -> Members:
    """Members recomputed: each keypoint's mean feature over up to
    ``per_category`` instances of its category joins the nearest
    super-keypoint (cosine similarity)."""
    from escape_fast.prior import base_keypoint_means, base_keypoint_table

    instances = [i for c in coco.category_ids for i in coco.instances_of(c)[:per_category]]
    vectors, seen = base_keypoint_means(model.extractor, coco, torch.device(device), model.input_size, model.sigma,
                                        instances=instances, progress=show_progress, pooling=model.config.pooling)
    centers = model.super_keypoints.float()
    nearest = (_unit(vectors.double()) @ _unit(centers.double().to(vectors.device)).T).argmax(1)
    assignment = torch.where(seen, nearest, torch.full_like(nearest, -1))
    _, _, keys = base_keypoint_table(coco)
    source = (f"members recomputed from {coco.path} (up to {per_category} instances per category): each keypoint's "
              "mean feature joins the nearest super-keypoint (not the training clustering)")
    return Members(centers.cpu(), vectors.cpu(), assignment.cpu(), keys, coco, source)


def load_members(checkpoint_arg: str | None, model, annotations: str | None, device, per_category: int = 10,
                 show_progress: bool = True, bad_images: str = "raise") -> Members:
    """Membership of ``model``'s super-keypoints (see the module docstring)."""
    if model.super_keypoints.shape[0] == 0:
        raise CheckpointError("the model has no super-keypoints (trained through stage 1 only)")
    run = None
    if checkpoint_arg:  # a run folder, or the model.pt inside one
        run = checkpoint_arg if os.path.isdir(checkpoint_arg) else os.path.dirname(os.path.abspath(checkpoint_arg))
    if run and os.path.exists(os.path.join(run, "cluster.pt")):
        members = members_from_run(run, annotations)
        if members.centers.shape[0] != model.super_keypoints.shape[0]:
            raise DataError(f"{run}: cluster.pt has {members.centers.shape[0]} super-keypoints but the model "
                            f"{model.super_keypoints.shape[0]}")
        return members
    if annotations is None:
        annotations = str(mp100_split_files(builtin.dataset_root(progress=show_progress), 1, need=("train",))["train"])
    return members_from_data(model, _quiet_coco(annotations, bad_images), device, per_category, show_progress)


def pca_2d(x: torch.Tensor) -> np.ndarray:
    """First two principal components of the rows of x: [N, 2]."""
    x = x.double()
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return (x @ v[:2].T).numpy() if v.shape[0] >= 2 else np.zeros((len(x), 2))


def plot_super_keypoints(members: Members, out: str, top: int = 6, per_row: int = 5) -> str:
    """The super-keypoint map (see the module docstring): every super-keypoint
    and base keypoint in grey, the ``top`` largest super-keypoints in colour
    with lines to their members, and (when the base images can be read) the
    members of the four largest on their images."""
    l = members.centers.shape[0]
    assigned = torch.nonzero(members.assignment >= 0).squeeze(1)
    z = members.assignment[assigned].numpy()
    xy = pca_2d(_unit(torch.cat([members.centers, members.vectors[assigned]])))
    centers, points = xy[:l], xy[l:]
    sizes = np.bincount(z, minlength=l)
    biggest = [int(i) for i in np.argsort(-sizes, kind="stable")[: min(top, l)] if sizes[i] > 0]
    color = {s: colormaps["tab10"](j % 10) for j, s in enumerate(biggest)}
    patches = {s: [(i, members.patch(i)) for i in members.of(s)[:per_row]] for s in biggest[:4]}
    with_patches = any(p is not None for row in patches.values() for _, p in row)

    fig = Figure(figsize=(17 if with_patches else 10, 9.5))
    if with_patches:
        grid = fig.add_gridspec(len(patches), 1 + per_row, width_ratios=[per_row] + [1] * per_row)
        ax = fig.add_subplot(grid[:, 0])
    else:
        ax = fig.add_subplot()
    grey = (0.75, 0.75, 0.75, 1.0)
    rest = ~np.isin(z, biggest)
    ax.scatter(points[rest, 0], points[rest, 1], color=grey, marker="x", s=10, linewidths=0.7)
    ax.scatter(centers[:, 0], centers[:, 1], color=grey, marker="^", s=22)
    handles = []
    for s in biggest:
        own = np.flatnonzero(z == s)
        for i in own:  # members joined to their super-keypoint
            ax.plot([points[i, 0], centers[s, 0]], [points[i, 1], centers[s, 1]], color=color[s], lw=0.7, alpha=0.6)
        ax.scatter(points[own, 0], points[own, 1], color=color[s], marker="x", s=22, linewidths=1.0)
        names = ", ".join(": ".join(members.name(i)) for i in members.of(s)[:3])
        more = f", +{sizes[s] - 3} more" if sizes[s] > 3 else ""
        handles.append(ax.scatter([centers[s, 0]], [centers[s, 1]], color=color[s], marker="^", s=90,
                                  edgecolors="black", linewidths=0.8, label=f"S{s}: {names}{more}"))
        ax.annotate(f"S{s}", centers[s], xytext=(5, 5), textcoords="offset points", fontsize=8, color="black")
    ax.set_title(f"{l} super-keypoints (triangles) and {len(assigned)} base keypoints (crosses), PCA of "
                 f"{members.centers.shape[1]}-d vectors; the {len(biggest)} largest in colour\n"
                 f"{_wrap(members.source, 120)}", fontsize=9)
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    if handles:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.08), fontsize=7, ncol=1,
                  frameon=False)
    if with_patches:  # Fig. 5: members on their images, the category below each
        for row, (s, items) in enumerate(patches.items()):
            for col in range(per_row):
                pax = fig.add_subplot(grid[row, 1 + col])
                if col < len(items) and items[col][1] is not None:
                    cat, kp = members.name(items[col][0])
                    _show(pax, items[col][1], None, f"{cat}\n{kp}", fontsize=8)
                else:
                    _blank(pax)
                if col == 0:
                    pax.set_ylabel(f"S{s}", fontsize=10, color=color[s], rotation=0, ha="right", va="center")
    return save_figure(fig, out)


# --------------------------------------------------------------------------
# matching of a support set to super-keypoints (Fig. 6)
# --------------------------------------------------------------------------
METHOD_TITLES = {"map": "simple matching (MAP, Hungarian)", "escape": "learnable matching network (ESCAPE)"}


def plot_matching(predictor, members: Members, out: str, max_keypoints: int = 20, per_row: int = 10) -> str:
    """Support keypoints and one member of the super-keypoint each is matched to."""
    methods = [m for m in ("map", "escape") if m in predictor.model.methods]
    if not methods:
        raise CheckpointError(f"{predictor.checkpoint}: the model has no super-keypoints to match")
    shown = np.flatnonzero(predictor.known)[:max_keypoints]
    per_row = min(per_row, len(shown))
    rows_per = math.ceil(len(shown) / per_row)
    kps = predictor.supports[0]
    path = predictor.support_images[0]

    note = ("numbers: support keypoints; right: the super-keypoint each is matched to (ESCAPE: with its "
            "probability), shown by its member nearest to it. " + members.source)
    fig = Figure(figsize=(4 + 1.6 * per_row, 1.0 + 2.2 * rows_per * len(methods)))
    left, right = fig.subfigures(1, 2, width_ratios=[4, 1.6 * per_row])
    ax = left.subplots()
    if os.path.exists(path):
        view = crop_view(load_image(path), predictor.support_crops[0].box, kps.keypoints, kps.visible,
                         kps.skeleton, 2 * PANEL, labels=[str(i) for i in range(len(kps))])
        _show(ax, view, f"support: {os.path.basename(path)}", _wrap(note, 60), fontsize=9)
    else:
        _blank(ax, _wrap(note, 60))
    empty = np.full((PANEL // 2, PANEL // 2, 3), 255, dtype=np.uint8)  # keeps the panels aligned
    for sub, m in zip(right.subfigures(len(methods), 1, squeeze=False)[:, 0], methods):
        idx, weight = predictor.matches(m)
        sub.suptitle(METHOD_TITLES[m], fontsize=10)
        axes = sub.subplots(rows_per, per_row, squeeze=False).ravel()
        for pax in axes[len(shown):]:
            _blank(pax)
        for pax, r in zip(axes, shown):
            zr = int(idx[r])
            member = members.of(zr)[:1] if zr >= 0 else []
            head = f"{r} → S{zr}" + (f" ({weight[r]:.2f})" if m == "escape" and zr >= 0 else "")
            patch = members.patch(member[0]) if member else None
            label = "\n".join(members.name(member[0])) if member else ("no match" if zr < 0 else "no member")
            _show(pax, empty if patch is None else patch, head, label, fontsize=7)
    return save_figure(fig, out)


# --------------------------------------------------------------------------
# episodes of an evaluation (Fig. 7)
# --------------------------------------------------------------------------
def plot_episodes(model, coco, episodes, methods, out: str, query: int = 0, device="cpu") -> str:
    """One row per episode: its (first) support, a query's ground truth and
    each method's prediction with its PCK@0.2."""
    from escape_fast.eval.engine import build_bank, predict_episodes

    # one extraction for every method (the matching network only if ESCAPE is shown)
    needed = sorted({i for e in episodes for i in (*e.supports, *e.queries)})
    bank = build_bank(model, coco, needed, torch.device(device), matcher="escape" in methods)
    preds = {m: predict_episodes(model, coco, episodes, m, device, bank=bank) for m in methods}
    cols = 2 + len(methods)
    fig = Figure(figsize=(2.3 * cols, 2.5 * len(episodes)))
    axes = fig.subplots(len(episodes), cols, squeeze=False)
    for row, e in enumerate(episodes):
        cat = coco.categories[e.category_id]
        k, limbs = cat.num_keypoints, cat.limbs()
        sup = coco.instances[e.supports[0]]
        q = coco.instances[e.queries[query]]
        sup_vis = np.stack([coco.instances[i].visible for i in e.supports])
        shown = sup_vis.all(0)  # what the evaluation scores, with the query's visibility
        valid = valid_keypoints(q.visible[None], sup_vis[None])
        q_image = load_image(q.image.path, q.image_id)
        support = crop_view(load_image(sup.image.path, sup.image_id), sup.bbox, sup.keypoints, sup.visible, limbs)
        shots = f" (1 of {len(e.supports)})" if len(e.supports) > 1 else ""
        _show(axes[row, 0], support, f"support{shots}", f"{cat.name}, draw {e.draw}")
        _show(axes[row, 1], crop_view(q_image, q.bbox, q.keypoints, q.visible, limbs), "ground truth")
        for col, m in enumerate(methods, start=2):
            xy = preds[m][row][query, :k].numpy()
            pck = float(pck_per_query(xy[None], q.keypoints[None], valid, [q.bbox_size])[0])
            _show(axes[row, col], crop_view(q_image, q.bbox, xy, shown, limbs), f"{m.upper()}  PCK@0.2 {pck:.2f}")
    return save_figure(fig, out)


def episodes_from_settings(coco, shots, queries, pairs, seed):
    draws = draws_for_episodes(pairs, len(coco.category_ids), queries)
    return EpisodeSampler(coco, shots=shots, queries=queries, draws=draws, seed=seed)


# --------------------------------------------------------------------------
# per-category PCK (an eval report)
# --------------------------------------------------------------------------
def read_report(path: str) -> dict:
    report = read_json(path, "evaluation report (python -m escape_fast.eval --out FILE writes one)")
    if isinstance(report, dict) and isinstance(report.get("runs"), list) and "results" not in report:
        raise DataError(f"{path}: a report of {len(report['runs'])} evaluations (several --split or --shots); "
                        "plot reads the report of one: run the evaluation with one --split and one --shots")
    if not isinstance(report, dict) or not isinstance(report.get("results"), dict) or not report["results"]:
        raise DataError(f"{path}: not an evaluation report (no 'results'; see python -m escape_fast.eval --out)")
    return report


def plot_pck(report: dict, out: str, methods=None, source: str = "report") -> str:
    """Per-category PCK at the main threshold, one bar per method."""
    results = report["results"]
    methods = list(methods or results)
    missing = [m for m in methods if m not in results]
    if missing:
        raise DataError(f"{source}: no results for {', '.join(missing)} (it has {', '.join(results)})")
    names = report.get("category_names", {})
    first = results[methods[0]]
    thr = f"{first.get('main_threshold', 0.2):.2f}"
    try:
        cats = sorted(first["per_category"], key=lambda c: -results[methods[-1]]["per_category"][c][thr])
        values = {m: [100 * results[m]["per_category"][c][thr] for c in cats] for m in methods}
    except (KeyError, TypeError) as e:
        raise DataError(f"{source}: per-category PCK@{thr} missing or malformed ({e!r})") from None
    n, width = len(cats), 0.8 / len(methods)
    fig = Figure(figsize=(max(6.0, 0.3 * n * len(methods) + 2.5), 4.8))
    ax = fig.add_subplot()
    for j, m in enumerate(methods):
        color = colormaps["tab10"](j)
        ax.bar(np.arange(n) + (j - (len(methods) - 1) / 2) * width, values[m], width, color=color,
               label=f"{m.upper()} (mean {100 * results[m]['pck'][thr]:.1f})")
        ax.axhline(100 * results[m]["pck"][thr], color=color, ls="--", lw=0.8)
    ax.set_xticks(np.arange(n), [names.get(str(c), str(c)) for c in cats], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(f"PCK@{float(thr):g} (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(-0.6, n - 0.4)
    shots = report.get("shots", "?")
    ckpt = str(report.get("checkpoint", "?"))
    ckpt = os.path.basename(os.path.dirname(ckpt) if os.path.basename(ckpt) == "model.pt" else ckpt)
    ax.set_title(f"per-category PCK, {shots}-shot, {first.get('num_pairs', '?')} pairs ({ckpt})", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, out)


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------
def _model(checkpoint_arg, device):
    model = EscapeModel.load(checkpoint_arg).to(device).eval()
    return model, model.path


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m escape_fast.plot",
                                description="Figures (PNG) of a model and its evaluation; see each command's --help.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(q, model=True):
        q.add_argument("--out", required=True, help="PNG file to write")
        if model:
            q.add_argument("--checkpoint", metavar="RUN_DIR",
                           help="training run folder, model.pt or an ESCAPE authors' .pth (default: the built-in checkpoint)")
            q.add_argument("--device", default="auto", help="auto | cpu | cuda")
            q.add_argument("--bad-images", choices=("raise", "skip"), default="raise",
                           help="an image that is missing or cannot be decoded: stop with an error naming it "
                                "(default), or check every image first and leave those instances out")
        q.add_argument("--quiet", action="store_true", help="no progress bars")

    def membership(q):
        q.add_argument("--annotations", metavar="FILE",
                       help="base keypoint annotations: names and images of a run's clustering, or the dataset "
                            "whose keypoints are assigned to a model's super-keypoints (default: the run's "
                            "training file, else the built-in benchmark's)")
        q.add_argument("--per-category", type=int, default=10,
                       help="instances per category when members are recomputed (default 10)")

    q = sub.add_parser("super-keypoints", help="2-D map of super-keypoints and their member keypoints (Fig. 2, 5)",
                       description="PCA map of the super-keypoints and their member base keypoints. From a run "
                                   "folder: its stage-2 clustering (cluster.pt); from a model file: members "
                                   "recomputed on --annotations.")
    common(q)
    membership(q)
    q.add_argument("--top", type=int, default=6, help="super-keypoints named on the map (largest first)")

    q = sub.add_parser("matching", help="support keypoints matched to super-keypoints (Fig. 6)",
                       description="For each support keypoint, the super-keypoint chosen by simple matching (MAP) "
                                   "and by the matching network (ESCAPE), shown by one member base keypoint.")
    common(q)
    membership(q)
    q.add_argument("--support", action="append", required=True, metavar="IMG", help="support image (repeatable)")
    q.add_argument("--support-keypoints", action="append", required=True, metavar="KP.json",
                   help="keypoint file of each support (see python -m escape_fast.predict --help)")
    q.add_argument("--support-box", action="append", type=cli.box_argument, metavar="x,y,w,h",
                   help="object box of each support ('none': the keypoint file's box or the whole image)")
    q.add_argument("--max-keypoints", type=int, default=20, help="keypoints shown (default 20)")

    q = sub.add_parser("episodes", help="support / ground truth / prediction of chosen episodes (Fig. 7)",
                       description="Episodes as an evaluation draws them: give the eval report (--report, from "
                                   "python -m escape_fast.eval --out) or the same settings as eval.")
    common(q)
    q.add_argument("--report", help="eval report: data, checkpoint, shots, queries, pairs and seed come from it")
    q.add_argument("--data", help="dataset root (MP-100 layout; default: the built-in benchmark)")
    q.add_argument("--split", type=int, default=1, help="MP-100 split (default 1)")
    q.add_argument("--annotations", help="test annotation file instead of the split's")
    q.add_argument("--shots", type=int, default=1)
    q.add_argument("--queries", type=int, default=15)
    q.add_argument("--pairs", type=int, default=60000, help="eval's --episodes: (support set, query) pairs")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--method", help="comma-separated methods (default: the report's, else the model's best)")
    q.add_argument("--episodes", type=_int_list,
                   help="episode indices in the evaluation's order, e.g. 0,200,400 (default: the first draw of "
                        "the first 4 categories)")
    q.add_argument("--query", type=int, default=0, help="which query of each episode (default 0)")

    q = sub.add_parser("pck", help="per-category PCK bar chart of an eval report",
                       description="Per-category PCK@0.2 bars, one per method, from python -m escape_fast.eval "
                                   "--out report.json.")
    common(q, model=False)
    q.add_argument("--report", required=True, help="the eval report (JSON)")
    q.add_argument("--method", help="comma-separated methods (default: all in the report)")
    return p.parse_args(argv)


def _run_episodes(args, progress):
    if args.report:
        report = read_report(args.report)
        ann, ckpt = report["annotations"], args.checkpoint or report["checkpoint"]
        shots, queries, pairs, seed = report["shots"], report["queries"], report["episodes"], report["seed"]
        methods = args.method.split(",") if args.method else list(report["results"])
    else:
        root = args.data or builtin.dataset_root(progress=progress)
        ann = args.annotations or str(mp100_split_files(root, args.split, need=("test",))["test"])
        ckpt, shots, queries, pairs, seed = args.checkpoint, args.shots, args.queries, args.pairs, args.seed
        methods = args.method.split(",") if args.method else None
    device = resolve_device(args.device)
    model, _ = _model(ckpt, device)
    methods = methods or [model.methods[-1]]
    unknown = [m for m in methods if m not in model.methods]
    if unknown:
        raise UsageError(f"method(s) {', '.join(unknown)} not available; the model has {', '.join(model.methods)}")
    coco = load_for_run(ann, args.bad_images)
    sampler = episodes_from_settings(coco, shots, queries, pairs, seed)
    chosen = args.episodes
    if chosen is None:
        chosen = [c * sampler.draws for c in range(min(4, len(sampler.category_ids)))]
    bad = [i for i in chosen if not 0 <= i < len(sampler)]
    if bad or not 0 <= args.query < queries:
        raise UsageError(f"episodes must be in 0..{len(sampler) - 1} and --query in 0..{queries - 1}; got "
                         f"{bad or chosen} and {args.query}")
    return plot_episodes(model, coco, [sampler[i] for i in chosen], methods, args.out, args.query, device)


def main(argv=None) -> int:
    args = parse_args(argv)
    return cli.run_main("escape_fast.plot", lambda: run(args))


def run(args) -> int:
    progress = not args.quiet
    if args.command == "pck":
        report = read_report(args.report)
        out = plot_pck(report, args.out, args.method.split(",") if args.method else None, args.report)
    elif args.command == "episodes":
        out = _run_episodes(args, progress)
    elif args.command == "super-keypoints":
        device = resolve_device(args.device)
        model, _ = _model(args.checkpoint, device)
        members = load_members(args.checkpoint, model, args.annotations, device, args.per_category, progress,
                               args.bad_images)
        out = plot_super_keypoints(members, args.out, args.top)
    else:  # matching
        from escape_fast.predict import Predictor

        # the figure shows the prior: the built-in checkpoint unless another is named (the photo default has none)
        predictor = Predictor(args.checkpoint or "builtin", device=resolve_device(args.device))
        kp = args.support_keypoints[0] if len(args.support_keypoints) == 1 else args.support_keypoints
        predictor.adapt(args.support, kp, args.support_box)
        members = load_members(args.checkpoint, predictor.model, args.annotations, predictor.device,
                               args.per_category, progress, args.bad_images)
        out = plot_matching(predictor, members, args.out, args.max_keypoints)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
