"""Synthetic MS MARCO training files in the exact real formats, at the real shape or any fraction of it.

    python -m benchmarks.synthetic_msmarco OUT_DIR --scale 0.1

writes into OUT_DIR
    collection.tsv                   pid \\t passage          8,841,823 x scale (real passage texts of data/sample,
                                                               cycled: the tokeniser sees real text)
    queries.train.tsv                qid \\t query            808,731 x scale (real query texts, cycled)
    qrels.train.tsv                  qid \\t 0 \\t pid \\t 1     one positive per query with one (6% get two)
    msmarco-hard-negatives.jsonl.gz  {"qid": .., "pos": [..], "neg": {system: [50 pids], ..}} for every query;
                                     502,939 x scale of them have positives, the rest `"pos": []`; 13 systems
    cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz
                                     scores[qid][pid] -> numpy.float32 for every pid of a query's line (~196 a
                                     query: ~160M at scale 1), pickled byte for byte as `pickle.dump(scores, f,
                                     protocol=4)` of numpy-1 scalars writes it (FRAME boundaries aside)

The score pickle is written by a streaming encoder (`ScorePickleWriter`): pickling a real 160M-entry dict would
need the 17-25 GB this benchmark is about. tests/test_bench_data.py checks it against `pickle.dumps`.
Files are gzipped at level 1 (speed); the level changes the size, not the format.
"""
from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"

# The real shape (REFERENCE.md): passages, training queries, queries with a positive, qrels lines.
FULL = {"passages": 8_841_823, "queries": 808_731, "with_positive": 502_939, "qrels": 532_761,
        "teacher_scores": 160_000_000}
SYSTEMS = ["bm25", "msmarco-distilbert-base-tas-b", "msmarco-distilbert-base-v3", "msmarco-MiniLM-L-6-v3",
           "distilbert-margin_mse-cls-dot-v1", "distilbert-margin_mse-cls-dot-v2",
           "distilbert-margin_mse-mean-dot-v1", "mpnet-margin_mse-mean-v1", "co-condenser-margin_mse-cls-v1",
           "distilbert-margin_mse-mnrl-mean-v1", "distilbert-margin_mse-sym_mnrl-mean-v1",
           "distilbert-margin_mse-sym_mnrl-mean-v2", "co-condenser-margin_mse-sym_mnrl-mean-v1"]
PER_SYSTEM = 50
POOL = 200              # each query's systems draw from 200 candidates: ~196 distinct pids a line, as 160M/808k
MAX_QID = 1_200_000     # real train qids are sparse in [0, ~1.2M)
CHUNK = 2_000           # queries generated at once


def _texts(name: str) -> list[str]:
    with open(SAMPLE / name, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t", 1)[1] for line in f if "\t" in line]


def scaled(scale: float) -> dict[str, int]:
    n = {k: max(1, round(v * scale)) for k, v in FULL.items()}
    n["with_positive"] = min(n["with_positive"], n["queries"])
    n["passages"] = max(n["passages"], POOL + 2)  # a query needs 200 distinct candidates
    return n


# --- the score pickle ----------------------------------------------------------------------------------------

def _global_prefix(module: str) -> bytes:
    """The opcodes pickle writes for the first numpy.float32 scalar: the scalar reconstructor, the dtype
    (memo 4 and 10; every later scalar refers back to them) and its state."""
    m = module.encode()
    return (b"\x8c" + bytes([len(m)]) + m + b"\x94\x8c\x06scalar\x94\x93\x94\x8c\x05numpy\x94\x8c\x05dtype\x94\x93"
            b"\x94\x8c\x02f4\x94\x89\x88\x87\x94R\x94(K\x03\x8c\x01<\x94NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t\x94b")


_VALUE = np.frombuffer(b"h\x04h\nC\x04\x00\x00\x00\x00\x94\x86\x94R\x94", np.uint8)  # BINGET 4, BINGET 10, 4 bytes
_FRAME_TARGET = 64 * 1024


def _int_ops(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(opcode bytes (n, 5), lengths) of non-negative ints as pickle writes them: BININT1, BININT2 or BININT."""
    x = np.asarray(x, np.int64)
    if len(x) and (x.min() < 0 or x.max() >= 1 << 31):
        raise ValueError("ids must be in [0, 2^31)")
    ops = np.zeros((len(x), 5), np.uint8)
    ops[:, 1:] = x.astype("<u4").view(np.uint8).reshape(-1, 4)
    small, mid = x < 256, (x >= 256) & (x < 65536)
    ops[:, 0] = np.where(small, ord("K"), np.where(mid, ord("M"), ord("J")))
    return ops, np.where(small, 2, np.where(mid, 3, 5))


def _int_bytes(x: int) -> bytes:
    ops, n = _int_ops(np.array([x]))
    return ops[0, :n[0]].tobytes()


def _entries(pids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All `pid: numpy.float32(score)` entries as one byte array, with each entry's start offset."""
    key, width = _int_ops(pids)
    rec = np.zeros((len(pids), 20), np.uint8)
    rec[:, :5] = key
    value = np.broadcast_to(_VALUE, (len(pids), 15)).copy()
    value[:, 6:10] = np.asarray(scores, "<f4").view(np.uint8).reshape(-1, 4)
    for w in (2, 3, 5):
        m = width == w
        rec[m, w:w + 15] = value[m]
    length = width + 15
    starts = np.concatenate([[0], np.cumsum(length)])
    return rec[np.arange(20) < length[:, None]], starts


class ScorePickleWriter:
    """Streams `scores[qid][pid] -> numpy.float32` as pickle protocol 4 into a binary file, query by query, with
    the C pickler's batching: MARK ... SETITEMS per 1000 entries (and an empty one after a full last batch),
    SETITEM for a one-entry dict."""

    def __init__(self, f, num_queries: int, module: str = "numpy.core.multiarray"):
        self.f, self.total, self.module = f, num_queries, module  # numpy 1 wrote numpy.core; numpy 2 numpy._core
        self.done, self.first = 0, True
        self.parts, self.size = [b"}\x94"], 2  # the outer dict, memo 0; frame body so far
        self.f.write(b"\x80\x04")

    def add(self, qids, counts, pids, scores):
        """Queries `qids` in order, query i with the next counts[i] (pid, score) pairs; every count >= 1."""
        counts = np.asarray(counts, np.int64)
        if len(counts) and counts.min() < 1:
            raise ValueError("every query needs at least one score")
        body, starts = _entries(pids, scores)
        mv, ends = memoryview(body), starts.tolist()

        def entries(a, b):  # entries a..b-1 of this chunk; the very first scalar also defines the globals
            if not self.first or a == b:
                return [mv[ends[a]:ends[b]]]
            self.first, k = False, ends[a + 1] - ends[a] - 15
            return [mv[ends[a]:ends[a] + k], _global_prefix(self.module), mv[ends[a] + k + 4:ends[a + 1]],
                    mv[ends[a + 1]:ends[b]]]

        out, pos = [], 0
        for qid, n in zip(np.asarray(qids).tolist(), counts.tolist()):
            if self.done % 1000 == 0 and self.total > 1:
                out.append(b"(")
            out += [_int_bytes(qid), b"}\x94"]
            if n == 1:
                out += entries(pos, pos + 1) + [b"s"]
            else:
                for b in range(pos, pos + n, 1000):
                    out += [b"("] + entries(b, min(b + 1000, pos + n)) + [b"u"]
                if n % 1000 == 0:  # the C pickler opens one more batch after a full one, even if empty
                    out.append(b"(u")
            pos += n
            self.done += 1
            if self.total == 1:
                out.append(b"s")
            elif self.done % 1000 == 0 or self.done == self.total:
                out.append(b"u")
        for p in out:
            self.parts.append(p)
            self.size += len(p)
            if self.size >= _FRAME_TARGET:
                self._frame()

    def _frame(self):
        if self.size:
            self.f.write(b"\x95" + self.size.to_bytes(8, "little"))
            self.f.writelines(self.parts)
        self.parts, self.size = [], 0

    def close(self):
        if self.done != self.total:
            raise ValueError(f"wrote {self.done} queries, announced {self.total}")
        end = b"(u." if self.total > 1 and self.total % 1000 == 0 else b"."  # (as for an inner dict)
        self.parts.append(end)
        self.size += len(end)
        self._frame()


def score_pickle_bytes(scores: dict, module: str = "numpy._core.multiarray") -> bytes:
    """`scores` ({qid: {pid: float}}) through ScorePickleWriter, in memory (for tests)."""
    import io

    buf = io.BytesIO()
    w = ScorePickleWriter(buf, len(scores), module)
    for qid, d in scores.items():
        w.add([qid], [len(d)], np.fromiter(d, np.int64, len(d)), np.fromiter(d.values(), np.float32, len(d)))
    w.close()
    return buf.getvalue()
