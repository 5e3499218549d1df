"""The FAT2019 layout reader: a valid layout, and one error case per way a layout can be broken."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from fat_mlflow.data.audio import load_audio
from fat_mlflow.data.layout import DataLayoutError, dataset_fingerprint, load_dataset

VOCAB = ["Purr", "Bark", "NA"]  # not sorted on purpose; "NA" must stay a class, not a missing value


@pytest.fixture(scope="module")
def wav_bytes(esc50_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """Half a second of a real clip as a 16-bit WAV."""
    meta = pd.read_csv(esc50_dir / "meta" / "esc50.csv")
    wave = load_audio(esc50_dir / "audio" / meta["filename"].iloc[0], 44_100)[:22_050]
    path = tmp_path_factory.mktemp("wav") / "clip.wav"
    sf.write(path, wave, 44_100, subtype="PCM_16")
    return path.read_bytes()


def write_layout(
    root: Path,
    wav: bytes,
    curated: list[tuple[str, str]],
    noisy: list[tuple[str, str]] | None = None,
    test: list[str] = ("t1.wav",),
    truth: list[tuple[str, str]] | None = None,
) -> Path:
    """A FAT2019 layout whose CSVs list the given rows and whose folders hold their files."""
    splits = {"train_curated": curated, "train_noisy": noisy}
    for name, rows in splits.items():
        if rows is None:
            continue
        (root / name).mkdir(parents=True)
        pd.DataFrame(rows, columns=["fname", "labels"]).to_csv(root / f"{name}.csv", index=False)
        for fname, _ in rows:
            if "/" not in fname and ".." not in fname:
                (root / name / fname).write_bytes(wav)
    (root / "test").mkdir()
    for fname in test:
        (root / "test" / fname).write_bytes(wav)
    submission = pd.DataFrame(0.0, index=range(len(test)), columns=VOCAB)
    submission.insert(0, "fname", list(test))
    submission.to_csv(root / "sample_submission.csv", index=False)
    if truth is not None:
        truth_frame = pd.DataFrame(truth, columns=["fname", "labels"])
        truth_frame.to_csv(root / "test_truth.csv", index=False)
    return root


def layout_error(root: Path) -> str:
    with pytest.raises(DataLayoutError) as info:
        load_dataset(root)
    return str(info.value)


def test_valid_layout(tmp_path, wav_bytes):
    root = write_layout(
        tmp_path,
        wav_bytes,
        curated=[("c1.wav", "Bark"), ("c2.wav", "Purr,NA")],
        noisy=[("n1.wav", "NA")],
        test=["t1.wav", "t2.wav"],
        truth=[("t2.wav", "Bark"), ("t1.wav", "Purr, Bark")],
    )
    ds = load_dataset(root)
    assert ds.vocabulary == VOCAB
    assert ds.curated["labels"].tolist() == [["Bark"], ["Purr", "NA"]]
    assert ds.noisy["fname"].tolist() == ["n1.wav"]
    assert ds.test["labels"].tolist() == [["Purr", "Bark"], ["Bark"]]
    assert all(p.is_absolute() and p.is_file() for p in ds.curated["path"])
    np.testing.assert_array_equal(ds.targets(ds.curated), [[0, 1, 0], [1, 0, 1]])
    assert ds.targets(ds.curated).dtype == np.float32
    assert ds.has_noisy and ds.has_test_truth


def test_noisy_is_optional_until_used(tmp_path, wav_bytes):
    ds = load_dataset(write_layout(tmp_path, wav_bytes, curated=[("c1.wav", "Bark")]))
    assert not ds.has_noisy
    with pytest.raises(DataLayoutError, match="train_noisy.csv: not found"):
        ds.noisy


def test_test_clips_come_from_the_folder_when_the_submission_has_no_rows(tmp_path, wav_bytes):
    root = write_layout(tmp_path, wav_bytes, curated=[("c1.wav", "Bark")], test=["b.wav", "a.flac"])
    pd.DataFrame(columns=["fname", *VOCAB]).to_csv(root / "sample_submission.csv", index=False)
    (root / "test" / "readme.txt").write_text("not a clip")
    ds = load_dataset(root)
    assert ds.test["fname"].tolist() == ["a.flac", "b.wav"]
    assert not ds.has_test_truth
    with pytest.raises(DataLayoutError, match="no labels"):
        ds.targets(ds.test)


def test_an_empty_test_folder_gives_no_test_clips_and_nothing_to_score(tmp_path, wav_bytes):
    root = write_layout(tmp_path, wav_bytes, curated=[("c1.wav", "Bark")], test=[], truth=[])
    ds = load_dataset(root)
    assert ds.test.empty and list(ds.test.columns) == ["fname", "labels", "path"]
    assert not ds.has_test_truth  # test_truth.csv exists, but there is no clip to score


def test_a_single_class_vocabulary_is_refused(tmp_path, wav_bytes):
    root = write_layout(tmp_path, wav_bytes, curated=[("c1.wav", "Bark")])
    pd.DataFrame({"fname": ["t1.wav"], "Bark": [0.0]}).to_csv(root / "sample_submission.csv",
                                                              index=False)
    assert f"{root / 'sample_submission.csv'}: one class ('Bark')" in layout_error(root)


def test_a_label_given_twice_in_one_row(tmp_path, wav_bytes):
    root = write_layout(tmp_path, wav_bytes, curated=[("c1.wav", "Bark, Purr,Bark")])
    assert ("train_curated.csv line 2 (fname 'c1.wav'): label 'Bark' given twice"
            in layout_error(root))


@pytest.mark.parametrize("missing", ["train_curated.csv", "sample_submission.csv"])
def test_missing_csv(tmp_path, wav_bytes, missing):
    root = write_layout(tmp_path, wav_bytes, curated=[("c1.wav", "Bark")])
    (root / missing).unlink()
    assert f"{root / missing}: file not found" in layout_error(root)


def test_missing_folder(tmp_path, wav_bytes):
    root = write_layout(tmp_path, wav_bytes, curated=[("c1.wav", "Bark")])
    for clip in (root / "train_curated").iterdir():
        clip.unlink()
    (root / "train_curated").rmdir()
    assert "train_curated: folder not found" in layout_error(root)


def test_missing_column(tmp_path, wav_bytes):
    root = write_layout(tmp_path, wav_bytes, curated=[("c1.wav", "Bark")])
    (root / "train_curated.csv").write_text("fname,label\nc1.wav,Bark\n")
    assert "missing column(s) ['labels']" in layout_error(root)


def test_blank_labels(tmp_path, wav_bytes):
    root = write_layout(tmp_path, wav_bytes, curated=[("c1.wav", "Bark"), ("c2.wav", "")])
    assert "train_curated.csv line 3 (fname 'c2.wav'): blank labels" in layout_error(root)


def test_label_outside_the_vocabulary(tmp_path, wav_bytes):
    root = write_layout(tmp_path, wav_bytes, curated=[("c1.wav", "Bark,Meow")])
    message = layout_error(root)
    where = "train_curated.csv line 2 (fname 'c1.wav')"
    assert f"{where}: label 'Meow' is not in the vocabulary" in message


def test_listed_file_that_does_not_exist(tmp_path, wav_bytes):
    root = write_layout(tmp_path, wav_bytes, curated=[("c1.wav", "Bark"), ("c2.wav", "Bark")])
    (root / "train_curated" / "c2.wav").unlink()
    missing = root.resolve() / "train_curated" / "c2.wav"
    assert f"listed file does not exist: {missing}" in layout_error(root)


def test_duplicate_fnames(tmp_path, wav_bytes):
    root = write_layout(tmp_path, wav_bytes, curated=[("c1.wav", "Bark"), ("c1.wav", "Purr")])
    assert "line 3: duplicate fname 'c1.wav'" in layout_error(root)


@pytest.mark.parametrize("fname", ["../secret.wav", "sub/c1.wav", "..", "/etc/passwd"])
def test_names_that_would_leave_the_folder(tmp_path, wav_bytes, fname):
    (tmp_path / "secret.wav").write_bytes(wav_bytes)  # exists outside the data root
    root = write_layout(tmp_path / "data", wav_bytes, curated=[(fname, "Bark")])
    assert f"fname {fname!r} must be a plain file name" in layout_error(root)


def test_non_utf8_csv(tmp_path, wav_bytes):
    root = write_layout(tmp_path, wav_bytes, curated=[("c1.wav", "Bark")])
    (root / "train_curated.csv").write_bytes("fname,labels\nc1.wav,Bärk\n".encode("latin-1"))
    assert f"{root / 'train_curated.csv'}: not UTF-8 text" in layout_error(root)


def test_test_truth_must_cover_the_test_clips(tmp_path, wav_bytes):
    root = write_layout(
        tmp_path, wav_bytes, curated=[("c1.wav", "Bark")], test=["t1.wav", "t2.wav"],
        truth=[("t1.wav", "Bark"), ("zz.wav", "Bark")],
    )
    message = layout_error(root)
    assert "fname 'zz.wav' is not a test clip" in message
    assert "no labels for test clip 't2.wav'" in message


def test_all_problems_are_reported_at_once(tmp_path, wav_bytes):
    rows = [(f"c{i}.wav", "Meow") for i in range(25)]
    root = write_layout(tmp_path, wav_bytes, curated=rows, noisy=[("n1.wav", "")])
    message = layout_error(root)
    assert message.startswith("26 problem(s)")
    assert "fname 'c19.wav'" in message and "fname 'c20.wav'" not in message
    assert "... and 6 more" in message


def test_fingerprint_tells_datasets_apart(tmp_path, wav_bytes):
    same = [("c1.wav", "Bark"), ("c2.wav", "Purr")]
    first = dataset_fingerprint(load_dataset(write_layout(tmp_path / "a", wav_bytes, same)))
    second = dataset_fingerprint(load_dataset(write_layout(tmp_path / "b", wav_bytes, same)))
    changed = [("c1.wav", "Bark"), ("c2.wav", "NA")]
    relabelled = dataset_fingerprint(load_dataset(write_layout(tmp_path / "c", wav_bytes, changed)))
    assert first == second != relabelled
    assert len(first) == 12
