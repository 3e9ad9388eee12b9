import gzip
import math
from pathlib import Path

import ir_measures
import pytest
import torch

from marco_lightning.data.trec import read_qrels, read_run, write_run
from marco_lightning.evaluation import compute_metrics, format_table

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "msmarco-trec-dl"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not found at {DATA}")


# ------------------------------------------------------------------ (a) real runs give the published numbers


@needs_data
@pytest.mark.parametrize(
    "system, year, ndcg10",  # Anserini / rank_llm values, trec_eval -c -m ndcg_cut.10
    [
        ("BM25", 19, 0.5058),
        ("D_BERT_KD_TASB", 19, 0.7210),
        ("SPLADE_P_P_ENSEMBLE_DISTIL", 19, 0.7308),  # has score ties: tie-breaking matters
        ("BM25_RM3", 19, 0.5216),
        ("OPEN_AI_ADA2", 19, 0.7035),
        ("BM25", 20, 0.4796),
    ],
)
def test_published_ndcg_of_real_runs(system, year, ndcg10):
    qrels = read_qrels(DATA / f"qrels.dl{year}-passage.txt")
    run = read_run(DATA / f"runs/{system}_dl{year}.trec")
    assert compute_metrics(qrels, run, measures=("ndcg@10",))["ndcg@10"] == pytest.approx(ndcg10, abs=5e-5)


@needs_data
def test_read_real_qrels_both_formats_and_gz(tmp_path):
    dl19 = read_qrels(DATA / "qrels.dl19-passage.txt")  # TREC: qid Q0 pid grade
    assert len(dl19) == 43 and sum(map(len, dl19.values())) == 9260  # counts from SOURCE.md
    assert dl19["19335"]["1017759"] == 0
    dev = read_qrels(DATA / "msmarco-dev-small/qrels.dev.small.trec")  # MS MARCO: qid 0 pid 1
    assert len(dev) == 6980 and sum(map(len, dev.values())) == 7437
    assert dev["300674"] == {"7067032": 1}
    gz = tmp_path / "qrels.tsv.gz"
    with gzip.open(gz, "wt") as f:
        f.write("300674\t0\t7067032\t1\n125705\t0\t7067056\t1\n")
    assert read_qrels(gz) == {"300674": {"7067032": 1}, "125705": {"7067056": 1}}


# ------------------------------------------------------------------------------------------ run files


def test_write_run_sorted_ranked_and_readable_by_ir_measures(tmp_path):
    run = {"q1": {"a": 0.5, "b": 2.25, "c": -1.0}, "q2": {"x": 1 / 3}}
    path = tmp_path / "sub" / "run.trec.gz"
    write_run(run, path, tag="mytag")
    with gzip.open(path, "rt") as f:
        lines = f.read().splitlines()
    assert lines[:3] == ["q1 Q0 b 1 2.25 mytag", "q1 Q0 a 2 0.5 mytag", "q1 Q0 c 3 -1.0 mytag"]
    assert lines[3].split()[:4] == ["q2", "Q0", "x", "1"]
    assert read_run(path) == run  # scores round-trip exactly
    independent = {}
    for r in ir_measures.read_trec_run(str(path)):
        independent.setdefault(r.query_id, {})[r.doc_id] = r.score
    assert independent == run


def test_ms_marco_run_formats(tmp_path):
    from marco_lightning.data.trec import top_candidates

    ranked = tmp_path / "run.dev.tsv"  # MS MARCO's run format: qid, pid, rank
    ranked.write_text("7\t30\t1\n7\t10\t2\n8\t10\t1\n")
    assert read_run(ranked) == {"7": {"30": -1.0, "10": -2.0}, "8": {"10": -1.0}}
    trailing = tmp_path / "trailing.tsv"
    trailing.write_text("7\t30\t1\t\n7\t10\t2\t\n")  # a trailing tab is no fourth column
    assert read_run(trailing) == {"7": {"30": -1.0, "10": -2.0}}
    scored = tmp_path / "run.pyserini.tsv"  # qid, pid, rank, score
    scored.write_text("7\t30\t1\t12.5\n7\t10\t2\t11.25\n")
    assert read_run(scored) == {"7": {"30": 12.5, "10": 11.25}}
    top1000 = tmp_path / "top1000.tsv"  # the official top-1000 files: qid, pid, query, passage, in no order
    top1000.write_text("7\t30\ta query\tpassage thirty\n7\t10\ta query\tpassage ten\n")
    assert read_run(top1000) == {"7": {"10": 0.0, "30": 0.0}}
    assert sorted(top_candidates("7", read_run(top1000)["7"], 2)) == ["10", "30"]
    with pytest.raises(ValueError, match="data.val_top_k=1 would cut query 7's 2 candidates"):
        top_candidates("7", read_run(top1000)["7"], 1, key="data.val_top_k")
    assert top_candidates("7", read_run(ranked)["7"], 1) == ["30"]
    bad = tmp_path / "bad.txt"
    bad.write_text("7\t10\ta query\tpassage\nseven\t10\tq\tp\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2"):
        read_run(bad)


def test_run_files_read_like_every_data_file(tmp_path):
    """Gzip told by its magic bytes, not the name; a bad line is a DataFormatError (a UserError) at file:line."""
    from marco_lightning.errors import DataFormatError, UserError

    text = "1 Q0 a 1 2.0 t\n1 Q0 b 2 1.0 t\n"
    gzipped, plain = tmp_path / "run.trec", tmp_path / "plain.trec.gz"
    gzipped.write_bytes(gzip.compress(text.encode()))
    plain.write_text(text)
    assert read_run(gzipped) == read_run(plain) == {"1": {"a": 2.0, "b": 1.0}}
    qrels = tmp_path / "qrels.txt"
    qrels.write_bytes(gzip.compress(b"1 0 a 1\n"))
    assert read_qrels(qrels) == {"1": {"a": 1}}
    for content, what in [(text + "1 Q0 a 3 0.5 t\n", r"bad\.trec:3: passage a listed twice for query 1"),
                        (text + "\n1 Q0 c 3 x t\n", r"bad\.trec:4: expected a TREC run line"),
                        (text.encode() + b"1 Q0 \xff 3 0.5 t\n", r"bad\.trec:3: expected a TREC run line")]:
        bad = tmp_path / "bad.trec"
        bad.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(DataFormatError, match=what) as e:
            read_run(bad)
        assert isinstance(e.value, UserError)


def test_written_ties_in_the_order_compute_metrics_ranks(tmp_path):
    from marco_lightning.data.trec import trec_order

    run = {"1": {"10": 1.0, "9": 1.0, "8": 2.0}}
    write_run(run, tmp_path / "run.trec")
    assert [line.split()[2] for line in (tmp_path / "run.trec").read_text().splitlines()] == ["8", "9", "10"]
    assert [pid for pid, _ in trec_order(run["1"])] == ["8", "9", "10"]
    assert compute_metrics({"1": {"9": 1}}, run, 1, ("mrr@10",)) == {"mrr@10": 0.5}  # "9" second, as written
    with pytest.raises(ValueError, match="NaN"):
        write_run({"1": {"a": math.nan}}, tmp_path / "nan.trec")


def test_cutting_an_unranked_list_is_a_config_refusal():
    from marco_lightning.data.trec import top_candidates
    from marco_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match=r"task.top_k=1 would cut query 7's 2 candidates.*set task.top_k >= 2"):
        top_candidates("7", {"10": 0.0, "30": 0.0}, 1, key="task.top_k")


@pytest.mark.parametrize(
    "reader, text",
    [
        (read_qrels, "1 Q0 a 1\n1 Q0 b 2\n1 Q0 c\n"),  # 3 fields
        (read_qrels, "1 Q0 a 1\n1 Q0 b 2\n1 Q0 c high\n"),  # grade not an integer
        (read_qrels, "1 Q0 a 1\n\n1 Q0 a 2\n"),  # judged twice, differently
        (read_run, "1 Q0 a 1 2.0 t\n1 Q0 b 2 1.0 t\n1 Q0 c 3 x t\n"),  # score not a number
        (read_run, "1 Q0 a 1 2.0 t\n1 Q0 b 2 1.0 t\n1 Q0 c 3 1.0\n"),  # 5 fields
        (read_run, "1 Q0 a 1 2.0 t\n1 Q0 b 2 1.0 t\n1 Q0 a 3 0.5 t\n"),  # duplicate passage
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, reader, text):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"bad\.txt:3"):
        reader(path)


# ------------------------------------------------------------------------- (b) hand-computed examples

# Query 1: judged 11:3, 12:2, 13:1, 14:0, 15:2 (15 never retrieved); ranked 14, 11, 13, 12 (grades 0, 3, 1, 2).
# Query 2: judged 21:1 only (nothing relevant at grade >= 2); ranked 21, 29.
# Query 3: judged 31:2, but the run has no candidates for it -> 0 for every measure.
# Query 4 is in the run only -> ignored.
HAND_QRELS = {"1": {"11": 3, "12": 2, "13": 1, "14": 0, "15": 2}, "2": {"21": 1}, "3": {"31": 2}}
HAND_RUN = {"1": {"14": 0.9, "11": 0.8, "13": 0.7, "12": 0.6}, "2": {"21": 0.5, "29": 0.4}, "4": {"41": 1.0}}
L2, L3 = math.log2(3), math.log2(4)
HAND = {
    # q1: DCG@3 = 0/1 + 3/log2(3) + 1/log2(4); ideal grades 3, 2, 2 -> 3/1 + 2/log2(3) + 2/log2(4).
    # q2: DCG = 1/1 = ideal -> 1 (nDCG is graded: grade 1 counts whatever rel_level is). q3: 0.
    "ndcg@3": ((3 / L2 + 1 / L3) / (3 + 2 / L2 + 2 / L3) + 1 + 0) / 3,
    "mrr@10": (1 / 2 + 0 + 0) / 3,  # q1: first grade >= 2 at rank 2
    "mrr@1": 0.0,
    "recall@3": (1 / 3 + 0 + 0) / 3,  # q1: 11 of the relevant {11, 12, 15} in the top 3; q2 has none relevant
    "recall@100": (2 / 3 + 0 + 0) / 3,
    "map": ((1 / 2 + 2 / 4) / 3 + 0 + 0) / 3,  # q1: relevant at ranks 2 and 4, divided by all 3 relevant
    "map@3": ((1 / 2) / 3) / 3,  # AP@k still divides by all relevant (trec_eval map_cut)
}
HAND_REL1 = {"mrr@10": (1 / 2 + 1 + 0) / 3}  # rel_level=1: q1 first relevant is 11 at rank 2, q2 21 at rank 1


def test_hand_computed_compute_metrics():
    assert compute_metrics(HAND_QRELS, HAND_RUN, 2, tuple(HAND)) == pytest.approx(HAND, abs=1e-12)
    assert compute_metrics(HAND_QRELS, HAND_RUN, 1, tuple(HAND_REL1)) == pytest.approx(HAND_REL1, abs=1e-12)


def test_ties_broken_by_docid_descending_as_strings():
    # Scores tie; trec_eval ranks "9" before "10" (string order, descending): the relevant "10" is 2nd -> RR 1/2.
    # Numeric order (10 first) or ascending strings (ir-measures' MS MARCO provider) would give 1.
    qrels, run = {"1": {"10": 1, "9": 0}}, {"1": {"10": 1.0, "9": 1.0}}
    assert compute_metrics(qrels, run, 1, ("mrr@10",)) == {"mrr@10": 0.5}


def test_a_query_without_candidates_scores_zero():
    assert compute_metrics(HAND_QRELS, {}, 2, ("ndcg@10", "mrr@10", "recall@100")) == {
        "ndcg@10": 0.0, "mrr@10": 0.0, "recall@100": 0.0}


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown measure 'recall'"):
        compute_metrics(HAND_QRELS, HAND_RUN, measures=("recall",))  # recall needs @K
    with pytest.raises(ValueError, match="unknown measure 'P@10'"):
        compute_metrics(HAND_QRELS, HAND_RUN, measures=("P@10",))
    with pytest.raises(ValueError, match="non-empty qrels"):
        compute_metrics({}, HAND_RUN)


# ------------------------------------- (c) validation's rows -> run -> metrics == ir-measures on the same run

MEASURES = ("ndcg@10", "mrr@10", "recall@100", "map", "ndcg", "mrr", "recall@5", "map@10")
IR_MEASURES = {"ndcg@10": ir_measures.nDCG @ 10, "ndcg": ir_measures.nDCG, "map@10": ir_measures.AP(rel=2) @ 10,
               "map": ir_measures.AP(rel=2), "mrr@10": ir_measures.RR(rel=2) @ 10, "mrr": ir_measures.RR(rel=2),
               "recall@100": ir_measures.R(rel=2) @ 100, "recall@5": ir_measures.R(rel=2) @ 5}


@pytest.fixture(scope="module")
def bm25_dl19():
    if not DATA.is_dir():
        pytest.skip(f"real data not found at {DATA}")
    qrels = read_qrels(DATA / "qrels.dl19-passage.txt")
    run = read_run(DATA / "runs/BM25_dl19.trec")
    qids, pids = zip(*[(int(q), int(p)) for q, docs in run.items() for p in docs])
    return qrels, torch.tensor(qids), torch.tensor(pids)


@needs_data
@pytest.mark.parametrize("variant", ["plain", "duplicates", "missing"])
def test_validation_rows_measure_as_ir_measures_on_the_written_run(bm25_dl19, variant, tmp_path):
    """What validation logs: rows in any batch order (with DistributedSampler's duplicate rows, or queries without
    candidates) -> gather_run -> compute_metrics; the reference: ir-measures on the TREC file written from it."""
    from marco_lightning.module import gather_run

    qrels, qids, pids = bm25_dl19
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(len(qids), generator=g)
    if variant == "missing":  # drop 40% of candidates and every candidate of 3 queries
        keep = (torch.rand(len(qids), generator=g) > 0.4) & ~torch.isin(qids, qids.unique()[:3])
        scores, qids, pids = scores[keep], qids[keep], pids[keep]
    if variant == "duplicates":
        extra = torch.randint(len(qids), (500,), generator=g)
        scores, qids, pids = (torch.cat([t, t[extra]]) for t in (scores, qids, pids))
    rows = torch.stack([qids.double(), pids.double(), scores.double()], 1)[torch.randperm(len(qids), generator=g)]
    run = gather_run(list(rows.split(1000)))
    write_run(run, tmp_path / "run.trec")
    # ir-measures, like trec_eval -c, scores a judged query the run lacks as 0
    reference = ir_measures.calc_aggregate(list(IR_MEASURES.values()), qrels,
                                           ir_measures.read_trec_run(str(tmp_path / "run.trec")))
    reference = {name: reference[m] for name, m in IR_MEASURES.items()}
    assert compute_metrics(qrels, run, 2, MEASURES) == pytest.approx(reference, abs=1e-9)


# ---------------------------------------------------------------------------------------------- tables


def test_format_table():
    table = format_table(
        {"BM25": {"ndcg@10": 0.50583, "mrr@10": 0.7}, "TAS-B": {"ndcg@10": torch.tensor(0.721)}}
    )
    assert table.splitlines() == [
        "| run | ndcg@10 | mrr@10 |",
        "|---|---:|---:|",
        "| BM25 | 0.5058 | 0.7000 |",
        "| TAS-B | 0.7210 | - |",
    ]
