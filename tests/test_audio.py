"""Decoding real ESC-50 audio in every common shape, and the errors for broken files."""
from __future__ import annotations

from pathlib import Path

import librosa
import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from fat_mlflow.data.audio import AudioError, decode_audio_bytes, load_audio

SR = 44_100


@pytest.fixture(scope="module")
def esc50_meta(esc50_dir: Path) -> pd.DataFrame:
    return pd.read_csv(esc50_dir / "meta" / "esc50.csv")


@pytest.fixture(scope="module")
def clip(esc50_dir: Path, esc50_meta: pd.DataFrame) -> np.ndarray:
    """Two seconds of a real FLAC clip (a dog bark) at 44.1 kHz."""
    name = esc50_meta.loc[esc50_meta["filename"].str.endswith(".flac"), "filename"].iloc[0]
    wave, rate = sf.read(esc50_dir / "audio" / name, dtype="float32")
    assert rate == SR
    return wave[: 2 * SR]


@pytest.mark.parametrize("suffix", [".flac", ".ogg"])
def test_reads_the_published_esc50_formats(esc50_dir, esc50_meta, suffix):
    name = esc50_meta.loc[esc50_meta["filename"].str.endswith(suffix), "filename"].iloc[0]
    wave = load_audio(esc50_dir / "audio" / name, SR)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert 4.9 * SR < wave.size < 5.1 * SR
    assert 0 < np.abs(wave).max() <= 1.0


def test_stereo_is_averaged_to_mono(tmp_path, clip):
    left, right = clip, 0.5 * clip[::-1]
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), SR, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path, SR), (left + right) / 2, atol=1e-6)


@pytest.mark.parametrize(
    "subtype, tolerance", [("FLOAT", 1e-7), ("PCM_24", 2**-22), ("PCM_16", 2**-14)]
)
def test_sample_formats_decode_to_the_same_float_signal(tmp_path, clip, subtype, tolerance):
    path = tmp_path / f"{subtype}.wav"
    sf.write(path, clip, SR, subtype=subtype)
    wave = load_audio(path, SR)
    assert wave.dtype == np.float32
    np.testing.assert_allclose(wave, clip, atol=tolerance)


@pytest.mark.parametrize("rate", [8_000, 16_000, 48_000])
def test_other_rates_are_resampled(tmp_path, clip, rate):
    path = tmp_path / f"{rate}.wav"
    sf.write(path, librosa.resample(clip, orig_sr=SR, target_sr=rate), rate, subtype="PCM_16")
    wave = load_audio(path, SR)
    assert abs(wave.size - clip.size) <= SR // rate + 1
    # Below 4 kHz every rate keeps the signal, so the low band must survive the round trip.
    low = librosa.resample(clip, orig_sr=SR, target_sr=8_000)
    back = librosa.resample(wave, orig_sr=SR, target_sr=8_000)[: low.size]
    assert np.corrcoef(low[: back.size], back)[0, 1] > 0.95


def test_mp3_decodes(tmp_path, clip):
    if "MP3" not in sf.available_formats():
        pytest.skip(f"libsndfile {sf.__libsndfile_version__} has no MP3 support (needs >= 1.1)")
    path = tmp_path / "clip.mp3"
    sf.write(path, clip, SR, format="MP3")
    wave = load_audio(path, SR)
    assert abs(wave.size - clip.size) < 0.05 * SR  # encoder delay and frame padding
    rms = lambda x: float(np.sqrt(np.mean(x**2)))  # noqa: E731
    assert rms(wave) == pytest.approx(rms(clip), rel=0.1)


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match="does not exist"):
        load_audio(tmp_path / "nope.wav", SR)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty file \(0 bytes\)") as info:
        load_audio(path, SR)
    assert info.value.path == str(path) and str(path) in str(info.value)


def test_zero_length_audio(tmp_path):
    path = tmp_path / "zero.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), SR)
    with pytest.raises(AudioError, match="no audio samples"):
        load_audio(path, SR)


def test_text_named_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("fname,labels\nthis is not audio\n")
    with pytest.raises(AudioError, match="not a readable audio file") as info:
        load_audio(path, SR)
    assert info.value.reason.startswith("not a readable audio file")


def test_truncated_wav_is_refused_not_shortened(tmp_path, clip):
    path = tmp_path / "cut.wav"
    sf.write(path, clip, SR, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match="truncated WAV"):
        load_audio(path, SR)


def test_wav_header_only(tmp_path, clip):
    path = tmp_path / "header.wav"
    sf.write(path, clip, SR, subtype="PCM_16")
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(AudioError, match="not a readable audio file"):
        load_audio(path, SR)


def test_corrupt_flac(tmp_path, esc50_dir, esc50_meta):
    name = esc50_meta.loc[esc50_meta["filename"].str.endswith(".flac"), "filename"].iloc[0]
    data = (esc50_dir / "audio" / name).read_bytes()
    path = tmp_path / "cut.flac"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match="not a readable audio file"):
        load_audio(path, SR)


def test_non_finite_samples(tmp_path, clip):
    path = tmp_path / "nan.wav"
    broken = clip.copy()
    broken[100] = np.nan
    sf.write(path, broken, SR, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        load_audio(path, SR)


def test_bytes_decode_like_the_file(tmp_path, clip):
    path = tmp_path / "clip.flac"
    sf.write(path, clip, 16_000 * 2, subtype="PCM_16")
    np.testing.assert_array_equal(
        decode_audio_bytes(path.read_bytes(), SR, "clip.flac"), load_audio(path, SR)
    )


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"", "empty file"),
        (b"RIFF\x00\x00\x00\x00WAVEjunk", "not a readable"),
        (b"hello" * 50, "not a readable"),
    ],
)
def test_bad_bytes_name_the_upload(payload, reason):
    with pytest.raises(AudioError, match=reason) as info:
        decode_audio_bytes(payload, SR, "upload-7.wav")
    assert info.value.path == "upload-7.wav"
