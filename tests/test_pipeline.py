"""`main`: the chained pipeline, its stage report, and the reuse of finished stages."""
import json

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from fat_mlflow.config import DemoConfig, get_profile
from fat_mlflow.data.demo import DemoExistsError
from fat_mlflow.data.layout import dataset_fingerprint, load_dataset
from fat_mlflow.serving.ensemble import build_and_register
from fat_mlflow.warmup.pipeline import PipelineRequest, ensure_demo_data, run_pipeline
from fat_mlflow.warmup.tracking import DEFAULT_EXPERIMENT


def experiment_id() -> str:
    return MlflowClient().get_experiment_by_name(DEFAULT_EXPERIMENT).experiment_id


def test_pipeline_links_stage_runs_and_reports_table2(tiny_chain):
    assert list(tiny_chain.table["model"]) == ["cnn model1", "cnn model2", "cnn model3",
                                               "cnn model4", "ensemble", "student"]
    with tiny_chain.store():
        client = MlflowClient()
        runs = client.search_runs([experiment_id()])  # every run in the named experiment
        assert {tiny_chain.pipeline_run_id, *tiny_chain.runs.values()} <= {
            run.info.run_id for run in runs}
        assert {"pipeline", "features", "stage1", "stage2", "stage3", "stage4", "ensemble",
                "distill"} <= {run.data.tags["fat.stage"] for run in runs}  # tests share it
        for stage, run_id in tiny_chain.runs.items():
            tags = client.get_run(run_id).data.tags
            if stage not in ("ensemble", "distill"):
                assert tags["mlflow.parentRunId"] == tiny_chain.pipeline_run_id
                assert tags["fat.pipeline_run_id"] == tiny_chain.pipeline_run_id
        report = pd.read_csv(mlflow.artifacts.download_artifacts(
            run_id=tiny_chain.pipeline_run_id, artifact_path="report/stage_table.csv"))
        names = {a.path for a in client.list_artifacts(tiny_chain.pipeline_run_id, "report")}
        assert "report/stage_table.png" in names
        assert report["lwlrap_test"].between(0, 1).all()
        assert report.loc[report["stage"] == "stage3", "selection_precision"].between(0, 1).all()
        stages = report[report["stage"].str.startswith("stage")]  # time and overhead of each
        assert (stages["minutes"] > 0).all() and stages["non_training_share"].between(0, 1).all()
        version = client.get_model_version_by_alias("fat2019-tagger", "champion")
        assert version.run_id == tiny_chain.runs["ensemble"]


def test_rerun_reuses_finished_stages_and_resumes_an_unfinished_one(tiny_chain):
    request = PipelineRequest(data=tiny_chain.data, profile=get_profile("tiny"), archs=["cnn"],
                              esc50=tiny_chain.data, threshold=0.0, progress=False)
    with tiny_chain.store():
        client = MlflowClient()
        stage4 = tiny_chain.runs["stage4"]
        client.set_tag(stage4, "fat.complete", "false")  # as if it had been interrupted
        n_runs = len(client.search_runs([experiment_id()]))
        _, table = run_pipeline(request, build_and_register)
        again = dict(zip(table["stage"], table["run_id"]))
        for stage in ("stage1", "stage2", "stage3", "stage4"):
            assert again[stage] == tiny_chain.runs[stage]
        assert client.get_run(stage4).data.tags["fat.complete"] == "true"
        # new: the pipeline run, its features run and the ensemble run; no stage was retrained
        assert len(client.search_runs([experiment_id()])) == n_runs + 3
        assert client.get_registered_model("fat2019-tagger").latest_versions


def test_stage_runs_log_their_tables_as_dataset_inputs(tiny_chain):
    """What each stage trained and was evaluated on, in the UI's Dataset column and in search."""
    dataset = load_dataset(tiny_chain.data)
    fingerprint, folder = dataset_fingerprint(dataset), dataset.root.name
    rows = {f"{folder}/train_curated": len(dataset.curated),
            f"{folder}/train_noisy": len(dataset.noisy), f"{folder}/test": len(dataset.test)}
    test = (f"{folder}/test", "evaluation")
    expected = {"stage1": {(f"{folder}/train_noisy", "training"), test},
                "stage2": {(f"{folder}/train_curated", "training"), test},
                "stage3": {(f"{folder}/train_curated", "training"),
                           (f"{folder}/train_noisy", "training"), test}}
    expected["stage4"] = expected["pipeline"] = expected["stage3"]
    runs = {**tiny_chain.runs, "pipeline": tiny_chain.pipeline_run_id}
    with tiny_chain.store():
        client = MlflowClient()
        for stage, inputs in expected.items():
            logged = client.get_run(runs[stage]).inputs.dataset_inputs
            got = {(entry.dataset.name, {tag.key: tag.value for tag in entry.tags}
                    ["mlflow.data.context"]) for entry in logged}
            assert got == inputs, stage
            for entry in logged:
                assert entry.dataset.digest == fingerprint
                assert json.loads(entry.dataset.source) == {"uri": str(dataset.root)}
                assert json.loads(entry.dataset.profile)["num_rows"] == rows[entry.dataset.name]
        trained_on_noisy = client.search_runs(
            [experiment_id()], f"dataset.name = '{folder}/train_noisy' AND "
                               f"dataset.digest = '{fingerprint}' AND dataset.context = 'training'")
        assert {runs[stage] for stage in ("pipeline", "stage1", "stage3", "stage4")} <= {
            run.info.run_id for run in trained_on_noisy}  # (+ the rerun test's pipeline run)
        assert {run.data.tags["fat.stage"] for run in trained_on_noisy} == {
            "pipeline", "stage1", "stage3", "stage4"}


def test_a_demo_of_an_older_recipe_is_named_not_trained_on(tmp_path):
    old_demo = tmp_path / "demo_data"
    old_demo.mkdir()
    (old_demo / "demo_summary.json").write_text(json.dumps({"seed": 0, "scale": 1.0,
                                                            "n_classes": 50}))
    with pytest.raises(DemoExistsError, match="demo_data: a demo dataset of another recipe .*"
                                              "remove it .* or pass --data"):
        ensure_demo_data(old_demo)


def test_the_demo_of_todays_recipe_is_reused_without_looking_for_esc50(demo_data, tmp_path):
    built = json.loads((demo_data / "demo_summary.json").read_text())
    assert ensure_demo_data(demo_data, tmp_path / "nowhere", scale=built["scale"]) == demo_data
    with pytest.raises(DemoExistsError, match="another recipe"):
        ensure_demo_data(demo_data, tmp_path / "nowhere", DemoConfig(curated_per_class=1),
                         scale=built["scale"])
