"""The budget/data study: real tiny pipelines on thinned real demos, floors beside them."""
from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner

from fat_mlflow.cli import main
from fat_mlflow.config import get_profile
from fat_mlflow.data.layout import load_dataset
from fat_mlflow.experiments.study import StudyRequest, crossing, run_study


def test_crossing_interpolates_where_the_cnn_passes_the_floor():
    x = pd.Series([4, 8, 12])
    assert crossing(x, pd.Series([0.5, 0.6, 0.9]), pd.Series([0.7, 0.7, 0.7])) == \
        pytest.approx(8 + 4 * 0.1 / 0.3)
    assert crossing(x, pd.Series([0.8, 0.9, 1.0]), pd.Series([0.7] * 3)) == 4
    assert crossing(x, pd.Series([0.1, 0.2, 0.3]), pd.Series([0.7] * 3)) is None


def test_study_runs_both_axes_reuses_finished_points_and_reports(tracking, esc50_dir, tmp_path):
    request = StudyRequest(profile=get_profile("tiny", {"train.epochs": "1"}), seeds=[0],
                           budgets=[(0.125, 1)], curated_per_class=[1, 0],
                           esc50=esc50_dir, demo_dir=tmp_path / "demo", demo_scale=0.15)
    out = tmp_path / "report"
    summary = run_study(request, out, "fat-mlflow study")
    assert list(summary["axis"]) == ["budget", "data", "data"]
    thinned = load_dataset(tmp_path / "demo_curated1")
    full = load_dataset(tmp_path / "demo")
    assert len(thinned.curated) == len(full.vocabulary) < len(full.curated)
    data_axis = summary[summary["axis"] == "data"].set_index("curated_per_class")
    assert list(data_axis.index) == [1.0, round(len(full.curated) / len(full.vocabulary), 1)]
    assert summary["ensemble_test"].between(0, 1).all()
    assert summary["logreg_curated_test"].between(0, 1).all()
    # the default point (width 0.125, 1 epoch, all clips) is on both axes: trained once
    pipelines = mlflow.search_runs(filter_string="tags.`fat.stage` = 'pipeline'",
                                   search_all_experiments=True, output_format="list")
    assert len(pipelines) == 2
    assert {"study.md", "study_runs.csv", "study_budget.png", "study_data.png"} <= {
        path.name for path in out.iterdir()}
    assert "floor" in (out / "study.md").read_text()

    again = run_study(request, out, "fat-mlflow study")  # every point reused
    pd.testing.assert_frame_equal(again, summary)
    assert len(mlflow.search_runs(filter_string="tags.`fat.stage` = 'pipeline'",
                                  search_all_experiments=True, output_format="list")) == 2


def test_study_cli_names_a_bad_budget():
    result = CliRunner().invoke(main, ["study", "--budgets", "0.25x"])
    assert result.exit_code == 2 and "expected WIDTHxEPOCHS" in result.output
