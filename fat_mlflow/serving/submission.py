"""Score a folder or CSV of clips with a tagger model and write a Kaggle submission.

The model is any loaded `FatTagger` pyfunc (usually `models:/fat2019-tagger@champion`); the
submission's class columns are the model's vocabulary, in its order, which is the order of
the dataset's sample_submission.csv the model was trained on.

Nothing scored is lost: every clip that can be scored is written, the others are listed in an
errors CSV beside the output. Scored rows are appended to a hidden partial file after each batch
(one per output and model), so a rerun after an interruption scores only the clips still
missing; the submission itself is written at the end, in one atomic step.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.pyfunc import PyFuncModel
from tqdm.auto import tqdm

from fat_mlflow.config import ServingConfig
from fat_mlflow.data.layout import AUDIO_SUFFIXES, DataLayoutError
from fat_mlflow.serving.tagger import ERROR_COLUMN, PATH_COLUMN, TOP_LABELS_COLUMN

MAX_LISTED = 20
ERRORS_SUFFIX = ".errors.csv"


@dataclass
class SubmissionResult:
    """What `write_submission` did: rows written (of them taken from an interrupted run's
    partial file), and the clips that could not be scored (fname -> error)."""

    output: Path
    n_written: int
    n_resumed: int
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def errors_csv(self) -> Path:
        return errors_path(self.output)


def errors_path(output: Path) -> Path:
    """`submission.csv` -> `submission.errors.csv`: the clips that could not be scored."""
    return output.with_name(output.stem + ERRORS_SUFFIX)


def partial_path(output: Path, model: PyFuncModel) -> Path:
    """Rows scored so far for `output` by this very model (its MLflow model UUID)."""
    return output.with_name(f".{output.name}.{model.metadata.model_uuid or 'model'}.partial")


def list_clips(source: Path, audio_dir: Path | None = None) -> tuple[pd.DataFrame, list[str] | None]:
    """Clips to score as (fname, path), plus the class columns a CSV source prescribes.

    `source` is a folder (every audio file in it, sorted) or a CSV with an `fname` column,
    e.g. sample_submission.csv; its files live in `audio_dir`, by default the `test/` folder
    beside the CSV (the Kaggle layout). Class columns after `fname` must match the model.
    """
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
        if not paths:
            raise DataLayoutError(f"{source}: no audio files ({', '.join(AUDIO_SUFFIXES)})")
        return pd.DataFrame({"fname": [p.name for p in paths], "path": [str(p) for p in paths]}), None
    if not source.is_file():
        raise DataLayoutError(f"{source}: neither an audio folder nor a CSV file")
    table = pd.read_csv(source, dtype=str, keep_default_na=False)
    if "fname" not in table.columns:
        raise DataLayoutError(f"{source}: needs an 'fname' column, found {list(table.columns)}")
    folder = Path(audio_dir) if audio_dir is not None else source.parent / "test"
    paths = [folder / name for name in table["fname"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        shown = "\n  ".join(missing[:MAX_LISTED])
        raise DataLayoutError(f"{len(missing)} clip(s) named in {source} not found:\n  {shown}")
    classes = [str(c) for c in table.columns if c != "fname"]
    clips = pd.DataFrame({"fname": table["fname"], "path": [str(p) for p in paths]})
    return clips, classes or None


def model_vocabulary(model: PyFuncModel) -> list[str]:
    """The class columns of the model's output schema, in order."""
    names = model.metadata.get_output_schema().input_names()
    return [name for name in names if name not in (ERROR_COLUMN, TOP_LABELS_COLUMN)]


def score_batches(model: PyFuncModel, paths: pd.Series,
                  batch_clips: int = ServingConfig.batch_clips, progress: bool = True,
                  params: dict[str, Any] | None = None) -> Iterator[pd.DataFrame]:
    """Model output of `paths`, `batch_clips` clips per call, one frame per batch; a row's
    index is its path's index (the tagger's error messages name that row)."""
    request = pd.DataFrame({PATH_COLUMN: paths.astype(str)})
    with tqdm(total=len(request), desc="tagging", unit="clip", disable=not progress) as bar:
        for begin in range(0, len(request), batch_clips):
            scored = model.predict(request.iloc[begin:begin + batch_clips], params=params)
            bar.update(len(scored))
            yield scored


def score_files(model: PyFuncModel, paths: Sequence[str], batch_clips: int = ServingConfig.batch_clips,
                progress: bool = True, params: dict[str, Any] | None = None) -> pd.DataFrame:
    """Model output for every path, `batch_clips` clips per call; rows keep the input order."""
    return pd.concat(score_batches(model, pd.Series([str(p) for p in paths], dtype=object),
                                   batch_clips, progress, params))


def check_classes(model: PyFuncModel, classes: list[str] | None) -> list[str]:
    """The model's vocabulary, after checking it is the clip list's class columns (if any)."""
    vocabulary = model_vocabulary(model)
    if classes is not None and classes != vocabulary:
        raise DataLayoutError(
            f"the clip list's class columns differ from the model's vocabulary "
            f"({len(classes)} vs {len(vocabulary)} classes; first difference: "
            f"{next((a, b) for a, b in zip(classes + [None], vocabulary + [None]) if a != b)})"
        )
    return vocabulary


def write_submission(model: PyFuncModel, clips: pd.DataFrame, output: Path,
                     classes: list[str] | None = None,
                     batch_clips: int = ServingConfig.batch_clips,
                     progress: bool = True) -> SubmissionResult:
    """Score the clips (fname, path) into `output`: fname + one score column per class, in the
    clips' order, without the clips that cannot be scored (see the module docstring)."""
    vocabulary = check_classes(model, classes)
    header = ",".join(["fname", *vocabulary]) + "\n"
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(output, model)
    done = _resume(partial, header)
    todo = clips[~clips["fname"].isin(done)]
    failures: dict[str, str] = {}
    with partial.open("a", encoding="utf-8") as sink:
        if not done:
            sink.write(header)
        for scored in score_batches(model, todo["path"], batch_clips, progress):
            bad = (scored[ERROR_COLUMN] != "").to_numpy()
            failures.update(zip(todo.loc[scored.index[bad], "fname"], scored[ERROR_COLUMN][bad]))
            good = scored.loc[~bad, vocabulary]
            good.insert(0, "fname", todo.loc[good.index, "fname"].to_numpy())
            good.to_csv(sink, header=False, index=False)
            sink.flush()
            os.fsync(sink.fileno())
    rows = pd.read_csv(partial, dtype={"fname": str}, keep_default_na=False)
    rows = rows.drop_duplicates("fname", keep="last").set_index("fname")
    order = [name for name in clips["fname"] if name in rows.index]
    _write_atomically(rows.loc[order].reset_index(), output)
    errors = clips[clips["fname"].isin(failures)].assign(
        error=lambda frame: frame["fname"].map(failures))
    if failures:
        _write_atomically(errors[["fname", "path", "error"]], errors_path(output))
    else:
        errors_path(output).unlink(missing_ok=True)  # a previous run's list is out of date
    partial.unlink()
    return SubmissionResult(output, len(order), len(done & set(order)),
                            dict(zip(errors["fname"], errors["error"])))


def _resume(partial: Path, header: str) -> set[str]:
    """fnames already in the partial file of an interrupted run; its torn last line (written
    when the run was killed) is cut off. A partial file of other columns is started afresh."""
    if not partial.exists():
        return set()
    data = partial.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if not whole.startswith(header.encode()):
        partial.unlink()
        return set()
    if len(whole) < len(data):
        with partial.open("r+b") as handle:
            handle.truncate(len(whole))
    return set(pd.read_csv(partial, usecols=["fname"], dtype=str, keep_default_na=False)["fname"])


def _write_atomically(table: pd.DataFrame, target: Path) -> None:
    """CSV via a temporary file in the same folder and a rename: never half a file."""
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        table.to_csv(staging, index=False)
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
