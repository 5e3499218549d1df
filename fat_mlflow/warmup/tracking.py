"""The MLflow layer: where stage runs keep their folds, and how later stages find them by ID.

Everything a later stage needs (fold assignment, fold models, out-of-fold tables) is read
back from the tracking store by run ID, never from a local path, so the same code works
with the embedded SQLite store and with a remote tracking server.

Runs go to the experiment `fat-mlflow` unless MLFLOW_EXPERIMENT_NAME / MLFLOW_EXPERIMENT_ID
name another (`mlflow run --experiment-name` exports the latter); the tables a run trains and
is evaluated on are logged as MLflow dataset inputs.
"""
from __future__ import annotations

import functools
import json
import os
import re
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.data.dataset_source_registry import get_dataset_source_from_json
from mlflow.entities import Run
from mlflow.environment_variables import MLFLOW_EXPERIMENT_ID, MLFLOW_EXPERIMENT_NAME
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from torch import nn

from fat_mlflow.data.layout import FatDataset
from fat_mlflow.engine.crossval import FoldResult
from fat_mlflow.engine.models import save_checkpoint
from fat_mlflow.engine.precision import Precision
from fat_mlflow.engine.timing import PhaseClock, non_training_share
from fat_mlflow.engine.training import EpochLog
from fat_mlflow.locking import exclusive

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "fat-mlflow"
TAG_STAGE = "fat.stage"
TAG_DATASET = "fat.dataset"
TAG_ARCH = "fat.arch"
TAG_COMPLETE = "fat.complete"
TAG_PIPELINE = "fat.pipeline_run_id"
FOLDS_ARTIFACT = "folds.csv"
PROFILE_ARTIFACT = "profile.json"
VOCABULARY_ARTIFACT = "vocabulary.json"


class RunLookupError(ValueError):
    """A run ID given to a stage cannot serve it (missing, wrong stage or data, unfinished)."""


def configure_tracking() -> str:
    """Use MLFLOW_TRACKING_URI when set, else a SQLite file in the working directory."""
    # Our own bars show progress; one bar per small artifact download is noise.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Set it even when the variable is set: a URI set earlier in this process (a notebook, a
    # library call) would otherwise win over the variable.
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and ":memory:" not in uri and os.name != "nt":
        _create_sqlite_store(str(Path(uri.removeprefix("sqlite:///")).resolve()))
    _use_default_experiment()
    return uri


def _use_default_experiment() -> None:
    """Make DEFAULT_EXPERIMENT the experiment of new runs, unless one is chosen already.

    Chosen: by MLFLOW_EXPERIMENT_NAME or MLFLOW_EXPERIMENT_ID (`mlflow run` and
    `mlflow.set_experiment` set the latter), or by an active run, whose nested runs then stay in
    its experiment. The name goes into MLFLOW_EXPERIMENT_NAME, which MLflow resolves in the
    current store at each new run and which fold-job processes inherit. The experiment is
    created here first because two processes creating it at once race.
    """
    if mlflow.active_run() or MLFLOW_EXPERIMENT_NAME.defined or MLFLOW_EXPERIMENT_ID.defined:
        return
    client = MlflowClient()
    if client.get_experiment_by_name(DEFAULT_EXPERIMENT) is None:
        try:
            client.create_experiment(DEFAULT_EXPERIMENT)
        except MlflowException as error:
            if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
    os.environ[MLFLOW_EXPERIMENT_NAME.name] = DEFAULT_EXPERIMENT


@functools.cache
def _create_sqlite_store(db_path: str) -> None:
    """Create (or open) the SQLite store while holding a lock shared by all processes.

    MLflow creates and migrates a new store's tables on first use without a lock
    (mlflow/mlflow#19943): two stage runs started together on a fresh store then crash with
    "duplicate column name".
    """
    with exclusive(db_path, "creating the tracking store"):
        MlflowClient(f"sqlite:///{db_path}").search_experiments(max_results=1)


def get_run(run_id: str) -> Run:
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException as error:
        raise RunLookupError(
            f"run {run_id!r} does not exist in the tracking store {mlflow.get_tracking_uri()}"
        ) from error


def check_source_run(
    run_id: str, expected_stages: tuple[str, ...], dataset: str, need_complete: bool = True
) -> Run:
    """Fetch a run another stage builds on, and say precisely why it does not fit."""
    run = get_run(run_id)
    stage = run.data.tags.get(TAG_STAGE)
    if stage not in expected_stages:
        raise RunLookupError(
            f"run {run_id} is a {stage or 'non-fat-mlflow'} run; expected a run of "
            f"{' or '.join(expected_stages)}"
        )
    if run.data.tags.get(TAG_DATASET) != dataset:
        raise RunLookupError(
            f"run {run_id} was trained on another dataset (fingerprint "
            f"{run.data.tags.get(TAG_DATASET)}, this data is {dataset})"
        )
    if need_complete and run.data.tags.get(TAG_COMPLETE) != "true":
        raise RunLookupError(
            f"run {run_id} ({stage}) has not finished all its folds; resume it with "
            f"--resume-run-id {run_id} first"
        )
    return run


def download(run_id: str, artifact_path: str, dst: Path) -> Path:
    """A run's artifact copied into the folder `dst` (created if needed; the caller's)."""
    get_run(run_id)  # a clear "does not exist" before any artifact error
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)
        )
    except (MlflowException, OSError) as error:
        raise RunLookupError(f"run {run_id} has no artifact {artifact_path!r}") from error
    return Path(local)


@contextmanager
def downloaded(run_id: str, artifact_path: str) -> Iterator[Path]:
    """A run's artifact in a temporary folder that is removed when the block ends: a paper
    pipeline reads gigabytes of checkpoints and tables, again on every rerun."""
    with tempfile.TemporaryDirectory(prefix="fat-mlflow-") as folder:
        yield download(run_id, artifact_path, Path(folder))


def read_table(run_id: str, artifact_path: str) -> pd.DataFrame:
    with downloaded(run_id, artifact_path) as path:
        return pd.read_csv(path)


def read_json(run_id: str, artifact_path: str):
    with downloaded(run_id, artifact_path) as path:
        return json.loads(path.read_text())


def read_bytes(run_id: str, artifact_path: str) -> bytes:
    with downloaded(run_id, artifact_path) as path:
        return path.read_bytes()


def fold_model_path(run_id: str, fold: int, dst: Path) -> Path:
    """Fold `fold`'s checkpoint of a stage run, copied into `dst`."""
    return download(run_id, f"folds/fold_{fold}/model.pt", dst)


def fold_histories(run_id: str, n_folds: int) -> dict[int, pd.DataFrame]:
    """Per-epoch curves of every fold, read back from the run's metric history."""
    client = MlflowClient()
    histories = {}
    for fold in range(n_folds):
        columns = {}
        for metric in ("train_loss", "val_lwlrap"):
            points = client.get_metric_history(run_id, f"fold{fold}_{metric}")
            columns[metric] = pd.Series({p.step: p.value for p in points}, dtype=float)
        if len(columns["train_loss"]):
            table = pd.DataFrame(columns).rename_axis("epoch").reset_index()
            histories[fold] = table
    return histories


def log_dataset_inputs(dataset: FatDataset, fingerprint: str, training: list[str]) -> None:
    """The dataset's tables as MLflow dataset inputs of the active run: the `training` splits
    (curated, noisy) with context "training", the test clips with context "evaluation".

    Named `<data folder>/<table>`, digest = the dataset fingerprint, source = the data folder,
    so runs can be found by the data they used (`dataset.digest = '<fingerprint>'`).
    """
    source = get_dataset_source_from_json(json.dumps({"uri": str(dataset.root)}), "local")
    frames = {"curated": ("train_curated", dataset.curated),
              "noisy": ("train_noisy", dataset.noisy_or_none)}
    tables = [(*frames[split], "training") for split in training]
    tables.append(("test", dataset.test, "evaluation"))
    inputs = [mlflow.data.from_pandas(_table_rows(frame), source=source, digest=fingerprint,
                                      name=f"{dataset.root.name}/{table}")
              for table, frame, _ in tables]
    mlflow.log_inputs(inputs, contexts=[context for _, _, context in tables],
                      tags_list=[None] * len(inputs))


def _table_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """fname and comma-joined labels (when the split has them), as in the dataset's CSVs."""
    rows = frame[["fname"]].copy()
    if "labels" in frame.columns:
        rows["labels"] = frame["labels"].map(",".join)
    return rows


def log_table(table: pd.DataFrame, artifact_path: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_path).name
        table.to_csv(path, index=False)
        folder = str(Path(artifact_path).parent)
        mlflow.log_artifact(str(path), None if folder == "." else folder)


def log_bad_audio(failures: dict[str, str], artifact: str = "bad_audio.csv") -> None:
    """The clips left out (path, reason) as an artifact of the active run, if there are any."""
    if failures:
        log_table(pd.DataFrame(sorted(failures.items()), columns=["path", "reason"]), artifact)


def finished_folds(run_id: str) -> dict[int, FoldResult]:
    """The folds of a stage run whose model is logged and whose scores read back whole."""
    client = MlflowClient()
    finished: dict[int, FoldResult] = {}
    for entry in client.list_artifacts(run_id, "folds"):
        names = {Path(f.path).name for f in client.list_artifacts(run_id, entry.path)}
        if {"model.pt", "scores.npz"} <= names:
            fold = int(Path(entry.path).name.removeprefix("fold_"))
            try:
                finished[fold] = _load_scores(run_id, fold)
            except (OSError, ValueError, EOFError, zipfile.BadZipFile):
                continue  # killed while the scores were being copied: retrain the fold
    return finished


def _load_scores(run_id: str, fold: int) -> FoldResult:
    with downloaded(run_id, f"folds/fold_{fold}/scores.npz") as path, np.load(path) as data:
        oof = {key.removeprefix("oof_"): data[key] for key in data.files if key.startswith("oof_")}
        test = data["test"] if "test" in data.files else None
    return FoldResult(fold, oof, test)


class MlflowFoldStore:
    """Keeps each finished fold (model + scores) as artifacts of the stage run.

    A fold counts as finished only when its scores file exists and reads back whole; the
    model is logged first, so an interruption between the two (or during the copy of the
    scores) simply retrains that fold.
    """

    def __init__(self, run_id: str, arch: str, width: float, n_classes: int):
        self.run_id = run_id
        self.arch, self.width, self.n_classes = arch, width, n_classes
        self.client = MlflowClient()

    def finished_folds(self) -> dict[int, FoldResult]:
        return finished_folds(self.run_id)

    def record_precision(self, precision: Precision) -> None:
        """Tag the run with the number format its folds train in, and why (the machine's)."""
        for key, value in precision.describe().items():
            self.client.set_tag(self.run_id, key, value)

    def log_epoch(self, fold: int, log: EpochLog) -> None:
        metrics = {f"fold{fold}_train_loss": log.train_loss,
                   f"fold{fold}_samples_per_s": log.samples_per_second}
        if not np.isnan(log.val_lwlrap):
            metrics[f"fold{fold}_val_lwlrap"] = log.val_lwlrap
        mlflow.log_metrics(metrics, step=log.epoch, run_id=self.run_id)

    def save_fold(self, result: FoldResult, model: nn.Module) -> None:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            model_path = Path(tmp) / "model.pt"
            save_checkpoint(model.cpu(), model_path, arch=self.arch, width=self.width,
                            n_classes=self.n_classes)
            self.client.log_artifact(self.run_id, str(model_path), f"folds/fold_{result.fold}")
            arrays = {f"oof_{name}": scores for name, scores in result.oof.items()}
            if result.test is not None:
                arrays["test"] = result.test
            scores_path = Path(tmp) / "scores.npz"
            np.savez(scores_path, **arrays)
            self.client.log_artifact(self.run_id, str(scores_path), f"folds/fold_{result.fold}")
        seconds = {**result.seconds, "saving": time.perf_counter() - started}
        mlflow.log_metrics({**{fold_lwlrap_metric(result.fold, name): value
                               for name, value in result.lwlrap.items()},
                            **{fold_time_metric(result.fold, phase): value
                               for phase, value in seconds.items()}}, run_id=self.run_id)


FOLD_TIME = re.compile(r"fold\d+_time_(\w+)_s")


def fold_time_metric(fold: int, phase: str) -> str:
    return f"fold{fold}_time_{phase}_s"


def fold_lwlrap_metric(fold: int, split: str) -> str:
    """A fold model's out-of-fold lwlrap on `split` (curated, noisy) or its test lwlrap."""
    return f"fold{fold}_lwlrap_{split}"


def stage_time_metrics(metrics: dict[str, float], stage_seconds: dict[str, float]
                       ) -> dict[str, float]:
    """`time_<phase>_s` of a stage run: its folds' phases summed (whichever process trained
    them: the run's `fold<k>_time_<phase>_s` metrics) plus the completing process's own
    phases, then `time_total_s` and `non_training_share`."""
    clock = PhaseClock()
    for name, value in metrics.items():
        if match := FOLD_TIME.fullmatch(name):
            clock.add(match.group(1), value)
    for phase, value in stage_seconds.items():
        clock.add(phase, value)
    return {**{f"time_{phase}_s": value for phase, value in clock.seconds.items()},
            "time_total_s": sum(clock.seconds.values()),
            "non_training_share": non_training_share(clock.seconds)}
