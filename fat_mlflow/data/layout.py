"""Read and validate a dataset in the Kaggle FAT2019 layout.

```
root/sample_submission.csv   fname, then one column per class (the vocabulary, in order)
root/train_curated.csv       fname,labels   (labels: comma-separated class names)  + train_curated/
root/train_noisy.csv         fname,labels   optional; stage 1 needs it              + train_noisy/
root/test/                   the clips named in sample_submission.csv (or all audio files there)
root/test_truth.csv          fname,labels   optional ground truth, to score the test set
```
Every problem in the label files is collected and reported in one error, so a broken dataset is
fixed in one pass instead of one row per run. File names are plain names only: nothing outside
the data root is ever read.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.preprocessing import MultiLabelBinarizer

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
MAX_LISTED_PROBLEMS = 20


class DataLayoutError(ValueError):
    """The dataset on disk does not follow the FAT2019 layout; the message says where."""


@dataclass(frozen=True, eq=False)
class FatDataset:
    """Validated splits: DataFrames with columns fname, labels (list[str]), path (absolute).

    `test` has a `labels` column only when test_truth.csv exists.
    """

    root: Path
    vocabulary: list[str]
    curated: pd.DataFrame
    test: pd.DataFrame
    noisy_or_none: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def has_noisy(self) -> bool:
        return self.noisy_or_none is not None

    @property
    def noisy(self) -> pd.DataFrame:
        """The noisy split; raises when train_noisy.csv is absent (only stage 1 needs it)."""
        if self.noisy_or_none is None:
            raise DataLayoutError(
                f"{self.root / 'train_noisy.csv'}: not found; the noisy set is needed by the "
                "stages that train on or select from noisy clips"
            )
        return self.noisy_or_none

    @property
    def has_test_truth(self) -> bool:
        """Test clips with labels to score them by (none without clips or test_truth.csv)."""
        return "labels" in self.test.columns and len(self.test) > 0

    def targets(self, df: pd.DataFrame) -> np.ndarray:
        """Multi-hot (n, n_classes) float32 in vocabulary order."""
        if "labels" not in df.columns:
            raise DataLayoutError("these clips have no labels (test set without test_truth.csv)")
        binarizer = MultiLabelBinarizer(classes=self.vocabulary)
        return binarizer.fit_transform(df["labels"]).astype(np.float32)


def load_dataset(root: Path | str) -> FatDataset:
    """Read and validate the whole layout; one DataLayoutError lists every bad row."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataLayoutError(f"{root}: data root is not a directory")
    submission = _read_csv(root / "sample_submission.csv", ["fname"])
    vocabulary = _vocabulary(submission, root / "sample_submission.csv")
    problems: list[str] = []
    curated = _labelled_split(root, "train_curated", vocabulary, problems)
    noisy = (
        _labelled_split(root, "train_noisy", vocabulary, problems)
        if (root / "train_noisy.csv").exists()
        else None
    )
    test = _test_split(root, submission, vocabulary, problems)
    if problems:
        shown = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
        more = len(problems) - MAX_LISTED_PROBLEMS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise DataLayoutError(
            f"{len(problems)} problem(s) in the dataset at {root}:\n  {shown}{tail}"
        )
    return FatDataset(
        root=root, vocabulary=vocabulary, curated=curated, test=test, noisy_or_none=noisy
    )


def dataset_fingerprint(ds: FatDataset) -> str:
    """Short hash of vocabulary, file names and labels: tells datasets (and their edits) apart."""

    def rows(df: pd.DataFrame | None) -> list | None:
        if df is None:
            return None
        labels = df["labels"] if "labels" in df.columns else [None] * len(df)
        return [[fname, label] for fname, label in zip(df["fname"], labels)]

    payload = {
        "vocabulary": ds.vocabulary,
        "curated": rows(ds.curated),
        "noisy": rows(ds.noisy_or_none),
        "test": rows(ds.test),
    }
    return hashlib.sha1(json.dumps(payload).encode()).hexdigest()[:12]


def _read_csv(path: Path, required: list[str]) -> pd.DataFrame:
    """All cells as text ('NA' stays a string); structural problems raise at once."""
    if not path.is_file():
        raise DataLayoutError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataLayoutError(
            f"{path}: not UTF-8 text ({error.reason} at byte {error.start})"
        ) from error
    except pd.errors.EmptyDataError as error:
        raise DataLayoutError(f"{path}: empty file, expected a header row") from error
    except pd.errors.ParserError as error:
        raise DataLayoutError(f"{path}: malformed CSV ({error})") from error
    missing = [column for column in required if column not in df.columns]
    if missing:
        raise DataLayoutError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    return df


def _vocabulary(submission: pd.DataFrame, path: Path) -> list[str]:
    vocabulary = [str(column) for column in submission.columns[1:]]
    if submission.columns[0] != "fname" or not vocabulary:
        raise DataLayoutError(f"{path}: expected 'fname' then one column per class")
    unnamed = [column for column in vocabulary if column.startswith("Unnamed:")]
    if unnamed:
        raise DataLayoutError(f"{path}: class column(s) without a name: {unnamed}")
    if len(vocabulary) < 2:
        raise DataLayoutError(
            f"{path}: one class ({vocabulary[0]!r}); tagging ranks the classes of a clip "
            "against each other (lwlrap), so it needs at least two")
    return vocabulary


def _labelled_split(
    root: Path, name: str, vocabulary: list[str], problems: list[str]
) -> pd.DataFrame:
    """`<name>.csv` + `<name>/` as fname, labels, path; bad rows are appended to `problems`."""
    csv_path = root / f"{name}.csv"
    df = _read_csv(csv_path, ["fname", "labels"])
    fnames = _checked_files(csv_path, root / name, df["fname"].tolist(), problems)
    labels = _parsed_labels(csv_path, df["fname"], df["labels"], set(vocabulary), problems)
    return _frame(fnames, root / name, labels)


def _test_split(
    root: Path, submission: pd.DataFrame, vocabulary: list[str], problems: list[str]
) -> pd.DataFrame:
    """Clips of sample_submission.csv (or every audio file in test/), plus optional truth."""
    folder = root / "test"
    if len(submission):
        fnames = submission["fname"].tolist()
    elif folder.is_dir():
        fnames = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
    else:
        fnames = []
    fnames = _checked_files(root / "sample_submission.csv", folder, fnames, problems)
    truth_path = root / "test_truth.csv"
    if not truth_path.exists():
        return _frame(fnames, folder, None)
    truth = _read_csv(truth_path, ["fname", "labels"])
    labels = _parsed_labels(truth_path, truth["fname"], truth["labels"], set(vocabulary), problems)
    listed, scored = set(fnames), set(truth["fname"])
    where = truth_path.name
    problems += [f"{where}: fname {f!r} is not a test clip" for f in sorted(scored - listed)]
    problems += [f"{where}: no labels for test clip {f!r}" for f in fnames if f not in scored]
    return _frame(fnames, folder, labels)


def _checked_files(
    csv_path: Path, folder: Path, fnames: list[str], problems: list[str]
) -> list[str]:
    """Keep safe, unique, existing file names; report the others."""
    if fnames and not folder.is_dir():
        raise DataLayoutError(
            f"{folder}: folder not found, but {csv_path.name} lists {len(fnames)} clips"
        )
    seen: set[str] = set()
    kept: list[str] = []
    for line, fname in enumerate(fnames, start=2):
        where = f"{csv_path.name} line {line}"
        if not _is_plain_name(fname):
            problems.append(f"{where}: fname {fname!r} must be a plain file name inside {folder}")
        elif fname in seen:
            problems.append(f"{where}: duplicate fname {fname!r}")
        elif not (folder / fname).is_file():
            problems.append(f"{where}: listed file does not exist: {folder / fname}")
        else:
            kept.append(fname)
        seen.add(fname)
    return kept


def _is_plain_name(fname: str) -> bool:
    return (
        bool(fname.strip())
        and fname not in (".", "..")
        and not any(bad in fname for bad in ("/", "\\", "\0", ".."))
        and Path(fname).name == fname
    )


def _parsed_labels(
    csv_path: Path,
    fnames: pd.Series,
    raw_labels: pd.Series,
    vocabulary: set[str],
    problems: list[str],
) -> dict[str, list[str]]:
    """fname -> label list; blank lists and labels outside the vocabulary are reported."""
    out: dict[str, list[str]] = {}
    for line, (fname, raw) in enumerate(zip(fnames, raw_labels), start=2):
        where = f"{csv_path.name} line {line} (fname {fname!r})"
        labels = [label.strip() for label in str(raw).split(",")]
        if not any(labels):
            problems.append(f"{where}: blank labels")
            continue
        bad = [label for label in labels if label not in vocabulary]
        problems += [
            f"{where}: label {label!r} is not in the vocabulary"
            if label
            else f"{where}: empty label in {raw!r}"
            for label in bad
        ]
        repeated = sorted({label for label in labels if label and labels.count(label) > 1})
        problems += [f"{where}: label {label!r} given twice" for label in repeated]
        if not bad and not repeated:
            out[fname] = labels
    return out


def _frame(fnames: list[str], folder: Path, labels: dict[str, list[str]] | None) -> pd.DataFrame:
    data: dict[str, list] = {"fname": fnames}
    if labels is not None:
        data["labels"] = [labels.get(f, []) for f in fnames]
    data["path"] = [folder / f for f in fnames]
    return pd.DataFrame(data)
