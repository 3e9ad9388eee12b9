"""prepare + Store on small hand-written files in the real MS MARCO formats; every expected selection below
was worked out by hand from sentence-transformers' MNRL recipe (UKPLab/sentence-transformers,
examples/training/ms_marco/train_bi-encoder_mnrl.py; comments show the walk)."""
import gzip
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_shared

from marco_lightning.data import store as store_mod
from marco_lightning.data.formats import DataFormatError
from marco_lightning.data.sources import MarcoSource
from marco_lightning.data.store import Store

NAN = float("nan")
pytestmark = pytest.mark.filterwarnings("ignore:ids without text")
# Teacher scores by hand. q1's positive 10 has 9.0: with margin 3 the threshold is 6.0, so pids 1 (7.0),
# 4 (6.5) and 0 (6.1) are false-negative suspects. q2's pid 2 has no score. q3: positive 12 at 3.0.
SCORES = {1: {10: 9.0, 1: 7.0, 2: 5.0, 3: 5.9, 4: 6.5, 5: 1.0, 6: 0.0, 7: 2.0, 8: 3.0, 9: 4.0, 0: 6.1, 17: 1.0},
          2: {11: 5.0, 1: 1.0, 3: 0.5},
          3: {12: 3.0, 5: 1.0},
          99: {1: 1.0}}  # a query that is not trained on
HARD_NEGATIVES = [
    {"qid": 1, "pos": [10], "neg": {"bm25": [10, 1, 2, 3, 4, 5, 6], "B": [2, 3, 7, 8, 9, 0], "C": [13, 1, 17]}},
    {"qid": 2, "pos": [11], "neg": {"D": [3], "bm25": [1, 2, 11]}},  # D first in the line, but last in the file
    {"qid": 3, "pos": [], "neg": {"B": [12, 5]}},                   # positive only in the qrels
    {"qid": 4, "pos": [14], "neg": {}},                             # no negatives
    {"qid": 5, "pos": [], "neg": {"bm25": [1, 2]}},                 # no positive anywhere
    {"qid": 6, "pos": [15], "neg": {"bm25": [1]}},                  # no query text
]


def prepare(data: dict, negatives: dict, out, **kwargs):
    """A store from the files of `data` (MS MARCO formats), as task=prepare builds it from data=..."""
    return store_mod.prepare(MarcoSource(**data), negatives, out, **kwargs)


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    # passages 0..19 except 13 (a negative without text); one with non-ASCII text
    (d / "collection.tsv").write_text("".join(f"{p}\tpassage {p}\n" for p in range(20) if p != 13)
                                      .replace("passage 5", "Wi-Fi (/ËwaÉª faÉª/) ünïcode"), encoding="utf-8")
    (d / "queries.train.tsv").write_text("3\tthird query\n1\tfirst query\n2\tsecond query\n5\tfifth\n4\tfourth\n")
    (d / "queries.dev.tsv").write_text("99\tdev query\n1\tfirst query again\n")  # 1 is a duplicate: first wins
    (d / "qrels.train.tsv").write_text("1\t0\t10\t1\n2\t0\t11\t1\n3\t0\t12\t1\n4\t0\t14\t1\n6\t0\t15\t1\n7\t0\t16\t1\n")
    with gzip.open(d / "hn.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(x) + "\n" for x in HARD_NEGATIVES)
    with gzip.open(d / "ce.pkl.gz", "wb") as f:  # as written from CrossEncoder.predict: numpy float32 values
        pickle.dump({q: {p: np.float32(s) for p, s in ps.items()} for q, ps in SCORES.items()}, f, protocol=4)
    with gzip.open(d / "ce-floats.pkl.gz", "wb") as f:
        pickle.dump(SCORES, f, protocol=3)
    return {"collection": str(d / "collection.tsv"),
            "queries": [str(d / "queries.train.tsv"), str(d / "queries.dev.tsv")],
            "train_qrels": str(d / "qrels.train.tsv"), "hard_negatives": str(d / "hn.jsonl.gz"),
            "teacher_scores": str(d / "ce.pkl.gz"), "train_queries": None}


def negs(systems, k=2, margin=None, **kw):
    return {"systems": systems, "num_per_system": k, "ce_score_margin": margin, **kw}


def lists(store):
    t = store.train
    return {int(q): ([int(p) for p in t.positives(i)[0]], [int(p) for p in t.negatives(i)[0]])
            for i, q in enumerate(t.qids)}


def scores_of(store):
    t = store.train
    return {int(q): (t.positives(i)[1].tolist(), t.negatives(i)[1].tolist()) for i, q in enumerate(t.qids)}


def same(a, b):  # equality with NaN == NaN
    return len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b))


def test_selection_without_margin(data, tmp_path):
    with pytest.warns(UserWarning, match="ids without text"):
        path = prepare(data, negs(["bm25", "B", "C"]), tmp_path / "store")
    s = Store(path)
    # q1: bm25 [10 pos, 1 take, 2 take] | B [2 taken, 3 take, 7 take] | C [13 no text, 1 taken, 17 take]
    # q2: bm25 [1, 2] (D not chosen) | q3: B [12 is q3's qrels positive, 5 take] | q4: none | q5: no positive
    assert lists(s) == {1: ([10], [1, 2, 3, 7, 17]), 2: ([11], [1, 2]), 3: ([12], [5])}
    sc = scores_of(s)
    assert sc[1] == ([9.0], [7.0, 5.0, np.float32(5.9), 2.0, 1.0])
    assert same(sc[2][1], [1.0, NAN]) and sc[3] == ([3.0], [1.0])  # q2's pid 2 has no teacher score
    m = s.manifest
    assert (m["num_passages"], m["num_queries"], m["num_train_queries"]) == (19, 6, 3)
    assert m["negatives_per_system"] == {"bm25": 4, "B": 3, "C": 1}
    assert m["num_teacher_scores"] == 3 + 7  # 3 positives, 8 negatives of which one unscored
    assert m["systems_in_file"] == ["bm25", "B", "C", "D"]
    assert m["dropped"] == {"duplicate_queries_id": 1, "negative_is_positive": 2, "negative_without_text": 1,
                            "query_not_in_hard_negatives": 1, "query_without_negative": 1,
                            "query_without_positive": 1, "query_without_text": 1}
    assert m["inputs"]["hard_negatives"] == data["hard_negatives"] and m["negatives"]["num_per_system"] == 2


def test_selection_with_margin(data, tmp_path):
    with pytest.warns(UserWarning, match="ids without text"):
        s = Store(prepare(data, negs(["bm25", "B", "C"], margin=3.0), tmp_path / "store"))
    # q1 (threshold 6.0): bm25 [10 pos, 1 fails, 2 take, 3 take] | B [2, 3 taken, 7 take, 8 take]
    #                     | C [13 no text, 1 fails, 17 take]
    # q2 (threshold 2.0): bm25 [1 take, 2 unscored: dropped, 11 pos] | q3 (threshold 0.0): B [12 pos, 5 fails]
    assert lists(s) == {1: ([10], [2, 3, 7, 8, 17]), 2: ([11], [1])}
    m = s.manifest
    assert m["negatives_per_system"] == {"bm25": 3, "B": 2, "C": 1}
    assert m["dropped"]["negative_above_margin"] == 3 and m["dropped"]["negative_without_teacher_score"] == 1
    assert m["dropped"]["query_without_negative"] == 2 and m["num_teacher_scores"] == 2 + 6


def test_python_float_pickle_gives_the_same_store(data, tmp_path):
    a = Store(prepare(data, negs(["bm25", "B", "C"], margin=3.0), tmp_path / "a"))
    data = dict(data, teacher_scores=data["teacher_scores"].replace("ce.pkl.gz", "ce-floats.pkl.gz"))
    b = Store(prepare(data, negs(["bm25", "B", "C"], margin=3.0), tmp_path / "b"))
    assert lists(a) == lists(b) and scores_of(a) == scores_of(b)


def test_system_order_all_and_subsets(data, tmp_path):
    # "all" = file order of first sight (bm25, B, C, D): q2's D comes after bm25 although its line lists D first
    s = Store(prepare(data, negs("all"), tmp_path / "all"))
    assert lists(s)[2] == ([11], [1, 2, 3])
    assert s.manifest["negatives"]["systems"] == "all" and set(s.manifest["negatives_per_system"]) == {"bm25", "B", "C", "D"}
    # chosen order is kept: B before bm25, one each -> q1: B [2] then bm25 [10 pos, 1]
    s = Store(prepare(data, negs(["B", "bm25"], k=1), tmp_path / "sub"))
    assert lists(s)[1] == ([10], [2, 1])
    with pytest.raises(ValueError, match=r"unknown system\(s\) \['bm25-typo'\].*has: \['bm25', 'B', 'C', 'D'\]"):
        prepare(data, negs(["bm25-typo"]), tmp_path / "bad")


def test_train_queries_and_require_positive(data, tmp_path):
    d = Path(data["collection"]).parent
    (d / "subset.tsv").write_text("2\tsecond query\n5\tfifth\n")
    s = Store(prepare(dict(data, train_queries=str(d / "subset.tsv")), negs(["bm25"]), tmp_path / "a"))
    assert lists(s) == {2: ([11], [1, 2])} and s.manifest["dropped"]["query_not_in_train_queries"] == 4
    # without require_positive, q5 (no positive) is kept for its negatives
    s = Store(prepare(dict(data, train_queries=str(d / "subset.tsv")), negs(["bm25"], require_positive=False),
                      tmp_path / "b"))
    assert lists(s) == {2: ([11], [1, 2]), 5: ([], [1, 2])}
    # ... and trains on them (distillation): one negative stands in as column 0, rotating, never twice in a row
    from marco_lightning.data.sampling import TrainDataset

    train = TrainDataset(s, num_negatives=1, seed=0, with_teacher=False)
    i = s.train.qids.tolist().index(5)
    draws = [train.draw(epoch, i)[1].tolist() for epoch in range(2)]
    assert sorted(draws[0]) == [1, 2] and draws[1] == draws[0][::-1]


def test_text_tables(data, tmp_path):
    s = Store(prepare(data, negs(["bm25"]), tmp_path / "store"))
    assert s.passages.ids.tolist() == [p for p in range(20) if p != 13]
    assert s.passages.text(5) == "Wi-Fi (/ËwaÉª faÉª/) ünïcode" and s.passages.texts([19, 0]) == ["passage 19", "passage 0"]
    assert s.queries.ids.tolist() == [1, 2, 3, 4, 5, 99] and s.queries.text(1) == "first query"
    assert 13 not in s.passages and 12 in s.passages and len(s.passages) == 19
    with pytest.raises(KeyError, match=r"no text for id\(s\) \[13\]"):
        s.passages.texts([1, 13])
    assert isinstance(s.passages.ids, np.memmap) and isinstance(s.train.neg_pids, np.memmap)
    clone = pickle.loads(pickle.dumps(s))  # by path: DataLoader workers never copy the blobs
    assert len(pickle.dumps(s)) < 500 and clone.passages.text(7) == "passage 7"


def test_reuse_and_force(data, tmp_path):
    out = tmp_path / "store"
    prepare(data, negs(["bm25"]), out)
    created = json.loads((out / "manifest.json").read_text())["created"]
    (out / "marker").write_text("x")
    assert prepare(data, negs(["bm25"]), out) == out and (out / "marker").exists()  # same settings: reused
    with pytest.raises(FileExistsError, match="force=True"):
        prepare(data, negs(["B"]), out)
    prepare(data, negs(["B"]), out, force=True)
    assert not (out / "marker").exists() and Store(out).manifest["negatives"]["systems"] == ["B"]
    assert created  # (the manifest records when it was made)


def test_failed_prepare_leaves_nothing_and_keeps_the_old_store(data, tmp_path, monkeypatch):
    out = tmp_path / "store"
    prepare(data, negs(["bm25"]), out)
    before = lists(Store(out))
    real = store_mod.write_text_table

    def fail_on_queries(pairs, folder, name, dropped=None):
        if name == "queries":
            raise RuntimeError("disk full")
        return real(pairs, folder, name, dropped)

    monkeypatch.setattr(store_mod, "write_text_table", fail_on_queries)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(data, negs(["B"]), out, force=True)
    with pytest.raises(RuntimeError):
        prepare(data, negs(["B"]), tmp_path / "fresh")
    monkeypatch.undo()
    assert lists(Store(out)) == before  # the previous store is intact
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "store"]  # no partial folder left behind


def test_bad_line_stops_prepare_with_file_and_line(data, tmp_path):
    with open(data["hard_negatives"].replace(".gz", ""), "w") as f:
        f.write(json.dumps(HARD_NEGATIVES[0]) + "\n" + '{"qid": 2, "pos": [11], "neg": {"bm25": [1, "x"]}}\n')
    with pytest.raises(DataFormatError, match=r"hn\.jsonl:2: expected JSON"):
        prepare(dict(data, hard_negatives=data["hard_negatives"].replace(".gz", "")), negs(["bm25"]), tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_killed_prepare_never_looks_complete(data, tmp_path):
    # SIGKILL in the middle of prepare (after the passages are written): no store, and Store() says why.
    out, ready = tmp_path / "store", tmp_path / "ready"
    code = f"""
import sys, time, json
from marco_lightning.data import store
from marco_lightning.data.sources import MarcoSource
real = store.write_text_table
def slow(pairs, folder, name, dropped=None):
    n = real(pairs, folder, name, dropped)
    open({str(ready)!r}, "w").close()
    time.sleep(60)
    return n
store.write_text_table = slow
store.prepare(MarcoSource(**json.loads(sys.argv[1])), {{"systems": ["bm25"], "num_per_system": 2}}, {str(out)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(data)], cwd=Path(__file__).parents[1])
    try:
        for _ in range(300):
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert ready.exists(), "prepare did not get to the passages"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="no data store"):
        Store(out)
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".store.partial")]
    assert partial and not (partial[0] / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        Store(partial[0])
    prepare(data, negs(["bm25"]), out)  # the next prepare cleans up the dead one's folder
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".store.partial")]


def test_config_errors(data, tmp_path):
    with pytest.raises(ValueError, match="data.collection is required"):
        prepare(dict(data, collection=None), negs(["bm25"]), tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="data.train_qrels: .*nope.tsv does not exist"):
        prepare(dict(data, train_qrels="nope.tsv"), negs(["bm25"]), tmp_path / "s")
    with pytest.raises(ValueError, match="negatives.num_per_system"):
        prepare(data, negs(["bm25"], k=0), tmp_path / "s")
    with pytest.raises(ValueError, match="negatives.ce_score_margin needs teacher scores"):
        prepare(dict(data, teacher_scores=None), negs(["bm25"], margin=3.0), tmp_path / "s")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a data store"):
        prepare(data, negs(["bm25"]), tmp_path / "other")


def test_no_training_query_left(data, tmp_path):
    s = Store(prepare(data, negs(["D"], k=1, margin=100.0), tmp_path / "s"))  # every negative fails
    assert len(s.train) == 0 and s.manifest["num_train_queries"] == 0 and len(s.passages) == 19


@needs_shared
def test_real_collection_round_trip(tmp_path):
    # the 28,606 real MS MARCO passages of TREC DL (with their mojibake), against a plain split of the file
    path = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "msmarco-trec-dl" / "collection.tsv"
    expected = dict(line.rstrip("\n").split("\t", 1) for line in path.open(encoding="utf-8"))
    from marco_lightning.data.msmarco import iter_id_text
    from marco_lightning.data.store import TextTable, write_text_table

    assert write_text_table(iter_id_text(path), tmp_path, "passages") == len(expected) == 28606
    table = TextTable(tmp_path, "passages")
    ids = [int(i) for i in expected][::97]
    assert table.texts(ids) == [expected[str(i)] for i in ids]
    assert table.nbytes(ids).tolist() == [len(expected[str(i)].encode("utf-8")) for i in ids]


def test_pairs_without_teacher_score_are_named_before_training(data, tmp_path):
    from marco_lightning.data.sampling import TrainDataset

    s = Store(prepare(data, negs(["bm25"]), tmp_path / "s"))  # q2's negative 2 has no score (SCORES above)
    with pytest.raises(ValueError, match=r"^1 training pairs .* \(query 2, passage 2\)"):
        TrainDataset(s, num_negatives=1, seed=0, with_teacher=True)
    TrainDataset(s, num_negatives=1, seed=0, with_teacher=False)  # MNRL needs no teacher: fine
