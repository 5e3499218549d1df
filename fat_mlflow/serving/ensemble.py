"""The seed's last stage: stage runs -> one registered pyfunc model (FatTagger).

Source runs are named by run ID; their fold checkpoints, feature settings and vocabulary are
read back from the tracking store. Runs must be finished stage runs of one dataset, with the
same feature settings and vocabulary (a model trained on other spectrograms or classes cannot
be averaged with the rest).

Alias rule (`takes_alias`): every call registers a new version; the alias moves to it when
there is no alias holder yet, or when the new version has a test lwlrap and the holder has
none, or when both were scored on the same test set (same dataset fingerprint) and the new
score is not worse. A version without test labels, or scored on another test set, never
displaces a holder: scores of different test sets are not comparable, so that move is left
to a person (`MlflowClient().set_registered_model_alias`).
"""
from __future__ import annotations

import base64
import io
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import librosa
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
import soundfile as sf
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from fat_mlflow.config import FeatureConfig
from fat_mlflow.data.audio import load_audio
from fat_mlflow.data.features import BadAudioError
from fat_mlflow.data.layout import FatDataset, dataset_fingerprint, load_dataset
from fat_mlflow.engine.metrics import lwlrap, per_class_lwlrap
from fat_mlflow.memory import peak_memory
from fat_mlflow.plots import plot_per_class
from fat_mlflow.serving.baseline import floor_test_lwlrap
from fat_mlflow.serving.submission import score_files
from fat_mlflow.serving.tagger import (
    BASE64_COLUMN,
    ERROR_COLUMN,
    EnsembleSpec,
    MemberRun,
    load_local_model,
    pyfunc_arguments,
)
from fat_mlflow.warmup.stage_inputs import SKIP_HINT, STAGES
from fat_mlflow.warmup.tracking import (
    PROFILE_ARTIFACT,
    TAG_ARCH,
    TAG_COMPLETE,
    TAG_DATASET,
    TAG_STAGE,
    VOCABULARY_ARTIFACT,
    RunLookupError,
    check_source_run,
    configure_tracking,
    fold_model_path,
    get_run,
    log_bad_audio,
    log_table,
    read_json,
)

EXAMPLE_SECONDS = 2.0
TAG_LWLRAP = "lwlrap_test"
TAG_SOURCES = "source_run_ids"
TAG_FLOOR = "floor_lwlrap_test"  # the logistic floor on the same test clips
TAG_BEATS_FLOOR = "fat.beats_floor"  # "false": not yet worth serving (fat_mlflow.serving.baseline)


@dataclass(frozen=True)
class SourceRun:
    """What the ensemble needs to know about one stage run."""

    run_id: str
    stage: str
    arch: str
    features: FeatureConfig
    vocabulary: tuple[str, ...]
    n_folds: int
    window: int
    step: int
    batch_size: int
    dataset: str
    data: str


@dataclass(frozen=True)
class VersionScore:
    """A registered version's test lwlrap (None: never scored) and the test set it used."""

    lwlrap: float | None
    dataset: str | None


def read_source_run(run_id: str, dataset: str | None) -> SourceRun:
    """A finished stage run; with `dataset`, it must have been trained on that dataset."""
    run = get_run(run_id)
    check_source_run(run_id, STAGES, dataset or run.data.tags.get(TAG_DATASET, ""))
    profile = read_json(run_id, PROFILE_ARTIFACT)
    features = FeatureConfig(**{key.removeprefix("features."): value
                                for key, value in profile.items() if key.startswith("features.")})
    return SourceRun(
        run_id=run_id, stage=run.data.tags[TAG_STAGE], arch=run.data.tags.get(TAG_ARCH, ""),
        features=features, vocabulary=tuple(read_json(run_id, VOCABULARY_ARTIFACT)),
        n_folds=int(profile["train.n_folds"]), window=int(profile["train.crop_frames"]),
        step=int(profile["train.window_step"]), batch_size=int(profile["train.eval_batch_size"]),
        dataset=run.data.tags.get(TAG_DATASET, ""), data=run.data.params.get("stage.data", ""),
    )


def read_source_runs(run_ids: list[str], dataset: str | None) -> list[SourceRun]:
    """All runs, checked to share dataset, feature settings and vocabulary."""
    if not run_ids:
        raise RunLookupError("the ensemble needs at least one stage run ID")
    if len(set(run_ids)) != len(run_ids):
        raise RunLookupError(f"run IDs given twice: {sorted({r for r in run_ids if run_ids.count(r) > 1})}")
    first = read_source_run(run_ids[0], dataset)
    sources = [first] + [read_source_run(run_id, first.dataset) for run_id in run_ids[1:]]
    for other in sources[1:]:
        if other.features != first.features:
            raise RunLookupError(
                f"run {other.run_id} used other feature settings than run {first.run_id} "
                f"({other.features} vs {first.features}); an ensemble shares one preprocessing")
        if other.vocabulary != first.vocabulary:
            raise RunLookupError(
                f"run {other.run_id} predicts other classes than run {first.run_id} "
                f"({len(other.vocabulary)} vs {len(first.vocabulary)} classes, or another order)")
    return sources


def ensemble_spec(sources: list[SourceRun],
                  folder: Path) -> tuple[EnsembleSpec, dict[str, str]]:
    """The spec and the pyfunc artifacts: every fold checkpoint, downloaded from its run into
    `folder` (the caller's, removed with it)."""
    artifacts: dict[str, str] = {}
    members = []
    for index, source in enumerate(sources):
        keys = []
        for fold in range(source.n_folds):
            key = f"run{index}_fold{fold}"
            artifacts[key] = str(fold_model_path(source.run_id, fold, folder / key))
            keys.append(key)
        members.append(MemberRun(source.run_id, source.stage, source.arch, source.window,
                                 source.step, tuple(keys)))
    spec = EnsembleSpec(features=sources[0].features, vocabulary=sources[0].vocabulary,
                        members=tuple(members), batch_size=min(s.batch_size for s in sources))
    return spec, artifacts


def example_request(path: Path, sample_rate: int) -> pd.DataFrame:
    """A short real clip as the base64 FLAC a client would send (the model's input example)."""
    wave, _ = librosa.effects.trim(load_audio(path, sample_rate))
    buffer = io.BytesIO()
    sf.write(buffer, wave[: int(EXAMPLE_SECONDS * sample_rate)], sample_rate, format="FLAC")
    return pd.DataFrame({BASE64_COLUMN: [base64.b64encode(buffer.getvalue()).decode("ascii")]})


@dataclass(frozen=True)
class Evaluation:
    """A logged ensemble scored on the test clips (those that could be decoded)."""

    lwlrap: float
    per_class: pd.Series
    scores: pd.DataFrame  # fname + one column per class
    failures: dict[str, str]  # path -> why the clip could not be scored


def evaluate(model: mlflow.pyfunc.PyFuncModel, dataset: FatDataset, progress: bool = True,
             bad_audio: str = "stop") -> Evaluation:
    """Test lwlrap, per-class lwlrap and the test scores of a logged ensemble. A clip that
    cannot be scored stops it (BadAudioError, every clip listed), or with `bad_audio` "skip"
    is left out and reported in `failures`."""
    scored = score_files(model, dataset.test["path"], progress=progress).reset_index(drop=True)
    failed = (scored[ERROR_COLUMN] != "").to_numpy()
    failures = dict(zip(dataset.test["path"].astype(str)[failed], scored[ERROR_COLUMN][failed]))
    if failures and bad_audio != "skip":
        raise BadAudioError(failures, SKIP_HINT)
    test = dataset.test[~failed]
    scores = scored.loc[~failed, dataset.vocabulary].to_numpy()
    truth = dataset.targets(test)
    per_class, _ = per_class_lwlrap(truth, scores)
    table = scored.loc[~failed, dataset.vocabulary].reset_index(drop=True)
    table.insert(0, "fname", test["fname"].to_numpy())
    return Evaluation(lwlrap(truth, scores), pd.Series(per_class, index=dataset.vocabulary),
                      table, failures)


def takes_alias(new: VersionScore, holder: VersionScore | None) -> bool:
    """The alias rule of this module's docstring."""
    if holder is None:
        return True
    if new.lwlrap is None:
        return False
    if holder.lwlrap is None:
        return True
    return new.dataset == holder.dataset and new.lwlrap >= holder.lwlrap


def alias_holder(client: MlflowClient, name: str, alias: str) -> VersionScore | None:
    """The score of the version holding `alias`, None when no version holds it."""
    holder = client.get_registered_model(name).aliases.get(alias)
    if holder is None:
        return None
    version = client.get_model_version(name, holder)
    score = version.tags.get(TAG_LWLRAP)
    return VersionScore(float(score) if score else None, version.tags.get(TAG_DATASET))


def build_ensemble(run_ids: list[str], registered_model: str = "fat2019-tagger",
                   alias: str = "champion", data: Path | str | None = None,
                   progress: bool = True, cache_dir: Path | None = None,
                   bad_audio: str = "stop") -> tuple[str, str]:
    """Log the ensemble of `run_ids` as one pyfunc model, score it, register a new version.

    `data` (FAT2019 layout) must be the dataset the runs were trained on; when it has
    test_truth.csv the ensemble's lwlrap_test decides the alias, and the logistic floor
    (fat_mlflow.serving.baseline) is scored beside it on the same clips, from the feature cache in
    `cache_dir`. Test clips that cannot be decoded stop it, or with `bad_audio` "skip" are
    left out of both scores and logged as `bad_audio.csv`. Returns (ensemble run ID,
    registered version number).
    """
    configure_tracking()
    dataset = load_dataset(data) if data else None
    fingerprint = dataset_fingerprint(dataset) if dataset else None
    sources = read_source_runs(list(run_ids), fingerprint)
    fingerprint = sources[0].dataset
    example_data = dataset or _dataset_of(sources[0])
    with tempfile.TemporaryDirectory(prefix="fat-ensemble-") as tmp, \
            mlflow.start_run(run_name="ensemble", nested=mlflow.active_run() is not None) as run:
        spec, artifacts = ensemble_spec(sources, Path(tmp) / "checkpoints")
        mlflow.set_tags({TAG_STAGE: "ensemble", TAG_DATASET: fingerprint,
                         TAG_COMPLETE: "false"})
        mlflow.log_params({"source_run_ids": ",".join(run_ids), "registered_model": registered_model,
                           "alias": alias, "n_fold_models": len(artifacts),
                           "data": str(data or "")})
        info = mlflow.pyfunc.log_model(
            name="tagger", **pyfunc_arguments(spec, Path(tmp) / "ensemble.json", artifacts),
            input_example=(example_request(example_clip(example_data),
                                           spec.features.sample_rate)
                           if example_data is not None else None),
        )
        score, floor = None, None
        if dataset is not None and dataset.has_test_truth:
            with peak_memory() as peak:
                score = _log_evaluation(info, dataset, progress, bad_audio)
            mlflow.log_metrics(peak.metrics)
            with peak_memory("floor_") as peak:
                floor = _log_floor(dataset, spec.features, cache_dir, score, bad_audio)
            mlflow.log_metrics(peak.metrics)
        version = register_version(info.model_uri, registered_model, alias,
                            VersionScore(score, fingerprint), run_ids, floor)
        mlflow.set_tag(TAG_COMPLETE, "true")
    return run.info.run_id, version


def example_clip(dataset: FatDataset) -> Path:
    """The first test clip, or the first curated one of a dataset without test clips."""
    clips = dataset.test["path"] if len(dataset.test) else dataset.curated["path"]
    return clips.iloc[0]


def _dataset_of(source: SourceRun) -> FatDataset | None:
    """The dataset a run was trained on, when it is still on disk (for the input example)."""
    try:
        return load_dataset(source.data) if source.data else None
    except ValueError:
        return None


def _log_evaluation(info: mlflow.models.model.ModelInfo, dataset: FatDataset,
                    progress: bool, bad_audio: str) -> float:
    started = time.perf_counter()
    result = evaluate(load_local_model(info.model_uri), dataset, progress, bad_audio)
    mlflow.log_metric("lwlrap_test", result.lwlrap, model_id=info.model_id)
    mlflow.log_metric("evaluation_seconds", time.perf_counter() - started)
    log_table(result.scores, "test_scores.csv")
    log_table(result.per_class.rename("lwlrap").rename_axis("label").reset_index(),
              "per_class_lwlrap.csv")
    log_bad_audio(result.failures)
    figure = plot_per_class(result.per_class, title=f"ensemble: test lwlrap {result.lwlrap:.3f}")
    mlflow.log_figure(figure, "per_class_lwlrap.png")
    plt.close(figure)
    return result.lwlrap


def _log_floor(dataset: FatDataset, features: FeatureConfig, cache_dir: Path | None,
               score: float, bad_audio: str) -> float | None:
    """The floor's test lwlrap (the better of its two training sets) beside the ensemble's."""
    started = time.perf_counter()
    floors, failures = floor_test_lwlrap(dataset, features, cache_dir, bad_audio)
    mlflow.log_metric("floor_seconds", time.perf_counter() - started)
    log_bad_audio(failures, "floor_bad_audio.csv")
    if not floors:
        return None
    mlflow.log_metrics({f"floor_lwlrap_{name}": value for name, value in floors.items()})
    floor = max(floors.values())
    mlflow.log_metric("lwlrap_test_above_floor", score - floor)
    mlflow.set_tag(TAG_BEATS_FLOOR, str(score > floor).lower())
    mlflow.set_tag(MLFLOW_RUN_NOTE, floor_sentence(score, floor))
    return floor


def floor_sentence(score: float, floor: float) -> str:
    """The run's and the model version's description: the floor comparison in words."""
    if score > floor:
        return (f"Test lwlrap {score:.3f}, {score - floor:.3f} above the logistic floor "
                f"({floor:.3f}) trained on the same clips.")
    return (f"Test lwlrap {score:.3f} is BELOW the logistic floor ({floor:.3f}) trained on the "
            f"same clips: a linear model on clip-level log-mel statistics tags this test set "
            f"better; not yet worth serving.")


def register_version(model_uri: str, name: str, alias: str, score: VersionScore,
              run_ids: list[str], floor: float | None) -> str:
    tags = {TAG_SOURCES: ",".join(run_ids), TAG_DATASET: score.dataset or ""}
    if score.lwlrap is not None:
        tags[TAG_LWLRAP] = repr(score.lwlrap)  # full precision: ties compare exactly
    if floor is not None:
        tags[TAG_FLOOR] = repr(floor)
        tags[TAG_BEATS_FLOOR] = str(score.lwlrap > floor).lower()
    version = mlflow.register_model(model_uri, name, tags=tags)
    client = MlflowClient()
    if floor is not None:
        client.update_model_version(name, version.version,
                                    description=floor_sentence(score.lwlrap, floor))
    moved = takes_alias(score, alias_holder(client, name, alias))
    if moved:
        client.set_registered_model_alias(name, alias, version.version)
    mlflow.set_tag("fat.alias_moved", str(moved).lower())
    return str(version.version)


# the training sets of `floor_test_lwlrap`, as it names them
FLOOR_TRAINING_SETS = ("curated", "curated_noisy")


def build_and_register(run_ids: list[str], data: Path, registered_model: str,
                       cache_dir: Path | None, bad_audio: str = "stop") -> dict:
    """The pipeline's ensemble step (`run_pipeline`): build and register the ensemble of
    `run_ids`, and return its row of the stage report, the floor's test lwlrap beside it."""
    run_id, version = build_ensemble(run_ids, registered_model=registered_model, data=data,
                                     cache_dir=cache_dir, bad_audio=bad_audio)
    metrics = MlflowClient().get_run(run_id).data.metrics
    return {"model": "ensemble", "arch": "all",
            "stage": "ensemble", "run_id": run_id, "lwlrap_test": metrics.get("lwlrap_test"),
            **{f"floor_lwlrap_{name}": metrics.get(f"floor_lwlrap_{name}", np.nan)
               for name in FLOOR_TRAINING_SETS},
            "registered_version": version}


def floors_by_training_set(ensemble_record: Mapping) -> dict[str, float]:
    """The floor's test lwlrap by training set ("curated_noisy"), where the ensemble scored it."""
    values = {name: ensemble_record.get(f"floor_lwlrap_{name}") for name in FLOOR_TRAINING_SETS}
    return {name: float(value) for name, value in values.items()
            if value is not None and pd.notna(value)}


def scored_floors(ensemble_row: pd.Series) -> dict[str, float]:
    """The floor's test lwlrap under display names ("curated + noisy")."""
    return {name.replace("_", " + "): value
            for name, value in floors_by_training_set(ensemble_row).items()}


def ensemble_row(table: pd.DataFrame) -> pd.Series | None:
    """The ensemble's row of a stage report (None without one)."""
    rows = table[table["model"] == "ensemble"]
    return rows.iloc[0] if len(rows) else None


def with_floor_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The stage report plus the logistic floor's test lwlrap as rows at its end."""
    row = ensemble_row(table)
    floors = [{"model": f"floor ({name})", "lwlrap_test": value}
              for name, value in (scored_floors(row) if row is not None else {}).items()]
    return pd.concat([table, pd.DataFrame(floors)], ignore_index=True) if floors else table


def floor_verdict(ensemble_row: pd.Series) -> str:
    """One line: the ensemble's test lwlrap against the logistic floor on the same clips."""
    floors = scored_floors(ensemble_row)
    score = ensemble_row.get("lwlrap_test")
    if not floors or pd.isna(score):
        return "no test labels: the ensemble is not compared with the logistic floor"
    floor = max(floors.values())
    shown = ", ".join(f"{value:.3f} trained on {name}" for name, value in floors.items())
    verdict = f"beats it by {score - floor:.3f}" if score > floor else \
        f"DOES NOT beat it (short by {floor - score:.3f}): not yet worth serving"
    return f"ensemble test lwlrap {score:.3f}; logistic floor {shown}: the ensemble {verdict}"
