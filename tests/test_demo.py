"""The ESC-50 demo dataset: layout, leakage guard, label-noise bookkeeping, determinism."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
import soundfile as sf
from click.testing import CliRunner

from fat_mlflow.cli import main
from fat_mlflow.config import DemoConfig
from fat_mlflow.data.demo import build_demo_dataset, demo_clip_names
from fat_mlflow.data.esc50 import Esc50Error
from fat_mlflow.data.layout import load_dataset


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_loads_as_a_fat2019_dataset(demo_data, esc50_dir):
    ds = load_dataset(demo_data)
    meta = pd.read_csv(esc50_dir / "meta" / "esc50.csv")
    in_demo = meta["filename"].map(lambda name: Path(name).stem).isin(demo_clip_names())
    clips_per_class = meta[in_demo]["category"].value_counts()
    well_recorded = clips_per_class[clips_per_class >= DemoConfig().min_clips_per_class]
    assert ds.vocabulary == sorted(well_recorded.index) and 2 <= len(ds.vocabulary) < 50
    assert ds.has_noisy and ds.has_test_truth
    assert len(ds.noisy) > 1.5 * len(ds.curated)
    assert set(ds.vocabulary) == {label for labels in ds.curated["labels"] for label in labels}
    assert all(len(labels) == 1 for labels in ds.curated["labels"])
    info = sf.info(ds.curated["path"].iloc[0])
    shape = (info.format, info.subtype, info.samplerate, info.channels)
    assert shape == ("WAV", "PCM_16", 44_100, 1)


def test_no_source_recording_is_in_two_splits(demo_data, esc50_dir):
    sources = pd.read_csv(demo_data / "demo_sources.csv")
    esc50 = pd.read_csv(esc50_dir / "meta" / "esc50.csv").set_index("filename")
    split_of: dict[str, set[str]] = {}
    for split, names in zip(sources["split"], sources["sources"]):
        for name in names.split(";"):
            key = f"{esc50.loc[name, 'category']}/{esc50.loc[name, 'src_file']}"
            split_of.setdefault(key, set()).add(split)
    assert max(len(splits) for splits in split_of.values()) == 1
    assert len(split_of) > 3 * len(load_dataset(demo_data).vocabulary)  # several per class


def test_noise_truth_matches_the_noisy_labels(demo_data):
    given = pd.read_csv(demo_data / "train_noisy.csv")
    truth = pd.read_csv(demo_data / "noise_truth.csv")
    assert truth["fname"].tolist() == given["fname"].tolist()
    assert truth["given_labels"].tolist() == given["labels"].tolist()
    same = [
        set(true.split(",")) == set(given.split(","))
        for true, given in zip(truth["true_labels"], truth["given_labels"])
    ]
    assert truth["labels_correct"].tolist() == same
    assert ((truth["noise_kind"] == "none") == truth["labels_correct"]).all()
    assert set(truth["noise_kind"]) == {"none", "wrong", "missing", "extra"}
    assert 0.45 <= truth["labels_correct"].mean() <= 0.55


def test_noisy_clips_are_longer_and_test_has_mixtures(demo_data):
    ds = load_dataset(demo_data)
    noisy_seconds = [sf.info(p).duration for p in ds.noisy["path"]]
    assert max(noisy_seconds) > 14.0 and sum(noisy_seconds) / len(noisy_seconds) > 8.0
    mixtures = sum(len(labels) == 2 for labels in ds.test["labels"])
    assert 0.15 <= mixtures / len(ds.test) <= 0.25


def test_same_seed_gives_the_same_bytes(demo_data, esc50_dir, tmp_path):
    built = json.loads((demo_data / "demo_summary.json").read_text())
    again = tmp_path / "again"
    summary = build_demo_dataset(esc50_dir, again, seed=0, scale=built["scale"])
    assert summary == {"root": str(again), **built}
    assert file_hashes(again) == file_hashes(demo_data)


@pytest.mark.parametrize("scale", [0.0, 1.5])
def test_scale_must_be_a_fraction(esc50_dir, tmp_path, scale):
    with pytest.raises(ValueError, match="scale"):
        build_demo_dataset(esc50_dir, tmp_path, scale=scale)


def test_refuses_to_write_into_a_non_empty_folder(demo_data, esc50_dir):
    with pytest.raises(FileExistsError, match="not empty"):
        build_demo_dataset(esc50_dir, demo_data)


def test_curated_per_class_thins_the_curated_set_only(demo_data, esc50_dir, tmp_path):
    thinned = tmp_path / "thinned"
    build_demo_dataset(esc50_dir, thinned, scale=0.15, recipe=DemoConfig(curated_per_class=1))
    full, thin = load_dataset(demo_data), load_dataset(thinned)
    per_class = thin.curated["labels"].map(lambda labels: labels[0]).value_counts()
    assert set(per_class.index) == set(full.vocabulary) and per_class.max() == 1
    assert len(thin.curated) < len(full.curated)
    for table in ("train_noisy.csv", "test_truth.csv"):
        assert (thinned / table).read_bytes() == (demo_data / table).read_bytes()


def test_all_classes_on_request(esc50_dir, tmp_path):
    summary = build_demo_dataset(esc50_dir, tmp_path / "all", scale=0.15,
                                 recipe=DemoConfig(min_clips_per_class=1))
    assert summary["n_classes"] == 50


def test_too_few_well_recorded_classes_is_a_clear_error(esc50_dir, tmp_path):
    with pytest.raises(Esc50Error, match="at least 1000 clips"):
        build_demo_dataset(esc50_dir, tmp_path / "none", recipe=DemoConfig(min_clips_per_class=1000))
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())


@pytest.mark.parametrize("shares", [(0.5, 0.5, 0.5), (0.0, 0.5, 0.5)])
def test_split_shares_must_be_positive_and_sum_to_one(shares):
    with pytest.raises(ValueError, match="shares"):
        DemoConfig(curated_share=shares[0], noisy_share=shares[1], test_share=shares[2])


def test_a_source_without_its_licence_builds_with_one_warning_line(esc50_dir, tmp_path):
    source = tmp_path / "esc50"
    source.mkdir()
    for part in ("audio", "meta"):
        (source / part).symlink_to(esc50_dir / part)
    result = CliRunner().invoke(main, ["demo-data", str(tmp_path / "data"), "--esc50",
                                       str(source), "--scale", "0.05"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "LICENSE not found" in warnings[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "data" / "ESC50_LICENSE").exists()
    load_dataset(tmp_path / "data")
