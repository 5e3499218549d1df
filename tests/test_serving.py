"""End to end: a real tiny stage run -> registered ensemble -> `mlflow models serve` over HTTP.

The served model must answer real audio sent as base64 with the scores of the in-process
pyfunc and of `fat-mlflow predict`, and survive malformed requests.
"""
from __future__ import annotations

import base64
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from click.testing import CliRunner

from fat_mlflow.benchmarks.serving import served
from fat_mlflow.cli import main
from fat_mlflow.config import get_profile
from fat_mlflow.data import load_dataset
from fat_mlflow.ensemble import build_ensemble
from fat_mlflow.stages import StageRequest, run_stage

pytestmark = pytest.mark.slow

MODEL = "fat2019-tagger-serving"
URI = f"models:/{MODEL}@champion"
N_CLIPS = 3
START_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def registered(demo_data, tmp_path_factory, isolated_store) -> str:
    """Tracking store with a trained tiny stage-1 run, ensembled and registered as champion."""
    root = tmp_path_factory.mktemp("serving-store")
    with isolated_store(root) as uri:
        run_id = run_stage(StageRequest(stage="stage1", data=demo_data,
                                        profile=get_profile("tiny", {"train.epochs": 1}),
                                        cache_dir=root / "cache", progress=False))
        # without `data`: test_ensemble.py covers the scoring; the input example comes from the
        # run's own dataset
        build_ensemble([run_id], registered_model=MODEL)
        # the input example comes from the dataset recorded on the stage run
        assert mlflow.models.get_model_info(URI).saved_input_example_info is not None
        yield uri


@pytest.fixture(scope="module")
def server(registered, tmp_path_factory) -> str:
    """`mlflow models serve` of the champion in its own process group; always terminated."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    with served(URI, env={**os.environ, "MLFLOW_TRACKING_URI": registered}, log_path=log,
                timeout_s=START_TIMEOUT_S) as url:
        yield url


@pytest.fixture(scope="module")
def clips(demo_data) -> pd.DataFrame:
    return load_dataset(demo_data).test.head(N_CLIPS)


def _base64(path: str) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _invoke(url: str, payload) -> requests.Response:
    return requests.post(f"{url}/invocations", json=payload, timeout=60)


def test_served_scores_match_in_process_and_cli(server, registered, clips, tmp_path):
    payload = {"dataframe_split": {"columns": ["audio_base64"],
                                   "data": [[_base64(p)] for p in clips["path"]]},
               "params": {"top_k": 3}}
    response = _invoke(server, payload)
    assert response.status_code == 200, response.text
    served = pd.DataFrame(response.json()["predictions"])
    model = mlflow.pyfunc.load_model(URI)
    vocabulary = [c for c in model.metadata.get_output_schema().input_names()
                  if c not in ("error", "top_labels")]
    local = model.predict(pd.DataFrame({"path": list(clips["path"])}), params={"top_k": 3})
    assert served["error"].tolist() == [""] * N_CLIPS
    assert served["top_labels"].tolist() == local["top_labels"].tolist()
    np.testing.assert_allclose(served[vocabulary].to_numpy(float),
                               local[vocabulary].to_numpy(float), atol=1e-5)

    folder = tmp_path / "clips"
    folder.mkdir()
    for path in clips["path"]:
        (folder / Path(path).name).symlink_to(path)
    output = tmp_path / "submission.csv"
    result = CliRunner().invoke(main, ["predict", "--model", URI, str(folder), "-o", str(output)])
    assert result.exit_code == 0, result.output
    submission = pd.read_csv(output).set_index("fname").loc[[Path(p).name for p in clips["path"]]]
    assert list(submission.columns) == vocabulary
    np.testing.assert_allclose(submission.to_numpy(float), served[vocabulary].to_numpy(float),
                               atol=1e-5)


def test_bad_row_gets_an_error_and_the_good_row_its_scores(server, clips):
    good = _base64(clips["path"].iloc[0])
    payload = {"dataframe_split": {"columns": ["audio_base64"],
                                   "data": [[base64.b64encode(b"not audio" * 50).decode()], [good]]}}
    response = _invoke(server, payload)
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    assert rows[0]["error"].startswith("row 0: audio_base64: not a readable audio file")
    assert rows[1]["error"] == ""
    assert all(isinstance(v, float) for k, v in rows[1].items() if k != "error")


@pytest.mark.parametrize("body", [
    b'{"dataframe_split": {"columns": ["audio_base64"], "data": [[',
    b'{"dataframe_split": {"columns": ["file"], "data": [["x.wav"]]}}',
    b'{"dataframe_split": {"columns": ["audio_base64"], "data": [["x"]]}, "params": {"top_k": 999}}',
])
def test_malformed_requests_get_4xx_and_the_server_keeps_answering(server, clips, body):
    response = requests.post(f"{server}/invocations", data=body,
                             headers={"Content-Type": "application/json"}, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    assert requests.get(f"{server}/ping", timeout=5).status_code == 200
    again = _invoke(server, {"dataframe_split": {"columns": ["audio_base64"],
                                                 "data": [[_base64(clips["path"].iloc[1])]]}})
    assert again.status_code == 200 and again.json()["predictions"][0]["error"] == ""
