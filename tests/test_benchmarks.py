"""`fat-mlflow benchmark`: each result is an MLflow run with sane figures and machine facts, the
markdown tables are written and logged; the training benchmark runs without MLflow or librosa."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from fat_mlflow.benchmarks.training import CONFIGS as TRAINING_CONFIGS
from fat_mlflow.cli import main
from fat_mlflow.config import PROFILES
from fat_mlflow.data.store import FeatureStore
from fat_mlflow.engine.models import build_model, flops_per_sample
from fat_mlflow.engine.precision import bf16_units
from fat_mlflow.warmup.tracking import DEFAULT_EXPERIMENT

REPO = Path(__file__).resolve().parents[1]


def _benchmark(*args: str):
    result = CliRunner().invoke(main, ["benchmark", "--profile", "tiny", *args])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


def _children(tracking_uri: str) -> tuple[mlflow.entities.Run, dict[str, list]]:
    """The single benchmark parent run and its result runs grouped by benchmark."""
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(DEFAULT_EXPERIMENT).experiment_id])
    parents = [r for r in runs if r.data.tags.get("fat.stage") == "benchmark"]
    assert len(parents) == 1
    grouped: dict[str, list] = {}
    for run in runs:
        if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id:
            grouped.setdefault(run.data.tags["fat.benchmark"], []).append(run)
    return parents[0], grouped


def _by_setting(runs: list) -> dict[str, mlflow.entities.Run]:
    return {run.data.params["setting"]: run for run in runs}


def _by_path(runs: list, path: str) -> mlflow.entities.RunData:
    """The one inference result measured along `path` (pyfunc, http, preprocessing)."""
    [run] = [run for run in runs if run.data.params["path"] == path]
    return run.data


def test_every_result_is_a_run_with_sane_figures_and_the_tables_are_written(
        demo_data, tracking, tmp_path):
    out = tmp_path / "report" / "benchmarks.md"
    result = _benchmark("--data", str(demo_data), "--out", str(out))
    parent, grouped = _children(tracking)
    assert set(grouped) == {"features", "training", "inference"}
    children = [run for runs in grouped.values() for run in runs]
    for run in children:
        params, metrics = run.data.params, run.data.metrics
        assert run.info.status == "FINISHED"
        assert params["cpu_count"] == str(os.cpu_count())
        assert params["torch_version"] == torch.__version__
        assert params["device_name"] and params["benchmark_profile"] == "tiny"
        assert metrics and all(np.isfinite(v) and v > 0 for v in metrics.values()), metrics
    for name, runs in grouped.items():
        baselines = [run for run in runs if run.data.params["baseline"] == "True"]
        assert len(baselines) == 1, name
        assert baselines[0].data.tags["fat.baseline"] == "true"

    features = _by_setting(grouped["features"])
    assert len(features) == 5
    loop = features["librosa loop, sequential"]
    assert loop.data.metrics["speed_vs_baseline"] == 1.0
    for run in features.values():
        m = run.data.metrics
        assert run.data.params["n_clips"] == "6"
        assert m["clips_per_s"] * m["seconds"] == pytest.approx(6)
        assert m["speed_vs_baseline"] == pytest.approx(
            loop.data.metrics["seconds"] / m["seconds"])
        assert m["x_realtime"] == pytest.approx(
            float(run.data.params["audio_seconds"]) / m["seconds"], rel=1e-3)

    training = grouped["training"]
    peaks = {r.data.params["dtype"]: r.data.metrics for r in training
             if r.data.params["measure"] == "peak"}
    assert set(peaks) == {"float32", "bfloat16"}
    assert peaks["float32"]["share_of_float32_peak"] == 1.0
    assert peaks["bfloat16"]["share_of_bfloat16_peak"] == 1.0
    formats = ["False", "True"] if bf16_units(torch.device("cpu")) else ["False"]
    nets = {(r.data.params["profile"], r.data.params["arch"], r.data.params["width"],
             r.data.params["amp_bfloat16"]): r for r in training
            if r.data.params["measure"] == "training"}
    assert set(nets) == {(profile, arch, str(width), amp)
                         for profile, arch, width, _ in TRAINING_CONFIGS for amp in formats}
    gflop = [nets[(profile, arch, str(width), "False")].data.metrics["gflop_fwd_per_sample"]
             for profile, arch, width, _ in TRAINING_CONFIGS]
    assert gflop == sorted(gflop) and len(set(gflop)) == len(gflop)
    for (profile, arch, width, _), run in nets.items():
        m = run.data.metrics
        float32 = nets[(profile, arch, width, "False")].data.metrics
        assert run.data.params["batch"] == ("16" if profile == "quick" else "2")
        assert run.data.params["input"].startswith("the cached log-mels of 6 clips")
        assert m["tflop_per_s"] == pytest.approx(3 * m["gflop_fwd_per_sample"] * 1e9
                                                 * m["samples_per_s"] / 1e12)
        for name, peak in peaks.items():
            assert m[f"share_of_{name}_peak"] == pytest.approx(
                m["tflop_per_s"] / peak["tflop_per_s"])
        assert m["speed_vs_float32"] == pytest.approx(m["samples_per_s"]
                                                      / float32["samples_per_s"])

    inference = grouped["inference"]
    base = next(r for r in inference if r.data.params["baseline"] == "True").data
    assert base.params["setting"].startswith("ensemble, float32, eager")
    base = base.metrics
    direct = {(r.data.params["precision"], r.data.params["served_path"]): r.data.metrics
              for r in inference if r.data.params["path"] == "direct"}
    precisions = ["float32", "bfloat16"] if formats == ["False", "True"] else ["float32"]
    assert set(direct) == {(name, served) for name in precisions for served in ("False", "True")}
    pyfunc = _by_path(inference, "pyfunc")
    decode = _by_path(inference, "preprocessing")
    assert pyfunc.params["n_fold_models"] == "6"
    assert pyfunc.params["precision"] == precisions[-1] and pyfunc.params["served_path"] == "True"
    assert base["latency_speed_vs_baseline"] == base["throughput_vs_baseline"] == 1.0
    for m in (*direct.values(), pyfunc.metrics, decode.metrics):
        assert m["p95_ms"] >= m["p50_ms"]
        assert m["latency_speed_vs_baseline"] == pytest.approx(base["p50_ms"] / m["p50_ms"])
    for m in (*direct.values(), pyfunc.metrics):
        assert m["throughput_vs_baseline"] == pytest.approx(m["clips_per_s"]
                                                            / base["clips_per_s"])
    assert "clips_per_s" not in decode.metrics
    # the fold models' share of the matmul peak, and the p50 a clip would take at that peak
    bound = _by_path(inference, "bound").metrics
    windows = int(pyfunc.params["latency_windows"])
    one_model = flops_per_sample(build_model("cnn", 80, PROFILES["quick"].train.width))
    assert float(pyfunc.params["latency_gflop"]) == pytest.approx(windows * 6 * one_model / 1e9,
                                                                 abs=0.01)
    decode_ms = decode.metrics["p50_ms"]
    assert decode_ms < bound["p50_ms"]
    for m in (*direct.values(), pyfunc.metrics):
        assert m["models_share_of_peak"] == pytest.approx(
            (bound["p50_ms"] - decode_ms) / (m["p50_ms"] - decode_ms))

    text = out.read_text()
    assert text == mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/benchmarks.md")
    assert text in result.output
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    table_headers = [line for line in rows if line.startswith("| setting |")]
    assert len(table_headers) == 3 and len(rows) - 3 == len(children)
    for run in children:
        label = run.data.params["setting"]
        assert any(row.startswith(f"| {label}") for row in rows), label
    assert parent.data.params["benchmark.profile"] == "tiny"


def test_a_given_model_is_measured_alone(tracking, tmp_path, esc50_dir):
    from fat_mlflow.benchmarks.serving import save_tagger

    model = save_tagger(tmp_path / "tagger", ["cnn"], runs_per_arch=1, n_folds=2)
    _benchmark("--only", "inference", "--model-uri", str(model), "--esc50", str(esc50_dir),
               "--out", str(tmp_path / "b.md"))
    _, grouped = _children(tracking)
    assert set(grouped) == {"inference"}
    ensemble = _by_path(grouped["inference"], "pyfunc")
    assert ensemble.params["model"] == str(model)
    assert ensemble.params["n_fold_models"] == "2"
    assert float(ensemble.params["latency_clip_seconds"]) == pytest.approx(5, abs=0.1)


def test_main_jobs_are_timed_per_stage_in_fresh_stores(demo_data, tracking, tmp_path):
    """Two real tiny main jobs (float32, then the default where the CPU has bf16 units)."""
    _benchmark("--only", "pipeline", "--data", str(demo_data), "--out", str(tmp_path / "b.md"))
    _, grouped = _children(tracking)
    rows = _by_setting(grouped["pipeline"])
    jobs = {run.data.params["job"] for run in rows.values()}
    assert len(jobs) == (2 if bf16_units(torch.device("cpu")) else 1)
    baseline = rows["main job, float32 (train.amp=false)"].data.metrics
    assert baseline["speed_vs_baseline"] == 1.0 and 0 < baseline["lwlrap_test"] <= 1
    for job in jobs:
        job_row = rows[f"main job, {job}"].data.metrics
        stages = [rows[f"{job}: stage{k}"].data.metrics for k in (1, 2, 3, 4)]
        rest = rows[f"{job}: the rest (start-up, features, ensemble, student)"].data.metrics
        assert job_row["cpu_minutes"] > 0 and 0 < job_row["non_training_share"] < 1
        assert all(0 < m["non_training_share"] < 1 for m in stages)
        # the stages and the rest make up the job's wall time
        assert sum(m["minutes"] for m in stages) + rest["minutes"] == pytest.approx(
            job_row["minutes"])
        assert job_row["speed_vs_baseline"] == pytest.approx(
            baseline["minutes"] / job_row["minutes"])
    assert rows["main job, float32 (train.amp=false)"].data.params["profile"] == "tiny"


def test_unknown_benchmark_is_refused_before_any_run(tracking, tmp_path):
    result = CliRunner().invoke(main, ["benchmark", "--only", "features,speed"])
    assert result.exit_code == 2
    assert "unknown benchmark(s) speed" in result.output
    assert not (tmp_path / "mlflow.db").exists()  # the tracking store was never opened


def test_mlproject_entry_point_passes_every_parameter_to_the_command():
    entry = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]["benchmark"]
    command = shlex.split(entry["command"])
    assert command[:2] == ["fat-mlflow", "benchmark"]
    options = dict(zip(command[2::2], command[3::2]))
    assert options == {f"--{name.replace('_', '-')}": f"{{{name}}}"
                       for name in entry["parameters"]}
    cli_options = {opt for param in main.commands["benchmark"].params for opt in param.opts}
    assert set(options) <= cli_options


def test_training_benchmark_runs_without_mlflow_and_librosa(tmp_path):
    """What a bare GPU machine (torch + numpy only) runs, here on a feature store's log-mels."""
    rng = np.random.default_rng(0)
    with FeatureStore(tmp_path).writer() as writer:
        for i in range(3):
            writer.append(f"clip{i}", rng.normal(-40, 10, (128, 200)).astype(np.float32), 4.0)
    script = textwrap.dedent(f"""
        import runpy, sys
        sys.modules["mlflow"] = None  # any import of these now raises ImportError
        sys.modules["librosa"] = None
        sys.argv = ["training", "--profile", "tiny", "--configs", "quick/cnn,quick/cnn/0.25/8",
                    "--store", {str(tmp_path)!r}]
        runpy.run_module("fat_mlflow.benchmarks.training", run_name="__main__")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| matmul 1024x1024, float32 (baseline) |")
    assert rows[2].startswith("| matmul 1024x1024, bfloat16 |")
    assert rows[3].startswith("| quick, cnn, width 0.25, batch 16, float32 |")
    formats = 1 + (bf16_units(torch.device("cpu")) is not None)
    if formats == 2:
        assert rows[4].startswith("| quick, cnn, width 0.25, batch 16, bfloat16 + channels_last |")
    assert rows[3 + formats].startswith("| quick, cnn, width 0.25, batch 8, float32 |")
    assert len(rows) == 3 + 2 * formats
    assert f"log-mels from {tmp_path}" in done.stdout
