"""Decode audio of any common format into mono float32 at the pipeline's sample rate.

Every failure becomes an `AudioError` that names the file and says what is wrong with it, so a
bad clip among thousands is found from the message alone instead of surfacing later as NaNs.
"""
from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path
from typing import BinaryIO

import librosa
import numpy as np
import soundfile as sf


class AudioError(ValueError):
    """A clip that cannot be turned into usable audio; `.path` names it, `.reason` says why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Read a file (wav/flac/ogg/mp3/..., any width, channels, rate) as mono float32."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "file does not exist")
    size = path.stat().st_size
    if size == 0:
        raise AudioError(path, "empty file (0 bytes)")
    with path.open("rb") as handle:
        try:
            data, rate = _read_checked(handle, size, path)
        except sf.LibsndfileError as error:
            data, rate = _decode_with_audioread(path, error)
    return _finish(data, rate, sample_rate, path)


def decode_audio_bytes(data: bytes, sample_rate: int, name: str) -> np.ndarray:
    """Decode an uploaded clip (serving); errors name `name`, the client's file name."""
    if not data:
        raise AudioError(name, "empty file (0 bytes)")
    try:
        samples, rate = _read_checked(io.BytesIO(data), len(data), name)
    except sf.LibsndfileError as error:
        raise AudioError(name, f"not a readable audio file ({error.error_string})") from error
    return _finish(samples, rate, sample_rate, name)


def _read_checked(handle: BinaryIO, size: int, name: str | Path) -> tuple[np.ndarray, int]:
    """soundfile read, after refusing a WAV whose header promises more data than exists."""
    missing = _wav_missing_bytes(handle, size)
    if missing:
        raise AudioError(name, f"truncated WAV file: {missing} bytes of audio data missing")
    handle.seek(0)
    return sf.read(handle, dtype="float32", always_2d=True)


def _decode_with_audioread(path: Path, sf_error: sf.LibsndfileError) -> tuple[np.ndarray, int]:
    """Formats libsndfile lacks (m4a, wma, ...) go through librosa's audioread backends."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data, rate = librosa.load(path, sr=None, mono=False, dtype=np.float32)
    except Exception as error:  # audioread raises several unrelated types; all mean "unreadable"
        raise AudioError(
            path, f"not a readable audio file ({sf_error.error_string})"
        ) from error
    return np.atleast_2d(data).T, int(rate)


def _finish(data: np.ndarray, rate: int, sample_rate: int, name: str | Path) -> np.ndarray:
    """(frames, channels) at `rate` -> validated mono float32 at `sample_rate`."""
    if data.shape[0] == 0:
        raise AudioError(name, "contains no audio samples (0 frames)")
    if not np.isfinite(data).all():
        raise AudioError(name, "contains NaN or infinite sample values")
    mono = librosa.to_mono(data.T)
    if rate != sample_rate:
        mono = librosa.resample(mono, orig_sr=rate, target_sr=sample_rate)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _wav_missing_bytes(handle: BinaryIO, size: int) -> int:
    """Bytes the WAV header declares but the file lacks (0 if complete or not a WAV).

    libsndfile silently returns the intact part of a cut WAV, so a half-copied file would
    otherwise pass as a shorter clip. Unfinalised headers (data size 0 or 0xFFFFFFFF, written
    by streaming recorders) declare nothing and are accepted.
    """
    handle.seek(0)
    head = handle.read(12)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return 0
    offset = 12
    while offset + 8 <= size:
        handle.seek(offset)
        chunk_id, chunk_size = struct.unpack("<4sI", handle.read(8))
        if chunk_id == b"data":
            if chunk_size in (0, 0xFFFFFFFF):
                return 0
            return max(0, chunk_size - (size - offset - 8))
        offset += 8 + chunk_size + (chunk_size & 1)
    return 0
