"""The floor every network must beat: logistic regression on clip-level log-mel statistics.

No crops, no augmentation, no warm-up: each clip becomes the mean, standard deviation and
maximum of every mel band, and one regularised logistic regression per class is fitted on
the training clips. It runs in seconds on the same cached features and split as the pipeline.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def clip_statistics(specs: Sequence[np.ndarray]) -> np.ndarray:
    """(clips, 3 * n_mels): per-band mean, std and max of each (n_mels, frames) log-mel."""
    return np.stack([np.concatenate([s.mean(axis=1), s.std(axis=1), s.max(axis=1)])
                     for s in specs]).astype(np.float32)


def fit_logistic_baseline(specs: Sequence[np.ndarray], targets: np.ndarray,
                          c: float = 0.1) -> OneVsRestClassifier:
    """One-vs-rest logistic regression on standardised clip statistics.

    A class with no positive training clip gets a constant (zero) score from sklearn's
    one-vs-rest wrapper, which is what a floor should do.
    """
    if len(specs) != len(targets):
        raise ValueError(f"{len(specs)} spectrograms but {len(targets)} target rows")
    model = OneVsRestClassifier(
        make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)))
    return model.fit(clip_statistics(specs), targets)


def baseline_scores(model: OneVsRestClassifier, specs: Sequence[np.ndarray]) -> np.ndarray:
    return model.predict_proba(clip_statistics(specs)).astype(np.float32)
