"""Log-mel spectrograms of the seed, and an on-disk cache of them keyed by FeatureConfig.

Decoding and the mel transform dominate the cost of every stage, so each clip is computed once
per feature setting, in parallel, and later memory-mapped instead of loaded whole.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

import librosa
import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from fat_mlflow.config import FeatureConfig
from fat_mlflow.data.audio import AudioError, load_audio

CACHE_ENV = "FAT_MLFLOW_CACHE"


def log_mel(wave: np.ndarray, cfg: FeatureConfig, name: str = "<waveform>") -> np.ndarray:
    """The seed's preprocessing: trim silence, mel power spectrogram, dB relative to the peak.

    Returns float32 (n_mels, frames) with frames >= cfg.min_frames. A trimmed clip shorter than
    one window is zero-padded *in the waveform*, centred (as the seed's notebooks do), so the pad
    reads as silence (-80 dB) rather than as a loud 0 dB band. Standardisation and the 3-channel
    copy happen at batch time. A clip with no signal at all (digital silence) raises
    `AudioError(name, "silent ...")`: its spectrogram would be constant and standardise to NaN.
    """
    if wave.ndim != 1:
        raise ValueError(f"{name}: expected a mono waveform (1-D), got shape {wave.shape}")
    if wave.size == 0:
        raise AudioError(name, "contains no audio samples (0 frames)")
    if not np.any(wave):
        raise AudioError(name, "silent: every sample is zero, nothing to describe")
    trimmed, _ = librosa.effects.trim(wave, top_db=cfg.top_db)
    needed = (cfg.min_frames - 1) * cfg.hop_length  # centred STFT: frames = 1 + len // hop
    if trimmed.size < needed:
        pad = needed - trimmed.size
        trimmed = np.pad(trimmed, (pad // 2, pad - pad // 2))
    mel = librosa.feature.melspectrogram(
        y=trimmed,
        sr=cfg.sample_rate,
        n_fft=cfg.n_fft,
        hop_length=cfg.hop_length,
        n_mels=cfg.n_mels,
        fmin=cfg.fmin,
        fmax=cfg.fmax,
        power=2.0,
    )
    return librosa.power_to_db(mel, ref=np.max).astype(np.float32)


def default_cache_root() -> Path:
    """$FAT_MLFLOW_CACHE, else ./.fat_cache (git-ignored)."""
    return Path(os.environ.get(CACHE_ENV, ".fat_cache"))


class BadAudioError(ValueError):
    """Some clips cannot be decoded; lists every one of them, then what to do about it."""

    def __init__(self, failures: dict[str, str], hint: str = "fix or remove them"):
        self.failures = failures
        listing = "\n".join(f"  {path}: {reason}" for path, reason in sorted(failures.items()))
        super().__init__(f"{len(failures)} audio file(s) cannot be used:\n{listing}\n{hint}")


@dataclass
class CacheStats:
    """What one `FeatureCache.compute` call did; `audio_seconds` counts the clips it decoded."""

    n_clips: int = 0
    n_computed: int = 0
    n_reused: int = 0
    n_failed: int = 0
    seconds: float = 0.0
    audio_seconds: float = 0.0
    bytes: int = 0
    failures: dict[str, str] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, float]:
        """Numeric fields only, in the form tracking code logs."""
        return {
            f.name: float(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name != "failures"
        }


class FeatureCache:
    """One .npy per clip under `root/<cfg.cache_key()>/`, written atomically.

    The clip key hashes the resolved path, size and mtime, so two datasets with the same file
    names, or a clip edited in place, never share an entry.
    """

    def __init__(self, root: Path | str | None, cfg: FeatureConfig) -> None:
        self.cfg = cfg
        self.folder = Path(root if root is not None else default_cache_root()) / cfg.cache_key()
        self.folder.mkdir(parents=True, exist_ok=True)
        params = self.folder / "params.json"
        if not params.exists():
            payload = json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True).encode()
            _atomic_write(params, lambda handle: handle.write(payload))

    def path_for(self, audio_path: Path | str) -> Path:
        """Cache file of a clip; raises AudioError if the clip itself does not exist."""
        audio_path = Path(audio_path).resolve()
        try:
            stat = audio_path.stat()
        except FileNotFoundError as error:
            raise AudioError(audio_path, "file does not exist") from error
        identity = f"{audio_path}|{stat.st_size}|{stat.st_mtime_ns}"
        digest = hashlib.sha1(identity.encode()).hexdigest()[:16]
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", audio_path.stem)[:40]
        return self.folder / f"{stem}-{digest}.npy"

    def load(self, audio_path: Path | str, mmap: bool = True) -> np.ndarray:
        """The cached spectrogram; memory-mapped read-only by default."""
        cached = self.path_for(audio_path)
        if not cached.exists():
            raise FileNotFoundError(
                f"{audio_path}: no cached features in {self.folder}; run FeatureCache.compute first"
            )
        return np.load(cached, mmap_mode="r" if mmap else None)

    def load_many(self, paths: Iterable[Path | str], mmap: bool = True) -> list[np.ndarray]:
        return [self.load(path, mmap=mmap) for path in paths]

    def compute(
        self, paths: Iterable[Path | str], n_jobs: int = 0, progress: bool = True
    ) -> CacheStats:
        """Compute every missing clip (n_jobs=0: all cores); collect failures of all clips."""
        start = time.perf_counter()
        unique = list(dict.fromkeys(str(Path(p)) for p in paths))
        stats = CacheStats(n_clips=len(unique))
        todo: list[tuple[str, str]] = []
        for path in unique:
            try:
                target = self.path_for(path)
            except AudioError as error:
                stats.failures[path] = error.reason
                continue
            if target.exists():
                stats.n_reused += 1
            else:
                todo.append((path, str(target)))
        workers = min(n_jobs if n_jobs > 0 else (os.cpu_count() or 1), max(1, len(todo)))
        bar = tqdm(total=len(todo), desc="log-mel", unit="clip", disable=not progress)
        with bar:
            for path, target, result in self._run(todo, workers):
                if isinstance(result, str):
                    stats.failures[path] = result
                else:
                    audio_seconds, written = result
                    stats.n_computed += 1
                    stats.audio_seconds += audio_seconds
                    stats.bytes += _commit(Path(written), Path(target))
                bar.update()
        stats.n_failed = len(stats.failures)
        stats.seconds = time.perf_counter() - start
        return stats

    def _run(
        self, todo: list[tuple[str, str]], workers: int
    ) -> Iterator[tuple[str, str, tuple[float, str] | str]]:
        """(path, target, worker result) as clips finish; in-process when one worker suffices.

        One clip per task, so no worker idles at the end while another still has a chunk;
        the workers only write temporary files and this process makes them durable and
        renames them (`_commit`) while the workers go on to their next clip.
        """
        jobs = [(path, target, self.cfg) for path, target in todo]
        if workers <= 1:
            with threadpool_limits(limits=1):
                for job in jobs:
                    yield job[0], job[1], _compute_one(job)
            return
        # One BLAS thread per process: clips are the unit of parallelism, and threaded BLAS on
        # the small mel products is several times slower than single-threaded (bench_features).
        with ProcessPoolExecutor(
            max_workers=workers, initializer=threadpool_limits, initargs=(1,)
        ) as pool:
            futures = {pool.submit(_compute_one, job): job for job in jobs}
            for future in as_completed(futures):
                path, target, _ = futures[future]
                yield path, target, future.result()


def _compute_one(job: tuple[str, str, FeatureConfig]) -> tuple[float, str] | str:
    """Worker: (audio seconds, temporary file beside the target) on success, the failure
    reason otherwise."""
    path, target, cfg = job
    try:
        wave = load_audio(path, cfg.sample_rate)
        spec = log_mel(wave, cfg, name=path)
    except AudioError as error:
        return error.reason
    except OSError as error:
        return f"cannot read file: {error}"
    written = _write_temporary(Path(target).parent, lambda handle: np.save(handle, spec))
    return wave.size / cfg.sample_rate, str(written)


def _atomic_write(target: Path, write: Callable[[BinaryIO], object]) -> int:
    """Write via a temp file in the same folder + os.replace: readers never see half a file."""
    return _commit(_write_temporary(target.parent, write), target)


def _write_temporary(folder: Path, write: Callable[[BinaryIO], object]) -> Path:
    """A new temporary file in `folder` holding what `write` wrote; removed if that fails."""
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as tmp:
        try:
            write(tmp)
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    return Path(tmp.name)


def _commit(written: Path, target: Path) -> int:
    """Make a written temporary file durable (fsync), then rename it over `target` atomically;
    returns its size."""
    with written.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(written, target)
    return target.stat().st_size
