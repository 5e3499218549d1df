"""`fat-mlflow ablations`, `study`, `benchmark` and `results`: the README's measurements."""
from __future__ import annotations

from pathlib import Path

import click

from fat_mlflow.benchmarks import BENCHMARK_PROFILES
from fat_mlflow.cli.options import (
    cache_option,
    esc50_option,
    resolve_profile,
    settings_options,
)
from fat_mlflow.config import ABLATIONS, DEFAULT_ABLATIONS, StudyGrid
from fat_mlflow.data.esc50 import SOURCES_HELP


def _int_list(text: str, hint: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers",
                                 param_hint=hint) from error


ablation_names_option = click.option(
    "--only", default="", metavar="NAME[,NAME]",
    help=f"Ablations to run, of {', '.join(ABLATIONS)} (default: {', '.join(DEFAULT_ABLATIONS)});"
         " each sets its settings on top of the profile, so one equal to the profile reuses the "
         "default's runs.")


@click.command()
@click.option("--data", default="", metavar="DIRECTORY",
              help="Dataset root in the FAT2019 layout; empty = the demo data in ./demo_data.")
@settings_options
@cache_option
@click.option("--seeds", default="0,1,2", show_default=True,
              help="Comma-separated seeds; every ablation runs once per seed.")
@ablation_names_option
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Pipelines trained in parallel processes (the CPU threads are split).")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("docs/results"), show_default=True,
              help="Where ablations.md, the CSVs and the figures are written.")
@esc50_option
def ablations(data, profile, overrides, cache_dir, seeds, only, jobs, out_dir, esc50):
    """Quality ablations (SpecMix, mixup, warm start, bf16, single fold) over several seeds.

    Each ablation at each seed is a whole pipeline run in the tracking store, reused when
    it already finished; the report (mean, std, paired difference to the default pipeline,
    logistic-regression floor, wall time) goes to OUT_DIR and to an `ablations` run.
    """
    import shlex
    import sys

    from fat_mlflow.experiments.ablations import AblationRequest, run_ablations

    seed_list = _int_list(seeds, "--seeds")
    names = [n.strip() for n in only.split(",") if n.strip()] or list(DEFAULT_ABLATIONS)
    try:
        request = AblationRequest(profile=resolve_profile(profile, overrides, None), seeds=seed_list,
                                  esc50=esc50,
                                  data=Path(data) if data else None, names=names,
                                  cache_dir=cache_dir, jobs=jobs)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--only/--seeds") from error
    command = "fat-mlflow " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    summary = run_ablations(request, out_dir, command)
    click.echo(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    click.echo(f"report: {out_dir / 'ablations.md'}")


@click.command()
@settings_options
@cache_option
@click.option("--seeds", default="42", show_default=True,
              help="Comma-separated seeds; every point runs once per seed.")
@click.option("--budgets", default="", metavar="WIDTHxEPOCHS[,...]",
              help="The budget axis: network width x epochs per fold, on the default demo "
                   f"(default: {StudyGrid().budgets_text()}).")
@click.option("--curated-per-class", "curated", default="",
              help="The data axis: at most this many curated clips per class (0 = all), at the "
                   "profile's width and epochs (default: "
                   f"{','.join(map(str, StudyGrid().curated_per_class))}).")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("docs/study"), show_default=True,
              help="Where study.md, the CSV and the figures are written.")
@esc50_option
def study(profile, overrides, cache_dir, seeds, budgets, curated, out_dir, esc50):
    """Test lwlrap of the pipeline and of the logistic floor against the training budget and
    against curated clips per class: where the CNN passes the floor.

    Each point at each seed is a whole pipeline run in the tracking store, reused when it
    already finished (stage runs shared with other pipelines are reused too).
    """
    import shlex
    import sys

    from fat_mlflow.experiments.study import StudyRequest, run_study

    grid = StudyGrid()
    try:
        budget_list = [(float(width), int(epochs)) for width, epochs in
                       (item.strip().split("x") for item in budgets.split(",") if item.strip())]
    except ValueError as error:
        raise click.BadParameter(f"{budgets!r}: expected WIDTHxEPOCHS items, e.g. 0.25x32",
                                 param_hint="--budgets") from error
    try:
        request = StudyRequest(profile=resolve_profile(profile, overrides, None),
                               seeds=_int_list(seeds, "--seeds"),
                               budgets=budget_list or list(grid.budgets),
                               curated_per_class=(_int_list(curated, "--curated-per-class")
                                                  or list(grid.curated_per_class)),
                               esc50=esc50, cache_dir=cache_dir)
    except ValueError as error:
        raise click.BadParameter(str(error)) from error
    command = "fat-mlflow " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    summary = run_study(request, out_dir, command)
    click.echo(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    click.echo(f"report: {out_dir / 'study.md'}")


@click.command()
@click.option("--only", default="features,training,inference", show_default=True,
              help="Comma-separated benchmarks to run, of features, training, inference, "
                   "pipeline (the main job timed with train.amp=false and by default, each "
                   "stage's share that is not training steps: about 25 minutes on 2 cores) "
                   "and distill (students and their ensembles served over HTTP).")
@click.option("--profile", "size", type=click.Choice(list(BENCHMARK_PROFILES)),
              default="standard", show_default=True,
              help="Benchmark size: 'tiny' = seconds (tests), 'standard' = a few minutes on "
                   "2 cores, 'full' = steadier figures.")
@click.option("--repeats", type=click.IntRange(min=0), default=0, show_default=True,
              help="Timed passes per figure, median reported (0 = the profile's).")
@click.option("--data", default="", metavar="DIRECTORY",
              help="FAT2019-layout dataset whose clips are measured (and whose cached "
                   "log-mels feed the training benchmark); empty = ESC-50 clips.")
@click.option("--esc50", default="", metavar="DIRECTORY",
              help=f"ESC-50 folder when --data is empty ({SOURCES_HELP}).")
@click.option("--model-uri", default="", metavar="URI",
              help="Tagger to measure (e.g. models:/fat2019-tagger@champion); empty = an "
                   "untrained ensemble of the quick profile's networks on 128-band features.")
@click.option("--distill-runs", default="", metavar="RUN_ID[,RUN_ID]",
              help="Distill runs whose student and ensemble the distill benchmark serves "
                   "(e.g. one per seed, or several widths of one teacher); empty = the newest "
                   "finished distill run of each teacher, up to 3.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("benchmarks.md"), show_default=True,
              help="Markdown file of the tables (also logged as the run's artifact); the "
                   "distill figure goes beside it.")
def benchmark(only: str, size: str, repeats: int, data: str, esc50: str, model_uri: str,
              distill_runs: str, out: Path) -> None:
    """Speed benchmarks, each against a baseline measured in the same run: features (cache vs a
    librosa loop), training (float32 and bf16 samples/s vs both matmul peaks), inference (the
    served ensemble vs eager float32), pipeline (the main job by default vs float32), distill
    (each student vs its ensemble, served). Each
    result is an MLflow run; the tables go to --out."""
    from fat_mlflow.benchmarks.report import BenchmarkRequest, run_benchmarks

    try:
        request = BenchmarkRequest(
            only=tuple(name.strip() for name in only.split(",") if name.strip()),
            profile=BENCHMARK_PROFILES[size], repeats=repeats,
            data=Path(data) if data else None, esc50=Path(esc50) if esc50 else None,
            model_uri=model_uri or None, out=out,
            distill_runs=tuple(r.strip() for r in distill_runs.split(",") if r.strip()))
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--only") from error
    run_id, text = run_benchmarks(request)
    click.echo(text)
    click.echo(f"benchmark run: {run_id}; tables written to {out}")


@click.command()
@click.option("--pipelines", required=True, metavar="RUN_ID,RUN_ID",
              help="Finished `main` pipeline runs on datasets of different sizes (e.g. the "
                   "rehearsal profile on the 10 % and the full rehearsal, cold caches).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("scale.md"), show_default=True,
              help="Markdown file of the tables (also logged as the run's artifact).")
def scale(pipelines: str, out: Path) -> None:
    """The scale benchmark: each step's time and peak memory in the given pipelines, scoring
    and training rates measured now, and the predicted time of the quick and paper profiles
    on FAT2019's size (docs/scale.md)."""
    from fat_mlflow.benchmarks.scale import run_scale_report

    click.echo(run_scale_report([run.strip() for run in pipelines.split(",") if run.strip()],
                                out))


@click.command()
@settings_options
@click.option("--seeds", default="0,1,2", show_default=True, help="Seeds of the ablations.")
@ablation_names_option
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Ablation pipelines trained in parallel processes.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("docs/results"), show_default=True,
              help="Where every table and figure is written.")
@click.pass_context
def results(ctx: click.Context, profile, overrides, seeds, only, jobs, out_dir) -> None:
    """Every table of the README's results in one command: the ablations on the demo data
    (finished runs in the tracking store are reused), then the speed benchmarks."""
    ctx.invoke(ablations, profile=profile, overrides=overrides, seeds=seeds, only=only,
               jobs=jobs, out_dir=out_dir)
    ctx.invoke(benchmark, out=out_dir / "benchmarks.md")
