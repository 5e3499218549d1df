"""lwlrap: label-weighted label-ranking average precision (DCASE 2019 Task 2 metric).

For every (clip, true label) pair, take the precision of the clip's ranked label list at
that label: (true labels ranked at or above it) / (labels ranked at or above it).
lwlrap is the mean of these precisions over all pairs, so every true label counts equally
whatever clip it sits in.

Ties: the organisers' reference code ranks with `np.argsort`, which breaks ties in an
order that depends on the sort algorithm. This module follows scikit-learn's
`label_ranking_average_precision_score` instead and treats ties pessimistically (a tied
label counts as ranked above). It is deterministic, makes lwlrap equal sklearn's LRAP
weighted by the number of true labels per clip even with ties, and keeps a constant
prediction from scoring a perfect 1 in the stage-4 selection. On tie-free scores all
three definitions agree exactly.
"""
from __future__ import annotations

import numpy as np


def _validate(truth: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    truth = np.asarray(truth)
    scores = np.asarray(scores, dtype=np.float64)
    if truth.ndim != 2 or scores.ndim != 2:
        raise ValueError(
            f"truth and scores must be 2-D (n_clips, n_classes); got truth {truth.shape}, "
            f"scores {scores.shape}"
        )
    if truth.shape != scores.shape:
        raise ValueError(f"truth {truth.shape} and scores {scores.shape} differ in shape")
    if truth.size and not np.isin(truth, (0, 1)).all():
        raise ValueError("truth must be binary (0/1 or bool)")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    return truth.astype(bool), scores


def _positive_precisions(truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Precision of each clip's ranked list at each of its true labels; 0 elsewhere.

    Sorting each row once gives, for every label, the first sorted position of its tie
    group; everything from there on scores >= it (pessimistic ties).
    """
    n_classes = scores.shape[1]
    order = np.argsort(scores, axis=1, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=1)
    sorted_truth = np.take_along_axis(truth, order, axis=1)
    positions = np.arange(n_classes)
    group_start = np.ones(scores.shape, dtype=bool)
    group_start[:, 1:] = sorted_scores[:, 1:] != sorted_scores[:, :-1]
    first = np.maximum.accumulate(np.where(group_start, positions, 0), axis=1)
    hits_from = np.cumsum(sorted_truth[:, ::-1], axis=1)[:, ::-1]
    sorted_precision = np.take_along_axis(hits_from, first, axis=1) / (n_classes - first)
    precision = np.empty_like(sorted_precision)
    np.put_along_axis(precision, order, sorted_precision, axis=1)
    return np.where(truth, precision, 0.0)


def per_class_lwlrap(truth: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class lwlrap and class weights (share of all positive labels).

    `sum(per_class * weights) == lwlrap(truth, scores)`. A class without any positive
    label gets 0 with weight 0, as in the organisers' reference.
    """
    truth, scores = _validate(truth, scores)
    precisions = _positive_precisions(truth, scores)
    labels_per_class = truth.sum(axis=0)
    total = labels_per_class.sum()
    if total == 0:
        raise ValueError("truth has no positive label: lwlrap is undefined")
    per_class = precisions.sum(axis=0) / np.maximum(1, labels_per_class)
    return per_class, labels_per_class / total


def lwlrap(truth: np.ndarray, scores: np.ndarray) -> float:
    """Overall lwlrap: mean precision over all (clip, true label) pairs."""
    truth, scores = _validate(truth, scores)
    n_positive = truth.sum()
    if n_positive == 0:
        raise ValueError("truth has no positive label: lwlrap is undefined")
    return float(_positive_precisions(truth, scores).sum() / n_positive)


def per_sample_lwlrap(truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """lwlrap of each clip on its own (the value the warm-up selection thresholds).

    1.0 exactly when all the clip's true labels score strictly above all its others.
    NaN for a clip without any true label: its precision is undefined, and a NaN fails
    every `>=` threshold, so such a clip is never selected.
    """
    truth, scores = _validate(truth, scores)
    n_true = truth.sum(axis=1)
    sums = _positive_precisions(truth, scores).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_true > 0, sums / n_true, np.nan)
