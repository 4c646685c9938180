"""Episodes of the standard few-shot protocol (docs/method.md, "Evaluation").

For each test category, in id order, ``draws`` seeded draws of S + Q
distinct instances without replacement: S supports and Q queries (Q = 15).
Like the paper, an "episode count" counts (support set, query) pairs:
60,000 episodes = 20 categories x 200 draws x 15 queries
(:func:`draws_for_episodes`).

Each draw is a pure function of (seed, category id, draw index): the
instances of the category are listed in annotation id order and the draw
takes the first S + Q of ``argsort(default_rng([seed, category_id,
draw]).random(n))`` (only uniform doubles of PCG64 are used, the most stable
part of numpy's Generator). Batching, sharding over processes or the order
in which episodes are evaluated cannot change any draw.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from escape_fast.data.coco import CocoKeypoints
from escape_fast.errors import DataError, DataWarning, UsageError

__all__ = ["Episode", "EpisodeSampler", "draws_for_episodes"]


@dataclass(frozen=True)
class Episode:
    """One draw: S support and Q query instance indices (into
    ``coco.instances``) of one category; ``draw`` counts within the category."""

    category_id: int
    draw: int
    supports: tuple[int, ...]
    queries: tuple[int, ...]


def draws_for_episodes(episodes: int, num_categories: int, queries: int = 15) -> int:
    """Draws per category for a total of ``episodes`` (support set, query)
    pairs spread evenly: 60000 over 20 categories with Q = 15 -> 200.
    Raises UsageError (a ValueError) unless episodes is a multiple of num_categories * Q."""
    unit = num_categories * queries
    if unit <= 0 or episodes <= 0 or episodes % unit:
        raise UsageError(
            f"{episodes} episodes cannot be spread evenly over {num_categories} categories x {queries} "
            f"queries; use a multiple of {unit}"
        )
    return episodes // unit


def draw_instances(n: int, k: int, seed: int, category_id: int, draw: int) -> np.ndarray:
    """k distinct positions out of n for (seed, category_id, draw)."""
    rng = np.random.default_rng([seed, category_id, draw])
    return np.argsort(rng.random(n), kind="stable")[:k]


class EpisodeSampler:
    """The evaluation episodes of a (test) annotation file.

    Args:
        coco: loaded annotations.
        shots: S supports per episode (1 or 5 in the paper).
        queries: Q queries per episode (15).
        draws: support draws per category (200 in the public config; see
            :func:`draws_for_episodes`).
        seed: non-negative int.
        categories: category ids to use (default: all of ``coco``), always
            taken in id order.
        too_few: a category with fewer than S + Q instances raises a
            :class:`DataError` (``"raise"``, default) or is left out with a
            :class:`DataWarning` that counts them (``"skip"``).

    ``episodes`` is the list of :class:`Episode` in (category id, draw)
    order; ``shard(rank, world_size)`` gives a contiguous block of it to a
    process, and the concatenation of all shards is the list itself.
    """

    def __init__(
        self,
        coco: CocoKeypoints,
        shots: int = 1,
        queries: int = 15,
        draws: int = 200,
        seed: int = 0,
        categories=None,
        too_few: str = "raise",
    ):
        if shots < 1 or queries < 1 or draws < 1:
            raise ValueError(f"shots, queries and draws must be positive, got {shots}, {queries}, {draws}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if too_few not in ("raise", "skip"):
            raise ValueError(f"too_few must be 'raise' or 'skip', got {too_few!r}")
        self.coco = coco
        self.shots, self.queries, self.draws, self.seed = int(shots), int(queries), int(draws), int(seed)
        cats = coco.category_ids if categories is None else sorted(int(c) for c in categories)
        need = self.shots + self.queries
        kept, short = [], []
        for c in cats:
            n = len(coco.instances_of(c))
            (kept if n >= need else short).append((c, n))
        if short:
            detail = ", ".join(f"id {c} ('{coco.categories[c].name}', {n})" for c, n in short)
            msg = f"{coco.path}: {len(short)} categor{'y has' if len(short) == 1 else 'ies have'} fewer "
            msg += f"than S + Q = {need} instances: {detail}"
            if too_few == "raise":
                raise DataError(msg)
            warnings.warn(msg + "; skipped", DataWarning, 2)
        self.category_ids = [c for c, _ in kept]
        self.skipped_categories = [c for c, _ in short]
        self.episodes = [self.episode(c, d) for c in self.category_ids for d in range(self.draws)]

    def episode(self, category_id: int, draw: int) -> Episode:
        members = self.coco.instances_of(category_id)
        pick = draw_instances(len(members), self.shots + self.queries, self.seed, category_id, draw)
        chosen = tuple(members[i] for i in pick)
        return Episode(category_id, draw, chosen[: self.shots], chosen[self.shots :])

    def __len__(self) -> int:
        return len(self.episodes)

    def __iter__(self):
        return iter(self.episodes)

    def __getitem__(self, i) -> Episode:
        return self.episodes[i]

    @property
    def num_pairs(self) -> int:
        """(support set, query) pairs: the paper's episode count."""
        return len(self.episodes) * self.queries

    def by_category(self) -> dict[int, list[Episode]]:
        """Episodes grouped by category (each feature map read once per category)."""
        out: dict[int, list[Episode]] = {c: [] for c in self.category_ids}
        for e in self.episodes:
            out[e.category_id].append(e)
        return out
