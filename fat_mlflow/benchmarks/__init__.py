"""Speed benchmarks: `fat-mlflow benchmark` (MLflow runs + a markdown table) or one at a time
with `python -m fat_mlflow.benchmarks.{features,training,serving,pipeline}`.

The sizes live here, free of heavy imports, so the CLI can offer them as choices without
loading torch. Only `cli` sits above this package; `fold` and `training` run without MLflow.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchmarkProfile:
    """How much each benchmark measures; `repeats` timed passes per figure, median reported."""

    name: str
    feature_clips: int  # clips of the features benchmark (and the training inputs with --data)
    train_steps: int  # timed optimiser steps per pass and configuration
    paper_batch_cpu: int  # batch of the paper networks on a CPU (a GPU uses the profile's 128)
    matmul_n: int  # side of the square matmul that measures the CPU's peak FLOP/s
    batch_clips: int  # clips in the inference throughput batch
    latency_calls: int  # one-clip calls behind p50/p95
    ensemble_archs: tuple[str, ...]  # shape of the untrained ensemble built without --model-uri
    ensemble_runs: int
    ensemble_folds: int
    repeats: int
    pipeline_profile: str  # training profile of the main jobs the pipeline benchmark times


BENCHMARK_PROFILES: dict[str, BenchmarkProfile] = {
    # seconds: what the tests run; the figures only prove that everything is measured
    "tiny": BenchmarkProfile("tiny", feature_clips=6, train_steps=1, paper_batch_cpu=2,
                             matmul_n=1024, batch_clips=3, latency_calls=3,
                             ensemble_archs=("cnn",), ensemble_runs=3, ensemble_folds=2,
                             repeats=1, pipeline_profile="tiny"),
    # the default: a few minutes on 2 CPU cores; the quick pipeline's default champion
    # (its CNN's stages 2-4, 3 folds each: 9 fold models)
    "standard": BenchmarkProfile("standard", feature_clips=200, train_steps=2, paper_batch_cpu=16,
                                 matmul_n=2048, batch_clips=32, latency_calls=20,
                                 ensemble_archs=("cnn",), ensemble_runs=3, ensemble_folds=3,
                                 repeats=3, pipeline_profile="quick"),
    # steadier figures: about three times the standard's time
    "full": BenchmarkProfile("full", feature_clips=400, train_steps=4, paper_batch_cpu=16,
                             matmul_n=4096, batch_clips=64, latency_calls=50,
                             ensemble_archs=("cnn",), ensemble_runs=3, ensemble_folds=3,
                             repeats=5, pipeline_profile="quick"),
}

