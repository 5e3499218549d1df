"""Log-mel spectrograms of the seed, and an on-disk cache of them per FeatureConfig.

Decoding and the mel transform dominate the cost of every stage, so each clip is computed once
per feature setting, in parallel, into a packed feature store (`fat_mlflow.store`: a few shard
files, keyed by the audio's content), and later read crop by crop instead of loaded whole.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

import librosa
import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from fat_mlflow.config import FeatureConfig
from fat_mlflow.data.audio import AudioError, load_audio
from fat_mlflow.data.store import FeatureStore, PackedSpectrograms, StoreWriter, touch

CACHE_ENV = "FAT_MLFLOW_CACHE"
STORE_PREFIX = "logmel-"  # a store folder: logmel-<FeatureConfig.cache_key()>
COMMIT_EVERY_ROWS = 32  # index rows (two per new clip) made durable and visible at once
IN_FLIGHT_PER_WORKER = 4  # clips handed to each worker ahead: bounds the results held
DIGEST_CHUNK_BYTES = 1 << 20


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
    power = np.abs(librosa.stft(trimmed, n_fft=cfg.n_fft, hop_length=cfg.hop_length)) ** 2
    return librosa.power_to_db(mel_filters(cfg) @ power, ref=np.max).astype(np.float32)


@functools.cache
def mel_filters(cfg: FeatureConfig) -> np.ndarray:
    """librosa's mel filter bank, built once per setting: `librosa.feature.melspectrogram`
    builds it on every call, a quarter of a served clip's log-mel (2 of 8 ms)."""
    return librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels,
                               fmin=cfg.fmin, fmax=cfg.fmax)


def default_cache_root() -> Path:
    """$FAT_MLFLOW_CACHE, else ./.fat_cache (git-ignored)."""
    return Path(os.environ.get(CACHE_ENV, ".fat_cache"))


def store_folder(root: Path | str | None, cfg: FeatureConfig) -> Path:
    """The feature store of `cfg` under a cache root (None: the default root)."""
    return Path(root if root is not None else default_cache_root()) / (
        f"{STORE_PREFIX}{cfg.cache_key()}")


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
    """The log-mels of one feature setting: the feature store `root/logmel-<cfg.cache_key()>/`.

    Entries are found by the CONTENT of the audio file, so a dataset moved or extracted again
    reuses them (its files are only hashed again), while a clip edited in place, or two
    datasets with the same file names, never share an entry.
    """

    def __init__(self, root: Path | str | None, cfg: FeatureConfig) -> None:
        self.cfg = cfg
        self.folder = store_folder(root, cfg)
        self.store = FeatureStore(self.folder)
        params = self.folder / "params.json"
        if not params.exists():
            payload = json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True).encode()
            _atomic_write(params, lambda handle: handle.write(payload))

    def open(self, paths: Iterable[Path | str]) -> PackedSpectrograms:
        """The cached spectrograms of `paths`, in order, read from disk as the engine asks."""
        keys = [str(Path(path).resolve()) for path in paths]
        try:
            stats = {key: os.stat(key) for key in keys}
        except FileNotFoundError as error:
            raise AudioError(error.filename, "file does not exist") from error
        known = self.store.known_files(stats)
        try:
            return self.store.open([known[key] for key in keys])
        except KeyError as error:
            missing = next((key for key in keys if key not in known), str(error))
            raise FileNotFoundError(f"{missing}: no cached features in {self.folder}; run "
                                    "FeatureCache.compute first") from None

    def load(self, audio_path: Path | str) -> np.ndarray:
        """One clip's whole spectrogram (n_mels, frames), in memory."""
        return self.open([audio_path]).clip(0)

    def compute(
        self, paths: Iterable[Path | str], n_jobs: int = 0, progress: bool = True
    ) -> CacheStats:
        """Compute every missing clip (n_jobs=0: all cores); collect failures of all clips."""
        start = time.perf_counter()
        unique = list(dict.fromkeys(str(Path(p)) for p in paths))
        stats = CacheStats(n_clips=len(unique))
        resolved: dict[str, str] = {}
        file_stats: dict[str, os.stat_result] = {}
        for path in unique:
            key = str(Path(path).resolve())
            try:
                file_stats[key] = os.stat(key)
            except FileNotFoundError:
                stats.failures[path] = "file does not exist"
                continue
            resolved[path] = key
        known = self.store.known_files(file_stats)
        stored = self.store.stored(known.values())
        todo = [path for path, key in resolved.items() if known.get(key) not in stored]
        stats.n_reused = len(resolved) - len(todo)
        touch(self.folder)
        if todo:
            self._compute(todo, resolved, n_jobs, progress, stats)
        stats.n_failed = len(stats.failures)
        stats.seconds = time.perf_counter() - start
        return stats

    def _compute(self, todo: list[str], resolved: dict[str, str], n_jobs: int, progress: bool,
                 stats: CacheStats) -> None:
        """Hash and (unless stored) compute `todo` in worker processes; append as they come."""
        workers = min(n_jobs if n_jobs > 0 else (os.cpu_count() or 1), len(todo))
        bar = tqdm(total=len(todo), desc="log-mel", unit="clip", disable=not progress)
        with bar, self.store.writer(COMMIT_EVERY_ROWS) as writer:
            for path, result in self._run(todo, workers):
                if isinstance(result, str):
                    stats.failures[path] = result
                else:
                    _keep(writer, resolved[path], result, stats)
                bar.update()

    def _run(self, todo: list[str], workers: int) -> Iterator[tuple[str, Computed | str]]:
        """(path, worker result) as clips finish; in-process when one worker suffices.

        One clip per task, so no worker idles at the end while another still has a chunk, and
        at most IN_FLIGHT_PER_WORKER clips per worker handed out ahead, so the finished
        spectrograms waiting here stay few; this process appends them to the store while the
        workers go on to their next clip.
        """
        jobs = iter([(path, self.cfg, str(self.folder)) for path in todo])
        if workers <= 1:
            with threadpool_limits(limits=1):
                for job in jobs:
                    yield job[0], _compute_one(job)
            return
        # One BLAS thread per process: clips are the unit of parallelism, and threaded BLAS on
        # the small mel products is several times slower than single-threaded (bench_features).
        with ProcessPoolExecutor(
            max_workers=workers, initializer=threadpool_limits, initargs=(1,)
        ) as pool:
            pending: dict[Future, str] = {}

            def hand_out() -> None:
                for job in itertools.islice(jobs, workers * IN_FLIGHT_PER_WORKER - len(pending)):
                    pending[pool.submit(_compute_one, job)] = job[0]

            hand_out()
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield pending.pop(future), future.result()
                hand_out()


@dataclass(frozen=True)
class Computed:
    """A worker's answer for one file: its content digest and what it held when hashed, and
    the spectrogram (None when the store already had this content)."""

    digest: str
    stat: os.stat_result
    spec: np.ndarray | None
    audio_seconds: float


def _keep(writer: StoreWriter, path: str, result: Computed, stats: CacheStats) -> None:
    """Record the file's digest and, unless its content is stored already, its spectrogram."""
    writer.record_file(path, result.stat, result.digest)
    if result.spec is None or writer.has(result.digest):  # moved, copied, or a duplicate
        stats.n_reused += 1
        return
    stats.bytes += writer.append(result.digest, result.spec, result.audio_seconds)
    stats.n_computed += 1
    stats.audio_seconds += result.audio_seconds


def file_digest(path: str | Path) -> str:
    """Digest of a file's bytes: the identity of a clip in the feature store."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(DIGEST_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def _worker_store(folder: str) -> FeatureStore:
    return FeatureStore(folder)


def _compute_one(job: tuple[str, FeatureConfig, str]) -> Computed | str:
    """Worker: the file's digest, and its log-mel unless the store has that content already;
    the failure reason when the file cannot be used."""
    path, cfg, folder = job
    try:
        stat = os.stat(path)
        digest = file_digest(path)
    except OSError as error:
        return f"cannot read file: {error}"
    if _worker_store(folder).stored([digest]):
        return Computed(digest, stat, None, 0.0)
    try:
        wave = load_audio(path, cfg.sample_rate)
        spec = log_mel(wave, cfg, name=path)
    except AudioError as error:
        return error.reason
    except OSError as error:
        return f"cannot read file: {error}"
    return Computed(digest, stat, spec, wave.size / cfg.sample_rate)


def _atomic_write(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write via a temp file in the same folder, fsync, os.replace: readers never see half a
    file."""
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".tmp", delete=False) as tmp:
        try:
            write(tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, target)
