"""Readers of the MS MARCO formats: `id \\t text` collections and queries, msmarco-hard-negatives.jsonl,
Hofstätter's triples with scores, and the teacher scores in any of their three formats (see formats.py for the
conventions every reader follows)."""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator

import numpy as np

from marco_lightning.data.formats import Lines, peek
from marco_lightning.data.parquet import is_parquet, iter_parquet
from marco_lightning.data.score_pickle import ScorePickle


def iter_id_text(path, on_error="raise", skipped=None) -> Iterator[tuple[int, str]]:
    """(id, text) from `id \\t text` lines (collection.tsv, queries.*.tsv), or from the first two columns of
    a parquet file or folder (the HF copies: passage_id/passage, query_id/query)."""
    if is_parquet(path):
        for ids, texts in iter_parquet(path, columns=None, num_columns=2):
            yield from zip(ids.tolist(), texts)
        return
    lines = Lines(path, on_error, skipped)
    for n, line in lines:
        id_, tab, text = line.partition(b"\t")
        try:
            if not tab:
                raise ValueError
            yield int(id_), text.decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            lines.bad(n, "expected `integer id <TAB> utf-8 text`", line)


def _int_list(x) -> bool:
    return type(x) is list and set(map(type, x)) <= _INT  # (bool, float and str are refused)


_INT = {int}


def iter_hard_negatives(path, on_error="raise", skipped=None, id_type=int) -> Iterator[tuple]:
    """(qid, positive pids, {system: negative pids, best first}) from msmarco-hard-negatives.jsonl(.gz).
    id_type=str reads the files task=mine writes for BEIR folders (string ids; integers are read as strings)."""
    lines = Lines(path, on_error, skipped)
    ok = _int_list if id_type is int else _id_list
    for n, line in lines:
        try:
            d = json.loads(line)
            qid, pos, neg = d["qid"], d["pos"], d["neg"]
            if not ok([qid]) or not ok(pos) or type(neg) is not dict or not all(ok(v) for v in neg.values()):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            kind = "int" if id_type is int else "id"
            lines.bad(n, f'expected JSON {{"qid": {kind}, "pos": [{kind}, ...], "neg": {{"system": [{kind}, ...], '
                         '...}}', line)
            continue
        if id_type is str:
            qid, pos, neg = str(qid), [str(x) for x in pos], {k: [str(x) for x in v] for k, v in neg.items()}
        yield qid, pos, neg


def _id_list(x) -> bool:
    return type(x) is list and set(map(type, x)) <= {int, str}


def iter_hofstaetter_triples(path, on_error="raise", skipped=None) -> Iterator[tuple[int, int, int, float, float]]:
    """(qid, pid_pos, pid_neg, pos_score, neg_score) from `pos_score \\t neg_score \\t qid \\t pid_pos \\t pid_neg`
    lines (Hofstätter et al.'s bert_cat_ensemble_msmarcopassage_train_scores_ids.tsv)."""
    lines = Lines(path, on_error, skipped)
    for n, line in lines:
        parts = line.split(b"\t")
        try:
            if len(parts) != 5:
                raise ValueError
            pos_score, neg_score = float(parts[0]), float(parts[1])
            if not (math.isfinite(pos_score) and math.isfinite(neg_score)):
                raise ValueError
            yield int(parts[2]), int(parts[3]), int(parts[4]), pos_score, neg_score
        except ValueError:
            lines.bad(n, "expected 5 tab-separated fields `pos_score neg_score qid pid_pos pid_neg`", line)


def iter_teacher_scores(path, on_error="raise", skipped=None) -> Iterator[tuple[int, int, float]]:
    """(qid, pid, score) from a teacher-score file; see `iter_teacher_score_chunks` for the formats."""
    for qids, pids, scores in iter_teacher_score_chunks(path, on_error, skipped):
        yield from zip(qids.tolist(), pids.tolist(), scores.tolist())


def iter_teacher_score_chunks(path, on_error="raise", skipped=None, chunk_size=1 << 20):
    """Aligned (qids int64, pids int64, scores float64) arrays of about `chunk_size` scores each, from
    - the score pickle(.gz) `scores[qid][pid] -> float` (read safely, never with pickle.load: see below),
    - a parquet file or folder with (query_id, passage_id, score) columns (the HF copies),
    - Hofstätter's triples TSV (each line gives a positive and a negative score).
    """
    if is_parquet(path):
        for q, p, s in iter_parquet(path, columns=["query_id", "passage_id", "score"]):
            yield q, p, np.asarray(s, np.float64)
        return
    if peek(path, 1) != b"\x80" and not re.search(r"\.(pkl|pickle)(\.gz)?$", str(path)):  # PROTO starts a pickle
        buf = []
        for qid, pos, neg, s_pos, s_neg in iter_hofstaetter_triples(path, on_error, skipped):
            buf += [(qid, pos, s_pos), (qid, neg, s_neg)]
            if len(buf) >= chunk_size:
                yield chunk_from_rows(buf)
                buf = []
        if buf:
            yield chunk_from_rows(buf)
        return
    parts, n = [], 0
    for qid, pids, scores in ScorePickle(path).blocks():
        parts.append((np.full(len(pids), qid, np.int64), pids, scores))
        n += len(pids)
        if n >= chunk_size:
            yield tuple(np.concatenate(c) for c in zip(*parts))
            parts, n = [], 0
    if parts:
        yield tuple(np.concatenate(c) for c in zip(*parts))


def chunk_from_rows(rows):
    q, p, s = zip(*rows)
    return np.array(q, np.int64), np.array(p, np.int64), np.array(s, np.float64)
