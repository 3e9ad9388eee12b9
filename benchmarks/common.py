"""Shared pieces of the benchmarks: environment, real MS MARCO texts, interleaved timing, machine facts.

Every contender of one comparison runs in the same process, in rounds (A B C, B C A, C A B, ...), so load from
other processes on a shared machine hits all of them; figures are medians over rounds with their min-max, and
ratios are taken round by round (each pair measured side by side) before the median.
"""
from __future__ import annotations

import datetime
import logging
import os
import platform
import random
import statistics
import time
import warnings
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "msmarco-trec-dl"
BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"
THREADS = 2
QUERY_LEN, DOC_LEN = 32, 128  # short passages keep CPU time bounded


def setup() -> None:
    """Same environment for every contender: offline, quiet, 2 torch threads, no tokenizer thread pool."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    # The Rust tokenizer's own threads would compete with torch's for 2 cores (and warn after fork).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric",
                 "sentence_transformers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def backbone_path() -> str:
    from marco_lightning.models import resolve_backbone

    return resolve_backbone(BACKBONE)


# ---------------------------------------------------------------- real texts
def _read_tsv(path) -> dict[str, str]:
    with open(path, encoding="utf-8") as f:
        return dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)


def _read_trec(path, columns: int) -> list[list[str]]:
    with open(path) as f:
        return [fields for fields in (line.split() for line in f) if len(fields) == columns]


def passages(pids=None, limit: int | None = None) -> dict[str, str]:
    out = {}
    with open(DATA / "collection.tsv", encoding="utf-8") as f:
        for line in f:
            pid, _, text = line.rstrip("\n").partition("\t")
            if pids is None or pid in pids:
                out[pid] = text
                if limit and len(out) >= limit:
                    break
    return out


def train_examples(n: int, seed: int = 0) -> list[tuple[str, list[str], list[float]]]:
    """n real (query, [judged-relevant passage, BM25 non-relevant passage], teacher scores) of TREC DL 19/20.

    Teacher scores are random floats: they only have to exist for MarginMSE, their values do not change speed.
    """
    rng, texts = random.Random(seed), passages()  # judged passages outside the five runs' pools have no text
    candidates = []
    for year in ("19", "20"):
        queries = _read_tsv(DATA / f"queries.dl{year}-passage.tsv")
        qrels = defaultdict(dict)
        for qid, _, pid, grade in _read_trec(DATA / f"qrels.dl{year}-passage.txt", 4):
            qrels[qid][pid] = int(grade)
        bm25 = defaultdict(list)
        for qid, _, pid, *_ in _read_trec(DATA / "runs" / f"BM25_dl{year}.trec", 6):
            bm25[qid].append(pid)
        for qid, judged in qrels.items():
            negs = [p for p in bm25[qid] if judged.get(p, 0) < 2 and p in texts]
            candidates += [(queries[qid], pos, negs) for pos, g in judged.items()
                           if g >= 2 and negs and pos in texts]
    picked = [(q, pos, rng.choice(negs)) for q, pos, negs in rng.sample(candidates, n)]
    return [(q, [texts[pos], texts[neg]], [rng.uniform(0, 10), rng.uniform(-5, 5)]) for q, pos, neg in picked]


def rerank_input(num_queries: int, depth: int) -> tuple[dict, dict, dict]:
    """(BM25 run of the first num_queries DL19+DL20 queries cut to depth, queries, passages)."""
    queries = {**_read_tsv(DATA / "queries.dl19-passage.tsv"), **_read_tsv(DATA / "queries.dl20-passage.tsv")}
    run = defaultdict(dict)
    for year in ("19", "20"):
        for qid, _, pid, rank, score, _ in _read_trec(DATA / "runs" / f"BM25_dl{year}.trec", 6):
            if int(rank) <= depth and qid in queries:
                run[qid][pid] = float(score)
    run = dict(list(run.items())[:num_queries])
    texts = passages({p for docs in run.values() for p in docs})
    return run, {q: queries[q] for q in run}, texts


# ---------------------------------------------------------------- timing
def interleaved(contenders: dict, min_rounds: int = 2, max_rounds: int = 5, budget_s: float = 300.0,
                log=print, show=lambda value: f"{value:.3g}") -> dict[str, list]:
    """Call each contender once per round, rotating the order each round (A B C, B C A, ...), for at least
    min_rounds and at most max_rounds rounds, starting another only if it should end within budget_s."""
    names, values, start = list(contenders), defaultdict(list), time.perf_counter()
    for r in range(max_rounds):
        elapsed = time.perf_counter() - start
        if r >= min_rounds and elapsed * (r + 1) / r > budget_s:
            break
        for name in names[r % len(names):] + names[:r % len(names)]:
            with Stopwatch() as sw:
                values[name].append(contenders[name]())
            log(f"    round {r + 1} {name}: {show(values[name][-1])} ({sw.seconds:.0f} s)")
    return dict(values)


def interleaved_steps(steppers: dict, steps: int, min_rounds: int = 2, max_rounds: int = 5,
                      budget_s: float = 300.0, log=print) -> dict[str, list[float]]:
    """Steppers (objects whose step() trains one step and returns its seconds) alternate step by step, in an
    order rotated each step; per round, each one's mean seconds per step."""
    names, values, start = list(steppers), defaultdict(list), time.perf_counter()
    for r in range(max_rounds):
        elapsed = time.perf_counter() - start
        if r >= min_rounds and elapsed * (r + 1) / r > budget_s:
            break
        times = defaultdict(list)
        for k in range(r * steps, (r + 1) * steps):  # the order rotates with every step, across rounds too
            for name in names[k % len(names):] + names[:k % len(names)]:
                times[name].append(steppers[name].step())
        for name in names:
            values[name].append(sum(times[name]) / steps)
        log(f"    round {r + 1}: " + ", ".join(f"{n} {values[n][-1]:.2f} s/step" for n in names))
    return dict(values)


def spread(values) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def ratios(values: dict, a: str, b: str) -> list[float]:
    """a/b round by round: each pair was measured side by side."""
    return [x / y for x, y in zip(values[a], values[b])]


def fmt(values, digits: int = 2) -> str:
    med, lo, hi = spread(values)
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


class Stopwatch:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


# ---------------------------------------------------------------- process memory (/proc, Linux)
def smaps(pid="self") -> dict[str, int]:
    """kB of each field of /proc/PID/smaps_rollup (Rss, Pss, Anonymous, Private_Dirty, ...)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return {key: int(rest.split()[0]) for key, _, rest in (line.partition(":") for line in f)
                if rest.strip().endswith("kB")}


def children(pid="self") -> list[int]:
    """The child processes of every thread of `pid`."""
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


# ---------------------------------------------------------------- machine and versions
def machine() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:  # bf16 units decide whether bf16 autocast speeds a CPU up or is emulated (slower than fp32)
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
        bf16 = ", ".join(f for f in ("amx_bf16", "avx512_bf16") if f in flags) or "none (bf16 is emulated)"
    except (OSError, StopIteration):
        bf16 = "unknown"
    versions = {}
    for dist in ("torch", "transformers", "sentence-transformers", "pytorch-lightning", "lightning",
                 "tokenizers", "faiss-cpu", "numpy"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = "not installed"
    return {"cpu": cpu, "cpu_bf16": bf16, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "versions": versions,
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "load_average": os.getloadavg()}
