"""Knowledge distillation: the registered ensemble -> one student network, registered beside it.

The ensemble (every fold model of stages 2-4) is what a leaderboard wants and what a server
pays for on every request. The student is one network trained on the ensemble's soft scores:
every window of the curated, noisy and (unlabelled) test clips, the curated windows' targets
blended with their labels (`DistillConfig`). It reads the ensemble like every stage reads its
inputs, by registered version (`models:/fat2019-tagger@champion`) or ensemble run ID, and
is logged as the same pyfunc model (a one-member `EnsembleSpec`: same request and answer,
signature, input example, path policy and pinned environment), registered as its own model
(`fat2019-tagger-fast`) under the ensemble's alias rule. Its run logs the curve, the test
lwlrap beside the teacher's and the floor's, its size and FLOPs beside the teacher's.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import nn

from fat_mlflow.config import AugmentConfig, DistillConfig, TrainConfig
from fat_mlflow.data.features import BadAudioError, FeatureCache
from fat_mlflow.data.layout import FatDataset, dataset_fingerprint, load_dataset
from fat_mlflow.engine.models import (
    build_model,
    count_parameters,
    flops_per_sample,
    load_checkpoint,
    save_checkpoint,
)
from fat_mlflow.engine.models.slimming import slimmed
from fat_mlflow.engine.precision import Precision
from fat_mlflow.engine.predict import scored_window_batches, window_positions
from fat_mlflow.engine.spectrograms import ClipSpectrograms, WindowSpectrograms
from fat_mlflow.engine.timing import PhaseClock
from fat_mlflow.engine.training import EpochLog, train_fold, training_precision
from fat_mlflow.memory import peak_memory
from fat_mlflow.serving.ensemble import (
    SourceRun,
    VersionScore,
    ensemble_spec,
    evaluate,
    example_clip,
    example_request,
    read_source_runs,
    register_version,
)
from fat_mlflow.serving.tagger import (
    EnsembleSpec,
    MemberRun,
    load_local_model,
    load_members,
    pyfunc_arguments,
)
from fat_mlflow.warmup.stage_inputs import SKIP_HINT
from fat_mlflow.warmup.tracking import (
    TAG_COMPLETE,
    TAG_DATASET,
    TAG_STAGE,
    RunLookupError,
    check_source_run,
    configure_tracking,
    fold_lwlrap_metric,
    get_run,
    log_bad_audio,
    log_table,
)

FAST_MODEL = "fat2019-tagger-fast"
TAG_TEACHER = "fat.teacher_run_id"
STUDENT_ARTIFACT = "student"
EXAMPLE_CLIP_SECONDS = 5.0  # the FLOPs of one served clip are counted for a clip this long
# no augmentation: the target is the teacher's score of exactly this window
NO_AUGMENT = AugmentConfig(mixup=False, specmix=False, zoom=False, lighting=False)


@dataclass(frozen=True)
class Teacher:
    """A finished ensemble run, as the student needs it."""

    run_id: str
    sources: list[SourceRun]
    data: str
    dataset: str  # fingerprint
    lwlrap: float | None
    floor: float | None


@dataclass(frozen=True)
class DistillRequest:
    teacher: str  # models:/NAME@ALIAS, models:/NAME/VERSION, or an ensemble run ID
    config: DistillConfig = DistillConfig()
    data: Path | None = None  # None: where the ensemble's stages were trained
    registered_model: str = FAST_MODEL
    alias: str = "champion"
    cache_dir: Path | None = None
    bad_audio: str = "stop"
    progress: bool = True


def teacher_run_id(reference: str) -> str:
    """The ensemble run behind a registered version (`models:/NAME@ALIAS` or
    `models:/NAME/VERSION`), or `reference` itself when it is a run ID."""
    if not reference.startswith("models:/"):
        return reference
    name, alias_sep, alias = reference.removeprefix("models:/").partition("@")
    client = MlflowClient()
    try:
        if alias_sep:
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = name.partition("/")
            version = client.get_model_version(name, number)
    except MlflowException as error:
        raise RunLookupError(f"{reference}: no such registered model version in "
                             f"{mlflow.get_tracking_uri()} ({error.message})") from error
    return version.run_id


def read_teacher(reference: str) -> Teacher:
    """The finished ensemble run `reference` names, with its stage runs checked."""
    run_id = teacher_run_id(reference)
    dataset = get_run(run_id).data.tags.get(TAG_DATASET, "")
    run = check_source_run(run_id, ("ensemble",), dataset, need_complete=False)
    if run.data.tags.get(TAG_COMPLETE) != "true":
        raise RunLookupError(f"ensemble run {run_id} did not finish; build the ensemble again")
    sources = read_source_runs(run.data.params["source_run_ids"].split(","), dataset)
    floors = [value for key, value in run.data.metrics.items()
              if key.startswith("floor_lwlrap_")]
    return Teacher(run_id, sources, run.data.params.get("data", ""), dataset,
                   run.data.metrics.get("lwlrap_test"), max(floors) if floors else None)


def training_clips(dataset: FatDataset, cfg: DistillConfig) -> pd.DataFrame:
    """The clips whose windows the student learns from; `labelled`: curated (labels blend in)."""
    parts = [dataset.curated.assign(labelled=True)]
    if cfg.with_noisy and dataset.has_noisy:
        parts.append(dataset.noisy.assign(labelled=False))
    if cfg.with_test and len(dataset.test):
        parts.append(dataset.test.assign(labelled=False))
    return pd.concat(parts, ignore_index=True)


def teacher_window_scores(members: list[tuple[list[nn.Module], MemberRun]],
                          specs: ClipSpectrograms, window: int, step: int, cover_end: bool,
                          batch_size: int, precision: Precision) -> np.ndarray:
    """(windows, classes): the ensemble's score of every window, as the served ensemble
    averages it (over each run's folds, then over runs)."""
    per_run = [np.concatenate([probs for probs, _ in scored_window_batches(
        models, specs, window, step, batch_size, precision, cover_end)])
        for models, _ in members]
    return np.mean(per_run, axis=0).astype(np.float32)


def blended_targets(soft: np.ndarray, labels: np.ndarray, labelled: np.ndarray,
                    label_weight: float) -> np.ndarray:
    """The teacher's scores; on labelled windows label_weight * label + the rest teacher."""
    targets = soft.copy()
    targets[labelled] = label_weight * labels[labelled] + (1 - label_weight) * soft[labelled]
    return targets


def initial_student(cfg: DistillConfig, teacher_folds: dict[str, str],
                    members: tuple[MemberRun, ...], n_classes: int,
                    fold_scores: dict[str, float]) -> tuple[nn.Module, str]:
    """The student's starting weights and where they come from: with `warm_start`, the
    latest stage's fold model of the same network with the best out-of-fold lwlrap
    (`fold_scores`, by checkpoint key; the first fold when none is known), slimmed to the
    student's width when it is narrower (its strongest channels kept); from scratch when no
    stage's network is as wide. Two epochs at a low rate keep the student near its start, so
    the start matters: the folds of one stage differ by up to 0.05 test lwlrap."""
    fresh = build_model(cfg.arch, n_classes, cfg.width)
    if cfg.warm_start:
        for member in reversed(members):
            if member.arch != cfg.arch:
                continue
            fold = max(range(len(member.checkpoints)),
                       key=lambda k: fold_scores.get(member.checkpoints[k], -np.inf))
            candidate = load_checkpoint(teacher_folds[member.checkpoints[fold]])
            if _fits_inside(fresh, candidate):
                how = "" if _widths_equal(fresh, candidate) else ", slimmed"
                return (slimmed(candidate, fresh).train(),
                        f"{member.run_id} fold {fold} ({member.stage}{how})")
    return fresh, "scratch"


def curated_fold_scores(members: tuple[MemberRun, ...]) -> dict[str, float]:
    """Each fold model's out-of-fold lwlrap on the curated clips it did not train on, as its
    stage run logged it, by checkpoint key."""
    scores = {}
    for member in members:
        metrics = get_run(member.run_id).data.metrics
        for fold, key in enumerate(member.checkpoints):
            if fold_lwlrap_metric(fold, "curated") in metrics:
                scores[key] = metrics[fold_lwlrap_metric(fold, "curated")]
    return scores


def _fits_inside(narrow: nn.Module, wide: nn.Module) -> bool:
    return all(len(n.shape) == len(w.shape) and all(a <= b for a, b in zip(n.shape, w.shape))
               for n, w in zip(narrow.state_dict().values(), wide.state_dict().values()))


def _widths_equal(one: nn.Module, other: nn.Module) -> bool:
    return all(a.shape == b.shape
               for a, b in zip(one.state_dict().values(), other.state_dict().values()))


def run_distill(request: DistillRequest) -> tuple[str, str]:
    """Train, log, score and register the student; returns (distill run ID, version)."""
    configure_tracking()
    cfg = request.config
    teacher = read_teacher(request.teacher)
    data = request.data or Path(teacher.data)
    dataset = load_dataset(data)
    if dataset_fingerprint(dataset) != teacher.dataset:
        raise RunLookupError(f"{data} is not the dataset ensemble run {teacher.run_id} was "
                             "trained on; pass --data with that dataset")
    clock = PhaseClock()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fat-distill-") as tmp, \
            mlflow.start_run(run_name="distill", nested=mlflow.active_run() is not None) as run:
        mlflow.set_tags({TAG_STAGE: "distill", TAG_DATASET: teacher.dataset,
                         TAG_TEACHER: teacher.run_id, TAG_COMPLETE: "false"})
        mlflow.log_params({**cfg.flat(), "distill.teacher": request.teacher,
                           "distill.teacher_run_id": teacher.run_id, "data": str(data),
                           "registered_model": request.registered_model})
        with peak_memory() as peak:
            info, score = _train_and_log(request, teacher, dataset, run.info.run_id,
                                         Path(tmp), clock)
        mlflow.log_metrics({**peak.metrics, "time_total_s": time.perf_counter() - started,
                            **{f"time_{phase}_s": s for phase, s in clock.seconds.items()}})
        version = register_version(info.model_uri, request.registered_model, request.alias,
                                   VersionScore(score, teacher.dataset), [teacher.run_id],
                                   teacher.floor)
        mlflow.set_tag(TAG_COMPLETE, "true")
    return run.info.run_id, version


def _train_and_log(request: DistillRequest, teacher: Teacher, dataset: FatDataset,
                   run_id: str, tmp: Path, clock: PhaseClock
                   ) -> tuple[mlflow.models.model.ModelInfo, float | None]:
    """Teacher scores -> student training -> the logged pyfunc model and its test lwlrap."""
    cfg = request.config
    with clock.phase("load"):
        spec, teacher_files = ensemble_spec(teacher.sources, tmp / "teacher")
        clips, specs, test_specs, test, failures = _read_clips(dataset, spec, cfg, request)
        train_cfg = student_train_config(cfg, spec)
        precision = training_precision(train_cfg)
        members = load_members(spec, teacher_files, precision.prepare_for_scoring)
    log_bad_audio(failures)
    window = spec.members[0].window
    with clock.phase("teacher"):
        soft = teacher_window_scores(members, specs, window, cfg.teacher_step, cfg.cover_end,
                                     spec.batch_size, precision)
    owners, starts = window_positions(specs, window, cfg.teacher_step, cfg.cover_end)
    targets = blended_targets(soft, dataset.targets(clips)[owners],
                              clips["labelled"].to_numpy()[owners], cfg.label_weight)
    torch.manual_seed(cfg.seed)  # a fresh student's weights and dropout, whatever ran before
    student, origin = initial_student(cfg, teacher_files, spec.members, len(spec.vocabulary),
                                      curated_fold_scores(spec.members))
    mlflow.log_params({"student.init": origin, "student.windows": len(targets),
                       "student.clips": len(clips)})
    teacher_flops = sum(flops_per_sample(m) for models, _ in members for m in models)
    history = train_fold(
        student, WindowSpectrograms(specs, owners, starts, window), targets,
        test_specs, dataset.targets(test), train_cfg, NO_AUGMENT, cfg.seed,
        on_epoch=_log_epoch, progress=request.progress, desc="student")
    clock.add("train_steps", sum(log.train_seconds for log in history))
    clock.add("validation", sum(log.validation_seconds for log in history))
    checkpoint = tmp / "student.pt"
    save_checkpoint(student, checkpoint, arch=cfg.arch, width=cfg.width,
                    n_classes=len(spec.vocabulary))
    student_spec = EnsembleSpec(
        features=spec.features, vocabulary=spec.vocabulary, batch_size=spec.batch_size,
        members=(MemberRun(run_id, "distill", cfg.arch, window, served_step(cfg, spec),
                           (STUDENT_ARTIFACT,), cfg.cover_end),))
    with clock.phase("log_model"):
        info = mlflow.pyfunc.log_model(
            name="tagger", input_example=example_request(example_clip(dataset),
                                                         spec.features.sample_rate),
            **pyfunc_arguments(student_spec, tmp / "ensemble.json",
                               {STUDENT_ARTIFACT: str(checkpoint)}))
    _log_cost(student, checkpoint, teacher_flops, teacher_files)
    if not dataset.has_test_truth:
        return info, None
    with clock.phase("evaluation"):
        result = evaluate(load_local_model(info.model_uri), dataset, request.progress,
                          request.bad_audio)
    _log_scores(result, info, teacher)
    return info, result.lwlrap


def student_train_config(cfg: DistillConfig, spec: EnsembleSpec) -> TrainConfig:
    """The engine's settings for the student: one "fold" over the teacher's windows."""
    window = spec.members[0].window
    return TrainConfig(arch=cfg.arch, width=cfg.width, n_folds=1, epochs=cfg.epochs,
                       batch_size=cfg.batch_size, lr=cfg.lr, crop_frames=window,
                       window_step=served_step(cfg, spec), val_every=1,
                       eval_batch_size=spec.batch_size, seed=cfg.seed)


def served_step(cfg: DistillConfig, spec: EnsembleSpec) -> int:
    """The student's sliding-window step: its own, or the ensemble's (without `cover_end`, a
    longer step leaves more of a clip unscored: up to step - 1 frames, at 96 a third of a
    5-s clip)."""
    return cfg.window_step or spec.members[0].step


def _read_clips(dataset: FatDataset, spec: EnsembleSpec, cfg: DistillConfig,
                request: DistillRequest):
    """The training clips' and test clips' log-mels from the feature store (computed where
    missing); clips that cannot be decoded stop it, or with bad_audio "skip" are left out."""
    cache = FeatureCache(request.cache_dir, spec.features)
    clips = training_clips(dataset, cfg)
    every = pd.concat([clips["path"], dataset.test["path"]]).drop_duplicates()
    failures = cache.compute(list(every), progress=request.progress).failures
    if failures and request.bad_audio != "skip":
        raise BadAudioError(failures, SKIP_HINT)

    def usable(frame: pd.DataFrame) -> pd.DataFrame:
        return frame[~frame["path"].astype(str).isin(failures)].reset_index(drop=True)

    clips, test = usable(clips), usable(dataset.test)
    if dataset.has_test_truth:
        test_specs = cache.open(test["path"])
    else:  # no test labels: the curve follows the curated clips
        test = usable(dataset.curated)
        test_specs = cache.open(test["path"])
    return clips, cache.open(clips["path"]), test_specs, test, failures


def _log_epoch(log: EpochLog) -> None:
    metrics = {"train_loss": log.train_loss, "samples_per_second": log.samples_per_second}
    if not np.isnan(log.val_lwlrap):
        metrics["val_lwlrap"] = log.val_lwlrap  # the test clips' centre windows
    mlflow.log_metrics(metrics, step=log.epoch)


def _log_cost(student: nn.Module, checkpoint: Path, teacher_flops: int,
              teacher_files: dict[str, str]) -> None:
    """Size and compute of the student beside the teacher's (per 128-frame window)."""
    student_flops = flops_per_sample(student)
    teacher_bytes = sum(Path(path).stat().st_size for path in teacher_files.values())
    mlflow.log_metrics({
        "student_parameters": count_parameters(student),
        "student_mb": checkpoint.stat().st_size / 1e6,
        "teacher_mb": teacher_bytes / 1e6,
        "student_gflops_per_window": student_flops / 1e9,
        "teacher_gflops_per_window": teacher_flops / 1e9,
        "flops_ratio": teacher_flops / student_flops,
    })


def _log_scores(result, info: mlflow.models.model.ModelInfo, teacher: Teacher) -> None:
    mlflow.log_metric("lwlrap_test", result.lwlrap, model_id=info.model_id)
    if teacher.lwlrap is not None:
        mlflow.log_metrics({"teacher_lwlrap_test": teacher.lwlrap,
                            "lwlrap_gap": teacher.lwlrap - result.lwlrap})
    if teacher.floor is not None:
        mlflow.log_metrics({"floor_lwlrap_test": teacher.floor,
                            "lwlrap_test_above_floor": result.lwlrap - teacher.floor})
    log_table(result.scores, "test_scores.csv")


def distill_summary(run_id: str) -> str:
    """One line on what the student kept of the ensemble, and at what cost."""
    metrics = MlflowClient().get_run(run_id).data.metrics
    cost = (f"{metrics['flops_ratio']:.1f}x fewer FLOPs per window, "
            f"{metrics['student_mb']:.1f} MB against {metrics['teacher_mb']:.1f} MB")
    if "lwlrap_test" not in metrics:
        return f"student: {cost} (the dataset has no test labels to score it on)"
    line = f"student test lwlrap {metrics['lwlrap_test']:.3f}"
    if "teacher_lwlrap_test" in metrics:
        line += (f" against the ensemble's {metrics['teacher_lwlrap_test']:.3f} "
                 f"(gap {metrics['lwlrap_gap']:+.3f})")
    if "floor_lwlrap_test" in metrics:
        line += f", floor {metrics['floor_lwlrap_test']:.3f}"
    return f"{line}; {cost}"


def distill_row(run_id: str, version: str) -> dict:
    """The student's row of the pipeline's stage report."""
    run = MlflowClient().get_run(run_id)
    metrics = run.data.metrics
    return {"model": "student", "arch": run.data.params.get("distill.arch", ""),
            "stage": "distill", "run_id": run_id, "lwlrap_test": metrics.get("lwlrap_test"),
            "minutes": metrics.get("time_total_s", np.nan) / 60,
            "registered_version": version}



def distill_and_register(ensemble_run_id: str, data: Path, cfg: DistillConfig,
                         ensemble_model: str, cache_dir: Path | None, bad_audio: str) -> dict:
    """The pipeline's student step (`run_pipeline`): distil the ensemble run just built and
    register the student as `<ensemble_model>-fast`; returns its row of the stage report."""
    run_id, version = run_distill(DistillRequest(
        teacher=ensemble_run_id, config=cfg, data=data, registered_model=f"{ensemble_model}-fast",
        cache_dir=cache_dir, bad_audio=bad_audio))
    return distill_row(run_id, version)
