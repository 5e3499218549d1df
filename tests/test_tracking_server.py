"""The whole pipeline against a shared tracking server, as docs/tracking-server.md sets it up.

`mlflow server` keeps runs and the registry in a real PostgreSQL database and proxies the
artifacts (`--serve-artifacts`) into a folder; the pipeline process knows the server only
from MLFLOW_TRACKING_URI=http://..., so every run, metric, artifact and model version has
to travel over HTTP.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import psycopg2
import pytest
from mlflow.entities import Run, ViewType
from mlflow.tracking import MlflowClient
from servers import Database, PostgresUnavailable, mlflow_tracking_server, postgres_database

from fat_mlflow.data.layout import load_dataset
from fat_mlflow.engine.models import load_checkpoint
from fat_mlflow.serving.tagger import ERROR_COLUMN, TOP_LABELS_COLUMN, load_local_model
from fat_mlflow.warmup.tracking import DEFAULT_EXPERIMENT, configure_tracking

pytestmark = pytest.mark.slow

MODEL = "fat2019-tagger"
STAGES = ("stage1", "stage2", "stage3", "stage4")
PIPELINE_TIMEOUT_S = 600


@dataclass(frozen=True)
class TrackingServer:
    url: str
    database: Database
    artifacts: Path  # --artifacts-destination

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.url)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    """PostgreSQL + `mlflow server --serve-artifacts` on loopback; both gone after the module."""
    root = tmp_path_factory.mktemp("tracking-server")
    with contextlib.ExitStack() as stack:
        try:
            database = stack.enter_context(postgres_database())
        except PostgresUnavailable as error:
            pytest.skip(f"PostgreSQL cannot run on this machine: {error}")
        url = stack.enter_context(
            mlflow_tracking_server(database.store_uri, root / "artifacts", root / "server.log"))
        yield TrackingServer(url, database, root / "artifacts")


@dataclass(frozen=True)
class PipelineRuns:
    parent: Run
    stages: dict[str, Run]  # fat.stage tag (features, stage1..4, ensemble) -> child run


@pytest.fixture(scope="module")
def pipeline(server: TrackingServer, demo_data: Path,
             tmp_path_factory: pytest.TempPathFactory) -> PipelineRuns:
    """`fat-mlflow pipeline` (tiny, 1 epoch) in a subprocess that knows the server only from
    the variable. Threshold 0: stage 3 selects noisy clips."""
    cwd = tmp_path_factory.mktemp("pipeline-cwd")
    done = subprocess.run(
        [sys.executable, "-c", "from fat_mlflow.cli import main; main()", "pipeline",
         "--data", str(demo_data), "--profile", "tiny",
         "--set", "train.epochs=1 train.width=0.0625", "--threshold", "0"],
        cwd=cwd, env={**os.environ, "MLFLOW_TRACKING_URI": server.url},
        capture_output=True, text=True, timeout=PIPELINE_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    # nothing fell back to a local store in the working directory
    assert list(cwd.iterdir()) == []
    client = server.client()
    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT).experiment_id
    parents = client.search_runs([experiment], "tags.`fat.stage` = 'pipeline'")
    assert len(parents) == 1
    parent = parents[0]
    children = client.search_runs([experiment],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return PipelineRuns(parent, {run.data.tags["fat.stage"]: run for run in children})


def test_pipeline_runs_metrics_and_registered_model_are_on_the_server(server, pipeline):
    assert pipeline.parent.info.status == "FINISHED"
    assert set(pipeline.stages) == {"features", *STAGES, "ensemble", "distill"}
    for stage in STAGES:
        run = pipeline.stages[stage]
        assert run.info.status == "FINISHED" and run.data.tags["fat.complete"] == "true", stage
        for metric in ("lwlrap_noisy", "lwlrap_curated", "lwlrap_test"):
            assert 0 <= run.data.metrics[metric] <= 1, (stage, metric)
    assert pipeline.stages["stage3"].data.metrics["selected_clips"] > 0
    client = server.client()
    history = client.get_metric_history(pipeline.stages["stage1"].info.run_id, "fold0_train_loss")
    assert [point.step for point in history] == [0]  # one point per epoch
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert version.run_id == pipeline.stages["ensemble"].info.run_id
    assert version.status == "READY"


def test_artifacts_travel_through_the_proxy_into_the_destination(server, pipeline, tmp_path):
    stage1 = pipeline.stages["stage1"]
    prefix = "mlflow-artifacts:/"
    assert stage1.info.artifact_uri.startswith(prefix)  # the client never sees the folder
    stored = server.artifacts / stage1.info.artifact_uri.removeprefix(prefix)
    downloaded = {}
    for artifact in ("folds/fold_0/model.pt", "oof/noisy.csv"):
        downloaded[artifact] = Path(mlflow.artifacts.download_artifacts(
            run_id=stage1.info.run_id, artifact_path=artifact, dst_path=str(tmp_path),
            tracking_uri=server.url))
        assert downloaded[artifact].read_bytes() == (stored / artifact).read_bytes(), artifact
    model = load_checkpoint(downloaded["folds/fold_0/model.pt"])
    assert sum(p.numel() for p in model.parameters()) > 0
    oof = pd.read_csv(downloaded["oof/noisy.csv"])
    assert {"fname", "fold", "lwlrap"} <= set(oof.columns)
    assert set(oof["fold"]) == {0, 1}
    report = server.client().list_artifacts(pipeline.parent.info.run_id, "report")
    assert {a.path for a in report} >= {"report/stage_table.csv", "report/stage_table.png"}


def test_runs_and_registry_are_rows_in_postgresql(server, pipeline):
    client = server.client()
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    n_runs = len(client.search_runs(experiments, run_view_type=ViewType.ALL))
    with contextlib.closing(psycopg2.connect(server.database.dsn)) as connection, \
            connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM runs")
        assert cursor.fetchone()[0] == n_runs >= 1 + len(pipeline.stages)
        cursor.execute("SELECT count(*) FROM model_versions WHERE name = %s", (MODEL,))
        assert cursor.fetchone()[0] == 1
        cursor.execute("SELECT alias FROM registered_model_aliases WHERE name = %s", (MODEL,))
        assert cursor.fetchall() == [("champion",)]
        cursor.execute("SELECT artifact_location FROM experiments WHERE name = %s",
                       (DEFAULT_EXPERIMENT,))
        assert cursor.fetchone()[0].startswith("mlflow-artifacts:")


def test_configure_tracking_follows_the_variable_and_loads_the_champion(
        server, pipeline, demo_data, tracking, monkeypatch):
    # `tracking` has already pointed this process at a SQLite store: the variable must win
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    assert configure_tracking() == server.url
    assert mlflow.get_tracking_uri() == server.url
    model = load_local_model(f"models:/{MODEL}@champion")
    dataset = load_dataset(demo_data)
    scored = model.predict(pd.DataFrame({"path": dataset.test["path"].head(2)}))
    assert scored[ERROR_COLUMN].tolist() == ["", ""]
    scores = scored.drop(columns=[ERROR_COLUMN, TOP_LABELS_COLUMN]).to_numpy(float)
    assert scores.shape == (2, len(dataset.vocabulary))
    assert ((scores >= 0) & (scores <= 1)).all()
