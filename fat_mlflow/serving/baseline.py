"""The floor every network must beat: logistic regression on clip-level log-mel statistics.

No crops, no augmentation, no warm-up: each clip becomes the mean, standard deviation and
maximum of every mel band, and one regularised logistic regression per class is fitted on
the training clips. It runs in seconds on the same cached features and split as the pipeline.

Every ensemble is scored beside it (`floor_test_lwlrap`): a network that does not beat a
linear model on averaged log-mels is not yet worth serving.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fat_mlflow.config import FeatureConfig
from fat_mlflow.data.features import BadAudioError, FeatureCache
from fat_mlflow.data.layout import FatDataset
from fat_mlflow.engine.metrics import lwlrap

FLOOR_C = 0.1  # inverse regularisation strength of the floor's logistic regressions


def clip_statistics(specs: Sequence[np.ndarray]) -> np.ndarray:
    """(clips, 3 * n_mels): per-band mean, std and max of each (n_mels, frames) log-mel."""
    return np.stack([np.concatenate([s.mean(axis=1), s.std(axis=1), s.max(axis=1)])
                     for s in specs]).astype(np.float32)


def fit_logistic_baseline(specs: Sequence[np.ndarray], targets: np.ndarray,
                          c: float = FLOOR_C) -> OneVsRestClassifier:
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


def floor_test_lwlrap(dataset: FatDataset, features: FeatureConfig,
                      cache_dir: Path | None = None) -> dict[str, float]:
    """Test lwlrap of the floor trained on the curated clips (`curated`) and on curated +
    noisy clips with their noisy labels (`curated_noisy`), from the pipeline's feature cache.

    Empty when the test clips have no labels. Clips that fail to decode stop it, as they
    stop a stage (BadAudioError).
    """
    if not dataset.has_test_truth:
        return {}
    training_sets = {"curated": [dataset.curated]}
    if dataset.has_noisy:
        training_sets["curated_noisy"] = [dataset.curated, dataset.noisy]
    cache = FeatureCache(cache_dir, features)
    every_clip = pd.concat([dataset.curated, dataset.noisy_or_none, dataset.test])["path"]
    failures = cache.compute(list(every_clip), progress=False).failures
    if failures:
        raise BadAudioError(failures)
    test_specs = cache.load_many(dataset.test["path"], mmap=False)
    floors = {}
    for name, parts in training_sets.items():
        train = pd.concat(parts, ignore_index=True)
        model = fit_logistic_baseline(cache.load_many(train["path"], mmap=False),
                                      dataset.targets(train))
        floors[name] = lwlrap(dataset.targets(dataset.test), baseline_scores(model, test_specs))
    return floors
