"""Batch scoring on a local Spark session: the registered tagger through `mlflow.pyfunc.spark_udf`
with the result type inferred from its signature, and the docs/spark.md recipe
(`python -m fat_mlflow.serving.spark`) as written, on real clips: the same scores as in process."""
from __future__ import annotations

import base64
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("no Java runtime (java not on PATH, JAVA_HOME unset): Spark needs one",
                allow_module_level=True)
pytest.importorskip("pyspark", reason="pyspark not installed: pip install -e '.[spark]'")

import mlflow  # noqa: E402
from pyspark.sql import SparkSession  # noqa: E402

from fat_mlflow.data.layout import load_dataset  # noqa: E402
from fat_mlflow.serving import spark as spark_scoring  # noqa: E402
from fat_mlflow.serving.tagger import PATH_OUTSIDE, load_local_model  # noqa: E402

pytestmark = pytest.mark.slow

N_CLIPS = 4
ATOL = 1e-5
BAD = {"empty.wav": "empty file", "text.wav": "not a readable audio file"}


@pytest.fixture(scope="module")
def spark() -> SparkSession:
    session = spark_scoring.spark_session("local[2]")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def model(registered_tagger):
    """The tracking store active for the module, and the model as a local caller loads it."""
    with registered_tagger.store():
        yield load_local_model(registered_tagger.model_uri)


@pytest.fixture(scope="module")
def vocabulary(model) -> list[str]:
    return [c for c in model.metadata.get_output_schema().input_names()
            if c not in ("error", "top_labels")]


@pytest.fixture(scope="module")
def folder(demo_data, tmp_path_factory) -> Path:
    """A few real test clips and two bad files (text named .wav, an empty file)."""
    folder = tmp_path_factory.mktemp("spark-clips")
    for path in load_dataset(demo_data).test["path"].head(N_CLIPS):
        shutil.copy(path, folder / Path(path).name)
    (folder / "text.wav").write_text("this is not audio" * 20)
    (folder / "empty.wav").write_bytes(b"")
    return folder


def _run_recipe(monkeypatch, *args: str) -> None:
    """`python -m fat_mlflow.serving.spark ARGS` in this process (it reuses the running session)."""
    monkeypatch.setattr(sys, "argv", ["fat_mlflow.serving.spark", *args])
    spark_scoring.main()


def _base64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def test_issue_call_scores_base64_rows_with_the_inferred_result_type(spark, model, registered_tagger,
                                                                     vocabulary, folder):
    files = sorted(folder.iterdir())
    frame = spark.createDataFrame(pd.DataFrame({"fname": [p.name for p in files],
                                                "audio_base64": [_base64(p) for p in files]}))
    udf = mlflow.pyfunc.spark_udf(spark, registered_tagger.model_uri)  # no result_type
    result = frame.withColumn("pred", udf("audio_base64")).select("fname", "pred.*").toPandas()
    result = result.set_index("fname")
    assert list(result.columns) == [*vocabulary, "error", "top_labels"]
    good = [p for p in files if p.name not in BAD]
    local = model.predict(pd.DataFrame({"audio_base64": [_base64(p) for p in good]}))
    np.testing.assert_allclose(result.loc[[p.name for p in good], vocabulary].to_numpy(float),
                               local[vocabulary].to_numpy(float), atol=ATOL)
    assert (result.loc[[p.name for p in good], "error"] == "").all()
    sent_empty = {"empty.wav": "no audio", "text.wav": "audio_base64: not a readable audio file"}
    for name, reason in sent_empty.items():
        assert reason in result.loc[name, "error"]
        assert result.loc[name, vocabulary].isna().all()


def test_recipe_scores_a_folder_into_parquet(spark, model, vocabulary, folder, tmp_path,
                                             monkeypatch, registered_tagger):
    output = tmp_path / "scores.parquet"
    _run_recipe(monkeypatch, "--model", registered_tagger.model_uri, "--clips", str(folder),
                "-o", str(output))
    scores = pd.read_parquet(output).set_index("fname")
    assert list(scores.columns) == ["path", *vocabulary, "error"]
    assert sorted(scores.index) == sorted(p.name for p in folder.iterdir())  # none left out
    good = [name for name in scores.index if name not in BAD]
    assert len(good) == N_CLIPS and (scores.loc[good, "error"] == "").all()
    for name, reason in BAD.items():
        assert f"{folder / name}: {reason}" in scores.loc[name, "error"]
        assert scores.loc[name, vocabulary].isna().all()
    local = model.predict(pd.DataFrame({"path": [str(folder / name) for name in good]}))
    np.testing.assert_allclose(scores.loc[good, vocabulary].to_numpy(float),
                               local[vocabulary].to_numpy(float), atol=ATOL)


def test_recipe_scores_a_table_of_paths_inside_its_audio_root(spark, model, vocabulary, folder,
                                                              tmp_path, monkeypatch,
                                                              registered_tagger):
    good = sorted(p for p in folder.iterdir() if p.stat().st_size > 1000)
    outside = tmp_path / "outside.wav"
    shutil.copy(good[0], outside)
    paths = [*map(str, good), str(outside), str(folder / "gone.wav")]
    table = tmp_path / "clips.parquet"
    pd.DataFrame({"clip_id": range(len(paths)), "path": paths}).to_parquet(table)
    output = tmp_path / "scores.parquet"
    _run_recipe(monkeypatch, "--model", registered_tagger.model_uri, "--table", str(table),
                "--audio-root", str(folder), "--top-k", "2", "-o", str(output))
    scores = pd.read_parquet(output).set_index("clip_id").sort_index()
    assert list(scores.columns) == ["path", *vocabulary, "error", "top_labels"]
    local = model.predict(pd.DataFrame({"path": paths[:len(good)]}), params={"top_k": 2})
    np.testing.assert_allclose(scores.loc[:len(good) - 1, vocabulary].to_numpy(float),
                               local[vocabulary].to_numpy(float), atol=ATOL)
    assert scores.loc[:len(good) - 1, "top_labels"].tolist() == local["top_labels"].tolist()
    assert scores.loc[len(good), "error"].endswith(f"{outside}: {PATH_OUTSIDE}")
    assert scores.loc[len(good) + 1, "error"].endswith("gone.wav: file does not exist")
    assert scores.loc[len(good):, vocabulary].isna().all().all()
