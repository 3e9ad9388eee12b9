"""The paired randomization test against hand-counted sign flips and scipy's permutation_test; task.baseline's
per-query comparison against ir-measures' own per-query values."""
import json

import ir_measures
import numpy as np
import pytest
from conftest import ROOT, compose
from scipy.stats import permutation_test

from marco_lightning.config import ConfigError
from marco_lightning.significance import format_comparison, randomization_test

SAMPLE = ROOT / "data" / "sample"


def scipy_p(a, b, n_resamples):
    mean_difference = lambda x, y: np.mean(x - y)
    return permutation_test((np.asarray(a), np.asarray(b)), mean_difference, permutation_type="samples",
                            n_resamples=n_resamples, alternative="two-sided", random_state=0).pvalue


def test_exact_p_by_hand():
    # differences 1, 2, 3: the 8 sign flips sum to 6, 4, 2, 0, 0, -2, -4, -6; |sum| >= 6 twice
    assert randomization_test([1, 2, 3], [0, 0, 0]) == 0.25
    assert randomization_test([3, 2, 1], [0, 0, 0]) == randomization_test([0, 0, 0], [1, 2, 3]) == 0.25
    assert randomization_test([0.5, 0.2], [0.5, 0.2]) == 1.0  # no difference at all
    assert randomization_test([], []) == 1.0


def test_exact_equals_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.random(12), rng.random(12) * 0.8
    assert randomization_test(a, b, trials=2**12) == pytest.approx(scipy_p(a, b, 2**12), abs=1e-12)
    # nDCG-like values: many queries tie at 0 or 1, sums reached in different orders of addition
    a, b = np.round(rng.random(11), 1), np.round(rng.random(11), 1)
    assert randomization_test(a, b, trials=2**11) == pytest.approx(scipy_p(a, b, 2**11), abs=1e-12)


def test_sampled_flips_estimate_the_exact_p():
    rng = np.random.default_rng(2)
    a, b = rng.random(15), rng.random(15) * 0.9
    exact = scipy_p(a, b, 2**15)
    assert 0.05 < exact < 0.95  # a p the estimate can miss by sampling: 20000 flips, standard error <= 0.0035
    assert randomization_test(a, b, trials=20_000) == pytest.approx(exact, abs=0.015)
    assert randomization_test(a, b, trials=20_000, seed=3) != randomization_test(a, b, trials=20_000, seed=4)


def evaluate(overrides, tmp_path):
    from marco_lightning.tasks.evaluate import main

    return main(compose(["task=evaluate", "data=sample", *overrides], tmp_path))


def per_query_ndcg10(qrels_path, run):
    qrels = list(ir_measures.read_trec_qrels(str(qrels_path)))
    return {m.query_id: m.value for m in ir_measures.iter_calc([ir_measures.nDCG @ 10], qrels, run)}


def test_baseline_comparison_matches_ir_measures_per_query(tmp_path):
    from marco_lightning.data.trec import read_run

    bm25 = read_run(SAMPLE / "run.dev.bm25.trec")
    # a close rival: BM25 with its top two swapped on every other query
    rival, path = {}, tmp_path / "rival.trec"
    for i, (q, docs) in enumerate(sorted(bm25.items())):
        ranked = sorted(docs, key=docs.get, reverse=True)
        if i % 2 == 0:
            ranked[0], ranked[1] = ranked[1], ranked[0]
        rival[q] = {pid: float(len(ranked) - r) for r, pid in enumerate(ranked)}
    path.write_text("".join(f"{q} Q0 {pid} {len(d) - int(s) + 1} {s} rival\n" for q, d in rival.items()
                            for pid, s in d.items()))
    metrics = evaluate([f"task.run={path}", f"task.baseline={SAMPLE / 'run.dev.bm25.trec'}",
                        "task.randomization_trials=20000", "task.measures=[ndcg@10]"], tmp_path / "eval")
    comparison = json.loads((tmp_path / "eval" / "comparison.json").read_text())["ndcg@10"]

    ours, theirs = per_query_ndcg10(SAMPLE / "qrels.dev.trec", rival), per_query_ndcg10(SAMPLE / "qrels.dev.trec", bm25)
    a, b = np.array([ours[q] for q in theirs]), np.array([theirs[q] for q in theirs])
    assert comparison["queries"] == len(theirs) == 43
    assert comparison["run"] == pytest.approx(a.mean()) == pytest.approx(metrics["ndcg@10"])
    assert comparison["baseline"] == pytest.approx(b.mean())
    assert (comparison["wins"], comparison["ties"], comparison["losses"]) == \
        ((a > b).sum(), (a == b).sum(), (a < b).sum())
    assert comparison["losses"] > 0 and comparison["ties"] > 0  # the swaps moved some queries, not all
    assert comparison["p"] == pytest.approx(scipy_p(a, b, 20_000), abs=0.015)


def test_baseline_that_is_not_a_run_fails_before_scoring(tmp_path):
    run = f"task.run={SAMPLE / 'run.dev.bm25.trec'}"
    with pytest.raises(ConfigError, match="task.baseline=.*file not found"):
        evaluate([run, f"task.baseline={tmp_path / 'nope.trec'}"], tmp_path / "a")
    with pytest.raises(ConfigError, match="task.baseline=.*no run.trec in that folder"):
        evaluate([run, f"task.baseline={tmp_path}"], tmp_path / "b")
    with pytest.raises(ConfigError, match="task.randomization_trials"):
        evaluate([run, f"task.baseline={SAMPLE / 'run.dev.bm25.trec'}", "task.randomization_trials=0"],
                 tmp_path / "c")
    assert not (tmp_path / "a" / "run.trec").exists()


def test_a_tiny_p_is_printed_as_how_small_it_is():
    # 20 queries all better: the exact p is 2 / 2^20, which 4 decimals would print as 0.0000
    p = randomization_test(np.full(20, 0.5), np.zeros(20), trials=2**20)
    assert p == 2 / 2**20
    row = {"run": 0.5, "baseline": 0.0, "delta": 0.5, "p": p, "wins": 20, "ties": 0, "losses": 0}
    table = format_comparison({"ndcg@10": row}, "a", "b")
    assert "| +0.5000 | 1.9e-06 |" in table
    assert "| 0.0540 |" in format_comparison({"ndcg@10": dict(row, p=0.054)}, "a", "b")
