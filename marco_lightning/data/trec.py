"""Ranked runs and qrels files, read into and written from the plain dicts `evaluation.compute_metrics` takes:
a run is {qid: {pid: score}}, qrels {qid: {pid: grade}}, ids as strings exactly as written.

Read like every other file (formats.py): plain or gzipped, told apart by their magic bytes, and a malformed line
raises `DataFormatError` naming file:line. Runs are written as TREC lines in trec_eval's order, gzipped when the
path ends in .gz.
"""
from __future__ import annotations

import gzip
import math
from collections import defaultdict
from pathlib import Path

from marco_lightning.data.formats import Lines, iter_qrels
from marco_lightning.errors import ConfigError, DataFormatError

RUN_LINE = ("expected a TREC run line 'qid Q0 pid rank score tag', an MS MARCO run line 'qid<TAB>pid<TAB>rank' "
            "or a top-1000 line 'qid<TAB>pid<TAB>query<TAB>passage'")


def read_qrels(path) -> dict[str, dict[str, int]]:
    """{qid: {pid: grade}} of a TREC, MS MARCO or BEIR qrels file (formats.iter_qrels reads all three)."""
    qrels = defaultdict(dict)
    for qid, pid, grade in iter_qrels(path, id_type=str):
        qrels[qid][pid] = grade
    return dict(qrels)


def read_run(path) -> dict[str, dict[str, float]]:
    """{qid: {pid: score}} of a run in one of the field's formats:
    - TREC `qid Q0 pid rank score tag` (the rank column is ignored, as trec_eval does);
    - MS MARCO `qid \\t pid \\t rank` (score = -rank), or `qid \\t pid \\t rank \\t score` (Pyserini, ColBERT);
    - MS MARCO top-1000 `qid \\t pid \\t query \\t passage` (BM25 candidates in no order: every score 0).
    A passage listed twice for one query is an error."""
    run = defaultdict(dict)
    lines = Lines(path, "raise", None)
    for n, raw in lines:
        try:
            line = raw.decode("utf-8")
            if not line.strip():
                continue
            fields = line.rstrip("\t").split("\t")
            tabbed = len(fields) in (3, 4)
            if not tabbed:
                fields = line.split()
            if tabbed and len(fields) == 4 and _is_number(fields[2]) and _is_number(fields[3]):
                qid, pid, score = fields[0], fields[1], float(fields[3])
            elif tabbed and len(fields) == 4:
                qid, pid, score = fields[0], fields[1], 0.0
                int(qid), int(pid)
            elif tabbed:
                qid, pid, score = fields[0], fields[1], -float(fields[2])
            else:
                qid, _, pid, _, score, _ = fields
                score = float(score)
        except ValueError:  # a wrong field count, a score that is no number, bytes that are not utf-8
            lines.bad(n, RUN_LINE, raw)  # raises
            continue
        if pid in run[qid]:
            raise DataFormatError(f"{lines.path}:{n}: passage {pid} listed twice for query {qid}")
        if math.isnan(score):
            raise DataFormatError(f"{lines.path}:{n}: score is NaN; drop the line or rescore the run")
        run[qid][pid] = score
    return dict(run)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def unranked(docs: dict[str, float]) -> bool:
    """Several candidates, none scored above another: a top-1000 candidate file, not a ranking."""
    return len(docs) > 1 and len(set(docs.values())) == 1


def top_candidates(qid: str, docs: dict[str, float], top_k: int, key: str = "top_k") -> list[str]:
    """The top_k pids of one query's run entry; refuses to cut an unranked list (a top-1000 file) at random."""
    if len(docs) > top_k and unranked(docs):
        raise ConfigError(f"{key}={top_k} would cut query {qid}'s {len(docs)} candidates, but the run ranks none "
                          f"above another (a top-1000 file has no scores): set {key} >= {len(docs)} or use a scored "
                          "run")
    return [pid for pid, _ in sorted(docs.items(), key=lambda kv: -kv[1])[:top_k]]


def trec_order(docs: dict[str, float]) -> list[tuple[str, float]]:
    """One query's (pid, score) in trec_eval's order: score descending, then pid descending as a string ("9" before
    "10"). evaluation.compute_metrics ranks by the same rule, so a written run scores as the dict it came from."""
    if any(math.isnan(s) for s in docs.values()):
        raise ValueError("run has NaN scores")
    return sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)


def write_run(run: dict[str, dict[str, float]], path, tag: str = "marco-lightning") -> None:
    """TREC lines `qid Q0 pid rank score tag` in trec_eval's order; scores as repr, so they read back exactly."""
    if not tag or len(tag.split()) != 1:
        raise ValueError(f"run tag must be one word without whitespace, got {tag!r}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for qid, docs in run.items():
            for rank, (pid, score) in enumerate(trec_order(docs), 1):
                f.write(f"{qid} Q0 {pid} {rank} {float(score)!r} {tag}\n")
