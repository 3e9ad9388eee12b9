"""Is run A better than run B on these queries, or is the difference noise? A paired, two-sided randomization test
on the per-query values (Fisher's sign-flip test: under "no difference" each query's A - B is as likely to have
the other sign). Smucker, Allan & Carterette (CIKM 2007) recommend it for IR; it is ranx's default test.

A table of means cannot say it: on 26 test queries 0.006 nDCG@10 can be p = 0.83 (README, CACM).
"""
from __future__ import annotations

import warnings

import numpy as np

from marco_lightning.errors import ConfigError
from marco_lightning.evaluation import per_query_metrics


def randomization_test(a, b, trials: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value of mean(a - b) = 0 over paired values: exact over all 2^n sign flips when there are at most
    `trials` of them, else `trials` random flips, p = (count + 1) / (trials + 1): never 0 (scipy's
    permutation_test gives the same exact p; its sampled one differs by about 1 / trials)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    observed = abs(d.sum())
    if n == 0 or observed == 0:
        return 1.0
    tolerance = observed * 1e-12  # flips that reach the observed sum by another order of additions count as equal
    exact = n <= 62 and 2**n <= trials
    total = 2**n if exact else trials
    rng = np.random.default_rng(seed)
    count, done = 0, 0
    while done < total:  # chunks: a [trials, n] matrix of signs would not fit for MS MARCO's 6,980 queries
        rows = min(max(1, 2**20 // n), total - done)
        if exact:  # row i's signs are the bits of i
            bits = (np.arange(done, done + rows, dtype=np.uint64)[:, None] >> np.arange(n, dtype=np.uint64)) & 1
            signs = 1.0 - 2.0 * bits.astype(np.float64)
        else:
            signs = rng.choice((-1.0, 1.0), size=(rows, n))
        count += int((np.abs(signs @ d) >= observed - tolerance).sum())
        done += rows
    return count / total if exact else (count + 1) / (trials + 1)


def compare_runs(qrels, run, baseline, rel_level: int, measures, trials: int = 10_000, seed: int = 0) -> dict:
    """Per measure: both means, their difference, the queries where `run` wins, ties and loses against `baseline`,
    and the randomization test's p-value."""
    covered = {"run": sum(q in run for q in qrels), "baseline": sum(q in baseline for q in qrels)}
    if not covered["baseline"] or not covered["run"]:
        raise ConfigError(f"the {'baseline' if not covered['baseline'] else 'run'} ranks none of the {len(qrels)} "
                          "judged queries: another split's run, or other query ids? (task.baseline, task.run)")
    for name, n in covered.items():
        if n < 0.9 * len(qrels):
            warnings.warn(f"the {name} ranks {n} of the {len(qrels)} judged queries; the rest score 0 in it")
    ours = per_query_metrics(qrels, run, rel_level, measures)
    theirs = per_query_metrics(qrels, baseline, rel_level, measures)
    result = {}
    for name in measures:
        a = np.array([ours[name][q] for q in qrels])
        b = np.array([theirs[name][q] for q in qrels])
        result[name] = {"run": a.mean(), "baseline": b.mean(), "delta": a.mean() - b.mean(),
                        "wins": int((a > b).sum()), "ties": int((a == b).sum()), "losses": int((a < b).sum()),
                        "p": randomization_test(a, b, trials, seed), "queries": len(a),
                        "ranked": covered}
    return result


def format_comparison(comparison: dict, run: str, baseline: str) -> str:
    lines = [f"| measure | {run} | {baseline} | delta | p (randomization) | wins / ties / losses |",
             "|---|---:|---:|---:|---:|---|"]
    for name, c in comparison.items():
        lines.append(f"| {name} | {c['run']:.4f} | {c['baseline']:.4f} | {c['delta']:+.4f} | {_p(c['p'])} | "
                     f"{c['wins']} / {c['ties']} / {c['losses']} |")
    return "\n".join(lines)


def _p(p: float) -> str:  # a p under 1e-3 in 4 decimals would read 0.0000 or 0.0001: say how small it is
    return f"{p:.4f}" if p >= 1e-3 else f"{p:.1e}"
