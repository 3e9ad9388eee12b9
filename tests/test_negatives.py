"""The MS MARCO negative selection against sentence-transformers' train_bi-encoder_mnrl.py, transcribed below."""
import numpy as np
import pytest

from marco_lightning.data.negatives import SKIP_REASONS, skip_reasons, take_negatives


def st_mnrl_recipe(pos_pids, lists, ce_scores, margin, num_negs_per_system):
    """examples/sentence_transformer/training/ms_marco/train_bi-encoder_mnrl.py, its selection loop verbatim
    (a list instead of its set, to compare the order too)."""
    pos_min_ce_score = min(ce_scores[pid] for pid in pos_pids)
    ce_score_threshold = pos_min_ce_score - margin
    neg_pids = []
    for system_negs in lists:
        negs_added = 0
        for pid in system_negs:
            if ce_scores[pid] > ce_score_threshold:
                continue
            if pid not in neg_pids:
                neg_pids.append(pid)
                negs_added += 1
                if negs_added >= num_negs_per_system:
                    break
    return neg_pids


def ours(pos_pids, lists, ce_scores, margin, k):
    block = np.array(pos_pids + [p for system in lists for p in system], np.int64)
    bounds, start = [], len(pos_pids)
    for system in lists:
        bounds.append((start, start + len(system)))
        start += len(system)
    scores = np.array([ce_scores[p] for p in block.tolist()], np.float64)
    skip = skip_reasons(block, len(pos_pids), np.ones(len(block), bool), scores, margin)
    return take_negatives(block, skip, bounds, k)[0]


@pytest.mark.parametrize("seed", range(40))
def test_selection_equals_the_st_recipe(seed):
    """Random queries in the file's shape: up to 4 systems of up to 12 candidates from a small pool (so systems
    overlap and lists hold positives), every pair scored, as in the recipe's cross-encoder score pickle."""
    rng = np.random.default_rng(seed)
    pool = rng.permutation(60).tolist()
    pos_pids = pool[: rng.integers(1, 3)]
    lists = [rng.choice(pool, rng.integers(0, 13), replace=False).tolist() for _ in range(rng.integers(1, 5))]
    ce_scores = {p: float(rng.normal(0, 4)) for p in pool}
    for p in pos_pids:
        ce_scores[p] = float(rng.normal(6, 2))
    margin, k = float(rng.choice([0.5, 3.0, 6.0])), int(rng.integers(1, 6))
    expected = st_mnrl_recipe(pos_pids, lists, ce_scores, margin, k)
    assert ours(pos_pids, lists, ce_scores, margin, k) == expected


def test_skip_reasons_first_reason_wins():
    # candidates: positive 10 (score 9) | 10 again, 1 without text, 2 unscored, 3 above 9 - 3, 4 usable
    block = np.array([10, 10, 1, 2, 3, 4])
    has_text = np.array([True, True, False, True, True, True])
    scores = np.array([9.0, 9.0, np.nan, np.nan, 7.0, 1.0])
    reasons = [SKIP_REASONS[r - 1] if r else None for r in skip_reasons(block, 1, has_text, scores, 3.0)[1:]]
    assert reasons == ["negative_is_positive", "negative_without_text", "negative_without_teacher_score",
                       "negative_above_margin", None]
    # without a margin only positives and missing texts are skipped; a positive without any score: no threshold
    assert skip_reasons(block, 1, has_text).tolist() == [1, 1, 2, 0, 0, 0]
    assert skip_reasons(block, 1, has_text, np.array([np.nan, np.nan, 1, 1, 1, 1.0]), 3.0)[2:].tolist() == [2, 4, 4, 4]


def test_take_negatives_counts_per_system_and_marks_the_walk():
    # systems [5, 6, 7] and [6, 8, 9], k = 2: the first takes 5, 6; the second skips 6 (taken), takes 8, 9
    block = np.array([1, 5, 6, 7, 6, 8, 9])
    negatives, counts, visited = take_negatives(block, np.zeros(7, np.int8), [(1, 4), (4, 7)], 2)
    assert negatives == [5, 6, 8, 9] and counts == [2, 2]
    assert visited.tolist() == [False, True, True, False, True, True, True]  # 7 never looked at
