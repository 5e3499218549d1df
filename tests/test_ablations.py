"""Ablation report and the logistic-regression floor, on real clips and a real pipeline run."""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from fat_mlflow.cli import main
from fat_mlflow.config import get_profile
from fat_mlflow.data.features import FeatureCache
from fat_mlflow.data.layout import DataLayoutError, load_dataset
from fat_mlflow.engine.metrics import lwlrap
from fat_mlflow.experiments.ablations import (
    ABLATIONS,
    AblationRequest,
    ablation_key,
    ablation_profile,
    pipeline_row,
    report_cells,
    run_ablations,
    single_fold_lwlrap,
    summarise,
    write_report,
)
from fat_mlflow.serving.baseline import baseline_scores, clip_statistics, fit_logistic_baseline
from fat_mlflow.warmup.tracking import TAG_PIPELINE, downloaded, read_table


def _specs(dataset, frame):
    cache = FeatureCache(None, get_profile("tiny").features)
    cache.compute(list(frame["path"]), progress=False)
    return cache.open(frame["path"])


def test_logistic_floor_beats_random_scores_on_real_clips(demo_data: Path):
    dataset = load_dataset(demo_data)
    train_specs = _specs(dataset, dataset.curated)
    features = clip_statistics(train_specs)
    assert features.shape == (len(train_specs), 3 * train_specs.clip(0).shape[0])
    model = fit_logistic_baseline(train_specs, dataset.targets(dataset.curated))
    truth = dataset.targets(dataset.test)
    scores = baseline_scores(model, _specs(dataset, dataset.test))
    assert scores.shape == truth.shape
    chance = np.mean([lwlrap(truth, np.random.default_rng(s).random(truth.shape))
                      for s in range(5)])
    assert lwlrap(truth, scores) > chance + 0.1


def test_logistic_floor_rejects_mismatched_targets(demo_data: Path):
    specs = [np.zeros((8, 20), np.float32)] * 3
    with pytest.raises(ValueError, match="3 spectrograms but 2 target rows"):
        fit_logistic_baseline(specs, np.zeros((2, 4)))


def _runs(values: dict[str, list[float]], column: str = "ensemble_test") -> pd.DataFrame:
    return pd.DataFrame([{"ablation": name, "seed": seed, column: value}
                         for name, scores in values.items() for seed, value in enumerate(scores)])


def test_summary_pairs_seeds_and_calls_only_consistent_gaps_significant():
    runs = _runs({"default": [0.30, 0.35, 0.25],
                  "specmix": [0.20, 0.251, 0.149],  # 0.1 lower at every seed
                  "no_warm_start": [0.40, 0.30, 0.26]})  # higher on average, but erratic
    summary = summarise(runs).set_index("configuration")
    default = summary.loc["default pipeline (ensemble of stages 2-4)"]
    assert default["mean"] == pytest.approx(0.30) and default["std"] == pytest.approx(0.05)
    specmix = summary.loc["SpecMix without mixup"]
    assert specmix["delta_vs_default"] == pytest.approx(-0.1, abs=1e-3)
    assert specmix["p_value"] < 0.01 and specmix["verdict"] == "worse than default"
    erratic = summary.loc["no warm start (every stage from scratch)"]
    assert erratic["delta_vs_default"] > 0 and erratic["verdict"] == "not significant"
    assert "mixup without SpecMix" not in summary.index  # not run: left out, not zero
    assert summary["minutes"].isna().all()  # these runs have no times


def test_summary_gives_each_pipeline_its_mean_wall_time_and_parts_none():
    runs = _runs({"default": [0.30, 0.35], "float32": [0.31, 0.34]})
    runs["minutes"] = [10.0, 12.0, 25.0, 27.0]
    runs["model4_test"] = 0.4
    summary = summarise(runs).set_index("configuration")["minutes"]
    assert summary["default pipeline (ensemble of stages 2-4)"] == pytest.approx(11.0)
    assert summary["float32 instead of bf16"] == pytest.approx(26.0)
    assert np.isnan(summary["stage 4 alone (all folds, warm-started)"])


def _key(base, name: str, seed: int = 0, threads: int = 1) -> str:
    ablation = ABLATIONS[name]
    return ablation_key(ablation, ablation_profile(base, ablation, seed, threads), "data")


def test_ablation_key_separates_settings_and_seeds_and_joins_equal_settings():
    base = get_profile("tiny")  # SpecMix + mixup on, like the paper's profile
    keys = {_key(base, name, seed) for name in ABLATIONS for seed in (0, 1)}
    # specmix_mixup sets what the profile has: the same pipeline as default
    assert len(keys) == 2 * (len(ABLATIONS) - 1)
    assert _key(base, "specmix_mixup") == _key(base, "default") == _key(base, "default", 0, 2)
    quick = get_profile("quick")  # mixes nothing: there no_mixing is the default pipeline
    assert _key(quick, "no_mixing") == _key(quick, "default") != _key(quick, "specmix_mixup")
    profile = ablation_profile(base, ABLATIONS["mixup"], 3, 1)
    assert profile.augment.specmix is False and profile.train.seed == 3
    assert ablation_profile(base, ABLATIONS["float32"], 0, 1).train.amp is False


def test_single_fold_scores_average_to_the_stage_test_scores(tiny_chain):
    dataset = load_dataset(tiny_chain.data)
    with tiny_chain.store():
        row = pipeline_row(tiny_chain.pipeline_run_id, dataset)
        table = read_table(tiny_chain.pipeline_run_id, "report/stage_table.csv")
        stage4 = tiny_chain.runs["stage4"]
        folds = [single_fold_lwlrap(stage4, dataset, fold) for fold in (0, 1)]
        fnames = read_table(stage4, "test_scores.csv")["fname"]
        fold_scores = []
        for fold in (0, 1):
            with downloaded(stage4, f"folds/fold_{fold}/scores.npz") as path, \
                    np.load(path) as scores:
                fold_scores.append(scores["test"])
    logged = table.set_index("stage")["lwlrap_test"]
    truth = dataset.targets(dataset.test.set_index("fname").loc[fnames].reset_index())
    # the fold models' own test scores, in the order single_fold_lwlrap aligns them, average
    # to exactly the stage's logged test lwlrap
    assert lwlrap(truth, np.mean(fold_scores, axis=0)) == pytest.approx(logged["stage4"])
    assert row["model4_test"] == pytest.approx(logged["stage4"])
    assert row["ensemble_test"] == pytest.approx(logged["ensemble"])
    assert row["single_fold_test"] == pytest.approx(folds[0])
    assert all(0 < value <= 1 for value in folds)
    assert row["model3_selection_precision"] == pytest.approx(
        table.set_index("stage")["selection_precision"]["stage3"])


def test_report_writes_tables_and_the_pipeline_figures(tiny_chain, tmp_path: Path):
    dataset = load_dataset(tiny_chain.data)
    with tiny_chain.store():
        row = pipeline_row(tiny_chain.pipeline_run_id, dataset)
        runs = pd.DataFrame([row | {"ablation": "default", "seed": 0},
                             row | {"ablation": "no_warm_start", "seed": 0}])
        files = write_report(runs, {"logreg_curated_test": 0.5}, get_profile("tiny"), tmp_path,
                             "fat-mlflow x")
    names = {path.name for path in files}
    assert {"ablations.md", "ablations.csv", "ablation_runs.csv", "ablations.png",
            "curves_stage1.png", "per_class_lwlrap.png"} <= names
    text = (tmp_path / "ablations.md").read_text()
    assert "`fat-mlflow x`" in text and "logistic regression" in text
    assert f"{row['ensemble_test']:.3f}" in text
    assert "## Table 2 (default pipeline" in text and "## Table 2 (no warm start" in text
    assert "profile `tiny`" in text and "SpecMix on, mixup on" in text
    assert f"Cost: 1 pipeline runs, {row['minutes']:.0f} min" in text and row["minutes"] > 0
    assert f"| {row['minutes']:.1f} " in text  # the default's row: its pipeline's wall time
    assert f"{row['model3_selection_precision']:.3f}" in text
    assert f"{row['model3_selected_clips']:.1f}" in text
    assert f"base rate is {row['model3_noisy_base_rate']:.3f}" in text


def test_cli_rejects_unknown_ablations_before_any_work(tmp_path: Path):
    result = CliRunner().invoke(main, ["ablations", "--only", "default,no_dropout",
                                       "--out-dir", str(tmp_path)])
    assert result.exit_code == 2 and "no_dropout" in result.output
    result = CliRunner().invoke(main, ["ablations", "--seeds", "one,two"])
    assert result.exit_code == 2 and "one,two" in result.output
    with pytest.raises(ValueError, match="at least one seed"):
        AblationRequest(profile=get_profile("tiny"), seeds=[], esc50=tmp_path)
    assert not list(tmp_path.iterdir())


def test_report_cells_read_as_printed():
    table = pd.DataFrame({"configuration": ["a", "b"], "mean": [0.29, 0.3333],
                          "p_value": [np.nan, 0.0001]})
    readable = report_cells(table)
    assert readable.to_dict("list") == {"configuration": ["a", "b"], "mean": ["0.290", "0.333"],
                                        "p_value": ["", "< 0.001"]}


def test_data_without_test_labels_is_refused_before_any_training(demo_data: Path, tmp_path: Path,
                                                                  tracking):
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for entry in demo_data.iterdir():
        if entry.name != "test_truth.csv":
            (unlabelled / entry.name).symlink_to(entry)
    request = AblationRequest(profile=get_profile("tiny"), seeds=[0], esc50=tmp_path,
                              data=unlabelled)
    with pytest.raises(DataLayoutError, match="test_truth.csv: no labelled test clip"):
        run_ablations(request, tmp_path / "report", "fat-mlflow ablations")
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")


def test_sweep_trains_ablations_with_equal_settings_once(demo_data: Path, tmp_path: Path,
                                                          tracking):
    # on the tiny profile (SpecMix + mixup on) `specmix_mixup` is the default pipeline
    request = AblationRequest(profile=get_profile("tiny"), seeds=[0], data=demo_data,
                              names=["default", "specmix_mixup"])
    summary = run_ablations(request, tmp_path / "report", "fat-mlflow ablations")
    runs = pd.read_csv(tmp_path / "report" / "ablation_runs.csv")
    assert list(runs["ablation"]) == ["default", "specmix_mixup"]
    assert runs["pipeline_run_id"].nunique() == 1
    pipelines = mlflow.search_runs(filter_string="tags.`fat.ablation` = 'default'",
                                   output_format="list")
    assert len([run for run in pipelines if TAG_PIPELINE in run.data.tags]) == 1
    reference, same = summary.set_index("configuration").loc[
        ["default pipeline (ensemble of stages 2-4)", "SpecMix + mixup (the seed's)"], "mean"]
    assert reference == same and 0 < reference <= 1
    # the floor is the one the ensemble run logged on the same test clips
    ensemble = read_table(runs["pipeline_run_id"][0], "report/stage_table.csv").iloc[-1]
    assert runs["logreg_curated_test"][0] == pytest.approx(ensemble["floor_lwlrap_curated"])
    text = (tmp_path / "report" / "ablations.md").read_text()
    assert "Cost: 1 pipeline runs" in text and "logistic regression on clip statistics" in text
