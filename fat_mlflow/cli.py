"""`fat-mlflow`: the command line. A thin layer: parse options, call the pipeline modules.

MLproject entry points call these commands, so `mlflow run . -e stage1 -P ...` and
`fat-mlflow stage1 ...` do the same thing.
"""
from __future__ import annotations

import math
from pathlib import Path

import click

from fat_mlflow.benchmarks import BENCHMARK_PROFILES
from fat_mlflow.config import (
    ABLATIONS,
    DEFAULT_ABLATIONS,
    PROFILES,
    DemoConfig,
    Profile,
    StudyGrid,
    get_profile,
    parse_overrides,
)
from fat_mlflow.demo import CLIP_CHOICES
from fat_mlflow.esc50 import SOURCES_HELP

def _int_list(text: str, hint: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers",
                                 param_hint=hint) from error


def _profile(name: str, overrides: tuple[str, ...], seed: int | None) -> Profile:
    try:
        values = parse_overrides([item for group in overrides for item in group.split()])
        if seed is not None:
            values["train.seed"] = str(seed)
        return get_profile(name, values)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--profile/--set") from error


def profile_options(func):
    """--profile, --set and --seed, shared by every command that trains."""
    func = click.option("--seed", type=int, default=None,
                        help="Random seed (train.seed); same seed + profile = same run on CPU.")(func)
    return settings_options(func)


def settings_options(func):
    """--profile and --set (commands that choose their seeds themselves take only these)."""
    func = click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
                        help="Override config fields, e.g. --set train.epochs=3 "
                             "--set 'augment.specmix=false train.lr=0.001'. Repeatable.")(func)
    func = click.option("--profile", type=click.Choice(sorted(PROFILES)), default="quick",
                        show_default=True,
                        help="Named settings: 'paper' = the seed's (width 1, 10 folds, batch "
                             "128); 'quick' = CPU demo; 'tiny' = seconds, for tests.")(func)
    return func


def data_option(required: bool = True):
    return click.option("--data", type=click.Path(file_okay=False, path_type=Path),
                        required=required,
                        help="Dataset root in the Kaggle FAT2019 layout (train_curated.csv, "
                             "train_noisy.csv, sample_submission.csv, audio folders).")


cache_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Feature cache root (default $FAT_MLFLOW_CACHE or ./.fat_cache).")


class _Group(click.Group):
    """Turns the pipeline's input errors into one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context):
        from fat_mlflow.errors import USER_ERRORS

        try:
            return super().invoke(ctx)
        except USER_ERRORS as error:
            raise click.ClickException(f"{type(error).__name__}: {error}") from error


@click.group(cls=_Group,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="fat-mlflow")
def main() -> None:
    """FAT2019 warm-up pipeline (8th place) with SpecMix, tracked with MLflow.

    Runs log to $MLFLOW_TRACKING_URI, or to ./mlflow.db (SQLite) when it is unset.
    Typical order: demo-data -> features -> stage1 .. stage4 -> ensemble, or `pipeline`
    for all of them.
    """


esc50_option = click.option(
    "--esc50", type=click.Path(file_okay=False, path_type=Path), default=None,
    help=f"ESC-50 folder for the demo data ({SOURCES_HELP}).")


@main.command("demo-data")
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
    from fat_mlflow.demo import build_demo_dataset
    from fat_mlflow.esc50 import locate_esc50

    recipe = DemoConfig(min_clips_per_class=min_clips_per_class,
                        curated_per_class=curated_per_class)
    summary = build_demo_dataset(locate_esc50(esc50), out_dir, seed=seed, scale=scale, clips=clips,
                                 recipe=recipe)
    for key, value in summary.items():
        click.echo(f"{key}: {value}")


@main.command()
@data_option()
@profile_options
@cache_option
@click.option("--jobs", type=int, default=0, show_default=True,
              help="Worker processes (0 = all CPU cores).")
def features(data: Path, profile: str, overrides: tuple[str, ...], seed: int | None,
             cache_dir: Path | None, jobs: int) -> None:
    """Compute (or reuse) the log-mel cache of every clip and log cache stats to MLflow."""
    from fat_mlflow.featurize import run_features

    stats = run_features(data, _profile(profile, overrides, seed).features, cache_dir, jobs)
    click.echo(f"{stats.n_clips} clips: {stats.n_computed} computed, {stats.n_reused} reused, "
               f"{stats.n_failed} failed in {stats.seconds:.1f} s")


def _stage_command(stage: str, summary: str):
    needs_init = stage != "stage1"

    @main.command(stage, help=summary)
    @data_option()
    @profile_options
    @cache_option
    @click.option("--init-run-id", default=None, required=False,
                  help="Warm start: fold k starts from fold k of this earlier run "
                       + ("(the previous stage)." if needs_init else "(optional)."))
    @click.option("--resume-run-id", default=None,
                  help="Continue an interrupted run of this stage at its first unfinished fold.")
    @click.option("--bad-audio", type=click.Choice(["stop", "skip"]), default="stop",
                  show_default=True,
                  help="Undecodable clips: stop and list them all, or skip and log them.")
    @click.option("--selection-run-ids", default="", show_default=False,
                  help="stage3: 'STAGE1_RUN,STAGE2_RUN'; stage4: 'STAGE3_RUN'.",
                  hidden=stage in ("stage1", "stage2"))
    @click.option("--threshold", type=float, default=0.5, show_default=True,
                  help="stage3: keep noisy clips with sqrt(lwlrap1*lwlrap2) >= this.",
                  hidden=stage != "stage3")
    @click.option("--max-per-label-per-fold", type=click.IntRange(min=0), default=5,
                  show_default=True,
                  help="stage3: at most this many selected clips per label and fold (0: no cap).",
                  hidden=stage != "stage3")
    @click.option("--folds", "fold_spec", default="all", show_default=True,
                  metavar="all|none|0-4|0,2,5",
                  help="A fold job: train only these folds into the run of --resume-run-id "
                       "(or into a new run), then `fat-mlflow gather` completes it. 'none' "
                       "only prepares the run; 'all' trains and completes the whole stage.")
    def command(data, profile, overrides, seed, cache_dir, init_run_id, resume_run_id,
                bad_audio, selection_run_ids, threshold, max_per_label_per_fold, fold_spec):
        from fat_mlflow.stages import StageRequest, parse_folds, run_stage

        chosen = _profile(profile, overrides, seed)
        try:
            folds = parse_folds(fold_spec, chosen.train.n_folds)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--folds") from error
        request = StageRequest(
            stage=stage, data=data, profile=chosen,
            init_run_id=init_run_id or None, resume_run_id=resume_run_id or None,
            selection_run_ids=[r.strip() for r in selection_run_ids.split(",") if r.strip()],
            threshold=threshold, max_per_label_per_fold=max_per_label_per_fold,
            cache_dir=cache_dir, bad_audio=bad_audio, folds=folds,
        )
        run_id = run_stage(request)
        click.echo(f"{stage} run: {run_id}")
        if folds is not None:
            click.echo(f"folds trained by this job: {', '.join(map(str, folds)) or 'none'}; "
                       f"train the others with --resume-run-id {run_id} --folds ..., then "
                       f"complete the run with `fat-mlflow gather --run-id {run_id}`")

    return command


_stage_command("stage1", "Stage 1: train on the noisy set only, from scratch (model 1).")
_stage_command("stage2", "Stage 2: train on the curated set, warm-started from stage 1 (model 2).")
_stage_command("stage3", "Stage 3: curated + noisy clips that models 1 and 2 agree on "
                         "(geometric mean lwlrap >= threshold), warm-started from stage 2.")
_stage_command("stage4", "Stage 4: curated + noisy clips model 3 ranks perfectly "
                         "(lwlrap == 1), warm-started from stage 3.")


@main.command()
@click.option("--run-id", required=True, help="The stage run whose folds the fold jobs trained.")
@click.option("--data", default="", metavar="DIRECTORY",
              help="Dataset root, when it is not where the run was prepared (its stage.data).")
@cache_option
def gather(run_id: str, data: str, cache_dir: Path | None) -> None:
    """Complete a stage run trained by fold jobs (`stageN --folds ...`): out-of-fold tables,
    lwlrap metrics, curves, fat.complete=true. Fails with the list of unfinished folds."""
    from fat_mlflow.stages import gather_stage

    gather_stage(run_id, Path(data) if data else None, cache_dir)
    click.echo(f"gathered run: {run_id}")


@main.command()
@click.option("--data", default="", metavar="DIRECTORY",
              help="Dataset root in the FAT2019 layout; empty = build/reuse the demo data "
                   "in ./demo_data.")
@profile_options
@cache_option
@click.option("--archs", default="", metavar="cnn[,vgg16]",
              help="Networks to train through every stage and ensemble "
                   "(default: cnn for quick/tiny, cnn,vgg16 for paper).")
@esc50_option
@click.option("--registered-model", default="fat2019-tagger", show_default=True,
              help="Model-registry name of the ensemble.")
@click.option("--threshold", type=float, default=0.5, show_default=True,
              help="stage3: keep noisy clips with sqrt(lwlrap1*lwlrap2) >= this.")
@click.option("--max-per-label-per-fold", type=click.IntRange(min=0), default=5,
              show_default=True,
              help="stage3: at most this many selected clips per label and fold (0: no cap).")
@click.option("--warm-start", type=bool, default=True, show_default=True,
              help="true: each stage starts from the previous stage's fold models (the "
                   "seed); false: every stage from scratch (the ablation).")
@click.option("--fold-jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train each stage's folds in this many parallel processes (one GPU each "
                   "when several are visible, else a share of the CPU threads).")
def pipeline(data, profile, overrides, seed, cache_dir, archs, esc50, registered_model,
             threshold, max_per_label_per_fold, warm_start, fold_jobs):
    """The whole warm-up pipeline: features, stages 1-4, ensemble (the `main` entry point).

    Without --data it builds (or reuses) the demo dataset in ./demo_data. Stages that
    already finished with the same inputs are reused; an interrupted one is resumed.
    """
    from fat_mlflow.pipeline import (PipelineRequest, floor_verdict, run_pipeline,
                                     with_floor_rows)

    chosen = _profile(profile, overrides, seed)
    arch_list = [a.strip() for a in archs.split(",") if a.strip()] or (
        ["cnn", "vgg16"] if chosen.name == "paper" else ["cnn"])
    request = PipelineRequest(data=Path(data) if data else None, profile=chosen, archs=arch_list,
                              esc50=esc50, cache_dir=cache_dir,
                              registered_model=registered_model, threshold=threshold,
                              max_per_label_per_fold=max_per_label_per_fold,
                              warm_start=warm_start, fold_jobs=fold_jobs)
    parent_id, table = run_pipeline(request)
    columns = [c for c in ("model", "lwlrap_noisy", "lwlrap_curated", "lwlrap_test",
                           "selected_clips", "selection_precision", "noisy_base_rate",
                           "minutes", "non_training_share")
               if c in table]
    click.echo(f"\npipeline run {parent_id}: stage report (the seed's Table 2 on this data; "
               "minutes of each stage, and the share of them that is not training steps)")
    report = with_floor_rows(table)[columns]
    click.echo(report.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.3f}",
                                formatters={"selected_clips": _number("{:.0f}"),
                                            "minutes": _number("{:.1f}"),
                                            "non_training_share": _number("{:.0%}")}))
    click.echo(floor_verdict(table.iloc[-1]))


def _number(form: str):
    """A report column's formatter that leaves a missing figure as '-'."""
    return lambda value: "-" if math.isnan(value) else form.format(value)


# --- ensemble and serving commands (fat_mlflow.ensemble / fat_mlflow.tagger) below ---

DEFAULT_MODEL_URI = "models:/fat2019-tagger@champion"
model_option = click.option("--model", "model_uri", default=DEFAULT_MODEL_URI, show_default=True,
                            help="Tagger model URI: models:/NAME@ALIAS, models:/NAME/VERSION, "
                                 "runs:/RUN_ID/tagger or a local folder.")


def _load_tagger(model_uri: str):
    """The model as a local command loads it: it reads the files its user names."""
    import mlflow

    from fat_mlflow.tagger import load_local_model
    from fat_mlflow.tracking import configure_tracking

    configure_tracking()
    try:
        return load_local_model(model_uri)
    except (mlflow.exceptions.MlflowException, OSError) as error:
        raise click.ClickException(f"cannot load model {model_uri}: {error}") from error


@main.command()
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
def ensemble(run_ids: str, registered_model: str, alias: str, data: str) -> None:
    """Build the ensemble of stage runs as one pyfunc model and register it."""
    from fat_mlflow.ensemble import build_ensemble

    ids = [run_id.strip() for run_id in run_ids.split(",") if run_id.strip()]
    run_id, version = build_ensemble(ids, registered_model=registered_model, alias=alias,
                                     data=Path(data) if data else None)
    click.echo(f"ensemble run: {run_id}")
    click.echo(f"registered: models:/{registered_model}/{version}")


@main.command()
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
    from fat_mlflow.submission import list_clips, write_submission

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


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@model_option
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True,
              help="Labels shown per file.")
def tag(files: tuple[Path, ...], model_uri: str, top_k: int) -> None:
    """Print the top labels of a few audio FILES, with their scores."""
    from fat_mlflow.submission import score_files
    from fat_mlflow.tagger import ERROR_COLUMN, TOP_LABELS_COLUMN

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


ablation_names_option = click.option(
    "--only", default="", metavar="NAME[,NAME]",
    help=f"Ablations to run, of {', '.join(ABLATIONS)} (default: {', '.join(DEFAULT_ABLATIONS)});"
         " each sets its settings on top of the profile, so one equal to the profile reuses the "
         "default's runs.")


@main.command()
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

    from fat_mlflow.ablations import AblationRequest, run_ablations

    seed_list = _int_list(seeds, "--seeds")
    names = [n.strip() for n in only.split(",") if n.strip()] or list(DEFAULT_ABLATIONS)
    try:
        request = AblationRequest(profile=_profile(profile, overrides, None), seeds=seed_list,
                                  esc50=esc50,
                                  data=Path(data) if data else None, names=names,
                                  cache_dir=cache_dir, jobs=jobs)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--only/--seeds") from error
    command = "fat-mlflow " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    summary = run_ablations(request, out_dir, command)
    click.echo(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    click.echo(f"report: {out_dir / 'ablations.md'}")


@main.command()
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

    from fat_mlflow.study import StudyRequest, run_study

    grid = StudyGrid()
    try:
        budget_list = [(float(width), int(epochs)) for width, epochs in
                       (item.strip().split("x") for item in budgets.split(",") if item.strip())]
    except ValueError as error:
        raise click.BadParameter(f"{budgets!r}: expected WIDTHxEPOCHS items, e.g. 0.25x32",
                                 param_hint="--budgets") from error
    try:
        request = StudyRequest(profile=_profile(profile, overrides, None),
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

# --- benchmarks (fat_mlflow.benchmarks.report) ---


@main.command()
@click.option("--only", default="features,training,inference", show_default=True,
              help="Comma-separated benchmarks to run, of features, training, inference and "
                   "pipeline (the main job timed with train.amp=false and by default, each "
                   "stage's share that is not training steps: about 25 minutes on 2 cores).")
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
                   "untrained ensemble in the quick pipeline's shape.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("benchmarks.md"), show_default=True,
              help="Markdown file of the tables (also logged as the run's artifact).")
def benchmark(only: str, size: str, repeats: int, data: str, esc50: str, model_uri: str,
              out: Path) -> None:
    """Speed benchmarks, each against a baseline measured in the same run: features (cache vs a
    librosa loop), training (float32 and bf16 samples/s vs both matmul peaks), inference (the
    served ensemble vs eager float32), pipeline (the main job by default vs float32). Each
    result is an MLflow run; the tables go to --out."""
    from fat_mlflow.benchmarks.report import BenchmarkRequest, run_benchmarks

    try:
        request = BenchmarkRequest(
            only=tuple(name.strip() for name in only.split(",") if name.strip()),
            profile=BENCHMARK_PROFILES[size], repeats=repeats,
            data=Path(data) if data else None, esc50=Path(esc50) if esc50 else None,
            model_uri=model_uri or None, out=out)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--only") from error
    run_id, text = run_benchmarks(request)
    click.echo(text)
    click.echo(f"benchmark run: {run_id}; tables written to {out}")


@main.command()
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
