"""Stage runs end to end on real demo clips with a real MLflow store (tiny profile)."""
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from fat_mlflow.config import get_profile
from fat_mlflow.data.layout import load_dataset
from fat_mlflow.engine.crossval import ClipSet
from fat_mlflow.warmup.selection import SELECTION_COLUMNS
from fat_mlflow.warmup.stage_inputs import StageRequest
from fat_mlflow.warmup.stages import run_stage, selection_summary, training_masks
from fat_mlflow.warmup.tracking import RunLookupError


def artifact_paths(client, run_id, path=None):
    found = []
    for entry in client.list_artifacts(run_id, path):
        found.extend(artifact_paths(client, run_id, entry.path) if entry.is_dir else [entry.path])
    return found


def test_stage_run_logs_params_curves_folds_and_oof(tiny_chain):
    with tiny_chain.store():
        client = MlflowClient()
        run = client.get_run(tiny_chain.runs["stage1"])
        assert run.data.params["train.n_folds"] == "2"
        assert run.data.params["profile"] == "tiny"
        assert run.data.tags["fat.complete"] == "true"
        for key in ("lwlrap_noisy", "lwlrap_curated", "lwlrap_test", "fold0_lwlrap_noisy"):
            assert 0 <= run.data.metrics[key] <= 1
        history = client.get_metric_history(run.info.run_id, "fold1_val_lwlrap")
        assert [point.step for point in history] == [0, 1]
        paths = set(artifact_paths(client, run.info.run_id))
        assert {"folds.csv", "profile.json", "vocabulary.json", "curves.png",
                "oof/curated.csv", "oof/noisy.csv", "test_scores.csv",
                "folds/fold_0/model.pt", "folds/fold_1/model.pt"} <= paths
        oof = pd.read_csv(mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="oof/noisy.csv"))
    dataset = load_dataset(tiny_chain.data)
    assert sorted(oof["fname"]) == sorted(dataset.noisy["fname"])
    assert list(oof.columns[3:]) == dataset.vocabulary


def test_stage_run_records_where_its_time_went(tiny_chain):
    with tiny_chain.store():
        metrics = MlflowClient().get_run(tiny_chain.runs["stage1"]).data.metrics
    phases = {key.removeprefix("time_").removesuffix("_s"): value
              for key, value in metrics.items()
              if key.startswith("time_") and key != "time_total_s"}
    assert {"train_steps", "validation", "oof_scoring", "test_scoring", "epoch_logging",
            "model_setup", "saving", "loading", "selection", "outputs"} == set(phases)
    assert all(value >= 0 for value in phases.values()) and phases["train_steps"] > 0
    # the stage's phases are its folds' phases summed, plus its own loading and outputs
    for phase in ("train_steps", "oof_scoring", "saving"):
        assert phases[phase] == pytest.approx(sum(metrics[f"fold{fold}_time_{phase}_s"]
                                                  for fold in (0, 1)))
    assert metrics["time_total_s"] == pytest.approx(sum(phases.values()))
    assert metrics["non_training_share"] == pytest.approx(
        1 - phases["train_steps"] / metrics["time_total_s"])


def test_later_stages_share_folds_and_record_their_sources(tiny_chain):
    runs = tiny_chain.runs
    with tiny_chain.store():
        client = MlflowClient()
        folds = [pd.read_csv(mlflow.artifacts.download_artifacts(
            run_id=runs[s], artifact_path="folds.csv")) for s in ("stage1", "stage2", "stage3", "stage4")]
        for table in folds[1:]:
            pd.testing.assert_frame_equal(table, folds[0])
        stage3 = client.get_run(runs["stage3"])
        assert stage3.data.params["stage.init_run_id"] == runs["stage2"]
        assert stage3.data.params["stage.selection_run_ids"] == f"{runs['stage1']},{runs['stage2']}"
        # threshold 0 keeps every noisy clip up to the cap of 5 per label and fold
        selected = pd.read_csv(mlflow.artifacts.download_artifacts(
            run_id=runs["stage3"], artifact_path="selection/selected.csv"))
        assert stage3.data.metrics["selected_clips"] == len(selected) > 0
        assert 0 <= stage3.data.metrics["selection_precision"] <= 1
        assert 0 < stage3.data.metrics["noisy_base_rate"] < 1
        stage4 = client.get_run(runs["stage4"])
        perfect = pd.read_csv(mlflow.artifacts.download_artifacts(
            run_id=runs["stage3"], artifact_path="oof/noisy.csv")).query("lwlrap == 1")
        assert stage4.data.metrics["selected_clips"] == len(perfect)


@pytest.mark.parametrize("change, message", [
    (dict(stage="stage2", init_run_id="0" * 32), "does not exist"),
    (dict(stage="stage2", init_run_id="STAGE3"), "is a stage3 run; expected a run of stage1"),
    (dict(stage="stage3", init_run_id="STAGE2", selection_run_ids=["STAGE2", "STAGE2"]),
     "is a stage2 run; expected a run of stage1"),
    (dict(stage="stage4", init_run_id="STAGE3", selection_run_ids=[]), "got 0"),
])
def test_wrong_run_ids_get_specific_errors(tiny_chain, change, message):
    runs = {f"STAGE{s[-1]}": run_id for s, run_id in tiny_chain.runs.items()}
    change = {key: ([runs.get(v, v) for v in value] if isinstance(value, list)
                    else runs.get(value, value)) for key, value in change.items()}
    with tiny_chain.store(), pytest.raises(RunLookupError, match=message):
        run_stage(StageRequest(data=tiny_chain.data, profile=get_profile("tiny"),
                               progress=False, **change))


def test_run_from_another_dataset_is_refused(tiny_chain, esc50_dir, tmp_path):
    from fat_mlflow.data.demo import build_demo_dataset

    other = tmp_path / "other"
    build_demo_dataset(esc50_dir, other, seed=1, scale=0.05)
    with tiny_chain.store(), pytest.raises(RunLookupError, match="another dataset"):
        run_stage(StageRequest(stage="stage2", data=other, profile=get_profile("tiny"),
                               init_run_id=tiny_chain.runs["stage1"], progress=False))


def test_interrupted_stage_resumes_at_the_unfinished_fold(tiny_chain):
    """Drop fold 1 of a finished run as if it had been killed there; resuming retrains only it."""
    import shutil
    from urllib.parse import urlparse

    with tiny_chain.store():
        client = MlflowClient()
        original = client.get_run(tiny_chain.runs["stage2"])
        request = StageRequest(stage="stage2", data=tiny_chain.data, profile=get_profile("tiny"),
                               init_run_id=tiny_chain.runs["stage1"], progress=False)
        run_id = run_stage(request)
        artifacts = urlparse(client.get_run(run_id).info.artifact_uri).path
        shutil.rmtree(f"{artifacts}/folds/fold_1")
        client.set_tag(run_id, "fat.complete", "false")
        fold0_model = f"{artifacts}/folds/fold_0/model.pt"
        stamp = __import__("os").stat(fold0_model).st_mtime_ns
        assert run_stage(StageRequest(**{**request.__dict__, "resume_run_id": run_id})) == run_id
        assert __import__("os").stat(fold0_model).st_mtime_ns == stamp  # fold 0 not retrained
        resumed = client.get_run(run_id)
        assert resumed.data.tags["fat.complete"] == "true"
        for key in ("lwlrap_curated", "lwlrap_noisy", "lwlrap_test"):
            assert resumed.data.metrics[key] == pytest.approx(original.data.metrics[key], abs=1e-6)
        assert np.isfinite(resumed.data.metrics["fold1_lwlrap_curated"])


def test_training_masks_of_each_stage_and_of_an_empty_selection():
    def clip_set(name, n):
        return ClipSet(name, [f"{name}{i}.wav" for i in range(n)], [], np.zeros((n, 2)),
                       np.arange(n) % 2)

    sets = {"curated": clip_set("c", 3), "noisy": clip_set("n", 4)}
    picked = pd.DataFrame({"fname": ["n1.wav", "n3.wav"], "fold": [1, 1], "score": [1.0, 1.0],
                           "labels": [["a"], ["b"]]})
    empty = pd.DataFrame(columns=SELECTION_COLUMNS)
    masks = {stage: {name: mask.tolist() for name, mask in
                     training_masks(stage, sets, selection).items()}
             for stage, selection in [("stage1", None), ("stage2", None), ("stage3", picked),
                                      ("stage4", empty)]}
    assert masks == {"stage1": {"noisy": [True] * 4},
                     "stage2": {"curated": [True] * 3},
                     "stage3": {"curated": [True] * 3, "noisy": [False, True, False, True]},
                     "stage4": {"curated": [True] * 3}}  # an empty selection: curated alone


def test_selection_summary_says_when_nothing_was_selected():
    request = StageRequest(stage="stage3", data=None, profile=get_profile("tiny"),
                           threshold=0.7, max_per_label_per_fold=0)
    chosen = pd.DataFrame({"fname": ["n1.wav"]})
    assert selection_summary(request, chosen) == (
        "stage3: 1 noisy clip(s) selected (sqrt(lwlrap1 * lwlrap2) >= 0.7, no cap per label)")
    request.stage = "stage4"
    assert selection_summary(request, chosen.iloc[:0]) == (
        "stage4: no noisy clip selected (lwlrap == 1 under model 3); this stage trains on the "
        "curated clips alone")
