"""Which hard negatives a training query gets: sentence-transformers' MNRL recipe, as pure functions (its
examples/training/ms_marco/train_bi-encoder_mnrl.py, UKPLab/sentence-transformers).

A query's candidates arrive as one array `block`: its positives first, then one list per chosen system, each
best-first. `skip_reasons` says why a candidate cannot be a negative, `take_negatives` walks the systems in order
taking up to k new ones each. `data/store.py` applies them to every training query; BEIR folders mined here get
mine_hard_negatives' rule instead (`mining.select_negatives`).
"""
from __future__ import annotations

import numpy as np

SKIP_REASONS = ("negative_is_positive", "negative_without_text", "negative_without_teacher_score",
                "negative_without_positive_score", "negative_above_margin")  # in order of precedence


def skip_reasons(block: np.ndarray, num_positives: int, has_text: np.ndarray, scores: np.ndarray | None = None,
                 margin: float | None = None) -> np.ndarray:
    """int8 per candidate: 0 usable, else 1 + the index in SKIP_REASONS of the first reason that applies.

    The false-negative filter (with `margin`, teacher `scores` aligned with `block`): a candidate scored above
    min(positive scores) - margin is dropped; without a positive score there is no threshold to compare with."""
    skip = np.zeros(len(block), np.int8)  # later lines win: written from the last reason to the first
    if margin is not None:
        pos_scores = scores[:num_positives][has_text[:num_positives]]
        if np.isnan(pos_scores).all():
            skip[:] = 4
        else:
            skip[scores > np.nanmin(pos_scores) - margin] = 5
        skip[np.isnan(scores)] = 3
    skip[~has_text] = 2
    skip[np.isin(block, block[:num_positives][has_text[:num_positives]])] = 1
    return skip


def take_negatives(block: np.ndarray, skip: np.ndarray, lists: list[tuple[int, int]], k: int):
    """Walk `lists` ([lo, hi) slices of `block`, in the chosen system order), each best-first, taking up to k usable
    pids per list that no earlier list took. Returns (negatives in walk order, number taken per list, a mask of the
    candidates the walk looked at: where skips are counted)."""
    usable = np.flatnonzero(skip == 0)
    cuts = np.searchsorted(usable, lists).tolist()
    usable, pids = usable.tolist(), block.tolist()
    visited, taken, negatives, counts = np.zeros(len(block), bool), set(), [], []
    for (lo, hi), (a, b) in zip(lists, cuts):
        stop, added = hi, 0
        for j in usable[a:b]:
            if pids[j] not in taken:  # one an earlier system took does not count toward this one's quota
                taken.add(pids[j])
                negatives.append(pids[j])
                added += 1
                if added == k:
                    stop = j + 1
                    break
        counts.append(added)
        visited[lo:stop] = True
    return negatives, counts, visited
