"""The floor every network must beat: logistic regression on clip-level log-mel statistics.

No crops, no augmentation, no warm-up: each clip becomes the mean, standard deviation and
maximum of every mel band, and one regularised logistic regression per class is fitted on
the training clips. It runs in seconds on the same cached features and split as the pipeline,
reading one clip at a time: its memory is the statistics matrix, whatever the dataset's size.

Every ensemble is scored beside it (`floor_test_lwlrap`): a network that does not beat a
linear model on averaged log-mels is not yet worth serving.
"""
from __future__ import annotations

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
from fat_mlflow.engine.spectrograms import Spectrograms, as_spectrograms

FLOOR_C = 0.1  # inverse regularisation strength of the floor's logistic regressions


def clip_statistics(specs: Spectrograms) -> np.ndarray:
    """(clips, 3 * n_mels): per-band mean, std and max of each (n_mels, frames) log-mel,
    computed clip by clip."""
    specs = as_spectrograms(specs)
    rows = [_band_statistics(specs.clip(index)) for index in range(len(specs))]
    return np.stack(rows).astype(np.float32)


def _band_statistics(spec: np.ndarray) -> np.ndarray:
    return np.concatenate([spec.mean(axis=1), spec.std(axis=1), spec.max(axis=1)])


def fit_logistic_baseline(specs: Spectrograms, targets: np.ndarray,
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


def baseline_scores(model: OneVsRestClassifier, specs: Spectrograms) -> np.ndarray:
    return model.predict_proba(clip_statistics(specs)).astype(np.float32)


def floor_test_lwlrap(dataset: FatDataset, features: FeatureConfig,
                      cache_dir: Path | None = None,
                      bad_audio: str = "stop") -> tuple[dict[str, float], dict[str, str]]:
    """Test lwlrap of the floor trained on the curated clips (`curated`) and on curated +
    noisy clips with their noisy labels (`curated_noisy`), from the pipeline's feature cache;
    and the clips left out because they cannot be decoded (path -> reason).

    Empty when the test clips have no labels. Clips that fail to decode stop it, as they
    stop a stage (BadAudioError), unless `bad_audio` is "skip": then they are left out.
    """
    if not dataset.has_test_truth:
        return {}, {}
    cache = FeatureCache(cache_dir, features)
    every_clip = pd.concat([dataset.curated, dataset.noisy_or_none, dataset.test])["path"]
    failures = cache.compute(list(every_clip), progress=False).failures
    if failures and bad_audio != "skip":
        raise BadAudioError(failures)

    def usable(frame: pd.DataFrame) -> pd.DataFrame:
        return frame[~frame["path"].astype(str).isin(failures)].reset_index(drop=True)

    test = usable(dataset.test)
    training_sets = {"curated": [dataset.curated]}
    if dataset.has_noisy:
        training_sets["curated_noisy"] = [dataset.curated, dataset.noisy]
    test_specs = cache.open(test["path"])
    floors = {}
    for name, parts in training_sets.items():
        train = usable(pd.concat(parts, ignore_index=True))
        model = fit_logistic_baseline(cache.open(train["path"]), dataset.targets(train))
        floors[name] = lwlrap(dataset.targets(test), baseline_scores(model, test_specs))
    return floors, failures
