"""The streaming readers, against hand-written files in the real formats (expected values written by hand)."""
import gzip
import json
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_shared

from marco_lightning.data.beir import beir_text, iter_jsonl
from marco_lightning.data.formats import DataFormatError, iter_qrels
from marco_lightning.data.msmarco import (
    iter_hard_negatives,
    iter_hofstaetter_triples,
    iter_id_text,
    iter_teacher_score_chunks,
    iter_teacher_scores,
)
from marco_lightning.data.texts import iter_collection

SCIFACT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "scifact"


def write(path: Path, text: str, gz=False) -> Path:
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


# --- TSV / qrels / jsonl / triples -----------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
def test_id_text_plain_and_gzip(tmp_path, gz):
    # a tab inside the text is kept; \r before \n is dropped; a blank line is ignored; mojibake is just text
    f = write(tmp_path / "c.tsv", "7\tfirst passage\r\n\n3\tWi-Fi (/ËwaÉª/)\tand more\n12\t\n", gz)
    assert list(iter_id_text(f)) == [(7, "first passage"), (3, "Wi-Fi (/ËwaÉª/)\tand more"), (12, "")]


def test_id_text_bad_line_names_file_and_line(tmp_path):
    f = write(tmp_path / "q.tsv", "1\tok\n2\tfine\nabc\tnot an id\n4 no tab\n5\tlast\n")
    with pytest.raises(DataFormatError, match=r"q\.tsv:3: expected `integer id <TAB> utf-8 text`"):
        list(iter_id_text(f))
    skipped = Counter()
    with pytest.warns(UserWarning, match="skipped 2 malformed"):
        rows = list(iter_id_text(f, on_error="skip", skipped=skipped))
    assert rows == [(1, "ok"), (2, "fine"), (5, "last")]
    assert skipped[str(f)] == 2


def test_id_text_invalid_utf8(tmp_path):
    f = tmp_path / "q.tsv"
    f.write_bytes(b"1\tok\n2\t\xff\xfe bad\n")
    with pytest.raises(DataFormatError, match=r"q\.tsv:2:"):
        list(iter_id_text(f))


def test_truncated_gzip(tmp_path):
    data = gzip.compress(b"".join(b"%d\tpassage number %d\n" % (i, i) for i in range(5000)))
    (tmp_path / "c.tsv.gz").write_bytes(data[:len(data) // 2])
    with pytest.raises(DataFormatError, match=r"c\.tsv\.gz:\d+: truncated or corrupt gzip"):
        list(iter_id_text(tmp_path / "c.tsv.gz"))
    data = gzip.compress(pickle.dumps({q: {p: 0.5 for p in range(300)} for q in range(300)}, protocol=4))
    (tmp_path / "s.pkl.gz").write_bytes(data[:len(data) // 2])
    with pytest.raises(DataFormatError, match=r"s\.pkl\.gz: .*truncated or corrupt gzip"):
        list(iter_teacher_scores(tmp_path / "s.pkl.gz"))


def test_qrels_msmarco_and_trec(tmp_path):
    ms = write(tmp_path / "qrels.train.tsv", "1185869\t0\t0\t1\n1185868\t0\t16\t1\n")
    trec = write(tmp_path / "qrels.dl19.txt", "19335 Q0 1017759 0\n19335 Q0 1082489 3\n", gz=True)
    assert list(iter_qrels(ms)) == [(1185869, 0, 1), (1185868, 16, 1)]
    assert list(iter_qrels(trec)) == [(19335, 1017759, 0), (19335, 1082489, 3)]
    bad = write(tmp_path / "bad.txt", "1 Q0 2 1\n1 Q0 3\n")
    with pytest.raises(DataFormatError, match=r"bad\.txt:2: expected 4 fields"):
        list(iter_qrels(bad))


@needs_shared
def test_qrels_real_dl19():
    path = SCIFACT.parent / "msmarco-trec-dl" / "qrels.dl19-passage.txt"
    rows = list(iter_qrels(path))
    assert len(rows) == 9260 and len({q for q, _, _ in rows}) == 43  # SOURCE.md: 9,260 judgments / 43 q
    assert rows[0] == (19335, 1017759, 0)


def test_hard_negatives(tmp_path):
    lines = [{"qid": 867436, "pos": [5238393], "neg": {"bm25": [1, 2], "msmarco-distilbert-base-tas-b": [3]}},
             {"qid": 5, "pos": [], "neg": {}}]
    f = write(tmp_path / "hn.jsonl.gz", "".join(json.dumps(d) + "\n" for d in lines), gz=True)
    assert list(iter_hard_negatives(f)) == [(867436, [5238393], {"bm25": [1, 2], "msmarco-distilbert-base-tas-b": [3]}),
                                            (5, [], {})]
    bad = write(tmp_path / "bad.jsonl", '{"qid": 1, "pos": [2], "neg": {}}\n{"qid": 1, "pos": [2]\n'
                                        '{"qid": "1", "pos": [2], "neg": {}}\n{"qid": 1, "pos": [2], "neg": {"a": ["x"]}}\n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: expected JSON"):
        list(iter_hard_negatives(bad))
    skipped = Counter()
    with pytest.warns(UserWarning):
        assert len(list(iter_hard_negatives(bad, on_error="skip", skipped=skipped))) == 1
    assert sum(skipped.values()) == 3


def test_hofstaetter_triples(tmp_path):
    f = write(tmp_path / "t.tsv", "12.5\t-3.25\t400296\t1540783\t3518497\n1\t2\t3\t4\n")
    with pytest.raises(DataFormatError, match=r"t\.tsv:2: expected 5 tab-separated"):
        list(iter_hofstaetter_triples(f))
    assert next(iter_hofstaetter_triples(f)) == (400296, 1540783, 3518497, 12.5, -3.25)


def test_teacher_scores_from_triples(tmp_path):
    f = write(tmp_path / "t.tsv", "12.5\t-3.25\t1\t10\t20\n4.0\t1.5\t2\t30\t40\n")
    assert list(iter_teacher_scores(f)) == [(1, 10, 12.5), (1, 20, -3.25), (2, 30, 4.0), (2, 40, 1.5)]


# --- teacher-score pickles --------------------------------------------------------------------------------

# Hand-written expectations: {qid: {pid: score}}; pid 300 needs BININT2, 7 BININT1, 8841822 BININT.
EXPECTED = {1185869: {0: 2.5, 7: -1.25, 300: 10.0, 8841822: 0.125}, 2: {5: 3.0}, 3: {}}


def as_triples(d):
    return [(q, p, s) for q, ps in d.items() for p, s in ps.items()]


def dump(path: Path, obj, protocol, gz=True):
    data = pickle.dumps(obj, protocol=protocol)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("values", ["float", "float32", "float64", "numpy_keys"])
def test_score_pickle_value_types(tmp_path, protocol, values):
    conv = {"float": float, "float32": np.float32, "float64": np.float64, "numpy_keys": np.float32}[values]
    key = np.int64 if values == "numpy_keys" else int
    obj = {key(q): {key(p): conv(s) for p, s in ps.items()} for q, ps in EXPECTED.items()}
    f = dump(tmp_path / "scores.pkl.gz", obj, protocol)
    got = list(iter_teacher_scores(f))
    assert got == as_triples(EXPECTED)  # all values are exact in float32
    assert all(type(q) is int and type(p) is int and type(s) is float for q, p, s in got)


def test_score_pickle_large_and_mixed(tmp_path):
    # Many queries (several 1000-item SETITEMS batches and 64 KB frames), pids of every width, float32 values
    # that are not round: compared with the scores written, after float32 rounding.
    rng = np.random.default_rng(0)
    obj, expected = {}, []
    for qid in rng.choice(1_200_000, 1500, replace=False).tolist():
        pids = np.unique(np.concatenate([rng.integers(0, 300, 3), rng.integers(0, 8_841_823, 40)]))
        vals = rng.standard_normal(len(pids)).astype(np.float32) * 5
        obj[qid] = {int(p): v for p, v in zip(pids, vals)}
        expected += [(qid, int(p), float(v)) for p, v in zip(pids, vals)]
    for protocol in (3, 4):
        f = dump(tmp_path / f"s{protocol}.pkl", obj, protocol, gz=False)
        assert list(iter_teacher_scores(f)) == expected
        chunks = list(iter_teacher_score_chunks(f, chunk_size=10_000))
        assert len(chunks) > 1 and sum(len(c[0]) for c in chunks) == len(expected)


class Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


class EvalEvil:
    def __reduce__(self):
        return eval, ("__import__('os').system('touch pwned')",)


@pytest.mark.parametrize("protocol", [2, 4])
def test_hostile_pickle_is_refused_and_nothing_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    f = dump(tmp_path / "evil.pkl.gz", {1: {2: 0.5, 3: Evil(f"touch {marker}")}}, protocol)
    with pytest.raises(DataFormatError, match=r"evil\.pkl\.gz.*refused to load global (posix|os)\.system"):
        list(iter_teacher_scores(f))
    assert not marker.exists()
    f = dump(tmp_path / "eval.pkl", {Evil(f"touch {marker}"): {}}, protocol)
    with pytest.raises(DataFormatError, match="refused"):
        list(iter_teacher_scores(f))
    f = dump(tmp_path / "eval2.pkl", {1: {2: EvalEvil()}}, protocol)
    with pytest.raises(DataFormatError, match=r"(builtins|__builtin__)\.eval"):
        list(iter_teacher_scores(f))
    assert not marker.exists() and not Path("pwned").exists()


def test_hostile_numpy_lookalikes_are_refused(tmp_path):
    # numpy objects other than numeric scalars (an object dtype, an array) are refused too
    f = dump(tmp_path / "obj.pkl", {1: {2: np.array([1.0])}}, 4)
    with pytest.raises(DataFormatError, match="refused"):
        list(iter_teacher_scores(f))
    f = dump(tmp_path / "u1.pkl", {1: {2: np.uint8(3)}}, 4)
    with pytest.raises(DataFormatError, match="u1"):
        list(iter_teacher_scores(f))


def test_score_pickle_wrong_shapes(tmp_path):
    for obj, what in [({1: [0.5]}, "refused pickle opcode EMPTY_LIST"), ([1, 2], "refused pickle opcode"), ({1: {2: "x"}}, "expected"),
                      ({"q1": {2: 0.5}}, "int qids"), ({1: {2: {3: 0.5}}}, "expected")]:
        f = dump(tmp_path / "w.pkl", obj, 4)
        with pytest.raises(DataFormatError, match=what):
            list(iter_teacher_scores(f))
    shared = np.float32(1.5)  # one scalar object under two keys: the second is a back-reference
    f = dump(tmp_path / "shared.pkl", {1: {2: shared, 3: shared}}, 4)
    with pytest.raises(DataFormatError, match="refers back to memo entry"):
        list(iter_teacher_scores(f))
    (tmp_path / "long.pkl").write_bytes(b"\x80\x04}\x94(X\xff\xff\xff\x7f")  # a 2 GB string announced
    with pytest.raises(DataFormatError, match="refused a string of 2147483647 bytes"):
        list(iter_teacher_scores(tmp_path / "long.pkl"))
    (tmp_path / "big.pkl").write_bytes(pickle.dumps({1: {2**70: 0.5}}, protocol=4))
    with pytest.raises(DataFormatError, match="malformed pickle"):
        list(iter_teacher_scores(tmp_path / "big.pkl"))
    data = pickle.dumps(EXPECTED, protocol=4)
    (tmp_path / "cut.pkl").write_bytes(data[:len(data) // 2])
    with pytest.raises(DataFormatError, match="truncated"):
        list(iter_teacher_scores(tmp_path / "cut.pkl"))


# --- parquet and BEIR ---------------------------------------------------------------------------------------

def test_parquet_copies(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "corpus"
    folder.mkdir()
    pq.write_table(pa.table({"passage_id": ["0", "12"], "passage": ["a", "b c"]}), folder / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"passage_id": ["7"], "passage": ["d"]}), folder / "train-00001-of-00002.parquet")
    assert list(iter_id_text(folder)) == [(0, "a"), (12, "b c"), (7, "d")]
    scores = tmp_path / "scores.parquet"
    pq.write_table(pa.table({"query_id": ["1", "1"], "passage_id": ["5", "6"], "score": [1.5, -2.0]}), scores)
    assert list(iter_teacher_scores(scores)) == [(1, 5, 1.5), (1, 6, -2.0)]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"query_id": ["1", "x"], "query": ["a", "b"]}), bad)
    with pytest.raises(DataFormatError, match="bad.parquet.*integer ids"):
        list(iter_id_text(bad))


@needs_shared
def test_beir_scifact():
    corpus = [(d["_id"], beir_text(d)) for d in iter_jsonl(SCIFACT / "corpus.jsonl", "raise", None)]
    queries = [(d["_id"], d["text"]) for d in iter_jsonl(SCIFACT / "queries.jsonl", "raise", None)]
    qrels = list(iter_qrels(SCIFACT / "qrels" / "test.tsv", id_type=str))
    assert (len(corpus), len(queries), len(qrels)) == (5183, 1109, 339)  # SOURCE.md: 300 test queries, then the train claims
    assert queries[0] == ("1", "0-dimensional biomaterials show inductive properties.")
    assert qrels[0] == ("1", "31715818", 1)
    assert corpus[0][0] == "4983" and corpus[0][1].startswith("Microstructural development of human newborn")
    assert {p for _, p, _ in qrels} <= {p for p, _ in corpus}
    assert list(iter_collection(SCIFACT / "corpus.jsonl"))[:3] == corpus[:3]  # one collection reader for both kinds


def test_beir_string_ids(tmp_path):
    corpus = write(tmp_path / "corpus.jsonl", '{"_id": "MED-1", "title": "T", "text": "x"}\n'
                                              '{"_id": "012", "title": "", "text": "y"}\n')
    qrels = write(tmp_path / "test.tsv", "query-id\tcorpus-id\tscore\nPLAIN-1\tMED-1\t2\nPLAIN-1\t012\t1\n")
    assert list(iter_collection(corpus)) == [("MED-1", "T x"), ("012", "y")]  # ids stay strings, "012" too
    assert list(iter_qrels(qrels, id_type=str)) == [("PLAIN-1", "MED-1", 2), ("PLAIN-1", "012", 1)]

def test_qrels_skip_mode_keeps_the_good_lines_after_a_bad_first_one(tmp_path):
    path = write(tmp_path / "q.txt", "bad line here x y\n1 0 10 1\n2 Q0 20 2\n3 0 30\n")
    skipped = Counter()
    with pytest.warns(UserWarning, match="skipped 2"):
        rows = list(iter_qrels(path, on_error="skip", skipped=skipped))
    assert rows == [(1, 10, 1), (2, 20, 2)] and skipped[str(path)] == 2  # the 3-field line breaks the TREC layout
