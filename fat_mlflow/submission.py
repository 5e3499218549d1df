"""Score a folder or CSV of clips with a tagger model and write a Kaggle submission.

The model is any loaded `FatTagger` pyfunc (usually `models:/fat2019-tagger@champion`); the
submission's class columns are the model's vocabulary, in its order, which is the order of
the dataset's sample_submission.csv the model was trained on.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.pyfunc import PyFuncModel
from tqdm.auto import tqdm

from fat_mlflow.config import ServingConfig
from fat_mlflow.data import AUDIO_SUFFIXES, DataLayoutError
from fat_mlflow.tagger import ERROR_COLUMN, PATH_COLUMN, TOP_LABELS_COLUMN

MAX_LISTED = 20


class SubmissionError(ValueError):
    """Some clips could not be scored; a submission with holes would be rejected by Kaggle."""

    def __init__(self, failures: dict[str, str]):
        self.failures = failures
        listing = "\n  ".join(failures[name] for name in sorted(failures)[:MAX_LISTED])
        more = len(failures) - MAX_LISTED
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{len(failures)} clip(s) could not be scored:\n  {listing}{tail}")


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


def score_files(model: PyFuncModel, paths: Sequence[str], batch_clips: int = ServingConfig.batch_clips,
                progress: bool = True, params: dict[str, Any] | None = None) -> pd.DataFrame:
    """Model output for every path, `batch_clips` clips per call; rows keep the input order."""
    request = pd.DataFrame({PATH_COLUMN: [str(p) for p in paths]})
    parts = []
    with tqdm(total=len(request), desc="tagging", unit="clip", disable=not progress) as bar:
        for begin in range(0, len(request), batch_clips):
            parts.append(model.predict(request.iloc[begin:begin + batch_clips], params=params))
            bar.update(len(parts[-1]))
    return pd.concat(parts)


def make_submission(model: PyFuncModel, clips: pd.DataFrame, classes: list[str] | None = None,
                    batch_clips: int = ServingConfig.batch_clips,
                    progress: bool = True) -> pd.DataFrame:
    """fname + one score column per class; every clip must score (SubmissionError otherwise)."""
    vocabulary = model_vocabulary(model)
    if classes is not None and classes != vocabulary:
        raise DataLayoutError(
            f"the clip list's class columns differ from the model's vocabulary "
            f"({len(classes)} vs {len(vocabulary)} classes; first difference: "
            f"{next((a, b) for a, b in zip(classes + [None], vocabulary + [None]) if a != b)})"
        )
    submission = score_all(model, clips, batch_clips, progress)[vocabulary]
    submission.insert(0, "fname", clips["fname"].to_numpy())
    return submission


def score_all(model: PyFuncModel, clips: pd.DataFrame, batch_clips: int = ServingConfig.batch_clips,
              progress: bool = True) -> pd.DataFrame:
    """Model output for every clip (fname, path) in order; SubmissionError lists failed clips."""
    scored = score_files(model, clips["path"], batch_clips, progress).reset_index(drop=True)
    failed = (scored[ERROR_COLUMN] != "").to_numpy()
    if failed.any():
        raise SubmissionError(dict(zip(clips["fname"][failed], scored[ERROR_COLUMN][failed])))
    return scored
