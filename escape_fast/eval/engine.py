"""Episode evaluation, fast and reference (docs/method.md, "Evaluation").

Fast path (``evaluate``, ``evaluate_many``), a category at a time:
1. every distinct instance of the category that any episode uses is cropped
   and run through the feature extractor(s) once; features, pooled keypoint
   features and the crop parameters stay in device memory while the
   category's episodes are evaluated (:class:`InstanceBank`), then are
   released, so memory holds one category's features whatever the test set;
2. the prototypes of each distinct support set (MLE, MAP or ESCAPE), then
   every query instance's feature map decoded once against the prototypes of
   the distinct sets of all draws that query it (``ops.heatmap_decode`` with
   K x sets prototypes), so each feature map is read about once per category
   rather than once per episode;
3. PCK of every (support set, query) pair, vectorized.

Reference path (``evaluate_reference``): the straightforward way, one
episode at a time, features recomputed for every episode, reference ops.
Both paths take the same episodes and give the same predictions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from escape_fast import ops, reference
from escape_fast.models.escape import SupportFeatures
from escape_fast.data import KeypointDataset, make_loader
from escape_fast.data.transforms import CropBatch
from escape_fast.distributed import inference_batch_size
from escape_fast.errors import CheckpointError
from escape_fast.eval.metrics import THRESHOLDS, pck_curve, summarize_pck, valid_keypoints

PHASES = ("data", "features", "adaptation", "heatmaps", "metric")


class Timer:
    """Wall time per phase (synchronizing CUDA so GPU work lands in its phase)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = {p: 0.0 for p in PHASES}

    def phase(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                if timer.device.type == "cuda":
                    torch.cuda.synchronize(timer.device)
                timer.seconds[name] += time.perf_counter() - self.t0

        return _Phase()


@dataclass
class InstanceBank:
    """Everything the episodes need of each distinct instance, on one device."""

    rows: dict  # instance index (coco.instances) -> row
    # [N, C, h, w] features after the decoder's mean filter (EscapeModel.smooth),
    # to be decoded as smoothed: filtered once per instance, not per heatmap
    smoothed: torch.Tensor
    support: SupportFeatures  # [N, ...] each instance as a shot
    crops: CropBatch  # [N]
    visible: torch.Tensor  # [N, K] bool, as annotated (PCK counts these)
    keypoint_mask: torch.Tensor  # [N, K] bool: slots that exist for the category
    keypoints_image: torch.Tensor  # [N, K, 2] float64 original pixels
    bbox_size: torch.Tensor  # [N] float64
    seconds: dict = field(default_factory=dict)


def _category_batches(coco, instances, batch_size):
    """Instances grouped by category (id order), in chunks of ``batch_size``.

    Batches never mix categories, so a category's features do not depend on
    which other categories are evaluated (sharding over processes gives the
    same numbers bit for bit)."""
    by_cat: dict[int, list[int]] = {}
    for i in instances:
        by_cat.setdefault(coco.instances[i].category_id, []).append(int(i))
    order = []
    for c in sorted(by_cat):
        members = by_cat[c]
        order += [members[j : j + batch_size] for j in range(0, len(members), batch_size)]
    return order


@torch.no_grad()
def category_banks(model, coco, instances, device, batch_size=None, workers=0, amp=True, backend="auto",
                   timer: Timer | None = None, progress=None, matcher=True):
    """Yield (category id, :class:`InstanceBank` of its instances among
    ``instances``), a category at a time, from one loader: each instance is
    cropped, extracted and pooled once (``matcher=False``: without the
    matching network's scores, which only ESCAPE uses), and its features
    smoothed for decoding. Only one category's features are held at a time,
    so memory does not grow with the test set. ``batch_size``: images per
    batch (default: distributed.inference_batch_size)."""
    timer = timer or Timer(device)
    if batch_size is None:
        batch_size = inference_batch_size(device, model.input_size)
    dataset = KeypointDataset(coco, input_size=model.input_size, train=False, sigma=model.sigma,
                              num_keypoints=coco.max_keypoints)
    batches = _category_batches(coco, instances, batch_size)
    loader = make_loader(dataset, batch_sampler=batches, num_workers=workers, persistent_workers=False)
    model.eval()
    parts, category = [], None
    it = iter(loader)
    bar = progress(total=len(batches), desc="features", unit="batch") if progress else None
    for chunk in batches:
        with timer.phase("data"):
            batch = next(it)
        cat_id = coco.instances[chunk[0]].category_id
        if parts and cat_id != category:
            yield category, _bank(parts, device)
            parts = []
        category = cat_id
        with timer.phase("features"):
            images = batch["image"].to(device, non_blocking=True)
            f, support = model.encode(images, batch["keypoints"].to(device), batch["visible"].to(device), amp,
                                      backend, matcher)
            parts.append((chunk, model.smooth(f), support, batch))
        if bar:
            bar.update(1)
    if parts:
        yield category, _bank(parts, device)
    if bar:
        bar.close()


def build_bank(model, coco, instances, device, batch_size=None, workers=0, amp=True, backend="auto",
               timer: Timer | None = None, progress=None, matcher=True) -> InstanceBank:
    """One :class:`InstanceBank` of every instance in ``instances`` (see
    :func:`category_banks`; the same features, all held at once)."""
    banks = [b for _, b in category_banks(model, coco, instances, device, batch_size, workers, amp, backend, timer,
                                          progress, matcher)]
    if len(banks) == 1:
        return banks[0]
    rows, offset = {}, 0
    for b in banks:
        rows.update({i: offset + r for i, r in b.rows.items()})
        offset += len(b.rows)

    def cat(get):
        return torch.cat([get(b) for b in banks])

    return InstanceBank(
        rows=rows, smoothed=cat(lambda b: b.smoothed), support=SupportFeatures.cat([b.support for b in banks]),
        crops=CropBatch(cat(lambda b: b.crops.center), cat(lambda b: b.crops.scale), cat(lambda b: b.crops.rotation)),
        visible=cat(lambda b: b.visible), keypoint_mask=cat(lambda b: b.keypoint_mask),
        keypoints_image=cat(lambda b: b.keypoints_image), bbox_size=cat(lambda b: b.bbox_size))


def _bank(parts, device) -> InstanceBank:
    """The bank of some batches: parts = [(instance indices, smoothed features, SupportFeatures, batch)]."""
    order = [i for chunk, _, _, _ in parts for i in chunk]

    def cat(key, dtype=None):
        t = torch.cat([batch[key] for _, _, _, batch in parts])
        return t.to(device=device, dtype=dtype) if dtype else t.to(device)

    return InstanceBank(
        rows={i: r for r, i in enumerate(order)},
        smoothed=torch.cat([f for _, f, _, _ in parts]),
        support=SupportFeatures.cat([sup for _, _, sup, _ in parts]),
        crops=CropBatch(cat("center", torch.float32), cat("scale", torch.float32), cat("rotation", torch.float32)),
        visible=cat("visible"),
        keypoint_mask=cat("keypoint_mask"),
        keypoints_image=cat("keypoints_image", torch.float64),
        bbox_size=cat("bbox_size", torch.float64),
    )


def _group_slots(query_rows: torch.Tensor):
    """For pair p querying instance row r_p: (unique rows, group of p, slot of p in its group)."""
    uniq, inv = torch.unique(query_rows, return_inverse=True)
    order = torch.argsort(inv, stable=True)
    counts = torch.bincount(inv, minlength=len(uniq))
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(inv)
    slot[order] = torch.arange(len(inv), device=inv.device) - starts[inv[order]]
    return uniq, inv, slot, int(counts.max())


@torch.no_grad()
def predict_category(model, bank: InstanceBank, episodes, method: str, num_keypoints: int, backend="auto",
                     timer=None, alpha=None):
    """Predictions [D * Q, K, 2] (image pixels) for the episodes of one category
    with ``num_keypoints`` keypoints (only those are decoded; the padding stays 0).

    Draws that share a support set (most 1-shot draws: a category of N
    instances has N - 1 possible supports for 200 draws) share their
    prototypes, and a query decoded again against the same set would give the
    same heatmaps: each distinct set is adapted once and each distinct
    (query, set) pair decoded once."""
    timer = timer or Timer(bank.smoothed.device)
    dev = bank.smoothed.device
    sup = torch.tensor([[bank.rows[i] for i in e.supports] for e in episodes], device=dev)  # [D, S]
    qry = torch.tensor([[bank.rows[i] for i in e.queries] for e in episodes], device=dev)  # [D, Q]
    q = qry.shape[1]
    sets, set_of_draw = torch.unique(sup, dim=0, return_inverse=True)
    with timer.phase("adaptation"):
        adapted = model.adapt(bank.support[sets], method, alpha)
    with timer.phase("heatmaps"):
        k = num_keypoints
        k_pad = adapted.prototypes.shape[1]
        pair_rows = qry.reshape(-1)
        pair_set = set_of_draw.repeat_interleave(q)
        # distinct (query row, set) pairs, grouped by query row (unique sorts by row first)
        keys, pair_key = torch.unique(pair_rows * len(sets) + pair_set, return_inverse=True)
        key_rows, key_sets = keys // len(sets), keys % len(sets)
        uniq, group, slot, width = _group_slots(key_rows)

        def regroup(t):  # [sets, K_pad, ...] -> [U, width * k, ...]: each query row's distinct sets
            out = t.new_zeros(len(uniq), width, k, *t.shape[2:])
            out[group, slot] = t[key_sets, :k]
            return out.reshape(len(uniq), width * k, *t.shape[2:])

        coords, _ = model.predict(bank.smoothed[uniq], adapted.map(regroup), bank.crops[uniq], backend)
        coords = coords.reshape(len(uniq), width, k, 2)[group, slot][pair_key]  # [D * Q, k, 2]
        coords = torch.nn.functional.pad(coords, (0, 0, 0, k_pad - k))
    return coords, sup, pair_rows


def score_pairs(bank: InstanceBank, coords, sup, pair_rows, queries: int):
    """PCK at every threshold of each pair: float64 [T, P]."""
    vis_sup = bank.visible[sup].repeat_interleave(queries, dim=0)  # [P, S, K]
    valid = valid_keypoints(bank.visible[pair_rows], vis_sup, bank.keypoint_mask[pair_rows])
    return pck_curve(coords.double(), bank.keypoints_image[pair_rows], valid, bank.bbox_size[pair_rows])


@dataclass
class EvalResult:
    method: str
    summary: object  # eval.metrics.PCKSummary
    scores: torch.Tensor  # [T, P] per pair
    predictions: torch.Tensor  # [P, K, 2]
    category_ids: torch.Tensor  # [P]
    draws: torch.Tensor  # [P]
    seconds: dict

    def as_dict(self) -> dict:
        """The results, which depend only on the model, data and episodes
        (two runs of one evaluation give the same dict); timing apart."""
        return {"method": self.method, **self.summary.as_dict()}

    def timing(self) -> dict:
        total = sum(self.seconds.values())
        return {"seconds": dict(self.seconds),
                "pairs_per_second": self.summary.num_pairs / total if total > 0 else None}


@dataclass
class PairResults:
    """Raw per-pair outputs of some categories (what processes exchange)."""

    scores: torch.Tensor  # [T, P]
    predictions: torch.Tensor  # [P, K, 2]
    category_ids: torch.Tensor  # [P]
    draws: torch.Tensor  # [P]

    @staticmethod
    def concat(parts: list[PairResults]) -> PairResults:
        parts = [p for p in parts if p.scores.shape[1]]
        k = max(p.predictions.shape[1] for p in parts)
        preds = [torch.nn.functional.pad(p.predictions, (0, 0, 0, k - p.predictions.shape[1])) for p in parts]
        return PairResults(torch.cat([p.scores for p in parts], 1), torch.cat(preds),
                           torch.cat([p.category_ids for p in parts]), torch.cat([p.draws for p in parts]))


def evaluate_pairs(model, coco, sampler, method, bank: InstanceBank, backend="auto", categories=None,
                   timer=None, progress=None, alpha=None) -> PairResults:
    """Per-pair PCK and predictions of ``method`` for ``categories`` (default all)
    on a bank of their instances (:func:`build_bank`); ``alpha`` as in
    :meth:`EscapeModel.adapt`."""
    timer = timer or Timer(bank.smoothed.device)
    groups = sampler.by_category()
    cats = list(groups) if categories is None else [c for c in groups if c in set(categories)]
    scores, preds, cat_ids, draws = [], [], [], []
    bar = progress(total=len(cats), desc=f"episodes ({method})", unit="category") if progress else None
    for cat_id in cats:
        episodes = groups[cat_id]
        coords, sup, pair_rows = predict_category(model, bank, episodes, method,
                                                  coco.categories[cat_id].num_keypoints, backend, timer, alpha)
        with timer.phase("metric"):
            scores.append(score_pairs(bank, coords, sup, pair_rows, sampler.queries).cpu())
            preds.append(coords.cpu())
            cat_ids.append(torch.full((len(pair_rows),), cat_id, dtype=torch.int64))
            draws.append(torch.tensor([e.draw for e in episodes]).repeat_interleave(sampler.queries))
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    if not cats:
        return _no_pairs()
    return PairResults.concat([PairResults(s, p, c, d) for s, p, c, d in zip(scores, preds, cat_ids, draws)])


def _no_pairs() -> PairResults:
    return PairResults(torch.zeros(len(THRESHOLDS), 0, dtype=torch.float64), torch.zeros(0, 0, 2),
                       torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))


def summarize(method: str, pairs: PairResults, seconds: dict) -> EvalResult:
    summary = summarize_pck(pairs.scores, pairs.category_ids, pairs.draws, THRESHOLDS)
    return EvalResult(method, summary, pairs.scores, pairs.predictions, pairs.category_ids, pairs.draws, seconds)


def needed_instances(samplers, categories=None) -> list[int]:
    """The instances (coco.instances indices) that the episodes of ``samplers`` use, in
    ``categories`` (default all)."""
    needed = set()
    for sampler in samplers:
        for c, episodes in sampler.by_category().items():
            if categories is None or c in set(categories):
                needed.update(i for e in episodes for i in (*e.supports, *e.queries))
    return sorted(needed)


def evaluate_many(model, coco, samplers, methods=("mle",), device="cpu", backend="auto", batch_size=None,
                  workers=0, amp=True, progress=None, categories=None, summarize_results=True,
                  alpha=None) -> list[dict]:
    """:func:`evaluate` for several samplers of one test set (e.g. its 1- and
    5-shot episodes): a category at a time, its instances are extracted once
    for all of them, its episodes evaluated and its features released, so
    peak memory is one category's features whatever the test set's size.
    Returns one dict per sampler, as :func:`evaluate` does; the feature
    phases (data, features) are shared and counted in each."""
    device = torch.device(device)
    shared = Timer(device)
    own = [{m: Timer(device) for m in methods} for _ in samplers]
    groups = [s.by_category() for s in samplers]
    cats = sorted({c for g in groups for c in g})
    if categories is not None:
        cats = [c for c in cats if c in set(categories)]
    pairs = [{m: [] for m in methods} for _ in samplers]
    bar = progress(total=len(cats), desc="categories", unit="category") if progress else None
    banks = category_banks(model, coco, needed_instances(samplers, cats), device, batch_size, workers, amp, backend,
                           shared, None, matcher="escape" in methods)
    with ops.finite_checks(False):  # checked once per bank; no per-call host sync in the episode loop
        for cat_id, bank in banks:
            with shared.phase("features"):
                if not bool(torch.isfinite(bank.smoothed).all()):
                    raise CheckpointError(f"{model.path or 'the model'}: the feature extractor produced NaN or "
                                          "Inf features (a broken checkpoint?)")
            for k, sampler in enumerate(samplers):
                if cat_id not in groups[k]:
                    continue
                for m in methods:
                    pairs[k][m].append(evaluate_pairs(model, coco, sampler, m, bank, backend, [cat_id], own[k][m],
                                                      None, alpha))
            del bank
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    out = []
    for k in range(len(samplers)):
        results = {}
        for m in methods:
            timer = own[k][m]
            merged = PairResults.concat(pairs[k][m]) if pairs[k][m] else _no_pairs()
            if summarize_results:
                with timer.phase("metric"):
                    results[m] = summarize(m, merged, {})
            seconds = {p: shared.seconds[p] + timer.seconds[p] for p in PHASES}
            if summarize_results:
                results[m].seconds = seconds
            else:
                results[m] = (merged, seconds)
        out.append(results)
    return out


def evaluate(model, coco, sampler, methods=("mle",), device="cpu", backend="auto", batch_size=None, workers=0,
             amp=True, progress=None, categories=None, summarize_results=True, alpha=None):
    """Fast evaluation of ``sampler``'s episodes (``alpha`` as in :meth:`EscapeModel.prototypes`),
    a category at a time (see :func:`evaluate_many`).

    Returns {method: EvalResult}, or {method: (PairResults, seconds)} when
    ``summarize_results`` is False (a shard of ``categories`` to be merged).
    """
    return evaluate_many(model, coco, [sampler], methods, device, backend, batch_size, workers, amp, progress,
                         categories, summarize_results, alpha)[0]


def predict_episodes(model, coco, episodes, method="escape", device="cpu", backend="auto", batch_size=None,
                     amp=True, bank=None) -> list[torch.Tensor]:
    """Predictions of a few chosen episodes (for figures), on the fast path.

    ``episodes`` are :class:`escape_fast.data.Episode` (e.g. some entries of
    an ``EpisodeSampler``'s list, so that they are the draws an evaluation
    made). Only their instances are extracted. Returns, per episode in
    order, its queries' predictions [Q, K_pad, 2] in image pixels on the CPU:
    what ``evaluate`` computes for those episodes (up to the float rounding
    of other feature batches). ``bank``: one built for these episodes'
    instances (to share it between methods), else it is built here.
    """
    if bank is None:
        needed = sorted({i for e in episodes for i in (*e.supports, *e.queries)})
        bank = build_bank(model, coco, needed, torch.device(device), batch_size, 0, amp, backend,
                          matcher=method == "escape")
    by_cat: dict[int, list[int]] = {}
    for n, e in enumerate(episodes):
        by_cat.setdefault(e.category_id, []).append(n)
    out: list[torch.Tensor | None] = [None] * len(episodes)
    for positions in by_cat.values():
        group = [episodes[n] for n in positions]
        k = coco.categories[group[0].category_id].num_keypoints
        coords, _, _ = predict_category(model, bank, group, method, k, backend)
        for n, c in zip(positions, coords.cpu().split(len(group[0].queries))):
            out[n] = c
    return out


@torch.no_grad()
def evaluate_reference(model, coco, episodes, method="mle", device="cpu", alpha=None) -> EvalResult:
    """The straightforward evaluation: one episode at a time, features
    recomputed per episode, reference ops, each heatmap filtered. Same outputs
    as ``evaluate`` (``alpha`` as in :meth:`EscapeModel.adapt`)."""
    device = torch.device(device)
    timer = Timer(device)
    sigma = model.sigma
    dataset = KeypointDataset(coco, input_size=model.input_size, train=False, sigma=sigma,
                              num_keypoints=coco.max_keypoints)
    model.eval()
    preds, scores, cats, draws = [], [], [], []
    for e in episodes:
        with timer.phase("data"):
            items = [dataset[i] for i in (*e.supports, *e.queries)]
            images = torch.stack([it["image"] for it in items]).to(device)
            kp = torch.stack([it["keypoints"] for it in items]).to(device)
            vis = torch.stack([it["visible"] for it in items]).to(device)
        s = len(e.supports)
        with timer.phase("features"):
            f = model.extractor(images).float()
            g = model.matcher_extractor(images[:s]).float() if method == "escape" and model.matcher_extractor is not None else None
        with timer.phase("adaptation"):  # under the model's pooling convention
            sup_vis, sup_pos = model.support_visible(kp[:s], vis[:s]), model.pooling_positions(kp[:s])
            pooled = reference.keypoint_pool(f[:s], sup_pos, sup_vis, sigma)
            ms = None
            if g is not None:  # the matching network once per episode, on its supports
                ms = model.matcher.scores(reference.keypoint_pool(g, sup_pos, sup_vis, sigma), sup_pos, sup_vis)
            k = coco.categories[e.category_id].num_keypoints  # decode those; padded slots stay 0
            adapted = model.adapt(SupportFeatures(pooled, kp[:s], sup_vis, ms)[None], method, alpha)
            k_pad = adapted.prototypes.shape[1]
            adapted = adapted.map(lambda t: t[:, :k])
        with timer.phase("heatmaps"):
            coords = []
            for j in range(s, len(items)):
                crop = CropBatch(items[j]["center"].float()[None].to(device), items[j]["scale"].float()[None].to(device),
                                 items[j]["rotation"].float()[None].to(device))
                c, _ = model.predict(f[j : j + 1], adapted, crop, "reference", smoothed=False)
                coords.append(torch.nn.functional.pad(c[0], (0, 0, 0, k_pad - k)))
            coords = torch.stack(coords)
        with timer.phase("metric"):
            gt = torch.stack([it["keypoints_image"] for it in items[s:]])
            mask = torch.stack([it["keypoint_mask"] for it in items[s:]])
            size = torch.stack([it["bbox_size"] for it in items[s:]])
            valid = valid_keypoints(vis[s:].cpu(), vis[:s].cpu(), mask)
            scores.append(pck_curve(coords.double().cpu(), gt, valid, size))
            preds.append(coords.cpu())
            cats.append(torch.full((len(items) - s,), e.category_id, dtype=torch.int64))
            draws.append(torch.full((len(items) - s,), e.draw, dtype=torch.int64))
    s_all, c_all, d_all = torch.cat(scores, 1), torch.cat(cats), torch.cat(draws)
    summary = summarize_pck(s_all, c_all, d_all, THRESHOLDS)
    return EvalResult(method, summary, s_all, torch.cat(preds), c_all, d_all, dict(timer.seconds))
