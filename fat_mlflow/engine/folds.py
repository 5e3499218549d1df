"""Multi-label stratified K folds over the curated and the noisy set.

The assignment is made once (stage 1) and saved as a run artifact; every later stage
reuses it, so fold k's model always warm-starts from a model that never saw fold k.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

FOLD_COLUMNS = ["set", "fname", "fold"]
# training drops a trailing batch of one clip (batch norm), so a fold needs two clips to learn
MIN_TRAINING_CLIPS = 2
FOLDS_HINT = "add clips, or use fewer folds (--set train.n_folds=N)"


class FoldSplitError(ValueError):
    """A set has too few clips for the profile's folds; the message names the set and the fix."""


def stratified_folds(targets: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold id per row, balancing every label's count across folds."""
    if len(targets) < n_folds:
        raise ValueError(f"cannot split {len(targets)} clips into {n_folds} folds")
    folds = np.empty(len(targets), dtype=np.int64)
    splitter = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(targets)), targets)):
        folds[held_out] = fold
    return folds


def assign_folds(
    sets: dict[str, tuple[pd.Series, np.ndarray]], n_folds: int, seed: int
) -> pd.DataFrame:
    """{set name: (fnames, targets)} -> table set,fname,fold with each set split on its own.

    Refused (FoldSplitError) when a set cannot be split so that every fold model has clips
    of it to train on: the stages would otherwise fail in the middle of a run.
    """
    if n_folds < 2:
        raise FoldSplitError(f"train.n_folds={n_folds}: cross-validation needs at least 2 folds")
    parts = [
        pd.DataFrame({"set": name, "fname": fnames.to_numpy(),
                      "fold": _trainable_folds(name, targets, n_folds, seed)})
        for name, (fnames, targets) in sets.items()
    ]
    return pd.concat(parts, ignore_index=True)[FOLD_COLUMNS]


def _trainable_folds(name: str, targets: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    if len(targets) < n_folds:
        raise FoldSplitError(f"the {name} set has {len(targets)} clip(s), fewer than the "
                             f"{n_folds} folds (train.n_folds); {FOLDS_HINT}")
    folds = stratified_folds(targets, n_folds, seed)
    training = len(folds) - np.bincount(folds, minlength=n_folds)
    short = np.flatnonzero(training < MIN_TRAINING_CLIPS)
    if short.size:
        raise FoldSplitError(
            f"the {name} set: {len(folds)} clips in {n_folds} folds leave fold {short[0]} "
            f"{training[short[0]]} clip(s) to train on; a fold needs at least "
            f"{MIN_TRAINING_CLIPS}; {FOLDS_HINT}")
    return folds


def folds_for(table: pd.DataFrame, set_name: str, fnames: pd.Series) -> np.ndarray:
    """Look up the fold of each fname of one set; a clip missing from the table is an error."""
    lookup = table[table["set"] == set_name].set_index("fname")["fold"]
    missing = ~fnames.isin(lookup.index)
    if missing.any():
        examples = ", ".join(fnames[missing].head(5))
        raise ValueError(
            f"{int(missing.sum())} {set_name} clips have no fold in the saved assignment "
            f"(e.g. {examples}); was the earlier run made on another dataset?"
        )
    return lookup.loc[fnames].to_numpy(dtype=np.int64)
