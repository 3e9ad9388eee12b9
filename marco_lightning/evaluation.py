"""Ranking evaluation: TREC files and `compute_metrics`, the one function from (qrels, run) to metrics (ir-measures),
used by validation, task=evaluate, task=report and mining alike.

Conventions (the ones behind published MS MARCO / TREC DL numbers):
- Every query in the qrels counts; a query with no candidates scores 0 (trec_eval -c, MS MARCO's official
  script). Queries that are only in the run are ignored.
- Ties are broken as trec_eval does: score descending, then docid descending as a *string* ("9" before "10").
  We resolve ties ourselves before calling ir-measures, because its providers disagree (pytrec_eval breaks ties
  by docid descending, its MS MARCO provider behind RR@k ascending).
- `ndcg@K` uses graded gains (negative grades count as 0); `mrr`, `recall` and `map` count a document relevant
  when grade >= rel_level: 1 for MS MARCO dev (binary qrels), 2 for TREC DL.
"""

import gzip
import math
import re
from collections import defaultdict
from pathlib import Path

import ir_measures

DEFAULT_MEASURES = ("ndcg@10", "mrr@10", "recall@100")
_IR_MEASURES = {
    "ndcg": lambda rel: ir_measures.nDCG,
    "mrr": lambda rel: ir_measures.RR(rel=rel),
    "recall": lambda rel: ir_measures.R(rel=rel),
    "map": lambda rel: ir_measures.AP(rel=rel),
}


def parse_measure(name: str) -> tuple[str, int | None]:
    """'ndcg@10' -> ('ndcg', 10); 'map' -> ('map', None)."""
    m = re.fullmatch(r"(ndcg|mrr|recall|map)(?:@([1-9]\d*))?", name)
    if m is None or (m[1] == "recall" and not m[2]):
        raise ValueError(
            f"unknown measure {name!r}: use ndcg, mrr, map, optionally with @K (ndcg@10), or recall@K"
        )
    return m[1], int(m[2]) if m[2] else None


# ---------------------------------------------------------------------------------------------- TREC files


def _open(path, mode="rt"):
    return (
        gzip.open(path, mode, encoding="utf-8")
        if str(path).endswith(".gz")
        else open(path, mode, encoding="utf-8")
    )


def read_qrels(path) -> dict[str, dict[str, int]]:
    """{qid: {pid: grade}} of a TREC, MS MARCO or BEIR qrels file (data.formats.iter_qrels reads all three)."""
    from marco_lightning.data.formats import iter_qrels

    qrels = defaultdict(dict)
    for qid, pid, grade in iter_qrels(path, id_type=str):
        qrels[qid][pid] = grade
    return dict(qrels)


def read_run(path) -> dict[str, dict[str, float]]:
    """A run, plain or .gz, in one of the field's formats:
    - TREC `qid Q0 pid rank score tag` (the rank column is ignored, as trec_eval does);
    - MS MARCO `qid \\t pid \\t rank` (score = -rank), or `qid \\t pid \\t rank \\t score` (Pyserini, ColBERT);
    - MS MARCO top-1000 `qid \\t pid \\t query \\t passage` (BM25 candidates in no order: every score 0)."""
    run = defaultdict(dict)
    with _open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").rstrip("\t").split("\t")
            tabbed = len(fields) in (3, 4)
            if not tabbed:
                fields = line.split()
            try:
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
            except ValueError:
                raise ValueError(f"{path}:{lineno}: expected a TREC run line 'qid Q0 pid rank score tag', an MS MARCO "
                                 f"run line 'qid<TAB>pid<TAB>rank' or a top-1000 line 'qid<TAB>pid<TAB>query<TAB>"
                                 f"passage', got {line[:200]!r}")
            if pid in run[qid]:
                raise ValueError(f"{path}:{lineno}: passage {pid} listed twice for query {qid}")
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
        raise ValueError(f"{key}={top_k} would cut query {qid}'s {len(docs)} candidates, but the run ranks none above "
                         f"another (a top-1000 file has no scores): set {key} >= {len(docs)} or use a scored run")
    return [pid for pid, _ in sorted(docs.items(), key=lambda kv: -kv[1])[:top_k]]


def _ranked(docs: dict[str, float]) -> list[tuple[str, float]]:
    """trec_eval's order: score descending, then docid descending as a string."""
    if any(math.isnan(s) for s in docs.values()):
        raise ValueError("run has NaN scores")
    return sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)


def write_run(run: dict[str, dict[str, float]], path, tag: str = "marco-lightning") -> None:
    if not tag or len(tag.split()) != 1:
        raise ValueError(f"run tag must be one word without whitespace, got {tag!r}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with _open(path, "wt") as f:
        for qid, docs in run.items():
            for rank, (pid, score) in enumerate(_ranked(docs), 1):
                f.write(f"{qid} Q0 {pid} {rank} {float(score)!r} {tag}\n")


# ------------------------------------------------------------------------------------------- ir-measures


def compute_metrics(
    qrels: dict[str, dict[str, int]],
    run: dict[str, dict[str, float]],
    rel_level: int = 2,
    measures=DEFAULT_MEASURES,
) -> dict[str, float]:
    """Mean over all qrels queries of each measure, e.g. {'ndcg@10': 0.5058, ...}."""
    if not qrels or rel_level < 1:
        raise ValueError(
            f"need non-empty qrels and rel_level >= 1, got {len(qrels)} queries, rel_level={rel_level}"
        )
    ours = {}
    for name in measures:
        kind, k = parse_measure(name)
        m = _IR_MEASURES[kind](rel_level)
        ours[m @ k if k else m] = name
    # Distinct scores in trec_eval's order, so that every ir-measures provider ranks the same way.
    untied = {
        q: {pid: float(len(docs) - i) for i, (pid, _) in enumerate(_ranked(docs))} for q, docs in run.items()
    }
    totals = dict.fromkeys(measures, 0.0)
    for metric in ir_measures.iter_calc(list(ours), qrels, untied):
        if metric.query_id in qrels:
            totals[ours[metric.measure]] += metric.value
    return {name: total / len(qrels) for name, total in totals.items()}  # missing queries add 0


# ---------------------------------------------------------------------------------------------- tables


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table, one row per run: {'BM25': {'ndcg@10': 0.5058}} -> '| run | ndcg@10 |...'."""
    cols = list(dict.fromkeys(c for r in rows.values() for c in r))
    lines = ["| run | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, r in rows.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{float(r[c]):.4f}" if c in r else "-" for c in cols) + " |"
        )
    return "\n".join(lines)
