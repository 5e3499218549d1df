"""FAT2019's size in small: the rehearsal dataset's shape, and stage 1 of a scaled rehearsal
under a low open-files limit (the per-clip memory maps of the old cache stopped it with
"Too many open files": one descriptor per clip)."""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from mlflow.tracking import MlflowClient

from fat_mlflow.config import RehearsalConfig
from fat_mlflow.data.layout import load_dataset
from fat_mlflow.data.demo import read_meta
from fat_mlflow.warmup.pipeline import JOB_ENTRY
from fat_mlflow.data.rehearsal import CLASSES_FILE, PLAN_FILE, _source_pools, build_rehearsal_dataset

SCALE = 0.02  # 585 clips, all read by stage 1: over twice the limit below
SECONDS_SCALE = 0.1  # noisy clips of 1.5 s
RECIPE = RehearsalConfig(sources_per_class=2)  # decodes ~200 ESC-50 clips, not 909
OPEN_FILES = 256


@pytest.fixture(scope="module")
def rehearsal(esc50_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rehearsal") / "data"
    build_rehearsal_dataset(esc50_dir, root, scale=SCALE, seconds_scale=SECONDS_SCALE,
                            recipe=RECIPE, progress=False)
    return root


def test_rehearsal_has_fat2019s_layout_classes_and_label_noise(rehearsal: Path):
    dataset = load_dataset(rehearsal)  # validates every CSV against the audio folders
    assert len(dataset.vocabulary) == 80
    counts = (len(dataset.curated), len(dataset.noisy), len(dataset.test))
    assert counts == (round(SCALE * 4970), round(SCALE * 19815), round(SCALE * 4500))
    classes = pd.read_csv(rehearsal / CLASSES_FILE)
    pairs = [set(parts.split("+")) for parts in classes["esc50_classes"] if "+" in parts]
    assert len(pairs) == 80 - 49
    truth = pd.read_csv(rehearsal / "noise_truth.csv")
    assert truth["labels_correct"].mean() == pytest.approx(0.5, abs=0.01)
    labelled = [*dataset.curated["labels"], *dataset.test["labels"],
                *truth["true_labels"].str.split(",")]
    assert 0.08 < np.mean([len(labels) == 2 for labels in labelled]) < 0.22
    for labels in labelled:  # a pair is a class of its own: never two labels of one clip
        assert not any(pair <= set(labels) for pair in pairs)
    for clip in (rehearsal / "train_curated").iterdir():  # never rounded to digital silence
        assert np.abs(sf.read(clip)[0]).max() >= 0.29


def test_no_test_recording_is_heard_in_training(esc50_dir: Path):
    pools = _source_pools(read_meta(esc50_dir, "demo"), RehearsalConfig(),
                          np.random.default_rng(0))
    assert not set(pools["test"]["src_file"]) & set(pools["train"]["src_file"])
    assert pools["test"]["category"].nunique() == pools["train"]["category"].nunique() == 49


def test_an_interrupted_build_resumes_with_the_same_files(esc50_dir: Path, rehearsal: Path,
                                                          tmp_path: Path):
    """A build killed half-way leaves whole clips in its staging folder; the rerun keeps them
    and writes the rest, and the result is the uninterrupted build's, byte for byte."""
    staging = tmp_path / ".data.building"
    shutil.copytree(rehearsal, staging)
    settings = {"recipe": "rehearsal", "seed": 0, "scale": SCALE,
                "seconds_scale": SECONDS_SCALE, "rehearsal": dataclasses.asdict(RECIPE)}
    (staging / PLAN_FILE).write_text(json.dumps(settings, sort_keys=True))
    clips = sorted((staging / "train_noisy").iterdir())
    for clip in clips[::2]:
        clip.unlink()
    (staging / "demo_summary.json").unlink()
    summary = build_rehearsal_dataset(esc50_dir, tmp_path / "data", scale=SCALE,
                                      seconds_scale=SECONDS_SCALE, recipe=RECIPE,
                                      progress=False)
    total = sum(summary[f"n_{split}"] for split in ("train_curated", "train_noisy", "test"))
    assert summary["resumed_clips"] == total - len(clips[::2])
    for clip in clips:
        assert (tmp_path / "data" / "train_noisy" / clip.name).read_bytes() == (
            rehearsal / "train_noisy" / clip.name).read_bytes()


def _limit_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))


def test_stage1_of_a_scaled_rehearsal_runs_under_256_open_files(rehearsal: Path,
                                                                tmp_path: Path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = subprocess.run(
        [sys.executable, "-c", JOB_ENTRY, "stage1", "--data", str(rehearsal), "--profile",
         "tiny", "--set", "train.epochs=1 train.batch_size=32", "--cache-dir",
         str(tmp_path / "cache")],
        preexec_fn=_limit_open_files, capture_output=True, text=True, timeout=600,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri}, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    run_id = done.stdout.rsplit("stage1 run: ", 1)[1].split()[0]
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.tags["fat.complete"] == "true"
    assert 0 < run.data.metrics["peak_rss_mb"] < 4000
