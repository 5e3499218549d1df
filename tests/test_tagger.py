"""The FatTagger pyfunc model, saved and loaded through MLflow, on real ESC-50 audio."""
from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from mlflow.exceptions import MlflowException

from fat_mlflow.audio import AudioError, load_audio
from fat_mlflow.config import FeatureConfig, ServingConfig
from fat_mlflow.features import log_mel
from fat_mlflow.models import build_model, load_checkpoint, save_checkpoint
from fat_mlflow.predict import predict_spectrograms
from fat_mlflow.tagger import (
    SPEC_ARTIFACT,
    EnsembleSpec,
    FatTagger,
    MemberRun,
    clip_spectrogram,
    model_signature,
)

VOCABULARY = ("dog", "rooster", "rain", "sea_waves", "crackling_fire")
FEATURES = FeatureConfig()
SR = FEATURES.sample_rate


def _b64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


@pytest.fixture(scope="module")
def clips(esc50_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Real clips in four formats: the published FLAC and Ogg, plus WAV and MP3 re-encodings."""
    meta = pd.read_csv(esc50_dir / "meta" / "esc50.csv")
    folder = tmp_path_factory.mktemp("clips")
    flac = esc50_dir / "audio" / meta.loc[meta["filename"].str.endswith(".flac"), "filename"].iloc[0]
    ogg = esc50_dir / "audio" / meta.loc[meta["filename"].str.endswith(".ogg"), "filename"].iloc[1]
    wave, rate = sf.read(ogg, dtype="float32")
    sf.write(folder / "clip.wav", wave, rate, subtype="PCM_16")
    sf.write(folder / "clip.mp3", wave, rate, format="MP3")
    sf.write(folder / "silent.wav", np.zeros(rate, np.float32), rate)
    (folder / "text.wav").write_bytes(b"this is not audio at all" * 10)
    return {"flac": flac, "ogg": ogg, "wav": folder / "clip.wav", "mp3": folder / "clip.mp3",
            "silent": folder / "silent.wav", "text": folder / "text.wav"}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> tuple[Path, list[Path], list[Path]]:
    """A two-run pyfunc (CNN run with 2 folds, VGG run with 1 fold) saved to a folder."""
    folder = tmp_path_factory.mktemp("tagger")
    checkpoints: dict[str, str] = {}
    members = []
    for index, (arch, n_folds) in enumerate((("cnn", 2), ("vgg16", 1))):
        keys = []
        for fold in range(n_folds):
            torch.manual_seed(10 * index + fold)
            path = folder / f"{arch}_{fold}.pt"
            save_checkpoint(build_model(arch, len(VOCABULARY), 0.125), path, arch=arch,
                            width=0.125, n_classes=len(VOCABULARY))
            keys.append(f"run{index}_fold{fold}")
            checkpoints[keys[-1]] = str(path)
        members.append(MemberRun(f"run{index}", "stage2", arch, 128, 48, tuple(keys)))
    spec = EnsembleSpec(FEATURES, VOCABULARY, tuple(members), batch_size=32)
    spec_path = folder / "ensemble.json"
    spec_path.write_text(spec.to_json())
    mlflow.pyfunc.save_model(folder / "model", python_model=FatTagger(),
                             artifacts={**checkpoints, SPEC_ARTIFACT: str(spec_path)},
                             signature=model_signature(VOCABULARY))
    cnn = [folder / "cnn_0.pt", folder / "cnn_1.pt"]
    return folder / "model", cnn, [folder / "vgg16_0.pt"]


@pytest.fixture(scope="module")
def model(saved_model) -> mlflow.pyfunc.PyFuncModel:
    return mlflow.pyfunc.load_model(str(saved_model[0]))


def _scores(frame: pd.DataFrame) -> np.ndarray:
    return frame[list(VOCABULARY)].to_numpy(dtype=np.float64)


def test_spec_survives_its_json_form():
    spec = EnsembleSpec(FeatureConfig(hop_length=347), VOCABULARY,
                        (MemberRun("r", "stage3", "cnn", 128, 48, ("a", "b")),), 64,
                        ServingConfig(max_clip_seconds=30.0))
    assert EnsembleSpec.from_json(spec.to_json()) == spec


def test_scores_from_path_and_from_base64_are_identical(model, clips):
    names = ["flac", "ogg", "wav", "mp3"]
    by_path = model.predict(pd.DataFrame({"path": [str(clips[n]) for n in names]}))
    by_bytes = model.predict(pd.DataFrame({"audio_base64": [_b64(clips[n]) for n in names]}))
    assert (by_path["error"] == "").all() and (by_bytes["error"] == "").all()
    np.testing.assert_array_equal(_scores(by_path), _scores(by_bytes))
    assert list(by_path.columns) == [*VOCABULARY, "error"]
    assert ((_scores(by_path) > 0) & (_scores(by_path) < 1)).all()
    # the Ogg and its WAV re-encoding are the same sound: nearly the same scores
    np.testing.assert_allclose(_scores(by_path)[1], _scores(by_path)[2], atol=1e-3)


def test_ensemble_weights_each_run_equally_over_its_folds(model, saved_model, clips):
    _, cnn_paths, vgg_paths = saved_model
    spec = log_mel(load_audio(clips["flac"], SR), FEATURES)
    precision = model.unwrap_python_model().precision  # the same number format as served

    def scores(paths):
        models = [precision.prepare(load_checkpoint(p)) for p in paths]
        return predict_spectrograms(models, [spec], 128, 48, precision=precision)

    cnn, vgg = scores(cnn_paths), scores(vgg_paths)
    served = _scores(model.predict(pd.DataFrame({"path": [str(clips["flac"])]})))
    np.testing.assert_allclose(served, (cnn + vgg) / 2, atol=1e-6)
    assert np.abs(served - (2 * cnn + vgg) / 3).max() > 1e-6  # not a plain mean of 3 models


def test_bad_rows_are_reported_and_good_rows_still_scored(model, clips, tmp_path):
    truncated = tmp_path / "cut.wav"
    truncated.write_bytes(clips["wav"].read_bytes()[:5000])
    request = pd.DataFrame({
        "path": [str(clips["flac"]), str(tmp_path / "missing.ogg"), None, str(clips["silent"]),
                 None, str(truncated), None, str(clips["ogg"]), str(clips["ogg"])],
        "audio_base64": [None, None, _b64(clips["text"]), None, "%%% not base64 %%%", None,
                         None, None, _b64(clips["ogg"])],
    })
    out = model.predict(request)
    errors = out["error"].tolist()
    assert errors[0] == "" and errors[7] == ""
    expected = {1: "file does not exist", 2: "not a readable audio file", 3: "silent",
                4: "not valid base64", 5: "truncated WAV", 6: "no audio", 8: "both path and"}
    for row, reason in expected.items():
        assert errors[row].startswith(f"row {row}: ") and reason in errors[row], errors[row]
        assert np.isnan(_scores(out)[row]).all()
    alone = model.predict(pd.DataFrame({"path": [str(clips["flac"]), str(clips["ogg"])]}))
    np.testing.assert_allclose(_scores(out)[[0, 7]], _scores(alone), atol=1e-6)


def test_error_rows_are_named_by_the_callers_index(model, clips):
    request = pd.DataFrame({"path": [str(clips["flac"]), "/nowhere/x.wav"]}, index=[40, 41])
    out = model.predict(request)
    assert list(out.index) == [40, 41]
    assert out.loc[41, "error"].startswith("row 41: /nowhere/x.wav")


def test_top_k_labels_follow_the_scores(model, clips):
    out = model.predict(pd.DataFrame({"path": [str(clips["flac"]), "/nowhere/x.wav"]}),
                        params={"top_k": 2})
    scores = _scores(out)[0]
    best = [VOCABULARY[i] for i in np.argsort(-scores)[:2]]
    assert out["top_labels"].tolist() == [",".join(best), ""]


@pytest.mark.parametrize("top_k", [-1, len(VOCABULARY) + 1])
def test_top_k_out_of_range_is_rejected(model, clips, top_k):
    with pytest.raises(MlflowException, match="top_k") as caught:
        model.predict(pd.DataFrame({"path": [str(clips["flac"])]}), params={"top_k": top_k})
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"


def test_request_without_audio_column_is_rejected_whole(model, clips):
    with pytest.raises(MlflowException, match="no audio column") as caught:
        model.predict(pd.DataFrame({"file": [str(clips["flac"])]}))
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"


def test_oversized_clips_are_refused_before_decoding(clips):
    short = ServingConfig(max_clip_seconds=2.0)
    with pytest.raises(AudioError, match="over the limit of 2 s"):
        clip_spectrogram(str(clips["flac"]), None, FEATURES, short)
    with pytest.raises(AudioError, match="over the limit of 2 s"):
        clip_spectrogram(None, _b64(clips["mp3"]), FEATURES, short)
    small = dataclasses.replace(ServingConfig(), max_clip_bytes=10_000)
    with pytest.raises(AudioError, match=r"MB of audio, over the limit"):
        clip_spectrogram(None, _b64(clips["wav"]), FEATURES, small)
    assert clip_spectrogram(str(clips["wav"]), None, FEATURES, ServingConfig()).shape[0] == 128
