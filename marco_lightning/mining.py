"""Hard-negative mining: ranked candidates from BM25 (bm25s) or a bi-encoder (faiss), and the choice of negatives
among them as sentence-transformers' `util.mine_hard_negatives` makes it."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Protocol

import numpy as np

from marco_lightning.data.formats import file_stamp
from marco_lightning.data.texts import iter_collection
from marco_lightning.errors import ConfigError
from marco_lightning.inference import compile_model
from marco_lightning.models import BiEncoder
from marco_lightning.retrieval import (
    _progress,
    build_index,
    collection_ids,
    encode,
    model_fingerprint,
    search,
    write_json,
)

Ranking = tuple[list[str], list[float]]  # passage ids best first, and their scores


class Searcher(Protocol):
    """A negative source of task=mine: what an entry of `task.systems` builds (tasks/mine.build_system, from its
    `_target_`). BM25 and Dense are two; a class of your own needs only these two methods.

    cache_dir: a folder holding `meta.json`, what the results depend on (collection, weights, library version):
    task=mine reuses the system's runs while it is unchanged. None, or no meta.json: searched again on every run.
    """

    cache_dir: Path | None

    def search(self, queries: dict[str, str], k: int) -> dict[str, Ranking]:
        """qid -> up to k (passage ids best first, their scores); a query may get fewer candidates, or none."""

    def pair_scores(self, qid: str, query: str, rows: list[int]) -> list[float]:
        """This system's scores of the query against passages given by their rows (0-based, collection file
        order): the positives missing from its ranking, for the margins (task.relative_margin, absolute_margin).
        Called after `search`, or on its own when the runs were reused."""


def select_negatives(ranked: list[str], scores: list[float], positives: list[str], positive_scores: list[float],
                     depth: int, range_min: int = 0, range_max: int | None = None,
                     absolute_margin: float | None = None, relative_margin: float | None = None,
                     skipped: Counter | None = None) -> list[str]:
    """Up to `depth` negatives from one query's ranked candidates, as `mine_hard_negatives` (sampling "top"):
    positives are never negatives; with a margin, a candidate must score below the *lowest* positive score minus
    `absolute_margin`, and below it minus |it| x `relative_margin`; of the candidates left, in rank order, those
    at ranks [range_min, range_max) are eligible. Skips are counted by reason in `skipped`."""
    skipped = Counter() if skipped is None else skipped
    pos = set(positives)
    floor = min(positive_scores) if positive_scores else None
    kept = []
    for pid, score in zip(ranked, scores):
        if pid in pos:
            continue
        if floor is not None and absolute_margin is not None and score + absolute_margin > floor:
            skipped["absolute_margin"] += 1
        elif floor is not None and relative_margin is not None and score > floor - abs(floor) * relative_margin:
            skipped["relative_margin"] += 1
        else:
            kept.append(pid)
    return kept[:range_max][range_min:][:depth]


def candidate_depth(depth: int, range_min: int, range_max: int | None, margins: bool, max_positives: int) -> int:
    """How many candidates to retrieve per query: `mine_hard_negatives`' rule (ten times more with a margin,
    since some will be skipped), plus room for the positives."""
    if range_max is None:
        range_max = range_min + depth * (10 if margins else 1) + max_positives
    return range_max + max_positives


class BM25:
    """bm25s (Lucene's BM25, k1=1.5, b=0.75) over stemmed, stopword-free English tokens, kept in `cache_dir`."""

    def __init__(self, collection, cache_dir: Path):
        import bm25s  # bm25s and PyStemmer: only when BM25 mines (a second of imports)
        import Stemmer


        logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs each step at DEBUG
        self.cache_dir = cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        meta = {"collection": file_stamp(collection), "bm25s": bm25s.__version__}
        self.stemmer = Stemmer.Stemmer("english")
        if (cache_dir / "meta.json").exists() and json.loads((cache_dir / "meta.json").read_text()) == meta:
            self.index = bm25s.BM25.load(str(cache_dir / "index"), mmap=True)
        else:
            (cache_dir / "meta.json").unlink(missing_ok=True)
            (cache_dir / "ids.npy").unlink(missing_ok=True)
            tokenizer = bm25s.tokenization.Tokenizer(stopwords="en", stemmer=self.stemmer)
            texts = (t for _, t in _progress(iterable=iter_collection(collection), desc="BM25 tokenising",
                                             unit="passage"))
            token_ids = list(tokenizer.streaming_tokenize(texts))
            self.index = bm25s.BM25()
            self.index.index((token_ids, tokenizer.get_vocab_dict()), show_progress=False)
            del token_ids
            self.index.save(str(cache_dir / "index"))
            (cache_dir / "meta.json").write_text(json.dumps(meta))  # last: its presence means complete
        self.ids = collection_ids(collection, cache_dir)

    def _tokens(self, texts: list[str]):
        import bm25s

        return bm25s.tokenize(texts, stopwords="en", stemmer=self.stemmer, return_ids=False, show_progress=False)

    def search(self, queries: dict[str, str], k: int) -> dict[str, Ranking]:
        qids = list(queries)
        rows, scores = self.index.retrieve(self._tokens([queries[q] for q in qids]), k=min(k, len(self.ids)),
                                           show_progress=False)
        # a query with fewer than k matching passages gets zero-score filler rows: not candidates
        return {q: ([str(self.ids[r]) for r, s in zip(rr, ss) if s > 0], [float(s) for s in ss if s > 0])
                for q, rr, ss in zip(qids, rows, scores)}

    def pair_scores(self, qid: str, query: str, rows: list[int]) -> list[float]:
        return self.index.get_scores(self._tokens([query])[0])[rows].astype(float).tolist()


class Dense:
    """A bi-encoder's exact inner-product search (faiss Flat) over its memory-mapped collection embeddings."""

    def __init__(self, model, collection, cache_dir: Path, batch_size: int = 64, precision: str = "auto"):
        self.model, self.batch_size, self.cache_dir, self.precision = model.eval(), batch_size, Path(cache_dir), precision
        self.index, self.ids = build_index(model, collection, cache_dir, "Flat", batch_size, precision)
        self._queries: dict[str, np.ndarray] = {}
        if model.query_prompt:  # the runs depend on it, the collection's vectors (cache_dir's meta.json) do not:
            # a folder of its own whose meta.json says both, so task=mine reuses runs of this query prompt only
            meta = {**json.loads((self.cache_dir / "meta.json").read_text()), "query_prompt": model.query_prompt}
            digest = hashlib.sha1(model.query_prompt.encode()).hexdigest()[:12]
            self.cache_dir = self.cache_dir / f"query-prompt-{digest}"
            self.cache_dir.mkdir(exist_ok=True)
            write_json(self.cache_dir / "meta.json", meta)

    def search(self, queries: dict[str, str], k: int) -> dict[str, Ranking]:
        qids = list(queries)
        vectors = encode(self.model, [queries[q] for q in qids], self.batch_size, self.precision, role="query")
        self._queries = dict(zip(qids, vectors))  # for pair_scores (margins)
        run = search(self.index, self.ids, qids, vectors, k)
        return {q: (list(docs), list(docs.values())) for q, docs in run.items()}

    def pair_scores(self, qid: str, query: str, rows: list[int]) -> list[float]:
        if qid not in self._queries:  # runs reused from an earlier task=mine: this query was not encoded now
            self._queries[qid] = encode(self.model, [query], 1, self.precision, role="query")[0]
        return [float(self._queries[qid] @ self.index.reconstruct(int(r))) for r in rows]


def dense(model, collection, cache_root, batch_size: int = 64, device="cpu", precision: str = "auto",
          compile: bool = False) -> Dense:
    """The bi-encoder systems of task.systems (`model`, a sentence-transformers folder or hub id): Dense with `model`
    (a folder or hub id, or a built bi-encoder: a `_target_` node is built first) on `device`, compiled with
    task.compile, its collection embeddings in cache_root/dense-<digest of its weights> (whatever name it has)."""
    if isinstance(model, (str, os.PathLike)):
        model = BiEncoder(str(model))
    if getattr(model, "kind", None) != "bi":
        raise ConfigError(f"task.systems: marco_lightning.mining.dense searches with a bi-encoder, but its model is "
                          f"a {type(model).__name__} (kind {getattr(model, 'kind', None)!r}); give it a bi-encoder")
    model = model.to(device)
    if compile:
        compile_model(model)
    return Dense(model, collection, Path(cache_root) / f"dense-{model_fingerprint(model)[:12]}", batch_size, precision)
