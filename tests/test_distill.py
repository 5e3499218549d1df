"""Distillation: the ensemble -> one student network, registered beside it."""
from __future__ import annotations

import base64

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from fat_mlflow.config import DistillConfig
from fat_mlflow.engine.dataset import window_batches
from fat_mlflow.engine.models import build_model, save_checkpoint
from fat_mlflow.engine.predict import (
    predict_spectrograms,
    scored_window_batches,
    window_positions,
)
from fat_mlflow.engine.spectrograms import SpectrogramList, WindowSpectrograms
from fat_mlflow.serving.distill import (
    DistillRequest,
    blended_targets,
    distill_summary,
    initial_student,
    read_teacher,
    run_distill,
)
from fat_mlflow.serving.tagger import (
    BASE64_COLUMN,
    ERROR_COLUMN,
    PATH_COLUMN,
    MemberRun,
    load_local_model,
)
from fat_mlflow.warmup.tracking import RunLookupError

FAST = "fat2019-tagger-fast"


def _specs(lengths, n_mels=16, seed=0):
    rng = np.random.default_rng(seed)
    return SpectrogramList([rng.normal(size=(n_mels, n)).astype(np.float32) for n in lengths])


def test_window_positions_follow_the_order_windows_are_cut_in():
    specs = _specs([128, 200, 300])
    clips, starts = window_positions(specs, 128, 48)
    batches = list(window_batches(specs, 128, 48, batch_size=3))
    assert np.array_equal(np.concatenate([owners for _, owners in batches]), clips)
    assert starts.tolist() == [0, 0, 48, 0, 48, 96, 144]
    windows = WindowSpectrograms(specs, clips, starts, 128)
    assert len(windows) == 7 and windows.frames(3) == 128
    assert np.array_equal(windows.clip(5), specs.clip(2)[:, 96:224])
    with pytest.raises(ValueError, match="outside a window"):
        windows.crop(0, 10, 128)

    clips, starts = window_positions(specs, 128, 96, cover_end=True)
    batches = list(window_batches(specs, 128, 96, batch_size=3, cover_end=True))
    assert np.array_equal(np.concatenate([owners for _, owners in batches]), clips)
    assert starts.tolist() == [0, 0, 72, 0, 96, 172]


@pytest.mark.parametrize("cover_end", [False, True])
def test_clip_scores_are_the_mean_of_their_window_scores(cover_end):
    torch.manual_seed(0)
    specs = _specs([128, 250, 400], n_mels=32)
    models = [build_model("cnn", 5, 0.0625).eval() for _ in range(2)]
    windows = np.concatenate([p for p, _ in scored_window_batches(
        models, specs, 64, 40, 4, cover_end=cover_end)])
    clips, _ = window_positions(specs, 64, 40, cover_end)
    assert len(clips) == (3 + 6 + 10 if cover_end else 2 + 5 + 9)
    expected = np.stack([windows[clips == i].mean(axis=0) for i in range(3)])
    np.testing.assert_allclose(
        predict_spectrograms(models, specs, 64, 40, 4, cover_end=cover_end), expected,
        rtol=1e-5)


def test_curated_targets_blend_label_and_teacher():
    soft = np.array([[0.2, 0.6], [0.4, 0.4]], dtype=np.float32)
    labels = np.array([[1, 0], [0, 1]], dtype=np.float32)
    targets = blended_targets(soft, labels, np.array([True, False]), label_weight=0.5)
    np.testing.assert_allclose(targets, [[0.6, 0.3], [0.4, 0.4]])


def test_the_student_starts_from_the_best_fold_of_the_latest_stage_as_wide(tmp_path):
    members, files = [], {}
    for stage, width in (("stage2", 0.25), ("stage3", 0.125)):
        keys = (f"{stage}_fold0", f"{stage}_fold1")
        for key in keys:
            files[key] = str(tmp_path / f"{key}.pt")
            save_checkpoint(build_model("cnn", 5, width), files[key], arch="cnn", width=width,
                            n_classes=5)
        members.append(MemberRun(stage, stage, "cnn", 128, 48, keys))
    scores = {"stage3_fold0": 0.80, "stage3_fold1": 0.85, "stage2_fold0": 0.9}

    def start(fold_scores=scores, **settings):
        return initial_student(DistillConfig(**settings), files, tuple(members), 5, fold_scores)

    assert start(width=0.125)[1] == "stage3 fold 1 (stage3)"
    assert start(width=0.125, fold_scores={})[1] == "stage3 fold 0 (stage3)"
    assert start(width=0.0625)[1] == "stage3 fold 1 (stage3, slimmed)"
    assert start(width=0.25)[1] == "stage2 fold 0 (stage2)"  # stage 3 is too narrow
    assert start(width=0.5)[1] == "scratch"
    assert start(width=0.125, warm_start=False)[1] == "scratch"
    assert start(width=0.125, arch="vgg16")[1] == "scratch"
    student, _ = start(width=0.125)
    assert torch.equal(student.state_dict()["features.0.weight"],
                       torch.load(files["stage3_fold1"])["state_dict"]["features.0.weight"])


def test_distill_settings_reject_unknown_fields():
    assert DistillConfig().override({"distill.width": "0.5"}).width == 0.5
    with pytest.raises(ValueError, match="distill has"):
        DistillConfig().override({"distill.depth": "3"})


def test_the_pipeline_registers_a_student_served_like_the_ensemble(tiny_chain, demo_data):
    """The student is its own registered model, with the ensemble's interface; its run
    logs the curve, the test lwlrap beside the teacher's, size and FLOPs."""
    with tiny_chain.store():
        client = MlflowClient()
        student_run = tiny_chain.runs["distill"]
        version = client.get_model_version_by_alias(FAST, "champion")
        assert version.run_id == student_run
        run = client.get_run(student_run)
        metrics = run.data.metrics
        assert run.data.tags["fat.teacher_run_id"] == tiny_chain.runs["ensemble"]
        assert run.data.params["student.init"].endswith("(stage4)")  # warm start
        assert 0 <= metrics["lwlrap_test"] <= 1
        assert metrics["lwlrap_gap"] == pytest.approx(
            metrics["teacher_lwlrap_test"] - metrics["lwlrap_test"])
        assert metrics["flops_ratio"] == pytest.approx(6, rel=0.01)  # 3 stages x 2 folds, one net
        assert metrics["teacher_mb"] > metrics["student_mb"] > 0
        assert [m.step for m in client.get_metric_history(student_run, "val_lwlrap")] == [0]
        assert metrics["time_train_steps_s"] > 0 and metrics["time_teacher_s"] > 0
        assert (f"student test lwlrap {metrics['lwlrap_test']:.3f} against the ensemble's "
                f"{metrics['teacher_lwlrap_test']:.3f}") in distill_summary(student_run)

        ensemble_uri = "models:/fat2019-tagger@champion"
        student, ensemble = (load_local_model(u) for u in (f"models:/{FAST}@champion",
                                                            ensemble_uri))
        assert student.metadata.signature == ensemble.metadata.signature
        assert (student.metadata.get_input_schema() == ensemble.metadata.get_input_schema())
        clip = next(iter((demo_data / "test").iterdir()))
        request = pd.DataFrame({BASE64_COLUMN: [base64.b64encode(clip.read_bytes()).decode()]})
        scored = student.predict(request, params={"top_k": 2})
        assert list(scored.columns) == list(ensemble.predict(request).columns)
        assert scored[ERROR_COLUMN].tolist() == [""] and scored["top_labels"][0].count(",") == 1

        served = __import__("mlflow").pyfunc.load_model(f"models:/{FAST}@champion")
        refused = served.predict(pd.DataFrame({PATH_COLUMN: [str(clip)]}))
        assert "refused" in refused[ERROR_COLUMN][0]  # a server's clients name no files


def test_a_wrong_teacher_is_named(tiny_chain):
    with tiny_chain.store():
        with pytest.raises(RunLookupError, match="expected a run of ensemble"):
            read_teacher(tiny_chain.runs["stage4"])
        with pytest.raises(RunLookupError, match="no-such-model"):
            read_teacher("models:/no-such-model@champion")
        with pytest.raises(RunLookupError, match="does not exist"):
            read_teacher("0123456789abcdef0123456789abcdef")


def test_distill_from_the_registered_ensemble_at_another_width(tiny_chain):
    """`fat-mlflow distill` reads the ensemble by its registered alias; a narrower student
    starts slimmed from the last stage; a new version that scores worse does not take the
    alias."""
    with tiny_chain.store():
        client = MlflowClient()
        holder = client.get_model_version_by_alias(FAST, "champion")
        run_id, version = run_distill(DistillRequest(
            teacher="models:/fat2019-tagger@champion", progress=False,
            config=DistillConfig(width=0.0625, epochs=1, with_noisy=False, teacher_step=128)))
        run = client.get_run(run_id)
        assert run.data.params["student.init"].endswith("(stage4, slimmed)")
        assert run.data.params["distill.teacher_run_id"] == tiny_chain.runs["ensemble"]
        new_score = run.data.metrics["lwlrap_test"]
        champion = client.get_model_version_by_alias(FAST, "champion")
        old_score = float(holder.tags["lwlrap_test"])
        assert champion.version == (version if new_score >= old_score else holder.version)

        torch.manual_seed(123)  # whatever ran before in the process, the seed decides
        again, _ = run_distill(DistillRequest(
            teacher=tiny_chain.runs["ensemble"], progress=False,
            config=DistillConfig(width=0.0625, epochs=1, with_noisy=False, teacher_step=128)))
        assert client.get_run(again).data.metrics["lwlrap_test"] == new_score


def test_the_distill_benchmark_serves_both_models_over_http(tiny_chain, tmp_path):
    """Both registered versions behind `mlflow models serve`: the student's test lwlrap over
    HTTP is the one its run logged, its p50 is a fraction of the ensemble's (one net, not 6)."""
    from fat_mlflow.benchmarks import BENCHMARK_PROFILES
    from fat_mlflow.benchmarks.report import BenchmarkRequest, run_benchmarks

    with tiny_chain.store():
        out = tmp_path / "bench.md"
        run_benchmarks(BenchmarkRequest(only=("distill",), profile=BENCHMARK_PROFILES["tiny"],
                                        distill_runs=(tiny_chain.runs["distill"],), out=out))
        results = __import__("mlflow").search_runs(
            search_all_experiments=True, filter_string="tags.`fat.benchmark` = 'distill'")
        by_role = {row["params.role"]: row for _, row in results.iterrows()}
        student, ensemble = by_role["student"], by_role["ensemble"]
        logged = MlflowClient().get_run(tiny_chain.runs["distill"]).data.metrics
        assert student["metrics.lwlrap_test"] == pytest.approx(logged["lwlrap_test"], abs=1e-6)
        assert ensemble["metrics.lwlrap_test"] == pytest.approx(
            logged["teacher_lwlrap_test"], abs=1e-6)
        assert student["metrics.gflop_per_clip"] < ensemble["metrics.gflop_per_clip"] / 3
        assert student["metrics.startup_s"] > 0 and student["metrics.clips_per_s"] > 0
        assert "| mean of 1: student (cnn, width 0.125) |" in out.read_text()
        # the bound: the student's server answering a request of the clip's size unread, plus
        # decoding and the log-mel; under the ensemble's p50, which does all that and 6 nets
        bound = by_role["bound"]
        assert 0 < bound["metrics.unread_p50_ms"] < bound["metrics.p50_ms"]
        assert bound["metrics.p50_ms"] == pytest.approx(
            bound["metrics.unread_p50_ms"] + bound["metrics.decode_log_mel_p50_ms"])
        assert bound["metrics.p50_ms"] < ensemble["metrics.p50_ms"]
        assert bound["metrics.p50_fraction_of_ensemble"] == pytest.approx(
            bound["metrics.p50_ms"] / ensemble["metrics.p50_ms"])
        assert "| mean of 1: p50 bound of any student on these features" in out.read_text()
        assert (tmp_path / "distill_tradeoff.png").stat().st_size > 0
