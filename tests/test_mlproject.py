"""The MLflow project itself: `mlflow run` of the entry points, as a user types it."""
import os
import subprocess
import sys
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from fat_mlflow.warmup.tracking import DEFAULT_EXPERIMENT

REPO = Path(__file__).resolve().parents[1]


def mlflow_run(tmp_path, entry_point, **params):
    """As the README writes it: `mlflow run` creates its run before our code starts, so the
    experiment is named on its command line."""
    command = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry_point,
               "--env-manager", "local", "--experiment-name", DEFAULT_EXPERIMENT]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_mlproject_and_conda_env_declare_the_same_dependencies():
    project = yaml.safe_load((REPO / "MLproject").read_text())
    assert {"main", "demo-data", "features", "stage1", "stage2", "stage3", "stage4"} <= set(
        project["entry_points"])
    conda = yaml.safe_load((REPO / project["conda_env"]).read_text())
    pip_deps = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(declared) == sorted(d for d in pip_deps if not d.startswith("-e"))


def test_demo_data_and_stage1_entry_points(tmp_path, demo_data):
    out = tmp_path / "demo"
    mlflow_run(tmp_path, "demo-data", out_dir=out, scale=0.03)
    assert (out / "train_curated.csv").is_file() and (out / "noise_truth.csv").is_file()

    mlflow_run(tmp_path, "stage1", data=demo_data, profile="tiny",
               overrides="train.epochs=1 train.width=0.0625")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT).experiment_id
    assert client.search_runs(["0"]) == []  # nothing in the Default experiment
    runs = client.search_runs([experiment], "tags.`fat.stage` = 'stage1'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.entryPoint"] == "stage1"
    assert run.data.params["train.epochs"] == "1"
    assert {"lwlrap_noisy", "lwlrap_curated"} <= set(run.data.metrics)
    contexts = {entry.dataset.name.split("/")[-1]:
                {tag.key: tag.value for tag in entry.tags}["mlflow.data.context"]
                for entry in run.inputs.dataset_inputs}
    assert contexts == {"train_noisy": "training", "test": "evaluation"}
