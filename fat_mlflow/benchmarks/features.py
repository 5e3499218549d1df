"""Feature extraction speed: FeatureCache.compute (parallel, cold) vs a plain librosa loop.

Both paths run the same log_mel over the same N ESC-50 clips in one run, so the table compares
like with like; the warm rows show what every later stage pays instead.

    python -m fat_mlflow.benchmarks.features [--n 200] [--esc50 PATH]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import librosa
import pandas as pd
from threadpoolctl import threadpool_limits

from fat_mlflow.demo import default_esc50_dir
from fat_mlflow.config import FeatureConfig
from fat_mlflow.features import FeatureCache, log_mel



def sequential(paths: list[Path], cfg: FeatureConfig) -> tuple[float, float]:
    """(seconds, audio seconds) of librosa.load + log_mel, one clip after the other."""
    start, audio = time.perf_counter(), 0.0
    for path in paths:
        wave, _ = librosa.load(path, sr=cfg.sample_rate)
        log_mel(wave, cfg)
        audio += wave.size / cfg.sample_rate
    return time.perf_counter() - start, audio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="number of ESC-50 clips")
    parser.add_argument(
        "--esc50", type=Path, default=default_esc50_dir()
    )
    args = parser.parse_args()
    cfg = FeatureConfig()
    names = pd.read_csv(args.esc50 / "meta" / "esc50.csv")["filename"].sort_values().iloc[: args.n]
    paths = [args.esc50 / "audio" / name for name in names]
    sequential(paths[:1], cfg)  # imports and numba compilation are not part of the loop's cost

    loop_s, audio_s = sequential(paths, cfg)
    rows = [("librosa loop, sequential", loop_s, audio_s)]
    with threadpool_limits(limits=1):  # what each cache worker does; separates the two gains
        rows.append(("librosa loop, sequential, 1 BLAS thread", *sequential(paths, cfg)))
    with tempfile.TemporaryDirectory() as root:
        cache = FeatureCache(Path(root), cfg)
        cold = cache.compute(paths, n_jobs=0, progress=False)
        if cold.failures:
            raise SystemExit(f"unexpected failures: {cold.failures}")
        workers = f"FeatureCache.compute, cold, {os.cpu_count()} workers"
        rows.append((workers, cold.seconds, cold.audio_seconds))
        warm = cache.compute(paths, n_jobs=0, progress=False)
        rows.append(("FeatureCache.compute, warm (all reused)", warm.seconds, audio_s))
        start = time.perf_counter()
        cache.load_many(paths, mmap=False)
        rows.append(("FeatureCache.load_many, full read", time.perf_counter() - start, audio_s))

    print(f"{len(paths)} ESC-50 clips, {audio_s / 60:.1f} min of audio, {os.cpu_count()} CPU cores")
    print(f"{'method':<44}{'seconds':>9}{'clips/s':>10}{'x realtime':>12}")
    for method, seconds, audio in rows:
        print(f"{method:<44}{seconds:>9.2f}{len(paths) / seconds:>10.1f}{audio / seconds:>12.0f}")
    print(f"speed-up of the cold cache over the loop: {loop_s / cold.seconds:.2f}x")


if __name__ == "__main__":
    main()
