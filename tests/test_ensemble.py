"""build_ensemble against a real MLflow store: source-run checks, scoring, registry, alias rule.

The stage runs here carry freshly initialised CNN and VGG checkpoints with the tags and
artifacts of a finished `run_stage` run, so the ensemble logic is tested in seconds; the
end-to-end path through real training is in test_serving.py.
"""
from __future__ import annotations

import importlib.metadata
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from packaging.requirements import Requirement

import fat_mlflow
from fat_mlflow.cli import main
from fat_mlflow.config import get_profile
from fat_mlflow.data.layout import dataset_fingerprint, load_dataset
from fat_mlflow.engine.metrics import lwlrap
from fat_mlflow.engine.models import build_model, save_checkpoint
from fat_mlflow.serving.baseline import floor_test_lwlrap
from fat_mlflow.serving.ensemble import (
    VersionScore,
    build_ensemble,
    floor_verdict,
    takes_alias,
    with_floor_rows,
)
from fat_mlflow.warmup.tracking import RunLookupError

MODEL = "fat2019-tagger-test"
N_TEST = 12


@pytest.fixture(scope="module")
def store(tmp_path_factory, isolated_store) -> str:
    """A SQLite tracking store and artifact root in a temp folder, active for this module."""
    with isolated_store(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


def fake_stage_run(vocabulary: list[str], dataset: str, arch: str = "cnn", seed: int = 0,
                   n_folds: int = 2, overrides: dict | None = None, complete: bool = True) -> str:
    """A run shaped like a finished `run_stage` run, holding untrained fold models."""
    profile = get_profile("tiny", {"train.arch": arch, "train.n_folds": n_folds, **(overrides or {})})
    with mlflow.start_run(run_name=f"fake-{arch}") as run, tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tags({"fat.stage": "stage2", "fat.arch": arch, "fat.dataset": dataset,
                         "fat.complete": str(complete).lower()})
        mlflow.log_params(profile.flat())
        mlflow.log_dict(profile.flat(), "profile.json")
        mlflow.log_dict(vocabulary, "vocabulary.json")
        for fold in range(n_folds):
            torch.manual_seed(seed * 100 + fold)
            path = Path(tmp) / "model.pt"
            save_checkpoint(build_model(arch, len(vocabulary), profile.train.width), path,
                            arch=arch, width=profile.train.width, n_classes=len(vocabulary))
            mlflow.log_artifact(str(path), f"folds/fold_{fold}")
    return run.info.run_id


def champion() -> str:
    return str(MlflowClient().get_registered_model(MODEL).aliases["champion"])


@pytest.fixture(scope="module")
def small_data(demo_data, tmp_path_factory) -> Path:
    """The demo dataset with only its first test clips: each scored build takes ~1 s."""
    root = tmp_path_factory.mktemp("small") / "data"
    root.mkdir()
    for name in ("train_curated", "test"):
        (root / name).symlink_to(demo_data / name)
    (root / "train_curated.csv").write_bytes((demo_data / "train_curated.csv").read_bytes())
    for name in ("sample_submission.csv", "test_truth.csv"):
        pd.read_csv(demo_data / name).head(N_TEST).to_csv(root / name, index=False)
    return root


@pytest.fixture(scope="module")
def dataset(small_data):
    return load_dataset(small_data)


@pytest.fixture(scope="module")
def runs(store, dataset) -> dict[str, str]:
    vocabulary, fingerprint = dataset.vocabulary, dataset_fingerprint(dataset)
    return {"cnn": fake_stage_run(vocabulary, fingerprint, "cnn", seed=1),
            "vgg": fake_stage_run(vocabulary, fingerprint, "vgg16", seed=2, n_folds=1),
            "other_cnn": fake_stage_run(vocabulary, fingerprint, "cnn", seed=3)}


@pytest.fixture(scope="module")
def first_build(runs, small_data) -> tuple[str, str]:
    return build_ensemble([runs["cnn"], runs["vgg"]], registered_model=MODEL, data=small_data,
                          progress=False)


def test_mixed_cnn_and_vgg_runs_make_one_scored_model(first_build, runs, dataset):
    run_id, version = first_build
    run = MlflowClient().get_run(run_id)
    scores = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id,
                                                             artifact_path="test_scores.csv"))
    assert list(scores.columns) == ["fname", *dataset.vocabulary]
    assert list(scores["fname"]) == list(dataset.test["fname"])
    expected = lwlrap(dataset.targets(dataset.test), scores[dataset.vocabulary].to_numpy())
    assert run.data.metrics["lwlrap_test"] == pytest.approx(expected)
    artifacts = {a.path for a in MlflowClient().list_artifacts(run_id)}
    assert {"per_class_lwlrap.png", "per_class_lwlrap.csv", "test_scores.csv"} <= artifacts
    assert run.data.params["n_fold_models"] == "3"
    model_version = MlflowClient().get_model_version(MODEL, version)
    assert model_version.tags["source_run_ids"] == f"{runs['cnn']},{runs['vgg']}"
    assert float(model_version.tags["lwlrap_test"]) == pytest.approx(expected)


def test_the_logistic_floor_is_scored_beside_the_ensemble(first_build, dataset):
    run_id, version = first_build
    run = MlflowClient().get_run(run_id)
    floors, skipped = floor_test_lwlrap(dataset, get_profile("tiny").features)
    assert skipped == {}
    assert {f"floor_lwlrap_{name}": value for name, value in floors.items()} == {
        key: pytest.approx(value) for key, value in run.data.metrics.items()
        if key.startswith("floor_lwlrap_")}
    floor, score = max(floors.values()), run.data.metrics["lwlrap_test"]
    assert run.data.metrics["lwlrap_test_above_floor"] == pytest.approx(score - floor)
    tags = MlflowClient().get_model_version(MODEL, version).tags
    assert float(tags["floor_lwlrap_test"]) == pytest.approx(floor)
    assert tags["fat.beats_floor"] == run.data.tags["fat.beats_floor"] == str(score > floor).lower()
    words = MlflowClient().get_model_version(MODEL, version).description
    assert words == run.data.tags["mlflow.note.content"]
    assert f"{score:.3f}" in words and f"{floor:.3f}" in words
    assert ("BELOW" in words) == (score <= floor)


@pytest.mark.parametrize(("score", "expected"), [
    (0.8, "ensemble test lwlrap 0.800; logistic floor 0.700 trained on curated, 0.650 trained on "
          "curated + noisy: the ensemble beats it by 0.100"),
    (0.6, "DOES NOT beat it (short by 0.100)")])
def test_floor_verdict_names_both_floors_and_the_margin(score, expected):
    row = pd.Series({"lwlrap_test": score, "floor_lwlrap_curated": 0.7,
                     "floor_lwlrap_curated_noisy": 0.65})
    assert expected in floor_verdict(row)


def test_the_stage_report_shows_the_floor_under_the_ensemble():
    table = pd.DataFrame([{"model": "cnn model4", "lwlrap_test": 0.5},
                          {"model": "ensemble", "lwlrap_test": 0.6, "floor_lwlrap_curated": 0.7,
                           "floor_lwlrap_curated_noisy": 0.65}])
    shown = with_floor_rows(table).set_index("model")["lwlrap_test"]
    assert shown.to_dict() == {"cnn model4": 0.5, "ensemble": 0.6, "floor (curated)": 0.7,
                               "floor (curated + noisy)": 0.65}
    assert with_floor_rows(table.iloc[:1]).equals(table.iloc[:1])  # no floor: unchanged


def test_floor_verdict_without_test_labels():
    assert "not compared" in floor_verdict(pd.Series({"lwlrap_test": np.nan}))


def test_model_carries_signature_example_and_requirements(first_build, dataset):
    _, version = first_build
    uri = f"models:/{MODEL}/{version}"
    model = mlflow.pyfunc.load_model(uri)
    outputs = model.metadata.get_output_schema().input_names()
    assert outputs == [*dataset.vocabulary, "error", "top_labels"]
    assert [p.name for p in model.metadata.get_params_schema().params] == ["top_k"]
    example = mlflow.models.Model.load(uri).load_input_example(
        mlflow.artifacts.download_artifacts(uri))
    answer = model.predict(example)
    assert answer["error"].tolist() == [""]
    assert np.isfinite(answer[dataset.vocabulary].to_numpy()).all()


def test_model_is_code_with_pinned_requirements_and_the_package_inside(first_build):
    _, version = first_build
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{version}"))
    requirements = (folder / "requirements.txt").read_text().split()
    declared = {Requirement(r).name for r in importlib.metadata.requires("fat-mlflow")
                if "extra ==" not in r}
    assert {Requirement(r).name for r in requirements} == declared
    for line in requirements:
        name, _, version_pin = line.partition("==")
        assert version_pin, f"{line}: not pinned"
        assert version_pin == importlib.metadata.version(name).split("+")[0], line
    flavor = mlflow.models.Model.load(folder).flavors["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # not a pickle
    assert (folder / "tagger_model.py").is_file() and not list(folder.rglob("*.pkl"))
    code = folder / flavor["code"] / "fat_mlflow"
    shipped = {p.relative_to(code) for p in code.rglob("*.py")}
    package = Path(fat_mlflow.__file__).parent
    assert shipped == {p.relative_to(package) for p in package.rglob("*.py")}
    assert flavor["config"] == {"audio_root": ""}  # path input off unless the loader says so


def test_alias_moves_only_to_versions_that_are_not_worse(first_build, runs, small_data):
    client = MlflowClient()
    first_run, first_version = first_build
    assert champion() == first_version
    second_run, second_version = build_ensemble([runs["other_cnn"]], registered_model=MODEL,
                                                data=small_data, progress=False)
    first, second = (client.get_run(r).data.metrics["lwlrap_test"] for r in (first_run, second_run))
    assert first != second
    better, worse = (first_version, second_version) if first > second else (second_version, first_version)
    assert champion() == better
    # a rebuild of the worse ensemble never takes the alias; the equal-score rebuild of the
    # better one does ("not worse")
    worse_runs = [runs["other_cnn"]] if worse == second_version else [runs["cnn"], runs["vgg"]]
    better_runs = [runs["cnn"], runs["vgg"]] if worse == second_version else [runs["other_cnn"]]
    _, again_worse = build_ensemble(worse_runs, registered_model=MODEL, data=small_data,
                                    progress=False)
    assert champion() == better
    _, again_better = build_ensemble(better_runs, registered_model=MODEL, data=small_data,
                                     progress=False)
    assert champion() == again_better
    versions = {int(v.version) for v in client.search_model_versions(f"name='{MODEL}'")}
    assert {int(again_worse), int(again_better)} <= versions and len(versions) >= 4


@pytest.mark.parametrize(("new", "holder", "moves"), [
    (VersionScore(None, None), None, True),
    (VersionScore(0.5, "d1"), None, True),
    (VersionScore(0.5, "d1"), VersionScore(0.5, "d1"), True),
    (VersionScore(0.6, "d1"), VersionScore(0.5, "d1"), True),
    (VersionScore(0.4, "d1"), VersionScore(0.5, "d1"), False),
    (VersionScore(None, "d1"), VersionScore(0.5, "d1"), False),
    (VersionScore(0.4, "d1"), VersionScore(None, "d1"), True),
    (VersionScore(0.9, "d2"), VersionScore(0.5, "d1"), False),
])
def test_alias_rule(new, holder, moves):
    assert takes_alias(new, holder) is moves


def test_runs_with_other_features_or_classes_are_refused(store, runs, dataset):
    fingerprint = dataset_fingerprint(dataset)
    other_hop = fake_stage_run(dataset.vocabulary, fingerprint, overrides={"features.hop_length": 347})
    with pytest.raises(RunLookupError, match=f"run {other_hop} used other feature settings"):
        build_ensemble([runs["cnn"], other_hop], registered_model=MODEL)
    other_classes = fake_stage_run(dataset.vocabulary[::-1], fingerprint)
    with pytest.raises(RunLookupError, match=f"run {other_classes} predicts other classes"):
        build_ensemble([runs["cnn"], other_classes], registered_model=MODEL)


def test_unfinished_foreign_or_repeated_runs_are_refused(store, runs, dataset, small_data):
    unfinished = fake_stage_run(dataset.vocabulary, dataset_fingerprint(dataset), complete=False)
    with pytest.raises(RunLookupError, match="has not finished all its folds"):
        build_ensemble([runs["cnn"], unfinished], registered_model=MODEL)
    foreign = fake_stage_run(dataset.vocabulary, "0123456789ab")
    with pytest.raises(RunLookupError, match="trained on another dataset"):
        build_ensemble([foreign], registered_model=MODEL, data=small_data)
    with pytest.raises(RunLookupError, match="does not exist"):
        build_ensemble(["f" * 32], registered_model=MODEL)
    with pytest.raises(RunLookupError, match="given twice"):
        build_ensemble([runs["cnn"], runs["cnn"]], registered_model=MODEL)


def test_cli_predict_writes_the_kaggle_submission(first_build, small_data, tmp_path):
    run_id, version = first_build
    output = tmp_path / "submission.csv"
    result = CliRunner().invoke(main, ["predict", "--model", f"models:/{MODEL}/{version}",
                                       str(small_data / "sample_submission.csv"), "-o", str(output),
                                       "--batch-clips", "7"])
    assert result.exit_code == 0, result.output
    submission = pd.read_csv(output)
    expected = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id,
                                                               artifact_path="test_scores.csv"))
    sample = pd.read_csv(small_data / "sample_submission.csv")
    assert list(submission.columns) == list(sample.columns)
    assert list(submission["fname"]) == list(sample["fname"])
    np.testing.assert_allclose(submission.iloc[:, 1:], expected.iloc[:, 1:], atol=1e-6)


def test_cli_tag_prints_top_labels_and_fails_on_bad_files(first_build, dataset, tmp_path):
    _, version = first_build
    good = dataset.test["path"].iloc[0]
    result = CliRunner().invoke(main, ["tag", str(good), str(tmp_path / "gone.wav"),
                                       "--model", f"models:/{MODEL}/{version}", "--top-k", "2"])
    assert result.exit_code == 1
    first_line, second_line = result.output.splitlines()[:2]
    assert first_line.startswith(f"{good}: ") and first_line.count(",") == 1
    assert "gone.wav: ERROR" in second_line and "file does not exist" in second_line
    assert "1 of 2 file(s) could not be tagged" in result.output
