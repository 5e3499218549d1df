"""Shared fixtures: the real ESC-50 clips and a small demo dataset built from them once."""
from __future__ import annotations

import contextlib
import dataclasses
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


@pytest.fixture(scope="session", autouse=True)
def shared_feature_cache(tmp_path_factory: pytest.TempPathFactory):
    """One feature cache for the whole session: every stage test reuses the same log-mels."""
    previous = os.environ.get("FAT_MLFLOW_CACHE")
    os.environ["FAT_MLFLOW_CACHE"] = str(tmp_path_factory.mktemp("feature-cache"))
    yield
    if previous is None:
        del os.environ["FAT_MLFLOW_CACHE"]
    else:
        os.environ["FAT_MLFLOW_CACHE"] = previous


@contextlib.contextmanager
def isolated_tracking(root: Path):
    """A fresh SQLite tracking store whose artifacts also live under `root`."""
    import mlflow

    previous_dir, previous_uri = Path.cwd(), os.environ.get("MLFLOW_TRACKING_URI")
    uri = f"sqlite:///{root}/mlflow.db"
    os.chdir(root)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        while mlflow.active_run():
            mlflow.end_run("FAILED")
        os.chdir(previous_dir)
        if previous_uri is None:
            del os.environ["MLFLOW_TRACKING_URI"]
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_uri
        mlflow.set_tracking_uri(previous_uri or "")


@pytest.fixture()
def tracking(tmp_path: Path):
    """Per-test tracking store (SQLite + artifacts in tmp_path); yields the tracking URI."""
    with isolated_tracking(tmp_path) as uri:
        yield uri


@dataclasses.dataclass
class TinyChain:
    """Stages 1-4 trained once per session with the `tiny` profile on the demo data."""

    root: Path
    tracking_uri: str
    data: Path
    runs: dict[str, str]

    @contextlib.contextmanager
    def store(self):
        with isolated_tracking(self.root) as uri:
            yield uri


@pytest.fixture(scope="session")
def tiny_chain(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyChain:
    from fat_mlflow.config import get_profile
    from fat_mlflow.stages import StageRequest, run_stage

    root = tmp_path_factory.mktemp("chain")
    profile = get_profile("tiny")
    runs: dict[str, str] = {}
    with isolated_tracking(root) as uri:
        base = dict(data=demo_data, profile=profile, progress=False)
        runs["stage1"] = run_stage(StageRequest(stage="stage1", **base))
        runs["stage2"] = run_stage(StageRequest(stage="stage2", init_run_id=runs["stage1"], **base))
        runs["stage3"] = run_stage(StageRequest(
            stage="stage3", init_run_id=runs["stage2"],
            selection_run_ids=[runs["stage1"], runs["stage2"]], threshold=0.0, **base))
        runs["stage4"] = run_stage(StageRequest(
            stage="stage4", init_run_id=runs["stage3"], selection_run_ids=[runs["stage3"]], **base))
    return TinyChain(root, uri, demo_data, runs)
