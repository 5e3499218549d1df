"""Feature extraction speed: FeatureCache.compute (parallel; cold and warm cache) vs a plain
sequential librosa loop with the seed's parameters.

Every row runs the same log_mel over the same clips in one process, so the ratios compare like
with like; the warm rows show what every later stage pays instead.

    python -m fat_mlflow.benchmarks.features [--profile standard] [--data DIR | --esc50 DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import librosa
import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from fat_mlflow.benchmarks import BENCHMARK_PROFILES
from fat_mlflow.benchmarks.common import Result, Table, machine_facts, median, passes, timed
from fat_mlflow.config import FeatureConfig
from fat_mlflow.data.esc50 import META, SOURCES_HELP, locate_esc50
from fat_mlflow.data.features import BadAudioError, FeatureCache, log_mel
from fat_mlflow.data.layout import DataLayoutError, load_dataset

COLUMNS = (("seconds", "s"), ("clips_per_s", "clips/s"), ("x_realtime", "x realtime"),
           ("speed_vs_baseline", "speed vs baseline (x)"))


def benchmark_clips(data: Path | None, esc50: Path | None, n: int) -> list[Path]:
    """The first `n` clips of a FAT2019-layout dataset (curated, test, noisy), else of ESC-50
    in file-name order: the same clips in every run, so figures of two runs compare."""
    if data is not None:
        dataset = load_dataset(data)
        frames = [dataset.curated, dataset.test] + ([dataset.noisy] if dataset.has_noisy else [])
        paths = [Path(p) for frame in frames for p in frame["path"]]
    else:
        esc50 = locate_esc50(esc50)
        paths = [esc50 / "audio" / name for name in sorted(pd.read_csv(esc50 / META)["filename"])]
    if not paths:
        raise DataLayoutError(f"no clips to measure in {data or esc50}")
    return paths[:n]


def sequential_loop(paths: Sequence[Path], cfg: FeatureConfig) -> None:
    """The baseline: librosa.load + log_mel, one clip after the other."""
    for path in paths:
        wave, _ = librosa.load(path, sr=cfg.sample_rate)
        log_mel(wave, cfg, name=str(path))


def run(paths: Sequence[Path], repeats: int, cfg: FeatureConfig = FeatureConfig(),
        n_jobs: int = 0) -> Table:
    """Loop (the baseline), loop with one BLAS thread (what each cache worker does: separates
    the two gains), cold cache (a fresh folder per pass), warm cache, and a full read; each
    pass runs every one of them in turn, so a machine whose speed drifts slows all alike."""
    paths = list(paths)
    sequential_loop(paths[:1], cfg)  # imports and numba compilation are not the loop's cost
    workers = min(n_jobs or os.cpu_count() or 1, len(paths))
    loop, loop_1_thread, cold, warm, read = [], [], [], [], []
    for _ in range(repeats):
        loop += timed(lambda: sequential_loop(paths, cfg), 1)
        with threadpool_limits(limits=1):
            loop_1_thread += timed(lambda: sequential_loop(paths, cfg), 1)
        with tempfile.TemporaryDirectory(prefix="fat-bench-cache-") as root:
            cache = FeatureCache(Path(root), cfg)
            stats = cache.compute(paths, n_jobs=n_jobs, progress=False)
            if stats.failures:
                raise BadAudioError(stats.failures)
            cold.append(stats.seconds)
            audio_s = stats.audio_seconds
            warm.append(cache.compute(paths, n_jobs=n_jobs, progress=False).seconds)
            stored = cache.open(paths)
            read += timed(lambda: [stored.clip(i) for i in range(len(stored))], 1)
    baseline_s = median(loop)
    settings = {f"features.{key}": value for key, value in dataclasses.asdict(cfg).items()}
    shared = {"n_clips": len(paths), "audio_seconds": round(audio_s, 3), "repeats": repeats,
              "librosa_version": librosa.__version__, **settings}
    rows = [
        ("librosa loop, sequential", loop, {"method": "librosa loop", "workers": 1,
                                            "blas_threads": "default", "cache": "none"}, True),
        ("librosa loop, sequential, 1 BLAS thread", loop_1_thread,
         {"method": "librosa loop", "workers": 1, "blas_threads": 1, "cache": "none"}, False),
        (f"FeatureCache.compute, cold, {workers} workers", cold,
         {"method": "FeatureCache.compute", "workers": workers, "blas_threads": 1,
          "cache": "cold"}, False),
        ("FeatureCache.compute, warm (all reused)", warm,
         {"method": "FeatureCache.compute", "workers": workers, "blas_threads": 1,
          "cache": "warm"}, False),
        ("FeatureCache.open, every clip read whole", read,
         {"method": "FeatureCache.open", "workers": 1, "blas_threads": "default",
          "cache": "warm"}, False),
    ]
    results = []
    for setting, seconds, params, baseline in rows:
        s = median(seconds)
        results.append(Result(setting, {**shared, **params}, {
            "seconds": s, "clips_per_s": len(paths) / s, "x_realtime": audio_s / s,
            "speed_vs_baseline": baseline_s / s}, baseline))
    title = f"log-mel of {len(paths)} clips ({audio_s / 60:.1f} min of audio), {passes(repeats)}"
    return Table("features", title, COLUMNS, tuple(results), machine_facts(torch.device("cpu")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(BENCHMARK_PROFILES), default="standard",
                        help="benchmark size")
    parser.add_argument("--n", type=int, default=0, help="number of clips (0: the profile's)")
    parser.add_argument("--repeats", type=int, default=0, help="timed passes (0: the profile's)")
    parser.add_argument("--data", type=Path, default=None, help="FAT2019-layout dataset")
    parser.add_argument("--esc50", type=Path, default=None,
                        help=f"ESC-50 folder ({SOURCES_HELP})")
    args = parser.parse_args()
    size = BENCHMARK_PROFILES[args.profile]
    paths = benchmark_clips(args.data, args.esc50, args.n or size.feature_clips)
    print(run(paths, args.repeats or size.repeats).markdown())


if __name__ == "__main__":
    main()
