"""Build a small FAT2019-shaped dataset from the ESC-50 clips, with known label noise.

The real competition data is 24 GB and not redistributable; this gives the pipeline the same
structure at laptop size: a clean curated set, a larger noisy set whose labels are wrong, missing
or extra for about half of the clips (like FAT2019's), and a test set with some two-label
mixtures. Because the noise is synthetic its ground truth is written to `noise_truth.csv`, so the
warm-up selection of stages 3-4 can be checked against it (the training code never reads it).

Leakage guard: ESC-50 cut several clips from one Freesound recording (`src_file`). Each class's
recordings are assigned whole to one split, so no recording is heard in two splits.

Which clips: the 909 ESC-50 clips of this project's own copy (`esc50_demo_clips.txt`, one ESC-50
clip name per line, without extension), so a demo built from the full release archive is the
same dataset as one built from that copy: the same clips in the same splits under the same names
and labels. `clips="all"` uses every clip of the folder instead (all 2,000 of the release).
The audio can differ in the last bits: 497 clips of the project's copy are Ogg Vorbis, as ESC-50
first published them, where the release archive has WAV.

The dataset is written into a staging folder beside `out_dir` and renamed into place when
complete, under a file lock: a folder of that name is always whole, and concurrent builds of one
folder wait for each other.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import click
import numpy as np
import pandas as pd
import soundfile as sf

from fat_mlflow.config import DemoConfig
from fat_mlflow.data.audio import load_audio
from fat_mlflow.data.esc50 import META, Esc50Error
from fat_mlflow.locking import exclusive

SAMPLE_RATE = 44_100
SPLIT_PRIORITY = ("curated", "test", "noisy")  # who gets a class's first recordings
NOISY_PER_CURATED = 1.7
NOISY_MIX_SHARE = 0.25  # noisy clips that mix two classes; the rest concatenate 1-3 clips
CONCAT_COUNTS, CONCAT_PROBS = (1, 2, 3), (0.2, 0.4, 0.4)  # 5-15 s, mostly 10-15 s
NOISY_CLEAN_SHARE = 0.5
SAME_GROUP_WRONG_PROB = 0.7  # wrong labels are mostly confusable (same ESC-50 major group)
ESC50_GROUP_SIZE = 10  # ESC-50 targets 0-9 animals, 10-19 natural, 20-29 human, ...
TEST_MIX_SHARE = 0.2
MIX_GAIN_RANGE = (0.5, 1.0)
PEAK_LIMIT = 0.99
CLIP_CHOICES = ("demo", "all")
DEMO_CLIPS_FILE = "esc50_demo_clips.txt"
SUMMARY_FILE = "demo_summary.json"  # written last: its presence marks a whole demo dataset


class DemoExistsError(FileExistsError):
    """The target folder already holds something other than the demo dataset asked for."""


def demo_clip_names() -> frozenset[str]:
    """The ESC-50 clip names (no extension) the demo is built from by default."""
    text = resources.files("fat_mlflow.data").joinpath(DEMO_CLIPS_FILE).read_text()
    return frozenset(text.split())


def build_demo_dataset(
    esc50_dir: Path | str, out_dir: Path | str, seed: int = 0, scale: float = 1.0,
    clips: str = "demo", reuse: bool = False, recipe: DemoConfig = DemoConfig(),
) -> dict:
    """Write the FAT2019 layout to `out_dir` (must be empty or absent); return a summary.

    Deterministic: the same seed and scale give byte-identical files. `scale` < 1 keeps that
    fraction of every class in every split (at least one clip), for fast tests. `clips`: "demo"
    (the manifest's 909 clips) or "all"; `recipe`: which classes, split shares, curated clips
    per class. With `reuse`, a complete demo dataset of the same settings already in `out_dir`
    (e.g. built by a concurrent run) is returned as it is.
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    if clips not in CLIP_CHOICES:
        raise ValueError(f"clips must be one of {', '.join(CLIP_CHOICES)}, got {clips!r}")
    esc50_dir, out_dir = Path(esc50_dir), Path(out_dir)
    wanted = {"seed": seed, "scale": scale, "clips": clips, "recipe": dataclasses.asdict(recipe)}
    with exclusive(out_dir, f"building the demo dataset in {out_dir}"):
        if reuse and (out_dir / SUMMARY_FILE).is_file():
            built = json.loads((out_dir / SUMMARY_FILE).read_text())
            built_settings = {**built, "clips": built.get("clips", "demo")}
            if all(built_settings.get(key) == value for key, value in wanted.items()):
                return {"root": str(out_dir), **built}
            raise DemoExistsError(f"{out_dir}: holds a demo dataset built with other settings "
                                  f"({built}); remove it or build into a new folder")
        if out_dir.exists() and any(out_dir.iterdir()):
            raise DemoExistsError(f"{out_dir}: not empty; build the demo dataset into a new "
                                  "folder")
        for leftover in out_dir.parent.glob(f".{out_dir.name}.building-*"):
            shutil.rmtree(leftover)  # of a build that was killed
        staging = out_dir.parent / f".{out_dir.name}.building-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            summary = _write_demo(esc50_dir, staging, seed, scale, clips, recipe)
            if out_dir.exists():
                out_dir.rmdir()  # empty (checked above); rename needs it gone or empty
            staging.rename(out_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return {"root": str(out_dir), **summary}


def _write_demo(esc50_dir: Path, out_dir: Path, seed: int, scale: float, choice: str,
                recipe: DemoConfig) -> dict:
    """Every file of the demo dataset into the (new, empty) `out_dir`; returns the summary."""
    meta = _well_recorded_classes(read_meta(esc50_dir, choice), recipe.min_clips_per_class)
    rng = np.random.default_rng(seed)
    pools = {split: _scaled(frame, scale, rng)
             for split, frame in _split_by_source(meta, recipe.split_shares(), rng).items()}
    vocabulary = sorted(meta["category"].unique())
    groups = dict(zip(meta["category"], meta["target"] // ESC50_GROUP_SIZE))
    n_noisy = round(NOISY_PER_CURATED * len(pools["curated"]))
    n_test = len(pools["test"])
    names = iter(clip_names(rng, len(pools["curated"]) + n_noisy + n_test))

    curated = [([row], [row.category]) for row in pools["curated"].itertuples()]
    noisy = [_noisy_composition(pools["noisy"], i, rng) for i in range(n_noisy)]
    test = _test_compositions(pools["test"], rng)
    noise = label_noise([labels for _, labels in noisy], vocabulary, groups, rng)
    named = {split: [(next(names), *item) for item in items]
             for split, items in (("train_curated", curated), ("train_noisy", noisy),
                                  ("test", test))}
    if recipe.curated_per_class:  # after every draw above: noisy and test stay as they are
        kept = set(_at_most(pools["curated"], recipe.curated_per_class,
                            np.random.default_rng([seed, recipe.curated_per_class]))["filename"])
        named["train_curated"] = [item for item in named["train_curated"]
                                  if item[1][0].filename in kept]

    audio_dir = esc50_dir / "audio"
    sources: list[dict] = []
    written: dict[str, list[dict]] = {}
    for index, (split, items) in enumerate(named.items()):
        (out_dir / split).mkdir(parents=True)
        written[split] = []
        render_rng = np.random.default_rng([seed, index])  # a split's audio depends on it alone
        for fname, clips, labels in items:
            wave = _render(clips, audio_dir, render_rng)
            sf.write(out_dir / split / fname, wave, SAMPLE_RATE, subtype="PCM_16")
            seconds = wave.size / SAMPLE_RATE
            written[split].append({"fname": fname, "labels": labels, "seconds": seconds})
            sources.append(
                {
                    "fname": fname,
                    "split": split,
                    "sources": ";".join(c.filename for c in clips),
                    "src_files": ";".join(str(c.src_file) for c in clips),
                }
            )

    write_layout_tables(out_dir, written, noise, vocabulary)
    pd.DataFrame(sources).to_csv(out_dir / "demo_sources.csv", index=False)
    copy_license(esc50_dir, out_dir)

    summary = {
        "seed": seed,
        "scale": scale,
        **({"clips": choice} if choice != "demo" else {}),
        "recipe": dataclasses.asdict(recipe),
        "n_classes": len(vocabulary),
        **{f"n_{split}": len(rows) for split, rows in written.items()},
        **{
            f"seconds_{split}": round(sum(r["seconds"] for r in rows), 1)
            for split, rows in written.items()
        },
        "noisy_clean_fraction": round(float(np.mean([n["kind"] == "none" for n in noise])), 4),
        "n_test_mixtures": sum(len(labels) > 1 for _, labels in test),
    }
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def copy_license(esc50_dir: Path, out_dir: Path) -> None:
    """ESC-50's licence beside the clips cut from it; a source without one gets a warning
    line (the clips are CC BY-NC: say so when passing the dataset on), never a traceback."""
    source = esc50_dir / "LICENSE"
    if source.is_file():
        shutil.copyfile(source, out_dir / "ESC50_LICENSE")
    else:
        click.echo(f"warning: {source} not found; the dataset is written without ESC-50's "
                   "licence (CC BY-NC, see the ESC-50 repository)", err=True)


def read_meta(esc50_dir: Path, choice: str) -> pd.DataFrame:
    """ESC-50's metadata, only the demo's clips unless `choice` is "all", sorted by file name."""
    path = esc50_dir / META
    if not path.is_file():
        raise Esc50Error(f"{path}: ESC-50 metadata not found (is {esc50_dir} the ESC-50 folder?)")
    meta = pd.read_csv(path)
    missing = {"filename", "target", "category", "src_file"} - set(meta.columns)
    if missing:
        raise Esc50Error(f"{path}: missing column(s) {sorted(missing)}")
    if choice == "demo":
        names = meta["filename"].map(lambda filename: Path(filename).stem)
        wanted = demo_clip_names()
        absent = sorted(wanted - set(names))
        if absent:
            raise Esc50Error(f"{esc50_dir}: {len(absent)} of the {len(wanted)} clips of the demo "
                             f"dataset are not in {META} (e.g. {absent[0]}); use a complete "
                             "ESC-50 folder, or build from every clip it has (clips 'all')")
        meta = meta[names.isin(wanted)]
    return meta.sort_values("filename", ignore_index=True)


def _well_recorded_classes(meta: pd.DataFrame, min_clips: int) -> pd.DataFrame:
    """Only the clips of classes with at least `min_clips` clips."""
    counts = meta["category"].value_counts()
    kept = meta[meta["category"].map(counts) >= min_clips].reset_index(drop=True)
    if kept["category"].nunique() < 2:
        raise Esc50Error(f"only {kept['category'].nunique()} class(es) have at least {min_clips} "
                         "clips in this ESC-50 folder; the demo needs two or more")
    return kept


def _split_by_source(meta: pd.DataFrame, shares: dict[str, float],
                     rng: np.random.Generator) -> dict[str, pd.DataFrame]:
    """Per class, assign whole source recordings to splits, aiming at `shares` of its clips.

    The largest recordings go first (ties in seeded order); the first three go to curated, test,
    noisy, the rest to the split furthest below its share. A one-recording class is curated only.
    """
    chosen: dict[str, list[pd.DataFrame]] = {split: [] for split in shares}
    for _, clips in meta.groupby("category", sort=True):
        recordings = [group for _, group in clips.groupby("src_file", sort=True)]
        order = rng.permutation(len(recordings))
        recordings = sorted((recordings[i] for i in order), key=len, reverse=True)
        counts = dict.fromkeys(shares, 0)
        for index, recording in enumerate(recordings):
            if index < len(SPLIT_PRIORITY):
                split = SPLIT_PRIORITY[index]
            else:
                split = max(counts, key=lambda s: shares[s] * len(clips) - counts[s])
            counts[split] += len(recording)
            chosen[split].append(recording)
    return {split: pd.concat(frames, ignore_index=True) for split, frames in chosen.items()}


def _scaled(pool: pd.DataFrame, scale: float, rng: np.random.Generator) -> pd.DataFrame:
    """Keep round(scale * n) clips of each class (at least one), chosen by the seed."""
    return _per_class(pool, lambda n: max(1, round(scale * n)), rng)


def _at_most(pool: pd.DataFrame, per_class: int, rng: np.random.Generator) -> pd.DataFrame:
    """At most `per_class` clips of each class, chosen by `rng`."""
    return _per_class(pool, lambda n: min(per_class, n), rng)


def _per_class(pool: pd.DataFrame, size: Callable[[int], int],
               rng: np.random.Generator) -> pd.DataFrame:
    """`size(n)` of each class's n clips, chosen by `rng`, kept in the pool's order."""
    kept = []
    for _, clips in pool.groupby("category", sort=True):
        chosen = rng.choice(len(clips), size=size(len(clips)), replace=False)
        kept.append(clips.iloc[np.sort(chosen)])
    return pd.concat(kept, ignore_index=True)


def _noisy_composition(
    pool: pd.DataFrame, index: int, rng: np.random.Generator
) -> tuple[list, list[str]]:
    """1-3 clips of one class concatenated, or two classes mixed; classes taken in turn."""
    classes = sorted(pool["category"].unique())
    first = classes[index % len(classes)]
    if rng.random() < NOISY_MIX_SHARE:
        second = rng.choice([c for c in classes if c != first])
        clips = [_pick(pool, first, 1, rng)[0], _pick(pool, second, 1, rng)[0]]
        return clips, [first, str(second)]
    count = int(rng.choice(CONCAT_COUNTS, p=CONCAT_PROBS))
    return _pick(pool, first, count, rng), [first]


def _test_compositions(
    pool: pd.DataFrame, rng: np.random.Generator
) -> list[tuple[list, list[str]]]:
    """As many test clips as pool clips: TEST_MIX_SHARE two-class mixtures, the rest single."""
    rows = list(pool.itertuples())
    n_mix = round(TEST_MIX_SHARE * len(rows)) if pool["category"].nunique() > 1 else 0
    order = rng.permutation(len(rows))
    singles = [([rows[i]], [rows[i].category]) for i in sorted(order[: len(rows) - n_mix])]
    mixtures = []
    for _ in range(n_mix):
        first, second = rng.choice(len(rows), size=2, replace=False)
        while rows[first].category == rows[second].category:
            second = rng.integers(len(rows))
        pair = sorted([rows[first], rows[second]], key=lambda r: r.category)
        mixtures.append((pair, [r.category for r in pair]))
    return singles + mixtures


def _pick(pool: pd.DataFrame, category: str, count: int, rng: np.random.Generator) -> list:
    clips = list(pool[pool["category"] == category].itertuples())
    picked = rng.choice(len(clips), size=count, replace=count > len(clips))
    return [clips[i] for i in picked]


def label_noise(
    true_labels: list[list[str]],
    vocabulary: list[str],
    groups: dict[str, int],
    rng: np.random.Generator,
    clean_share: float = NOISY_CLEAN_SHARE,
) -> list[dict]:
    """Exactly `clean_share` of the clips keep their labels; the others get one error.

    wrong: a true label replaced by another class (mostly of the same major group),
    missing: one of several true labels dropped, extra: an unrelated label added.
    """
    n_clean = round(clean_share * len(true_labels))
    clean = set(rng.permutation(len(true_labels))[:n_clean].tolist())
    out = []
    for index, labels in enumerate(true_labels):
        if index in clean:
            out.append({"kind": "none", "given": list(labels)})
            continue
        kinds = ["wrong", "extra"] + (["missing"] if len(labels) > 1 else [])
        kind = str(rng.choice(kinds))
        given = list(labels)
        others = [c for c in vocabulary if c not in labels]
        if kind == "missing":
            given.pop(int(rng.integers(len(given))))
        elif kind == "extra":
            given.append(str(rng.choice(others)))
        else:
            slot = int(rng.integers(len(given)))
            near = [c for c in others if groups[c] == groups[given[slot]]]
            candidates = near if near and rng.random() < SAME_GROUP_WRONG_PROB else others
            given[slot] = str(rng.choice(candidates))
        out.append({"kind": kind, "given": given})
    return out


def _render(clips: list, audio_dir: Path, rng: np.random.Generator) -> np.ndarray:
    """One clip as is; a single-class list concatenated; two classes mixed at a random gain."""
    waves = [load_audio(audio_dir / clip.filename, SAMPLE_RATE) for clip in clips]
    if len({clip.category for clip in clips}) == 1:
        return np.concatenate(waves)
    first, second = waves
    length = max(first.size, second.size)
    gain = rng.uniform(*MIX_GAIN_RANGE)
    mix = np.pad(first, (0, length - first.size)) + gain * np.pad(second, (0, length - second.size))
    peak = float(np.max(np.abs(mix)))
    return mix * (PEAK_LIMIT / peak) if peak > PEAK_LIMIT else mix


def clip_names(rng: np.random.Generator, count: int, suffix: str = ".wav") -> list[str]:
    """Unique random 8-hex names like FAT2019's: the name tells nothing about the split."""
    names: dict[str, None] = {}
    while len(names) < count:
        names[f"{int(rng.integers(0, 2**32)):08x}{suffix}"] = None
    return list(names)


def write_layout_tables(folder: Path, clips: dict[str, list[dict]], noise: list[dict],
                        vocabulary: list[str]) -> None:
    """The FAT2019 CSVs of `clips` (split -> rows of fname and true labels), the noisy clips
    with the labels `noise` gives them, and `noise_truth.csv` saying which are wrong."""
    write_label_csv(folder / "train_curated.csv", clips["train_curated"])
    write_label_csv(folder / "train_noisy.csv",
                    [{**row, "labels": n["given"]} for row, n in zip(clips["train_noisy"], noise)])
    write_label_csv(folder / "test_truth.csv", clips["test"])
    submission = pd.DataFrame(0.0, index=range(len(clips["test"])), columns=vocabulary)
    submission.insert(0, "fname", [row["fname"] for row in clips["test"]])
    submission.to_csv(folder / "sample_submission.csv", index=False)
    pd.DataFrame({
        "fname": [row["fname"] for row in clips["train_noisy"]],
        "true_labels": [",".join(row["labels"]) for row in clips["train_noisy"]],
        "given_labels": [",".join(n["given"]) for n in noise],
        "labels_correct": [n["kind"] == "none" for n in noise],
        "noise_kind": [n["kind"] for n in noise],
    }).to_csv(folder / "noise_truth.csv", index=False)


def write_label_csv(path: Path, rows: list[dict]) -> None:
    pd.DataFrame(
        {"fname": [r["fname"] for r in rows], "labels": [",".join(r["labels"]) for r in rows]}
    ).to_csv(path, index=False)
