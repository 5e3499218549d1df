"""Reliability catalogue: bad audio inside a dataset, killed runs, concurrent runs, reproducibility.

Everything runs for real: `fat-mlflow` subprocesses are killed with SIGKILL/SIGTERM, two stage
runs share one fresh SQLite store and one cold feature cache. Datasets are ~60-clip copies of
the demo data (first rows of each table, clips as symlinks) and the stages train one epoch
per fold, so the whole file costs a few stage runs.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import librosa
import mlflow
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from fat_mlflow.cli import main
from fat_mlflow.config import FeatureConfig, get_profile
from fat_mlflow.data.audio import load_audio
from fat_mlflow.data.features import BadAudioError, FeatureCache, store_folder
from fat_mlflow.data.layout import dataset_fingerprint, load_dataset
from fat_mlflow.data.store import INDEX_FILE, FeatureStore
from fat_mlflow.serving.ensemble import build_and_register, build_ensemble
from fat_mlflow.warmup.featurize import run_features
from fat_mlflow.warmup.pipeline import PipelineRequest, run_or_reuse, run_pipeline
from fat_mlflow.warmup.stage_inputs import StageRequest
from fat_mlflow.warmup.stages import run_stage
from fat_mlflow.warmup.tracking import MlflowFoldStore, configure_tracking

SR = 44_100
EPOCHS = {"train.epochs": "1"}
# 16 epochs: a fold takes about a second in bf16, time enough to kill a stage between two folds
STAGE1 = ["stage1", "--profile", "tiny", "--set", "train.epochs=16"]
SIZES = {"train_curated": 16, "train_noisy": 24, "test": 8}
N_CLIPS = sum(SIZES.values())
SEEDS = (1, 2)


def subset_copy(src: Path, dst: Path) -> Path:
    """The first SIZES rows of each table of `src`, clips symlinked: a dataset in a blink."""
    tables = {"train_curated": "train_curated.csv", "train_noisy": "train_noisy.csv",
              "test": "sample_submission.csv"}
    dst.mkdir(parents=True)
    for folder, table in tables.items():
        rows = pd.read_csv(src / table).head(SIZES[folder])
        rows.to_csv(dst / table, index=False)
        (dst / folder).mkdir()
        for fname in rows["fname"]:
            (dst / folder / fname).symlink_to(src / folder / fname)
    truth = pd.read_csv(src / "test_truth.csv")
    test = pd.read_csv(dst / "sample_submission.csv")["fname"]
    truth[truth["fname"].isin(test)].to_csv(dst / "test_truth.csv", index=False)
    return dst


@dataclasses.dataclass
class Child:
    """A `fat-mlflow` subprocess in its own process group (a kill reaches its workers too)."""

    proc: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, args: list[str], cwd: Path, uri: str) -> Child:
        log = cwd / f"{args[0]}-{time.monotonic_ns()}.log"
        with log.open("w") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-c", "from fat_mlflow.cli import main; main()", *args],
                cwd=cwd, env={**os.environ, "MLFLOW_TRACKING_URI": uri},
                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        return cls(proc, log)

    def output(self) -> str:
        return self.log.read_text()

    def kill(self, sig: signal.Signals) -> int:
        os.killpg(self.proc.pid, sig)
        return self.proc.wait(timeout=60)


def wait_for(condition: Callable[[], bool], child: Child, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if child.proc.poll() is not None:
            pytest.fail(f"process ended (rc {child.proc.returncode}) before the point to kill "
                        f"it:\n{child.output()[-3000:]}")
        if time.monotonic() > deadline:
            child.kill(signal.SIGKILL)
            pytest.fail(f"timed out waiting for the process:\n{child.output()[-3000:]}")
        time.sleep(0.02)


def artifact_dir(client: MlflowClient, run_id: str) -> Path:
    return Path(urlparse(client.get_run(run_id).info.artifact_uri).path)


def run_tables(folder: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_csv(folder / name)
            for name in ("oof/noisy.csv", "oof/curated.csv", "test_scores.csv")}


def reads_whole(scores: Path) -> bool:
    """Whether a fold's scores file is copied completely (it appears before it is whole)."""
    try:
        with np.load(scores) as data:
            return bool(data.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False


def fold_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.glob("folds/*/*")}


def cache_entries(folder: Path) -> list[np.ndarray]:
    """Every indexed entry of a feature store, read whole: one cut short would raise here."""
    store = FeatureStore(folder)
    specs = store.open(store.digests())
    return [specs.clip(index) for index in range(len(specs))]


def assert_valid_entry(spec: np.ndarray) -> None:
    assert spec.dtype == np.float32 and spec.shape[0] == 128 and spec.shape[1] >= 128
    assert np.isfinite(spec).all() and spec.max() == 0.0


@pytest.fixture(scope="module")
def small_data(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return subset_copy(demo_data, tmp_path_factory.mktemp("small") / "data")


# --- 1. bad audio inside a training dataset ----------------------------------------------------

@pytest.fixture(scope="module")
def bad_data(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A small dataset with six broken clips in three sets; path -> expected reason."""
    root = subset_copy(demo_data, tmp_path_factory.mktemp("bad") / "data")
    curated = sorted((root / "train_curated").iterdir())
    noisy = sorted((root / "train_noisy").iterdir())
    test = sorted((root / "test").iterdir())
    real = noisy[1].read_bytes()
    breakages = {
        curated[0]: (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
        curated[1]: (lambda p: sf.write(p, np.zeros(2 * SR), SR, subtype="PCM_16"),
                     "silent: every sample is zero"),
        noisy[0]: (lambda p: p.write_text("fname,labels\nthis is not audio\n"),
                   "not a readable audio file"),
        noisy[1]: (lambda p: p.write_bytes(real[: len(real) // 2]), "truncated WAV file"),
        noisy[2]: (lambda p: sf.write(p, np.zeros(0), SR), "no audio samples"),
        test[0]: (lambda p: p.write_bytes(os.urandom(4000)), "not a readable audio file"),
    }
    for path, (breaking, _) in breakages.items():
        path.unlink()  # the symlink: never write through it into the demo data
        breaking(path)
    return root, {str(path): reason for path, (_, reason) in breakages.items()}


def test_bad_training_audio_stops_the_stage_before_any_run(bad_data, tracking):
    root, bad = bad_data
    with pytest.raises(BadAudioError) as info:
        run_stage(StageRequest(stage="stage1", data=root, profile=get_profile("tiny", EPOCHS),
                               progress=False))
    assert sorted(info.value.failures) == sorted(bad)
    message = str(info.value)
    assert message.startswith("6 audio file(s) cannot be used:")
    for path, reason in bad.items():
        assert reason in info.value.failures[path]
        assert f"\n  {path}: {info.value.failures[path]}\n" in message
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_skip_leaves_bad_clips_out_and_logs_them(bad_data, tracking):
    root, bad = bad_data
    run_id = run_stage(StageRequest(stage="stage1", data=root, progress=False,
                                    profile=get_profile("tiny", EPOCHS), bad_audio="skip"))
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["fat.complete"] == "true"
    assert run.data.params["stage.bad_audio"] == "skip"
    folder = artifact_dir(client, run_id)
    logged = pd.read_csv(folder / "bad_audio.csv")
    assert sorted(logged["path"]) == sorted(bad)
    assert all(bad[path] in reason for path, reason in zip(logged["path"], logged["reason"]))
    bad_names = {Path(path).name for path in bad}
    for name, table in run_tables(folder).items():
        assert len(table) and not bad_names & set(table["fname"]), name
    assert len(pd.read_csv(folder / "oof/noisy.csv")) == SIZES["train_noisy"] - 3

    # the ensemble and its floor leave the bad test clip out too, list it, and leave no
    # temporary download behind (checkpoints, tables)
    scratch = Path(tempfile.mkdtemp(prefix="scratch-"))
    previous, tempfile.tempdir = tempfile.tempdir, str(scratch)
    try:
        ensemble_id, _ = build_ensemble([run_id], registered_model="bad-audio", data=root,
                                        bad_audio="skip", progress=False)
    finally:
        tempfile.tempdir = previous
    assert not [p for p in scratch.iterdir() if p.name.startswith(("fat-", "tmp"))]
    ensemble = client.get_run(ensemble_id)
    folder = artifact_dir(client, ensemble_id)
    bad_test = sorted(path for path in bad if "/test/" in path)
    for listing in ("bad_audio.csv", "floor_bad_audio.csv"):
        assert set(bad_test) <= set(pd.read_csv(folder / listing)["path"]), listing
    assert len(pd.read_csv(folder / "test_scores.csv")) == SIZES["test"] - 1
    assert {"lwlrap_test", "floor_lwlrap_curated", "peak_rss_mb",
            "floor_peak_rss_mb"} <= set(ensemble.data.metrics)


def test_the_pipeline_stops_on_bad_audio_before_any_stage(bad_data, tracking, tmp_path):
    root, bad = bad_data
    with pytest.raises(BadAudioError, match="--bad-audio skip") as info:
        run_pipeline(PipelineRequest(data=root, profile=get_profile("tiny", EPOCHS),
                                     archs=["cnn"], progress=False), build_and_register)
    assert sorted(info.value.failures) == sorted(bad)
    stages = mlflow.search_runs(search_all_experiments=True,
                                filter_string="tags.`fat.stage` LIKE 'stage%'")
    assert stages.empty


def test_cli_names_every_bad_file_on_its_own_line_without_traceback(bad_data, tracking):
    root, bad = bad_data
    result = CliRunner().invoke(main, [*STAGE1, "--data", str(root)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "Error: BadAudioError: 6 audio file(s) cannot be used:" in result.output
    lines = result.output.splitlines()
    for path, reason in bad.items():
        named = [line for line in lines if line.startswith(f"  {path}: ")]
        assert len(named) == 1 and reason in named[0]
    assert "--bad-audio skip" in result.output


@pytest.fixture(scope="module")
def clip_variants(esc50_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real clip written in every shape a dataset may hold, cached in one compute call."""
    meta = pd.read_csv(esc50_dir / "meta" / "esc50.csv")
    wave = load_audio(esc50_dir / "audio" / meta["filename"].iloc[0], SR)
    loudest = int(np.argmax(np.abs(wave)))
    folder = tmp_path_factory.mktemp("variants")
    variants = {  # name -> (samples, rate, subtype, extension)
        "ten_minutes": (np.tile(wave, 120), SR, "PCM_16", "wav"),
        "shorter_than_a_window": (wave[max(0, loudest - SR // 10): loudest + SR // 10], SR,
                                  "PCM_16", "wav"),
        "stereo": (np.stack([wave, wave[::-1]], axis=1), SR, "PCM_16", "wav"),
        "float32": (wave, SR, "FLOAT", "wav"),
        "pcm24": (wave, SR, "PCM_24", "wav"),
        "mp3": (wave, SR, None, "mp3"),
        **{f"rate_{rate}": (librosa.resample(wave, orig_sr=SR, target_sr=rate), rate,
                            "PCM_16", "wav") for rate in (8_000, 16_000, 48_000)},
    }
    paths = {}
    for name, (samples, rate, subtype, extension) in variants.items():
        paths[name] = folder / f"{name}.{extension}"
        sf.write(paths[name], samples, rate, subtype=subtype)
    cache = FeatureCache(folder / "cache", FeatureConfig())
    stats = cache.compute(list(paths.values()), n_jobs=2, progress=False)
    assert stats.failures == {} and stats.n_computed == len(paths)
    return cache, paths, wave.size


@pytest.mark.parametrize("name", ["ten_minutes", "shorter_than_a_window", "stereo", "float32",
                                  "pcm24", "mp3", "rate_8000", "rate_16000", "rate_48000"])
def test_every_clip_shape_becomes_a_valid_cache_entry(clip_variants, name):
    cache, paths, clip_samples = clip_variants
    spec = cache.load(paths[name])
    assert_valid_entry(spec)
    if name == "ten_minutes":  # kept whole (trim only cuts the edges of the whole clip)
        assert spec.shape[1] > 0.98 * 120 * clip_samples / FeatureConfig().hop_length
    if name == "shorter_than_a_window":  # padded to exactly one window
        assert spec.shape[1] == 128


# --- 4. concurrency (its runs are also the uninterrupted references of part 3) ------------------

@dataclasses.dataclass
class ConcurrentRuns:
    uri: str
    cache_dir: Path
    runs: dict[int, str]  # seed -> run ID
    folders: dict[int, Path]  # seed -> artifact folder


@pytest.fixture(scope="module")
def concurrent(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> ConcurrentRuns:
    """Two stage-1 runs started together on a store that does not exist yet and a cold cache."""
    root = tmp_path_factory.mktemp("concurrent")
    uri, cache_dir = f"sqlite:///{root}/mlflow.db", root / "cache"
    children = {seed: Child.start([*STAGE1, "--data", str(small_data), "--seed", str(seed),
                                   "--cache-dir", str(cache_dir)], root, uri) for seed in SEEDS}
    for child in children.values():
        assert child.proc.wait(timeout=600) == 0, child.output()[-3000:]
    runs = {seed: child.output().rsplit("stage1 run: ", 1)[1].split()[0]
            for seed, child in children.items()}
    client = MlflowClient(uri)
    return ConcurrentRuns(uri, cache_dir, runs,
                          {seed: artifact_dir(client, run_id) for seed, run_id in runs.items()})


def test_two_runs_at_once_share_one_store_and_one_cache(concurrent):
    client = MlflowClient(concurrent.uri)
    expected = {f"folds/fold_{k}/{f}" for k in (0, 1) for f in ("model.pt", "scores.npz")}
    for seed, run_id in concurrent.runs.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["fat.complete"] == "true"
        assert run.data.params["train.seed"] == str(seed)
        assert fold_files(concurrent.folders[seed]) == expected
        assert {"lwlrap_noisy", "lwlrap_curated", "lwlrap_test"} <= set(run.data.metrics)
    first, second = (run_tables(concurrent.folders[seed])["oof/noisy.csv"] for seed in SEEDS)
    assert list(first["fname"]) == list(second["fname"])
    assert not np.allclose(first.iloc[:, 3:], second.iloc[:, 3:])  # each run kept its own
    folder = store_folder(concurrent.cache_dir, FeatureConfig())
    entries = cache_entries(folder)
    assert len(entries) == N_CLIPS and not list(folder.glob("*.tmp"))
    for spec in entries:
        assert_valid_entry(spec)


# --- 3 + 5. interruption for real, and reproducibility across processes --------------------------

@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_stage_resumes_at_its_fold_and_equals_the_uninterrupted_run(
        small_data, concurrent, tracking, tmp_path, sig):
    seed = SEEDS[0]
    args = [*STAGE1, "--data", str(small_data), "--seed", str(seed),
            "--cache-dir", str(concurrent.cache_dir)]
    child = Child.start(args, tmp_path, tracking)
    fold0 = "mlruns/*/*/artifacts/folds/fold_0/scores.npz"
    wait_for(lambda: any(map(reads_whole, tmp_path.glob(fold0))), child)  # fold 1 takes a second
    assert child.kill(sig) == -sig
    folder = next(tmp_path.glob(fold0)).parents[2]  # the run's artifacts
    assert fold_files(folder) == {"folds/fold_0/model.pt", "folds/fold_0/scores.npz"}
    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("folds/fold_0/*")}
    client = MlflowClient()
    run_id = folder.parent.name
    assert client.get_run(run_id).data.tags["fat.complete"] == "false"

    result = CliRunner().invoke(main, [*args, "--resume-run-id", run_id])
    assert result.exit_code == 0, result.output
    assert f"stage1 run: {run_id}" in result.output
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}  # fold 0 was not retrained
    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["fat.complete"] == "true"
    reference = MlflowClient(concurrent.uri).get_run(concurrent.runs[seed])
    for key in ("lwlrap_curated", "lwlrap_noisy", "lwlrap_test"):
        assert resumed.data.metrics[key] == pytest.approx(reference.data.metrics[key], abs=1e-6)
    # same seed + profile on CPU: the same predictions, to the last digit, across processes
    expected = run_tables(concurrent.folders[seed])
    for name, table in run_tables(folder).items():
        pd.testing.assert_frame_equal(table, expected[name], check_exact=True, obj=name)


def test_killed_pipeline_resumes_its_interrupted_stage_run(small_data, concurrent, tracking,
                                                          tmp_path):
    """`main` finds a stage run that was killed half-way (it is tagged with its inputs when
    it starts) and continues it at its first unfinished fold instead of starting over."""
    args = ["pipeline", "--profile", "tiny", "--set", "train.epochs=1", "--data", str(small_data),
            "--cache-dir", str(concurrent.cache_dir)]
    child = Child.start(args, tmp_path, tracking)
    fold0 = "mlruns/*/*/artifacts/folds/fold_0/scores.npz"
    wait_for(lambda: any(tmp_path.glob(fold0)), child)
    time.sleep(0.3)
    assert child.kill(signal.SIGKILL) == -signal.SIGKILL
    folder = next(tmp_path.glob(fold0)).parents[2]
    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("folds/fold_0/*")}
    request = StageRequest(stage="stage1", data=small_data,
                           profile=get_profile("tiny", {"train.epochs": "1"}),
                           cache_dir=concurrent.cache_dir, progress=False)
    configure_tracking()  # the experiment `fat-mlflow`, as the killed pipeline used
    with mlflow.start_run():
        run_id = run_or_reuse(request, dataset_fingerprint(load_dataset(small_data)))
    assert run_id == folder.parent.name
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}  # fold 0 was not retrained
    assert MlflowClient().get_run(run_id).data.tags["fat.complete"] == "true"


def test_killed_feature_run_leaves_only_whole_entries_and_is_reused(small_data, tracking,
                                                                     tmp_path):
    cache_dir = tmp_path / "cold-cache"
    cfg = get_profile("tiny").features
    folder = store_folder(cache_dir, cfg)
    child = Child.start(["features", "--data", str(small_data), "--profile", "tiny",
                         "--jobs", "2", "--cache-dir", str(cache_dir)], tmp_path, tracking)
    wait_for(lambda: (folder / INDEX_FILE).exists()
             and len(FeatureStore(folder).digests()) >= N_CLIPS // 2, child)
    assert child.kill(signal.SIGKILL) == -signal.SIGKILL
    time.sleep(0.2)  # the killed pool workers are gone too: nothing writes any more
    entries = cache_entries(folder)
    assert N_CLIPS // 2 <= len(entries) < N_CLIPS
    for spec in entries:
        assert_valid_entry(spec)

    stats = run_features(small_data, cfg, cache_dir, jobs=2, progress=False)
    assert (stats.n_reused, stats.n_computed, stats.n_failed) == (
        len(entries), N_CLIPS - len(entries), 0)
    assert len(cache_entries(folder)) == N_CLIPS


def test_fold_killed_while_its_scores_were_copied_counts_as_unfinished(tracking, tmp_path):
    """A kill in the middle of logging leaves a cut scores.npz: resume retrains that fold."""
    whole = tmp_path / "scores.npz"
    np.savez(whole, oof_noisy=np.ones((3, 2), np.float32))
    with mlflow.start_run() as run:
        for fold, payload in ((0, whole.read_bytes()), (1, whole.read_bytes()[:60])):
            folder = tmp_path / f"fold_{fold}"
            folder.mkdir()
            (folder / "model.pt").write_bytes(b"weights")
            (folder / "scores.npz").write_bytes(payload)
            mlflow.log_artifacts(str(folder), f"folds/fold_{fold}")
    finished = MlflowFoldStore(run.info.run_id, "cnn", 0.125, 2).finished_folds()
    assert list(finished) == [0]
    np.testing.assert_array_equal(finished[0].oof["noisy"], np.ones((3, 2)))


# --- 6. empty and degenerate data -------------------------------------------------------------

def edit_table(root: Path, table: str, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    """Rewrite one CSV of a dataset copy through `edit` (every cell read as text)."""
    path = root / table
    edit(pd.read_csv(path, dtype=str, keep_default_na=False)).to_csv(path, index=False)


@dataclasses.dataclass
class DegenerateRun:
    data: Path
    uri: str
    output: str
    runs: dict[str, str]  # stage -> run ID
    missing_class: str


@pytest.fixture(scope="module")
def degenerate_run(demo_data: Path, isolated_store,
                   tmp_path_factory: pytest.TempPathFactory) -> DegenerateRun:
    """One pipeline (`fat-mlflow pipeline`, 1 epoch per fold) on a small dataset with four
    degenerate traits at once: a class with no curated clip, a class with one (so one fold
    lacks it), no test clip at all (empty test/, header-only sample_submission.csv and
    test_truth.csv), and a threshold no clip reaches, so stage 3 selects nothing."""
    root = tmp_path_factory.mktemp("degenerate")
    data = subset_copy(demo_data, root / "data")
    curated = pd.read_csv(data / "train_curated.csv")
    missing = curated["labels"].iloc[0]
    lonely = next(label for label in curated["labels"] if label != missing)
    edit_table(data, "train_curated.csv",
               lambda t: t[(t["labels"] != missing)
                           & ~((t["labels"] == lonely) & t["labels"].duplicated())])
    for table in ("sample_submission.csv", "test_truth.csv"):
        edit_table(data, table, lambda t: t.iloc[:0])
    for clip in (data / "test").iterdir():
        clip.unlink()
    with isolated_store(root) as uri:
        result = CliRunner().invoke(main, ["pipeline", "--profile", "tiny", "--set",
                                           "train.epochs=1", "--data", str(data),
                                           "--threshold", "1.01"])
        assert result.exit_code == 0, result.output
        parent = result.output.rsplit("pipeline run ", 1)[1].split(":")[0]
        report = pd.read_csv(mlflow.artifacts.download_artifacts(
            run_id=parent, artifact_path="report/stage_table.csv"))
    return DegenerateRun(data, uri, result.output, dict(zip(report["stage"], report["run_id"])),
                         missing)


def test_empty_selection_trains_on_curated_clips_and_the_pipeline_registers(degenerate_run):
    output = degenerate_run.output
    assert ("stage3: no noisy clip selected (sqrt(lwlrap1 * lwlrap2) >= 1.01, at most 5 per "
            "label and fold); this stage trains on the curated clips alone") in output
    model3 = next(line for line in output.splitlines() if line.strip().startswith("cnn model3"))
    assert model3.split()[5] == "0"  # the report's selected_clips column
    assert "no test labels: the ensemble is not compared with the logistic floor" in output
    client = MlflowClient(degenerate_run.uri)
    stage3 = client.get_run(degenerate_run.runs["stage3"])
    assert stage3.data.tags["fat.complete"] == "true"
    assert stage3.data.metrics["selected_clips"] == 0
    folder = artifact_dir(client, stage3.info.run_id)
    assert (folder / "selection/selected.csv").read_text() == "fname,fold,score,labels\n"
    assert (pd.read_csv(folder / "selection/label_counts.csv")["selected"] == 0).all()
    assert fold_files(folder) >= {"folds/fold_0/model.pt", "folds/fold_1/model.pt"}
    assert client.get_run(degenerate_run.runs["stage4"]).data.tags["fat.complete"] == "true"
    version = client.get_model_version_by_alias("fat2019-tagger", "champion")
    assert version.run_id == degenerate_run.runs["ensemble"]


def test_a_class_without_curated_clip_still_trains(degenerate_run):
    dataset = load_dataset(degenerate_run.data)
    assert degenerate_run.missing_class in dataset.vocabulary
    assert not any(degenerate_run.missing_class in labels for labels in dataset.curated["labels"])
    client = MlflowClient(degenerate_run.uri)
    for stage in ("stage2", "stage3", "stage4"):
        run = client.get_run(degenerate_run.runs[stage])
        assert 0 < run.data.metrics["lwlrap_curated"] <= 1, stage
        oof = pd.read_csv(artifact_dir(client, run.info.run_id) / "oof/curated.csv")
        assert sorted(oof["fname"]) == sorted(dataset.curated["fname"])
        assert np.isfinite(oof[degenerate_run.missing_class]).all()


def test_a_fold_without_some_class_still_trains_and_scores(degenerate_run):
    client = MlflowClient(degenerate_run.uri)
    stage2 = client.get_run(degenerate_run.runs["stage2"])
    folder = artifact_dir(client, stage2.info.run_id)
    folds = pd.read_csv(folder / "folds.csv").query("set == 'curated'")
    labels = load_dataset(degenerate_run.data).curated.set_index("fname")["labels"]
    classes_per_fold = [{label for fname in part["fname"] for label in labels[fname]}
                        for _, part in folds.groupby("fold")]
    assert classes_per_fold[0] != classes_per_fold[1]  # some class sits in one fold only
    for fold in (0, 1):
        assert 0 < stage2.data.metrics[f"fold{fold}_lwlrap_curated"] <= 1


def test_a_dataset_without_test_clips_trains_and_registers_unscored(degenerate_run):
    assert load_dataset(degenerate_run.data).test.empty
    client = MlflowClient(degenerate_run.uri)
    for stage in ("stage1", "stage2", "stage3", "stage4"):
        run = client.get_run(degenerate_run.runs[stage])
        assert "lwlrap_test" not in run.data.metrics
        assert not (artifact_dir(client, run.info.run_id) / "test_scores.csv").exists()
    ensemble = client.get_run(degenerate_run.runs["ensemble"])
    assert ensemble.data.tags["fat.complete"] == "true"
    assert "lwlrap_test" not in ensemble.data.metrics
    version = client.get_model_version_by_alias("fat2019-tagger", "champion")
    assert "lwlrap_test" not in version.tags


def refusal(data: Path, *args: str) -> str:
    """`fat-mlflow ...` on data it cannot train: exit 1, ONE line, no traceback, and the
    tracking store (a SQLite file beside the data) not even created."""
    store = data.parent / "mlflow.db"
    result = CliRunner().invoke(main, [*args, "--data", str(data)],
                                env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}"})
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not store.exists()
    return result.output.strip()


def pipeline_refusal(data: Path, *options: str) -> str:
    return refusal(data, "pipeline", "--profile", "tiny", *options)


@pytest.mark.parametrize("noisy", ["header only", "no file"])
def test_an_empty_or_missing_noisy_set_stops_before_any_run(demo_data, tmp_path, noisy):
    data = subset_copy(demo_data, tmp_path / "data")
    if noisy == "header only":
        edit_table(data, "train_noisy.csv", lambda t: t.iloc[:0])
    else:
        (data / "train_noisy.csv").unlink()
    problem = "lists no clips" if noisy == "header only" else "not found"
    expected = (f"Error: DataLayoutError: {data / 'train_noisy.csv'}: {problem}; stage 1 "
                "trains on the noisy set")
    assert pipeline_refusal(data).startswith(expected)
    assert refusal(data, *STAGE1).startswith(expected)


@pytest.mark.parametrize("table, rows, options, message", [
    ("train_curated.csv", 1, [], "the curated set has 1 clip(s), fewer than the 2 folds"),
    ("train_curated.csv", 2, [], "the curated set: 2 clips in 2 folds leave fold 0 1 clip(s) "
                                 "to train on; a fold needs at least 2"),
    ("train_noisy.csv", 1, [], "the noisy set has 1 clip(s), fewer than the 2 folds"),
    ("train_noisy.csv", 24, ["--set", "train.n_folds=1"], "train.n_folds=1: cross-validation "
                                                          "needs at least 2 folds"),
], ids=["curated-1", "curated-2", "noisy-1", "one-fold"])
def test_sets_too_small_for_the_folds_stop_before_any_run(demo_data, tmp_path, table, rows,
                                                          options, message):
    data = subset_copy(demo_data, tmp_path / "data")
    edit_table(data, table, lambda t: t.head(rows))
    line = pipeline_refusal(data, *options)
    assert line.startswith("Error: FoldSplitError: ") and message in line
    assert "--set train.n_folds=N" in line or "n_folds=1" in line


def test_a_dataset_of_one_class_is_refused(demo_data, tmp_path):
    data = subset_copy(demo_data, tmp_path / "data")
    only = pd.read_csv(data / "train_curated.csv")["labels"].iloc[0]
    for table in ("train_curated.csv", "train_noisy.csv", "test_truth.csv"):
        edit_table(data, table, lambda t: t[t["labels"] == only])
    kept = set(pd.read_csv(data / "test_truth.csv")["fname"])
    edit_table(data, "sample_submission.csv", lambda t: t.loc[t["fname"].isin(kept),
                                                              ["fname", only]])
    assert pipeline_refusal(data) == (
        f"Error: DataLayoutError: {data / 'sample_submission.csv'}: one class ({only!r}); "
        "tagging ranks the classes of a clip against each other (lwlrap), so it needs at "
        "least two")
