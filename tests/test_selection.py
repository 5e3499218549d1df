"""The seed's selection rules on hand-made out-of-fold tables."""
import numpy as np
import pandas as pd
import pytest

from fat_mlflow.selection import (
    cap_per_label_per_fold,
    label_counts,
    select_by_agreement,
    select_perfect,
    selection_precision,
)


def oof(rows):
    return pd.DataFrame(rows, columns=["fname", "fold", "lwlrap"])


LABELS = pd.Series({"a.wav": ["dog"], "b.wav": ["dog"], "c.wav": ["cat"],
                    "d.wav": ["dog", "cat"], "e.wav": ["cat"]})


def test_stage3_keeps_geometric_mean_at_or_above_threshold():
    first = oof([("a.wav", 0, 1.0), ("b.wav", 0, 0.5), ("c.wav", 1, 0.25), ("d.wav", 1, 0.9),
                 ("e.wav", 1, 0.0)])
    second = oof([("a.wav", 0, 0.25), ("b.wav", 0, 0.5), ("c.wav", 1, 1.0), ("d.wav", 1, 0.1),
                  ("e.wav", 1, 1.0)])
    chosen = select_by_agreement(first, second, LABELS, threshold=0.5, max_per_label_per_fold=None)
    # sqrt(1*.25)=.5 (kept, boundary), sqrt(.5*.5)=.5 (kept), sqrt(.25*1)=.5 (kept),
    # sqrt(.9*.1)=.3 (dropped), 0 (dropped)
    assert list(chosen["fname"]) == ["a.wav", "b.wav", "c.wav"]
    assert chosen["score"].tolist() == pytest.approx([0.5, 0.5, 0.5])


def test_stage3_cap_applies_per_label_and_per_fold():
    rows = [(f"dog{i}.wav", i % 2, 1.0 - i / 100) for i in range(20)]
    labels = pd.Series({name: ["dog"] for name, _, _ in rows})
    chosen = select_by_agreement(oof(rows), oof(rows), labels, threshold=0.5,
                                 max_per_label_per_fold=3)
    assert chosen.groupby("fold").size().tolist() == [3, 3]
    # the best-scored clips of each fold are the ones kept
    assert set(chosen["fname"]) == {"dog0.wav", "dog2.wav", "dog4.wav",
                                    "dog1.wav", "dog3.wav", "dog5.wav"}


def test_cap_counts_a_multi_label_clip_for_each_of_its_labels():
    candidates = pd.DataFrame({
        "fname": ["both.wav", "dog.wav", "cat.wav"], "fold": [0, 0, 0],
        "score": [0.9, 0.8, 0.7], "labels": [["dog", "cat"], ["dog"], ["cat"]],
    })
    chosen = cap_per_label_per_fold(candidates, cap=1)
    assert list(chosen["fname"]) == ["both.wav"]


def test_stage3_rejects_tables_with_different_folds():
    with pytest.raises(ValueError, match="fold"):
        select_by_agreement(oof([("a.wav", 0, 1.0)]), oof([("a.wav", 1, 1.0)]), LABELS)


def test_stage4_keeps_only_perfectly_ranked_clips():
    table = oof([("a.wav", 0, 1.0), ("b.wav", 0, 0.999), ("c.wav", 1, 1.0 - 1e-12),
                 ("d.wav", 1, np.nan)])
    chosen = select_perfect(table, LABELS)
    assert list(chosen["fname"]) == ["a.wav", "c.wav"]
    assert chosen["labels"].tolist() == [["dog"], ["cat"]]


def test_label_counts_and_precision_against_noise_truth():
    chosen = pd.DataFrame({"fname": ["a.wav", "d.wav"], "fold": [0, 1], "score": [1, 1],
                           "labels": [["dog"], ["dog", "cat"]]})
    counts = label_counts(chosen, ["cat", "dog", "cow"]).set_index("label")["selected"]
    assert counts.to_dict() == {"cat": 1, "dog": 2, "cow": 0}
    truth = pd.DataFrame({"fname": ["a.wav", "b.wav", "c.wav", "d.wav"],
                          "labels_correct": [True, False, False, False]})
    figures = selection_precision(chosen, truth)
    assert figures["selection_precision"] == 0.5
    assert figures["noisy_base_rate"] == 0.25
