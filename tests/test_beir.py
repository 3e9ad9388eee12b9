"""Any collection in BEIR format: the folder's checks, mining (vs sentence-transformers' miner), teacher scoring with
resume, training and evaluation on a small folder built here (string ids of every shape)."""
import gzip
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, SHARED_DATA, needs_shared, run_cli

from marco_lightning.data.beir import BeirFolder
from marco_lightning.data.formats import DataFormatError
from marco_lightning.mining import candidate_depth, select_negatives

WORDS = [f"w{i}x" for i in range(300)]


def make_folder(root: Path, n_docs=80, n_train=24, n_test=8, seed=0) -> Path:
    """Documents of random words; each query is a few words of its positive document. Ids: strings of every
    shape (letters, dashes, leading zeros, plain numbers)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "qrels").mkdir(exist_ok=True)
    doc_ids = [f"MED-{i}" if i % 3 == 0 else f"0{i}" if i % 3 == 1 else str(1000 + i) for i in range(n_docs)]
    docs = {d: rng.sample(WORDS, 30) for d in doc_ids}
    with open(root / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": d, "title": " ".join(words[:3]), "text": " ".join(words[3:]),
                                "metadata": {}}) + "\n" for d, words in docs.items())
    queries, splits = {}, {"train": [], "test": []}
    for i in range(n_train + n_test):
        qid, pos = (f"q-{i}" if i % 2 else f"claim_{i}"), doc_ids[i]
        queries[qid] = " ".join(rng.sample(docs[pos], 4) + rng.sample(WORDS, 2))
        splits["train" if i < n_train else "test"].append((qid, pos))
    queries["unjudged"] = "a query no split judges"
    with open(root / "queries.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": q, "text": text, "metadata": {}}) + "\n" for q, text in queries.items())
    for split, rows in splits.items():
        with open(root / "qrels" / f"{split}.tsv", "w") as f:
            f.write("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, d in rows))
    return root


# --- the folder ----------------------------------------------------------------------------------------------

def test_folder_reads_splits_with_string_ids_and_a_fixed_held_out_val(tmp_path):
    folder = BeirFolder(make_folder(tmp_path / "f"))
    train, val, test = folder.qrels("train"), folder.qrels("val"), folder.qrels("test")
    assert len(val) == 3 and len(train) == 21 and len(test) == 8  # ceil(10% of 24) held out
    assert not set(train) & set(val) and "claim_0" in {**train, **val}
    assert BeirFolder(folder.root).qrels("val") == val  # the same draw on every run
    text = dict(folder.corpus())["MED-0"]
    d = json.loads((folder.root / "corpus.jsonl").read_text().splitlines()[0])
    assert text == d["title"] + " " + d["text"]  # BEIR's title + " " + text
    (folder.root / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq-1\t01\t1\n")
    with_dev = BeirFolder(folder.root)
    assert with_dev.qrels("val") == {"q-1": {"01": 1}} and len(with_dev.qrels("train")) == 24


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "queries.jsonl").unlink(), "no queries.jsonl"),
    (lambda r: _append(r / "corpus.jsonl", {"_id": "MED-0", "title": "", "text": "again"}),
     "_id 'MED-0' occurs twice (documents 1 and 81)"),
    (lambda r: _append(r / "corpus.jsonl", {"_id": "MED-0", "title": "", "text": ""}),  # without text, still twice
     "_id 'MED-0' occurs twice (documents 1 and 81)"),
    (lambda r: (r / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nnope\tMED-0\t1\n"),
     "the split has no queries"),
    (lambda r: (r / "corpus.jsonl").write_text('{"_id": "a", "text": 3}\n'), "corpus.jsonl:1: expected a JSON object"),
    (lambda r: _append(r / "queries.jsonl", {"_id": "two words", "text": "x"}), "line 34: _id 'two words' is empty or"),
])
def test_bad_folders_fail_naming_the_file_and_line(tmp_path, damage, message):
    root = make_folder(tmp_path / "f")
    damage(root)
    with pytest.raises((DataFormatError, FileNotFoundError)) as e:
        folder = BeirFolder(root)
        folder.pid_rows, folder.qrels("test")
    assert message in str(e.value)


def test_qrels_naming_unknown_ids_are_counted_and_dropped(tmp_path):
    root = make_folder(tmp_path / "f")
    _append_line(root / "qrels" / "test.tsv", "ghost\tMED-0\t1")
    _append_line(root / "qrels" / "test.tsv", "claim_0\tno-such-doc\t1")
    with pytest.warns(UserWarning, match=r"1 query id\(s\) not in queries.jsonl .*'ghost'.* 1 document id\(s\)"):
        assert len(BeirFolder(root).qrels("test")) == 8


def _with_textless_entries(root: Path) -> Path:
    """make_folder's folder plus a document with neither title nor text (line 5: the rows after it shift), judged
    in the train and test qrels beside real positives, and a query with an empty text, judged in both too."""
    lines = (root / "corpus.jsonl").read_text().splitlines()
    lines.insert(4, json.dumps({"_id": "no-text", "title": "", "text": "  ", "metadata": {}}))
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    _append(root / "queries.jsonl", {"_id": "blank", "text": " "})
    _append_line(root / "qrels" / "train.tsv", "claim_0\tno-text\t1")  # claim_0 keeps MED-0
    _append_line(root / "qrels" / "train.tsv", "blank\tMED-3\t1")
    _append_line(root / "qrels" / "test.tsv", "claim_24\tno-text\t1")
    _append_line(root / "qrels" / "test.tsv", "blank\t01\t1")
    return root


LEFT_OUT = {"documents_without_text": 1, "queries_without_text": 1, "qrels": {
    split: {"queries_without_text": 1, "judgements_of_documents_without_text": 1, "unknown_query_ids": 0,
            "unknown_document_ids": 0} for split in ("train", "test")}}


def test_documents_and_queries_without_text_are_left_out_and_counted(tmp_path):
    """Left out, not refused: every reader of the files skips them alike (the rows of BM25, faiss and the store
    are the rows of BeirFolder.pid_rows), and judgements naming them are dropped and counted per split file."""
    from marco_lightning.data.texts import iter_collection, read_texts
    from marco_lightning.retrieval import collection_ids

    root = _with_textless_entries(make_folder(tmp_path / "f"))
    folder = BeirFolder(root)
    with pytest.warns(UserWarning, match=r"left out 1 document\(s\) with neither title nor text \(e.g. document 5, "
                                         r"_id 'no-text'\)"):
        rows = folder.pid_rows
    assert "no-text" not in rows and len(rows) == 80
    assert list(rows) == [pid for pid, _ in iter_collection(root / "corpus.jsonl")] == \
        list(collection_ids(root / "corpus.jsonl", tmp_path))  # BM25's and the dense index's row -> id
    with pytest.warns(UserWarning, match=r"left out 1 query\(ies\) with an empty text \(e.g. query 34"):
        assert "blank" not in folder.queries
    assert "blank" not in read_texts(root / "queries.jsonl") and len(read_texts(root / "queries.jsonl")) == 33
    with pytest.warns(UserWarning, match=r"test.tsv: dropped the judgements of 1 query\(ies\) without text .*'blank'"
                                         r".* and 1 judgement\(s\) of documents without text"):
        test = folder.qrels("test")
    assert len(test) == 8 and "blank" not in test and "no-text" not in test["claim_24"]
    train = {**folder.qrels("train"), **folder.qrels("val")}
    assert train["claim_0"] == {"MED-0": 1} and "blank" not in train
    assert folder.left_out() == LEFT_OUT


def _hard_negatives(mined: Path) -> list[dict]:
    return [json.loads(x) for x in gzip.decompress((mined / "hard-negatives.jsonl.gz").read_bytes()).splitlines()]


def _append(path, obj):
    _append_line(path, json.dumps(obj))


def _append_line(path, line):
    with open(path, "a") as f:
        f.write(line + "\n")


# --- selection, against sentence-transformers' miner ----------------------------------------------------------

def test_select_negatives_rules():
    ranked, scores = ["p", "a", "b", "c", "d", "e"], [0.9, 0.95, 0.8, 0.7, 0.5, 0.1]
    assert select_negatives(ranked, scores, ["p"], [0.9], depth=3) == ["a", "b", "c"]  # positives never
    skipped = Counter()
    # relative 0.1: kept only below 0.9 - 0.09 = 0.81 (a at 0.95 is a likely false negative)
    assert select_negatives(ranked, scores, ["p"], [0.9], 10, relative_margin=0.1, skipped=skipped) == ["b", "c", "d", "e"]
    assert skipped == {"relative_margin": 1}
    assert select_negatives(ranked, scores, ["p"], [0.9], 10, absolute_margin=0.15) == ["c", "d", "e"]
    assert select_negatives(ranked, scores, ["p"], [0.9], 2, range_min=1, range_max=4) == ["b", "c"]
    # two positives: the margin is taken from the lower one (sentence-transformers' "safe side")
    assert select_negatives(ranked, scores, ["p", "d"], [0.9, 0.5], 10, absolute_margin=0.0) == ["e"]


def test_select_negatives_equals_sentence_transformers_mine_hard_negatives(tmp_path):
    """The same candidates and scores (an ST model's exact search) through ST's miner and through ours."""
    pytest.importorskip("datasets")
    import torch
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    from marco_lightning.models import BiEncoder

    folder = BeirFolder(make_folder(tmp_path / "f", n_docs=80, n_train=30, n_test=2))
    torch.manual_seed(0)
    st = BiEncoder("sentence-transformers/all-MiniLM-L6-v2", pooling="mean",
                   random_init={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                "intermediate_size": 64}).st
    corpus = dict(folder.corpus())
    pairs = [(folder.queries[q], corpus[p]) for q, d in folder.qrels("train").items() for p in d]
    texts = list(corpus.values())
    for kwargs in ({}, {"relative_margin": 0.002}, {"absolute_margin": 0.0, "range_min": 2, "range_max": 30}):
        ours, skipped = {}, Counter()
        q_emb, d_emb = st.encode([q for q, _ in pairs]), st.encode(texts)
        sim = st.similarity(q_emb, d_emb).numpy()
        margins = "absolute_margin" in kwargs or "relative_margin" in kwargs
        pool = candidate_depth(3, kwargs.get("range_min", 0), kwargs.get("range_max"), margins, 1)
        for (q, pos), row in zip(pairs, sim):
            order = np.argsort(-row, kind="stable")[:pool]  # what mine_hard_negatives retrieves, as task=mine cuts
            pos_score = float(row[texts.index(pos)])
            ours[q] = select_negatives([texts[i] for i in order], row[order].tolist(), [pos], [pos_score], 3,
                                       kwargs.get("range_min", 0), kwargs.get("range_max"),
                                       kwargs.get("absolute_margin"), kwargs.get("relative_margin"), skipped)
        assert bool(skipped) == ("absolute_margin" in kwargs or "relative_margin" in kwargs)  # the rule is exercised
        mined = mine_hard_negatives(Dataset.from_dict({"q": [q for q, _ in pairs], "p": [p for _, p in pairs]}),
                                    st, corpus=texts, num_negatives=3, output_format="n-tuple", batch_size=32,
                                    verbose=False, **kwargs)
        assert len(mined) > 5, kwargs
        for row in mined:
            assert [row[f"negative_{i}"] for i in (1, 2, 3)] == ours[row["q"]], kwargs


def test_val_folds_are_disjoint_shares_of_the_training_queries(tmp_path):
    """data.val_fold=f holds out the f-th share of the same seeded permutation: fold 0 is the default val split, the
    folds are disjoint, each trains on every other training query; folds past the last, or with a val split file of
    the folder's own, are refused naming the key."""
    from marco_lightning.errors import ConfigError

    root = make_folder(tmp_path / "f")
    default = BeirFolder(root)
    assert default.num_folds() == 8  # 24 training queries, 3 (ceil 10%) a fold
    everything = {**default.qrels("train"), **default.qrels("val")}
    folds = [BeirFolder(root, val_fold=f) for f in range(8)]
    assert folds[0].qrels("val") == default.qrels("val") and folds[0].qrels("train") == default.qrels("train")
    held = [set(f.qrels("val")) for f in folds]
    assert all(len(h) == 3 for h in held) and set().union(*held) == set(everything)  # 8 x 3 = all 24, disjoint
    for fold, h in zip(folds, held):
        assert set(fold.qrels("train")) == set(everything) - h
    assert "fold 5" in folds[5].describe_split("val")
    with pytest.raises(ConfigError, match="data.val_fold=8: 24 training queries make 8 folds of 3"):
        BeirFolder(root, val_fold=8).qrels("val")
    mined = _mine(root, "data.val_fold=1")  # mining writes fold 0's files, which every fold reads
    assert mined.returncode != 0 and "data.val_fold=1: task=mine mines the training queries once" in mined.stderr
    assert not (root / "mined").exists()
    (root / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq-1\t01\t1\n")
    assert BeirFolder(root).num_folds() == 1
    with pytest.raises(ConfigError, match="data.val_fold=1: .* has qrels/dev.tsv"):
        BeirFolder(root, val_fold=1).qrels("train")


# --- mine -> score -> train -> evaluate -------------------------------------------------------------------------

def _mine(root, *extra):
    return run_cli(["task=mine", "data=beir", f"data.root={root}", "model=tiny", "logger=none", "task.depth=5",
                    "task.run_depth=20", *extra])


def test_mine_writes_the_seed_layout_and_runs_with_the_folders_ids(tmp_path):
    from marco_lightning.data.trec import read_run

    root = make_folder(tmp_path / "f")
    r = _mine(root)
    assert r.returncode == 0, r.stderr[-3000:]
    mined = root / "mined"
    lines = _hard_negatives(mined)
    folder = BeirFolder(root)
    train = folder.qrels("train")
    assert [d["qid"] for d in lines] == list(train)  # training queries only: never the held-out val ones
    runs = {(split, system): read_run(mined / "runs" / f"{split}.{system}.trec")
            for split in ("train", "val", "test") for system in ("bm25", "all-MiniLM-L6-v2")}
    for (split, _), run in runs.items():
        assert set(run) == set(folder.qrels(split)) and all(len(docs) >= 20 for docs in run.values())
    for d in lines:
        assert d["pos"] == list(train[d["qid"]]) and set(d["neg"]) == {"bm25", "all-MiniLM-L6-v2"}
        for system, negs in d["neg"].items():
            # without a margin: the system's own top 5 after the positives, in its order
            ranked = [p for p, _ in sorted(runs["train", system][d["qid"]].items(), key=lambda kv: -kv[1])]
            assert negs == [p for p in ranked if p not in d["pos"]][:5]
    manifest = json.loads((mined / "manifest.json").read_text())
    assert manifest["systems"]["bm25"]["test_ndcg@10"] > 0.8  # queries are words of their documents
    assert manifest["queries_without_judgements"] == 1
    before = (mined / "hard-negatives.jsonl.gz").stat().st_mtime_ns
    assert _mine(root).returncode == 0  # the same settings again: runs reused, the file left untouched
    assert (mined / "hard-negatives.jsonl.gz").stat().st_mtime_ns == before

    # with a relative margin, each negative scores below min(positive) - 70% of it, on the system's own scores
    assert _mine(root, "task.relative_margin=0.7").returncode == 0  # random words: only a big margin bites
    manifest = json.loads((mined / "manifest.json").read_text())
    assert manifest["selection"]["relative_margin"] == 0.7 and sum(manifest["skipped"]["bm25"].values()) > 0
    bm25 = read_run(mined / "runs" / "train.bm25.trec")
    for d in _hard_negatives(mined):
        floor = min(bm25[d["qid"]][p] for p in d["pos"])
        assert all(bm25[d["qid"]][n] <= floor - abs(floor) * 0.7 for n in d["neg"]["bm25"])


def test_score_resumes_after_a_kill_and_training_and_evaluation_run(tmp_path):
    """task=score after task=mine; a torn file resumes to the same scores; mnrl and margin_mse train on the
    folder; evaluate retrieves the test split with the folder's ids and ir-measures."""
    import torch

    from marco_lightning.models import CrossEncoder

    root = make_folder(tmp_path / "f")
    assert _mine(root, "task.systems=[bm25]").returncode == 0
    torch.manual_seed(0)
    CrossEncoder("sentence-transformers/all-MiniLM-L6-v2", random_init={
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}).save(
        tmp_path / "teacher")
    score = ["task=score", "data=beir", f"data.root={root}", f"task.teacher={tmp_path / 'teacher'}", "logger=none"]
    r = run_cli(score)
    assert r.returncode == 0, r.stderr[-3000:]
    path = root / "mined" / "teacher-scores.tsv"
    full = path.read_text().splitlines()
    lines = _hard_negatives(root / "mined")
    assert len(full) == sum(len(set(d["pos"]) | set(d["neg"]["bm25"])) for d in lines)
    # a kill mid-line: the torn line is cut and scoring resumes after the last complete one
    path.write_text("\n".join(full[:40]) + "\n" + full[40][:7])
    meta = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**meta, "complete": False}))
    r = run_cli(score)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "scored now" in r.stdout
    again = path.read_text().splitlines()
    assert [x.split("\t")[:2] for x in again] == [x.split("\t")[:2] for x in full]
    np.testing.assert_allclose([float(x.split("\t")[2]) for x in again], [float(x.split("\t")[2]) for x in full],
                               atol=1e-5)
    # another teacher over these scores: refused, nothing lost
    r = run_cli([*score[:3], "task.teacher=someone/else", "logger=none"])
    assert r.returncode != 0 and "task.force=true" in r.stderr and path.read_text().splitlines() == again
    # ... and with task.force=true but a teacher that cannot be loaded: stopped before any file changes
    meta = path.with_suffix(".json").read_text()
    r = run_cli([*score[:3], f"task.teacher={tmp_path / 'nothing-here'}", "task.force=true", "logger=none"])
    assert r.returncode != 0 and "cannot be loaded" in r.stderr
    assert path.read_text().splitlines() == again and path.with_suffix(".json").read_text() == meta

    fast = [x for x in FAST if not x.startswith("data.val_top_k")]
    for loss in ("mnrl", "margin_mse_cos"):
        r = run_cli(["data=beir", f"data.root={root}", f"loss={loss}", *fast, "logger=none",
                     f"hydra.run.dir={tmp_path / loss}"])
        assert r.returncode == 0, r.stderr[-3000:]
        metrics = json.loads((tmp_path / loss / "metrics.json").read_text())
        assert set(metrics["after"]) >= {"ndcg@10", "recall@100"} and metrics["mining"]["selection"]["depth"] == 5
        val_run = (tmp_path / loss / "val_run.trec").read_text().split("\n")[0].split()
        assert val_run[0] in BeirFolder(root).qrels("val") and val_run[2] in BeirFolder(root).pid_rows

    r = run_cli(["task=evaluate", "task.mode=retrieve", "data=beir", f"data.root={root}", "task.split=test",
                 f"task.model_path={tmp_path / 'mnrl' / 'final_model'}", "logger=none",
                 f"hydra.run.dir={tmp_path / 'eval'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_equals_sentence_transformers(root, tmp_path / "mnrl" / "final_model", tmp_path / "eval")


def test_a_folder_with_textless_entries_mines_trains_and_evaluates(tmp_path):
    """Collection A's case: a document with neither title nor text (judged), a query with an empty text: task=mine
    runs and its manifest counts them, the document is never a candidate or a negative (bm25 and the dense
    model), training and full-retrieval evaluation run on the folder."""
    from marco_lightning.data.trec import read_run

    root = _with_textless_entries(make_folder(tmp_path / "f"))
    r = _mine(root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "left out 1 document(s) with neither title nor text" in r.stderr
    mined = root / "mined"
    manifest = json.loads((mined / "manifest.json").read_text())
    assert manifest["left_out"] == LEFT_OUT and manifest["splits"]["test"]["queries"] == 8
    runs = sorted((mined / "runs").glob("*.trec"))
    assert {p.name for p in runs} >= {"train.bm25.trec", "test.all-MiniLM-L6-v2.trec"}
    for path in runs:
        run = read_run(path)
        assert "blank" not in run and not any("no-text" in docs for docs in run.values()), path
    for d in _hard_negatives(mined):
        assert d["qid"] != "blank" and "no-text" not in d["pos"]
        assert all("no-text" not in negs for negs in d["neg"].values())

    fast = [x for x in FAST if not x.startswith("data.val_top_k")]
    r = run_cli(["data=beir", f"data.root={root}", "loss=mnrl", *fast, "logger=none", f"hydra.run.dir={tmp_path / 't'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert set(metrics["after"]) >= {"ndcg@10"} and metrics["mining"]["left_out"] == LEFT_OUT
    r = run_cli(["task=evaluate", "task.mode=retrieve", "data=beir", f"data.root={root}", "task.split=test",
                 f"task.model_path={tmp_path / 't' / 'final_model'}", "logger=none", f"hydra.run.dir={tmp_path / 'e'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    run = read_run(tmp_path / "e" / "run.trec")
    assert set(run) == set(BeirFolder(root).qrels("test")) and not any("no-text" in docs for docs in run.values())
    assert "ndcg@10" in json.loads((tmp_path / "e" / "metrics.json").read_text())


def _assert_equals_sentence_transformers(root, model_dir, eval_dir):
    """metrics.json of task=evaluate == sentence-transformers' encode + exact search + ir-measures."""
    from sentence_transformers import SentenceTransformer

    from marco_lightning.data.trec import read_run
    from marco_lightning.evaluation import compute_metrics

    folder = BeirFolder(root)
    qrels = folder.qrels("test")
    st = SentenceTransformer(str(model_dir), device="cpu")
    pids, texts = zip(*folder.corpus())
    sims = st.similarity(st.encode([folder.queries[q] for q in qrels]), st.encode(list(texts))).numpy()
    ref = {q: {pids[i]: float(row[i]) for i in np.argsort(-row)[:100]} for q, row in zip(qrels, sims)}
    ours = json.loads((eval_dir / "metrics.json").read_text())
    want = compute_metrics(qrels, ref, rel_level=1, measures=("ndcg@10", "recall@100"))
    assert ours["ndcg@10"] == pytest.approx(want["ndcg@10"], abs=2e-3)
    assert ours["recall@100"] == pytest.approx(want["recall@100"], abs=2e-3)
    assert set(read_run(eval_dir / "run.trec")) == set(qrels)


TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def test_teachers_score_as_sentence_transformers_does(tmp_path):
    """A cross-encoder teacher's score is its raw logit (as the published MS MARCO teacher scores are), a
    bi-encoder teacher's is its similarity: what sentence-transformers' CrossEncoder.predict (no activation) and
    SentenceTransformer.similarity give."""
    import torch
    from sentence_transformers import CrossEncoder as STCrossEncoder
    from sentence_transformers import SentenceTransformer

    from marco_lightning.inference import score
    from marco_lightning.models import BiEncoder, CrossEncoder
    from marco_lightning.tasks.score import load_teacher

    folder = BeirFolder(make_folder(tmp_path / "f"))
    corpus = dict(folder.corpus())
    queries, docs = list(folder.queries.values())[:6] * 2, list(corpus.values())[:12]
    torch.manual_seed(0)
    CrossEncoder("sentence-transformers/all-MiniLM-L6-v2", random_init=TINY).save(tmp_path / "ce")
    BiEncoder("sentence-transformers/all-MiniLM-L6-v2", pooling="mean", random_init=TINY).save(tmp_path / "bi")
    ce, bi = load_teacher(str(tmp_path / "ce")), load_teacher(str(tmp_path / "bi"))
    assert (ce.kind, bi.kind) == ("cross", "bi")
    want = STCrossEncoder(str(tmp_path / "ce"), activation_fn=torch.nn.Identity()).predict(list(zip(queries, docs)))
    np.testing.assert_allclose(score(ce, queries, docs, 4), want, atol=1e-5)
    st = SentenceTransformer(str(tmp_path / "bi"))
    want = st.similarity_pairwise(st.encode(queries), st.encode(docs)).numpy()
    np.testing.assert_allclose(score(bi, queries, docs, 4), want, atol=1e-5)


def test_training_before_mining_says_what_to_run(tmp_path):
    root = make_folder(tmp_path / "f")
    r = run_cli(["data=beir", f"data.root={root}", *FAST, "logger=none", f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode != 0 and "task=mine data=beir" in r.stderr
    r = run_cli(["task=score", "data=beir", f"data.root={root}", "logger=none", f"hydra.run.dir={tmp_path / 's'}"])
    assert r.returncode != 0 and "task=mine" in r.stderr


def test_dense_encoding_resumes_after_a_kill(tmp_path, monkeypatch):
    import torch
    from conftest import compose
    from hydra.utils import instantiate

    from marco_lightning import retrieval

    root = make_folder(tmp_path / "f")
    torch.manual_seed(0)
    model = instantiate(compose(["model=tiny"]).model).eval()
    monkeypatch.setattr(retrieval, "CHUNK", 16)
    calls = {"n": 0}
    real = retrieval.encode

    def dies_on_third_chunk(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(retrieval, "encode", dies_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        retrieval.encode_collection(model, root / "corpus.jsonl", tmp_path / "cache")
    assert json.loads((tmp_path / "cache" / "progress.json").read_text()) == {"done": 32}
    ids, emb = retrieval.encode_collection(model, root / "corpus.jsonl", tmp_path / "cache")
    assert calls["n"] == 3 + 3  # the remaining 48 passages only
    pids, texts = zip(*BeirFolder(root).corpus())
    assert list(ids) == list(pids)
    np.testing.assert_allclose(emb, real(model, list(texts), 64), atol=1e-5)


@needs_shared
def test_bm25_on_scifact_reaches_the_published_level(tmp_path):
    """bm25s on SciFact test: 0.686 nDCG@10 in bm25s' own report; BEIR's Elasticsearch BM25: 0.665."""
    from marco_lightning.evaluation import compute_metrics
    from marco_lightning.mining import BM25

    folder = BeirFolder(SHARED_DATA / "scifact")
    qrels = folder.qrels("test")
    ranked = BM25(folder.corpus_path, tmp_path / "bm25").search({q: folder.queries[q] for q in qrels}, 100)
    metrics = compute_metrics(qrels, {q: dict(zip(*r)) for q, r in ranked.items()}, rel_level=1,
                              measures=("ndcg@10",))
    assert 0.66 <= metrics["ndcg@10"] <= 0.70


def test_mine_with_task_compile_compiles_the_model_system(tmp_path, monkeypatch):
    """task.compile=true reaches the `model` system of task=mine (the compiling itself: tests/test_inference)."""
    from conftest import compose

    from marco_lightning import mining
    from marco_lightning.tasks.mine import load_system

    root = make_folder(tmp_path / "f")
    seen = []
    monkeypatch.setattr(mining, "compile_model", lambda model: seen.append(model) or model)  # as mining.dense calls it
    overrides = ["task=mine", "data=beir", f"data.root={root}", "model=tiny", "task.device=cpu"]
    load_system("model", compose(overrides), tmp_path / "a")
    assert seen == []
    system = load_system("model", compose([*overrides, "task.compile=true"]), tmp_path / "b")
    assert seen == [system.model] and system.model.kind == "bi"


# --- task.refit: train + val for the epochs val chose ------------------------------------------------------------

def test_refit_trains_on_train_and_val_for_the_epochs_val_chose(tmp_path):
    """The run picks its best epoch by val; a fresh model then trains on the training + val queries (a store of its
    own) for that many epochs and is final_model/; metrics.json keeps the run's numbers under "selection"."""
    from conftest import compose
    from sentence_transformers import SentenceTransformer

    from marco_lightning.data.datamodule import store_path
    from marco_lightning.data.sources import build_source
    from marco_lightning.data.store import Store
    from marco_lightning.tasks.train import main

    root = make_folder(tmp_path / "f")
    r = _mine(root, "task.systems=[bm25]")
    assert r.returncode == 0, r.stderr[-3000:]
    mined_val = [json.loads(x) for x in gzip.decompress((root / "mined" / "hard-negatives.val.jsonl.gz").read_bytes())
                 .splitlines()]
    folder = BeirFolder(root)
    assert [d["qid"] for d in mined_val] == list(folder.qrels("val"))  # the val queries', by the same rule
    fast = [x for x in FAST if not x.startswith("data.val_top_k")]
    cfg = compose(["data=beir", f"data.root={root}", "loss=mnrl", *fast, "logger=none", "trainer.max_epochs=2",
                   "task.refit=true", "task.keep_start=false"], tmp_path / "run")  # the refit, however val moved
    metrics = main(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    selection, refit = saved["selection"], saved["refit"]
    assert "after" not in saved and set(selection["after"]) >= {"ndcg@10", "recall@100"} and "before" in selection
    assert "seconds" not in saved and selection["seconds"]["epochs"] == 2  # the time split is the selection run's
    best = int(selection["best_checkpoint"].split("epoch")[1].split("-")[0])  # checkpoints/epoch{E}-step{S}.ckpt
    assert refit["epochs"] == selection["epochs"] == best + 1 and refit["schedule_epochs"] == 2
    assert refit["val"] is None and "no held-out val number" in refit["note"]
    assert refit["steps"] == refit["epochs"] * 3  # 21 training + 3 val queries, batches of 8
    # the refit's store: the training queries and the val queries; the run's: the training queries only
    rows = {q: i for i, q in enumerate(folder.queries)}
    val_rows = {rows[q] for q in folder.qrels("val")}
    refit_store = Store(refit["store"])
    run_store = Store(store_path(cfg.paths.cache_dir, build_source(cfg.data), cfg.negatives))
    assert refit_store.path != run_store.path
    assert set(refit_store.train.qids.tolist()) == set(run_store.train.qids.tolist()) | val_rows
    assert not val_rows & set(run_store.train.qids.tolist()) and refit["train_queries"] == 24
    # final_model/ is the refit, and its card says it has no val number
    assert SentenceTransformer(str(tmp_path / "run" / "final_model"), device="cpu").encode(["a query"]).shape[0] == 1
    card = (tmp_path / "run" / "final_model" / "README.md").read_text()
    assert "no held-out validation number" in card and "task.refit" in card
    assert "negatives mined by task=mine)\n" in card and "teacher scores" not in card  # MNRL: no teacher


def test_refit_is_skipped_when_val_keeps_the_starting_model(tmp_path, training_makes_it_worse):
    """task.refit with a run that made val worse (scripted: 0.9 before training, 0.1 after): final_model/ is the
    start (task.keep_start), no refit trains, metrics.json has the run's numbers at the top."""
    from conftest import compose

    from marco_lightning.tasks.train import main

    root = make_folder(tmp_path / "f")
    assert _mine(root, "task.systems=[bm25]").returncode == 0
    fast = [x for x in FAST if not x.startswith("data.val_top_k")]
    metrics = main(compose(["data=beir", f"data.root={root}", "loss=mnrl", *fast, "logger=none", "task.refit=true"],
                           tmp_path / "run"))
    assert metrics["final_model"] == "start" and metrics["improved"] is False
    assert "refit" not in metrics and "selection" not in metrics and metrics["best_checkpoint"]
    assert not (tmp_path / "run" / "refit").exists() and (tmp_path / "run" / "trained_model").is_dir()


def test_refit_store_takes_the_queries_of_qrels_dev(tmp_path):
    """With qrels/dev.tsv as the val split, the refit store trains on its queries too (and its own store path)."""
    from conftest import compose

    from marco_lightning.data.datamodule import store_path
    from marco_lightning.data.sources import build_source
    from marco_lightning.data.store import Store, prepare

    root = make_folder(tmp_path / "f")
    folder = BeirFolder(root)
    _append(root / "queries.jsonl", {"_id": "dev-1", "text": folder.queries["claim_0"]})  # words of MED-0
    (root / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\ndev-1\tMED-0\t1\n")
    assert _mine(root, "task.systems=[bm25]").returncode == 0
    cfg = compose(["data=beir", f"data.root={root}", "loss=mnrl"], tmp_path)
    source = build_source(cfg.data)
    refit = source.for_refit()
    paths = {s: store_path(cfg.paths.cache_dir, s, cfg.negatives) for s in (source, refit)}
    assert paths[source] != paths[refit]
    store = Store(prepare(refit, dict(cfg.negatives), paths[refit]))
    dev = list(BeirFolder(root).queries).index("dev-1")
    assert dev in store.train.qids.tolist() and len(store.train.qids) == 24 + 1  # all of train.tsv, and dev.tsv's
    assert dev not in Store(prepare(source, dict(cfg.negatives), paths[source])).train.qids.tolist()


@pytest.mark.parametrize("overrides,message", [
    (["data=sample"], "data=sample's validation queries are not training data"),  # MS MARCO: TREC DL is eval data
    (["data=sample", "loss=margin_mse_cos"], "no teacher scores"),
    (["data=sample", "trainer.val_check_interval=0.5"], "trainer.val_check_interval=1.0"),
])
def test_refit_is_refused_where_it_cannot_work(overrides, message, tmp_path):
    from conftest import compose

    from marco_lightning.errors import ConfigError
    from marco_lightning.tasks.train import main

    loss = [] if any(o.startswith("loss=") for o in overrides) else ["loss=mnrl"]
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        main(compose([*FAST, "logger=none", "task.refit=true", *loss, *overrides,
                      f"paths.cache_dir={tmp_path}/never"], tmp_path))
    assert not (tmp_path / "never").exists()  # refused before any store is prepared


def test_refit_without_the_val_negatives_says_how_to_mine_them(tmp_path):
    """task.refit needs task=mine's hard-negatives.val.jsonl.gz: the refusal names the command for this folder."""
    import re

    from conftest import compose

    from marco_lightning.data.sources import build_source
    from marco_lightning.errors import ConfigError

    root = make_folder(tmp_path / "f")
    cfg = compose(["data=beir", f"data.root={root}", "loss=mnrl"], tmp_path)
    with pytest.raises(ConfigError, match=re.escape(f"python run.py task=mine data=beir data.root={root}`")):
        build_source(cfg.data).for_refit()


def test_beir_mnrl_refreshes_its_negatives_by_the_rule_it_mined_them_with(tmp_path):
    """negatives.refresh under beir_mnrl keeps the recipe's negative: the model's own top-1 under task=mine's
    margins and range (not negatives.refresh's default, a random one of the top 5 under NV-Retriever's rule)."""
    from conftest import compose

    mine = compose(["task=mine", "data=beir", "data.root=x"], tmp_path).task
    cfg = compose(["experiment=beir_mnrl", "data.root=x", "negatives.refresh.every_n_epochs=1"], tmp_path)
    refresh = cfg.negatives.refresh
    assert (refresh.depth, cfg.negatives.num_per_system) == (1, 1)
    assert (refresh.relative_margin, refresh.absolute_margin) == (mine.relative_margin, mine.absolute_margin)
    assert [refresh.range_min, refresh.range_max] == list(mine.range)


def test_beir_mnrl_trains_every_pair_on_the_models_own_top_negative(tmp_path):
    """experiment=beir_mnrl is sentence-transformers' mined path: a row per (training query, positive) pair, each
    with the top-1 negative task=mine wrote for the model= bi-encoder (named by its backbone), never BM25's."""
    from conftest import compose
    from hydra.utils import instantiate

    from marco_lightning.config import system_name
    from marco_lightning.data.beir import IdRows
    from marco_lightning.data.sources import build_source

    root = make_folder(tmp_path / "f")
    with open(root / "qrels" / "train.tsv", "a") as f:  # two queries with a second positive: two rows each
        f.write("q-1\t1002\t1\nq-3\t04\t1\n")
    assert _mine(root).returncode == 0
    cfg = compose(["experiment=beir_mnrl", *FAST, f"data.root={root}"], tmp_path)
    model = instantiate(cfg.model)
    name = system_name(cfg.model.backbone)
    dm = instantiate(cfg.datamodule, _partial_=True)(source=build_source(cfg.data), negatives=cfg.negatives,
                                                     collator=model.collator(), with_teacher=False)
    dm.prepare_data()
    dm.setup()
    train = set(BeirFolder(root).qrels("train"))
    mined = {d["qid"]: d for d in _hard_negatives(root / "mined") if d["qid"] in train}
    assert len(dm.train_set) == sum(len(d["pos"]) for d in mined.values()) > len(mined)
    assert any(d["neg"]["bm25"][0] != d["neg"][name][0] for d in mined.values())  # the choice shows
    ids = IdRows(BeirFolder(root))
    for epoch in (0, 1):
        drawn = {}
        for row in range(len(dm.train_set)):
            qid, pids, _ = dm.train_set.draw(epoch, row)
            q, (pos, neg) = ids.query_names[qid], [ids.passage_names[p] for p in pids]
            assert neg == mined[q]["neg"][name][0], (epoch, q)
            drawn.setdefault(q, []).append(pos)
        assert {q: sorted(p) for q, p in drawn.items()} == {q: sorted(d["pos"]) for q, d in mined.items()}


def test_candidates_with_folds_choose_by_the_mean_val_over_the_folds(tmp_path, scripted_val):
    """task.folds=2: each candidate also trains holding out fold 1 (in candidates/<name>/folds/1/: that fold's
    queries validated on the train split's mined run, every other training query trained, fold 0's with the
    negatives task=mine wrote for the val queries); the value is the mean over the folds. Scripted val: 'a' 0.8 on
    fold 0 and 0.2 on fold 1 (mean 0.5), 'b' 0.6 on both: fold 0 alone would pick 'a', the folds pick 'b', and
    final_model/ is b's fold-0 model."""
    import filecmp

    from conftest import compose
    from omegaconf import OmegaConf

    from marco_lightning.data.datamodule import store_path
    from marco_lightning.data.sources import build_source
    from marco_lightning.data.store import Store
    from marco_lightning.data.trec import read_run
    from marco_lightning.tasks.report import find_runs
    from marco_lightning.tasks.train import main

    scripted = {("a", False): 0.8, ("a", True): 0.2, ("b", False): 0.6, ("b", True): 0.6}
    # the start: 0.1, below every candidate (kept by none)
    scripted_val(lambda run: 0.1, lambda run: scripted["a" if "candidates/a" in run else "b", "folds/1" in run])
    root = make_folder(tmp_path / "f")
    assert _mine(root, "task.systems=[bm25]").returncode == 0
    fast = [x for x in FAST if not x.startswith("data.val_top_k")]
    out = tmp_path / "run"
    metrics = main(compose(["data=beir", f"data.root={root}", "loss=mnrl", *fast, "logger=none", "task.folds=2",
                            "task.candidates={a:[],b:['optimizer.lr=1e-4']}"], out))
    table = metrics["candidates"]
    assert table["a"]["val_folds"] == [0.8, 0.2] and table["b"]["val_folds"] == [0.6, 0.6]
    assert table["a"]["val"] == pytest.approx(0.5) and metrics["chosen"] == "b"
    fold1 = BeirFolder(root, val_fold=1)
    for name in ("a", "b"):
        run = out / "candidates" / name / "folds" / "1"
        assert set(read_run(run / "val_run.trec")) == set(fold1.qrels("val"))  # fold 1's queries, the train run's
        config = OmegaConf.load(run / "config.yaml")
        store = Store(store_path(config.paths.cache_dir, build_source(config.data), config.negatives))
        rows = {q: i for i, q in enumerate(fold1.queries)}  # fold 0's val queries train here: 24 - fold 1's 3
        assert config.data.val_fold == 1 and set(store.train.qids.tolist()) == {rows[q] for q in fold1.qrels("train")}
    files = [p.name for p in (out / "candidates" / "b" / "final_model").iterdir() if p.is_file()]
    _, differ, _ = filecmp.cmpfiles(out / "final_model", out / "candidates" / "b" / "final_model", files, shallow=False)
    assert differ == ["README.md"] and "mean over 2 folds" in (out / "final_model" / "README.md").read_text()
    assert find_runs([out]) == [out / "candidates" / "a", out / "candidates" / "b"]  # the folds are no rows


@pytest.mark.parametrize("overrides, dev, message", [
    (["task.folds=9"], False, "task.folds=9: 8 folds of data.val_fraction=0.1 fit"),
    (["task.folds=2"], True, "has qrels/dev.tsv, a val split of its own"),
    (["task.folds=2", "loss=margin_mse_cos"], False, "no teacher scores"),
])
def test_folds_are_refused_before_anything_trains(overrides, dev, message, tmp_path):
    from conftest import compose

    from marco_lightning.errors import ConfigError
    from marco_lightning.tasks.train import main

    root = make_folder(tmp_path / "f")
    if dev:
        (root / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq-1\t01\t1\n")
    loss = [] if any(o.startswith("loss=") for o in overrides) else ["loss=mnrl"]
    with pytest.raises(ConfigError, match=message):
        main(compose(["data=beir", f"data.root={root}", *loss, *FAST, "logger=none", *overrides,
                      "task.candidates={a:[],b:['optimizer.lr=1e-4']}"], tmp_path / "run"))
    assert not (tmp_path / "run" / "candidates").exists()


def test_beir_choose_cross_validates_the_mined_negative_against_none(tmp_path):
    """experiment=beir_choose is beir_mnrl twice, with its top-1 mined negative and without, chosen on 3 folds."""
    from conftest import compose

    from marco_lightning.tasks.choose import candidate_configs, check_folds, fold_configs

    root = make_folder(tmp_path / "f")
    cfg = compose(["experiment=beir_choose", f"data.root={root}"], tmp_path / "run")
    configs = candidate_configs(cfg)
    # mined: every one of the num_negatives=1 the row carries (null); in_batch: none of it in the loss
    assert {n: c.loss.num_hard_negatives for n, c in configs.items()} == {"mined": None, "in_batch": 0}
    assert cfg.num_negatives == 1
    assert all(c.train_rows == "positive" and list(c.negatives.systems) == ["model"] for c in configs.values())
    assert check_folds(cfg) == 3
    assert [r.data.val_fold for r in fold_configs(configs["mined"], 3)] == [0, 1, 2]
