"""`fat-mlflow`: the command line. A thin layer: parse options, call the pipeline modules.

MLproject entry points call these commands, so `mlflow run . -e stage1 -P ...` and
`fat-mlflow stage1 ...` do the same thing. `main` is the group (the console script's entry
point); the commands live by topic in `data`, `stages`, `serving` and `experiments`, the
options they share in `options`. This is the top layer: it may import every other, none
imports it.
"""
from __future__ import annotations

import click

from fat_mlflow.cli import data, experiments, serving, stages


class _Group(click.Group):
    """Turns the pipeline's input errors into one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context):
        from fat_mlflow.cli.errors import USER_ERRORS

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


for command in (data.demo_data, data.features, data.cache, *stages.STAGE_COMMANDS,
                stages.gather, stages.pipeline, serving.ensemble, serving.distill, serving.predict, serving.tag,
                experiments.ablations, experiments.study, experiments.benchmark,
                experiments.scale, experiments.results):
    main.add_command(command)
