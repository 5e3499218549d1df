"""Shared fixtures: the real ESC-50 clips and a small demo dataset built from them once."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import pandas as pd
import pytest

from fat_mlflow.config import DistillConfig
from fat_mlflow.data.demo import build_demo_dataset

DEMO_SCALE = 0.15  # ~70 curated, ~120 noisy, ~50 test clips; builds in a few seconds


@pytest.fixture(scope="session")
def esc50_dir() -> Path:
    """The ESC-50 folder: $FAT_MLFLOW_ESC50, else ../shared/data/esc50 beside the repository."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "esc50"
    path = Path(os.environ.get("FAT_MLFLOW_ESC50", default))
    if not (path / "meta" / "esc50.csv").is_file():
        pytest.fail(f"ESC-50 clips not found at {path}: the tests run on real audio; "
                    "put ../shared beside the repository or set FAT_MLFLOW_ESC50")
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


# configure_tracking exports the experiment's name; a store's experiment must not leak into
# the next store (nor into the `mlflow run` subprocesses of other tests)
EXPERIMENT_VARIABLES = ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")


@contextlib.contextmanager
def isolated_tracking(root: Path):
    """A fresh SQLite tracking store whose artifacts also live under `root`."""
    import mlflow

    previous_dir, previous_uri = Path.cwd(), os.environ.get("MLFLOW_TRACKING_URI")
    previous_experiment = {name: os.environ.pop(name, None) for name in EXPERIMENT_VARIABLES}
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
        for name, value in previous_experiment.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
        mlflow.set_tracking_uri(previous_uri or "")


@pytest.fixture(scope="session")
def isolated_store():
    """`isolated_tracking` itself, for module- and session-scoped fixtures."""
    return isolated_tracking


@pytest.fixture()
def tracking(tmp_path: Path):
    """Per-test tracking store (SQLite + artifacts in tmp_path); yields the tracking URI."""
    with isolated_tracking(tmp_path) as uri:
        yield uri


# the tiny profile's width: the student starts from the stage-4 fold model
TINY_STUDENT = DistillConfig(width=0.125, epochs=1, teacher_step=64, window_step=96)


@dataclasses.dataclass
class TinyChain:
    """The whole pipeline (stages 1-4, ensemble, student), `tiny` profile, run once per
    session."""

    root: Path
    tracking_uri: str
    data: Path
    pipeline_run_id: str
    runs: dict[str, str]  # stage -> run ID
    table: pd.DataFrame

    @contextlib.contextmanager
    def store(self):
        with isolated_tracking(self.root) as uri:
            yield uri


@pytest.fixture(scope="session")
def tiny_chain(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyChain:
    from fat_mlflow.config import get_profile
    from fat_mlflow.serving.distill import distill_and_register
    from fat_mlflow.serving.ensemble import build_and_register
    from fat_mlflow.warmup.pipeline import PipelineRequest, run_pipeline

    root = tmp_path_factory.mktemp("chain")
    request = PipelineRequest(data=demo_data, profile=get_profile("tiny"), archs=["cnn"],
                              esc50=Path("unused"), threshold=0.0, progress=False,
                              distill=TINY_STUDENT)
    with isolated_tracking(root) as uri:
        parent, table = run_pipeline(request, build_and_register, distill_and_register)
    runs = dict(zip(table["stage"], table["run_id"]))
    return TinyChain(root, uri, demo_data, parent, runs, table)


@dataclasses.dataclass
class RegisteredTagger:
    """A tracking store holding a registered tagger (its alias `champion`)."""

    root: Path
    tracking_uri: str
    model_uri: str

    def store(self):
        return isolated_tracking(self.root)


@pytest.fixture(scope="session")
def registered_tagger(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> RegisteredTagger:
    """A real tiny stage-1 run (one epoch) ensembled and registered: what serving and Spark
    score. Built without `data`: test_ensemble.py covers the scoring; the input example comes
    from the dataset recorded on the stage run."""
    from fat_mlflow.config import get_profile
    from fat_mlflow.serving.ensemble import build_ensemble
    from fat_mlflow.warmup.stage_inputs import StageRequest
    from fat_mlflow.warmup.stages import run_stage

    name = "fat2019-tagger-served"
    root = tmp_path_factory.mktemp("served-store")
    with isolated_tracking(root) as uri:
        run_id = run_stage(StageRequest(stage="stage1", data=demo_data,
                                        profile=get_profile("tiny", {"train.epochs": 1}),
                                        cache_dir=root / "cache", progress=False))
        build_ensemble([run_id], registered_model=name)
    return RegisteredTagger(root, uri, f"models:/{name}@champion")
