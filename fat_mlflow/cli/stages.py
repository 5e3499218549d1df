"""`fat-mlflow stage1` .. `stage4`, `gather` and `pipeline`: the warm-up stages."""
from __future__ import annotations

import math
from pathlib import Path

import click

from fat_mlflow.cli.options import (
    bad_audio_option,
    cache_option,
    data_option,
    esc50_option,
    profile_options,
    resolve_profile,
    split_distill_items,
)


def stage_command(stage: str, summary: str) -> click.Command:
    """`fat-mlflow STAGE`: the four stages take the same options, each shows those it uses."""
    needs_init = stage != "stage1"

    @click.command(stage, help=summary)
    @data_option()
    @profile_options
    @cache_option
    @click.option("--init-run-id", default=None, required=False,
                  help="Warm start: fold k starts from fold k of this earlier run "
                       + ("(the previous stage)." if needs_init else "(optional)."))
    @click.option("--resume-run-id", default=None,
                  help="Continue an interrupted run of this stage at its first unfinished fold.")
    @bad_audio_option
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
        from fat_mlflow.warmup.stage_inputs import StageRequest, parse_folds
        from fat_mlflow.warmup.stages import run_stage

        chosen = resolve_profile(profile, overrides, seed)
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


STAGE_COMMANDS = (
    stage_command("stage1", "Stage 1: train on the noisy set only, from scratch (model 1)."),
    stage_command("stage2", "Stage 2: train on the curated set, warm-started from stage 1 "
                            "(model 2)."),
    stage_command("stage3", "Stage 3: curated + noisy clips that models 1 and 2 agree on "
                            "(geometric mean lwlrap >= threshold), warm-started from stage 2."),
    stage_command("stage4", "Stage 4: curated + noisy clips model 3 ranks perfectly "
                            "(lwlrap == 1), warm-started from stage 3."),
)


@click.command()
@click.option("--run-id", required=True, help="The stage run whose folds the fold jobs trained.")
@click.option("--data", default="", metavar="DIRECTORY",
              help="Dataset root, when it is not where the run was prepared (its stage.data).")
@cache_option
def gather(run_id: str, data: str, cache_dir: Path | None) -> None:
    """Complete a stage run trained by fold jobs (`stageN --folds ...`): out-of-fold tables,
    lwlrap metrics, curves, fat.complete=true. Fails with the list of unfinished folds."""
    from fat_mlflow.warmup.stages import gather_stage

    gather_stage(run_id, Path(data) if data else None, cache_dir)
    click.echo(f"gathered run: {run_id}")


@click.command()
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
@bad_audio_option
@click.option("--distill", type=bool, default=True, show_default=True,
              help="Also distil the ensemble into one fast network, registered as "
                   "REGISTERED_MODEL-fast (settings: --set distill.FIELD=VALUE; "
                   "docs/distill.md).")
def pipeline(data, profile, overrides, seed, cache_dir, archs, esc50, registered_model,
             threshold, max_per_label_per_fold, warm_start, fold_jobs, bad_audio, distill):
    """The whole warm-up pipeline: features, stages 1-4, ensemble, student (the `main`
    entry point).

    Without --data it builds (or reuses) the demo dataset in ./demo_data. Stages that
    already finished with the same inputs are reused; an interrupted one is resumed.
    """
    from dataclasses import replace

    from fat_mlflow.cli.serving import distill_settings
    from fat_mlflow.serving.distill import distill_and_register
    from fat_mlflow.serving.ensemble import (
        build_and_register,
        ensemble_row,
        floor_verdict,
        with_floor_rows,
    )
    from fat_mlflow.warmup.pipeline import PipelineRequest, run_pipeline

    profile_items, distill_items = split_distill_items(overrides)
    chosen = resolve_profile(profile, profile_items, seed)
    student = replace(distill_settings(distill_items), seed=chosen.train.seed) if distill else None
    arch_list = [a.strip() for a in archs.split(",") if a.strip()] or (
        ["cnn", "vgg16"] if chosen.name == "paper" else ["cnn"])
    request = PipelineRequest(data=Path(data) if data else None, profile=chosen, archs=arch_list,
                              esc50=esc50, cache_dir=cache_dir,
                              registered_model=registered_model, threshold=threshold,
                              max_per_label_per_fold=max_per_label_per_fold,
                              warm_start=warm_start, fold_jobs=fold_jobs,
                              bad_audio=bad_audio, distill=student)
    parent_id, table = run_pipeline(request, build_and_register, distill_and_register)
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
    click.echo(floor_verdict(ensemble_row(table)))


def _number(form: str):
    """A report column's formatter that leaves a missing figure as '-'."""
    return lambda value: "-" if math.isnan(value) else form.format(value)
