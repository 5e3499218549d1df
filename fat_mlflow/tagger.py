"""The deployable ensemble: an MLflow pyfunc model that tags raw audio with class scores.

A request is a DataFrame whose rows carry audio as a file `path` or as `audio_base64` (bytes of
any common format). Each clip is decoded and turned into a log-mel spectrogram once; every fold
model of every source run then scores the same windows (seed inference: 128-frame windows,
step 48, sigmoid averaged over windows, then over the folds of a run, then over runs, so each
source run counts equally whatever its number of folds).

A bad row (undecodable, empty, silent, missing, over the size limits) never fails the batch:
its scores are NaN and its `error` column says which row and why. A request without any audio
column is rejected as a whole with INVALID_PARAMETER_VALUE, which the scoring server answers
with HTTP 400. Note that `path` rows read files on the serving host: expose the server only to
clients allowed to read those files, or send `audio_base64` only.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import soundfile as sf
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from torch import nn

from fat_mlflow.audio import AudioError, decode_audio_bytes, load_audio
from fat_mlflow.config import FeatureConfig, ServingConfig, parse_bool
from fat_mlflow.features import log_mel
from fat_mlflow.models import load_checkpoint
from fat_mlflow.precision import Precision, resolve_precision
from fat_mlflow.predict import predict_spectrograms

PATH_COLUMN = "path"
BASE64_COLUMN = "audio_base64"
INPUT_COLUMNS = (BASE64_COLUMN, PATH_COLUMN)
ERROR_COLUMN = "error"
TOP_LABELS_COLUMN = "top_labels"
SPEC_ARTIFACT = "ensemble_spec"  # key of the JSON below among the pyfunc artifacts


@dataclass(frozen=True)
class MemberRun:
    """One source stage run inside the ensemble: its fold checkpoints and its windows."""

    run_id: str
    stage: str
    arch: str
    window: int
    step: int
    checkpoints: tuple[str, ...]  # pyfunc artifact keys, one per fold model


@dataclass(frozen=True)
class EnsembleSpec:
    """Everything besides the weights that prediction needs; stored as one JSON artifact."""

    features: FeatureConfig
    vocabulary: tuple[str, ...]
    members: tuple[MemberRun, ...]
    batch_size: int
    serving: ServingConfig = ServingConfig()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> EnsembleSpec:
        raw = json.loads(text)
        return cls(
            features=FeatureConfig(**raw["features"]),
            vocabulary=tuple(raw["vocabulary"]),
            members=tuple(
                MemberRun(**{**m, "checkpoints": tuple(m["checkpoints"])}) for m in raw["members"]
            ),
            batch_size=int(raw["batch_size"]),
            serving=ServingConfig(**raw["serving"]),
        )


def model_signature(vocabulary: Sequence[str]) -> ModelSignature:
    """Inputs: optional string columns; outputs: one score per class, error, optional top-k."""
    inputs = Schema([ColSpec(DataType.string, column, required=False) for column in INPUT_COLUMNS])
    outputs = Schema(
        [ColSpec(DataType.float, label) for label in vocabulary]
        + [ColSpec(DataType.string, ERROR_COLUMN),
           ColSpec(DataType.string, TOP_LABELS_COLUMN, required=False)]
    )
    params = ParamSchema([ParamSpec("top_k", DataType.long, 0)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def clip_spectrogram(path: Any, encoded: Any, features: FeatureConfig,
                     limits: ServingConfig) -> np.ndarray:
    """Log-mel of one request row, given as a file path or base64 bytes (exactly one)."""
    has_path, has_bytes = _present(path), _present(encoded)
    if has_path and has_bytes:
        raise AudioError(PATH_COLUMN, f"both {PATH_COLUMN} and {BASE64_COLUMN} given; give one")
    if has_path:
        wave = _read_path(Path(path), features.sample_rate, limits)
        name = str(path)
    elif has_bytes:
        wave = _read_base64(encoded, features.sample_rate, limits)
        name = BASE64_COLUMN
    else:
        raise AudioError(PATH_COLUMN, f"no audio: both {PATH_COLUMN} and {BASE64_COLUMN} are empty")
    if wave.size > limits.max_clip_seconds * features.sample_rate:
        raise AudioError(name, f"{wave.size / features.sample_rate:.0f} s of audio, over the "
                               f"limit of {limits.max_clip_seconds:.0f} s")
    return log_mel(wave, features, name)


def _present(value: Any) -> bool:
    """A given cell: non-empty text (or a path object, for in-process callers)."""
    return isinstance(value, os.PathLike) or (isinstance(value, str) and value != "")


def _read_path(path: Path, sample_rate: int, limits: ServingConfig) -> np.ndarray:
    if path.is_file():
        _check_size(path, path.stat().st_size, limits)
        _check_declared_length(path, path, limits)
    return load_audio(path, sample_rate)


def _read_base64(encoded: str, sample_rate: int, limits: ServingConfig) -> np.ndarray:
    _check_size(BASE64_COLUMN, len(encoded) * 3 // 4, limits)
    try:
        data = base64.b64decode(encoded, validate=True)
    except binascii.Error as error:
        raise AudioError(BASE64_COLUMN, f"not valid base64 ({error})") from error
    _check_declared_length(BASE64_COLUMN, io.BytesIO(data), limits)
    return decode_audio_bytes(data, sample_rate, BASE64_COLUMN)


def _check_size(name: str | Path, n_bytes: int, limits: ServingConfig) -> None:
    if n_bytes > limits.max_clip_bytes:
        raise AudioError(name, f"{n_bytes / 1e6:.1f} MB of audio, over the limit of "
                               f"{limits.max_clip_bytes / 1e6:.0f} MB")


def _check_declared_length(name: str | Path, source: Path | io.BytesIO,
                           limits: ServingConfig) -> None:
    """Refuse an over-long clip from its header, before decoding it fills the memory."""
    try:
        seconds = sf.info(source).duration
    except (sf.LibsndfileError, RuntimeError):
        return  # no readable header: the decoder reports the real problem
    if seconds > limits.max_clip_seconds:
        raise AudioError(name, f"{seconds:.0f} s of audio, over the limit of "
                               f"{limits.max_clip_seconds:.0f} s")


def ensemble_scores(members: Sequence[tuple[Sequence[nn.Module], MemberRun]],
                    specs: Sequence[np.ndarray], batch_size: int,
                    precision: Precision) -> np.ndarray:
    """Mean over runs of each run's fold-averaged window scores; spectrograms are shared."""
    per_run = [predict_spectrograms(models, specs, member.window, member.step, batch_size,
                                    precision)
               for models, member in members]
    return np.mean(per_run, axis=0, dtype=np.float64).astype(np.float32)


def top_labels(scores: np.ndarray, vocabulary: Sequence[str], k: int) -> list[str]:
    """Comma-joined k best labels per row (the labels format of the FAT2019 CSVs)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [",".join(vocabulary[i] for i in row) for row in order]


class FatTagger(mlflow.pyfunc.PythonModel):
    """The pyfunc model: rows of audio in, one score per class (vocabulary order) out.

    It scores in bfloat16 where the machine has bf16 units, like training; the model config
    `{"amp": false}` (`mlflow.pyfunc.load_model(uri, model_config=...)`) keeps it in float32.
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.spec = EnsembleSpec.from_json(Path(context.artifacts[SPEC_ARTIFACT]).read_text())
        amp = parse_bool((context.model_config or {}).get("amp", True), "model config 'amp'")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = resolve_precision(device, amp)
        self.members = [
            ([self.precision.prepare(load_checkpoint(context.artifacts[key]))
              for key in member.checkpoints], member)
            for member in self.spec.members
        ]

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        top_k = _top_k(params, len(self.spec.vocabulary))
        frame = _request_frame(model_input)
        specs, good, errors = [], [], [""] * len(frame)
        rows = zip(frame.index, frame[PATH_COLUMN], frame[BASE64_COLUMN])
        for position, (label, path, encoded) in enumerate(rows):
            try:
                specs.append(clip_spectrogram(path, encoded, self.spec.features, self.spec.serving))
                good.append(position)
            except AudioError as error:
                errors[position] = f"row {label}: {error}"
        scores = np.full((len(frame), len(self.spec.vocabulary)), np.nan, dtype=np.float32)
        if specs:
            scores[good] = ensemble_scores(self.members, specs, self.spec.batch_size,
                                           self.precision)
        out = pd.DataFrame(scores, columns=list(self.spec.vocabulary), index=frame.index)
        out[ERROR_COLUMN] = errors
        if top_k:
            labels = [""] * len(frame)
            for row, text in zip(good, top_labels(scores[good], self.spec.vocabulary, top_k)):
                labels[row] = text
            out[TOP_LABELS_COLUMN] = labels
        return out


def _request_frame(model_input: Any) -> pd.DataFrame:
    """Both audio columns, missing ones as empty; a request with neither is rejected whole.

    The index is kept: error rows are named by it, so a slice of a larger table reports the
    row numbers of that table (over HTTP the index is simply 0..n-1).
    """
    if not isinstance(model_input, pd.DataFrame):
        raise MlflowException(
            f"expected a table with column(s) {' and/or '.join(INPUT_COLUMNS)}, got "
            f"{type(model_input).__name__}", error_code=INVALID_PARAMETER_VALUE)
    known = [column for column in INPUT_COLUMNS if column in model_input.columns]
    if not known:
        raise MlflowException(
            f"no audio column in the request: expected {' and/or '.join(INPUT_COLUMNS)}, got "
            f"{[str(c) for c in model_input.columns]}", error_code=INVALID_PARAMETER_VALUE)
    return pd.DataFrame({column: model_input[column] if column in model_input.columns else None
                         for column in INPUT_COLUMNS}, index=model_input.index)


def _top_k(params: dict[str, Any] | None, n_classes: int) -> int:
    raw = (params or {}).get("top_k", 0)
    try:
        k = int(raw)
    except (TypeError, ValueError):
        k = -1
    if not 0 <= k <= n_classes:
        raise MlflowException(f"top_k must be an integer in [0, {n_classes}], got {raw!r}",
                              error_code=INVALID_PARAMETER_VALUE)
    return k
