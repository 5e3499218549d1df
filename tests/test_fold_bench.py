"""The GPU check's fold benchmark: packs real log-mels, then trains without MLflow or librosa."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fat_mlflow.benchmarks.fold import load_pack, pack
from fat_mlflow.config import get_profile
from fat_mlflow.data.layout import load_dataset
from fat_mlflow.engine.precision import bf16_units

# What the GPU machine lacks, made unimportable in the child process.
WITHOUT_TRACKING = ("import runpy, sys\n"
                    "for name in ('mlflow', 'librosa', 'sklearn', 'soundfile'):\n"
                    "    sys.modules[name] = None\n"
                    "sys.argv = ['fold', *sys.argv[1:]]\n"
                    "runpy.run_module('fat_mlflow.benchmarks.fold', run_name='__main__')\n")


@pytest.fixture(scope="module")
def packed(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pack") / "noisy.npz"
    pack(demo_data, path, get_profile("tiny"), cache_dir=None, max_frames=200)
    return path


def test_pack_keeps_every_noisy_clip_with_its_labels(packed: Path, demo_data: Path):
    dataset = load_dataset(demo_data)
    loaded = load_pack(packed)
    clips = loaded.train
    assert loaded.vocabulary == dataset.vocabulary
    assert loaded.n_folds == get_profile("tiny").train.n_folds and loaded.test is None
    assert clips.name == "noisy" and len(clips.specs) == len(dataset.noisy)
    np.testing.assert_array_equal(clips.targets, dataset.targets(dataset.noisy))
    assert max(s.shape[1] for s in clips.specs) <= 200
    assert set(clips.folds) == set(range(loaded.n_folds))


def test_one_fold_trains_without_mlflow_or_librosa(packed: Path, tmp_path: Path):
    row = _run_fold(packed, tmp_path)
    assert row["device"] == "cpu" and row["epochs"] == 2
    assert row["amp"] is (bf16_units(torch.device("cpu")) is not None)  # bf16 where it is fast
    assert row["samples_per_s"] > 0 and row["epoch_seconds_median"] > 0
    assert 0 < row["oof_lwlrap"] <= 1 and row["train_TFLOP_per_s"] > 0
    assert row["split"] == "noisy" and np.isnan(row["test_lwlrap"])


def test_curated_pack_with_test_reports_the_fold_models_test_lwlrap(demo_data: Path,
                                                                     tmp_path: Path):
    dataset = load_dataset(demo_data)
    path = tmp_path / "curated.npz"
    pack(demo_data, path, get_profile("tiny"), cache_dir=None, split="curated", with_test=True)
    loaded = load_pack(path)
    assert loaded.train.name == "curated" and len(loaded.train.specs) == len(dataset.curated)
    np.testing.assert_array_equal(loaded.test.targets, dataset.targets(dataset.test))
    assert (loaded.test.folds == -1).all()
    row = _run_fold(path, tmp_path, "augment.specmix=false", "train.seed=3")
    assert row["split"] == "curated" and row["seed"] == 3 and row["specmix"] is False
    assert 0 < row["test_lwlrap"] <= 1


def _run_fold(path: Path, tmp_path: Path, *overrides: str) -> dict:
    out = tmp_path / "fold.jsonl"
    subprocess.run([sys.executable, "-c", WITHOUT_TRACKING, "run", "--pack", str(path),
                    "--profile", "tiny", "--set", "train.epochs=2", "train.device=cpu",
                    *overrides, "--out", str(out)], check=True, capture_output=True, text=True,
                   timeout=300)
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    return row
