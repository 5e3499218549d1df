"""FAT2019 at its real size and shape, cut from the ESC-50 clips: a rehearsal for the real data.

The pipeline is built for FAT2019 (29k clips, ~100 h of audio), which is not redistributable;
the demo is 926 clips. This writes the FAT2019 layout at FAT2019's size (`RehearsalConfig`):
80 classes, 4,970 curated clips of 0.3-30 s, 19,815 noisy clips mostly 15 s long, 4,500 test
clips, about 15 % of them with two labels, and noisy labels of which a known share is right
(`noise_truth.csv`, as the demo's). So every step can be run, timed and measured at the real
size before the real data is at hand.

Classes: the 49 ESC-50 classes with two or more source recordings, and as many fixed pairs of
them (two classes of different ESC-50 groups heard together, e.g. `dog_with_rain`) as make 80.
No clip carries both classes of a pair under their own labels, so a pair is a class of its own
(a conjunction a network can learn), listed in `rehearsal_classes.csv`.

Audio: each class's track is cut from its clips at random offsets and lengths, concatenated
(looped) to the clip's duration at random gains, with short fades; a clip mixes the tracks of
its classes. Leakage guard: each ESC-50 class's source recordings (`src_file`) go whole to
the test pool or to the training pool (curated and noisy), so no test recording is heard in
training. Files are FLAC: lossless, ~38 kB a second of audio, encoded at ~1,500x real time
(Ogg Vorbis, 4x smaller, crashed libsndfile on minute-long clips).

Deterministic: the same seed, scales and recipe give the same files (each clip from its own
seed, whichever worker writes it). Built in parallel into a staging folder that a rerun
resumes (whole files only: each is written to a temporary name and renamed), then renamed
into place once complete.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import time
from itertools import combinations
from pathlib import Path

import librosa
import numpy as np
import pandas as pd
import soundfile as sf
from tqdm.auto import tqdm

from fat_mlflow.data.audio import load_audio
from fat_mlflow.config import FeatureConfig, RehearsalConfig
from fat_mlflow.data.demo import (
    ESC50_GROUP_SIZE,
    SUMMARY_FILE,
    DemoExistsError,
    clip_names,
    copy_license,
    label_noise,
    read_meta,
    write_layout_tables,
)
from fat_mlflow.data.esc50 import Esc50Error
from fat_mlflow.locking import exclusive

SAMPLE_RATE = 44_100
AUDIO_SUFFIX = ".flac"
PLAN_FILE = "rehearsal_plan.json"  # in the staging folder: the settings its files were cut for
CLASSES_FILE = "rehearsal_classes.csv"
SPLITS = {"train_curated": "train", "train_noisy": "train", "test": "test"}  # -> source pool
CUT_SECONDS = (0.5, 5.0)  # lengths of the pieces a class's track is cut into
PIECE_GAIN = (0.6, 1.0)
MIX_GAIN = (0.5, 1.0)
FADE_SECONDS = 0.005
PEAK_RANGE = (0.3, 0.99)  # every clip is scaled to a random peak level in this range
TRIM_TOP_DB = FeatureConfig().top_db
SECOND_LABEL_TRIES = 50
CHUNK_CLIPS = 16  # clips per task handed to a worker

_POOLS: dict[str, dict[str, list[np.ndarray]]] = {}  # pool -> class -> trimmed clips (workers)


def build_rehearsal_dataset(esc50_dir: Path | str, out_dir: Path | str, seed: int = 0,
                            scale: float = 1.0, seconds_scale: float = 1.0,
                            recipe: RehearsalConfig = RehearsalConfig(), jobs: int = 0,
                            progress: bool = True) -> dict:
    """Write the rehearsal into `out_dir` (empty or absent); returns its summary.

    `scale` < 1 keeps that share of every split's clips, `seconds_scale` < 1 shortens every
    clip (both for tests); `jobs` worker processes (0: one per core). A complete rehearsal of
    the same settings already in `out_dir` is returned as it is.
    """
    if not (0 < scale <= 1 and 0 < seconds_scale <= 1):
        raise ValueError(f"scale and seconds_scale must be in (0, 1], got {scale}, "
                         f"{seconds_scale}")
    esc50_dir, out_dir = Path(esc50_dir), Path(out_dir)
    settings = {"recipe": "rehearsal", "seed": seed, "scale": scale,
                "seconds_scale": seconds_scale, "rehearsal": dataclasses.asdict(recipe)}
    with exclusive(out_dir, f"building the rehearsal dataset in {out_dir}"):
        if (out_dir / SUMMARY_FILE).is_file():
            built = json.loads((out_dir / SUMMARY_FILE).read_text())
            if all(built.get(key) == value for key, value in settings.items()):
                return {"root": str(out_dir), **built}
            raise DemoExistsError(f"{out_dir}: holds a dataset built with other settings; "
                                  "remove it or build into a new folder")
        if out_dir.exists() and any(out_dir.iterdir()):
            raise DemoExistsError(f"{out_dir}: not empty; build the rehearsal into a new folder")
        staging = out_dir.parent / f".{out_dir.name}.building"
        summary = _build(esc50_dir, staging, settings, seed, scale, seconds_scale, recipe, jobs,
                         progress)
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    return {"root": str(out_dir), **summary}


def _build(esc50_dir: Path, staging: Path, settings: dict, seed: int, scale: float,
           seconds_scale: float, recipe: RehearsalConfig, jobs: int, progress: bool) -> dict:
    """Every file into `staging`, resuming what an interrupted build of the same settings
    wrote there; returns the summary."""
    started = time.perf_counter()
    plan_text = json.dumps(settings, sort_keys=True)
    if staging.exists() and not _same_plan(staging, plan_text):
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    (staging / PLAN_FILE).write_text(plan_text)
    for leftover in staging.glob("*/*.tmp"):
        leftover.unlink()
    meta = read_meta(esc50_dir, "demo")
    rng = np.random.default_rng(seed)
    pools = _source_pools(meta, recipe, rng)
    components = _classes(sorted(pools["train"]["category"].unique()), meta, recipe, rng)
    vocabulary = sorted(components)
    clips = {split: _plan_split(split, recipe, scale, seconds_scale, components, rng)
             for split in SPLITS}
    names = iter(clip_names(rng, sum(map(len, clips.values())), AUDIO_SUFFIX))
    tasks = []
    for number, (split, rows) in enumerate(clips.items()):
        (staging / split).mkdir(exist_ok=True)
        for index, row in enumerate(rows):
            row["fname"] = next(names)
            tasks.append((str(staging / split / row["fname"]), SPLITS[split],
                          [components[label] for label in row["labels"]], row["seconds"],
                          (seed, number, index)))
    groups = {name: _group(meta, parts[0]) for name, parts in components.items()}
    noise = label_noise([row["labels"] for row in clips["train_noisy"]], vocabulary, groups,
                        rng, recipe.noisy_clean_share)
    resumed = sum(Path(task[0]).is_file() for task in tasks)
    _render_all(esc50_dir, pools, tasks, jobs, progress)
    _write_tables(staging, clips, noise, vocabulary, components)
    copy_license(esc50_dir, staging)
    (staging / PLAN_FILE).unlink()
    summary = {**settings, "n_classes": len(vocabulary),
               "n_derived_classes": sum(len(parts) > 1 for parts in components.values()),
               **{f"n_{split}": len(rows) for split, rows in clips.items()},
               **{f"hours_{split}": round(sum(r["seconds"] for r in rows) / 3600, 2)
                  for split, rows in clips.items()},
               "noisy_clean_fraction": round(float(np.mean([n["kind"] == "none"
                                                            for n in noise])), 4),
               "disk_bytes": sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()),
               "build_seconds": round(time.perf_counter() - started, 1),
               "resumed_clips": resumed}
    (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _same_plan(staging: Path, plan_text: str) -> bool:
    plan = staging / PLAN_FILE
    return plan.is_file() and plan.read_text() == plan_text


def _group(meta: pd.DataFrame, category: str) -> int:
    return int(meta.loc[meta["category"] == category, "target"].iloc[0]) // ESC50_GROUP_SIZE


def _source_pools(meta: pd.DataFrame, recipe: RehearsalConfig,
                  rng: np.random.Generator) -> dict[str, pd.DataFrame]:
    """ESC-50 clips of the classes with `min_recordings` recordings, as a test pool (whole
    recordings, `test_recording_share` of each class's clips, at least one) and a training
    pool (the rest); at most `sources_per_class` clips of a class in each."""
    pools: dict[str, list[pd.DataFrame]] = {"train": [], "test": []}
    for _, clips in meta.groupby("category", sort=True):
        recordings = [group for _, group in clips.groupby("src_file", sort=True)]
        if len(recordings) < recipe.min_recordings:
            continue
        order = rng.permutation(len(recordings))
        taken, test = 0, []
        for position in order[:-1]:  # the last recording always trains
            test.append(position)
            taken += len(recordings[position])
            if taken >= recipe.test_recording_share * len(clips):
                break
        for pool, chosen in (("test", test), ("train", [i for i in order if i not in test])):
            frame = pd.concat([recordings[i] for i in chosen])
            if recipe.sources_per_class:
                frame = frame.iloc[:recipe.sources_per_class]
            pools[pool].append(frame)
    if len(pools["train"]) < 2:
        raise Esc50Error(f"fewer than two ESC-50 classes have {recipe.min_recordings} source "
                         "recordings: the rehearsal needs a complete ESC-50 folder")
    return {pool: pd.concat(frames, ignore_index=True) for pool, frames in pools.items()}


def _classes(base: list[str], meta: pd.DataFrame, recipe: RehearsalConfig,
             rng: np.random.Generator) -> dict[str, tuple[str, ...]]:
    """class name -> the ESC-50 classes it sounds like: the base classes, then fixed pairs
    of base classes from different ESC-50 groups, each base class in about as many pairs."""
    base = base[: recipe.n_classes]
    wanted = recipe.n_classes - len(base)
    candidates = [pair for pair in combinations(base, 2)
                  if _group(meta, pair[0]) != _group(meta, pair[1])]
    uses = dict.fromkeys(base, 0)
    cap = max(1, -(-2 * wanted // len(base)))
    pairs: list[tuple[str, str]] = []
    for index in rng.permutation(len(candidates)):
        first, second = candidates[index]
        if len(pairs) < wanted and uses[first] < cap and uses[second] < cap:
            pairs.append((first, second))
            uses[first] += 1
            uses[second] += 1
    return {**{name: (name,) for name in base},
            **{f"{first}_with_{second}": (first, second) for first, second in pairs}}


def _plan_split(split: str, recipe: RehearsalConfig, scale: float, seconds_scale: float,
                components: dict[str, tuple[str, ...]], rng: np.random.Generator) -> list[dict]:
    """Labels and duration of every clip of a split; the first labels go round the classes."""
    count = max(1, round(scale * {"train_curated": recipe.n_curated,
                                  "train_noisy": recipe.n_noisy, "test": recipe.n_test}[split]))
    vocabulary = sorted(components)
    firsts = [vocabulary[i % len(vocabulary)] for i in rng.permutation(count)]
    if split == "train_noisy":
        full = rng.random(count) < recipe.noisy_full_share
        seconds = np.where(full, recipe.noisy_seconds,
                           rng.uniform(1.0, recipe.noisy_seconds, count))
    else:
        seconds = rng.lognormal(np.log(recipe.median_seconds), recipe.seconds_sigma, count)
    seconds = np.clip(seconds * seconds_scale, recipe.min_seconds, recipe.max_seconds)
    rows = []
    for first, length in zip(firsts, seconds):
        labels = [first]
        if rng.random() < recipe.second_label_share:
            labels += _second_label(first, components, rng)
        rows.append({"labels": labels, "seconds": round(float(length), 3)})
    return rows


def _second_label(first: str, components: dict[str, tuple[str, ...]],
                  rng: np.random.Generator) -> list[str]:
    """A class to mix with `first` such that the clip cannot be read as another class: no
    ESC-50 class twice, and no pair of classes that is a class of its own."""
    vocabulary = sorted(components)
    pairs = {name: set(parts) for name, parts in components.items() if len(parts) > 1}
    for _ in range(SECOND_LABEL_TRIES):
        other = vocabulary[int(rng.integers(len(vocabulary)))]
        sources = components[first] + components[other]
        heard = set(sources)
        if len(heard) == len(sources) and all(
                name in (first, other) for name, pair in pairs.items() if pair <= heard):
            return [other]
    return []


def _render_all(esc50_dir: Path, pools: dict[str, pd.DataFrame], tasks: list[tuple],
                jobs: int, progress: bool) -> None:
    """Write every clip not written yet, in `jobs` forked workers sharing the source clips."""
    todo = [task for task in tasks if not Path(task[0]).is_file()]
    if not todo:
        return
    _POOLS.clear()
    needed = {name for task in todo for parts in task[2] for name in parts}
    for pool, frame in pools.items():
        frame = frame[frame["category"].isin(needed)]
        _POOLS[pool] = {}
        for row in tqdm(list(frame.itertuples()), desc=f"ESC-50 {pool} clips", unit="clip",
                        disable=not progress):
            wave, _ = librosa.effects.trim(load_audio(esc50_dir / "audio" / row.filename,
                                                      SAMPLE_RATE), top_db=TRIM_TOP_DB)
            _POOLS[pool].setdefault(row.category, []).append(wave)
    workers = min(jobs or os.cpu_count() or 1, len(todo))
    bar = tqdm(total=len(todo), desc="rehearsal clips", unit="clip", disable=not progress)
    with bar:
        if workers <= 1:
            for task in todo:
                _render_clip(task)
                bar.update()
            return
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_clip, todo, chunksize=CHUNK_CLIPS):
                bar.update()


def _render_clip(task: tuple) -> None:
    """One clip: each class's track at a random gain, mixed, written to a temporary file and
    renamed, so an interrupted build leaves only whole files."""
    path, pool, classes, seconds, seed = task
    rng = np.random.default_rng(seed)
    length = max(1, round(seconds * SAMPLE_RATE))
    mix = np.zeros(length, np.float32)
    for parts in classes:
        for name in parts:
            mix += rng.uniform(*MIX_GAIN) * _track(_POOLS[pool][name], length, rng)
    mix *= rng.uniform(*PEAK_RANGE) / float(np.max(np.abs(mix)))  # a short quiet cut
    # would otherwise round to digital silence in 16 bits
    temporary = f"{path}.tmp"
    sf.write(temporary, mix, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    os.replace(temporary, path)


def _track(sources: list[np.ndarray], length: int, rng: np.random.Generator) -> np.ndarray:
    """`length` samples of one class: pieces of its clips at random offsets, lengths and
    gains, one after the other (a clip shorter than the track is used again)."""
    track = np.empty(length, np.float32)
    filled = 0
    while filled < length:
        wave = sources[int(rng.integers(len(sources)))]
        size = max(1, min(length - filled, wave.size,
                          int(rng.uniform(*CUT_SECONDS) * SAMPLE_RATE)))
        start = int(rng.integers(0, wave.size - size + 1))
        piece = wave[start:start + size] * np.float32(rng.uniform(*PIECE_GAIN))
        if not np.any(piece):
            continue  # digital silence inside a clip: cut elsewhere
        fade = min(int(FADE_SECONDS * SAMPLE_RATE), size // 2)
        if fade:
            ramp = np.linspace(0, 1, fade, dtype=np.float32)
            piece[:fade] *= ramp
            piece[-fade:] *= ramp[::-1]
        track[filled:filled + size] = piece
        filled += size
    return track


def _write_tables(folder: Path, clips: dict[str, list[dict]], noise: list[dict],
                  vocabulary: list[str], components: dict[str, tuple[str, ...]]) -> None:
    """The FAT2019 CSVs, the noise ground truth and the classes' make-up."""
    write_layout_tables(folder, clips, noise, vocabulary)
    pd.DataFrame({"class": vocabulary,
                  "esc50_classes": ["+".join(components[name]) for name in vocabulary]}
                 ).to_csv(folder / CLASSES_FILE, index=False)
