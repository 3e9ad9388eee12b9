"""Hard negatives that refresh themselves (ANCE, Xiong et al. 2021, arXiv 2007.00808): every few epochs the model
being trained re-encodes the store's passages, searches its training queries, and re-mines their negatives with the
rule task=mine uses (mining.select_negatives: positives are never negatives; the positive-aware margins), so the
next epochs sample negatives that are hard for the model as it is now, not as it was before training.

The new lists are TrainLists files (the store's format) in `<run folder>/refresh/epoch-<E>/`, written atomically;
the datamodule's state names the current folder, so a resumed run samples exactly what the unbroken one did.
Under DDP every rank encodes its share of the passages into one memory-mapped matrix; rank 0 searches and writes.
Memory: the matrix (passages x dim x 4 bytes) lives on disk, memory-mapped; the faiss index holds it again (Flat)
or compressed (index_factory, e.g. IVF65536,PQ48 for MS MARCO's 8.8M: BENCHMARKS.md "Refreshing negatives").
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from marco_lightning.data.store import TRAIN_ARRAYS, TrainLists
from marco_lightning.evaluation import compute_metrics
from marco_lightning.inference import encode
from marco_lightning.mining import candidate_depth, select_negatives
from marco_lightning.retrieval import index_from_embeddings, search

CHUNK = 4096  # passages encoded and written at a time: memory stays flat in the collection's size
QUERY_CHUNK = 16384  # training queries encoded and searched at a time


@dataclass
class RefreshSettings:
    """negatives.refresh: every_n_epochs (null: off), the selection rule of task=mine (depth negatives per query,
    range, margins on the model's own scores), the index (faiss factory string) and the encoding batch size."""

    every_n_epochs: int | None = None
    depth: int = 5
    range_min: int = 0
    range_max: int | None = None
    relative_margin: float | None = 0.05
    absolute_margin: float | None = None
    index_factory: str = "Flat"
    nprobe: int = 64  # lists an IVF index searches (faiss' default, 1, misses most neighbours)
    batch_size: int = 64

    def due(self, epoch: int) -> int | None:
        """The refresh epoch whose lists epoch `epoch` samples from (None: the store's own lists)."""
        k = self.every_n_epochs
        return None if not k or epoch < k else epoch - epoch % k


def encode_passages(model, store, path, rank: int = 0, world: int = 1, batch_size: int = 64) -> np.memmap:
    """Every passage of the store (in its id order) -> rows of a float32 memmap at `path`; rank r encodes chunks
    r, r + world, ... of it (the file is created by rank 0 before the ranks start: see `refresh`)."""
    ids = store.passages.ids
    emb = np.lib.format.open_memmap(path, "r+")
    starts = range(rank * CHUNK, len(ids), world * CHUNK)
    for start in tqdm(starts, desc=f"refresh: encoding passages (rank {rank})", unit="chunk", file=sys.stderr,
                      mininterval=2, disable=rank != 0):
        chunk = ids[start:start + CHUNK]
        emb[start:start + len(chunk)] = encode(model, store.passages.texts(chunk), batch_size, role="document")
    emb.flush()
    return emb


def mine(model, store, emb: np.ndarray, index, settings: RefreshSettings, current) -> tuple[dict, dict]:
    """New negatives of every training query from the model's ranking of the whole store (`index` over `emb`) ->
    (TrainLists arrays, counts). Positives stay; a query the rule leaves nothing keeps its `current` negatives
    (the lists in use), and "changed" counts against them. The new negatives' teacher scores are NaN."""
    lists, ids = store.train, store.passages.ids
    positives = [np.asarray(lists.positives(i)[0]) for i in range(len(lists))]
    margins = settings.relative_margin is not None or settings.absolute_margin is not None
    k = candidate_depth(settings.depth, settings.range_min, settings.range_max, margins,
                        max((len(p) for p in positives), default=1))
    new, changed, total, skipped = [], 0, 0, Counter()
    for first in range(0, len(lists), QUERY_CHUNK):  # encoded and searched a chunk at a time: memory flat in queries
        chunk = range(first, min(first + QUERY_CHUNK, len(lists)))
        queries = encode(model, [store.queries.text(int(lists.qids[i])) for i in chunk], settings.batch_size,
                         role="query")
        scores, rows = index.search(queries, min(k, len(ids)))
        for i, query, srow, rrow in zip(chunk, queries, scores, rows):
            keep = rrow >= 0
            pos = positives[i]
            pos_scores = (emb[store.passages.positions(pos)] @ query).tolist() if margins else []
            negs = select_negatives(ids[rrow[keep]].tolist(), srow[keep].tolist(), pos.tolist(), pos_scores,
                                    settings.depth, settings.range_min, settings.range_max, settings.absolute_margin,
                                    settings.relative_margin, skipped)
            old = np.asarray(current.negatives(i)[0]).tolist()
            if not negs:  # the rule left nothing in the candidates: the query keeps the lists it had
                negs = old
            changed += len(set(negs) - set(old))
            total += len(negs)
            new.append(np.asarray(negs, np.int64))
    arrays = {name: np.asarray(getattr(lists, name)) for name in ("qids", "pos_offsets", "pos_pids", "pos_scores")}
    arrays["neg_offsets"] = np.concatenate([[0], np.cumsum([len(n) for n in new])]).astype(np.int64)
    arrays["neg_pids"] = np.concatenate(new) if new else np.empty(0, np.int64)
    arrays["neg_scores"] = np.full(len(arrays["neg_pids"]), np.nan, np.float32)
    return arrays, {"negatives": total, "changed_share": round(changed / max(total, 1), 4), "skipped": dict(skipped),
                    "candidates_per_query": int(k)}


def val_ndcg(model, store, index, qrels: dict, rel_level: int, batch_size: int) -> float | None:
    """nDCG@10 of the model's own dense ranking of the whole store for the validation queries (store ids)."""
    qids = [q for q in qrels if int(q) in store.queries]
    if not qids:
        return None
    vectors = encode(model, [store.queries.text(int(q)) for q in qids], batch_size, role="query")
    run = search(index, store.passages.ids, qids, vectors, 10)
    return compute_metrics({q: qrels[q] for q in qids}, run, rel_level, ("ndcg@10",))["ndcg@10"]


def refresh(model, store, out_dir, settings: RefreshSettings, epoch: int, val_qrels=None, val_rel_level: int = 1,
            strategy=None, current=None) -> dict:
    """Write the refreshed lists of `epoch` into out_dir (epoch-<E>/, complete when its stats.json is there) and
    return its stats; under DDP (`strategy`) every rank calls it, each encodes its share, rank 0 mines."""
    rank, world = (strategy.global_rank, strategy.world_size) if strategy is not None else (0, 1)
    barrier = strategy.barrier if strategy is not None else (lambda *_: None)
    folder, start = out_dir / f"epoch-{epoch}", time.time()
    work = out_dir / f".epoch-{epoch}.partial"
    if rank == 0:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        np.lib.format.open_memmap(work / "embeddings.npy", "w+", np.float32, (len(store.passages), model.dim)).flush()
    barrier("refresh: matrix")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            emb = encode_passages(model, store, work / "embeddings.npy", rank, world, settings.batch_size)
            barrier("refresh: encoded")
            stats = {}
            if rank == 0:
                index = index_from_embeddings(emb, settings.index_factory, settings.nprobe)
                arrays, stats = mine(model, store, emb, index, settings, current if current is not None else store.train)
                for name in TRAIN_ARRAYS:
                    np.save(work / f"train.{name}.npy", arrays[name])
                if val_qrels:
                    stats["val_ndcg@10"] = val_ndcg(model, store, index, val_qrels, val_rel_level, settings.batch_size)
                stats.update(epoch=epoch, seconds=round(time.time() - start, 1), encoded_by_ranks=world)
                del emb, index
                (work / "embeddings.npy").unlink()  # the lists are what is kept; the matrix is as big as the store
                (work / "stats.json").write_text(json.dumps(stats, indent=2))  # last: the folder is complete
                shutil.rmtree(folder, ignore_errors=True)
                work.rename(folder)
            barrier("refresh: written")
    finally:
        model.train(was_training)
    return json.loads((folder / "stats.json").read_text())


def load(folder) -> TrainLists | None:
    """The refreshed lists in `folder`, or None when it is not a complete refresh."""
    return TrainLists(folder) if (folder / "stats.json").is_file() else None
