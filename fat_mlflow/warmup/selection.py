"""The seed's semi-supervised selection of noisy clips, as pure functions on OOF tables.

An OOF table has one row per noisy clip: fname, fold and the per-sample lwlrap that the
stage's fold model (which never trained on that clip's fold) achieved on it.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd

SELECTION_COLUMNS = ["fname", "fold", "score", "labels"]
# "lwlrap == 1" up to float noise: an imperfect clip of C classes is at least ~1/C**2 below 1
PERFECT_TOLERANCE = 1e-9


def _joined(tables: list[pd.DataFrame]) -> pd.DataFrame:
    merged = tables[0][["fname", "fold", "lwlrap"]].rename(columns={"lwlrap": "lwlrap_0"})
    for i, table in enumerate(tables[1:], start=1):
        right = table[["fname", "fold", "lwlrap"]].rename(columns={"lwlrap": f"lwlrap_{i}",
                                                                    "fold": f"fold_{i}"})
        merged = merged.merge(right, on="fname", how="inner", validate="one_to_one")
        if (merged["fold"] != merged[f"fold_{i}"]).any():
            raise ValueError("the runs disagree on the fold of some clips: they were not "
                             "built on the same fold assignment")
        merged = merged.drop(columns=f"fold_{i}")
    if len(merged) != len(tables[0]):
        raise ValueError("the OOF tables do not cover the same noisy clips")
    return merged


def cap_per_label_per_fold(candidates: pd.DataFrame, cap: int) -> pd.DataFrame:
    """Keep the best-scored clips, at most `cap` per (fold, label).

    Clips are taken in decreasing score (ties by fname, so the result is deterministic);
    a clip is kept only while every one of its labels still has room in its fold, and
    then counts towards each of them. No candidate gives an empty table with the same
    columns.
    """
    ordered = candidates.sort_values(["score", "fname"], ascending=[False, True])
    counts: Counter[tuple[int, str]] = Counter()
    kept: list[int] = []  # positions, so that keeping none still keeps every column
    for position, row in enumerate(ordered.itertuples(index=False)):
        slots = {(row.fold, label) for label in row.labels}
        if all(counts[slot] < cap for slot in slots):
            counts.update(slots)
            kept.append(position)
    return ordered.iloc[kept].sort_values("fname").reset_index(drop=True)


def select_by_agreement(
    stage1_oof: pd.DataFrame,
    stage2_oof: pd.DataFrame,
    labels: pd.Series,
    threshold: float = 0.5,
    max_per_label_per_fold: int | None = 5,
) -> pd.DataFrame:
    """Stage 3: clips whose geometric mean of the two stages' lwlrap reaches `threshold`.

    `labels` maps fname -> list of (noisy) labels; the cap applies per fold and label
    (None or 0: no cap). No clip reaching the threshold gives an empty selection.
    """
    merged = _joined([stage1_oof, stage2_oof])
    merged["score"] = np.sqrt(merged["lwlrap_0"] * merged["lwlrap_1"])
    candidates = merged[merged["score"] >= threshold].copy()
    candidates["labels"] = candidates["fname"].map(labels)
    if max_per_label_per_fold is not None and max_per_label_per_fold > 0:
        candidates = cap_per_label_per_fold(candidates, max_per_label_per_fold)
    return candidates[SELECTION_COLUMNS].sort_values("fname").reset_index(drop=True)


def select_perfect(stage3_oof: pd.DataFrame, labels: pd.Series) -> pd.DataFrame:
    """Stage 4: clips the stage-3 model ranked perfectly (per-sample lwlrap == 1)."""
    chosen = stage3_oof[np.isclose(stage3_oof["lwlrap"], 1.0, rtol=0,
                                   atol=PERFECT_TOLERANCE)].copy()
    chosen["score"] = chosen["lwlrap"]
    chosen["labels"] = chosen["fname"].map(labels)
    return chosen[SELECTION_COLUMNS].sort_values("fname").reset_index(drop=True)


def label_counts(selection: pd.DataFrame, vocabulary: list[str]) -> pd.DataFrame:
    counts = Counter(label for labels in selection["labels"] for label in labels)
    return pd.DataFrame({"label": vocabulary, "selected": [counts[c] for c in vocabulary]})


def selection_precision(selection: pd.DataFrame, noise_truth: pd.DataFrame) -> dict[str, float]:
    """Share of selected clips whose labels are all correct, next to the noisy set's base rate.

    Only for evaluation (the demo data ships `noise_truth.csv`); training never reads it.
    """
    correct = noise_truth.set_index("fname")["labels_correct"].astype(bool)
    base_rate = float(correct.mean())
    chosen = correct.reindex(selection["fname"])
    precision = float(chosen.mean()) if len(chosen) else float("nan")
    return {"selection_precision": precision, "noisy_base_rate": base_rate,
            "selected_clips": float(len(selection))}
