"""Sampling: per-epoch rotation, determinism from (seed, epoch), and rank-disjoint shards."""
from types import SimpleNamespace

import numpy as np
import pytest
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
    query, docs, teacher, ids = dataset(k=2)[(5, 0)]
    assert query == "10" and len(docs) == 3
    assert teacher == [np.float32(int(docs[0]) / 10.0)] + [np.float32(-int(d) / 100.0) for d in docs[1:]]
    # the ids MNRL's leave_out_judged reads: the row's documents, and both judged positives of query 10
    assert [str(p) for p in ids["doc_ids"]] == docs and list(ids["judged_ids"]) == [1, 2] and "query_id" not in ids


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


# ---------------------------------------------------------------- train_rows=positive: one row per (query, positive)


class PositiveLists(Lists):
    """Lists in the store's layout with the CSR offsets: query 10 has 2 positives, query 20 one, query 30 none
    (negatives.require_positive=false)."""
    qids = np.array([10, 20, 30])
    pos = (np.array([1, 2]), np.array([3]), np.array([], np.int64))
    neg = (np.array([101, 102, 103, 104, 105]), np.array([201, 202, 203, 204]), np.array([301, 302, 303]))
    pos_offsets = np.array([0, 2, 3, 3])


def rows_dataset(rows, k=2, seed=0, lists=PositiveLists):
    texts = SimpleNamespace(text=str, texts=lambda ids: [str(i) for i in ids],
                            nbytes=lambda ids: np.array([int(i) % 7 for i in ids]))
    return TrainDataset(SimpleNamespace(train=lists(), queries=texts, passages=texts), k, seed, with_teacher=True,
                        rows=rows)


def test_positive_rows_are_every_query_positive_pair_with_the_negatives_rotating():
    ds, by_query = rows_dataset("positive"), rows_dataset("query")
    assert (len(ds), len(by_query)) == (4, 3)  # (10, 1), (10, 2), (20, 3), and query 30's one row
    assert [ds.query_of(r) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (2, 0)]
    start = int(np.random.default_rng((0, 0)).integers(0, 1 << 31, size=2)[1])  # query 10's start in its list
    for epoch in range(3):
        (q0, a, _), (q1, b, _) = ds.draw(epoch, 0), ds.draw(epoch, 1)
        assert (q0, q1, a[0], b[0]) == (10, 10, 1, 2)  # each row its own positive
        # the query's 2 rows take its steps 2e and 2e+1: consecutive blocks of k=2 negatives, then the next epoch's
        negs = PositiveLists.neg[0]
        assert list(a[1:]) == [negs[(start + 4 * epoch + j) % 5] for j in range(2)]
        assert list(b[1:]) == [negs[(start + 4 * epoch + 2 + j) % 5] for j in range(2)]
        # one positive, or none: exactly what rows=query draws
        for row, i in ((2, 1), (3, 2)):
            assert all((x == y).all() if isinstance(x, np.ndarray) else x == y
                       for x, y in zip(ds.draw(epoch, row), by_query.draw(epoch, i)))
    # a pure function of (seed, epoch, row)
    assert all((ds.draw(e, r)[1] == rows_dataset("positive").draw(e, r)[1]).all() for e in range(3) for r in range(4))
    assert any((ds.draw(e, 0)[1] != rows_dataset("positive", seed=1).draw(e, 0)[1]).any() for e in range(3))


def test_positive_rows_carry_their_query_id_and_query_rows_do_not():
    text, docs, teacher, ids = rows_dataset("positive")[(0, 1)]
    assert (text, docs[0], ids["query_id"]) == ("10", "2", 10) and teacher[0] == np.float32(0.2)
    assert "query_id" not in rows_dataset("query")[(0, 1)][3]  # one row per query: nothing to tell apart


def test_train_rows_are_checked():
    from marco_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="train_rows='pairs'"):
        rows_dataset("pairs")


def test_positive_rows_shard_resume_and_group_by_length_on_the_new_length():
    ds = rows_dataset("positive", k=1)
    n = len(ds)
    ranks = [EpochShardSampler(n, seed=3, rank=r, world_size=2) for r in range(2)]
    assert [len(s) for s in ranks] == [n // 2] * 2 and sorted(np.concatenate([s.indices() for s in ranks])) == \
        sorted(np.random.default_rng((3, 0)).permutation(n)[:n // 2 * 2])
    # a resume skips what the killed run trained on in that epoch and continues the same order
    unbroken, resumed = EpochShardSampler(n, seed=3), EpochShardSampler(n, seed=3, position=(0, 2))
    assert list(resumed) == list(unbroken)[2:] and len(resumed) == n
    # length grouping keys each row by its own draw
    grouped = EpochShardSampler(n, seed=3, lengths=ds.doc_bytes, batch_size=2)
    assert sorted(grouped.indices()) == list(range(n))
    assert list(ds.doc_bytes(0, range(n))) == [max(int(p) % 7 for p in ds.draw(0, r)[1]) for r in range(n)]


def test_positive_rows_on_the_real_sample_batch_with_query_ids(tmp_path):
    """Every (training query, positive) pair of the store is one row of the epoch, in DataLoader workers too, and
    the batches carry the query ids MNRL masks with; group_by_length keeps the same rows."""
    from conftest import compose
    from hydra.utils import instantiate

    from marco_lightning.data.sources import build_source

    cfg = compose(["model=tiny", "loss=mnrl", "batch_size=16", "num_workers=2", "train_rows=positive"], tmp_path)
    collator = instantiate(cfg.model).collator()
    seen = {}
    for group in (False, True):
        dm = instantiate(cfg.datamodule, _partial_=True, group_by_length=group)(
            source=build_source(cfg.data), negatives=cfg.negatives, collator=collator, with_teacher=False)
        dm.prepare_data()
        dm.setup()
        assert len(dm.train_set) == dm.store.manifest["num_positives"] > 2 * dm.store.manifest["num_train_queries"]
        batches = list(dm.train_dataloader())
        ids = torch.cat([b["query_ids"] for b in batches])
        assert len(ids) == len(dm.train_set) and set(ids.tolist()) == set(dm.store.train.qids.tolist())
        # ... and each row's documents and its query's judged positives (MNRL's leave_out_judged), -1 padded
        index = {int(q): i for i, q in enumerate(dm.store.train.qids)}
        for b in batches[:3]:
            assert b["doc_ids"].shape == (len(b["query_ids"]), 2)
            for qid, docs, judged in zip(b["query_ids"], b["doc_ids"], b["judged_ids"]):
                positives = sorted(dm.store.train.positives(index[int(qid)])[0].tolist())
                assert sorted(judged[judged >= 0].tolist()) == positives and int(docs[0]) in positives
        seen[group] = sorted(ids.tolist())
    assert seen[True] == seen[False]


def test_workers_persist_across_epochs_and_serve_each_epochs_draws(tmp_path):
    """DataLoader workers live for the whole fit (no fork per epoch): epoch 1 from the same workers is epoch 1's
    draws, as the main process alone makes them; with negatives.refresh the workers must not outlive the lists."""
    from conftest import compose
    from hydra.utils import instantiate

    from marco_lightning.data.sources import build_source

    cfg = compose(["model=tiny", "batch_size=16"], tmp_path)
    collator = instantiate(cfg.model).collator()

    def epochs(workers, **extra):
        dm = instantiate(cfg.datamodule, _partial_=True, num_workers=workers, **extra)(
            source=build_source(cfg.data), negatives=cfg.negatives, collator=collator, with_teacher=True)
        dm.prepare_data()
        dm.setup()
        loader, seen = dm.train_dataloader(), []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)  # what Lightning does before each epoch
            seen.append([b["query"]["input_ids"].tolist() for b in loader])
        return loader, seen

    persistent, with_workers = epochs(2)
    _, alone = epochs(0)
    assert persistent.persistent_workers and persistent._iterator is not None  # kept for the next epoch
    assert with_workers == alone and with_workers[0] != with_workers[1]
    refreshing, _ = epochs(2, refresh={"every_n_epochs": 1}, refresh_dir=tmp_path / "refresh")
    assert not refreshing.persistent_workers


class _ParentPid(torch.utils.data.Dataset):
    def __getitem__(self, i):
        import os
        return os.getppid()

    def __len__(self):
        return 4


def test_workers_start_outside_the_training_process(tmp_path):
    """Forked workers share the training process's pages, which training then rewrites: a validation loader forked
    mid-fit kept a copy of its memory (BENCHMARKS.md). The datamodule's workers start from the forkserver instead,
    so their parent is not the training process; worker_start=null keeps the platform's fork."""
    import os

    from conftest import compose
    from hydra.utils import instantiate

    cfg = compose(["model=tiny"], tmp_path)
    for start, forked in (("forkserver", False), (None, True)):
        dm = instantiate(cfg.datamodule, _partial_=True, num_workers=2, worker_start=start)(
            source=None, negatives=cfg.negatives, collator=None, with_teacher=False)
        loader = dm._loader(_ParentPid(), None, 2, list)
        parents = {pid for batch in loader for pid in batch}
        assert (parents == {os.getpid()}) == forked, (start, parents)
