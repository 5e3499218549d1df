"""What a stage run is asked to do and what it reads, before any training.

The request (`StageRequest`, with `--folds` specs), the dataset's training and test sets,
their cached features and fold assignment (inherited from the run a stage builds on), and the
checks of those runs: a stage that cannot train stops here, before it starts a run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.entities import Run

from fat_mlflow.config import RUNTIME_SETTINGS, Profile, TrainConfig
from fat_mlflow.data.features import BadAudioError, FeatureCache
from fat_mlflow.data.layout import DataLayoutError, FatDataset, dataset_fingerprint, load_dataset
from fat_mlflow.engine.crossval import ClipSet
from fat_mlflow.engine.folds import assign_folds, folds_for
from fat_mlflow.warmup.tracking import (
    FOLDS_ARTIFACT,
    TAG_ARCH,
    RunLookupError,
    check_source_run,
    configure_tracking,
    read_table,
)

STAGES = ("stage1", "stage2", "stage3", "stage4")
WARM_START_FROM = {"stage2": "stage1", "stage3": "stage2", "stage4": "stage3"}
SELECTION_SOURCES = {"stage3": ("stage1", "stage2"), "stage4": ("stage3",)}
# Settings that say where and how fast a stage trains, not what: jobs of one stage may differ.
RUNTIME_PARAMS = RUNTIME_SETTINGS | {"stage.data"}
SKIP_HINT = ("fix or remove them, or pass --bad-audio skip to leave them out (they are then "
             "logged as the artifact bad_audio.csv)")


@dataclass
class StageRequest:
    """What one stage run is asked to do; the CLI and the pipeline build these."""

    stage: str
    data: Path
    profile: Profile
    init_run_id: str | None = None
    selection_run_ids: list[str] = field(default_factory=list)
    resume_run_id: str | None = None
    threshold: float = 0.5
    max_per_label_per_fold: int = 5
    cache_dir: Path | None = None
    bad_audio: str = "stop"  # or "skip"
    pipeline_run_id: str | None = None
    progress: bool = True
    folds: list[int] | None = None  # None: the whole stage; else a fold job ([] = prepare only)
    tags: dict[str, str] = field(default_factory=dict)  # extra tags, set when the run starts


def parse_folds(spec: str, n_folds: int) -> list[int] | None:
    """`--folds` text -> fold numbers: "all" (None: the whole stage), "none" ([]: only
    prepare the stage run), or numbers and ranges such as "0-4", "0,2,5", "0-2,7"."""
    text = spec.strip().lower()
    if text == "all":
        return None
    if text == "none":
        return []
    folds: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low, high = int(first), int(last if dash else first)
        except ValueError:
            raise ValueError(f"folds {spec!r}: {part.strip()!r} is not a fold number or a range "
                             "like 0-4 (or use 'all' / 'none')") from None
        if low > high:
            raise ValueError(f"folds {spec!r}: the range {part.strip()} runs backwards")
        outside = [fold for fold in (low, high) if not 0 <= fold < n_folds]
        if outside:
            raise ValueError(f"folds {spec!r}: fold {outside[0]} does not exist; this profile "
                             f"has {n_folds} folds, numbered 0-{n_folds - 1}")
        folds.update(range(low, high + 1))
    return sorted(folds)


def format_folds(folds: list[int]) -> str:
    """The shortest `--folds` text for a list of folds: [0, 1, 2, 5] -> "0-2,5"."""
    parts: list[str] = []
    for fold in sorted(folds):
        if parts and fold == int(parts[-1].rpartition("-")[2]) + 1:
            parts[-1] = f"{parts[-1].partition('-')[0]}-{fold}"
        else:
            parts.append(str(fold))
    return ",".join(parts) or "none"


@dataclass
class StageData:
    """What a stage trains and scores on, loaded: features by set, folds, undecodable clips."""

    dataset: FatDataset
    fingerprint: str
    sets: dict[str, ClipSet]
    test: ClipSet | None
    bad_audio: dict[str, str]


def training_sets(dataset: FatDataset) -> dict[str, pd.DataFrame]:
    """The sets a stage splits into folds; a train_noisy.csv without clips counts as absent."""
    sets = {"curated": dataset.curated}
    if dataset.has_noisy and len(dataset.noisy):
        sets["noisy"] = dataset.noisy
    return sets


def require_noisy(stage: str, dataset: FatDataset) -> None:
    """Stage 1 trains on the noisy set alone: without noisy clips it stops before any run."""
    if stage != "stage1" or "noisy" in training_sets(dataset):
        return
    problem = "lists no clips" if dataset.has_noisy else "not found"
    raise DataLayoutError(f"{dataset.root / 'train_noisy.csv'}: {problem}; stage 1 trains on "
                          "the noisy set, and every later stage builds on stage 1")


def new_folds(dataset: FatDataset, sets: dict[str, pd.DataFrame], cfg: TrainConfig) -> pd.DataFrame:
    """A fresh fold assignment of `sets`; FoldSplitError when a fold would have too few clips."""
    return assign_folds({name: (frame["fname"], dataset.targets(frame))
                         for name, frame in sets.items()}, cfg.n_folds, cfg.seed)


def check_pipeline_data(dataset: FatDataset, profile: Profile) -> None:
    """Stage 1's checks without computing features, so a pipeline that cannot train stops
    before it starts any run: a noisy set, and folds that leave every fold model clips."""
    require_noisy("stage1", dataset)
    new_folds(dataset, training_sets(dataset), profile.train)


def load_stage_data(request: StageRequest, dataset: FatDataset,
                    folds: pd.DataFrame | None) -> tuple[StageData, pd.DataFrame]:
    """Cached features + fold assignment (reused when an earlier run gave one)."""
    cache = FeatureCache(request.cache_dir, request.profile.features)
    frames = {**training_sets(dataset), "test": dataset.test}
    stats = cache.compute([p for frame in frames.values() for p in frame["path"]],
                          progress=request.progress)
    if stats.failures and request.bad_audio != "skip":
        raise BadAudioError(stats.failures, SKIP_HINT)
    bad = {str(p) for p in stats.failures}
    frames = {name: frame[~frame["path"].astype(str).isin(bad)].reset_index(drop=True)
              for name, frame in frames.items()}
    training = {name: frames[name] for name in ("curated", "noisy") if name in frames}
    if folds is None:
        folds = new_folds(dataset, training, request.profile.train)
    sets = {name: ClipSet(name, list(frame["fname"]), cache.open(frame["path"]),
                          dataset.targets(frame), folds_for(folds, name, frame["fname"]))
            for name, frame in training.items()}
    test_frame = frames["test"]
    test = None
    if len(test_frame):
        targets = (dataset.targets(test_frame) if dataset.has_test_truth
                   else np.zeros((len(test_frame), len(dataset.vocabulary)), np.float32))
        test = ClipSet("test", list(test_frame["fname"]), cache.open(test_frame["path"]),
                       targets, np.full(len(test_frame), -1))
    data = StageData(dataset, dataset_fingerprint(dataset), sets, test, stats.failures)
    return data, folds


def check_sources(request: StageRequest, fingerprint: str) -> None:
    """Validate every run ID the stage builds on before any feature is computed."""
    expected = SELECTION_SOURCES.get(request.stage, ())
    if len(request.selection_run_ids) != len(expected):
        raise RunLookupError(
            f"{request.stage} selects noisy clips with {len(expected) or 'no'} earlier run(s) "
            f"({', '.join(expected) or '-'}); got {len(request.selection_run_ids)}"
        )
    for run_id, stage in zip(request.selection_run_ids, expected):
        check_source_run(run_id, (stage,), fingerprint)
    if request.init_run_id:
        previous = WARM_START_FROM.get(request.stage)
        init_run = check_source_run(request.init_run_id,
                                    (previous,) if previous else STAGES, fingerprint)
        arch = request.profile.train.arch
        if init_run.data.tags.get(TAG_ARCH) != arch:
            raise RunLookupError(f"run {request.init_run_id} trained "
                                 f"{init_run.data.tags.get(TAG_ARCH)}, this stage trains {arch}: "
                                 "warm start needs the same network")
    if request.resume_run_id:
        run = check_source_run(request.resume_run_id, (request.stage,), fingerprint,
                               need_complete=False)
        _check_same_inputs(request, run)


def _check_same_inputs(request: StageRequest, run: Run) -> None:
    """A resumed or joined run must be trained with the settings it was started with."""
    differences = [f"{key}: the run has {run.data.params.get(key)!r}, this one {str(value)!r}"
                   for key, value in input_params(request).items()
                   if key not in RUNTIME_PARAMS and run.data.params.get(key) != str(value)]
    if differences:
        raise RunLookupError(
            f"run {run.info.run_id} was started with other settings, and its folds must all "
            "be trained alike; use its settings (see its parameters):\n  "
            + "\n  ".join(differences))


def input_params(request: StageRequest) -> dict:
    """The stage run's parameters: everything that decides what its folds learn."""
    # "stage." keys: `mlflow run` already logged the raw entry-point parameters by name
    return {**request.profile.flat(), "stage.data": str(request.data),
            "stage.init_run_id": request.init_run_id or "",
            "stage.selection_run_ids": ",".join(request.selection_run_ids),
            "stage.threshold": request.threshold,
            "stage.max_per_label_per_fold": request.max_per_label_per_fold,
            "stage.bad_audio": request.bad_audio}


def _source_folds(request: StageRequest) -> pd.DataFrame | None:
    """Later stages inherit the fold assignment of the run they build on."""
    for run_id in [request.resume_run_id, request.init_run_id, *request.selection_run_ids]:
        if run_id:
            return read_table(run_id, FOLDS_ARTIFACT)
    return None


def load_stage_inputs(request: StageRequest) -> tuple[StageData, pd.DataFrame]:
    """Validate the request and its source runs, then load features and folds."""
    if request.stage not in STAGES:
        raise ValueError(f"unknown stage {request.stage!r}; one of {', '.join(STAGES)}")
    dataset = load_dataset(request.data)
    require_noisy(request.stage, dataset)
    configure_tracking()
    check_sources(request, dataset_fingerprint(dataset))
    return load_stage_data(request, dataset, _source_folds(request))
