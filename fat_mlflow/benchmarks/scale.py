"""The scale benchmark: what each step of finished pipeline runs cost at two or more dataset
sizes, and from it the predicted wall time of the quick and paper profiles on FAT2019.

Input: the run IDs of `main` pipelines (e.g. the rehearsal profile on the 10 % and the full
rehearsal dataset, each on a cold feature cache). Per pipeline and step (features, stages 1-4,
ensemble evaluation, floor) it reads the wall time and the peak memory the runs logged
(`peak_rss_mb`), the feature store's size and rate and the training samples/s. It then times
scoring (windows/s) and training (samples/s) of the quick and paper networks on the largest
dataset's stored log-mels, in this process, and combines them with the clip counts and window
counts of FAT2019's size into predicted times (`prediction`): features at the measured audio
rate, per stage epochs x (folds - 1) x training clips at the measured samples/s, and the
validation, out-of-fold and test windows at the measured windows/s.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from fat_mlflow.benchmarks import BENCHMARK_PROFILES
from fat_mlflow.benchmarks import training as training_bench
from fat_mlflow.benchmarks.common import format_number
from fat_mlflow.config import PROFILES, Profile, RehearsalConfig, TrainConfig
from fat_mlflow.data.layout import load_dataset
from fat_mlflow.engine.dataset import window_starts
from fat_mlflow.data.features import FeatureCache
from fat_mlflow.engine.models import build_model
from fat_mlflow.engine.predict import predict_spectrograms
from fat_mlflow.engine.spectrograms import ClipSpectrograms, take
from fat_mlflow.warmup.tracking import TAG_PIPELINE, TAG_STAGE, configure_tracking
from fat_mlflow.engine.training import training_precision

STEPS = ("features", "stage1", "stage2", "stage3", "stage4", "ensemble")
SCORING_SHAPES = (("cnn", 0.125), ("cnn", 0.25), ("cnn", 1.0), ("vgg16", 1.0))
SCORING_CLIPS = 16  # test clips whose windows are timed per network
N_CLASSES = 80
ENSEMBLE_STAGES = 3  # stages 2-4 of each network


@dataclass(frozen=True)
class StepFigures:
    pipeline: str
    clips: int
    step: str
    seconds: float
    peak_rss_mb: float
    peak_rss_children_mb: float
    extra: dict


def step_figures(pipeline_id: str) -> list[StepFigures]:
    """Wall time and peak memory of every step of a finished pipeline run."""
    client = MlflowClient()
    parent = client.get_run(pipeline_id)
    data = Path(parent.data.params["pipeline.data"])
    clips = sum(len(frame) for frame in _frames(data).values())
    runs = {run.info.run_id: run  # nested runs (features, ensemble) and stage runs
            for tag in ("mlflow.parentRunId", TAG_PIPELINE)
            for run in client.search_runs([parent.info.experiment_id],
                                          f"tags.`{tag}` = '{pipeline_id}'")}
    figures = []
    for run in runs.values():
        step = run.data.tags.get(TAG_STAGE)
        if step not in STEPS or run.info.run_id == pipeline_id or not run.info.end_time:
            continue  # another kind of run, or a step still running
        metrics = run.data.metrics
        seconds = (run.info.end_time - run.info.start_time) / 1000
        if step == "ensemble":
            figures.append(StepFigures(pipeline_id, clips, "floor",
                                       metrics.get("floor_seconds", math.nan),
                                       metrics.get("floor_peak_rss_mb", math.nan),
                                       math.nan, {}))
            seconds = metrics.get("evaluation_seconds", seconds)
        samples = [value for key, value in metrics.items() if key.endswith("_samples_per_s")]
        extra = {key: metrics[key] for key in ("audio_seconds", "n_computed", "store_bytes",
                                               "selection_seconds", "selected_clips")
                 if key in metrics}
        if samples:
            extra["samples_per_s"] = float(np.mean(samples))
        figures.append(StepFigures(pipeline_id, clips, step, seconds,
                                   metrics.get("peak_rss_mb", math.nan),
                                   metrics.get("peak_rss_children_mb", math.nan), extra))
    order = {name: i for i, name in enumerate((*STEPS[:-1], "ensemble", "floor"))}
    return sorted(figures, key=lambda f: order[f.step])


def _frames(data: Path) -> dict[str, pd.DataFrame]:
    dataset = load_dataset(data)
    return {"curated": dataset.curated, "noisy": dataset.noisy, "test": dataset.test}


def windows(specs: ClipSpectrograms, window: int, step: int) -> int:
    """Inference windows of all clips (from the store's index: nothing is read)."""
    return sum(len(window_starts(specs.frames(i), window, step)) for i in range(len(specs)))


def scoring_rates(specs: ClipSpectrograms) -> dict[str, float]:
    """Windows/s of one untrained fold model of each shape, in the engine's precision."""
    sample = take(specs, np.arange(min(SCORING_CLIPS, len(specs))))
    rates = {}
    for arch, width in SCORING_SHAPES:
        precision = training_precision(TrainConfig(arch=arch, width=width))
        model = precision.prepare_for_scoring(build_model(arch, N_CLASSES, width))
        predict_spectrograms([model], take(sample, [0]), precision=precision)  # warm-up
        started = time.perf_counter()
        predict_spectrograms([model], sample, precision=precision)
        rates[f"{arch}/{width:g}"] = windows(sample, 128, 48) / (time.perf_counter() - started)
    return rates


def training_rates(specs: ClipSpectrograms) -> dict[str, float]:
    """Samples/s of the quick and paper networks (the training benchmark's engine steps)."""
    size = replace(BENCHMARK_PROFILES["standard"], repeats=1)
    table = training_bench.run(size, torch.device("cpu"), specs)
    rates = {}
    for result in table.results:
        if "samples_per_s" in result.metrics:
            precision = "bfloat16" if result.params["amp_bfloat16"] else "float32"
            key = (f"{result.params['profile']}/{result.params['arch']}/"
                   f"{result.params['width']:g}/{precision}")
            rates[key] = result.metrics["samples_per_s"]
    return rates


def full_size_windows(data: Path, cache: FeatureCache, train: TrainConfig) -> dict[str, float]:
    """Windows of each split at FAT2019's clip counts, from this dataset's clips' lengths."""
    recipe = RehearsalConfig()
    full = {"curated": recipe.n_curated, "noisy": recipe.n_noisy, "test": recipe.n_test}
    counts = {}
    for split, frame in _frames(data).items():
        specs = cache.open(frame["path"])
        factor = full[split] / len(specs)
        counts[f"{split}_oof"] = factor * windows(specs, train.crop_frames, train.window_step)
        counts[f"{split}_val"] = factor * windows(specs, train.crop_frames, train.val_window_step)
    return counts


def predict_profile(profile: Profile, arch: str, sps: float, wps: float,
                    counts: dict[str, float]) -> dict[str, float]:
    """Seconds per step of one network's stages 1-4 on FAT2019's size (see module doc)."""
    cfg, recipe = profile.train, RehearsalConfig()
    selected = min(recipe.n_noisy, 5 * N_CLASSES * cfg.n_folds)  # the stage-3 cap, at most
    training = {"stage1": (recipe.n_noisy, "noisy"), "stage2": (recipe.n_curated, "curated"),
                "stage3": (recipe.n_curated + selected, "curated"),
                "stage4": (recipe.n_curated + selected, "curated")}
    validations = math.ceil(cfg.epochs / cfg.val_every)
    seconds = {}
    for stage, (clips, split) in training.items():
        val = validations * counts[f"{split}_val"] * clips / (
            recipe.n_noisy if split == "noisy" else recipe.n_curated)
        oof = counts["curated_oof"] + counts["noisy_oof"] + cfg.n_folds * counts["test_oof"]
        seconds[f"{arch} {stage}"] = (cfg.epochs * (cfg.n_folds - 1) * clips / sps
                                      + (val + oof) / wps)
    seconds[f"{arch} ensemble models"] = (ENSEMBLE_STAGES * cfg.n_folds * counts["test_oof"]
                                          / wps)
    return seconds


def run_scale_report(pipeline_ids: list[str], out: Path) -> str:
    """Measure, predict, log one MLflow run `scale`, write the markdown to `out`."""
    configure_tracking()
    figures = [figure for pipeline in pipeline_ids for figure in step_figures(pipeline)]
    largest = max(pipeline_ids, key=lambda run: next(f.clips for f in figures
                                                     if f.pipeline == run))
    data = Path(MlflowClient().get_run(largest).data.params["pipeline.data"])
    cache = _feature_cache(largest)
    test = cache.open(_frames(data)["test"]["path"])
    scoring, training = scoring_rates(test), training_rates(test)
    text = _markdown(figures, scoring, training, _predictions(data, cache, figures, scoring,
                                                              training))
    with mlflow.start_run(run_name="scale"):
        mlflow.set_tag(TAG_STAGE, "benchmark")
        mlflow.log_params({"pipelines": ",".join(pipeline_ids), "data": str(data)})
        mlflow.log_metrics({f"windows_per_s.{k.replace('/', '_')}": v
                            for k, v in scoring.items()})
        mlflow.log_metrics({f"samples_per_s.{k.replace('/', '_')}": v
                            for k, v in training.items()})
        mlflow.log_text(text, "scale.md")
        mlflow.log_text(json.dumps([f.__dict__ for f in figures], indent=1), "steps.json")
    out.write_text(text)
    return text


def _feature_cache(pipeline_id: str) -> FeatureCache:
    """The feature cache the pipeline's features run filled (its store folder is a param)."""
    client = MlflowClient()
    parent = client.get_run(pipeline_id)
    run = client.search_runs([parent.info.experiment_id],
                             f"tags.`mlflow.parentRunId` = '{pipeline_id}' and "
                             f"tags.`{TAG_STAGE}` = 'features'")[0]
    settings = {key: value for key, value in run.data.params.items()
                if key.startswith("features.")}
    return FeatureCache(Path(run.data.params["cache_dir"]).parent,
                        PROFILES["paper"].override(settings).features)


def _predictions(data: Path, cache: FeatureCache, figures: list[StepFigures],
                 scoring: dict[str, float], training: dict[str, float]) -> pd.DataFrame:
    """Predicted hours of the quick and paper profiles on FAT2019's size, on this CPU with
    and without bf16 units (float32 rows), from the rates measured here."""
    largest = max(figures, key=lambda f: f.clips)
    features = next(f for f in figures if f.step == "features" and f.clips == largest.clips)
    floors = [f.seconds for f in figures if f.step == "floor" and f.clips == largest.clips]
    recipe = RehearsalConfig()
    full_clips = recipe.n_curated + recipe.n_noisy + recipe.n_test
    audio_rate = features.extra["audio_seconds"] / features.seconds
    rows = []
    for name, archs in (("quick", ("cnn",)), ("paper", ("cnn", "vgg16"))):
        profile = PROFILES[name]
        counts = full_size_windows(data, cache, profile.train)
        width = profile.train.width
        for precision in ("bfloat16", "float32"):
            growth = full_clips / largest.clips
            seconds = {"features": features.extra["audio_seconds"] * growth / audio_rate,
                       "floor": floors[0] * growth if floors else math.nan}
            for arch in archs:
                sps = training.get(f"{name}/{arch}/{width:g}/{precision}", math.nan)
                wps = scoring[f"{arch}/{width:g}"] * (1 if precision == "bfloat16" else
                                                      _float32_share(training, name, arch, width))
                seconds.update(predict_profile(profile, arch, sps, wps, counts))
            rows.append({"profile": name, "precision": precision,
                         **{step: value / 3600 for step, value in seconds.items()},
                         "total_hours": np.nansum(list(seconds.values())) / 3600})
    return pd.DataFrame(rows)


def _float32_share(training: dict[str, float], profile: str, arch: str, width: float) -> float:
    """float32 / bf16 samples/s of a network: scoring in float32 is assumed to slow alike."""
    bf16 = training.get(f"{profile}/{arch}/{width:g}/bfloat16")
    fp32 = training.get(f"{profile}/{arch}/{width:g}/float32")
    return fp32 / bf16 if bf16 and fp32 else 1.0


def _markdown(figures: list[StepFigures], scoring: dict[str, float],
              training: dict[str, float], predictions: pd.DataFrame) -> str:
    steps = pd.DataFrame([{"pipeline": f.pipeline[:8], "clips": f.clips, "step": f.step,
                           "seconds": f.seconds, "peak RSS MB": f.peak_rss_mb,
                           "workers' peak RSS MB": f.peak_rss_children_mb, **f.extra}
                          for f in figures])
    return "\n\n".join([
        "## Steps of the pipelines\n\n" + _table(steps),
        "## Scoring windows/s (one fold model, engine precision)\n\n"
        + _table(pd.DataFrame({"network": list(scoring), "windows/s": list(scoring.values())})),
        "## Training samples/s (engine steps)\n\n"
        + _table(pd.DataFrame({"profile/network/width/format": list(training),
                               "samples/s": list(training.values())})),
        "## Predicted hours on FAT2019's size\n\n" + _table(predictions)]) + "\n"


def _table(frame: pd.DataFrame) -> str:
    """A markdown table (numbers as the benchmarks print them)."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |",
             "|" + "---|" * len(frame.columns)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(format_number(value) if isinstance(value, float)
                                       else str(value) for value in row) + " |")
    return "\n".join(lines)
