"""The training engine without MLflow: batches, windows, folds, fold training and resume."""
import numpy as np
import pandas as pd
import pytest
import torch

from fat_mlflow.config import get_profile
from fat_mlflow.engine.crossval import ClipSet, run_cross_validation
from fat_mlflow.engine.dataset import (
    centre_windows,
    to_network_input,
    training_batches,
    window_starts,
)
from fat_mlflow.engine.folds import assign_folds, folds_for, stratified_folds
from fat_mlflow.engine.models import build_model
from fat_mlflow.engine.predict import predict_spectrograms
from fat_mlflow.engine.training import steps_per_epoch


def test_network_input_is_standardised_per_image_and_three_channels():
    crops = np.random.default_rng(0).normal(-40, 12, size=(4, 128, 128)).astype(np.float32)
    crops[1] += 30  # a louder clip must come out the same after standardisation
    x = to_network_input(crops)
    assert x.shape == (4, 3, 128, 128)
    assert torch.equal(x[:, 0], x[:, 2])
    assert x.mean(dim=(2, 3)).abs().max() < 1e-4
    assert (x.std(dim=(2, 3)) - 1).abs().max() < 1e-3


def test_window_starts_follow_the_seed_step():
    assert window_starts(128, 128, 48).tolist() == [0]
    assert window_starts(320, 128, 48).tolist() == [0, 48, 96, 144, 192]
    with pytest.raises(ValueError, match="fewer than one window"):
        window_starts(100, 128, 48)


def test_cover_end_adds_a_window_only_where_the_tail_is_unheard():
    assert window_starts(318, 128, 96, cover_end=True).tolist() == [0, 96, 190]
    assert window_starts(320, 128, 96, cover_end=True).tolist() == [0, 96, 192]  # reaches it
    assert window_starts(128, 128, 96, cover_end=True).tolist() == [0]


def test_validation_window_is_the_middle_of_the_clip():
    spec = np.tile(np.arange(300, dtype=np.float32), (4, 1))
    middle, whole = centre_windows([spec, spec[:, :128]], 128)
    assert middle[0].tolist() == list(range(86, 214))
    assert whole.shape == (4, 128)


def test_training_batches_cover_every_clip_once_and_skip_a_lone_last_clip():
    specs = [np.full((8, 20 + i), i, np.float32) for i in range(9)]
    targets = np.eye(9, dtype=np.float32)
    batches = list(training_batches(specs, targets, 4, 16, np.random.default_rng(0)))
    assert [len(y) for _, y in batches] == [4, 4]  # the 9th clip alone would break BatchNorm
    assert steps_per_epoch(9, 4) == 2 and steps_per_epoch(10, 4) == 3


def test_prediction_averages_windows_then_models():
    torch.manual_seed(0)
    models = [build_model("cnn", 5, 0.125).eval() for _ in range(2)]
    rng = np.random.default_rng(1)
    specs = [rng.normal(size=(128, n)).astype(np.float32) for n in (128, 300)]
    got = predict_spectrograms(models, specs, 128, 48, batch_size=3)
    with torch.inference_mode():
        for clip, spec in enumerate(specs):
            windows = np.stack([spec[:, s:s + 128] for s in window_starts(spec.shape[1], 128, 48)])
            x = to_network_input(windows)
            expected = np.mean([torch.sigmoid(m(x)).mean(0).numpy() for m in models], axis=0)
            np.testing.assert_allclose(got[clip], expected, atol=1e-5)


def test_folds_are_stratified_deterministic_and_reloadable():
    targets = np.zeros((60, 3), np.float32)
    targets[np.arange(60), np.arange(60) % 3] = 1
    folds = stratified_folds(targets, 3, seed=7)
    assert np.array_equal(folds, stratified_folds(targets, 3, seed=7))
    counts = pd.crosstab(folds, targets.argmax(1))
    assert (counts.values == 20 // 3).sum() + (counts.values == 20 // 3 + 1).sum() == 9
    fnames = pd.Series([f"{i}.wav" for i in range(60)])
    table = assign_folds({"curated": (fnames, targets)}, 3, 7)
    assert np.array_equal(folds_for(table, "curated", fnames[::-1]), folds[::-1])
    with pytest.raises(ValueError, match="no fold"):
        folds_for(table, "curated", pd.Series(["other.wav"]))


class MemoryStore:
    """A FoldStore in memory: the engine must not need MLflow."""

    def __init__(self):
        self.results, self.epochs, self.trained = {}, [], []

    def finished_folds(self):
        return dict(self.results)

    def log_epoch(self, fold, log):
        self.epochs.append((fold, log.epoch))

    def save_fold(self, result, model):
        self.trained.append(result.fold)
        self.results[result.fold] = result


def toy_sets(n=24, n_classes=4):
    rng = np.random.default_rng(3)
    targets = np.zeros((n, n_classes), np.float32)
    targets[np.arange(n), np.arange(n) % n_classes] = 1
    specs = [rng.normal(size=(32, 40 + i)).astype(np.float32) for i in range(n)]
    folds = stratified_folds(targets, 2, seed=0)
    names = [f"{i}.wav" for i in range(n)]
    return {"curated": ClipSet("curated", names, specs, targets, folds),
            "noisy": ClipSet("noisy", names, specs, targets, folds)}


def toy_profile(**overrides):
    return get_profile("tiny", {"train.crop_frames": "32", "train.window_step": "8", **overrides})


def cross_validate(store, profile=None):
    profile = profile or toy_profile()
    sets = toy_sets()
    return run_cross_validation(
        sets, {"curated": np.ones(24, bool)}, None, ["a", "b", "c", "d"], profile,
        lambda fold: build_model("cnn", 4, 0.125), store, progress=False)


def test_cross_validation_scores_both_sets_out_of_fold_and_resumes():
    store = MemoryStore()
    result = cross_validate(store)
    assert store.trained == [0, 1]
    assert sorted(set(store.epochs)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for name in ("curated", "noisy"):
        table = result.oof[name]
        assert len(table) == 24 and set(table["fold"]) == {0, 1}
        assert table["lwlrap"].between(0, 1).all()
        assert 0 <= result.lwlrap[name] <= 1
    for fold_result in store.results.values():  # where each fold's time went
        assert set(fold_result.seconds) == {"model_setup", "train_steps", "validation",
                                            "epoch_logging", "oof_scoring", "test_scoring"}
        assert fold_result.seconds["train_steps"] > 0
    # a second call with the same store trains nothing and gives the same tables
    again = cross_validate(store)
    assert store.trained == [0, 1]
    pd.testing.assert_frame_equal(again.oof["noisy"], result.oof["noisy"])


@pytest.mark.parametrize("amp", ["true", "false"], ids=["bf16-where-fast", "float32"])
def test_same_seed_same_predictions_on_cpu(amp):
    profile = toy_profile(**{"train.amp": amp})
    first, second = cross_validate(MemoryStore(), profile), cross_validate(MemoryStore(), profile)
    pd.testing.assert_frame_equal(first.oof["curated"], second.oof["curated"])
    third = cross_validate(MemoryStore(), toy_profile(**{"train.amp": amp, "train.seed": "5"}))
    assert not np.allclose(third.oof["curated"]["a"], first.oof["curated"]["a"])
