"""The main job's time per CPU number format: `fat-mlflow pipeline` as a user runs it, with
`train.amp=false` (the float32 path every CPU without bf16 units takes: the baseline) and
then by default (bf16 autocast where the CPU has bf16 units), one after the other.

Each job runs in its own process, with a fresh tracking store and a fresh feature cache (the
log-mels are computed again, as in a fresh clone), on the same data: the demo in ./demo_data
(built first when missing, timed apart) or `--data`. Rows: the two jobs (wall and CPU
minutes, the share that is not training steps, the ensemble's test lwlrap), each stage of
each job (its `time_*_s` metrics: minutes and the share that is not training steps), and
the rest of each job (start-up, features, ensemble, registration).

    python -m fat_mlflow.benchmarks.pipeline [--profile standard] [--data DIR]
                                             [--set section.field=value ...]
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from fat_mlflow.benchmarks import BENCHMARK_PROFILES, BenchmarkProfile
from fat_mlflow.benchmarks.common import ParamValue, Result, Table, machine_facts
from fat_mlflow.config import get_profile, parse_overrides
from fat_mlflow.data.demo import SUMMARY_FILE
from fat_mlflow.data.esc50 import SOURCES_HELP
from fat_mlflow.engine.precision import bf16_units
from fat_mlflow.warmup.pipeline import DEMO_DIR, JOB_ENTRY, LOG_TAIL_CHARS, ensure_demo_data
from fat_mlflow.warmup.stage_inputs import STAGES
from fat_mlflow.warmup.tracking import TAG_STAGE

COLUMNS = (("minutes", "wall min"), ("cpu_minutes", "CPU min"),
           ("non_training_share", "not training steps"), ("lwlrap_test", "test lwlrap"),
           ("speed_vs_baseline", "speed vs float32 (x)"))
# the variables of a surrounding run or experiment, which a job must not log into
MLFLOW_CONTEXT = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


@dataclass(frozen=True)
class JobTimes:
    """One finished main job: its times and what its stage and ensemble runs recorded."""

    wall_s: float
    cpu_s: float  # user + system of the job and every process it waited for
    load_before: float  # 1-minute load average when it started and ended: how shared the
    load_after: float  # machine was
    stages: dict[str, dict[str, float]]  # stage -> its run's metrics
    lwlrap_test: float


def run_job(data: Path, profile: str, overrides: dict[str, str], folder: Path) -> JobTimes:
    """`fat-mlflow pipeline` in a process of its own, logging into a fresh store in `folder`."""
    folder.mkdir(parents=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    env = {key: value for key, value in os.environ.items() if key not in MLFLOW_CONTEXT}
    env["MLFLOW_TRACKING_URI"] = uri
    command = [sys.executable, "-c", JOB_ENTRY, "pipeline", "--data", str(data.resolve()),
               "--profile", profile, "--cache-dir", str(folder / "features")]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    log = folder / "job.log"
    load_before, cpu_before = os.getloadavg()[0], _children_cpu_s()
    started = time.perf_counter()
    with log.open("w") as sink:
        code = subprocess.run(command, cwd=folder, env=env, stdout=sink,
                              stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"the main job {' '.join(command[3:])} exited with {code}:\n"
                           f"{log.read_text()[-LOG_TAIL_CHARS:]}")
    stages, lwlrap_test = _recorded(MlflowClient(uri))
    return JobTimes(wall, _children_cpu_s() - cpu_before, load_before, os.getloadavg()[0],
                    stages, lwlrap_test)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _recorded(client: MlflowClient) -> tuple[dict[str, dict[str, float]], float]:
    """The stage runs' metrics by stage, and the ensemble's test lwlrap, of a job's store."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    stages, lwlrap_test = {}, float("nan")
    for run in client.search_runs(experiments):
        stage = run.data.tags.get(TAG_STAGE)
        if stage in STAGES:
            stages[stage] = run.data.metrics
        elif stage == "ensemble":
            lwlrap_test = run.data.metrics.get("lwlrap_test", float("nan"))
    return dict(sorted(stages.items())), lwlrap_test


def job_results(name: str, job: JobTimes, baseline: JobTimes | None,
                params: dict[str, ParamValue]) -> list[Result]:
    """The job's row, a row per stage, and the rest of the job; speeds against `baseline`."""
    stage_s = {stage: metrics["time_total_s"] for stage, metrics in job.stages.items()}
    train_s = sum(metrics.get("time_train_steps_s", 0.0) for metrics in job.stages.values())
    shared = {**params, "job": name, "load_before": job.load_before,
              "load_after": job.load_after}

    def speed(seconds: float, base: float | None) -> dict[str, float]:
        return {"speed_vs_baseline": base / seconds} if base else {}

    rows = [Result(f"main job, {name}", {**shared, "part": "job"}, {
        "minutes": job.wall_s / 60, "cpu_minutes": job.cpu_s / 60,
        "non_training_share": 1 - train_s / job.wall_s, "lwlrap_test": job.lwlrap_test,
        **speed(job.wall_s, baseline.wall_s if baseline else job.wall_s)},
        baseline=baseline is None)]
    for stage, metrics in job.stages.items():
        base = baseline.stages.get(stage, {}).get("time_total_s") if baseline else None
        rows.append(Result(f"{name}: {stage}", {**shared, "part": stage}, {
            "minutes": stage_s[stage] / 60, "non_training_share": metrics["non_training_share"],
            "lwlrap_test": metrics.get("lwlrap_test", float("nan")),
            **speed(stage_s[stage], base)}))
    rest = job.wall_s - sum(stage_s.values())
    rows.append(Result(f"{name}: the rest (start-up, features, ensemble, student)",
                       {**shared, "part": "rest"}, {"minutes": rest / 60}))
    return rows


def run(size: BenchmarkProfile, data: Path | None = None, esc50: Path | None = None,
        overrides: dict[str, str] | None = None) -> Table:
    """Both jobs (only the float32 one on a CPU without bf16 units, where it is the default)."""
    device = torch.device("cpu")
    profile = size.pipeline_profile
    overrides = dict(overrides or {})
    get_profile(profile, overrides)  # a wrong setting fails here, not in the job
    params: dict[str, ParamValue] = {"profile": profile, "overrides": " ".join(
        f"{key}={value}" for key, value in overrides.items())}
    started = time.perf_counter()
    if data is None:
        built = not (DEMO_DIR / SUMMARY_FILE).is_file()
        data = ensure_demo_data(DEMO_DIR, esc50)
        params["demo_build_s"] = round(time.perf_counter() - started, 1) if built else 0
    params["data"] = str(data)
    units = bf16_units(device)
    with tempfile.TemporaryDirectory(prefix="fat-bench-pipeline-") as tmp:
        float32 = run_job(data, profile, {**overrides, "train.amp": "false"},
                          Path(tmp) / "float32")
        results = job_results("float32 (train.amp=false)", float32, None, params)
        if units:
            default = run_job(data, profile, overrides, Path(tmp) / "default")
            results += job_results(f"default: bfloat16 autocast ({units})", default, float32,
                                   params)
    title = (f"the main job (`fat-mlflow pipeline --profile {profile}`) on {data}, each in a "
             f"fresh tracking store and feature cache, one after the other"
             + ("" if units else "; this CPU has no bf16 units, so its default is float32"))
    return Table("pipeline", title, COLUMNS, tuple(results), machine_facts(device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(BENCHMARK_PROFILES), default="standard",
                        help="benchmark size (tiny: the tiny training profile)")
    parser.add_argument("--data", type=Path, default=None,
                        help="FAT2019-layout dataset (default: the demo in ./demo_data)")
    parser.add_argument("--esc50", type=Path, default=None,
                        help=f"ESC-50 folder for the demo ({SOURCES_HELP})")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[],
                        help="settings of both jobs, e.g. train.epochs=16")
    args = parser.parse_args()
    table = run(BENCHMARK_PROFILES[args.profile], args.data, args.esc50,
                parse_overrides(args.overrides))
    print(table.markdown())


if __name__ == "__main__":
    main()
