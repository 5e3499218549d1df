"""End to end: a real tiny stage run -> registered ensemble -> `mlflow models serve` over HTTP.

The served model must answer real audio sent as base64 with the scores of the in-process
pyfunc and of `fat-mlflow predict`, survive malformed requests, and never read a file a client
names unless its operator allowed a folder (FAT_MLFLOW_AUDIO_ROOT), and then only regular
files inside it.
"""
from __future__ import annotations

import base64
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import torch
from click.testing import CliRunner

from fat_mlflow.benchmarks.serving import served
from fat_mlflow.cli import main
from fat_mlflow.data.layout import load_dataset
from fat_mlflow.engine.precision import bf16_units
from fat_mlflow.serving.tagger import (
    AMP_ENV,
    AUDIO_ROOT_ENV,
    PATH_OUTSIDE,
    PATHS_OFF,
    load_local_model,
)

pytestmark = pytest.mark.slow

N_CLIPS = 3
START_TIMEOUT_S = 90
ANSWER_TIMEOUT_S = 60  # a server that opened a FIFO would hang past it


@pytest.fixture(scope="module")
def registered(registered_tagger) -> str:
    """The tracking store of the registered tiny tagger, active for this module."""
    with registered_tagger.store() as uri:
        yield uri


@pytest.fixture(scope="module")
def uri(registered_tagger) -> str:
    return registered_tagger.model_uri


def _serve(registered: str, uri: str, log: Path, **settings: str):
    """`mlflow models serve` of the champion in its own process group; always terminated."""
    env = {key: value for key, value in os.environ.items()
           if key not in (AUDIO_ROOT_ENV, AMP_ENV)}
    return served(uri, env={**env, "MLFLOW_TRACKING_URI": registered, **settings}, log_path=log,
                  timeout_s=START_TIMEOUT_S)


@pytest.fixture(scope="module")
def server(registered, uri, tmp_path_factory) -> str:
    with _serve(registered, uri, tmp_path_factory.mktemp("server") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def float32_server(registered, uri, tmp_path_factory) -> str:
    """The same model served in float32 (FAT_MLFLOW_AMP=false) on a machine with bf16 units."""
    with _serve(registered, uri, tmp_path_factory.mktemp("server32") / "server.log",
                **{AMP_ENV: "false"}) as url:
        yield url


@pytest.fixture(scope="module")
def clips(demo_data) -> pd.DataFrame:
    return load_dataset(demo_data).test.head(N_CLIPS)


def _base64(path: str) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _invoke(url: str, payload) -> requests.Response:
    return requests.post(f"{url}/invocations", json=payload, timeout=ANSWER_TIMEOUT_S)


@pytest.mark.parametrize("mode", ["server", "float32_server"])
def test_served_scores_match_in_process_and_cli(request, mode, uri, clips, tmp_path,
                                                monkeypatch):
    """In either number format: the served, in-process and command-line scores agree."""
    server = request.getfixturevalue(mode)
    if mode == "float32_server":
        monkeypatch.setenv(AMP_ENV, "false")  # in process and `fat-mlflow predict` alike
    else:
        monkeypatch.delenv(AMP_ENV, raising=False)
    payload = {"dataframe_split": {"columns": ["audio_base64"],
                                   "data": [[_base64(p)] for p in clips["path"]]},
               "params": {"top_k": 3}}
    response = _invoke(server, payload)
    assert response.status_code == 200, response.text
    served = pd.DataFrame(response.json()["predictions"])
    model = load_local_model(uri)
    assert model.unwrap_python_model().precision.bfloat16 is (
        mode == "server" and bf16_units(torch.device("cpu")) is not None)
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
    result = CliRunner().invoke(main, ["predict", "--model", uri, str(folder), "-o", str(output)])
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
    assert rows[1]["top_labels"] == ""
    assert all(isinstance(v, float) for k, v in rows[1].items() if k not in ("error", "top_labels"))


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


def _rows(url: str, columns: list[str], data: list[list]) -> list[dict]:
    response = _invoke(url, {"dataframe_split": {"columns": columns, "data": data}})
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def _scores(row: dict) -> np.ndarray:
    return np.array([v for k, v in row.items() if k not in ("error", "top_labels")], dtype=float)


def test_default_server_reads_no_file_and_keeps_serving_base64(server, clips):
    paths = ["/etc/passwd", "/etc/nonexistent", str(clips["path"].iloc[0])]
    rows = _rows(server, ["path", "audio_base64"],
                 [[p, None] for p in paths] + [[None, _base64(clips["path"].iloc[0])]])
    for index, path in enumerate(paths):
        assert rows[index]["error"] == f"row {index}: {path}: {PATHS_OFF}"  # exists or not
        assert np.isnan(_scores(rows[index])).all()
    assert rows[3]["error"] == "" and np.isfinite(_scores(rows[3])).all()


@pytest.fixture(scope="module")
def audio_root(clips, tmp_path_factory) -> dict[str, Path]:
    """The allowed folder: a clip, a subfolder, a FIFO, links out; real audio outside it."""
    base = tmp_path_factory.mktemp("audio-root")
    root, outside = base / "allowed", base / "outside.wav"
    (root / "sub").mkdir(parents=True)
    (root / "clip.wav").write_bytes(Path(clips["path"].iloc[0]).read_bytes())
    outside.write_bytes(Path(clips["path"].iloc[1]).read_bytes())
    (root / "link_out.wav").symlink_to(outside)
    (root / "zero.wav").symlink_to("/dev/zero")
    os.mkfifo(root / "fifo.wav")
    os.mkfifo(base / "fifo_outside.wav")
    return {"root": root, "outside": outside, "fifo_outside": base / "fifo_outside.wav"}


@pytest.fixture(scope="module")
def rooted_server(registered, uri, audio_root, tmp_path_factory) -> str:
    """The same model served with path input on for one folder (FAT_MLFLOW_AUDIO_ROOT)."""
    with _serve(registered, uri, tmp_path_factory.mktemp("rooted-server") / "server.log",
                **{AUDIO_ROOT_ENV: str(audio_root["root"])}) as url:
        yield url


def test_rooted_server_scores_files_inside_and_refuses_the_rest(rooted_server, audio_root, clips):
    root = audio_root["root"]
    refused = [str(audio_root["outside"]), f"{root}/sub/../../outside.wav", str(root / "link_out.wav"),
               str(root / "zero.wav"), "/dev/zero", str(audio_root["fifo_outside"]), "/etc/passwd",
               "/etc/nonexistent"]
    not_regular = [str(root / "fifo.wav"), str(root / "sub")]
    paths = [str(root / "clip.wav"), *refused, *not_regular]
    rows = _rows(rooted_server, ["path", "audio_base64"],
                 [[p, None] for p in paths] + [[None, _base64(clips["path"].iloc[0])]])
    for index, path in enumerate(paths[1:], start=1):
        reason = PATH_OUTSIDE if path in refused else "not a regular file (a directory, device or FIFO)"
        assert rows[index]["error"] == f"row {index}: {path}: {reason}"
        assert np.isnan(_scores(rows[index])).all()
    inside, by_bytes = rows[0], rows[-1]
    assert inside["error"] == "" and by_bytes["error"] == ""
    np.testing.assert_allclose(_scores(inside), _scores(by_bytes), atol=1e-6)
    assert requests.get(f"{rooted_server}/ping", timeout=5).status_code == 200
