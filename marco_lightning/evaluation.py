"""Ranking evaluation: TREC files, ir-measures scoring, and a torchmetrics Metric that gives the same numbers.

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
import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.functional.retrieval import (
    retrieval_normalized_dcg,
    retrieval_recall,
    retrieval_reciprocal_rank,
)
from torchmetrics.utilities import dim_zero_cat

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
    """TREC `qid Q0 pid grade`, MS MARCO `qid \\t 0 \\t pid \\t 1` or BEIR `query-id \\t corpus-id \\t score`."""
    qrels = defaultdict(dict)
    with _open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split()
            if lineno == 1 and fields[:2] == ["query-id", "corpus-id"]:
                continue  # a BEIR qrels header
            try:
                qid, pid, grade = fields if len(fields) == 3 else (fields[0], *fields[2:])  # BEIR: no Q0 column
                grade = int(grade)
            except ValueError:
                raise ValueError(
                    f"{path}:{lineno}: expected 'qid Q0 pid grade' (TREC) or 'query-id<TAB>corpus-id<TAB>score' "
                    f"(BEIR), grade an integer, got {line!r}"
                )
            if qrels[qid].setdefault(pid, grade) != grade:
                raise ValueError(f"{path}:{lineno}: ({qid}, {pid}) judged twice with different grades")
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


# ------------------------------------------------------------------------------------- torchmetrics Metric


def _docid_string_key(pids: np.ndarray) -> np.ndarray:
    """Integer key that orders non-negative ids as their decimal strings would ('9' > '10', '12' < '120')."""
    if len(pids) and (pids.min() < 0 or pids.max() >= 10**17):
        raise ValueError("passage ids must lie in [0, 1e17) to be tie-broken like trec_eval")
    digits = 1 + sum((pids >= 10**d).astype(np.int64) for d in range(1, 17))
    return pids * 10 ** (17 - digits) * 20 + digits  # left-aligned digits, then length: a prefix sorts first


class RerankingMetrics(Metric):
    """The numbers of `compute_metrics`, from (score, qid, pid) rows gathered across DDP ranks.

    `qrels` should hold exactly the queries being validated: every qrels query counts, with or without rows.
    Duplicate (qid, pid) rows (DistributedSampler padding) are dropped, keeping the first.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, qrels: dict[str, dict[str, int]], rel_level: int = 2, measures=DEFAULT_MEASURES, **kwargs
    ):
        super().__init__(**kwargs)
        if not qrels or rel_level < 1:
            raise ValueError(
                f"need non-empty qrels and rel_level >= 1, got {len(qrels)} queries, rel_level={rel_level}"
            )
        self.rel_level, self.measures = rel_level, {name: parse_measure(name) for name in measures}
        try:
            judged = [(int(q), int(p), g) for q, docs in qrels.items() for p, g in docs.items()]
        except ValueError as e:
            raise ValueError(f"RerankingMetrics needs integer query and passage ids in the qrels: {e}")
        self.query_ids = np.array(sorted({int(q) for q in qrels}), dtype=np.int64)
        self.judged = np.array(judged, dtype=np.int64).reshape(-1, 3)  # qid, pid, grade
        for state in ("preds", "qids", "pids"):
            self.add_state(state, default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, qids: torch.Tensor, pids: torch.Tensor) -> None:
        if not (preds.ndim == qids.ndim == pids.ndim == 1 and len(preds) == len(qids) == len(pids)):
            raise ValueError(
                f"preds, qids, pids must be 1-D of equal length, got {preds.shape}, {qids.shape}, {pids.shape}"
            )
        if not preds.is_floating_point() or qids.is_floating_point() or pids.is_floating_point():
            raise ValueError("preds must be float scores; qids and pids integer ids")
        self.preds.append(preds.detach().double())  # double: the exact scores a run file would hold
        self.qids.append(qids.detach().long())
        self.pids.append(pids.detach().long())

    def compute(self) -> dict[str, torch.Tensor]:
        if len(self.preds):  # a list of batches, or one tensor after a DDP sync
            scores, qids, pids = (dim_zero_cat(s).cpu().numpy() for s in (self.preds, self.qids, self.pids))
        else:  # no rows: every query scores 0
            scores, qids, pids = np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64)
        if np.isnan(scores).any():
            raise ValueError("RerankingMetrics got NaN scores")
        # One id per (qid, pid) pair over judged docs and rows: gives each row its grade, finds duplicate rows
        # and the judged docs that no row covers.
        nj = len(self.judged)
        all_q, all_p = np.concatenate([self.judged[:, 0], qids]), np.concatenate([self.judged[:, 1], pids])
        _, qi = np.unique(all_q, return_inverse=True)  # dense ids, so that a pair fits in one int64 key
        pvals, pi = np.unique(all_p, return_inverse=True)
        _, pair_id = np.unique(qi * len(pvals) + pi, return_inverse=True)
        judged_id, row_id = pair_id[:nj], pair_id[nj:]
        grade = np.zeros(nj + len(qids), np.int64)
        grade[judged_id] = self.judged[:, 2]
        covered = np.zeros(nj + len(qids), bool)
        covered[row_id] = True
        unranked = self.judged[~covered[judged_id] & (self.judged[:, 2] > 0)]
        unranked = unranked[np.argsort(unranked[:, 0], kind="stable")]

        _, keep = np.unique(row_id, return_index=True)  # first of each duplicated row
        scores, qids, pids, row_id = scores[keep], qids[keep], pids[keep], row_id[keep]
        order = np.lexsort((-_docid_string_key(pids), -scores, qids))  # by qid, then trec_eval's order
        qids, grades = qids[order], grade[row_id[order]]

        lo, hi = np.searchsorted(qids, self.query_ids, "left"), np.searchsorted(qids, self.query_ids, "right")
        ulo, uhi = (np.searchsorted(unranked[:, 0], self.query_ids, side) for side in ("left", "right"))
        totals = dict.fromkeys(self.measures, 0.0)
        for i in range(len(self.query_ids)):
            values = self._query(
                torch.from_numpy(grades[lo[i] : hi[i]]), torch.from_numpy(unranked[ulo[i] : uhi[i], 2])
            )
            for name, value in values.items():
                totals[name] += value
        n = len(self.query_ids)
        return {
            name: torch.tensor(total / n, dtype=torch.float32, device=self.device)
            for name, total in totals.items()
        }

    def _query(self, ranked: torch.Tensor, unranked: torch.Tensor) -> dict[str, float]:
        """Measures of one query: `ranked` are the grades of its candidates in rank order, `unranked` the
        positive grades of judged docs among no candidate (they still count for ideal DCG and recall)."""
        n = len(ranked)
        if n == 0:
            return dict.fromkeys(self.measures, 0.0)
        # Candidates get scores n..1; then zero-score fillers so that unranked docs, at -inf, sit below every
        # cutoff (torchmetrics ignores docs scored <= 0 for RR and recall, but not for nDCG).
        max_k = max((k or 0) for _, k in self.measures.values())
        pad = max(0, max_k - n) + len(unranked)
        preds = torch.cat(
            [
                torch.arange(n, 0, -1, dtype=torch.float64),
                torch.zeros(pad, dtype=torch.float64),
                torch.full((len(unranked),), -torch.inf, dtype=torch.float64),
            ]
        )
        gains = torch.cat([ranked.clamp(min=0), torch.zeros(pad, dtype=torch.long), unranked])
        relevant = (gains >= self.rel_level).long()
        out = {}
        for name, (kind, k) in self.measures.items():
            if kind == "ndcg":
                out[name] = retrieval_normalized_dcg(preds, gains, top_k=k or n + len(unranked))
            elif kind == "mrr":
                out[name] = retrieval_reciprocal_rank(preds, relevant, top_k=k)
            elif kind == "recall":
                out[name] = retrieval_recall(preds, relevant, top_k=k)
            else:  # trec_eval's AP divides by all relevant docs; torchmetrics' by the retrieved ones
                hits = relevant[: min(n, k or n)].double()
                precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
                out[name] = (precision * hits).sum() / max(relevant.sum().item(), 1)
        return {name: float(v) for name, v in out.items()}


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
