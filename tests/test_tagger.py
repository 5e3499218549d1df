"""The FatTagger pyfunc model, saved and loaded through MLflow, on real ESC-50 audio."""
from __future__ import annotations

import base64
import dataclasses
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from mlflow.exceptions import MlflowException
from mlflow.types.schema import DataType

from fat_mlflow.config import FeatureConfig, ServingConfig
from fat_mlflow.data.audio import AudioError, load_audio
from fat_mlflow.data.features import log_mel
from fat_mlflow.engine.models import build_model, load_checkpoint, save_checkpoint
from fat_mlflow.engine.predict import predict_spectrograms
from fat_mlflow.serving.tagger import (
    AUDIO_ROOT_CONFIG,
    PATH_OUTSIDE,
    PATHS_OFF,
    EnsembleSpec,
    MemberRun,
    admitted_path,
    clip_spectrogram,
    load_local_model,
    pyfunc_arguments,
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
    mlflow.pyfunc.save_model(folder / "model",
                             **pyfunc_arguments(spec, folder / "ensemble.json", checkpoints))
    cnn = [folder / "cnn_0.pt", folder / "cnn_1.pt"]
    return folder / "model", cnn, [folder / "vgg16_0.pt"]


@pytest.fixture(scope="module")
def model(saved_model) -> mlflow.pyfunc.PyFuncModel:
    """Loaded as a local caller does: path rows may name any regular file."""
    return load_local_model(str(saved_model[0]))


@pytest.fixture(scope="module")
def served_model(saved_model) -> mlflow.pyfunc.PyFuncModel:
    """Loaded as `mlflow models serve` does by default: no model config."""
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
    assert list(by_path.columns) == [*VOCABULARY, "error", "top_labels"]
    assert ((_scores(by_path) > 0) & (_scores(by_path) < 1)).all()
    # the Ogg and its WAV re-encoding are the same sound: nearly the same scores
    np.testing.assert_allclose(_scores(by_path)[1], _scores(by_path)[2], atol=1e-3)


def test_ensemble_weights_each_run_equally_over_its_folds(model, saved_model, clips):
    _, cnn_paths, vgg_paths = saved_model
    spec = log_mel(load_audio(clips["flac"], SR), FEATURES)
    precision = model.unwrap_python_model().precision  # the same number format as served

    def scores(paths):
        models = [precision.prepare_for_scoring(load_checkpoint(p)) for p in paths]
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
    # the signature drops the unknown column first: the message says so, not "got []"
    assert "expected audio_base64 and/or path, got none of them" in caught.value.message


def test_oversized_clips_are_refused_before_decoding(clips):
    short = ServingConfig(max_clip_seconds=2.0)
    with pytest.raises(AudioError, match="over the limit of 2 s"):
        clip_spectrogram(str(clips["flac"]), None, FEATURES, short, clips["flac"].parent)
    with pytest.raises(AudioError, match="over the limit of 2 s"):
        clip_spectrogram(None, _b64(clips["mp3"]), FEATURES, short)
    small = dataclasses.replace(ServingConfig(), max_clip_bytes=10_000)
    with pytest.raises(AudioError, match=r"MB of audio, over the limit"):
        clip_spectrogram(None, _b64(clips["wav"]), FEATURES, small)
    assert clip_spectrogram(str(clips["wav"]), None, FEATURES, ServingConfig(),
                            clips["wav"].parent).shape[0] == 128


def _assert_matches_signature(out: pd.DataFrame, model: mlflow.pyfunc.PyFuncModel) -> None:
    """The answer has exactly the declared output columns, in order, with the declared types."""
    schema = model.metadata.get_output_schema()
    assert list(out.columns) == schema.input_names()
    for spec in schema.inputs:
        column = out[spec.name]
        if spec.type == DataType.float:
            assert column.dtype == np.float32, spec.name
        else:
            assert all(isinstance(value, str) for value in column), spec.name


@pytest.mark.parametrize("params", [None, {"top_k": 0}, {"top_k": 2}, {"top_k": len(VOCABULARY)}])
def test_answer_matches_the_signature_in_every_case(model, clips, params):
    good_and_bad = pd.DataFrame({"path": [str(clips["flac"]), "/nowhere/x.wav", None],
                                 "audio_base64": [None, None, _b64(clips["ogg"])]})
    all_bad = pd.DataFrame({"audio_base64": ["%%%"]})
    for request in (good_and_bad, all_bad):
        out = model.predict(request, params=params)
        _assert_matches_signature(out, model)
        k = (params or {}).get("top_k", 0)
        assert [len(t.split(",")) if t else 0 for t in out["top_labels"]] == [
            k if error == "" else 0 for error in out["error"]]


def test_path_rows_are_refused_by_default_and_base64_still_scored(served_model, clips, tmp_path):
    request = pd.DataFrame({"path": ["/etc/passwd", "/etc/nonexistent", str(clips["flac"]), None],
                            "audio_base64": [None, None, None, _b64(clips["flac"])]})
    out = served_model.predict(request)
    for row, path in enumerate(request["path"][:3]):
        assert out["error"][row] == f"row {row}: {path}: {PATHS_OFF}"
        assert np.isnan(_scores(out)[row]).all()
    assert out["error"][3] == "" and np.isfinite(_scores(out)[3]).all()


@pytest.fixture()
def audio_root(clips, tmp_path) -> dict[str, Path]:
    """An allowed folder with a clip in it, and traps around and inside it."""
    root = tmp_path / "allowed"
    (root / "sub").mkdir(parents=True)
    (root / "clip.flac").write_bytes(clips["flac"].read_bytes())
    outside = tmp_path / "outside.flac"
    outside.write_bytes(clips["flac"].read_bytes())
    (root / "link_out.flac").symlink_to(outside)
    (root / "link_in.flac").symlink_to(root / "clip.flac")
    (root / "zero.wav").symlink_to("/dev/zero")
    (root / "loop.wav").symlink_to(root / "loop.wav")
    os.mkfifo(root / "fifo.wav")
    return {"root": root, "outside": outside}


def test_only_regular_files_inside_the_audio_root_are_admitted(audio_root):
    root = audio_root["root"]
    assert admitted_path(str(root / "clip.flac"), root) == root / "clip.flac"
    assert admitted_path(str(root / "sub" / ".." / "link_in.flac"), root) == root / "clip.flac"
    outside = [audio_root["outside"], root / ".." / "outside.flac", root / "link_out.flac",
               root / "zero.wav", "/dev/zero", "/etc/passwd", "/etc/nonexistent",
               f"{root}/sub/../../outside.flac", "bad\0name", root / "loop.wav"]
    for path in outside:
        with pytest.raises(AudioError) as refused:
            admitted_path(str(path), root)
        assert refused.value.reason == PATH_OUTSIDE, path
    with pytest.raises(AudioError, match="not a regular file"):
        admitted_path(str(root / "fifo.wav"), root)  # stat only: opening it would block
    with pytest.raises(AudioError, match="not a regular file"):
        admitted_path(str(root / "sub"), root)
    with pytest.raises(AudioError, match="file does not exist"):
        admitted_path(str(root / "gone.wav"), root)
    with pytest.raises(AudioError) as off:
        admitted_path(str(root / "clip.flac"), None)
    assert off.value.reason == PATHS_OFF


def test_a_root_reached_through_a_symlink_admits_its_files(audio_root, tmp_path):
    """Files resolve to their real place: a root named by a symlink (a shared data folder
    linked beside a checkout) must be compared as the folder it leads to."""
    linked = tmp_path / "linked_root"
    linked.symlink_to(audio_root["root"])
    assert admitted_path(str(linked / "clip.flac"), linked) == audio_root["root"] / "clip.flac"
    with pytest.raises(AudioError) as refused:
        admitted_path(str(audio_root["outside"]), linked)
    assert refused.value.reason == PATH_OUTSIDE


def test_model_config_names_the_audio_root(saved_model, audio_root, clips):
    root = audio_root["root"]
    model = mlflow.pyfunc.load_model(str(saved_model[0]),
                                     model_config={AUDIO_ROOT_CONFIG: str(root)})
    out = model.predict(pd.DataFrame({"path": [str(root / "clip.flac"), str(audio_root["outside"])]}))
    assert out["error"].tolist() == ["", f"row 1: {audio_root['outside']}: {PATH_OUTSIDE}"]
    alone = model.predict(pd.DataFrame({"audio_base64": [_b64(clips["flac"])]}))
    np.testing.assert_array_equal(_scores(out)[:1], _scores(alone))
    with pytest.raises(MlflowException, match="not an existing folder"):
        mlflow.pyfunc.load_model(str(saved_model[0]),
                                 model_config={AUDIO_ROOT_CONFIG: str(root / "clip.flac")})
