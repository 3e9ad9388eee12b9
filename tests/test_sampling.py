"""Sampling: per-epoch rotation, determinism from (seed, epoch), and rank-disjoint shards."""
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils.data import DataLoader

from marco_lightning.data.sampling import EpochShardSampler, StridedShardSampler, TrainDataset


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


def identity_lengths(epoch, indices):
    return np.asarray(indices)  # example i has length i: batches are easy to check by hand


def grouped(n, world, batch=4, pool_batches=64, epoch=0):
    samplers = [EpochShardSampler(n, seed=5, rank=r, world_size=world, lengths=identity_lengths, batch_size=batch,
                                  pool_batches=pool_batches) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    return [s.indices() for s in samplers]


def test_length_grouped_batches_are_alike_across_ranks_and_cover_the_epoch_once():
    ranks = grouped(42, world=2)  # one pool: sorted 0..41, global batches of 8 = [0..7], [8..15], ..., [40, 41]
    assert sorted(np.concatenate(ranks)) == list(range(42))
    steps = [np.concatenate([r[j:j + 4] for r in ranks]) for j in range(0, 21, 4)]
    for step in steps[:-1]:  # each step (both ranks) is one global batch: 8 consecutive lengths
        assert sorted(step) == list(range(step.min(), step.min() + 8)) and step.min() % 8 == 0
        assert all(len(r[j:j + 4]) == 4 for r in ranks for j in range(0, 20, 4))
    assert sorted(steps[-1]) == [40, 41] and [list(r[20:]) for r in ranks] == [[40], [41]]  # partial batch last
    assert [s.min() for s in steps[:-1]] != sorted(s.min() for s in steps[:-1])  # batch order shuffled
    assert [s.min() for s in steps[:-1]] != [s.min() for s in
                                              (np.concatenate([r[j:j + 4] for r in grouped(42, 2, epoch=1)])
                                               for j in range(0, 20, 4))]  # ...differently each epoch


def test_fewer_examples_than_ranks_give_empty_shards():
    assert [len(s) for s in grouped(1, world=2)] == [0, 0]


def test_length_groups_form_within_pools_of_the_shuffled_order():
    n, batch = 64, 4
    order = np.random.default_rng((5, 0)).permutation(n)  # the sampler's shuffle of epoch 0
    (got,) = grouped(n, world=1, batch=batch, pool_batches=2)  # pools of 8 examples
    pools = [set(order[i:i + 8]) for i in range(0, n, 8)]
    batches = [set(got[i:i + batch]) for i in range(0, n, batch)]
    for pool in pools:  # each pool splits into its lower and upper half
        lo, hi = set(sorted(pool)[:4]), set(sorted(pool)[4:])
        assert lo in batches and hi in batches


def test_example_length_is_its_longest_passage():
    texts = SimpleNamespace(text=str, texts=lambda ids: [str(i) for i in ids],
                            nbytes=lambda ids: np.array([len("x" * (int(i) % 7)) for i in ids]))
    ds = TrainDataset(SimpleNamespace(train=Lists(), queries=texts, passages=texts), 2, 0, with_teacher=True)
    for epoch in range(3):
        expected = [max(int(p) % 7 for p in ds.draw(epoch, i)[1]) for i in range(2)]
        assert list(ds.doc_bytes(epoch, [0, 1])) == expected


def test_validation_shards_cover_every_pair_once_at_equal_cost():
    parts = [list(StridedShardSampler(10, r, 3)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(10)) and all(p == sorted(p) for p in parts)
    # rows are sorted by passage length: cost ~ length. Contiguous slices would give one rank every long passage
    lengths = np.sort(np.random.default_rng(0).lognormal(5, 1, 4300))
    costs = [lengths[list(StridedShardSampler(len(lengths), r, 4))].sum() for r in range(4)]
    assert max(costs) / min(costs) < 1.02
    contiguous = [part.sum() for part in np.array_split(lengths, 4)]
    assert max(contiguous) / min(contiguous) > 5  # what the old contiguous split did


class _Echo(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __getitem__(self, key):
        return self.items[key[1]]

    def __len__(self):
        return len(self.items)


def test_group_by_length_pads_less_on_the_real_sample(tmp_path):
    """The same examples (same real tokens) in the epoch, with fewer padded passage tokens."""
    from conftest import compose
    from hydra.utils import instantiate

    from marco_lightning.data.sources import build_source

    cfg = compose(["model=tiny", "model.max_doc_length=256", "batch_size=8", "num_workers=0"], tmp_path)
    collator = instantiate(cfg.model).collator()
    tokens = {}
    for group in (False, True):
        dm = instantiate(cfg.datamodule, _partial_=True, seed=0, group_by_length=group)(
            source=build_source(cfg.data), negatives=cfg.negatives, collator=collator, with_teacher=True)
        dm.prepare_data()
        dm.setup()
        docs = [b["docs"] for b in dm.train_dataloader()]
        tokens[group] = (sum(d["input_ids"].numel() for d in docs), sum(int(d["attention_mask"].sum()) for d in docs))
    assert tokens[True][1] == tokens[False][1]  # the same passages
    assert tokens[True][0] < 0.9 * tokens[False][0]  # measured: 0.82 (54 queries, batches of 8)
