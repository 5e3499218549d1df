"""Shared fixtures: the real ESC-50 clips and a small demo dataset built from them once."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from fat_mlflow.demo import build_demo_dataset

DEMO_SCALE = 0.15  # ~70 curated, ~120 noisy, ~50 test clips; builds in a few seconds


@pytest.fixture(scope="session")
def esc50_dir() -> Path:
    """The ESC-50 folder: $FAT_MLFLOW_ESC50, else ../shared/data/esc50 beside the repository."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "esc50"
    path = Path(os.environ.get("FAT_MLFLOW_ESC50", default))
    if not (path / "meta" / "esc50.csv").is_file():
        pytest.skip(f"ESC-50 clips not found at {path}; set FAT_MLFLOW_ESC50")
    return path


@pytest.fixture(scope="session")
def demo_data(esc50_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a small FAT2019-layout dataset (seed 0, scale DEMO_SCALE); treat as read-only."""
    root = tmp_path_factory.mktemp("demo") / "data"
    build_demo_dataset(esc50_dir, root, seed=0, scale=DEMO_SCALE)
    return root
