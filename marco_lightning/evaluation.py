"""Ranking evaluation: `compute_metrics`, the one function from (qrels, run) to metrics (ir-measures), used by
validation, task=evaluate, task=report and mining alike. It takes plain dicts, qrels {qid: {pid: grade}} and a run
{qid: {pid: score}}, and reads no file: data/trec.py reads and writes run and qrels files.

Conventions (the ones behind published MS MARCO / TREC DL numbers):
- Every query in the qrels counts; a query with no candidates scores 0 (trec_eval -c, MS MARCO's official
  script). Queries that are only in the run are ignored.
- Ties are broken as trec_eval does: score descending, then docid descending as a *string* ("9" before "10").
  We resolve ties ourselves before calling ir-measures, because its providers disagree (pytrec_eval breaks ties
  by docid descending, its MS MARCO provider behind RR@k ascending).
- `ndcg@K` uses graded gains (negative grades count as 0); `mrr`, `recall` and `map` count a document relevant
  when grade >= rel_level: 1 for MS MARCO dev (binary qrels), 2 for TREC DL.
"""

import math
import re

import ir_measures

from marco_lightning.errors import ConfigError

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
        raise ConfigError(
            f"unknown measure {name!r} (task.measures): use ndcg, mrr, map, optionally with @K (ndcg@10), or recall@K"
        )
    return m[1], int(m[2]) if m[2] else None


# ------------------------------------------------------------------------------------------- ir-measures


def _ranked(docs: dict[str, float]) -> list[tuple[str, float]]:
    """trec_eval's order: score descending, then docid descending as a string (data/trec.write_run's order too)."""
    if any(math.isnan(s) for s in docs.values()):
        raise ValueError("run has NaN scores")
    return sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)


def compute_metrics(
    qrels: dict[str, dict[str, int]],
    run: dict[str, dict[str, float]],
    rel_level: int = 2,
    measures=DEFAULT_MEASURES,
) -> dict[str, float]:
    """Mean over all qrels queries of each measure, e.g. {'ndcg@10': 0.5058, ...}."""
    return {name: sum(values.values()) / len(values)
            for name, values in per_query_metrics(qrels, run, rel_level, measures).items()}


def per_query_metrics(
    qrels: dict[str, dict[str, int]],
    run: dict[str, dict[str, float]],
    rel_level: int = 2,
    measures=DEFAULT_MEASURES,
) -> dict[str, dict[str, float]]:
    """Each measure's value for every qrels query ({'ndcg@10': {qid: value}}): what significance tests pair up."""
    if not qrels or rel_level < 1:
        raise ConfigError(
            f"need non-empty qrels and rel_level >= 1, got {len(qrels)} queries, rel_level={rel_level}: point the "
            "qrels (task.qrels, data.val_qrels) at a file of judgements, and set the rel_level (task.rel_level, "
            "data.val_rel_level) to the lowest relevant grade"
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
    values = {name: dict.fromkeys(qrels, 0.0) for name in measures}  # a query the run misses scores 0
    for metric in ir_measures.iter_calc(list(ours), qrels, untied):
        if metric.query_id in qrels:
            values[ours[metric.measure]][metric.query_id] = metric.value
    return values


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
