"""`main`: the whole warm-up pipeline as one parent run with the stages as child runs.

Re-running with the same parameters reuses every stage that already finished (found in the
tracking store by a hash of its inputs) and resumes one that was interrupted, in the spirit
of MLflow's multistep-workflow example.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import click
import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from fat_mlflow.config import Profile
from fat_mlflow.data import dataset_fingerprint, load_dataset
from fat_mlflow.demo import build_demo_dataset
from fat_mlflow.featurize import run_features
from fat_mlflow.plots import plot_stage_table
from fat_mlflow.stages import StageRequest, run_stage
from fat_mlflow.tracking import (
    TAG_COMPLETE,
    TAG_DATASET,
    TAG_PIPELINE,
    TAG_STAGE,
    configure_tracking,
    log_table,
)

TAG_INPUTS = "fat.inputs_hash"
DEMO_MARKER = "sample_submission.csv"


@dataclass
class PipelineRequest:
    data: Path | None
    profile: Profile
    archs: list[str]
    esc50: Path
    demo_dir: Path = Path("demo_data")
    registered_model: str = "fat2019-tagger"
    threshold: float = 0.5
    max_per_label_per_fold: int = 5
    warm_start: bool = True  # False: every stage from scratch (the ablation)
    cache_dir: Path | None = None
    progress: bool = True


def inputs_hash(request: StageRequest) -> str:
    """What makes two stage runs interchangeable: stage, settings and the runs it builds on."""
    payload = {
        "stage": request.stage, "profile": request.profile.flat(),
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


def run_or_reuse(request: StageRequest, fingerprint: str) -> str:
    stage_hash = inputs_hash(request)
    previous, finished = find_previous_run(stage_hash, fingerprint)
    if finished:
        click.echo(f"{request.stage}: reusing finished run {previous}")
        return previous
    if previous:
        click.echo(f"{request.stage}: resuming interrupted run {previous}")
        request = replace(request, resume_run_id=previous)
    run_id = run_stage(request)
    MlflowClient().set_tag(run_id, TAG_INPUTS, stage_hash)
    return run_id


def ensure_demo_data(request: PipelineRequest) -> Path:
    if not (request.demo_dir / DEMO_MARKER).exists():
        click.echo(f"building the demo dataset in {request.demo_dir} from {request.esc50}")
        build_demo_dataset(request.esc50, request.demo_dir, seed=0)
    return request.demo_dir


def run_arch_chain(request: PipelineRequest, data: Path, arch: str, parent: str,
                   fingerprint: str) -> dict[str, str]:
    """Stages 1-4 for one network; returns stage -> run ID."""
    profile = replace(request.profile, train=replace(request.profile.train, arch=arch))
    base = dict(data=data, profile=profile, cache_dir=request.cache_dir,
                pipeline_run_id=parent, progress=request.progress)
    runs: dict[str, str] = {}

    def init(stage: str) -> str | None:
        return runs[stage] if request.warm_start else None

    runs["stage1"] = run_or_reuse(StageRequest(stage="stage1", **base), fingerprint)
    runs["stage2"] = run_or_reuse(StageRequest(stage="stage2", init_run_id=init("stage1"), **base),
                                  fingerprint)
    runs["stage3"] = run_or_reuse(StageRequest(stage="stage3", init_run_id=init("stage2"),
                                               selection_run_ids=[runs["stage1"], runs["stage2"]],
                                               threshold=request.threshold,
                                               max_per_label_per_fold=request.max_per_label_per_fold,
                                               **base), fingerprint)
    runs["stage4"] = run_or_reuse(StageRequest(stage="stage4", init_run_id=init("stage3"),
                                               selection_run_ids=[runs["stage3"]], **base),
                                  fingerprint)
    return runs


def stage_table(chains: dict[str, dict[str, str]]) -> pd.DataFrame:
    """The seed's Table 2 for this data: one row per (network, stage)."""
    client = MlflowClient()
    rows = []
    for arch, runs in chains.items():
        for stage, run_id in runs.items():
            metrics = client.get_run(run_id).data.metrics
            rows.append({"model": f"{arch} model{stage[-1]}", "arch": arch, "stage": stage,
                         "run_id": run_id,
                         **{key: metrics.get(key) for key in
                            ("lwlrap_noisy", "lwlrap_curated", "lwlrap_test",
                             "selection_precision", "noisy_base_rate", "selected_clips")}})
    return pd.DataFrame(rows)


def run_pipeline(request: PipelineRequest) -> tuple[str, pd.DataFrame]:
    """features -> stage 1..4 per network -> ensemble; returns the parent run ID and Table 2."""
    configure_tracking()
    data = request.data or ensure_demo_data(request)
    fingerprint = dataset_fingerprint(load_dataset(data))
    with mlflow.start_run(run_name=f"pipeline-{request.profile.name}") as parent:
        parent_id = parent.info.run_id
        mlflow.set_tags({TAG_STAGE: "pipeline", TAG_DATASET: fingerprint})
        # "pipeline." keys: `mlflow run` already logged the raw entry-point parameters
        mlflow.log_params({"pipeline.data": str(data), "pipeline.archs": ",".join(request.archs),
                           "pipeline.threshold": request.threshold,
                           "pipeline.max_per_label_per_fold": request.max_per_label_per_fold,
                           "pipeline.warm_start": request.warm_start,
                           **request.profile.flat()})
        run_features(data, request.profile.features, request.cache_dir, jobs=0,
                     progress=request.progress)
        chains = {arch: run_arch_chain(request, data, arch, parent_id, fingerprint)
                  for arch in request.archs}
        table = stage_table(chains)
        ensemble_runs = [runs[s] for runs in chains.values() for s in ("stage2", "stage3", "stage4")]
        ensemble_row = build_and_register(ensemble_runs, data, request.registered_model)
        table = pd.concat([table, pd.DataFrame([ensemble_row])], ignore_index=True)
        log_table(table, "report/stage_table.csv")
        mlflow.log_figure(plot_stage_table(table.dropna(subset=["lwlrap_test"], how="all")),
                          "report/stage_table.png")
        mlflow.set_tag(TAG_PIPELINE, parent_id)
    return parent_id, table


def build_and_register(run_ids: list[str], data: Path, registered_model: str) -> dict:
    from fat_mlflow.ensemble import build_ensemble

    run_id, version = build_ensemble(run_ids, registered_model=registered_model, data=data)
    metrics = MlflowClient().get_run(run_id).data.metrics
    return {"model": "ensemble", "arch": "all",
            "stage": "ensemble", "run_id": run_id, "lwlrap_test": metrics.get("lwlrap_test"),
            "registered_version": version}
