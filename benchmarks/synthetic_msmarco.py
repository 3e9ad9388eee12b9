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
import queue
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"

# The real shape of MS MARCO passage ranking v1 (https://microsoft.github.io/msmarco/, Bajaj et al. 2016):
# passages, training queries, queries with a positive, qrels lines; sentence-transformers' 160M CE scores.
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
    if not 0 <= x < 1 << 31:
        raise ValueError("ids must be in [0, 2^31)")
    return b"K" + bytes([x]) if x < 256 else b"M" + x.to_bytes(2, "little") if x < 65536 else b"J" + x.to_bytes(4, "little")


def _entries(pids: np.ndarray, scores: np.ndarray, floats: bool) -> tuple[np.ndarray, np.ndarray]:
    """All `pid: numpy.float32(score)` (or `pid: float(score)`) entries as one byte array, with each entry's
    start offset."""
    key, width = _int_ops(pids)
    if floats:  # BINFLOAT: a big-endian double
        value = np.empty((len(pids), 9), np.uint8)
        value[:, 0] = ord("G")
        value[:, 1:] = np.asarray(scores, np.float32).astype(">f8").view(np.uint8).reshape(-1, 8)
    else:
        value = np.broadcast_to(_VALUE, (len(pids), 15)).copy()
        value[:, 6:10] = np.asarray(scores, "<f4").view(np.uint8).reshape(-1, 4)
    v = value.shape[1]
    rec = np.zeros((len(pids), 5 + v), np.uint8)
    rec[:, :5] = key
    for w in (2, 3, 5):
        m = width == w
        rec[m, w:w + v] = value[m]
    length = width + v
    starts = np.concatenate([[0], np.cumsum(length)])
    return rec[np.arange(5 + v) < length[:, None]], starts


class ScorePickleWriter:
    """Streams `scores[qid][pid] -> numpy.float32` as pickle protocol 4 into a binary file, query by query, with
    the C pickler's batching: MARK ... SETITEMS per 1000 entries (and an empty one after a full last batch),
    SETITEM for a one-entry dict. `module`: where numpy.float32 scalars are rebuilt from (numpy 1 wrote
    numpy.core.multiarray, numpy 2 numpy._core.multiarray); None writes Python floats instead."""

    def __init__(self, f, num_queries: int, module: str | None = "numpy.core.multiarray"):
        self.f, self.total, self.module = f, num_queries, module
        self.done, self.first = 0, True
        self.parts, self.size = [b"}\x94"], 2  # the outer dict, memo 0; frame body so far
        self.f.write(b"\x80\x04")

    def add(self, qids, counts, pids, scores):
        """Queries `qids` in order, query i with the next counts[i] (pid, score) pairs; every count >= 1."""
        counts = np.asarray(counts, np.int64)
        if len(counts) and counts.min() < 1:
            raise ValueError("every query needs at least one score")
        body, starts = _entries(pids, scores, floats=self.module is None)
        mv, ends = memoryview(body), starts.tolist()

        def entries(a, b):  # entries a..b-1 of this chunk; the very first scalar also defines the globals
            if not self.first or a == b or self.module is None:
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
            self.f.write(b"".join([b"\x95" + self.size.to_bytes(8, "little")] + self.parts))
        self.parts, self.size = [], 0

    def close(self):
        if self.done != self.total:
            raise ValueError(f"wrote {self.done} queries, announced {self.total}")
        end = b"(u." if self.total > 1 and self.total % 1000 == 0 else b"."  # (as for an inner dict)
        self.parts.append(end)
        self.size += len(end)
        self._frame()


def score_pickle_bytes(scores: dict, module: str | None = "numpy._core.multiarray") -> bytes:
    """`scores` ({qid: {pid: float}}) through ScorePickleWriter, in memory (for tests)."""
    import io

    buf = io.BytesIO()
    w = ScorePickleWriter(buf, len(scores), module)
    for qid, d in scores.items():
        w.add([qid], [len(d)], np.fromiter(d, np.int64, len(d)), np.fromiter(d.values(), np.float32, len(d)))
    w.close()
    return buf.getvalue()


# --- the files -----------------------------------------------------------------------------------------------

def write_collection(path: Path, num_passages: int) -> None:
    texts = _texts("collection.tsv")
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(f"{pid}\t{texts[pid % len(texts)]}\n" for pid in range(num_passages))


class _GzipBehind:
    """A gzip file (level 1) compressed in a thread: zlib releases the GIL, so the second core compresses
    while this one generates."""

    def __init__(self, path):
        self.path, self.q, self.error = path, queue.Queue(16), None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            with gzip.open(self.path, "wb", compresslevel=1) as f:
                while (b := self.q.get()) is not None:
                    f.write(b)
        except OSError as e:  # (a full disk) reported by the next write or close
            self.error = e
            while self.q.get() is not None:  # keep taking, so the writer never blocks on a dead thread
                pass

    def write(self, b: bytes):
        if self.error:
            raise self.error
        self.q.put(b)

    def close(self):
        self.q.put(None)
        self.thread.join()
        if self.error:
            raise self.error


def _chunk(rng, has_pos: np.ndarray, num_passages: int, two_pos: float):
    """(positives (n, 2) with -1 for none, system lists (n, 13, 50), systems present (n, 13)) of some queries."""
    n = len(has_pos)
    pos = np.full((n, 2), -1, np.int64)
    pos[has_pos, 0] = rng.integers(0, num_passages, has_pos.sum())
    second = has_pos & (rng.random(n) < two_pos)
    pos[second, 1] = (pos[second, 0] + 1 + rng.integers(0, num_passages - 1, second.sum())) % num_passages
    # Each query's candidate pool: 200 distinct pids (distinct offsets, rotated per query); each system ranks
    # 50 of them (one random choice, rotated per query and system), so systems overlap as the real ones do.
    offsets = np.sort(rng.choice(num_passages, POOL, replace=False))
    pool = (rng.integers(0, num_passages, (n, 1)) + offsets) % num_passages
    pick = rng.permutation(POOL)[:PER_SYSTEM]
    idx = (pick + rng.integers(0, POOL, (n, len(SYSTEMS), 1))) % POOL
    lists = np.take_along_axis(pool[:, None, :], idx, 2)
    # False negatives, as in the real file: dense systems often rank the positive in their top 10.
    qi, si = np.nonzero(has_pos[:, None] & (rng.random((n, len(SYSTEMS))) < 0.3))
    lists[qi, si, rng.integers(0, 10, len(qi))] = pos[qi, 0]
    present = rng.random((n, len(SYSTEMS))) < 0.97
    present[:, 0] = True
    return pos, lists, present


def _scores(rng, pos, lists, present):
    """(counts, pids, float32 scores) of every distinct pid of each line, sorted by pid within a query."""
    n = len(pos)
    x = np.concatenate([pos, np.where(present[:, :, None], lists, -1).reshape(n, -1)], 1)
    x.sort(1)
    keep = (x >= 0) & np.concatenate([np.ones((n, 1), bool), x[:, 1:] != x[:, :-1]], 1)
    row, pids = np.nonzero(keep)[0], x[keep]
    is_pos = (pids == pos[row, 0]) | (pids == pos[row, 1])
    # cross-encoder logits: positives high, negatives spread (a ce_score_margin of 3 drops a realistic share)
    scores = np.where(is_pos, rng.normal(7.0, 2.0, len(pids)), rng.normal(-2.0, 3.5, len(pids))).clip(-11, 11)
    return keep.sum(1), pids, scores.astype(np.float32)


def _int_lists(x: np.ndarray) -> tuple[memoryview, list[int]]:
    """The rows of x (non-negative ints) as `1, 22, 333` texts: one byte buffer and each row's (start, end)."""
    per = x.shape[1]
    x = x.ravel().astype(np.int32)  # ids < 2^31: int32 halves the work
    width = max(1, len(str(int(x.max())))) if len(x) else 1
    digits = (x[:, None] // 10 ** np.arange(width - 1, -1, -1, dtype=np.int32)) % 10 + 48
    ndig = np.searchsorted(10 ** np.arange(1, width, dtype=np.int64), x, side="right") + 1
    tok = np.concatenate([digits.astype(np.uint8), np.full((len(x), 2), (44, 32), np.uint8)], 1)  # ", "
    col = np.arange(width + 2)
    ends = np.concatenate([[0], np.cumsum(ndig + 2)])[::per]
    return memoryview(tok[(col >= width - ndig[:, None])]), ends.tolist()


def _json_lines(qids, pos, lists, present) -> bytes:
    """The lines of msmarco-hard-negatives.jsonl, as `json.dumps` writes them (checked in the tests), with the
    7.8M numbers of a full-size chunk turned into digits by numpy rather than one by one."""
    n, k, _ = lists.shape
    buf, ends = _int_lists(lists.reshape(n * k, -1))
    heads = [f'"{s}": ['.encode() for s in SYSTEMS]
    out = []
    for i, (qid, p, pr) in enumerate(zip(qids.tolist(), pos.tolist(), present.tolist())):
        out.append(b'{"qid": %d, "pos": [%s], "neg": {' % (qid, ", ".join(str(x) for x in p if x >= 0).encode()))
        first = True
        for j in range(k):
            if pr[j]:
                out += [b"" if first else b", ", heads[j], buf[ends[i * k + j]:ends[i * k + j + 1] - 2], b"]"]
                first = False
        out.append(b"}}\n")
    return b"".join(out)


def generate(out: Path, scale: float = 1.0, seed: int = 0, log=print, pickle_module="numpy.core.multiarray") -> dict:
    """Write the five files into `out`; return their paths, the counts and the seconds per file.
    pickle_module=None: the scores as Python floats rather than numpy.float32 (see ScorePickleWriter)."""
    out.mkdir(parents=True, exist_ok=True)
    n, rng, seconds = scaled(scale), np.random.default_rng(seed), {}
    files = {"collection": out / "collection.tsv", "train_queries": out / "queries.train.tsv",
             "train_qrels": out / "qrels.train.tsv", "hard_negatives": out / "msmarco-hard-negatives.jsonl.gz",
             "teacher_scores": out / "cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz"}
    t = time.perf_counter()
    write_collection(files["collection"], n["passages"])
    seconds["collection"] = time.perf_counter() - t
    log(f"  collection.tsv: {n['passages']:,} passages, {seconds['collection']:.0f} s")

    t = time.perf_counter()
    qids = rng.choice(max(MAX_QID, n["queries"]), n["queries"], replace=False)
    has_pos = np.zeros(n["queries"], bool)
    has_pos[rng.permutation(n["queries"])[:n["with_positive"]]] = True
    two_pos = (FULL["qrels"] - FULL["with_positive"]) / FULL["with_positive"]
    query_texts = _texts("queries.train.tsv") + _texts("queries.dev.tsv")
    num_scores = num_qrels = 0
    fh, fs = _GzipBehind(files["hard_negatives"]), _GzipBehind(files["teacher_scores"])
    with open(files["train_queries"], "w", encoding="utf-8") as fq, open(files["train_qrels"], "w") as fr:
        writer = ScorePickleWriter(fs, n["queries"], pickle_module)
        for lo in range(0, n["queries"], CHUNK):
            q, hp = qids[lo:lo + CHUNK], has_pos[lo:lo + CHUNK]
            pos, lists, present = _chunk(rng, hp, n["passages"], two_pos)
            fq.write("".join(f"{qid}\t{query_texts[qid % len(query_texts)]}\n" for qid in q.tolist()))
            qrels = [f"{qid}\t0\t{x}\t1\n" for qid, p in zip(q.tolist(), pos.tolist()) for x in p if x >= 0]
            fr.write("".join(qrels))
            num_qrels += len(qrels)
            fh.write(_json_lines(q, pos, lists, present))
            counts, pids, scores = _scores(rng, pos, lists, present)
            writer.add(q, counts, pids, scores)
            num_scores += len(pids)
        writer.close()
    fh.close()
    fs.close()
    seconds["queries_negatives_scores"] = time.perf_counter() - t
    log(f"  queries, qrels, hard negatives, teacher scores: {n['queries']:,} queries, {num_scores:,} scores, "
        f"{seconds['queries_negatives_scores']:.0f} s")
    counts = {"passages": n["passages"], "queries": n["queries"], "with_positive": n["with_positive"],
              "qrels": num_qrels, "teacher_scores": num_scores}
    return {"files": {k: str(v) for k, v in files.items()}, "counts": counts, "seconds": seconds,
            "bytes": {k: v.stat().st_size for k, v in files.items()}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--scale", type=float, default=0.01, help="fraction of the real MS MARCO shape (1 = full)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(generate(args.out, args.scale, args.seed), indent=2))


if __name__ == "__main__":
    main()
