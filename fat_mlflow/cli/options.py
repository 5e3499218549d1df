"""The options several `fat-mlflow` commands share, and the profile they resolve to."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from fat_mlflow.config import PROFILES, Profile, get_profile, parse_overrides
from fat_mlflow.data.esc50 import SOURCES_HELP


def resolve_profile(name: str, overrides: tuple[str, ...], seed: int | None) -> Profile:
    """The profile NAME with --set OVERRIDES (and --seed) applied; bad values are a usage
    error of those options."""
    try:
        values = parse_overrides([item for group in overrides for item in group.split()])
        if seed is not None:
            values["train.seed"] = str(seed)
        return get_profile(name, values)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--profile/--set") from error


def split_distill_items(overrides: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """--set items for the profile, and those for the student (`distill.FIELD=VALUE`)."""
    items = [item for group in overrides for item in group.split()]
    return (tuple(i for i in items if not i.startswith("distill.")),
            tuple(i for i in items if i.startswith("distill.")))


def profile_options(func: Callable) -> Callable:
    """--profile, --set and --seed, shared by every command that trains."""
    func = click.option("--seed", type=int, default=None,
                        help="Random seed (train.seed); same seed + profile = same run on CPU.")(func)
    return settings_options(func)


def settings_options(func: Callable) -> Callable:
    """--profile and --set (commands that choose their seeds themselves take only these)."""
    func = click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
                        help="Override config fields, e.g. --set train.epochs=3 "
                             "--set 'augment.specmix=false train.lr=0.001'. Repeatable.")(func)
    func = click.option("--profile", type=click.Choice(sorted(PROFILES)), default="quick",
                        show_default=True,
                        help="Named settings: 'paper' = the seed's (width 1, 10 folds, batch "
                             "128); 'quick' = CPU demo; 'tiny' = seconds, for tests.")(func)
    return func


def data_option(required: bool = True) -> Callable[[Callable], Callable]:
    """--data, the dataset root of the commands that read one."""
    return click.option("--data", type=click.Path(file_okay=False, path_type=Path),
                        required=required,
                        help="Dataset root in the Kaggle FAT2019 layout (train_curated.csv, "
                             "train_noisy.csv, sample_submission.csv, audio folders).")


bad_audio_option = click.option(
    "--bad-audio", type=click.Choice(["stop", "skip"]), default="stop", show_default=True,
    help="Undecodable clips: stop and list them all, or skip and log them (bad_audio.csv).")

cache_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Feature cache root (default $FAT_MLFLOW_CACHE or ./.fat_cache).")

esc50_option = click.option(
    "--esc50", type=click.Path(file_okay=False, path_type=Path), default=None,
    help=f"ESC-50 folder for the demo data ({SOURCES_HELP}).")
