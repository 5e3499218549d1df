"""The four warm-up stages as compositions of data, selection, cross-validation and tracking.

Every stage is the same engine with three choices: which clips it trains on, which run it
warm-starts from, and (stages 3 and 4) which earlier runs select its noisy clips.

A stage run is made in three steps: prepare (validate the sources, log the inputs), train
the folds, gather (out-of-fold tables, metrics, curves, `fat.complete`). `run_stage` does all
three in one process; with `StageRequest.folds` it is one *fold job* that trains only some
folds, in a child run of the stage run, so that several jobs can share a stage and
`gather_stage` completes it once every fold exists. The request and the inputs a stage
reads (features, folds, source runs) are `stage_inputs`.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click
import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities import Run
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from fat_mlflow.config import get_profile
from fat_mlflow.data.layout import FatDataset
from fat_mlflow.engine.crossval import ClipSet, CrossValResult, assemble, run_cross_validation
from fat_mlflow.engine.models import build_model, load_checkpoint
from fat_mlflow.engine.timing import PhaseClock
from fat_mlflow.engine.training import resolve_device, training_precision
from fat_mlflow.memory import peak_memory
from fat_mlflow.plots import plot_fold_curves
from fat_mlflow.warmup.selection import (
    label_counts,
    select_by_agreement,
    select_perfect,
    selection_precision,
)
from fat_mlflow.warmup.stage_inputs import (
    STAGES,
    StageData,
    StageRequest,
    format_folds,
    input_params,
    load_stage_inputs,
)
from fat_mlflow.warmup.tracking import (
    FOLDS_ARTIFACT,
    PROFILE_ARTIFACT,
    TAG_ARCH,
    TAG_COMPLETE,
    TAG_DATASET,
    TAG_PIPELINE,
    TAG_STAGE,
    VOCABULARY_ARTIFACT,
    MlflowFoldStore,
    RunLookupError,
    configure_tracking,
    fold_histories,
    fold_model_path,
    get_run,
    log_bad_audio,
    log_dataset_inputs,
    log_table,
    read_table,
    stage_time_metrics,
)

TRAINING_SPLITS = {"stage1": ("noisy",), "stage2": ("curated",), "stage3": ("curated", "noisy"),
                   "stage4": ("curated", "noisy")}  # stages 3 and 4: a selection of the noisy
FOLD_JOB = "fold-job"  # the fat.stage tag of a fold job's child run
PROFILE_SECTIONS = ("features", "augment", "train")


def _noisy_labels(dataset: FatDataset) -> pd.Series:
    return dataset.noisy.set_index("fname")["labels"]


def select_noisy(request: StageRequest, data: StageData) -> pd.DataFrame | None:
    """The stage's selection of noisy clips, read from the earlier runs BY RUN ID."""
    labels = _noisy_labels(data.dataset)
    tables = [read_table(run_id, "oof/noisy.csv") for run_id in request.selection_run_ids]
    if request.stage == "stage3":
        return select_by_agreement(*tables, labels, request.threshold,
                                   request.max_per_label_per_fold)
    if request.stage == "stage4":
        return select_perfect(*tables, labels)
    return None


def selection_summary(request: StageRequest, selection: pd.DataFrame) -> str:
    """The line a stage prints about its selection; an empty one is a normal outcome."""
    cap = request.max_per_label_per_fold
    rule = ("lwlrap == 1 under model 3" if request.stage == "stage4" else
            f"sqrt(lwlrap1 * lwlrap2) >= {request.threshold}, "
            + (f"at most {cap} per label and fold" if cap > 0 else "no cap per label"))
    if len(selection):
        return f"{request.stage}: {len(selection)} noisy clip(s) selected ({rule})"
    return (f"{request.stage}: no noisy clip selected ({rule}); this stage trains on the "
            "curated clips alone")


def training_masks(stage: str, sets: dict[str, ClipSet],
                   selection: pd.DataFrame | None) -> dict[str, np.ndarray]:
    """The clips of each set that a stage trains on: stage 1 every noisy clip, the later
    stages every curated clip plus the selected noisy ones (none when the selection is
    empty, or in stage 2)."""
    if stage == "stage1":
        return {"noisy": np.ones(len(sets["noisy"].fnames), bool)}
    masks = {"curated": np.ones(len(sets["curated"].fnames), bool)}
    if selection is not None and len(selection) and "noisy" in sets:
        masks["noisy"] = np.isin(sets["noisy"].fnames, selection["fname"])
    return masks


def _start_run(request: StageRequest) -> mlflow.ActiveRun:
    """Resume the run, or start a new one: in its pipeline run's experiment, when it has one."""
    if request.resume_run_id:
        return mlflow.start_run(run_id=request.resume_run_id,
                                nested=mlflow.active_run() is not None)
    parent = request.pipeline_run_id
    return mlflow.start_run(
        run_name=f"{request.stage}-{request.profile.train.arch}",
        nested=mlflow.active_run() is not None,
        parent_run_id=parent,
        experiment_id=get_run(parent).info.experiment_id if parent else None,
    )


def run_stage(request: StageRequest) -> str:
    """Train (or resume) one stage run end to end; returns its run ID.

    With `request.folds` it is a fold job instead: it joins the stage run
    `request.resume_run_id` (or prepares a new one), trains only those folds in a child run
    of it and leaves the completion to `gather_stage`. The step's peak memory is logged to
    the stage run (`peak_rss_mb`).
    """
    with peak_memory() as peak:
        run_id = _run_stage(request)
    mlflow.log_metrics(peak.metrics, run_id=run_id)
    return run_id


def _run_stage(request: StageRequest) -> str:
    clock = PhaseClock()
    with clock.phase("loading"):
        data, folds = load_stage_inputs(request)
    with clock.phase("selection"):
        selection = select_noisy(request, data)
    selection_seconds = clock.seconds["selection"]
    if selection is not None:
        click.echo(selection_summary(request, selection))
    if request.folds is not None and request.resume_run_id:  # a job joining its stage run
        if request.folds:
            _fold_job(request, data, selection, request.resume_run_id)
        return request.resume_run_id
    with _start_run(request) as run:
        run_id = run.info.run_id
        if not request.resume_run_id:
            _log_inputs(request, data, folds, selection, selection_seconds)
        if request.folds is None:
            _complete(_train_folds(request, data, selection, run_id), data,
                      request.profile.train.n_folds, clock)
        elif request.folds:
            _fold_job(request, data, selection, run_id)
    return run_id


def _train_folds(request: StageRequest, data: StageData, selection: pd.DataFrame | None,
                 run_id: str, only_folds: list[int] | None = None) -> CrossValResult:
    """Train the stage's unfinished folds (or only `only_folds`) into the stage run."""
    cfg = request.profile.train
    vocabulary = data.dataset.vocabulary

    def make_model(fold: int):
        if request.init_run_id:
            with tempfile.TemporaryDirectory(prefix="fat-mlflow-") as folder:
                return load_checkpoint(fold_model_path(request.init_run_id, fold, Path(folder)))
        return build_model(cfg.arch, len(vocabulary), cfg.width)

    store = MlflowFoldStore(run_id, cfg.arch, cfg.width, len(vocabulary))
    store.record_precision(training_precision(cfg))
    return run_cross_validation(data.sets, training_masks(request.stage, data.sets, selection),
                                data.test, vocabulary, request.profile, make_model, store,
                                progress=request.progress, only_folds=only_folds)


def _fold_job(request: StageRequest, data: StageData, selection: pd.DataFrame | None,
              stage_run_id: str) -> None:
    """Train `request.folds` into the stage run, recorded as a child run of it.

    The folds' models, scores and curves go to the stage run itself; the child run tells
    which job trained which folds on which device, and whether the job finished. The parent
    is also given as a tag because under `mlflow run` the child is the run that `mlflow run`
    created, which start_run resumes without nesting it.
    """
    spec = format_folds(request.folds)
    cfg = request.profile.train
    with mlflow.start_run(run_name=f"{request.stage}-folds-{spec}", parent_run_id=stage_run_id,
                          experiment_id=get_run(stage_run_id).info.experiment_id,
                          nested=mlflow.active_run() is not None,
                          tags={TAG_STAGE: FOLD_JOB, MLFLOW_PARENT_RUN_ID: stage_run_id}):
        mlflow.log_params({"fold_job.folds": spec,
                           "fold_job.device": str(resolve_device(cfg.device)),
                           "fold_job.cuda_visible_devices":
                               os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                           "fold_job.num_threads": cfg.num_threads or torch.get_num_threads()})
        _train_folds(request, data, selection, stage_run_id, request.folds)


def _complete(result: CrossValResult, data: StageData, n_folds: int, clock: PhaseClock) -> None:
    """Log the stage's outputs and where its time went, then mark it complete."""
    with clock.phase("outputs"):
        _log_outputs(result, data, data.dataset.vocabulary, n_folds)
    metrics = get_run(mlflow.active_run().info.run_id).data.metrics
    mlflow.log_metrics(stage_time_metrics(metrics, clock.seconds))
    mlflow.set_tag(TAG_COMPLETE, "true")


def gather_stage(run_id: str, data: Path | None = None, cache_dir: Path | None = None,
                 progress: bool = True) -> str:
    """Complete a stage run whose folds were trained by fold jobs; returns its run ID.

    Everything comes from the run itself (stage, settings, dataset path from its parameters,
    folds from its artifacts); `data` only replaces the dataset path when the jobs ran on
    another machine.
    """
    configure_tracking()
    with peak_memory("gather_") as peak:
        _gather(_request_from_run(get_run(run_id), data, cache_dir, progress), run_id)
    mlflow.log_metrics(peak.metrics, run_id=run_id)
    return run_id


def _gather(request: StageRequest, run_id: str) -> None:
    clock = PhaseClock()
    with clock.phase("loading"):
        stage_data, _ = load_stage_inputs(request)
        cfg = request.profile.train
        vocabulary = stage_data.dataset.vocabulary
        results = MlflowFoldStore(run_id, cfg.arch, cfg.width, len(vocabulary)).finished_folds()
    missing = [fold for fold in range(cfg.n_folds) if fold not in results]
    if missing:
        raise RunLookupError(
            f"run {run_id} ({request.stage}) cannot be gathered: fold(s) "
            f"{', '.join(map(str, missing))} of {cfg.n_folds} are not finished (finished: "
            f"{', '.join(map(str, sorted(results))) or 'none'}); train them with "
            f"`fat-mlflow {request.stage} --resume-run-id {run_id} --folds "
            f"{format_folds(missing)} ...` (or wait for the job that runs them)")
    with _start_run(request):
        _complete(assemble(stage_data.sets, results, vocabulary, stage_data.test), stage_data,
                  cfg.n_folds, clock)


def _request_from_run(run: Run, data: Path | None, cache_dir: Path | None,
                      progress: bool) -> StageRequest:
    """The request a stage run was prepared with, read back from its tags and parameters."""
    tags, params = run.data.tags, run.data.params
    if tags.get(TAG_STAGE) not in STAGES or "stage.data" not in params:
        raise RunLookupError(f"run {run.info.run_id} is a "
                             f"{tags.get(TAG_STAGE) or 'non-fat-mlflow'} run; only a prepared "
                             "stage run (stage1-4) can be gathered")
    overrides = {key: value for key, value in params.items()
                 if key.partition(".")[0] in PROFILE_SECTIONS}
    return StageRequest(
        stage=tags[TAG_STAGE], data=Path(data or params["stage.data"]),
        profile=get_profile(params["profile"], overrides),
        init_run_id=params["stage.init_run_id"] or None,
        selection_run_ids=[r for r in params["stage.selection_run_ids"].split(",") if r],
        resume_run_id=run.info.run_id, threshold=float(params["stage.threshold"]),
        max_per_label_per_fold=int(params["stage.max_per_label_per_fold"]),
        cache_dir=cache_dir, bad_audio=params["stage.bad_audio"], progress=progress)


def _log_inputs(request: StageRequest, data: StageData, folds: pd.DataFrame,
                selection: pd.DataFrame | None, selection_seconds: float) -> None:
    mlflow.set_tags({TAG_STAGE: request.stage, TAG_DATASET: data.fingerprint,
                     TAG_ARCH: request.profile.train.arch, TAG_COMPLETE: "false",
                     **({TAG_PIPELINE: request.pipeline_run_id} if request.pipeline_run_id else {}),
                     **request.tags})
    mlflow.log_params(input_params(request))
    log_dataset_inputs(data.dataset, data.fingerprint,
                       [split for split in TRAINING_SPLITS[request.stage] if split in data.sets])
    log_table(folds, FOLDS_ARTIFACT)
    mlflow.log_dict(request.profile.flat(), PROFILE_ARTIFACT)
    mlflow.log_dict(data.dataset.vocabulary, VOCABULARY_ARTIFACT)
    log_bad_audio(data.bad_audio)
    if selection is not None:
        _log_selection(selection, data, selection_seconds)


def _log_selection(selection: pd.DataFrame, data: StageData, seconds: float) -> None:
    table = selection.assign(labels=selection["labels"].map(",".join))
    log_table(table, "selection/selected.csv")
    log_table(label_counts(selection, data.dataset.vocabulary), "selection/label_counts.csv")
    metrics = {"selected_clips": float(len(selection)), "selection_seconds": seconds}
    truth_path = Path(data.dataset.root) / "noise_truth.csv"
    if truth_path.exists():
        metrics.update(selection_precision(selection, pd.read_csv(truth_path)))
    mlflow.log_metrics(metrics)


def _log_outputs(result: CrossValResult, data: StageData, vocabulary: list[str],
                 n_folds: int) -> None:
    for name, table in result.oof.items():
        log_table(table, f"oof/{name}.csv")
    if result.test_scores is not None and data.test is not None:
        scores = pd.DataFrame(result.test_scores, columns=vocabulary)
        scores.insert(0, "fname", data.test.fnames)
        log_table(scores, "test_scores.csv")
    mlflow.log_metrics({f"lwlrap_{name}": value for name, value in result.lwlrap.items()})
    run_id = mlflow.active_run().info.run_id
    histories = fold_histories(run_id, n_folds)
    mlflow.log_figure(plot_fold_curves(histories, title=run_id), "curves.png")
