"""The student against its teacher, both served as users serve them: each registered version
behind its own `mlflow models serve`, one after the other, on the same machine and clips.

Per distill run: the server's start-up time (process start to the first /ping), p50/p95 of
one 5-s test clip sent as base64 (the ensemble's dearest one, the same for both models),
clips/s and test lwlrap from scoring the whole test set over HTTP in batches, the checkpoint
size, and the forward GFLOPs of that clip. The ensemble row of each teacher is the baseline;
the students of several distill runs of one teacher (widths) share it. The figure plots each
student's lwlrap against its p50, the teachers and the floor beside them.

Beside them, the p50 no student on the ensemble's features can beat: what the student's server
takes for a request of the clip's size that it answers without reading audio (HTTP, JSON,
MLflow's schema check, the answer), taking turns with the clip's calls, plus decoding and the
log-mel of the clip in this process. It is the part of every served p50 that a smaller network
does not reach.

    fat-mlflow benchmark --only distill [--distill-runs ID,ID,ID]
"""
from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
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
    timed_alternately,
)
from fat_mlflow.benchmarks.serving import (
    WARMUP_CALLS,
    clip_windows,
    http_predict,
    latency_clip,
    load_tagger,
    preprocessing,
    scoring_flops,
    served,
)
from fat_mlflow.data.layout import load_dataset
from fat_mlflow.engine.metrics import lwlrap
from fat_mlflow.engine.training import resolve_device
from fat_mlflow.plots import plot_distill_tradeoff
from fat_mlflow.serving.distill import TAG_TEACHER
from fat_mlflow.serving.tagger import AUDIO_ROOT_ENV, PATH_COLUMN, PATHS_OFF, FatTagger
from fat_mlflow.warmup.tracking import TAG_COMPLETE, TAG_STAGE, RunLookupError, get_run

COLUMNS = (("lwlrap_test", "test lwlrap (HTTP)"), ("lwlrap_gap", "gap to ensemble"),
           ("floor_lwlrap_test", "floor"), ("p50_ms", "p50 ms (one 5-s clip)"),
           ("p95_ms", "p95 ms"), ("p50_fraction_of_ensemble", "p50 / ensemble's"),
           ("clips_per_s", "clips/s (batch)"), ("model_mb", "MB"),
           ("startup_s", "start-up s"), ("gflop_per_clip", "GFLOP / clip"))
BOUND_LABEL = ("p50 bound of any student on these features: the request answered unread + "
               "decode and log-mel")
P50_TARGET_FRACTION = 0.2  # issue 27: the student's p50 at most 1/5 of the ensemble's
MEAN_KEYS = ("lwlrap_test", "lwlrap_gap", "p50_ms", "p95_ms", "p50_fraction_of_ensemble",
             "clips_per_s", "model_mb", "startup_s", "gflop_per_clip", "floor_lwlrap_test",
             "unread_p50_ms", "decode_log_mel_p50_ms")


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


def unread_request(url: str, n_chars: int) -> Callable[[], object]:
    """A call that posts one `path` row of `n_chars` characters: a request the size of the
    clip's that the server refuses unread (path input is off), so it costs the server all it
    spends on a request and nothing of the model. Raises here if the server did read it; the
    answer is checked once, so the timed calls parse nothing the clip's calls do not."""
    post = http_predict(url, PATH_COLUMN)
    row = ["x" * n_chars]
    error = post(row).json()["predictions"][0]["error"]
    if PATHS_OFF not in error:
        raise RuntimeError(f"the server did not refuse the unread row unopened: {error!r}")
    return partial(post, row)


def measure_served(model: ServedModel, one: list[str], test_clips: list[Path],
                   truth: np.ndarray, vocabulary: list[str], size: BenchmarkProfile
                   ) -> dict[str, float]:
    """Start-up, one-clip latency, batch throughput and test lwlrap, all over HTTP; the
    one-clip calls take turns with a request of the same size answered unread. The test
    clips are read and encoded a batch at a time, outside the timed calls."""
    env = {key: value for key, value in os.environ.items() if key != AUDIO_ROOT_ENV}
    started = time.perf_counter()
    with served(model.uri, env=env) as url:  # path input off: the unread row stays unread
        startup = time.perf_counter() - started
        post = http_predict(url)
        latency = timed_alternately({"clip": lambda: post(one),
                                     "unread": unread_request(url, len(one[0]))},
                                    size.latency_calls, warmup=WARMUP_CALLS)
        p50, p95 = percentiles_ms(latency["clip"])
        scores, seconds = [], 0.0
        for first in range(0, len(test_clips), size.batch_clips):
            rows = [encode(path) for path in test_clips[first:first + size.batch_clips]]
            begin = time.perf_counter()
            response = post(rows)
            seconds += time.perf_counter() - begin
            scores.append(pd.DataFrame(response.json()["predictions"])[vocabulary])
    return {"startup_s": startup, "p50_ms": p50, "p95_ms": p95,
            "clips_per_s": len(test_clips) / seconds,
            "lwlrap_test": lwlrap(truth, pd.concat(scores).to_numpy(dtype=np.float64)),
            "model_mb": model.model_mb, "unread_p50_ms": percentiles_ms(latency["unread"])[0]}


def encode(path: Path) -> str:
    """A clip as a client sends it: its file's bytes in base64."""
    return base64.b64encode(path.read_bytes()).decode("ascii")


def preprocessing_p50_ms(tagger: FatTagger, row: str, size: BenchmarkProfile) -> float:
    """p50 of decoding the base64 clip and its log-mel, as the served model does them."""
    return percentiles_ms(timed(preprocessing(tagger, row), size.latency_calls,
                                warmup=WARMUP_CALLS))[0]


def bound_figures(unread_ms: float, preprocessing_ms: float, ensemble_p50_ms: float
                  ) -> dict[str, float]:
    """The p50 of a student whose network took no time, and its fraction of the ensemble's."""
    p50 = unread_ms + preprocessing_ms
    return {"p50_ms": p50, "p50_fraction_of_ensemble": p50 / ensemble_p50_ms,
            "unread_p50_ms": unread_ms, "decode_log_mel_p50_ms": preprocessing_ms}


def run(size: BenchmarkProfile, distill_run_ids: Sequence[str] = ()) -> tuple[Table, Figure]:
    """Every distill run's teacher (once per teacher) and student, served and measured."""
    distills = [get_run(run_id) for run_id in (distill_run_ids or latest_distill_runs())]
    for run in distills:
        if run.data.tags.get(TAG_STAGE) != "distill" or TAG_TEACHER not in run.data.tags:
            raise RunLookupError(f"run {run.info.run_id} is not a distill run "
                                 f"(its stage: {run.data.tags.get(TAG_STAGE, 'none')})")
    results: list[Result] = []
    points, bounds = [], []
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
        one = [encode(clip)]
        truth = dataset.targets(dataset.test)
        floor = distill.data.metrics.get("floor_lwlrap_test", np.nan)
        shared: dict[str, ParamValue] = {
            "teacher_run_id": teacher.run_id, "latency_clip": clip.name,
            "latency_clip_seconds": round(seconds, 3), "test_clips": len(paths),
            "batch_clips": size.batch_clips, "latency_calls": size.latency_calls}
        taggers = {"ensemble": teacher_tagger, "student": load_tagger(student.uri)[1]}
        measured = {}
        for model in (teacher, student):
            if model.role == "ensemble" and teacher.run_id in teachers:
                measured[model.role] = teachers[teacher.run_id]
                continue
            tagger = taggers[model.role]
            figures = {**measure_served(model, one, paths, truth, dataset.vocabulary, size),
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
        bound = bound_figures(mine["unread_p50_ms"],
                              preprocessing_p50_ms(taggers["student"], one[0], size),
                              base["p50_ms"])
        results.append(Result(f"{teacher.run_id[:8]}: {BOUND_LABEL}",
                              {**shared, "model": student.uri, "role": "bound"}, bound))
        bounds.append({"label": BOUND_LABEL, **bound})
    summary = pd.DataFrame(points)
    for label, group in pd.concat([summary, pd.DataFrame(bounds)]).groupby("label", sort=False):
        results.append(Result(f"mean of {len(group)}: {label}", {"role": "mean"}, {
            key: float(group[key].mean()) for key in MEAN_KEYS if group[key].notna().any()}))
    title = (f"{len(points)} students beside their ensembles, each served alone by `mlflow "
             f"models serve` (one worker); one-clip latency over {size.latency_calls} calls, "
             f"the test set in batches of {size.batch_clips}; beside each student, the p50 "
             "bound of its features")
    return (Table("distill", title, COLUMNS, tuple(results), machine_facts(resolve_device("auto"))),
            plot_distill_tradeoff(summary, float(np.mean([b["p50_ms"] for b in bounds])),
                                  P50_TARGET_FRACTION))

