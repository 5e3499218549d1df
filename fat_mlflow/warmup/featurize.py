"""The `features` entry point: fill the feature cache for a dataset and log what it cost."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow

from fat_mlflow.config import FeatureConfig
from fat_mlflow.data.features import CacheStats, FeatureCache
from fat_mlflow.data.layout import dataset_fingerprint, load_dataset
from fat_mlflow.memory import peak_memory
from fat_mlflow.warmup.tracking import (
    TAG_DATASET,
    TAG_STAGE,
    configure_tracking,
    log_bad_audio,
)


def run_features(data: Path, cfg: FeatureConfig, cache_dir: Path | None, jobs: int,
                 progress: bool = True) -> CacheStats:
    """Compute the missing log-mels of every clip (curated, noisy, test) in one MLflow run."""
    configure_tracking()
    dataset = load_dataset(data)
    cache = FeatureCache(cache_dir, cfg)
    frames = [dataset.curated, dataset.test] + ([dataset.noisy] if dataset.has_noisy else [])
    paths = [p for frame in frames for p in frame["path"]]
    with mlflow.start_run(run_name="features", nested=mlflow.active_run() is not None):
        mlflow.set_tags({TAG_STAGE: "features", TAG_DATASET: dataset_fingerprint(dataset)})
        mlflow.log_params({**{f"features.{k}": v for k, v in dataclasses.asdict(cfg).items()},
                           "data": str(data), "cache_dir": str(cache.folder), "jobs": jobs})
        with peak_memory() as peak:
            stats = cache.compute(paths, n_jobs=jobs, progress=progress)
        mlflow.log_metrics({**stats.as_metrics(), **peak.metrics,
                            "store_bytes": float(cache.store.disk_bytes())})
        log_bad_audio(stats.failures)
    return stats
