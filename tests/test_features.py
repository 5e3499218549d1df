"""log_mel against librosa, padding and silence, and the on-disk cache's keys, reuse and writes."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import librosa
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from click.testing import CliRunner

from fat_mlflow.cli import main
from fat_mlflow.config import FeatureConfig
from fat_mlflow.data.audio import AudioError, load_audio
from fat_mlflow.data.features import (
    FeatureCache,
    _atomic_write,
    default_cache_root,
    log_mel,
    store_folder,
)
from fat_mlflow.data.store import FeatureStore

CFG = FeatureConfig()


@pytest.fixture(scope="module")
def esc50_clips(esc50_dir: Path) -> list[Path]:
    """Six real clips, FLAC and Ogg."""
    meta = pd.read_csv(esc50_dir / "meta" / "esc50.csv")
    names = list(meta["filename"].iloc[:6])
    return [esc50_dir / "audio" / name for name in names]


@pytest.fixture(scope="module")
def wave(esc50_clips: list[Path]) -> np.ndarray:
    return load_audio(esc50_clips[2], CFG.sample_rate)


def test_log_mel_is_the_seed_preprocessing(wave):
    trimmed, _ = librosa.effects.trim(wave, top_db=60)
    expected = librosa.power_to_db(
        librosa.feature.melspectrogram(
            y=trimmed,
            sr=44_100,
            n_fft=2560,
            hop_length=694,
            n_mels=128,
            fmin=20,
            fmax=22_050,
            power=2,
        ),
        ref=np.max,
    )
    assert expected.shape[1] > CFG.min_frames  # long enough: no padding involved
    spec = log_mel(wave, CFG)
    assert spec.dtype == np.float32 and spec.shape == expected.shape
    np.testing.assert_allclose(spec, expected, atol=1e-4)
    assert spec.max() == 0.0 and spec.min() >= -80.0  # dB to the peak, not standardised


def test_trim_removes_leading_and_trailing_silence(wave):
    padded = np.concatenate([np.zeros(CFG.sample_rate), wave, np.zeros(CFG.sample_rate)])
    frames = log_mel(padded.astype(np.float32), CFG).shape[1]
    # trim works on 512-sample frames, so a few samples of the pad may remain; 2 s would be 127.
    assert abs(frames - log_mel(wave, CFG).shape[1]) <= 4


def test_short_clip_is_zero_padded_to_one_window(wave):
    short = wave[: CFG.sample_rate // 4]
    spec = log_mel(short, CFG)
    assert spec.shape == (CFG.n_mels, CFG.min_frames)
    energy = spec.mean(axis=0)
    middle = CFG.min_frames // 2
    # Centred pad: the sound sits in the middle, the edges hold the -80 dB floor of silence.
    assert energy[0] == energy[-1] == pytest.approx(-80.0)
    assert energy[middle] > -60.0


def test_digital_silence_is_refused():
    with pytest.raises(AudioError, match="silent") as info:
        log_mel(np.zeros(CFG.sample_rate, dtype=np.float32), CFG, name="quiet.wav")
    assert info.value.path == "quiet.wav"


def test_log_mel_rejects_empty_and_multichannel(wave):
    with pytest.raises(AudioError, match="no audio samples"):
        log_mel(np.zeros(0, dtype=np.float32), CFG)
    with pytest.raises(ValueError, match="mono"):
        log_mel(np.stack([wave, wave]), CFG)


def test_cache_stores_log_mel_and_reuses_it(tmp_path, esc50_clips):
    cache = FeatureCache(tmp_path / "cache", CFG)
    first = cache.compute(esc50_clips, n_jobs=2, progress=False)
    assert (first.n_clips, first.n_computed, first.n_reused, first.n_failed) == (6, 6, 0, 0)
    assert first.audio_seconds > 6 * 4.9 and first.bytes > 0
    shards = {p: p.stat().st_size for p in cache.folder.glob("*.f32")}
    assert sum(shards.values()) == first.bytes

    second = cache.compute(esc50_clips, n_jobs=2, progress=False)
    assert (second.n_computed, second.n_reused, second.bytes) == (0, 6, 0)
    assert shards == {p: p.stat().st_size for p in cache.folder.glob("*.f32")}

    loaded = cache.load(esc50_clips[2])
    fresh = log_mel(load_audio(esc50_clips[2], CFG.sample_rate), CFG)
    np.testing.assert_allclose(loaded, fresh, atol=1e-3)  # BLAS thread count changes rounding
    specs = cache.open(esc50_clips)
    assert [specs.frames(i) for i in range(6)] == [cache.load(p).shape[1] for p in esc50_clips]
    np.testing.assert_array_equal(specs.crop(2, 10, 128), loaded[:, 10:138])
    assert not list(cache.folder.glob("*.tmp"))


def test_params_json_describes_the_folder(tmp_path):
    cache = FeatureCache(tmp_path, CFG)
    assert cache.folder == store_folder(tmp_path, CFG) == tmp_path / f"logmel-{CFG.cache_key()}"
    assert json.loads((cache.folder / "params.json").read_text()) == dataclasses.asdict(CFG)


def test_a_changed_parameter_gets_its_own_folder(tmp_path, esc50_clips):
    small = dataclasses.replace(CFG, n_mels=64)
    big_cache, small_cache = FeatureCache(tmp_path, CFG), FeatureCache(tmp_path, small)
    assert big_cache.folder != small_cache.folder
    stats = small_cache.compute(esc50_clips[:1], n_jobs=1, progress=False)
    assert stats.n_computed == 1
    assert small_cache.load(esc50_clips[0]).shape[0] == 64
    with pytest.raises(FileNotFoundError, match="run FeatureCache.compute"):
        big_cache.load(esc50_clips[0])


def test_same_name_in_another_dataset_or_edited_file_never_collides(tmp_path, esc50_clips):
    cache = FeatureCache(tmp_path / "cache", CFG)
    one, two = tmp_path / "a" / "x.wav", tmp_path / "b" / "x.wav"
    for path, source in ((one, esc50_clips[0]), (two, esc50_clips[1])):
        path.parent.mkdir()
        sf.write(path, load_audio(source, CFG.sample_rate), CFG.sample_rate, subtype="PCM_16")
    assert cache.compute([one, two], n_jobs=1, progress=False).n_computed == 2
    assert cache.load(one).shape != cache.load(two).shape or not np.array_equal(
        cache.load(one), cache.load(two))
    sf.write(one, load_audio(esc50_clips[3], CFG.sample_rate), CFG.sample_rate, subtype="PCM_16")
    with pytest.raises(FileNotFoundError, match="run FeatureCache.compute"):
        cache.load(one)  # edited in place: its old entry is not taken for it
    assert cache.compute([one], n_jobs=1, progress=False).n_computed == 1
    np.testing.assert_allclose(cache.load(one),
                               log_mel(load_audio(one, CFG.sample_rate), CFG), atol=1e-3)


def test_a_moved_dataset_reuses_every_entry(tmp_path, esc50_clips):
    """The key is the audio's content: moving or re-extracting the data only re-hashes it."""
    cache = FeatureCache(tmp_path / "cache", CFG)
    before = tmp_path / "before"
    before.mkdir()
    for clip in esc50_clips:
        shutil.copy(clip, before / clip.name)
    cache.compute(sorted(before.iterdir()), n_jobs=2, progress=False)
    size = cache.store.disk_bytes()
    first = cache.load(before / esc50_clips[0].name)
    after = before.rename(tmp_path / "after")
    moved = cache.compute(sorted(after.iterdir()), n_jobs=2, progress=False)
    assert (moved.n_computed, moved.n_reused, moved.bytes) == (0, 6, 0)
    assert len(cache.store.digests()) == 6
    assert cache.store.disk_bytes() - size < 50_000  # the index grew by 6 rows, no audio
    np.testing.assert_array_equal(cache.load(after / esc50_clips[0].name), first)


def test_reading_thousands_of_clips_holds_one_descriptor_per_shard(tmp_path):
    """The fix of "Too many open files": readers keep one descriptor per shard, never one per
    clip, and read with pread (no memory map)."""
    store = FeatureStore(tmp_path)
    rng = np.random.default_rng(0)
    specs = {f"clip{i}": rng.normal(size=(8, 3 + i % 5)).astype(np.float32) for i in range(2000)}
    with store.writer() as writer:
        for digest, spec in specs.items():
            writer.append(digest, spec, 1.0)
    fds = len(os.listdir("/proc/self/fd"))
    opened = store.open(list(specs))
    assert [opened.frames(i) for i in range(len(opened))] == [s.shape[1] for s in specs.values()]
    for index, spec in enumerate(specs.values()):
        np.testing.assert_array_equal(opened.clip(index), spec)
        np.testing.assert_array_equal(opened.crop(index, 1, 2), spec[:, 1:3])
    assert len(os.listdir("/proc/self/fd")) - fds == len(list(tmp_path.glob("*.f32"))) == 1
    with pytest.raises(ValueError, match="frames 2..10 asked of a clip of"):
        opened.crop(0, 2, 8)


def test_every_failure_is_collected(tmp_path, esc50_clips):
    text = tmp_path / "text.wav"
    text.write_text("not audio")
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(CFG.sample_rate), CFG.sample_rate)
    missing = tmp_path / "missing.wav"
    good = tmp_path / "good.flac"
    shutil.copy(esc50_clips[0], good)
    stats = FeatureCache(tmp_path / "cache", CFG).compute(
        [text, good, silent, missing], n_jobs=2, progress=False
    )
    assert (stats.n_computed, stats.n_failed) == (1, 3)
    assert stats.failures == {
        str(text): "not a readable audio file (Format not recognised.)",
        str(silent): "silent: every sample is zero, nothing to describe",
        str(missing): "file does not exist",
    }


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "clip.npy"
    np.save(target, np.ones(3))

    def failing(handle):
        handle.write(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _atomic_write(target, failing)
    np.testing.assert_array_equal(np.load(target), np.ones(3))
    assert list(tmp_path.iterdir()) == [target]


def test_default_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FAT_MLFLOW_CACHE", str(tmp_path))
    assert default_cache_root() == tmp_path
    monkeypatch.delenv("FAT_MLFLOW_CACHE")
    assert default_cache_root() == Path(".fat_cache")


def test_cache_command_lists_stores_and_prunes_old_and_unused_ones(tmp_path, esc50_clips):
    used = FeatureCache(tmp_path, CFG)
    used.compute(esc50_clips[:2], n_jobs=1, progress=False)
    idle = FeatureCache(tmp_path, dataclasses.replace(CFG, n_mels=64))
    idle.compute(esc50_clips[:1], n_jobs=1, progress=False)
    month_ago = time.time() - 31 * 86_400
    os.utime(idle.folder / "last_used", (month_ago, month_ago))
    old = tmp_path / CFG.cache_key()  # the one-file-per-clip format of earlier versions
    old.mkdir()
    (old / "params.json").write_text(json.dumps(dataclasses.asdict(CFG)))
    np.save(old / "clip-0123.npy", np.zeros((128, 128), np.float32))

    listing = CliRunner().invoke(main, ["cache", "--cache-dir", str(tmp_path)])
    assert listing.exit_code == 0, listing.output
    lines = {line.split()[0]: line for line in listing.output.splitlines()}
    assert set(lines) == {used.folder.name, idle.folder.name, old.name}
    assert " 2 clips" in lines[used.folder.name] and "old format" in lines[old.name]

    pruned = CliRunner().invoke(main, ["cache", "--cache-dir", str(tmp_path), "--prune"])
    assert pruned.exit_code == 0 and "removed 2 folder(s)" in pruned.output
    assert used.folder.is_dir() and not idle.folder.exists() and not old.exists()
    assert used.load(esc50_clips[0]).shape[0] == 128
