"""Kubernetes: the Job that `mlflow run ./kubernetes --backend kubernetes` submits, built by
MLflow's own code from kubernetes/, and the image from the root Dockerfile (docs/kubernetes.md).

No cluster and no Docker engine are needed: everything MLflow does before its docker build,
push and `create_namespaced_job` calls runs here for real, and the pod's command runs here
with the pod's environment.
"""
from __future__ import annotations

import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from docker.utils.build import exclude_paths
from kubernetes.client import ApiClient, V1Job
from kubernetes.utils import parse_quantity
from mlflow.projects import _parse_kubernetes_config, _resolve_experiment_id
from mlflow.projects import kubernetes as mlflow_kubernetes
from mlflow.projects.docker import validate_docker_env
from mlflow.projects.utils import (get_entry_point_command, get_or_create_run,
                                   get_run_env_vars, load_project)
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
KUBE = REPO / "kubernetes"
WRAPPER = KUBE / "run-entry-point"
IMAGE_TAG = "localhost:5000/fat-mlflow:0123abc"  # what `--build-image` tags and pushes
IMAGE_DIGEST = "sha256:" + "0" * 64
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
CLUSTER_TRACKING_URI = "http://mlflow.mlflow.svc.cluster.local:5000"
EXPERIMENT = "fat-mlflow"  # docs/kubernetes.md: $K names it, as `mlflow run` creates the run


def backend_config() -> dict:
    """kubernetes_config.json through MLflow's parser, from the repository root like the docs."""
    previous = Path.cwd()
    os.chdir(REPO)
    try:
        return _parse_kubernetes_config(json.loads((KUBE / "kubernetes_config.json").read_text()))
    finally:
        os.chdir(previous)


def submit(entry_point: str, params: dict[str, str]) -> tuple[dict, str]:
    """What `mlflow run ./kubernetes --backend kubernetes` does up to creating the Job, less
    the image build and push: the run it creates in the current store and the Job spec."""
    project = load_project(str(KUBE))
    validate_docker_env(project)
    template = backend_config()["kube-job-template"]
    experiment_id = _resolve_experiment_id(experiment_name=EXPERIMENT)  # --experiment-name
    run = get_or_create_run(None, str(KUBE), experiment_id, str(KUBE), None, entry_point, params)
    command = get_entry_point_command(project, entry_point, params, None)
    env = get_run_env_vars(run_id=run.info.run_id, experiment_id=run.info.experiment_id)
    job = mlflow_kubernetes._get_kubernetes_job_definition(
        project.name, IMAGE_TAG, IMAGE_DIGEST, mlflow_kubernetes._get_run_command(command), env,
        template)
    return job, run.info.run_id


def typed_job(job: dict) -> V1Job:
    """The Job as the official client's typed model. Its models forbid unknown fields, so a
    misspelt or misplaced field fails here, naming its path (kubernetes >= 37: the models are
    pydantic models; `model_validate` is their public constructor from a dict)."""
    return V1Job.model_validate(job)


def container_of(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


def words_reaching_the_program(command: list[str]) -> list[str]:
    """Runs the container command's wrapper for real, with printf in place of the program it
    starts, and returns the words that program receives."""
    assert command[0] == WRAPPER.name, command
    done = subprocess.run(["sh", str(WRAPPER), "printf", shlex.quote("%s\\0"), *command[2:]],
                          capture_output=True, text=True, check=True)
    return [command[1], *done.stdout.split("\0")[:-1]]


def test_backend_config_is_accepted_by_mlflow_and_names_a_pushable_repository():
    config = backend_config()  # MLflow checks the template path and the repository key
    # MLflow appends ":<git commit>" itself, so the repository carries no tag or digest.
    assert re.fullmatch(r"[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)+", config["repository-uri"])
    template = config["kube-job-template"]
    assert template["kind"] == "Job" and template["metadata"]["namespace"]
    assert len(template["spec"]["template"]["spec"]["containers"]) == 1


def test_kubernetes_mlproject_is_generated_from_the_root_one():
    render = runpy.run_path(str(KUBE / "make_mlproject.py"))["render"]
    expected = render((REPO / "MLproject").read_text())
    assert (KUBE / "MLproject").read_text() == expected, (
        "kubernetes/MLproject is out of date with MLproject: run "
        "`python kubernetes/make_mlproject.py`")
    kube = load_project(str(KUBE))  # MLflow's own checks of a docker_env project
    validate_docker_env(kube)
    assert kube.docker_env == {"image": "fat-mlflow"}  # the tag docs/kubernetes.md builds
    root_spec, kube_spec = (yaml.safe_load((folder / "MLproject").read_text())
                            for folder in (REPO, KUBE))
    assert kube_spec["name"] == root_spec["name"]
    assert kube_spec["entry_points"].keys() == root_spec["entry_points"].keys()
    for name, spec in root_spec["entry_points"].items():
        assert kube_spec["entry_points"][name] == {
            **spec, "command": f"{WRAPPER.name} {spec['command']}"}, name


@pytest.mark.parametrize("cluster_uri", [None, CLUSTER_TRACKING_URI],
                         ids=["submitting-uri", "KUBE_MLFLOW_TRACKING_URI"])
def test_stage_job_is_a_valid_kubernetes_job_running_the_local_command(
        tracking, tmp_path, monkeypatch, cluster_uri):
    if cluster_uri:
        monkeypatch.setenv("KUBE_MLFLOW_TRACKING_URI", cluster_uri)
    else:
        monkeypatch.delenv("KUBE_MLFLOW_TRACKING_URI", raising=False)
    params = {"data": "/fat/data", "init_run_id": "a" * 32,
              "selection_run_ids": f"{'b' * 32},{'c' * 32}", "profile": "paper",
              "overrides": "train.epochs=3 augment.specmix=false"}
    job, run_id = submit("stage3", params)

    # The official client's typed model takes every field and gives back the same document.
    assert ApiClient().sanitize_for_serialization(typed_job(job)) == job

    container = container_of(job)
    assert DNS_LABEL.fullmatch(job["metadata"]["name"]), job["metadata"]["name"]
    assert DNS_LABEL.fullmatch(container["name"])
    assert container["image"] == f"{IMAGE_TAG}@{IMAGE_DIGEST}"

    # MLflow hands Kubernetes shell-quoted words (an empty value arrives as ''): the reason
    # for run-entry-point. If this changes, the wrapper must change with it.
    assert "''" in container["command"]
    words = words_reaching_the_program(container["command"])
    local = load_project(str(REPO)).get_entry_point("stage3").compute_command(params, tmp_path)
    assert words == shlex.split(local)  # what `mlflow run . -e stage3 --env-manager local` runs
    assert words[:2] == ["fat-mlflow", "stage3"]
    assert words[words.index("--set") + 1] == params["overrides"]
    assert words[words.index("--resume-run-id") + 1] == ""

    names = [item["name"] for item in container["env"]]
    assert len(names) == len(set(names)), names
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["MLFLOW_RUN_ID"] == run_id
    assert env["MLFLOW_EXPERIMENT_ID"] == MlflowClient().get_experiment_by_name(
        EXPERIMENT).experiment_id
    assert env["MLFLOW_TRACKING_URI"] == (cluster_uri or tracking)

    pod = job["spec"]["template"]["spec"]
    volumes = {volume["name"] for volume in pod["volumes"]}
    mounts = [mount["mountPath"] for mount in container["volumeMounts"]]
    assert {mount["name"] for mount in container["volumeMounts"]} <= volumes
    assert any(env["FAT_MLFLOW_CACHE"].startswith(path + "/") for path in mounts)
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0

    resources = container["resources"]
    assert parse_quantity(resources["limits"]["memory"]) >= parse_quantity(
        resources["requests"]["memory"])
    assert parse_quantity(resources["requests"]["cpu"]) == int(env["OMP_NUM_THREADS"])
    assert all(parse_quantity(value) > 0 for value in resources["limits"].values())


@pytest.mark.parametrize("path, field", [
    (("spec", "template", "spec", "containers", 0), "imagePullPolicyy"),  # misspelt
    (("spec",), "restartPolicy"),  # a pod field placed on the Job
])
def test_typed_job_refuses_a_misspelt_or_misplaced_field(tracking, path, field):
    job, _ = submit("stage1", {"data": "/fat/data"})
    typed_job(job)
    place = job
    for key in path:
        place = place[key]
    place[field] = "Never"
    with pytest.raises(ValueError, match=field):
        typed_job(job)


def test_job_command_runs_the_stage_into_the_run_mlflow_created(tracking, demo_data):
    """The pod's command with the pod's environment, here instead of in a container: stage 1
    finishes inside the run that `mlflow run` created, with parameters that needed quoting."""
    job, run_id = submit("stage1", {"data": str(demo_data), "profile": "tiny",
                                    "overrides": "train.epochs=1 train.width=0.0625"})
    container = container_of(job)
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update({item["name"]: item["value"] for item in container["env"]})
    # The template's volume and thread count belong to the cluster node, not to this machine.
    env.update(FAT_MLFLOW_CACHE=os.environ["FAT_MLFLOW_CACHE"], OMP_NUM_THREADS="1")
    command = container["command"]
    assert command[0] == WRAPPER.name
    done = subprocess.run(["sh", str(WRAPPER), *command[1:]], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    run = MlflowClient(tracking).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["fat.stage"] == "stage1"
    assert run.data.tags["mlflow.project.entryPoint"] == "stage1"
    assert run.data.params["train.epochs"] == "1" and run.data.params["train.width"] == "0.0625"
    assert {"lwlrap_noisy", "lwlrap_curated"} <= set(run.data.metrics)


def test_dockerignore_keeps_local_state_out_of_the_build_context(tmp_path):
    kept = ["pyproject.toml", "constraints.txt", "README.md", "fat_mlflow/cli/__init__.py",
            "kubernetes/run-entry-point", "Dockerfile"]
    ignored = [".git/HEAD", "mlruns/0/meta.yaml", "mlartifacts/1/a.npz", "mlflow.db",
               "demo_data/train_curated.csv", ".fat_cache/abc/clip.npy",
               "fat_mlflow/cli/__pycache__/errors.cpython-311.pyc", ".pytest_cache/README.md",
               ".benchmarks/run.json", "fat_mlflow.egg-info/PKG-INFO",
               "notebooks/.ipynb_checkpoints/a.ipynb", "model.pt"]
    for name in kept + ignored:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    # docker-py's implementation of the .dockerignore rules, as used by `docker build`
    context = exclude_paths(str(tmp_path), patterns, dockerfile="Dockerfile")
    assert set(kept) <= context
    assert not context & set(ignored), sorted(context & set(ignored))
    # everything the Dockerfile copies is in the context
    copied = [word for line in (REPO / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY ") for word in line.split()[1:-1]]
    assert copied and all(any(path == source or path.startswith(source + "/") for path in kept)
                          for source in copied), copied


def _docker_engine_problem() -> str | None:
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    done = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return "no Docker engine answers `docker info`: " + done.stderr.strip().splitlines()[-1]
    return None


@pytest.mark.slow
def test_image_builds_and_runs_an_entry_point_command():
    """Needs a Docker engine and network access to PyPI; skipped where there is none."""
    problem = _docker_engine_problem()
    if problem:
        pytest.skip(problem)
    tag = "fat-mlflow:test"
    build = subprocess.run(["docker", "build", "-t", tag, str(REPO)], capture_output=True,
                           text=True, timeout=3600)
    assert build.returncode == 0, build.stderr[-3000:]
    # the wrapper on PATH, an empty word that only survives through it, the CLI installed
    command = [WRAPPER.name, "fat-mlflow", "stage1", "--set", "''", "--help"]
    done = subprocess.run(["docker", "run", "--rm", tag, *command], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--resume-run-id" in done.stdout
    versions = subprocess.run(
        ["docker", "run", "--rm", tag, "python", "-c",
         "import torch, mlflow, fat_mlflow; print(torch.__version__, mlflow.__version__)"],
        capture_output=True, text=True, timeout=300)
    assert versions.returncode == 0, versions.stderr[-3000:]
