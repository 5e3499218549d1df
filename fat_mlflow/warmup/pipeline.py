"""`main`: the whole warm-up pipeline as one parent run with the stages as child runs.

Re-running with the same parameters reuses every stage that already finished (found in the
tracking store by a hash of its inputs) and resumes one that was interrupted, in the spirit
of MLflow's multistep-workflow example. With `fold_jobs` > 1 each stage's folds are trained
by that many `fat-mlflow STAGE --folds ...` processes at once (one GPU each when several are
visible) and then gathered into the stage run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import click
import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.environment_variables import (
    MLFLOW_EXPERIMENT_ID,
    MLFLOW_RUN_ID,
    MLFLOW_TRACKING_URI,
)
from mlflow.tracking import MlflowClient

from fat_mlflow.config import DemoConfig, DistillConfig, Profile
from fat_mlflow.data.demo import SUMMARY_FILE, DemoExistsError, build_demo_dataset
from fat_mlflow.data.esc50 import locate_esc50
from fat_mlflow.data.layout import dataset_fingerprint, load_dataset
from fat_mlflow.data.features import BadAudioError
from fat_mlflow.plots import plot_stage_table
from fat_mlflow.warmup.featurize import run_features
from fat_mlflow.warmup.stage_inputs import (
    SKIP_HINT,
    StageRequest,
    check_pipeline_data,
    format_folds,
)
from fat_mlflow.warmup.stages import gather_stage, run_stage
from fat_mlflow.warmup.tracking import (
    TAG_COMPLETE,
    TAG_DATASET,
    TAG_PIPELINE,
    TAG_STAGE,
    configure_tracking,
    finished_folds,
    get_run,
    log_bad_audio,
    log_dataset_inputs,
    log_table,
)

TAG_INPUTS = "fat.inputs_hash"
LOG_TAIL_CHARS = 3000
# `fat-mlflow` run by this very interpreter: the console script may not be on the PATH
JOB_ENTRY = "from fat_mlflow.cli import main; main(prog_name='fat-mlflow')"


class FoldJobError(RuntimeError):
    """A fold job process failed; the message carries the end of its output."""


DEMO_DIR = Path("demo_data")  # where the main job builds the demo, beside the MLproject
# The last step: (stage run IDs, dataset, registered model name, feature cache) -> the
# ensemble's row of the stage report.
EnsembleStep = Callable[[list[str], Path, str, Path | None, str], dict]
# After it, optionally: (ensemble run ID, dataset, student settings, registered model name of
# the ensemble, feature cache, bad-audio policy) -> the student's row of the report.
DistillStep = Callable[[str, Path, DistillConfig, str, Path | None, str], dict]


@dataclass
class PipelineRequest:
    data: Path | None
    profile: Profile
    archs: list[str]
    esc50: Path | None = None  # None: found or downloaded by esc50.locate_esc50
    demo_dir: Path = DEMO_DIR
    registered_model: str = "fat2019-tagger"
    threshold: float = 0.5
    max_per_label_per_fold: int = 5
    warm_start: bool = True  # False: every stage from scratch (the ablation)
    cache_dir: Path | None = None
    progress: bool = True
    tags: dict[str, str] = field(default_factory=dict)  # extra tags of the parent run
    fold_jobs: int = 1  # > 1: parallel fold-job processes per stage (1: in this process)
    bad_audio: str = "stop"  # or "skip": undecodable clips left out, listed as bad_audio.csv
    distill: DistillConfig | None = None  # the student distilled from the ensemble (None: none)


def inputs_hash(request: StageRequest) -> str:
    """What makes two stage runs interchangeable: stage, settings and the runs it builds on."""
    payload = {
        "stage": request.stage, "profile": request.profile.settings(),
        "init": request.init_run_id, "selection": request.selection_run_ids,
        "threshold": request.threshold, "cap": request.max_per_label_per_fold,
        "bad_audio": request.bad_audio,
    }
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def find_previous_run(stage_hash: str, fingerprint: str) -> tuple[str | None, bool]:
    """(run ID, finished?) of the newest earlier run with the same inputs, if any."""
    runs = MlflowClient().search_runs(
        experiment_ids=[mlflow.active_run().info.experiment_id],
        filter_string=f"tags.`{TAG_INPUTS}` = '{stage_hash}' and tags.`{TAG_DATASET}` = '{fingerprint}'",
        order_by=["attributes.start_time DESC"],
    )
    for run in runs:
        if run.data.tags.get(TAG_COMPLETE) == "true":
            return run.info.run_id, True
    return (runs[0].info.run_id, False) if runs else (None, False)


def run_or_reuse(request: StageRequest, fingerprint: str, fold_jobs: int = 1) -> str:
    stage_hash = inputs_hash(request)
    previous, finished = find_previous_run(stage_hash, fingerprint)
    if finished:
        click.echo(f"{request.stage}: reusing finished run {previous}")
        return previous
    if previous:
        click.echo(f"{request.stage}: resuming interrupted run {previous}")
        request = replace(request, resume_run_id=previous)
    # tagged when the run starts, so a run killed half-way is found and resumed next time
    request = replace(request, tags={**request.tags, TAG_INPUTS: stage_hash})
    if fold_jobs <= 1:
        return run_stage(request)
    run_id = run_stage(replace(request, folds=[]))  # prepare (or check) the stage run
    run_fold_jobs(replace(request, resume_run_id=run_id), fold_jobs)
    return gather_stage(run_id, request.data, request.cache_dir, request.progress)


def fold_job_command(request: StageRequest, folds: list[int]) -> list[str]:
    """The `fat-mlflow STAGE` call that trains `folds` into the stage run, every setting
    spelled out (the job checks them against the run)."""
    command = [sys.executable, "-c", JOB_ENTRY, request.stage, "--data", str(request.data),
               "--profile", request.profile.name, "--resume-run-id", str(request.resume_run_id),
               "--folds", format_folds(folds),
               "--bad-audio", request.bad_audio, "--threshold", str(request.threshold),
               "--max-per-label-per-fold", str(request.max_per_label_per_fold)]
    for key, value in request.profile.flat().items():
        if key != "profile":
            command += ["--set", f"{key}={value}"]
    if request.init_run_id:
        command += ["--init-run-id", request.init_run_id]
    if request.selection_run_ids:
        command += ["--selection-run-ids", ",".join(request.selection_run_ids)]
    if request.cache_dir:
        command += ["--cache-dir", str(request.cache_dir)]
    return command


def visible_gpus(device: str) -> list[str]:
    """CUDA_VISIBLE_DEVICES entries of the GPUs this process may hand out to jobs."""
    if device not in ("auto", "cuda") or not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return listed.split(",")[:count] if listed else [str(i) for i in range(count)]


def threads_per_job(num_threads: int, n_jobs: int) -> int:
    """An equal share of the stage's threads (`train.num_threads`, 0: torch's default)."""
    return max(1, (num_threads or torch.get_num_threads()) // n_jobs)


def fold_job_environments(n_jobs: int, gpus: list[str], experiment_id: str,
                          threads: int) -> list[dict[str, str]]:
    """Each job's environment: this tracking store and the stage run's experiment, never this
    process's run (`mlflow run` exports MLFLOW_RUN_ID, which a job would take as its own),
    `threads` BLAS threads and, when there are several GPUs, one of them."""
    base = {key: value for key, value in os.environ.items() if key != MLFLOW_RUN_ID.name}
    base.update({MLFLOW_TRACKING_URI.name: mlflow.get_tracking_uri(),
                 MLFLOW_EXPERIMENT_ID.name: experiment_id, "OMP_NUM_THREADS": str(threads)})
    if len(gpus) < 2:
        return [dict(base) for _ in range(n_jobs)]
    return [{**base, "CUDA_VISIBLE_DEVICES": gpus[job % len(gpus)]} for job in range(n_jobs)]


def run_fold_jobs(request: StageRequest, n_jobs: int) -> None:
    """Train the unfinished folds of the stage run `request.resume_run_id` in `n_jobs`
    parallel processes (contiguous blocks of folds, each with its share of the threads)
    and wait for all."""
    cfg = request.profile.train
    finished = finished_folds(request.resume_run_id)
    pending = [fold for fold in range(cfg.n_folds) if fold not in finished]
    if not pending:
        return
    blocks = [[int(fold) for fold in block]
              for block in np.array_split(pending, min(n_jobs, len(pending)))]
    threads = threads_per_job(cfg.num_threads, len(blocks))
    request = replace(request, profile=replace(request.profile,
                                               train=replace(cfg, num_threads=threads)))
    environments = fold_job_environments(len(blocks), visible_gpus(cfg.device),
                                         get_run(request.resume_run_id).info.experiment_id,
                                         threads)
    logs = Path(tempfile.mkdtemp(prefix=f"fat-mlflow-{request.stage}-jobs-"))
    jobs: list[tuple[str, Path, subprocess.Popen]] = []
    try:
        for folds, env in zip(blocks, environments):
            spec = format_folds(folds)
            log = logs / f"folds-{spec}.log"
            with log.open("w") as sink:
                jobs.append((spec, log, subprocess.Popen(fold_job_command(request, folds),
                                                         env=env, stdout=sink,
                                                         stderr=subprocess.STDOUT)))
        click.echo(f"{request.stage}: {len(jobs)} fold jobs (folds "
                   f"{' | '.join(spec for spec, _, _ in jobs)}) for run {request.resume_run_id}")
        failures = []
        for spec, log, process in jobs:
            if process.wait() != 0:
                failures.append(f"folds {spec} exited with {process.returncode} (log {log}):\n"
                                f"{log.read_text()[-LOG_TAIL_CHARS:]}")
    finally:
        for _, _, process in jobs:
            if process.poll() is None:  # this process was interrupted: stop its jobs too
                process.terminate()
                process.wait()
    if failures:
        raise FoldJobError(
            f"{request.stage}: {len(failures)} of {len(jobs)} fold job(s) failed; run "
            f"{request.resume_run_id} keeps the folds that finished and a rerun resumes it.\n"
            + "\n".join(failures))
    shutil.rmtree(logs)


def ensure_demo_data(demo_dir: Path, esc50: Path | None = None,
                     recipe: DemoConfig = DemoConfig(), scale: float = 1.0) -> Path:
    """The demo dataset of `recipe` in `demo_dir`, built first (once, even by concurrent runs).
    ESC-50 is only looked for (perhaps downloaded) when the demo must be built."""
    if not (demo_dir / SUMMARY_FILE).is_file():
        if demo_dir.is_dir() and any(demo_dir.iterdir()):  # before any download
            raise DemoExistsError(f"{demo_dir}: not empty, and not a whole demo dataset "
                                  f"(no {SUMMARY_FILE}); remove it or pass --data")
        source = locate_esc50(esc50)
        click.echo(f"building the demo dataset in {demo_dir} from {source}")
        build_demo_dataset(source, demo_dir, seed=0, scale=scale, reuse=True, recipe=recipe)
    built = json.loads((demo_dir / SUMMARY_FILE).read_text())
    if built.get("recipe") != dataclasses.asdict(recipe) or built.get("scale") != scale:
        settings = built.get("recipe") or "all 50 classes, from before the demo had a recipe"
        raise DemoExistsError(f"{demo_dir}: a demo dataset of another recipe ({settings}, "
                              f"scale {built.get('scale')}); remove it to build today's demo, "
                              f"or pass --data {demo_dir} to train on it as it is")
    return demo_dir


def run_arch_chain(request: PipelineRequest, data: Path, arch: str, parent: str,
                   fingerprint: str) -> dict[str, str]:
    """Stages 1-4 for one network; returns stage -> run ID."""
    profile = replace(request.profile, train=replace(request.profile.train, arch=arch))
    base = dict(data=data, profile=profile, cache_dir=request.cache_dir,
                pipeline_run_id=parent, progress=request.progress, bad_audio=request.bad_audio)
    runs: dict[str, str] = {}

    def init(stage: str) -> str | None:
        return runs[stage] if request.warm_start else None

    def run(stage_request: StageRequest) -> str:
        return run_or_reuse(stage_request, fingerprint, request.fold_jobs)

    runs["stage1"] = run(StageRequest(stage="stage1", **base))
    runs["stage2"] = run(StageRequest(stage="stage2", init_run_id=init("stage1"), **base))
    runs["stage3"] = run(StageRequest(stage="stage3", init_run_id=init("stage2"),
                                      selection_run_ids=[runs["stage1"], runs["stage2"]],
                                      threshold=request.threshold,
                                      max_per_label_per_fold=request.max_per_label_per_fold,
                                      **base))
    runs["stage4"] = run(StageRequest(stage="stage4", init_run_id=init("stage3"),
                                      selection_run_ids=[runs["stage3"]], **base))
    return runs


def stage_table(chains: dict[str, dict[str, str]]) -> pd.DataFrame:
    """The seed's Table 2 for this data: one row per (network, stage), with the stage's
    recorded time and the share of it that is not training steps."""
    client = MlflowClient()
    rows = []
    for arch, runs in chains.items():
        for stage, run_id in runs.items():
            metrics = client.get_run(run_id).data.metrics
            rows.append({"model": f"{arch} model{stage[-1]}", "arch": arch, "stage": stage,
                         "run_id": run_id,
                         **{key: metrics.get(key, np.nan) for key in
                            ("lwlrap_noisy", "lwlrap_curated", "lwlrap_test",
                             "selection_precision", "noisy_base_rate", "selected_clips",
                             "non_training_share")},
                         "minutes": metrics.get("time_total_s", np.nan) / 60})
    return pd.DataFrame(rows)


def run_pipeline(request: PipelineRequest, ensemble_step: EnsembleStep,
                 distill_step: DistillStep | None = None) -> tuple[str, pd.DataFrame]:
    """features -> stage 1..4 per network -> ensemble (-> student); returns the parent run ID
    and Table 2.

    The ensemble is built by `ensemble_step` (`fat_mlflow.serving.ensemble.build_and_register`
    in every caller), the student, when `request.distill` asks for one, by `distill_step`
    (`fat_mlflow.serving.distill.distill_and_register`): serving sits above this layer, so the
    pipeline is handed them.
    """
    if request.distill is not None and distill_step is None:
        raise ValueError("request.distill asks for a student but no distill_step was given")
    started = time.perf_counter()
    data = request.data or ensure_demo_data(request.demo_dir, request.esc50)
    dataset = load_dataset(data)
    check_pipeline_data(dataset, request.profile)  # before the tracking store is even opened
    configure_tracking()
    fingerprint = dataset_fingerprint(dataset)
    with mlflow.start_run(run_name=f"pipeline-{request.profile.name}") as parent:
        parent_id = parent.info.run_id
        mlflow.set_tags({TAG_STAGE: "pipeline", TAG_DATASET: fingerprint, **request.tags})
        log_dataset_inputs(dataset, fingerprint, ["curated", "noisy"] if dataset.has_noisy
                           else ["curated"])
        # "pipeline." keys: `mlflow run` already logged the raw entry-point parameters
        mlflow.log_params({"pipeline.data": str(data), "pipeline.archs": ",".join(request.archs),
                           "pipeline.threshold": request.threshold,
                           "pipeline.max_per_label_per_fold": request.max_per_label_per_fold,
                           "pipeline.warm_start": request.warm_start,
                           "pipeline.fold_jobs": request.fold_jobs,
                           "pipeline.bad_audio": request.bad_audio,
                           "pipeline.distill": request.distill is not None,
                           **request.profile.flat()})
        failures = run_features(data, request.profile.features, request.cache_dir, jobs=0,
                                progress=request.progress).failures
        if failures and request.bad_audio != "skip":
            raise BadAudioError(failures, SKIP_HINT)
        log_bad_audio(failures)
        chains = {arch: run_arch_chain(request, data, arch, parent_id, fingerprint)
                  for arch in request.archs}
        table = stage_table(chains)
        ensemble_runs = [runs[s] for runs in chains.values() for s in ("stage2", "stage3", "stage4")]
        ensemble_row = ensemble_step(ensemble_runs, data, request.registered_model,
                                     request.cache_dir, request.bad_audio)
        rows = [ensemble_row]
        if request.distill is not None:
            rows.append(distill_step(ensemble_row["run_id"], data, request.distill,
                                     request.registered_model, request.cache_dir,
                                     request.bad_audio))
        table = pd.concat([table, pd.DataFrame(rows)], ignore_index=True)
        total = time.perf_counter() - started
        mlflow.log_metric("time_total_s", total)
        if request.distill is not None:  # what the student adds to the main job
            mlflow.log_metric("distill_share", rows[-1]["minutes"] * 60 / total)
        log_table(table, "report/stage_table.csv")
        scored = table.dropna(subset=["lwlrap_noisy", "lwlrap_curated", "lwlrap_test"], how="all")
        mlflow.log_figure(plot_stage_table(scored), "report/stage_table.png")
        mlflow.set_tag(TAG_PIPELINE, parent_id)
    return parent_id, table
