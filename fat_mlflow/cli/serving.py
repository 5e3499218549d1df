"""`fat-mlflow ensemble`, `distill`, `predict` and `tag`: the registered models and scoring
with them."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from fat_mlflow.cli.options import bad_audio_option, cache_option

if TYPE_CHECKING:  # mlflow is imported when a command runs: --help stays fast
    from mlflow.pyfunc import PyFuncModel

    from fat_mlflow.config import DistillConfig

DEFAULT_MODEL_URI = "models:/fat2019-tagger@champion"
model_option = click.option("--model", "model_uri", default=DEFAULT_MODEL_URI, show_default=True,
                            help="Tagger model URI: models:/NAME@ALIAS, models:/NAME/VERSION, "
                                 "runs:/RUN_ID/tagger or a local folder.")


def _load_tagger(model_uri: str) -> PyFuncModel:
    """The model as a local command loads it: it reads the files its user names."""
    import mlflow

    from fat_mlflow.serving.tagger import load_local_model
    from fat_mlflow.warmup.tracking import configure_tracking

    configure_tracking()
    try:
        return load_local_model(model_uri)
    except (mlflow.exceptions.MlflowException, OSError) as error:
        raise click.ClickException(f"cannot load model {model_uri}: {error}") from error


def distill_settings(overrides: tuple[str, ...]) -> DistillConfig:
    """DistillConfig with --set distill.FIELD=VALUE items applied (a usage error if bad)."""
    from fat_mlflow.config import DistillConfig, parse_overrides

    try:
        items = parse_overrides([item for group in overrides for item in group.split()])
        return DistillConfig().override(items)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--set") from error


distill_set_option = click.option(
    "--set", "overrides", multiple=True, metavar="distill.FIELD=VALUE",
    help="Student settings (DistillConfig), e.g. --set distill.width=0.5 --set "
         "'distill.epochs=4 distill.lr=0.001'. Repeatable.")


@click.command()
@click.option("--teacher", default=DEFAULT_MODEL_URI, show_default=True,
              help="The ensemble to distil: models:/NAME@ALIAS, models:/NAME/VERSION, or its "
                   "ensemble run ID.")
@distill_set_option
@click.option("--data", type=click.Path(file_okay=False), default="",
              help="The ensemble's dataset, when it is not where its stages were trained.")
@click.option("--registered-model", default="fat2019-tagger-fast", show_default=True,
              help="Model-registry name of the student; every call registers a new version.")
@click.option("--alias", default="champion", show_default=True,
              help="Alias moved to the new version when its test lwlrap is not worse.")
@cache_option
@bad_audio_option
def distill(teacher: str, overrides: tuple[str, ...], data: str,
            registered_model: str, alias: str, cache_dir: Path | None,
            bad_audio: str) -> None:
    """Distil the ensemble into one student network and register it beside the ensemble.

    The student learns the ensemble's scores on every window of the curated, noisy and
    (unlabelled) test clips, plus the curated labels; it is served like the ensemble, at a
    fraction of its cost (docs/distill.md).
    """
    from fat_mlflow.serving.distill import DistillRequest, distill_summary, run_distill

    request = DistillRequest(teacher=teacher, config=distill_settings(overrides),
                             data=Path(data) if data else None,
                             registered_model=registered_model, alias=alias,
                             cache_dir=cache_dir, bad_audio=bad_audio)
    run_id, version = run_distill(request)
    click.echo(distill_summary(run_id))
    click.echo(f"distill run: {run_id}")
    click.echo(f"registered: models:/{registered_model}/{version}")


@click.command()
@click.option("--run-ids", required=True,
              help="Comma-separated stage run IDs (e.g. the stage 2, 3 and 4 runs; CNN and VGG "
                   "runs may be mixed).")
@click.option("--registered-model", default="fat2019-tagger", show_default=True,
              help="Model-registry name; every call registers a new version.")
@click.option("--alias", default="champion", show_default=True,
              help="Alias moved to the new version when its test lwlrap is not worse.")
@click.option("--data", type=click.Path(file_okay=False), default="",
              help="The runs' dataset; with test_truth.csv the ensemble is scored on the test "
                   "set. Empty: no scoring, and the alias moves only if no version holds it.")
@cache_option
@bad_audio_option
def ensemble(run_ids: str, registered_model: str, alias: str, data: str,
             cache_dir: Path | None, bad_audio: str) -> None:
    """Build the ensemble of stage runs as one pyfunc model and register it."""
    from fat_mlflow.serving.ensemble import build_ensemble

    ids = [run_id.strip() for run_id in run_ids.split(",") if run_id.strip()]
    run_id, version = build_ensemble(ids, registered_model=registered_model, alias=alias,
                                     data=Path(data) if data else None, cache_dir=cache_dir,
                                     bad_audio=bad_audio)
    click.echo(f"ensemble run: {run_id}")
    click.echo(f"registered: models:/{registered_model}/{version}")


@click.command()
@model_option
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("submission.csv"), show_default=True, help="Submission CSV to write.")
@click.option("--audio-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Folder of the clips a CSV SOURCE names (default: test/ beside it).")
@click.option("--batch-clips", type=click.IntRange(min=1), default=16, show_default=True,
              help="Clips scored per model call.")
@click.option("--bad-audio", type=click.Choice(["stop", "skip"]), default="stop",
              show_default=True,
              help="Clips that cannot be scored are left out of the submission, listed one per "
                   "line and in OUTPUT's .errors.csv; 'stop' then exits with status 1, 'skip' "
                   "with 0.")
def predict(model_uri: str, source: Path, output: Path, audio_dir: Path | None,
            batch_clips: int, bad_audio: str) -> None:
    """Score SOURCE (an audio folder, or a CSV such as sample_submission.csv) into a Kaggle
    submission: fname + one column per class in the model's vocabulary order.

    Every clip that can be scored is written. An interrupted run (Ctrl-C, a killed job)
    continues where it stopped when run again with the same OUTPUT and model."""
    from fat_mlflow.serving.submission import list_clips, write_submission

    clips, classes = list_clips(source, audio_dir)
    model = _load_tagger(model_uri)
    result = write_submission(model, clips, output, classes, batch_clips)
    resumed = f" ({result.n_resumed} scored by an interrupted run)" if result.n_resumed else ""
    click.echo(f"wrote {result.n_written} rows to {output}{resumed}")
    if result.failures:
        click.echo(f"{len(result.failures)} of {len(clips)} clip(s) could not be scored, left out "
                   f"and listed in {result.errors_csv}:", err=True)
        for error in result.failures.values():
            click.echo(f"  {error}", err=True)
        if bad_audio == "stop":
            raise click.ClickException(
                f"{len(result.failures)} clip(s) could not be scored; fix or remove them and "
                "rerun (only they are scored again), or pass --bad-audio skip to accept the "
                "submission without them")


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@model_option
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True,
              help="Labels shown per file.")
def tag(files: tuple[Path, ...], model_uri: str, top_k: int) -> None:
    """Print the top labels of a few audio FILES, with their scores."""
    from fat_mlflow.serving.submission import score_files
    from fat_mlflow.serving.tagger import ERROR_COLUMN, TOP_LABELS_COLUMN

    model = _load_tagger(model_uri)
    scored = score_files(model, [str(f) for f in files], progress=False, params={"top_k": top_k})
    for file, (_, row) in zip(files, scored.iterrows()):
        if row[ERROR_COLUMN]:
            click.echo(f"{file}: ERROR {row[ERROR_COLUMN]}")
            continue
        labels = row[TOP_LABELS_COLUMN].split(",")
        click.echo(f"{file}: " + ", ".join(f"{label} {row[label]:.3f}" for label in labels))
    failed = int((scored[ERROR_COLUMN] != "").sum())
    if failed:
        raise click.ClickException(f"{failed} of {len(files)} file(s) could not be tagged")
