"""`make bench-data`: the synthetic files are in the exact real formats (checked against the standard library's
pickle and json and the project's readers), and the benchmark runs end to end at a tiny scale."""
import gzip
import json
import pickle
import pickletools
import warnings
from collections import defaultdict

import numpy as np
import pytest

from benchmarks.synthetic_msmarco import SYSTEMS, generate, score_pickle_bytes
from marco_lightning.data.formats import iter_qrels
from marco_lightning.data.msmarco import iter_hard_negatives, iter_id_text, iter_teacher_scores


def deframed(b: bytes) -> bytes:
    """A pickle without its FRAME opcodes (length hints whose placement is the pickler's choice)."""
    ops = list(pickletools.genops(b))
    ends = [pos for _, _, pos in ops[1:]] + [len(b)]
    return b"".join(b[pos:end] for (op, _, pos), end in zip(ops, ends) if op.name != "FRAME")


def float32_dict(rng, num_queries, sizes):
    return {int(q): {int(p): np.float32(rng.normal()) for p in rng.choice(9_000_000, rng.choice(sizes), replace=False)}
            for q in rng.choice(1_200_000, num_queries, replace=False)}


# (1 query of 1 entry: SETITEM; 1000 queries: a full last batch then an empty one; 1000/2000 entries: the same
# inside a query's dict; ids of every pickled width: BININT1, BININT2, BININT)
SHAPES = [(1, [1]), (3, [1, 2, 5]), (1000, [1, 3]), (1001, [1, 2]), (4, [1000, 2000, 1500])]


@pytest.mark.parametrize("num_queries,sizes", SHAPES)
def test_score_pickle_is_what_pickle_dump_writes(num_queries, sizes):
    rng = np.random.default_rng(num_queries)
    scores = float32_dict(rng, num_queries, sizes)
    scores[next(iter(scores))].update({0: np.float32(1), 255: np.float32(2), 256: np.float32(3), 65536: np.float32(4)})
    mine = score_pickle_bytes(scores)  # numpy 2's module name, to compare with this numpy's pickle
    assert deframed(mine) == deframed(pickle.dumps(scores, protocol=4))
    assert pickle.loads(mine) == scores


@pytest.mark.parametrize("num_queries,sizes", SHAPES)
def test_project_reader_reads_the_score_pickle(tmp_path, num_queries, sizes):
    rng = np.random.default_rng(num_queries)
    scores = float32_dict(rng, num_queries, sizes)
    path = tmp_path / "s.pkl"
    path.write_bytes(score_pickle_bytes(scores, module="numpy.core.multiarray"))  # the real file's spelling
    got = defaultdict(dict)
    for q, p, s in iter_teacher_scores(path):
        got[q][p] = s
    assert got == {q: {p: float(v) for p, v in d.items()} for q, d in scores.items()}


def test_python_float_scores_too():
    rng = np.random.default_rng(0)
    scores = {q: {p: float(v) for p, v in d.items()} for q, d in float32_dict(rng, 1001, [1, 2, 1000]).items()}
    mine = score_pickle_bytes(scores, module=None)
    assert deframed(mine) == deframed(pickle.dumps(scores, protocol=4))


def test_numpy1_spelling_loads_too():
    scores = {5: {7: np.float32(1.5), 70_000: np.float32(-2.0)}}
    b = score_pickle_bytes(scores, module="numpy.core.multiarray")  # as the real 2021 file was written
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 keeps numpy.core as an alias
        assert pickle.loads(b) == scores


def test_synthetic_files_read_back_consistently(tmp_path):
    info = generate(tmp_path, scale=0.0005, log=lambda *_: None)
    files, counts = info["files"], info["counts"]
    passages = dict(iter_id_text(files["collection"]))
    queries = dict(iter_id_text(files["train_queries"]))
    assert len(passages) == counts["passages"] and list(passages) == list(range(counts["passages"]))
    assert len(queries) == counts["queries"]
    qrels = defaultdict(list)
    for q, p, grade in iter_qrels(files["train_qrels"]):
        qrels[q].append(p)
        assert grade == 1
    assert sum(map(len, qrels.values())) == counts["qrels"] and len(qrels) == counts["with_positive"]
    scores = defaultdict(dict)
    for q, p, s in iter_teacher_scores(files["teacher_scores"]):
        scores[q][p] = s
    assert sum(map(len, scores.values())) == counts["teacher_scores"]
    with gzip.open(files["hard_negatives"], "rt") as f:
        lines = f.read().splitlines()
    assert all(json.dumps(json.loads(line)) == line for line in lines)  # json.dumps' exact spelling
    lines = list(iter_hard_negatives(files["hard_negatives"]))
    assert [q for q, _, _ in lines] == list(queries)
    for qid, pos, neg in lines:
        assert pos == qrels.get(qid, [])
        assert list(neg) == [s for s in SYSTEMS if s in neg] and "bm25" in neg
        assert all(len(v) == 50 and len(set(v)) >= 49 for v in neg.values())
        pids = set(pos).union(*neg.values())
        assert set(scores[qid]) == pids and pids <= passages.keys()  # a teacher score for every pid of a line
        assert all(scores[qid][p] > -11.5 for p in pids)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_benchmark_runs_at_a_tiny_scale_and_writes_only_its_section(tmp_path):
    from benchmarks.data_pipeline import main

    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n## Training throughput\n\nkept\n\n## Data pipeline\n\nold\n\n## Profiles\n\nalso kept\n")
    workdir = tmp_path / "work"
    res = main(["--scale", "0.0005", "--small-scale", "0.0005", "--rounds", "2", "--batches", "3",
                "--workdir", str(workdir), "--out", str(out)])
    text = out.read_text()
    assert "kept" in text and "also kept" in text and "\nold\n" not in text
    assert text.index("## Training throughput") < text.index("## Data pipeline") < text.index("## Profiles")
    section = text[text.index("## Data pipeline"):text.index("## Profiles")]
    assert "scale 0.0005" in section and "nan" not in section and "extrapolated" in section
    assert res["pipeline"]["call_identical"] and min(res["pipeline"]["samples_per_s_2"]) > 0
    assert res["prepare"]["manifest"]["num_train_queries"] == res["generate"]["counts"]["with_positive"]
    assert not workdir.exists()  # the synthetic files and stores are deleted
