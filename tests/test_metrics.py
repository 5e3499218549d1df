"""lwlrap against the organisers' definition, scikit-learn, and hand-worked cases."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import label_ranking_average_precision_score

from fat_mlflow.engine.metrics import lwlrap, per_class_lwlrap, per_sample_lwlrap


def reference_precisions(truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Loop form of the DCASE 2019 reference: rank with argsort, precision at each hit."""
    n_clips, n_classes = scores.shape
    out = np.zeros((n_clips, n_classes))
    for i in range(n_clips):
        ranked = np.argsort(scores[i])[::-1]
        rank_of = np.empty(n_classes, dtype=int)
        rank_of[ranked] = np.arange(n_classes)
        hits = np.cumsum(truth[i, ranked])
        for label in np.flatnonzero(truth[i]):
            out[i, label] = hits[rank_of[label]] / (rank_of[label] + 1)
    return out


def random_case(seed: int, n_clips: int = 200, n_classes: int = 20):
    rng = np.random.default_rng(seed)
    truth = rng.random((n_clips, n_classes)) < 0.15
    truth[0] = False  # a clip without labels, as in the reference's own test
    truth[1, 3] = True
    scores = rng.random((n_clips, n_classes))  # continuous: no ties
    return truth, scores


def sklearn_lwlrap(truth: np.ndarray, scores: np.ndarray) -> float:
    keep = truth.sum(axis=1) > 0
    return label_ranking_average_precision_score(
        truth[keep], scores[keep], sample_weight=truth[keep].sum(axis=1)
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tie_free_agrees_with_reference_and_sklearn(seed: int) -> None:
    truth, scores = random_case(seed)
    reference = reference_precisions(truth, scores)
    expected = reference.sum() / truth.sum()
    assert lwlrap(truth, scores) == pytest.approx(expected, abs=1e-12)
    assert lwlrap(truth, scores) == pytest.approx(sklearn_lwlrap(truth, scores), abs=1e-12)

    per_class, weights = per_class_lwlrap(truth, scores)
    counts = truth.sum(axis=0)
    np.testing.assert_allclose(per_class, reference.sum(axis=0) / np.maximum(1, counts))
    np.testing.assert_allclose(weights, counts / counts.sum())
    assert np.sum(per_class * weights) == pytest.approx(lwlrap(truth, scores), abs=1e-12)

    per_sample = per_sample_lwlrap(truth, scores)
    has_label = truth.sum(axis=1) > 0
    np.testing.assert_allclose(
        per_sample[has_label],
        reference[has_label].sum(axis=1) / truth[has_label].sum(axis=1),
    )


def test_ties_are_pessimistic_like_sklearn() -> None:
    rng = np.random.default_rng(5)
    truth = rng.random((300, 12)) < 0.25
    truth[:, 0] |= ~truth.any(axis=1)
    scores = rng.integers(0, 4, size=truth.shape).astype(float)  # many ties
    assert lwlrap(truth, scores) == pytest.approx(sklearn_lwlrap(truth, scores), abs=1e-12)
    for i in range(10):
        assert per_sample_lwlrap(truth[i : i + 1], scores[i : i + 1])[0] == pytest.approx(
            label_ranking_average_precision_score(truth[i : i + 1], scores[i : i + 1])
        )


def test_hand_worked_example() -> None:
    truth = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    scores = np.array([[0.9, 0.8, 0.1, 0.5], [0.9, 0.8, 0.1, 0.5], [0.1, 0.2, 0.3, 0.4]])
    # clip 0: label 0 ranked 1st -> 1/1; label 2 ranked 4th with 2 hits -> 2/4
    # clip 1: label 1 ranked 2nd -> 1/2; clip 2 has no label
    per_sample = per_sample_lwlrap(truth, scores)
    assert per_sample[0] == pytest.approx(0.75)
    assert per_sample[1] == pytest.approx(0.5)
    assert np.isnan(per_sample[2])
    assert lwlrap(truth, scores) == pytest.approx((1 + 0.5 + 0.5) / 3)
    per_class, weights = per_class_lwlrap(truth, scores)
    np.testing.assert_allclose(per_class, [1.0, 0.5, 0.5, 0.0])
    np.testing.assert_allclose(weights, [1 / 3, 1 / 3, 1 / 3, 0.0])


def test_per_sample_is_one_only_for_a_strictly_correct_ranking() -> None:
    truth = np.array([[1, 1, 0, 0]] * 3)
    scores = np.array(
        [
            [0.8, 0.9, 0.1, 0.2],  # both true labels on top
            [0.8, 0.9, 0.8, 0.2],  # a false label ties with a true one
            [0.5, 0.5, 0.5, 0.5],  # constant prediction
        ]
    )
    per_sample = per_sample_lwlrap(truth, scores)
    assert per_sample[0] == 1.0
    assert per_sample[1] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert per_sample[2] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("truth", "scores", "message"),
    [
        (np.ones((3, 4)), np.ones((3, 5)), "differ in shape"),
        (np.ones(4), np.ones(4), "2-D"),
        (np.full((2, 3), 2), np.ones((2, 3)), "binary"),
        (np.ones((2, 3)), np.array([[0.1, np.nan, 0.2], [0.1, 0.2, 0.3]]), "NaN"),
    ],
)
def test_bad_input_is_rejected(truth: np.ndarray, scores: np.ndarray, message: str) -> None:
    for function in (lwlrap, per_class_lwlrap, per_sample_lwlrap):
        with pytest.raises(ValueError, match=message):
            function(truth, scores)


def test_no_positive_label_at_all_is_rejected() -> None:
    truth = np.zeros((3, 4))
    scores = np.random.default_rng(0).random((3, 4))
    with pytest.raises(ValueError, match="no positive label"):
        lwlrap(truth, scores)
    with pytest.raises(ValueError, match="no positive label"):
        per_class_lwlrap(truth, scores)
    assert np.isnan(per_sample_lwlrap(truth, scores)).all()
