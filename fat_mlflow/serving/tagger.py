"""The deployable ensemble: an MLflow pyfunc model that tags raw audio with class scores.

A request is a DataFrame whose rows carry audio as a file `path` or as `audio_base64` (bytes of
any common format). Each clip is decoded and turned into a log-mel spectrogram once; every fold
model of every source run then scores the same windows (seed inference: 128-frame windows,
step 48, sigmoid averaged over windows, then over the folds of a run, then over runs, so each
source run counts equally whatever its number of folds).

A bad row (undecodable, empty, silent, missing, over the size limits) never fails the batch:
its scores are NaN and its `error` column says which row and why. A request without any audio
column is rejected as a whole with INVALID_PARAMETER_VALUE, which the scoring server answers
with HTTP 400. The answer always has the columns the signature declares: one score per class,
`error`, and `top_labels` (empty unless `params={"top_k": k}`), so Spark's `spark_udf` can
build its result type from the signature alone.

`path` rows make the process open files, so they are refused unless whoever loads the model
names an audio root: the model config key `audio_root` (`mlflow.pyfunc.load_model(uri,
model_config=...)`, `spark_udf(..., model_config=...)`) or, for `mlflow models serve`, the
environment variable FAT_MLFLOW_AUDIO_ROOT. A path is then resolved (symlinks, `..`) and
must be a regular file inside that root, checked with stat before anything is opened (a
FIFO would block the reader); a path outside the root, or any path while path input is off,
gets one refusal whether or not the file exists.
Local, trusted callers (`fat-mlflow predict`, the ensemble's own evaluation) use
`load_local_model`, whose root is the whole filesystem.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import importlib.metadata
import io
import json
import os
import stat
from collections.abc import Callable, Sequence
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
from packaging.requirements import Requirement
from threadpoolctl import ThreadpoolController
from torch import nn

from fat_mlflow.config import FeatureConfig, ServingConfig, parse_bool
from fat_mlflow.data.audio import AudioError, decode_audio_bytes, load_audio
from fat_mlflow.data.features import log_mel
from fat_mlflow.engine.models import load_checkpoint
from fat_mlflow.engine.precision import Precision, resolve_precision
from fat_mlflow.engine.predict import predict_spectrograms

PATH_COLUMN = "path"
BASE64_COLUMN = "audio_base64"
INPUT_COLUMNS = (BASE64_COLUMN, PATH_COLUMN)
ERROR_COLUMN = "error"
TOP_LABELS_COLUMN = "top_labels"
SPEC_ARTIFACT = "ensemble_spec"  # key of the JSON below among the pyfunc artifacts
AUDIO_ROOT_CONFIG = "audio_root"  # model config key: folder whose files `path` rows may name
AUDIO_ROOT_ENV = "FAT_MLFLOW_AUDIO_ROOT"  # the same for `mlflow models serve`
LOCAL_AUDIO_ROOT = "/"  # trusted local callers may name any regular file
AMP_CONFIG = "amp"  # model config key: bfloat16 where the machine has bf16 units (default on)
AMP_ENV = "FAT_MLFLOW_AMP"  # the same for `mlflow models serve` and `fat-mlflow predict`
PATHS_OFF = (f"refused: this model does not read files ({PATH_COLUMN} input is off); send the "
             f"audio as {BASE64_COLUMN}")
PATH_OUTSIDE = "refused: outside the folder this model may read"
PACKAGE = "fat-mlflow"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # all of fat_mlflow travels with the model
MODEL_CODE = Path(__file__).resolve().with_name("tagger_model.py")  # the model from code


@dataclass(frozen=True)
class MemberRun:
    """One source stage run inside the ensemble: its fold checkpoints and its windows."""

    run_id: str
    stage: str
    arch: str
    window: int
    step: int
    checkpoints: tuple[str, ...]  # pyfunc artifact keys, one per fold model
    cover_end: bool = False  # one more window at the clip's end (`window_starts`)


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
    """Inputs: optional string columns; outputs: one score per class, error, top labels.

    Every output column is always returned (`top_labels` empty when top_k is 0): a consumer
    that builds its result type from this schema, like Spark's `spark_udf`, can fill it.
    """
    inputs = Schema([ColSpec(DataType.string, column, required=False) for column in INPUT_COLUMNS])
    outputs = Schema(
        [ColSpec(DataType.float, label) for label in vocabulary]
        + [ColSpec(DataType.string, ERROR_COLUMN), ColSpec(DataType.string, TOP_LABELS_COLUMN)]
    )
    params = ParamSchema([ParamSpec("top_k", DataType.long, 0)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def pinned_requirements() -> list[str]:
    """The package's runtime dependencies at the versions installed here, `name==version`.

    Like MLflow's own requirement inference, a local build label is dropped (torch
    `2.13.0+cpu` -> `torch==2.13.0`): the same release then resolves from a wheel folder of
    CPU builds as well as from PyPI, which gives a GPU host its CUDA build.
    """
    declared = [Requirement(text) for text in importlib.metadata.requires(PACKAGE) or []]
    names = [req.name for req in declared if req.marker is None]  # extras carry a marker
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in names]


def pyfunc_arguments(spec: EnsembleSpec, spec_path: Path,
                     checkpoints: dict[str, str]) -> dict[str, Any]:
    """What every saved tagger is made of (for `mlflow.pyfunc.save_model` / `log_model`):
    the model code, the fold checkpoints and `spec` (written to `spec_path`), the package
    code, pinned requirements, the signature, and a model config with path input off."""
    spec_path.write_text(spec.to_json())
    return {"python_model": str(MODEL_CODE),
            "artifacts": {**checkpoints, SPEC_ARTIFACT: str(spec_path)},
            "code_paths": [str(PACKAGE_DIR)], "pip_requirements": pinned_requirements(),
            "signature": model_signature(spec.vocabulary),
            "model_config": {AUDIO_ROOT_CONFIG: ""}}


def clip_spectrogram(path: Any, encoded: Any, features: FeatureConfig,
                     limits: ServingConfig, audio_root: Path | None = None) -> np.ndarray:
    """Log-mel of one request row, given as a file path or base64 bytes (exactly one).

    A path is read only when it is a regular file inside `audio_root` (None: paths refused).
    """
    has_path, has_bytes = _present(path), _present(encoded)
    if has_path and has_bytes:
        raise AudioError(PATH_COLUMN, f"both {PATH_COLUMN} and {BASE64_COLUMN} given; give one")
    if has_path:
        wave = _read_path(admitted_path(path, audio_root), features.sample_rate, limits)
        name = str(path)
    elif has_bytes:
        wave = _read_base64(encoded, features.sample_rate, limits)
        name = BASE64_COLUMN
    else:
        raise AudioError(PATH_COLUMN, f"no audio: both {PATH_COLUMN} and {BASE64_COLUMN} are empty")
    if wave.size > limits.max_clip_seconds * features.sample_rate:
        raise AudioError(name, f"{wave.size / features.sample_rate:.0f} s of audio, over the "
                               f"limit of {limits.max_clip_seconds:.0f} s")
    with _blas_libraries().limit(limits=limits.log_mel_blas_threads or None, user_api="blas"):
        return log_mel(wave, features, name)  # limits None: the library's default


@functools.cache
def _blas_libraries() -> ThreadpoolController:
    """The BLAS libraries loaded by the first request (numpy's, which the mel products use),
    found once: threadpoolctl's search costs ~3 ms, a limit on a found library ~30 us."""
    return ThreadpoolController()


def _present(value: Any) -> bool:
    """A given cell: non-empty text (or a path object, for in-process callers)."""
    return isinstance(value, os.PathLike) or (isinstance(value, str) and value != "")


def admitted_path(raw: str | os.PathLike, audio_root: Path | None) -> Path:
    """The regular file `raw` names, when it lies inside `audio_root`; refused otherwise.

    Nothing is opened here: the path is resolved (relative to the working directory; `..`
    and symlinks followed) and stat-ed, so a FIFO or device is refused without blocking.
    Outside the root the refusal is one message whether or not the file exists; inside it the
    reason is precise (those files are the client's to read anyway).
    """
    if audio_root is None:
        raise AudioError(raw, PATHS_OFF)
    try:
        resolved = Path(raw).resolve()
    except (OSError, ValueError, RuntimeError):  # symlink loop, NUL byte; wherever it leads
        raise AudioError(raw, PATH_OUTSIDE) from None
    if not resolved.is_relative_to(audio_root.resolve()):  # a root reached by a symlink too
        raise AudioError(raw, PATH_OUTSIDE)
    try:
        mode = resolved.stat().st_mode
    except FileNotFoundError:
        raise AudioError(raw, "file does not exist") from None
    except OSError as error:
        raise AudioError(raw, f"cannot be read ({error.strerror})") from None
    if not stat.S_ISREG(mode):
        raise AudioError(raw, "not a regular file (a directory, device or FIFO)")
    return resolved


def _read_path(path: Path, sample_rate: int, limits: ServingConfig) -> np.ndarray:
    if path.is_file():  # else gone since admitted: load_audio says so
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


def load_members(spec: EnsembleSpec, checkpoints: dict[str, str],
                 prepare: Callable[[nn.Module], nn.Module]
                 ) -> list[tuple[list[nn.Module], MemberRun]]:
    """Each source run's fold models, loaded from `checkpoints` (artifact key -> file) and
    made ready to score by `prepare`."""
    return [([prepare(load_checkpoint(checkpoints[key])) for key in member.checkpoints], member)
            for member in spec.members]


def ensemble_scores(members: Sequence[tuple[Sequence[nn.Module], MemberRun]],
                    specs: Sequence[np.ndarray], batch_size: int,
                    precision: Precision) -> np.ndarray:
    """Mean over runs of each run's fold-averaged window scores; spectrograms are shared."""
    per_run = [predict_spectrograms(models, specs, member.window, member.step, batch_size,
                                    precision, member.cover_end)
               for models, member in members]
    return np.mean(per_run, axis=0, dtype=np.float64).astype(np.float32)


def top_labels(scores: np.ndarray, vocabulary: Sequence[str], k: int) -> list[str]:
    """Comma-joined k best labels per row (the labels format of the FAT2019 CSVs)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [",".join(vocabulary[i] for i in row) for row in order]


def audio_root_setting(model_config: dict[str, Any] | None) -> Path | None:
    """The folder `path` rows may read: the model config's `audio_root`, else the
    FAT_MLFLOW_AUDIO_ROOT variable; None (no file is read) when neither is set."""
    value = (model_config or {}).get(AUDIO_ROOT_CONFIG) or os.environ.get(AUDIO_ROOT_ENV)
    if not value:
        return None
    root = Path(value).resolve()
    if not root.is_dir():
        raise MlflowException(f"{AUDIO_ROOT_CONFIG} / {AUDIO_ROOT_ENV} = {value!r}: not an "
                              "existing folder", error_code=INVALID_PARAMETER_VALUE)
    return root


def amp_setting(model_config: dict[str, Any] | None) -> bool:
    """bf16 where the machine has bf16 units (the default), or float32: the model config's
    `amp` when a caller passes one, else the FAT_MLFLOW_AMP variable (`mlflow models serve`,
    `fat-mlflow predict`)."""
    value = (model_config or {}).get(AMP_CONFIG)
    if value is None:
        value = os.environ.get(AMP_ENV, "true")
    try:
        return parse_bool(value, f"{AMP_CONFIG} / {AMP_ENV}")
    except ValueError as error:
        raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from error


def load_local_model(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    """The tagger as a local, trusted caller loads it: `path` rows may name any regular file
    (the user of a command line names their own files; a server's clients do not)."""
    return mlflow.pyfunc.load_model(model_uri, model_config={AUDIO_ROOT_CONFIG: LOCAL_AUDIO_ROOT})


class FatTagger(mlflow.pyfunc.PythonModel):
    """The pyfunc model: rows of audio in, one score per class (vocabulary order) out.

    It scores in bfloat16 where the machine has bf16 units, like training; `amp` false (model
    config, or FAT_MLFLOW_AMP=false) keeps it in float32. Either way its fold models are
    scoring copies (`Precision.prepare_for_scoring`: BatchNorm folded, channels_last).
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.audio_root = audio_root_setting(context.model_config)
        self.spec = EnsembleSpec.from_json(Path(context.artifacts[SPEC_ARTIFACT]).read_text())
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = resolve_precision(device, amp_setting(context.model_config))
        self.checkpoints = {key: context.artifacts[key]
                            for member in self.spec.members for key in member.checkpoints}
        self.members = load_members(self.spec, self.checkpoints,
                                    self.precision.prepare_for_scoring)

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        top_k = _top_k(params, len(self.spec.vocabulary))
        frame = _request_frame(model_input)
        specs, good, errors = [], [], [""] * len(frame)
        rows = zip(frame.index, frame[PATH_COLUMN], frame[BASE64_COLUMN])
        for position, (label, path, encoded) in enumerate(rows):
            try:
                specs.append(clip_spectrogram(path, encoded, self.spec.features, self.spec.serving,
                                              self.audio_root))
                good.append(position)
            except AudioError as error:
                errors[position] = f"row {label}: {error}"
        scores = np.full((len(frame), len(self.spec.vocabulary)), np.nan, dtype=np.float32)
        if specs:
            scores[good] = ensemble_scores(self.members, specs, self.spec.batch_size,
                                           self.precision)
        out = pd.DataFrame(scores, columns=list(self.spec.vocabulary), index=frame.index)
        out[ERROR_COLUMN] = errors
        labels = [""] * len(frame)
        if top_k:
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
        given = [str(c) for c in model_input.columns]
        # a loaded pyfunc model drops the columns its signature does not declare before
        # predict runs, so a request of unknown columns arrives here with none at all
        got = f"got {given}" if given else "got none of them (other columns are ignored)"
        raise MlflowException(
            f"no audio column in the request: expected {' and/or '.join(INPUT_COLUMNS)}, {got}",
            error_code=INVALID_PARAMETER_VALUE)
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
