"""`fat-mlflow demo-data` and `features`: the dataset and its log-mel cache."""
from __future__ import annotations

from pathlib import Path

import click

from fat_mlflow.cli.options import (
    cache_option,
    data_option,
    esc50_option,
    profile_options,
    resolve_profile,
)
from fat_mlflow.config import DemoConfig
from fat_mlflow.data.demo import CLIP_CHOICES


@click.command("demo-data")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@esc50_option
@click.option("--recipe", type=click.Choice(["demo", "rehearsal"]), default="demo",
              show_default=True,
              help="'demo': the laptop-size demo (21 classes, ~900 clips); 'rehearsal': FAT2019 "
                   "at its real size (80 classes, 29,285 clips, ~100 h of FLAC, ~15 GB; "
                   "docs/scale.md).")
@click.option("--seed", type=int, default=0, show_default=True, help="Split and noise seed.")
@click.option("--scale", type=float, default=1.0, show_default=True,
              help="Shrink (<1) every set, e.g. 0.2 for a seconds-long smoke test.")
@click.option("--seconds-scale", type=float, default=1.0, show_default=True,
              help="rehearsal: shorten every clip by this factor (tests).")
@click.option("--jobs", type=click.IntRange(min=0), default=0, show_default=True,
              help="rehearsal: worker processes writing clips (0 = all CPU cores).")
@click.option("--clips", type=click.Choice(CLIP_CHOICES), default="demo", show_default=True,
              help="demo: 'demo' = the 909 ESC-50 clips of the README's figures (the same "
                   "dataset from any ESC-50 copy); 'all' = every clip of the ESC-50 folder "
                   "(2,000 in the release), a larger demo.")
@click.option("--min-clips-per-class", type=click.IntRange(min=1),
              default=DemoConfig.min_clips_per_class, show_default=True,
              help="demo: leave out the classes with fewer clips in the ESC-50 folder (the "
                   "demo's 21 classes have 32 clips each; 1 keeps all 50).")
@click.option("--curated-per-class", type=click.IntRange(min=0),
              default=DemoConfig.curated_per_class, show_default=True,
              help="demo: keep at most this many curated clips per class (0 = all, about 13); "
                   "the noisy and test sets stay the same, so runs on several values compare.")
def demo_data(out_dir: Path, esc50: Path | None, recipe: str, seed: int, scale: float,
              seconds_scale: float, jobs: int, clips: str, min_clips_per_class: int,
              curated_per_class: int) -> None:
    """Build a dataset in the FAT2019 layout from real ESC-50 clips into OUT_DIR.

    Curated = clean clips; noisy = longer clips with wrong, missing and extra labels
    (noise_truth.csv says which); test = held-out clips and mixtures with test_truth.csv.
    No source recording is heard in training and test. The rehearsal has FAT2019's size
    and shape, to try the pipeline at the real scale (fat_mlflow.data.rehearsal).
    """
    from fat_mlflow.data.esc50 import locate_esc50

    source = locate_esc50(esc50)
    if recipe == "rehearsal":
        from fat_mlflow.data.rehearsal import build_rehearsal_dataset

        summary = build_rehearsal_dataset(source, out_dir, seed=seed, scale=scale,
                                          seconds_scale=seconds_scale, jobs=jobs)
    else:
        from fat_mlflow.data.demo import build_demo_dataset

        summary = build_demo_dataset(source, out_dir, seed=seed, scale=scale, clips=clips,
                                     recipe=DemoConfig(min_clips_per_class=min_clips_per_class,
                                                       curated_per_class=curated_per_class))
    for key, value in summary.items():
        click.echo(f"{key}: {value}")


@click.command()
@data_option()
@profile_options
@cache_option
@click.option("--jobs", type=int, default=0, show_default=True,
              help="Worker processes (0 = all CPU cores).")
def features(data: Path, profile: str, overrides: tuple[str, ...], seed: int | None,
             cache_dir: Path | None, jobs: int) -> None:
    """Compute (or reuse) the log-mel cache of every clip and log cache stats to MLflow."""
    from fat_mlflow.warmup.featurize import run_features

    stats = run_features(data, resolve_profile(profile, overrides, seed).features, cache_dir, jobs)
    click.echo(f"{stats.n_clips} clips: {stats.n_computed} computed, {stats.n_reused} reused, "
               f"{stats.n_failed} failed in {stats.seconds:.1f} s")


@click.command()
@cache_option
@click.option("--prune", is_flag=True,
              help="Remove the old-format folders and the stores unused for --unused-days.")
@click.option("--unused-days", type=click.FloatRange(min=0), default=30, show_default=True,
              help="With --prune: a store not used for this many days is removed.")
def cache(cache_dir: Path | None, prune: bool, unused_days: float) -> None:
    """List the feature cache's folders (one store per feature setting) with their size and
    idle time; --prune removes what is no longer used. Do not prune while a stage runs."""
    from fat_mlflow.data.cachedir import cache_folders, remove, stale
    from fat_mlflow.data.features import default_cache_root

    root = cache_dir or default_cache_root()
    folders = cache_folders(root)
    for folder in folders:
        click.echo(f"{folder.path.name:20} {folder.kind:10} {folder.entries:7d} clips "
                   f"{folder.bytes / 1e9:8.2f} GB  idle {folder.idle_days:6.1f} d  "
                   f"{folder.settings}")
    if not folders:
        click.echo(f"{root}: no feature cache folders")
    if prune:
        removed = stale(folders, unused_days)
        freed = remove(removed)
        click.echo(f"removed {len(removed)} folder(s), {freed / 1e9:.2f} GB freed")
