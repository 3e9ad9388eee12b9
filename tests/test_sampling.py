"""Sampling: per-epoch rotation, determinism from (seed, epoch), and rank-disjoint shards."""
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils.data import DataLoader

from marco_lightning.data.sampling import ContiguousShardSampler, EpochShardSampler, TrainDataset


class Lists:
    """Train lists of two queries in the store's CSR layout."""
    qids = np.array([10, 20])
    pos = [np.array([1, 2]), np.array([3])]
    neg = [np.array([101, 102, 103]), np.array([201, 202, 203, 204])]

    def positives(self, i):
        return self.pos[i], self.pos[i] / 10.0

    def negatives(self, i):
        return self.neg[i], -self.neg[i] / 100.0


def dataset(k=1, seed=0):
    texts = SimpleNamespace(text=str, texts=lambda ids: [str(i) for i in ids])
    return TrainDataset(SimpleNamespace(train=Lists(), queries=texts, passages=texts), k, seed, with_teacher=True)


def test_each_epoch_moves_one_step_through_the_lists():
    ds = dataset(k=2)
    draws = [ds.draw(epoch, 1)[1] for epoch in range(3)]
    first_neg = list(Lists.neg[1]).index(draws[0][1])
    for epoch, pids in enumerate(draws):
        assert pids[0] == 3  # the only positive
        expected = [Lists.neg[1][(first_neg + 2 * epoch + j) % 4] for j in range(2)]
        assert list(pids[1:]) == expected
    # over 2 epochs with k=2, all 4 negatives of query 20 were seen once
    assert sorted(np.concatenate([d[1:] for d in draws[:2]])) == [201, 202, 203, 204]


def test_teacher_scores_follow_their_pids():
    query, docs, teacher = dataset(k=2)[(5, 0)]
    assert query == "10" and len(docs) == 3
    assert teacher == [np.float32(int(docs[0]) / 10.0)] + [np.float32(-int(d) / 100.0) for d in docs[1:]]


def test_draws_depend_only_on_seed_epoch_and_index():
    a, b, c = dataset(seed=1), dataset(seed=1), dataset(seed=2)
    assert all((a.draw(e, i)[1] == b.draw(e, i)[1]).all() for e in range(4) for i in range(2))
    assert any((a.draw(e, 0)[1] != c.draw(e, 0)[1]).any() for e in range(4))


def test_ranks_get_disjoint_equal_shards_and_a_new_order_each_epoch():
    n, world = 103, 4
    samplers = [EpochShardSampler(n, seed=7, rank=r, world_size=world) for r in range(world)]
    seen = np.concatenate([s.indices() for s in samplers])
    assert len(seen) == len(set(seen)) == (n // world) * world
    assert {len(s) for s in samplers} == {n // world}
    for s in samplers:
        s.set_epoch(1)
    assert not np.array_equal(seen, np.concatenate([s.indices() for s in samplers]))


def test_workers_see_every_example_of_the_epoch_exactly_once():
    sampler = EpochShardSampler(50, seed=3)
    data = list(range(50))
    loader = DataLoader(_Echo(data), sampler=sampler, batch_size=4, num_workers=2, collate_fn=list)
    seen = [i for batch in loader for i in batch]
    assert sorted(seen) == data and seen == [i for _, i in sampler]


def test_contiguous_validation_shards_cover_every_pair_once():
    parts = [list(ContiguousShardSampler(10, r, 3)) for r in range(3)]
    assert sum(parts, []) == list(range(10))


class _Echo(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __getitem__(self, key):
        return self.items[key[1]]

    def __len__(self):
        return len(self.items)
