"""The student against its teacher, both served as users serve them: each registered version
behind its own `mlflow models serve`, one after the other, on the same machine and clips.

Per distill run: the server's start-up time (process start to the first /ping), p50/p95 of
one 5-s test clip sent as base64 (the ensemble's dearest one, the same for both models),
clips/s and test lwlrap from scoring the whole test set over HTTP in batches, the checkpoint
size, and the forward GFLOPs of that clip. The ensemble row of each teacher is the baseline;
the students of several distill runs of one teacher (widths) share it. The figure plots each
student's lwlrap against its p50, the teachers and the floor beside them.

    fat-mlflow benchmark --only distill [--distill-runs ID,ID,ID]
"""
from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from fat_mlflow.benchmarks import BenchmarkProfile
from fat_mlflow.benchmarks.common import (
    ParamValue,
    Result,
    Table,
    machine_facts,
    percentiles_ms,
    timed,
)
from fat_mlflow.benchmarks.serving import (
    WARMUP_CALLS,
    clip_windows,
    http_predict,
    latency_clip,
    load_tagger,
    scoring_flops,
    served,
)
from fat_mlflow.data.layout import load_dataset
from fat_mlflow.engine.metrics import lwlrap
from fat_mlflow.engine.training import resolve_device
from fat_mlflow.plots import plot_distill_tradeoff
from fat_mlflow.serving.distill import TAG_TEACHER
from fat_mlflow.warmup.tracking import TAG_COMPLETE, TAG_STAGE, RunLookupError, get_run

COLUMNS = (("lwlrap_test", "test lwlrap (HTTP)"), ("lwlrap_gap", "gap to ensemble"),
           ("floor_lwlrap_test", "floor"), ("p50_ms", "p50 ms (one 5-s clip)"),
           ("p95_ms", "p95 ms"), ("p50_fraction_of_ensemble", "p50 / ensemble's"),
           ("clips_per_s", "clips/s (batch)"), ("model_mb", "MB"),
           ("startup_s", "start-up s"), ("gflop_per_clip", "GFLOP / clip"))


@dataclass(frozen=True)
class ServedModel:
    """One registered version to serve, and what its runs already know about it."""

    role: str  # "ensemble" or "student"
    uri: str  # models:/NAME/VERSION
    run_id: str
    model_mb: float
    label: str


def latest_distill_runs(limit: int = 3) -> list[str]:
    """The newest finished distill runs of the tracking store, one per teacher."""
    client = MlflowClient()
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], f"tags.`{TAG_STAGE}` = 'distill' and tags.`{TAG_COMPLETE}` = 'true'",
        order_by=["attributes.start_time DESC"], max_results=200)
    chosen: dict[str, str] = {}
    for run in runs:
        chosen.setdefault(run.data.tags.get(TAG_TEACHER, ""), run.info.run_id)
    if not chosen:
        raise RunLookupError("no finished distill run in this tracking store: run `fat-mlflow "
                             "distill --teacher ...` (or the pipeline) first, or pass "
                             "--distill-runs")
    return list(chosen.values())[:limit]


def registered_version(run_id: str) -> str:
    """`models:/NAME/VERSION` of the model version registered from `run_id`."""
    versions = MlflowClient().search_model_versions(f"run_id = '{run_id}'")
    if not versions:
        raise RunLookupError(f"run {run_id} has no registered model version to serve")
    latest = max(versions, key=lambda v: int(v.version))
    return f"models:/{latest.name}/{latest.version}"


def served_pair(distill: Run) -> tuple[ServedModel, ServedModel]:
    """The teacher ensemble and the student of a finished distill run."""
    metrics, params = distill.data.metrics, distill.data.params
    teacher_id = distill.data.tags[TAG_TEACHER]
    width = params.get("distill.width", "?")
    teacher = ServedModel("ensemble", registered_version(teacher_id), teacher_id,
                          metrics.get("teacher_mb", np.nan), "ensemble (every fold model)")
    student = ServedModel("student", registered_version(distill.info.run_id),
                          distill.info.run_id, metrics.get("student_mb", np.nan),
                          f"student ({params.get('distill.arch', '?')}, width {width})")
    return teacher, student


def measure_served(model: ServedModel, one: list[str], test_rows: list[str],
                   truth: np.ndarray, vocabulary: list[str], size: BenchmarkProfile
                   ) -> dict[str, float]:
    """Start-up, one-clip latency, batch throughput and test lwlrap, all over HTTP."""
    started = time.perf_counter()
    with served(model.uri) as url:
        startup = time.perf_counter() - started
        post = http_predict(url)
        p50, p95 = percentiles_ms(timed(lambda: post(one), size.latency_calls,
                                        warmup=WARMUP_CALLS))
        scores, seconds = [], 0.0
        for first in range(0, len(test_rows), size.batch_clips):
            begin = time.perf_counter()
            response = post(test_rows[first:first + size.batch_clips])
            seconds += time.perf_counter() - begin
            scores.append(pd.DataFrame(response.json()["predictions"])[vocabulary])
    return {"startup_s": startup, "p50_ms": p50, "p95_ms": p95,
            "clips_per_s": len(test_rows) / seconds,
            "lwlrap_test": lwlrap(truth, pd.concat(scores).to_numpy(dtype=np.float64)),
            "model_mb": model.model_mb}


def run(size: BenchmarkProfile, distill_run_ids: Sequence[str] = ()) -> tuple[Table, Figure]:
    """Every distill run's teacher (once per teacher) and student, served and measured."""
    distills = [get_run(run_id) for run_id in (distill_run_ids or latest_distill_runs())]
    for run in distills:
        if run.data.tags.get(TAG_STAGE) != "distill" or TAG_TEACHER not in run.data.tags:
            raise RunLookupError(f"run {run.info.run_id} is not a distill run "
                                 f"(its stage: {run.data.tags.get(TAG_STAGE, 'none')})")
    results: list[Result] = []
    points = []
    teachers: dict[str, dict[str, float]] = {}
    for distill in distills:
        teacher, student = served_pair(distill)
        dataset = load_dataset(Path(distill.data.params["data"]))
        if not dataset.has_test_truth:
            raise RunLookupError(f"{distill.data.params['data']} has no test labels: the "
                                 "benchmark compares test lwlrap")
        _, teacher_tagger = load_tagger(teacher.uri)
        paths = [Path(p) for p in dataset.test["path"]]
        clip, seconds, _ = latency_clip(paths, teacher_tagger)
        encoded = [base64.b64encode(p.read_bytes()).decode("ascii") for p in paths]
        one = [encoded[paths.index(clip)]]
        truth = dataset.targets(dataset.test)
        floor = distill.data.metrics.get("floor_lwlrap_test", np.nan)
        shared: dict[str, ParamValue] = {
            "teacher_run_id": teacher.run_id, "latency_clip": clip.name,
            "latency_clip_seconds": round(seconds, 3), "test_clips": len(paths),
            "batch_clips": size.batch_clips, "latency_calls": size.latency_calls}
        measured = {}
        for model in (teacher, student):
            if model.role == "ensemble" and teacher.run_id in teachers:
                measured[model.role] = teachers[teacher.run_id]
                continue
            _, tagger = load_tagger(model.uri)
            figures = {**measure_served(model, one, encoded, truth, dataset.vocabulary, size),
                       "gflop_per_clip": scoring_flops(tagger, clip_windows(clip, tagger)) / 1e9,
                       "floor_lwlrap_test": floor}
            measured[model.role] = figures
            if model.role == "ensemble":
                teachers[teacher.run_id] = figures
                results.append(Result(f"{teacher.run_id[:8]}: {teacher.label}",
                                      {**shared, "model": teacher.uri, "role": "ensemble"},
                                      figures, baseline=True))
        base, mine = measured["ensemble"], measured["student"]
        mine["lwlrap_gap"] = base["lwlrap_test"] - mine["lwlrap_test"]
        mine["p50_fraction_of_ensemble"] = mine["p50_ms"] / base["p50_ms"]
        results.append(Result(f"{teacher.run_id[:8]}: {student.label}",
                              {**shared, "model": student.uri, "role": "student",
                               "width": distill.data.params.get("distill.width", "")}, mine))
        points.append({"teacher": teacher.run_id[:8], "label": student.label, **mine,
                       "teacher_lwlrap": base["lwlrap_test"], "teacher_p50": base["p50_ms"]})
    summary = pd.DataFrame(points)
    for label, group in summary.groupby("label", sort=False):  # one mean per kind of student
        results.append(Result(f"mean of {len(group)}: {label}", {"role": "mean"}, {
            key: float(group[key].mean()) for key in
            ("lwlrap_test", "lwlrap_gap", "p50_ms", "p95_ms", "p50_fraction_of_ensemble",
             "clips_per_s", "model_mb", "startup_s", "gflop_per_clip", "floor_lwlrap_test")}))
    title = (f"{len(points)} students beside their ensembles, each served alone by `mlflow "
             f"models serve` (one worker); one-clip latency over {size.latency_calls} calls, "
             f"the test set in batches of {size.batch_clips}")
    return (Table("distill", title, COLUMNS, tuple(results), machine_facts(resolve_device("auto"))),
            plot_distill_tradeoff(summary))

