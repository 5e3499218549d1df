"""`fat-mlflow predict` keeps its work: every clip that can be scored is written, every bad one
is named, and an interrupted run continues where it stopped.

The folder holds real ESC-50 audio in the shapes a user's folder has (11.025 / 44.1 / 48 kHz,
mono and stereo, 16 / 24 / 32-bit integer and float WAV, Ogg, FLAC, 10 ms, 3 minutes) and the six
kinds of broken file; the model is the tiny pipeline's registered champion.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import librosa
import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from fat_mlflow.data.audio import load_audio
from fat_mlflow.serving.submission import score_files
from fat_mlflow.serving.tagger import load_local_model

SR = 44_100
MODEL = "models:/fat2019-tagger@champion"
BAD = {  # name -> (how the file is broken, the reason the error gives)
    "bad_empty.wav": (lambda path, real: path.write_bytes(b""), "empty file (0 bytes)"),
    "bad_text.wav": (lambda path, real: path.write_text("fname,labels\nnot audio\n"),
                     "not a readable audio file"),
    "bad_truncated.wav": (lambda path, real: path.write_bytes(real[: len(real) // 2]),
                          "truncated WAV file"),
    "bad_zero_frames.wav": (lambda path, real: sf.write(path, np.zeros(0), SR),
                            "no audio samples (0 frames)"),
    "bad_all_zero.wav": (lambda path, real: sf.write(path, np.zeros(2 * SR), SR),
                         "silent: every sample is zero"),
    "bad_nan.wav": (lambda path, real: sf.write(path, np.full(SR, np.nan, np.float32), SR,
                                                subtype="FLOAT"),
                    "contains NaN or infinite sample values"),
}


@pytest.fixture(scope="module")
def clips(esc50_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return clip_folder(esc50_dir, tmp_path_factory.mktemp("clips"))


def clip_folder(esc50_dir: Path, folder: Path) -> Path:
    """14 files: 8 good ones of every shape, 6 broken ones (sorted first by name)."""
    meta = pd.read_csv(esc50_dir / "meta" / "esc50.csv")
    audio = esc50_dir / "audio"
    names = list(meta["filename"])
    wave = load_audio(audio / names[0], SR)
    other = load_audio(audio / names[1], SR)
    loudest = int(np.argmax(np.abs(wave)))
    resampled = librosa.resample(wave, orig_sr=SR, target_sr=48_000)
    good = {  # name -> (samples, rate, subtype)
        "good_a_44k_mono_16.wav": (wave, SR, "PCM_16"),
        "good_b_48k_stereo_24.wav": (np.stack([resampled, resampled[::-1]], axis=1), 48_000,
                                     "PCM_24"),
        "good_c_11k_mono_32.wav": (librosa.resample(other, orig_sr=SR, target_sr=11_025), 11_025,
                                   "PCM_32"),
        "good_d_44k_stereo_float.wav": (np.stack([other, other[::-1]], axis=1), SR, "FLOAT"),
        "good_e_10ms.wav": (wave[loudest: loudest + SR // 100], SR, "PCM_16"),
        "good_z_3min.wav": (np.tile(wave, 36), SR, "PCM_16"),
    }
    for name, (samples, rate, subtype) in good.items():
        sf.write(folder / name, samples, rate, subtype=subtype)
    for suffix in (".ogg", ".flac"):  # the published files themselves
        source = next(name for name in names if name.endswith(suffix))
        shutil.copyfile(audio / source, folder / f"good_f_{source}")
    real = (folder / "good_a_44k_mono_16.wav").read_bytes()
    for name, (breaking, _) in BAD.items():
        breaking(folder / name, real)
    return folder


def good_and_bad(folder: Path) -> tuple[list[str], list[str]]:
    names = sorted(p.name for p in folder.iterdir())
    return [n for n in names if n.startswith("good_")], [n for n in names if n.startswith("bad_")]


def predict_command(args: list[str]) -> list[str]:
    """`fat-mlflow predict` as a user types it, one clip per model call: a clip's scores then
    do not depend on which clips share its batch (they can, in the last float32 digit)."""
    return [sys.executable, "-c", "from fat_mlflow.cli import main; main()", "predict",
            "--model", MODEL, "--batch-clips", "1", *args]


def predict(tiny_chain, args: list[str]) -> tuple[int, str, str]:
    done = subprocess.run(predict_command(args), cwd=tiny_chain.root, capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "MLFLOW_TRACKING_URI": tiny_chain.tracking_uri})
    return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def reference(tiny_chain, clips: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted `predict` of the folder (exit 1: it has bad clips)."""
    output = tmp_path_factory.mktemp("reference") / "submission.csv"
    code, out, err = predict(tiny_chain, [str(clips), "-o", str(output)])
    assert code == 1, out + err
    return output


def test_every_good_clip_is_written_and_every_bad_one_named(tiny_chain, clips, reference):
    good, bad = good_and_bad(clips)
    submission = pd.read_csv(reference)
    assert list(submission["fname"]) == good
    with tiny_chain.store():
        model = load_local_model(MODEL)
        expected = score_files(model, [clips / name for name in good], progress=False)
    vocabulary = list(submission.columns[1:])
    np.testing.assert_allclose(submission[vocabulary], expected[vocabulary], atol=1e-6)
    errors = pd.read_csv(reference.with_name("submission.errors.csv"))
    assert list(errors["fname"]) == bad
    for name, error in zip(errors["fname"], errors["error"]):
        assert str(clips / name) in error and BAD[name][1] in error, error
    assert [p.name for p in reference.parent.iterdir()] == ["submission.csv",
                                                            "submission.errors.csv"]


def test_bad_clips_each_on_their_own_line_and_skip_exits_zero(tiny_chain, clips, reference,
                                                             tmp_path):
    good, bad = good_and_bad(clips)
    output = tmp_path / "skip.csv"
    stop = predict(tiny_chain, [str(clips), "-o", str(output)])
    skip = predict(tiny_chain, [str(clips), "-o", str(output), "--bad-audio", "skip"])
    assert stop[0] == 1 and skip[0] == 0
    for _, out, err in (stop, skip):
        assert f"wrote {len(good)} rows to {output}" in out
        assert "Traceback" not in err
        lines = err.splitlines()
        for name in bad:
            named = [line for line in lines if line.startswith("  ") and f"{clips / name}:" in line]
            assert len(named) == 1 and BAD[name][1] in named[0], name
    assert "Error: 6 clip(s) could not be scored" in stop[2] and "--bad-audio skip" in stop[2]
    assert "Error:" not in skip[2]
    assert output.read_bytes() == reference.read_bytes()


def test_interrupted_run_continues_where_it_stopped(tiny_chain, clips, reference, tmp_path):
    """Killed after a few clips (and a torn last line, as a kill in mid-write leaves), the rerun
    scores only the rest and writes the same bytes as the uninterrupted run."""
    output = tmp_path / "submission.csv"
    child = subprocess.Popen(predict_command([str(clips), "-o", str(output)]),
                             cwd=tiny_chain.root, start_new_session=True,
                             env={**os.environ, "MLFLOW_TRACKING_URI": tiny_chain.tracking_uri},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    partial = []
    while not partial or len(partial[0].read_text().splitlines()) < 4:  # header + 3 clips
        assert child.poll() is None, child.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
        partial = list(tmp_path.glob(".submission.csv.*.partial"))
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert not output.exists()
    written = partial[0].read_bytes()
    kept = written[: written.rfind(b"\n") + 1].count(b"\n") - 1  # whole rows, less the header
    with partial[0].open("ab") as sink:
        sink.write(b"good_zz_torn.wav,0.0123")  # no newline: cut off mid-row

    code, out, err = predict(tiny_chain, [str(clips), "-o", str(output)])
    assert code == 1, err
    assert f"({kept} scored by an interrupted run)" in out
    assert output.read_bytes() == reference.read_bytes()
    assert not partial[0].exists()
