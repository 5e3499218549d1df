"""K-fold cross-validation of one stage: train the fold models, collect out-of-fold scores.

The fold-k model trains on the stage's training clips outside fold k and then scores every
clip of fold k of BOTH sets (curated and noisy), whether or not that set was trained on:
those out-of-fold scores are the lwlrap columns of the seed's Table 2 and the input of the
noisy-sample selection. Persistence goes through a `FoldStore`, so the engine is free of
MLflow and a stage can resume at its first unfinished fold.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn

from fat_mlflow.config import Profile
from fat_mlflow.engine.metrics import lwlrap, per_sample_lwlrap
from fat_mlflow.engine.predict import predict_spectrograms
from fat_mlflow.engine.spectrograms import ClipSpectrograms, concat, take
from fat_mlflow.engine.timing import TRAINING_PHASE, PhaseClock
from fat_mlflow.engine.training import EpochLog, train_fold, training_precision


@dataclass
class ClipSet:
    """Clips of one set with their cached spectrograms, multi-hot targets and folds."""

    name: str
    fnames: list[str]
    specs: ClipSpectrograms
    targets: np.ndarray
    folds: np.ndarray  # -1 where a clip takes part in no fold (the test set)

    def subset(self, mask: np.ndarray) -> ClipSet:
        picked = np.flatnonzero(mask)
        return ClipSet(self.name, [self.fnames[i] for i in picked],
                       take(self.specs, picked), self.targets[picked], self.folds[picked])


@dataclass
class FoldResult:
    """What a finished fold leaves behind: its scores on each set's fold-k clips and on test."""

    fold: int
    oof: dict[str, np.ndarray]  # set name -> scores of that set's clips in this fold, in set order
    test: np.ndarray | None
    lwlrap: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # phase -> wall time (timing.py)


class FoldStore(Protocol):
    """Where fold models and results are kept (the MLflow run, or memory in a benchmark)."""

    def finished_folds(self) -> dict[int, FoldResult]: ...

    def log_epoch(self, fold: int, log: EpochLog) -> None: ...

    def save_fold(self, result: FoldResult, model: nn.Module) -> None: ...


@dataclass
class CrossValResult:
    oof: dict[str, pd.DataFrame]  # set name -> fname, fold, lwlrap, one score column per class
    lwlrap: dict[str, float]  # set name -> lwlrap over all its out-of-fold scores
    test_scores: np.ndarray | None  # mean over the fold models


ModelFactory = Callable[[int], nn.Module]


def run_cross_validation(
    sets: dict[str, ClipSet],
    train_masks: dict[str, np.ndarray],
    test: ClipSet | None,
    vocabulary: list[str],
    profile: Profile,
    make_model: ModelFactory,
    store: FoldStore,
    progress: bool = True,
    only_folds: list[int] | None = None,
) -> CrossValResult:
    """Train every unfinished fold, then assemble the stage's out-of-fold tables.

    `train_masks[name]` picks the clips of set `name` that the stage trains on; a set
    absent from it is only scored. `make_model(fold)` gives the fold's initial network
    (fresh, or warm-started from the earlier stage's fold model).
    """
    cfg = profile.train
    precision = training_precision(cfg)
    results = store.finished_folds()
    for fold in only_folds if only_folds is not None else range(cfg.n_folds):
        if fold in results:
            continue
        train_parts = [sets[name].subset(mask & (sets[name].folds != fold))
                       for name, mask in train_masks.items()]
        val_parts = [sets[name].subset(mask & (sets[name].folds == fold))
                     for name, mask in train_masks.items()]
        fold_seed = cfg.seed * 1000 + fold
        torch.manual_seed(fold_seed)
        clock = PhaseClock()
        with clock.phase("model_setup"):  # a warm start downloads the earlier fold model
            model = make_model(fold)
        history = train_fold(
            model,
            concat([part.specs for part in train_parts]),
            np.concatenate([part.targets for part in train_parts]),
            concat([part.specs for part in val_parts]),
            np.concatenate([part.targets for part in val_parts]),
            cfg, profile.augment, fold_seed, on_epoch=partial(_log_epoch, store, fold, clock),
            progress=progress, desc=f"fold {fold + 1}/{cfg.n_folds}",
        )
        clock.add(TRAINING_PHASE, sum(log.train_seconds for log in history))
        clock.add("validation", sum(log.validation_seconds for log in history))
        result = _score_fold(model, fold, sets, test, cfg, precision, clock)
        store.save_fold(result, model)
        results[fold] = result
    return assemble(sets, results, vocabulary, test)


def _log_epoch(store: FoldStore, fold: int, clock: PhaseClock, log: EpochLog) -> None:
    with clock.phase("epoch_logging"):
        store.log_epoch(fold, log)


def _score_fold(model, fold, sets, test, cfg, precision, clock: PhaseClock) -> FoldResult:
    scoring = precision.prepare_for_scoring(model)  # as the served tagger scores

    def score(specs):
        if len(specs) == 0:
            return np.zeros((0, len(next(iter(sets.values())).targets[0])), np.float32)
        return predict_spectrograms([scoring], specs, cfg.crop_frames, cfg.window_step,
                                    cfg.eval_batch_size, precision)

    oof, fold_lwlrap = {}, {}
    with clock.phase("oof_scoring"):
        for name, clip_set in sets.items():
            held_out = clip_set.subset(clip_set.folds == fold)
            oof[name] = score(held_out.specs)
            if held_out.targets.sum() > 0:
                fold_lwlrap[name] = lwlrap(held_out.targets, oof[name])
    with clock.phase("test_scoring"):
        test_scores = score(test.specs) if test is not None else None
    return FoldResult(fold, oof, test_scores, fold_lwlrap, clock.seconds)


def assemble(
    sets: dict[str, ClipSet],
    results: dict[int, FoldResult],
    vocabulary: list[str],
    test: ClipSet | None,
) -> CrossValResult:
    """Stitch the per-fold scores back into set order; folds not (yet) run are left out."""
    tables, overall = {}, {}
    for name, clip_set in sets.items():
        scores = np.full((len(clip_set.fnames), len(vocabulary)), np.nan, dtype=np.float32)
        for fold, result in results.items():
            scores[clip_set.folds == fold] = result.oof[name]
        done = ~np.isnan(scores).any(axis=1)
        table = pd.DataFrame(scores[done], columns=vocabulary)
        table.insert(0, "fname", np.asarray(clip_set.fnames)[done])
        table.insert(1, "fold", clip_set.folds[done])
        table.insert(2, "lwlrap", per_sample_lwlrap(clip_set.targets[done], scores[done])
                     if done.any() else np.zeros(0))
        tables[name] = table
        if done.any() and clip_set.targets[done].sum() > 0:
            overall[name] = lwlrap(clip_set.targets[done], scores[done])
    test_scores = None
    if test is not None and results:
        # in fold order: folds read back from a store (fold jobs) average like a single run's
        test_scores = np.mean([results[fold].test for fold in sorted(results)], axis=0)
        if test.targets.sum() > 0:
            overall["test"] = lwlrap(test.targets, test_scores)
    return CrossValResult(tables, overall, test_scores)
