"""Fold-parallel stages: fold jobs in parallel processes, gathered into one stage run.

The parallel stage comes from the pipeline's own launcher (`run_or_reuse` with fold_jobs=2:
the stage run is prepared here, two `fat-mlflow stage1 --resume-run-id R --folds k`
processes train at once, the stage is gathered here) and must equal a sequential run with
the same seed, number for number. Both pin train.num_threads=1 (CPU results depend on it)
and train for one epoch per fold.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from fat_mlflow.cli import main
from fat_mlflow.config import get_profile
from fat_mlflow.data.layout import dataset_fingerprint, load_dataset
from fat_mlflow.warmup.pipeline import (
    TAG_INPUTS,
    FoldJobError,
    fold_job_environments,
    run_fold_jobs,
    run_or_reuse,
    threads_per_job,
)
from fat_mlflow.warmup.stage_inputs import StageRequest, format_folds, parse_folds
from fat_mlflow.warmup.stages import FOLD_JOB, run_stage

PINNED = {"train.num_threads": "1", "train.epochs": "1"}
CLI_STAGE1 = ["stage1", "--profile", "tiny", "--set", "train.num_threads=1 train.epochs=1"]
TABLES = ("oof/noisy.csv", "oof/curated.csv", "test_scores.csv")
METRICS = ("lwlrap_noisy", "lwlrap_curated", "lwlrap_test", "fold0_lwlrap_noisy",
           "fold1_lwlrap_curated")


@dataclasses.dataclass
class Stage1Runs:
    root: Path
    isolate: Callable  # conftest's isolated_tracking
    request: StageRequest
    sequential: str
    parallel: str
    pipeline: str

    def store(self):
        return self.isolate(self.root)


def artifacts(client: MlflowClient, run_id: str) -> Path:
    return Path(urlparse(client.get_run(run_id).info.artifact_uri).path)


def tables(folder: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_csv(folder / name) for name in TABLES}


@pytest.fixture(scope="module")
def stage1(demo_data: Path, tmp_path_factory, isolated_store) -> Stage1Runs:
    """The same stage 1 twice: in this process, and as two parallel fold jobs."""
    root = tmp_path_factory.mktemp("fold-jobs")
    request = StageRequest(stage="stage1", data=demo_data, profile=get_profile("tiny", PINNED),
                           progress=False)
    threads = torch.get_num_threads()
    with isolated_store(root):
        try:
            sequential = run_stage(request)
        finally:
            torch.set_num_threads(threads)  # the pinned count must not leak into other tests
        with mlflow.start_run(run_name="pipeline") as pipeline:
            parallel = run_or_reuse(replace(request, pipeline_run_id=pipeline.info.run_id),
                                    dataset_fingerprint(load_dataset(demo_data)), fold_jobs=2)
    return Stage1Runs(root, isolated_store, request, sequential, parallel, pipeline.info.run_id)


def test_two_parallel_fold_jobs_gather_into_the_sequential_stage(stage1):
    with stage1.store():
        client = MlflowClient()
        sequential, parallel = client.get_run(stage1.sequential), client.get_run(stage1.parallel)
        assert parallel.data.tags["fat.complete"] == "true"
        assert parallel.data.tags["mlflow.parentRunId"] == stage1.pipeline
        assert TAG_INPUTS in parallel.data.tags
        assert parallel.data.params == sequential.data.params
        for key in METRICS:
            assert parallel.data.metrics[key] == sequential.data.metrics[key], key
        expected = tables(artifacts(client, stage1.sequential))
        for name, table in tables(artifacts(client, stage1.parallel)).items():
            pd.testing.assert_frame_equal(table, expected[name], check_exact=True, obj=name)
        history = client.get_metric_history(stage1.parallel, "fold1_val_lwlrap")
        assert [point.step for point in history] == [0]
        assert "curves.png" in {a.path for a in client.list_artifacts(stage1.parallel)}

        jobs = client.search_runs(
            [parallel.info.experiment_id],
            f"tags.`mlflow.parentRunId` = '{stage1.parallel}' and tags.`fat.stage` = '{FOLD_JOB}'")
        assert sorted(job.data.params["fold_job.folds"] for job in jobs) == ["0", "1"]
        assert {job.info.status for job in jobs} == {"FINISHED"}
        assert {job.data.params["fold_job.num_threads"] for job in jobs} == {"1"}
        # in parallel: each job started before the other one ended
        assert max(j.info.start_time for j in jobs) < min(j.info.end_time for j in jobs)


def test_gather_names_the_missing_folds_and_completes_once_they_exist(stage1):
    runner = CliRunner()
    with stage1.store():
        client = MlflowClient()
        prepared = runner.invoke(main, [*CLI_STAGE1, "--data", str(stage1.request.data),
                                        "--folds", "none"])
        assert prepared.exit_code == 0, prepared.output
        run_id = prepared.output.split("stage1 run: ", 1)[1].split()[0]
        assert client.get_run(run_id).data.tags["fat.complete"] == "false"
        assert not client.list_artifacts(run_id, "folds")  # prepared, nothing trained

        trained = artifacts(client, stage1.parallel) / "folds"
        for fold, missing in ((None, "0, 1"), (0, "1")):
            if fold is not None:  # the fold as a job would have left it
                client.log_artifacts(run_id, str(trained / f"fold_{fold}"), f"folds/fold_{fold}")
            failed = runner.invoke(main, ["gather", "--run-id", run_id])
            assert failed.exit_code == 1
            assert f"fold(s) {missing} of 2 are not finished" in failed.output
            assert f"--resume-run-id {run_id} --folds {missing.replace(', ', '-')}" in failed.output
            assert client.get_run(run_id).data.tags["fat.complete"] == "false"

        client.log_artifacts(run_id, str(trained / "fold_1"), "folds/fold_1")
        done = runner.invoke(main, ["gather", "--run-id", run_id])
        assert done.exit_code == 0, done.output
        gathered, reference = client.get_run(run_id), client.get_run(stage1.parallel)
        assert gathered.data.tags["fat.complete"] == "true"
        for key in ("lwlrap_noisy", "lwlrap_curated", "lwlrap_test"):
            assert gathered.data.metrics[key] == reference.data.metrics[key]
        expected = tables(artifacts(client, stage1.parallel))
        for name, table in tables(artifacts(client, run_id)).items():
            pd.testing.assert_frame_equal(table, expected[name], check_exact=True, obj=name)


def prepare(stage1: Stage1Runs) -> str:
    """A fresh stage-1 run with no fold trained yet, as the launcher prepares it."""
    threads = torch.get_num_threads()
    try:
        return run_stage(replace(stage1.request, folds=[]))
    finally:
        torch.set_num_threads(threads)


def test_fold_jobs_train_only_the_unfinished_folds(stage1):
    with stage1.store():
        client = MlflowClient()
        run_id = prepare(stage1)
        trained = artifacts(client, stage1.parallel) / "folds"
        client.log_artifacts(run_id, str(trained / "fold_0"), "folds/fold_0")  # a resumed run
        run_fold_jobs(replace(stage1.request, resume_run_id=run_id), 2)
        jobs = client.search_runs([client.get_run(run_id).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{run_id}'")
        assert [job.data.params["fold_job.folds"] for job in jobs] == ["1"]
        run_fold_jobs(replace(stage1.request, resume_run_id=run_id), 2)  # nothing left to do
        assert len(client.search_runs([client.get_run(run_id).info.experiment_id],
                                      f"tags.`mlflow.parentRunId` = '{run_id}'")) == 1


def test_a_failed_fold_job_is_reported_with_the_end_of_its_output(stage1):
    """A job whose settings differ from its stage run's stops, and the launcher says why."""
    with stage1.store():
        run_id = prepare(stage1)
        other = replace(stage1.request, resume_run_id=run_id,
                        profile=get_profile("tiny", {**PINNED, "train.epochs": "3"}))
        with pytest.raises(FoldJobError) as info:
            run_fold_jobs(other, 1)
    message = str(info.value)
    assert message.startswith(f"stage1: 1 of 1 fold job(s) failed; run {run_id}")
    assert "folds 0-1 exited with 1" in message
    assert "train.epochs: the run has '1', this one '3'" in message


def test_fold_jobs_get_the_store_one_gpu_each_and_never_the_pipeline_run(tracking, monkeypatch):
    monkeypatch.setenv("MLFLOW_RUN_ID", "the-pipeline-run")  # as `mlflow run` exports it
    on_gpus = fold_job_environments(3, ["3", "5"], "7", threads=2)
    on_cpu = fold_job_environments(2, [], "7", threads=3)
    assert [env["CUDA_VISIBLE_DEVICES"] for env in on_gpus] == ["3", "5", "3"]
    for env in on_gpus + on_cpu:
        assert "MLFLOW_RUN_ID" not in env  # else a job would log into the pipeline's run
        assert env["MLFLOW_TRACKING_URI"] == tracking
        assert env["MLFLOW_EXPERIMENT_ID"] == "7"
    assert [env["OMP_NUM_THREADS"] for env in on_cpu] == ["3", "3"]


def test_each_job_gets_its_share_of_the_stages_threads():
    assert threads_per_job(8, 4) == 2 and threads_per_job(1, 4) == 1
    assert threads_per_job(0, 2) == max(1, torch.get_num_threads() // 2)  # 0: torch's default


@pytest.mark.parametrize("spec, folds", [
    ("all", None), ("none", []), ("0-4", [0, 1, 2, 3, 4]), ("0,2,5", [0, 2, 5]),
    (" 7-9, 1 ", [1, 7, 8, 9]), ("3-3", [3]),
])
def test_folds_are_parsed(spec, folds):
    assert parse_folds(spec, 10) == folds
    if folds:
        assert parse_folds(format_folds(folds), 10) == folds


@pytest.mark.parametrize("spec, message", [
    ("10", "fold 10 does not exist; this profile has 10 folds, numbered 0-9"),
    ("8-12", "fold 12 does not exist"),
    ("4-2", "the range 4-2 runs backwards"),
    ("1,x", "'x' is not a fold number or a range like 0-4"),
    ("", "'' is not a fold number"),
])
def test_wrong_folds_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_folds(spec, 10)


def test_folds_option_is_checked_against_the_profile_before_any_work(tmp_path):
    result = CliRunner().invoke(main, ["stage1", "--data", str(tmp_path / "nowhere"),
                                       "--profile", "tiny", "--folds", "0-2"])
    assert result.exit_code == 2
    assert "fold 2 does not exist; this profile has 2 folds, numbered 0-1" in result.output
