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
@click.option("--seed", type=int, default=0, show_default=True, help="Split and noise seed.")
@click.option("--scale", type=float, default=1.0, show_default=True,
              help="Shrink (<1) every set, e.g. 0.2 for a seconds-long smoke test.")
@click.option("--clips", type=click.Choice(CLIP_CHOICES), default="demo", show_default=True,
              help="'demo': the 909 ESC-50 clips of the README's figures (the same dataset from "
                   "any ESC-50 copy); 'all': every clip of the ESC-50 folder (2,000 in the "
                   "release), a larger demo.")
@click.option("--min-clips-per-class", type=click.IntRange(min=1),
              default=DemoConfig.min_clips_per_class, show_default=True,
              help="Leave out the classes with fewer clips in the ESC-50 folder (the demo's 21 "
                   "classes have 32 clips each; 1 keeps all 50).")
@click.option("--curated-per-class", type=click.IntRange(min=0),
              default=DemoConfig.curated_per_class, show_default=True,
              help="Keep at most this many curated clips per class (0 = all, about 13); the "
                   "noisy and test sets stay the same, so runs on several values compare.")
def demo_data(out_dir: Path, esc50: Path | None, seed: int, scale: float, clips: str,
              min_clips_per_class: int, curated_per_class: int) -> None:
    """Build the demo dataset (FAT2019 layout) from real ESC-50 clips into OUT_DIR.

    Curated = clean single-label clips; noisy = longer concatenated/mixed clips with
    wrong, missing and extra labels (noise_truth.csv says which); test = held-out
    clips and mixtures with test_truth.csv. No source recording spans two splits.
    """
    from fat_mlflow.data.demo import build_demo_dataset
    from fat_mlflow.data.esc50 import locate_esc50

    recipe = DemoConfig(min_clips_per_class=min_clips_per_class,
                        curated_per_class=curated_per_class)
    summary = build_demo_dataset(locate_esc50(esc50), out_dir, seed=seed, scale=scale, clips=clips,
                                 recipe=recipe)
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
