"""What each training step sees: per-epoch rotation of (positive, negatives) and rank-disjoint shuffling.

The sampler yields `(epoch, index)` so the dataset knows the epoch inside DataLoader workers without any shared
state; every draw is a pure function of (seed, epoch, index), hence identical across workers, ranks and resumes.
"""
from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from marco_lightning.data.store import process_alive
from marco_lightning.data.trec import top_candidates
from marco_lightning.errors import ConfigError


class EpochShardSampler(Sampler):
    """Shuffles all examples with (seed, epoch), then gives rank r every world_size-th one.

    Each rank gets the same number of examples (DDP needs equal step counts), so up to world_size-1 examples sit
    out an epoch; a new permutation each epoch means a different few each time.

    With `lengths` (epoch, indices -> length of each example) and `batch_size`, batches are length-grouped: the
    shuffled order is cut into pools of `pool_batches` global batches, each pool sorted by length and cut into
    global batches (every rank's share of one is alike, so no rank waits on another), whose order is shuffled.
    Same examples per epoch, far less padding; the last, partial batch stays last.
    """

    def __init__(self, num_examples: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 position: tuple[int, int] | Callable[[], tuple[int, int] | None] | None = None,
                 lengths: Callable[[int, np.ndarray], np.ndarray] | None = None, batch_size: int = 1,
                 pool_batches: int = 64):
        self.n, self.shuffle, self.seed, self.rank, self.world_size = num_examples, shuffle, seed, rank, world_size
        self.lengths, self.batch_size, self.pool_batches = lengths, batch_size, pool_batches
        self.epoch = 0
        # (epoch, examples this rank already trained on in it), asked at each iter(): the trainer's own count, as
        # Lightning may make (and workers prime) an iterator before set_epoch and before it restores a resumed run's
        # progress; a resumed run continues where it stopped. None: the set_epoch epoch from its start.
        self.position = position if callable(position) else lambda: position

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def indices(self, skip: int = 0) -> np.ndarray:
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        order = order[:self.n // self.world_size * self.world_size]
        if self.lengths is None:
            return order[self.rank::self.world_size][skip:]
        lengths, step = self.lengths(self.epoch, order), self.batch_size * self.world_size
        pool = step * self.pool_batches
        mine = []
        for start in range(0, len(order), pool):
            ids = order[start:start + pool]
            ids = ids[np.argsort(lengths[start:start + pool], kind="stable")]
            batches = [ids[i:i + step] for i in range(0, len(ids), step)]
            full = [batches[i] for i in rng.permutation(len(batches) - (len(batches[-1]) < step))]
            mine += [b[self.rank::self.world_size] for b in full + batches[len(full):]]
        return np.concatenate(mine)[skip:] if mine else order

    def __iter__(self):
        position, skip = self.position(), 0
        if position is not None:
            self.epoch, skip = position
        epoch, order = self.epoch, self.indices(skip)
        return ((epoch, int(i)) for i in order)

    def __len__(self):
        # a full epoch even when resuming: Lightning counts the batches trained before the kill as already fetched
        return self.n // self.world_size


def check_teacher_coverage(store) -> None:
    """Every training pair needs a teacher score for a distillation loss: say which are missing before training
    starts, not mid-epoch inside a DataLoader worker."""
    lists, missing = store.train, []
    for i in range(len(lists.qids)):  # ~1 s per 100k queries: once, before the first step
        for pids, scores in (lists.positives(i), lists.negatives(i)):
            missing += [(int(lists.qids[i]), int(p)) for p in np.asarray(pids)[np.isnan(scores)]]
    if missing:
        examples = ", ".join(f"(query {q}, passage {p})" for q, p in missing[:5])
        raise ConfigError(f"{len(missing)} training pairs of the data store have no teacher score, e.g. "
                          f"{examples}: a distillation loss needs one for every pair. Add them to "
                          "data.teacher_scores, set negatives.ce_score_margin (drops unscored negatives), or pick "
                          "a loss without a teacher (loss=mnrl)")


TRAIN_ROWS = ("query", "positive")


class TrainDataset(Dataset):
    """The epoch's examples: one per training query (`rows="query"`), or one per (training query, positive) pair
    (`rows="positive"`, sentence-transformers' unit: a (query, positive) row of a dataset); each with
    `num_negatives` hard negatives rotating through the query's list.

    rows="query": query i at epoch e takes one positive and k negatives; a per-query random start (from the seed)
    then one step per epoch, so epoch e+1 sees the next pairs, as in sentence-transformers' v2 MS MARCO scripts
    (lost in v3+, where data is materialised once).
    rows="positive": row (i, j) takes query i's positive j, and the negatives of the query's step e * P + j (P: its
    number of positives) on the same rotation: the query's P rows of an epoch take consecutive blocks of its list, the
    next epoch the blocks after them. A query with one positive draws exactly what rows="query" draws; a query
    without one (negatives.require_positive=false) keeps its one row, drawn as rows="query" draws it. Items then also
    carry the query's id, so an in-batch loss can tell two rows of one query apart from two queries (MNRL masks the
    other rows' positives of its own query). Every item carries its documents' ids and its query's judged positives
    (MNRL's leave_out_judged).
    Every draw is a pure function of (seed, epoch, row): identical in every worker and rank, and after a resume.
    """

    def __init__(self, store, num_negatives: int, seed: int, with_teacher: bool, rows: str = "query"):
        if rows not in TRAIN_ROWS:
            raise ConfigError(f"train_rows={rows!r}: use query (one example per training query) or positive (one per "
                              "(training query, positive) pair, as sentence-transformers' datasets)")
        self.store, self.lists, self.rows = store, store.train, rows
        self.num_negatives, self.seed, self.with_teacher = num_negatives, seed, with_teacher
        # rows="positive": row r belongs to query i for row_offsets[i] <= r < row_offsets[i + 1]
        self.row_offsets = None if rows == "query" else np.concatenate(
            [[0], np.cumsum(np.maximum(np.diff(np.asarray(self.lists.pos_offsets)), 1))]).astype(np.int64)
        if with_teacher:
            check_teacher_coverage(store)

    def __len__(self):
        return len(self.lists.qids) if self.row_offsets is None else int(self.row_offsets[-1])

    def query_of(self, row: int) -> tuple[int, int | None]:
        """(training query index, its positive's slot) of a row; slot None for rows="query"."""
        if self.row_offsets is None:
            return row, None
        i = int(np.searchsorted(self.row_offsets, row, side="right")) - 1
        return i, row - int(self.row_offsets[i])

    def draw(self, epoch: int, row: int):
        """(qid, [pos, neg...] pids, teacher scores) of this row at this epoch."""
        i, slot = self.query_of(row)
        pos, pos_scores = self.lists.positives(i)
        neg, neg_scores = self.lists.negatives(i)
        start_pos, start_neg = np.random.default_rng((self.seed, i)).integers(0, 1 << 31, size=2)
        if not len(pos):  # negatives.require_positive=false (distillation only): the teacher ranks two candidates
            j = (start_pos + epoch) % len(neg)
            pos, pos_scores = neg[j:j + 1], neg_scores[j:j + 1]
            if len(neg) > 1:
                neg, neg_scores = np.delete(neg, j), np.delete(neg_scores, j)
        if slot is None:  # the query's positives rotate too
            p, step = (start_pos + epoch) % len(pos), epoch
        else:  # the row's own positive; its negatives at the query's step e * P + slot
            p, step = slot, epoch * len(pos) + slot
        n = (start_neg + step * self.num_negatives + np.arange(self.num_negatives)) % len(neg)
        pids = np.concatenate([[pos[p]], neg[n]])
        scores = np.concatenate([[pos_scores[p]], neg_scores[n]]).astype(np.float32)
        return int(self.lists.qids[i]), pids, scores

    def doc_bytes(self, epoch: int, indices) -> np.ndarray:
        """Length of each example at this epoch (its longest passage, in utf-8 bytes): the key of length grouping.
        About as costly as drawing the examples (~10 s per epoch for MS MARCO's 500k queries)."""
        return np.array([self.store.passages.nbytes(self.draw(epoch, int(i))[1]).max() for i in indices])

    def __getitem__(self, key):
        epoch, i = key
        qid, pids, scores = self.draw(epoch, i)
        teacher = None
        if self.with_teacher:
            if np.isnan(scores).any():
                missing = [int(p) for p, s in zip(pids, scores) if np.isnan(s)]
                raise ConfigError(f"no teacher score for query {qid}, passages {missing}: the loss needs one for "
                                  "every pair; set negatives.ce_score_margin (drops unscored negatives) or fix "
                                  "data.teacher_scores")
            teacher = scores.tolist()
        # the ids an in-batch loss leaves candidates out by: its documents and every judged positive of its query
        ids = {"doc_ids": pids, "judged_ids": self.lists.positives(self.query_of(i)[0])[0]}
        if self.row_offsets is not None:
            ids["query_id"] = qid
        return self.store.queries.text(qid), self.store.passages.texts(pids), teacher, ids


class RerankPairs(Dataset):
    """(qid, pid, query text, passage text) rows of a run's top-k, for validation by re-ranking.

    Rows are ordered by passage length, so each batch pads to similar lengths: ~2x faster than run order; a
    passage's rows (several queries retrieved it) sit together, so a batch embeds it once (Collator.pairs(unique)).
    """

    def __init__(self, store, run: dict[str, dict[str, float]], top_k: int):
        rows = [(int(qid), int(pid)) for qid, docs in run.items()
                for pid in top_candidates(qid, docs, top_k, key="data.val_top_k")]
        rows = np.array(rows, dtype=np.int64).reshape(-1, 2)
        self.rows = rows[np.lexsort((rows[:, 0], rows[:, 1], store.passages.nbytes(rows[:, 1])))]  # length, pid, qid
        self.store = store

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        qid, pid = self.rows[i]
        return int(qid), int(pid), self.store.queries.text(qid), self.store.passages.text(pid)


class StridedShardSampler(Sampler):
    """Rank r evaluates rows r, r + W, r + 2W, ... of the length-sorted rows: every rank gets the same mix of short
    and long passages (equal cost, so none waits for another) and still length-sorted batches. No padding, so no
    pair is scored twice."""

    def __init__(self, num_examples: int, rank: int = 0, world_size: int = 1):
        self.range = range(rank, num_examples, world_size)

    def __iter__(self):
        return iter(self.range)

    def __len__(self):
        return len(self.range)


def worker_init(_, training_pid: int | None = None):
    torch.set_num_threads(1)  # tokenisation workers must not fight the training process for cores
    if training_pid is not None and training_pid != os.getppid():
        threading.Thread(target=exit_with, args=(training_pid,), daemon=True, name="exit-with-training").start()


def exit_with(pid: int) -> None:
    """End this process when process `pid` ends. A forkserver's worker is the server's child, and the server lives
    while its children do: DataLoader's own check (is my parent alive?) never fires after a SIGKILL or the OOM
    killer ends the training process, and its workers (0.2-0.3 GB each) would live on for good."""
    try:
        fd = os.pidfd_open(pid)  # Linux >= 5.3: readable once that process has exited, whoever reuses its pid
    except (AttributeError, OSError):  # another OS, or it has exited already
        fd = None
    if fd is not None:
        waiter = select.poll()  # not select.select: it refuses descriptors >= 1024
        waiter.register(fd, select.POLLIN)
        waiter.poll()
    else:
        while process_alive(pid):
            time.sleep(2)
    os._exit(0)
