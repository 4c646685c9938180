"""The episode sampler of the standard protocol: seeded, and the same draws
whatever the batching, sharding or set of categories."""

from __future__ import annotations

import json

import numpy as np
import pytest

from escape_fast.data import EpisodeSampler, draws_for_episodes, load_coco


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """4 categories with 12, 20, 25 and 40 instances (annotations only)."""
    root = tmp_path_factory.mktemp("episodes")
    (root / "annotations").mkdir()
    images, anns, cats = [], [], []
    uid = 0
    for cid, n in ((3, 12), (5, 20), (8, 25), (11, 40)):
        cats.append({"id": cid, "name": f"c{cid}", "keypoints": ["a", "b"]})
        for _ in range(n):
            uid += 1
            images.append({"id": uid, "file_name": f"c{cid}/{uid}.jpg", "width": 50, "height": 50})
            anns.append({"id": 1000 - uid, "image_id": uid, "category_id": cid, "bbox": [1, 1, 30, 30],
                         "keypoints": [5, 5, 2, 9, 9, 2]})
    path = root / "annotations" / "e.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return load_coco(path, check_images=False)


def test_draws_for_episodes():
    assert draws_for_episodes(60000, 20) == 200
    assert draws_for_episodes(300, 4, queries=15) == 5
    with pytest.raises(ValueError, match="multiple of 300"):
        draws_for_episodes(1000, 20)


def test_episodes_are_valid_and_deterministic(coco):
    s = EpisodeSampler(coco, shots=5, queries=7, draws=30, seed=123)
    assert len(s) == 4 * 30 and s.num_pairs == 4 * 30 * 7
    assert [e.category_id for e in s][::30] == [3, 5, 8, 11]  # id order
    for e in s:
        members = set(coco.instances_of(e.category_id))
        chosen = e.supports + e.queries
        assert len(e.supports) == 5 and len(e.queries) == 7
        assert len(set(chosen)) == 12 and set(chosen) <= members
    again = EpisodeSampler(coco, shots=5, queries=7, draws=30, seed=123)
    assert again.episodes == s.episodes
    other = EpisodeSampler(coco, shots=5, queries=7, draws=30, seed=124)
    assert other.episodes != s.episodes
    # draws vary: the 30 draws of a category are not all the same
    assert len({e.supports for e in s if e.category_id == 11}) > 20
    # with n == S + Q every instance is used exactly once per draw
    full = EpisodeSampler(coco, shots=2, queries=10, draws=3, seed=0, categories=[3])
    assert all(sorted(e.supports + e.queries) == coco.instances_of(3) for e in full)


def test_same_draws_whatever_the_categories(coco):
    s = EpisodeSampler(coco, shots=1, queries=10, draws=17, seed=7)
    # by category: what the evaluation (and its sharding over processes) walks
    assert [e for es in s.by_category().values() for e in es] == s.episodes
    # a category's draws do not depend on which other categories are in play
    alone = EpisodeSampler(coco, shots=1, queries=10, draws=17, seed=7, categories=[8])
    assert alone.episodes == s.by_category()[8]
    # nor on the number of draws asked for
    more = EpisodeSampler(coco, shots=1, queries=10, draws=40, seed=7, categories=[8])
    assert more.episodes[:17] == alone.episodes
    assert s.episode(11, 5) == s.episodes[s.category_ids.index(11) * 17 + 5]


def test_draw_is_pinned_to_seed_category_and_index(coco):
    """The documented draw: argsort of default_rng([seed, category, draw]).random(n)."""
    s = EpisodeSampler(coco, shots=1, queries=3, draws=2, seed=9, categories=[5])
    members = coco.instances_of(5)
    rng = np.random.default_rng([9, 5, 1])
    pick = np.argsort(rng.random(len(members)), kind="stable")[:4]
    e = s.episodes[1]
    assert e.supports + e.queries == tuple(members[i] for i in pick)
    # members are listed in annotation id order (ids here decrease with image id)
    assert [coco.instances[i].ann_id for i in members] == sorted(coco.instances[i].ann_id for i in members)


def test_bad_arguments(coco):
    with pytest.raises(ValueError, match="seed must be non-negative"):
        EpisodeSampler(coco, seed=-1)
    with pytest.raises(ValueError, match="must be positive"):
        EpisodeSampler(coco, shots=0)
    with pytest.raises(KeyError, match="no category with id 4"):
        EpisodeSampler(coco, categories=[4])
