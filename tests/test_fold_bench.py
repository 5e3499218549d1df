"""The GPU check's fold benchmark: packs real log-mels, then trains without MLflow or librosa."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fat_mlflow.benchmarks.fold import load_pack, pack
from fat_mlflow.config import get_profile
from fat_mlflow.data import load_dataset

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
    clips, vocabulary, n_folds = load_pack(packed)
    assert vocabulary == dataset.vocabulary and n_folds == get_profile("tiny").train.n_folds
    assert len(clips.specs) == len(dataset.noisy)
    np.testing.assert_array_equal(clips.targets, dataset.targets(dataset.noisy))
    assert max(s.shape[1] for s in clips.specs) <= 200
    assert set(clips.folds) == set(range(n_folds))


def test_one_fold_trains_without_mlflow_or_librosa(packed: Path, tmp_path: Path):
    out = tmp_path / "fold.jsonl"
    subprocess.run([sys.executable, "-c", WITHOUT_TRACKING, "run", "--pack", str(packed),
                    "--profile", "tiny", "--set", "train.epochs=2", "train.device=cpu",
                    "--out", str(out)], check=True, capture_output=True, text=True, timeout=300)
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["device"] == "cpu" and row["amp"] is False and row["epochs"] == 2
    assert row["samples_per_s"] > 0 and row["epoch_seconds_median"] > 0
    assert 0 < row["oof_lwlrap"] <= 1 and row["train_TFLOP_per_s"] > 0
