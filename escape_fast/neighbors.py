"""kNN with a same-label exclusion and kNN density-peaks clustering at scale (docs/method.md, "Clustering").

``escape_fast.ops.knn`` and ``escape_fast.ops.cluster_keypoints`` call into
this module for every backend but ``"reference"``. The results follow
``escape_fast.reference.knn`` / ``reference.cluster_keypoints`` (cosine
similarity, same-label pairs forbidden, descending with ties to the lower
index, ``(-inf, -1)`` padding), but no N x M similarity matrix is ever built.

Engines (``backend=``):

* ``"auto"``: FAISS when it is importable and can work where the tensors are
  (CPU tensors, or CUDA tensors with a GPU build of FAISS); otherwise the
  torch engine on the tensors' device. ``"faiss"`` forces FAISS (CUDA
  tensors without GPU FAISS are copied to the host and back).
* ``"cpu"`` / ``"cuda"``: the torch engine on that device (the tensors must be
  there). There is no Triton kNN kernel, so "triton" is not a backend here.

torch engine: blocked GEMM (query blocks x base blocks) with the label mask
and a running top-k merge, on the tensors' device, in their dtype. Exact.

FAISS engine (float32 inside; L2-normalized vectors, inner product):

* ``index="flat"`` (default while the base holds at most FLAT_MAX vectors):
  exact brute force. The base is sorted by label so that each label is one
  contiguous id range [lo, hi); the queries of one label are searched
  against base[:lo] and base[hi:] with ``faiss.knn`` (BLAS) and the two
  lists merged. This is the same exact exclusion as an
  ``IDSelectorNot(IDSelectorRange(lo, hi))``, but an ID selector turns off
  FAISS's BLAS path for flat search: measured 5-6x slower here (5000 x 50000
  x 256: 5.5 s with two BLAS slices, 28 s with the selector).
* ``index="ivf"`` (default above FLAT_MAX): ``IndexIVFFlat`` over the sorted
  base, approximate. ``nlist`` (default: the power of two nearest
  2 sqrt(M), trained on 40 vectors per list drawn with a fixed seed) and
  ``nprobe`` (default DEFAULT_NPROBE lists per query) set the trade-off;
  each label group is searched with
  ``SearchParametersIVF(sel=IDSelectorNot(IDSelectorRange(lo, hi)), nprobe)``
  so the exclusion itself is exact. Clustering needs only neighbours above
  a high cosine threshold, which IVF finds well with few probes.
* GPU (a FAISS build with StandardGpuResources and CUDA tensors): flat search
  with ``faiss.knn_gpu`` on the torch tensors (faiss.contrib.torch_utils, no
  host copies), split per label range as above. GPU FAISS has no ID
  selectors, so ``index="ivf"`` there runs on the CPU index.
* float64 inputs: FAISS's float32 candidates (a few extra per row) are
  re-scored in float64 and re-ranked, so the values and the order are those
  of the input precision.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from escape_fast import reference
from escape_fast.errors import BackendUnavailable

try:
    import faiss

    HAVE_FAISS = True
    FAISS_ERROR = None
except ImportError as exc:  # optional at import time; "auto" then uses torch
    faiss = None
    HAVE_FAISS = False
    FAISS_ERROR = f"{type(exc).__name__}: {exc}"

FAISS_GPU = HAVE_FAISS and hasattr(faiss, "StandardGpuResources")

FLAT_MAX = 65536  # base vectors up to which FAISS searches exhaustively ("auto")
DEFAULT_NPROBE = 2  # IVF lists visited per query (recall above 0.8 cosine: 99.99% on planted data)
RERANK_MARGIN = 8  # extra FAISS candidates per row when re-ranking in float64
TIE_MARGIN = 4  # extra FAISS candidates per row to see ties at the last place
GPU_MAX_K = 2048  # largest k that FAISS GPU selection supports
ENGINES = ("auto", "faiss", "cpu", "cuda")


def engine_for(backend: str, device: torch.device) -> str:
    """'faiss' or 'torch': the engine that ``backend`` runs on ``device``."""
    device = torch.device(device)
    if backend == "auto":
        if HAVE_FAISS and (device.type == "cpu" or FAISS_GPU):
            return "faiss"
        return "torch"
    if backend == "faiss":
        if not HAVE_FAISS:
            raise BackendUnavailable(f"knn: backend 'faiss' needs the faiss package ({FAISS_ERROR})")
        return "faiss"
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            raise BackendUnavailable(f"knn: backend {backend!r} runs on {backend} tensors, got {device.type} tensors")
        return "torch"
    raise ValueError(f"knn: backend must be one of {ENGINES} or 'reference', got {backend!r}")


# --------------------------------------------------------------------------
# row bookkeeping shared by the engines
# --------------------------------------------------------------------------
def _pad(vals: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut or pad rows to k columns with (-inf, -1)."""
    n, w = vals.shape
    if w >= k:
        return vals[:, :k], idx[:, :k]
    return (
        torch.cat((vals, vals.new_full((n, k - w), -math.inf)), dim=1),
        torch.cat((idx, idx.new_full((n, k - w), -1)), dim=1),
    )


def _sort_rows(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each row by similarity descending, ties to the lower index; -1
    ids become -inf and go last."""
    vals = vals.masked_fill(idx < 0, -math.inf)
    idx = idx.masked_fill(torch.isinf(vals) & (vals < 0), -1)
    by_index = torch.where(idx < 0, torch.iinfo(torch.int64).max, idx).argsort(dim=1, stable=True)
    vals, idx = vals.gather(1, by_index), idx.gather(1, by_index)
    by_value = vals.argsort(dim=1, descending=True, stable=True)
    return vals.gather(1, by_value), idx.gather(1, by_value)


def _fix_ties(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows already sorted by value (FAISS output): reorder only rows with ties."""
    vals = vals.masked_fill(idx < 0, -math.inf)
    idx = idx.masked_fill(torch.isinf(vals) & (vals < 0), -1)
    if vals.shape[1] < 2:
        return vals, idx
    tied = ((vals[:, 1:] == vals[:, :-1]) & torch.isfinite(vals[:, 1:])).any(dim=1)
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        v, i = _sort_rows(vals[rows], idx[rows])
        vals, idx = vals.clone(), idx.clone()
        vals[rows], idx[rows] = v, i
    return vals, idx


def _normalized(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return F.normalize(x.to(dtype), dim=1)  # eps as in the reference


# --------------------------------------------------------------------------
# torch engine
# --------------------------------------------------------------------------
class TorchSearcher:
    """Exact blocked top-k over a fixed base, on the base's device."""

    def __init__(self, base: torch.Tensor, labels: torch.Tensor | None, dtype: torch.dtype):
        self.dtype = dtype
        self.base = _normalized(base, dtype)
        self.labels = labels
        gpu = base.device.type == "cuda"
        # [block_q, block_b] similarity tiles: 64 MiB (CPU) / 1 GiB (GPU) in float32
        self.block_q = 4096 if gpu else 1024
        self.block_b = 65536 if gpu else 16384

    def search(self, queries: torch.Tensor, qlabels: torch.Tensor | None, k: int):
        qn = _normalized(queries, self.dtype)
        n, m = qn.shape[0], self.base.shape[0]
        vals = qn.new_full((n, k), -math.inf)
        idx = torch.full((n, k), -1, dtype=torch.long, device=qn.device)
        for q0 in range(0, n, self.block_q):
            q1 = min(q0 + self.block_q, n)
            run_v, run_i = vals[q0:q1], idx[q0:q1]
            for b0 in range(0, m, self.block_b):
                b1 = min(b0 + self.block_b, m)
                sim = qn[q0:q1] @ self.base[b0:b1].T
                if self.labels is not None:
                    sim.masked_fill_(qlabels[q0:q1, None] == self.labels[None, b0:b1], -math.inf)
                top_v, top_i = self._block_topk(sim, k)
                # Running entries come from earlier blocks (lower indices) and
                # the block's candidates are in index order: a stable sort by
                # value keeps ties on the lower index.
                cand_v = torch.cat((run_v, top_v), dim=1)
                cand_i = torch.cat((run_i, top_i + b0), dim=1)
                order = cand_v.argsort(dim=1, descending=True, stable=True)[:, :k]
                run_v, run_i = cand_v.gather(1, order), cand_i.gather(1, order)
            vals[q0:q1], idx[q0:q1] = run_v, run_i
        idx.masked_fill_(torch.isinf(vals), -1)
        return vals, idx

    @staticmethod
    def _block_topk(sim: torch.Tensor, k: int):
        """The block's k best (value, column), in column order, ties to the lower column."""
        cols = sim.shape[1]
        if cols <= k:  # every column is kept: no choice to get wrong
            top_v, top_i = sim, torch.arange(cols, device=sim.device).expand_as(sim)
            return top_v, top_i
        # topk may keep any of several columns tied at the k-th value; one more
        # value shows whether the tie reaches past the cut. Those rows (rare)
        # are redone with a stable sort.
        top_v, top_i = sim.topk(k + 1, dim=1)
        short = (top_v[:, k] == top_v[:, k - 1]) & torch.isfinite(top_v[:, k])
        top_v, top_i = top_v[:, :k], top_i[:, :k]
        if bool(short.any()):
            rows = short.nonzero().squeeze(1)
            v, i = sim[rows].sort(dim=1, descending=True, stable=True)
            top_v[rows], top_i[rows] = v[:, :k], i[:, :k]
        top_i, by_col = top_i.sort(dim=1)
        return top_v.gather(1, by_col), top_i


# --------------------------------------------------------------------------
# FAISS engine
# --------------------------------------------------------------------------
def default_nlist(m: int) -> int:
    """Power of two nearest 2 sqrt(M), with >= 40 training vectors per list."""
    nlist = 2 ** round(math.log2(max(2.0 * math.sqrt(max(m, 1)), 1.0)))
    return int(max(1, min(nlist, m // 40)))


class FaissSearcher:
    """FAISS search over a base sorted by label (see the module docstring)."""

    def __init__(
        self,
        base: torch.Tensor,
        labels: torch.Tensor | None,
        dtype: torch.dtype,
        index: str = "auto",
        nlist: int | None = None,
        nprobe: int | None = None,
    ):
        if index not in ("auto", "flat", "ivf"):
            raise ValueError(f"knn: index must be 'auto', 'flat' or 'ivf', got {index!r}")
        self.dtype, self.device = dtype, base.device
        self.m = base.shape[0]
        self.kind = index if index != "auto" else ("flat" if self.m <= FLAT_MAX else "ivf")
        self.gpu = FAISS_GPU and base.device.type == "cuda" and self.kind == "flat"
        self.work = torch.device("cuda", base.device.index) if self.gpu else torch.device("cpu")
        self._exact_args = (base, labels)  # for the torch fallback beyond GPU_MAX_K
        self._exact = None
        # float64 inputs: FAISS's float32 candidates are re-scored from these rows
        self.rerank = dtype == torch.float64
        self.base_exact = _normalized(base, dtype) if self.rerank else None

        xb = _normalized(base, dtype).to(device=self.work, dtype=torch.float32)
        if labels is None:
            self.perm, self.ranges = None, None
        else:
            lab = labels.detach().to("cpu", torch.int64)
            perm = torch.sort(lab, stable=True).indices
            uniq, counts = torch.unique_consecutive(lab[perm], return_counts=True)
            starts = torch.cumsum(counts, 0) - counts
            self.ranges = {int(u): (int(s), int(s + c)) for u, s, c in zip(uniq, starts, counts)}
            self.perm = perm.to(self.work)
            xb = xb[self.perm]
        self.xb = xb.contiguous()

        if self.gpu:
            from faiss.contrib import torch_utils  # noqa: F401  (lets faiss.knn_gpu take torch tensors)

            self.res = faiss.StandardGpuResources()
        elif self.kind == "ivf":
            xb_np = self.xb.numpy()
            d = xb_np.shape[1]
            self.nlist = int(nlist) if nlist else default_nlist(self.m)
            self.nprobe = int(nprobe) if nprobe else DEFAULT_NPROBE
            self.quantizer = faiss.IndexFlatIP(d)  # kept alive here: the index does not own it
            self.index = faiss.IndexIVFFlat(self.quantizer, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
            n_train = min(self.m, 40 * self.nlist)
            if n_train < self.m:  # a fixed training sample: runs repeat exactly
                sample = np.sort(np.random.default_rng(0).choice(self.m, size=n_train, replace=False))
                self.index.train(np.ascontiguousarray(xb_np[sample]))
            else:
                self.index.train(xb_np)
            self.index.add(xb_np)

    def _search_range(self, xq: torch.Tensor, k: int, lo: int, hi: int):
        """(D, I, merged): queries xq against the sorted base without ids [lo, hi).
        ``merged`` rows are two concatenated lists, not yet in one order."""
        if self.kind == "ivf" and not self.gpu:
            sel = faiss.IDSelectorNot(faiss.IDSelectorRange(lo, hi)) if hi > lo else None
            params = faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe)
            d, i = self.index.search(xq.numpy(), k, params=params)
            return torch.from_numpy(d), torch.from_numpy(i), False
        # flat: the allowed ids are the two slices [0, lo) and [hi, M)
        parts = [(a, b) for a, b in ((0, lo), (hi, self.m)) if b > a] if hi > lo else [(0, self.m)]
        ds, ids = [], []
        for start, stop in parts:
            d, i = self._brute(xq, self.xb[start:stop], min(k, stop - start))
            ds.append(d)
            ids.append(torch.where(i >= 0, i + start, i))
        if not ds:  # every base vector carries the excluded label
            n = xq.shape[0]
            return (
                torch.full((n, 0), -math.inf, device=self.work),
                torch.full((n, 0), -1, dtype=torch.long, device=self.work),
                False,
            )
        return torch.cat(ds, dim=1), torch.cat(ids, dim=1), len(ds) > 1

    def _brute(self, xq: torch.Tensor, xb: torch.Tensor, k: int):
        if self.gpu:
            return faiss.knn_gpu(self.res, xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
        d, i = faiss.knn(xq.numpy(), xb.numpy(), k, metric=faiss.METRIC_INNER_PRODUCT)
        return torch.from_numpy(d), torch.from_numpy(i)

    def search(self, queries: torch.Tensor, qlabels: torch.Tensor | None, k: int):
        need = min(k + (RERANK_MARGIN if self.rerank else 0), self.m)
        if self.gpu and need + TIE_MARGIN > GPU_MAX_K:  # beyond FAISS GPU selection (long re-queries)
            if self._exact is None:
                self._exact = TorchSearcher(*self._exact_args, self.dtype)
            return self._exact.search(queries, qlabels, k)
        vals, idx = self._candidates(queries, qlabels, need)
        vals, idx = vals.to(self.device), idx.to(self.device)
        if self.rerank:
            vals, idx = _sort_rows(self._rescore(queries, idx), idx)
        return _pad(vals.to(self.dtype), idx, k)

    def _candidates(self, queries: torch.Tensor, qlabels: torch.Tensor | None, need: int):
        """Best ``need`` (float32 similarity, original id) per row, ties to the lower id.

        FAISS keeps an arbitrary subset of the candidates tied at the last
        place, so TIE_MARGIN more are fetched; rows whose last fetched value
        still equals the need-th are fetched again, twice as wide."""
        width = min(need + TIE_MARGIN, self.m)
        vals, idx = self._search_sorted(queries, qlabels, width)
        if width < self.m:
            kth, last = vals[:, need - 1], vals[:, -1]
            short = (torch.isfinite(kth) & (last == kth)).nonzero().squeeze(1)
            if len(short):
                sub_labels = None if qlabels is None else qlabels[short.to(qlabels.device)]
                v, i = self._candidates(queries[short.to(queries.device)], sub_labels, min(2 * width, self.m))
                vals[short], idx[short] = v[:, :width], i[:, :width]
        return vals[:, :need], idx[:, :need]

    def _search_sorted(self, queries: torch.Tensor, qlabels: torch.Tensor | None, width: int):
        n = queries.shape[0]
        xq = _normalized(queries, self.dtype).to(device=self.work, dtype=torch.float32).contiguous()
        vals = torch.full((n, width), -math.inf, dtype=torch.float32, device=self.work)
        idx = torch.full((n, width), -1, dtype=torch.long, device=self.work)
        if self.ranges is None or qlabels is None:
            groups = [(torch.arange(n, device=self.work), 0, 0)]
        else:
            # one search per query label: its base vectors are one id range
            qlab = qlabels.detach().to(self.work, torch.int64)
            uniq, inverse = torch.unique(qlab, return_inverse=True)
            order = torch.argsort(inverse, stable=True)
            counts = torch.bincount(inverse, minlength=len(uniq)).tolist()
            groups, start = [], 0
            for label, count in zip(uniq.tolist(), counts):
                lo, hi = self.ranges.get(label, (0, 0))
                groups.append((order[start : start + count], lo, hi))
                start += count
        for rows, lo, hi in groups:
            d, i, merged = self._search_range(xq[rows], width, lo, hi)
            d, i = d.to(self.work), i.to(self.work)
            if self.perm is not None:  # sorted-base ids -> original ids
                i = torch.where(i >= 0, self.perm[i.clamp_min(0)], i)
            d, i = _sort_rows(d, i) if merged else _fix_ties(d, i)
            vals[rows], idx[rows] = _pad(d, i, width)
        return vals, idx

    def _rescore(self, queries: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Similarities of the candidates in the input precision (-inf where idx < 0)."""
        qn = _normalized(queries, self.dtype).to(self.device)
        out = torch.empty(idx.shape, dtype=self.dtype, device=self.device)
        step = max(1, (1 << 22) // max(1, idx.shape[1] * qn.shape[1]))  # bounds the gathered rows
        for r0 in range(0, idx.shape[0], step):
            rows = idx[r0 : r0 + step]
            sims = torch.einsum("nc,nkc->nk", qn[r0 : r0 + step], self.base_exact[rows.clamp_min(0)])
            out[r0 : r0 + step] = sims.masked_fill(rows < 0, -math.inf)
        return out


def make_searcher(engine: str, base: torch.Tensor, labels: torch.Tensor | None, dtype: torch.dtype, **faiss_options):
    if engine == "faiss":
        return FaissSearcher(base, labels, dtype, **faiss_options)
    if any(v not in (None, "auto") for v in faiss_options.values()):
        raise ValueError(f"knn: {sorted(faiss_options)} only apply to the FAISS engine")
    return TorchSearcher(base, labels, dtype)


# --------------------------------------------------------------------------
# public functions (called by escape_fast.ops)
# --------------------------------------------------------------------------
def knn(
    queries: torch.Tensor,
    base: torch.Tensor,
    k: int,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: str = "auto",
    *,
    index: str = "auto",
    nlist: int | None = None,
    nprobe: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine neighbours of queries [N, C] among base [M, C] (see reference.knn).

    Returns (similarities [N, k] descending, base indices [N, k] int64) on the
    queries' device; (-inf, -1) where fewer than k candidates exist.
    ``index``/``nlist``/``nprobe`` choose the FAISS index (module docstring).
    """
    engine = engine_for(backend, queries.device)
    dtype = torch.promote_types(queries.dtype, base.dtype)
    n = queries.shape[0]
    if n == 0 or base.shape[0] == 0:
        return _pad(
            queries.new_empty(n, 0, dtype=dtype), torch.empty(n, 0, dtype=torch.long, device=queries.device), k
        )
    qlab, blab = (None, None) if exclude is None else exclude
    searcher = make_searcher(engine, base, blab, dtype, index=index, nlist=nlist, nprobe=nprobe)
    vals, idx = searcher.search(queries, qlab, k)
    return vals.to(queries.device), idx.to(queries.device)


def cluster_keypoints(
    vectors: torch.Tensor,
    categories: torch.Tensor,
    threshold: float = 0.8,
    k: int = 6,
    backend: str = "auto",
    *,
    k_grow: int | None = None,
    index: str = "auto",
    nlist: int | None = None,
    nprobe: int | None = None,
    growth: str = "exclusive",
) -> tuple[torch.Tensor, torch.Tensor]:
    """kNN density-peaks clustering (see reference.cluster_keypoints), without an N x N matrix.

    1. One kNN search of width max(k, k_grow) over all vectors (same-category
       pairs excluded; k_grow defaults to min(64, 4 x number of categories),
       at least k). Density = mean of the first k similarities above the
       threshold.
    2. Peaks in order of density (lower index on ties). A peak takes its
       candidates above the threshold, most similar first, one per category:
       unassigned ones (growth "exclusive") or any (growth "shared", the
       authors' rule; clusters left empty are dropped). If every entry of
       its list is above the threshold and more
       candidates exist, the peak is searched again with twice the width and
       goes on where it stopped, so with an exact kNN the result is exactly
       the reference's.
    3. Super-keypoint = mean of its members' original vectors; clusters are
       numbered in creation order.

    Returns (super-keypoints [L, C], assignment [N] int64) on the vectors' device.
    """
    if growth not in ("exclusive", "shared"):
        raise ValueError(f"cluster_keypoints: growth must be 'exclusive' or 'shared', got {growth!r}")
    shared = growth == "shared"
    n, c = vectors.shape
    device = vectors.device
    if n == 0:
        return vectors.new_zeros(0, c), torch.zeros(0, dtype=torch.long, device=device)
    engine = engine_for(backend, device)
    searcher = make_searcher(engine, vectors, categories, vectors.dtype, index=index, nlist=nlist, nprobe=nprobe)

    cats = categories.detach().to("cpu", torch.int64).numpy()
    uniq, inverse, counts = np.unique(cats, return_inverse=True, return_counts=True)
    n_candidates = n - counts[inverse]  # vectors of other categories, per vector
    if k_grow is None:
        k_grow = min(64, 4 * len(uniq))
    width = min(max(k, k_grow), n)

    vals, idx = searcher.search(vectors, categories, width)
    # density exactly as the reference computes it (same ops, same dtype)
    top = _pad(vals, idx, k)[0]
    above = top > threshold
    density = torch.where(above, top, torch.zeros_like(top)).sum(1) / above.sum(1).clamp_min(1)
    order = torch.sort(density.cpu(), descending=True, stable=True).indices.numpy()

    # The reference compares each similarity with the threshold as Python
    # floats (float64); float32 -> float64 is exact, so this is the same test.
    n_above = torch.cat(
        [(chunk.to(torch.float64) > threshold).sum(1) for chunk in vals.split(1 << 16)]
    ).cpu().numpy()  # rows are sorted: the entries above are a prefix
    idx_np = idx.detach().cpu().numpy()

    assign = np.full(n, -1, dtype=np.int64)
    cluster = 0
    for peak in order.tolist():
        if assign[peak] >= 0:
            continue
        assign[peak] = cluster
        above_count = int(n_above[peak])
        if above_count:
            used = _take(idx_np[peak, :above_count], cats, assign, cluster, None, shared)
            w = width
            # the whole list is above the threshold: there may be more candidates
            while above_count == w and w < n_candidates[peak]:
                w = int(min(2 * w, n_candidates[peak]))
                v, i = searcher.search(vectors[peak : peak + 1], categories[peak : peak + 1], w)
                v = v[0].detach().to("cpu", torch.float64).numpy()
                i = i[0].detach().cpu().numpy()
                new_count = int((v > threshold).sum())
                used = _take(i[above_count:new_count], cats, assign, cluster, used, shared)
                above_count = new_count
        cluster += 1

    assignment, cluster = reference.drop_empty_clusters(torch.from_numpy(assign), cluster)
    assignment = assignment.to(device)
    sums = torch.zeros(cluster, c, dtype=vectors.dtype, device=device)
    sums.index_add_(0, assignment, vectors)
    sizes = torch.bincount(assignment, minlength=cluster).to(vectors.dtype)
    return sums / sizes[:, None], assignment


def _take(candidates: np.ndarray, cats: np.ndarray, assign: np.ndarray, cluster: int, used: np.ndarray | None,
          shared: bool = False):
    """Assign to ``cluster`` the first unassigned (``shared``: the first)
    candidate of each category not in ``used`` (candidates in order of
    similarity); return the categories used so far. Taking a candidate never
    changes another candidate's state, so this equals the reference's
    one-at-a-time loop."""
    free = candidates if shared else candidates[assign[candidates] < 0]
    if free.size == 0:
        return used if used is not None else np.empty(0, dtype=np.int64)
    free_cats = cats[free]
    _, first = np.unique(free_cats, return_index=True)
    first.sort()
    chosen, chosen_cats = free[first], free_cats[first]
    if used is not None and used.size:
        keep = ~np.isin(chosen_cats, used)
        chosen, chosen_cats = chosen[keep], chosen_cats[keep]
    assign[chosen] = cluster
    return chosen_cats if used is None else np.concatenate((used, chosen_cats))
