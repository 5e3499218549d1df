"""Quality ablations: what SpecMix, mixup, the warm-up and bf16 do to the default pipeline,
with their spread over seeds.

Each (ablation, seed) is one whole pipeline run (parent + stage runs), tagged `fat.ablation`;
a finished one is found again by a hash of its inputs and reused, so an interrupted sweep
resumes where it stopped and a re-run only rebuilds the report. Stage runs shared between
ablations (stage 1 of `default` and `no_warm_start`) are reused by the pipeline itself.
"""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import click
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
import torch
from scipy import stats

from fat_mlflow.config import ABLATIONS, DEFAULT_ABLATIONS, Ablation, Profile
from fat_mlflow.data.layout import DataLayoutError, FatDataset, dataset_fingerprint, load_dataset
from fat_mlflow.engine.metrics import lwlrap
from fat_mlflow.plots import plot_ablations
from fat_mlflow.serving.ensemble import (
    FLOOR_TRAINING_SETS,
    build_and_register,
    floors_by_training_set,
)
from fat_mlflow.warmup.pipeline import DEMO_DIR, PipelineRequest, ensure_demo_data, run_pipeline
from fat_mlflow.warmup.tracking import (
    TAG_DATASET,
    TAG_PIPELINE,
    TAG_STAGE,
    configure_tracking,
    downloaded,
    read_bytes,
    read_table,
)

TAG_ABLATION = "fat.ablation"
TAG_KEY = "fat.ablation_key"


def floor_column(training_set: str) -> str:
    """The report's column of the floor trained on `training_set`."""
    return f"logreg_{training_set}_test"


FLOOR_COLUMNS = tuple(floor_column(name) for name in FLOOR_TRAINING_SETS)


@dataclass(frozen=True)
class Comparison:
    """One line of the report: a number read from the runs of one ablation."""

    label: str
    ablation: str
    column: str


COMPARISONS = (
    Comparison("default pipeline (ensemble of stages 2-4)", "default", "ensemble_test"),
    Comparison("SpecMix without mixup", "specmix", "ensemble_test"),
    Comparison("SpecMix + mixup (the seed's)", "specmix_mixup", "ensemble_test"),
    Comparison("mixup without SpecMix", "mixup", "ensemble_test"),
    Comparison("no SpecMix, no mixup", "no_mixing", "ensemble_test"),
    Comparison("no warm start (every stage from scratch)", "no_warm_start", "ensemble_test"),
    Comparison("stage 2 alone (curated only, from scratch)", "no_warm_start", "model2_test"),
    Comparison("float32 instead of bf16", "float32", "ensemble_test"),
    Comparison("single fold model (stage 4, fold 0)", "default", "single_fold_test"),
    Comparison("stage 4 alone (all folds, warm-started)", "default", "model4_test"),
)
REFERENCE = COMPARISONS[0]


@dataclass
class AblationRequest:
    profile: Profile
    seeds: list[int]
    esc50: Path | None = None  # for the demo data; None: esc50.locate_esc50 finds it
    data: Path | None = None
    names: list[str] = field(default_factory=lambda: list(DEFAULT_ABLATIONS))
    cache_dir: Path | None = None
    jobs: int = 1  # pipelines trained in parallel processes

    def __post_init__(self) -> None:
        unknown = sorted(set(self.names) - set(ABLATIONS))
        if unknown:
            raise ValueError(f"unknown ablation(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(ABLATIONS)}")
        if not self.seeds:
            raise ValueError("ablations need at least one seed")


def ablation_key(ablation: Ablation, profile: Profile, fingerprint: str) -> str:
    """Everything that makes two pipeline runs interchangeable (the seed is in the profile).
    The ablation's name is not: one that sets what the profile already has (`no_mixing` on
    the quick profile) is the same pipeline as `default` and reuses its runs."""
    payload = {"warm_start": ablation.warm_start, "profile": profile.settings(),
               "dataset": fingerprint}
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def ablation_profile(base: Profile, ablation: Ablation, seed: int, threads: int) -> Profile:
    profile = base.override(ablation.overrides)
    return replace(profile, train=replace(profile.train, seed=seed, num_threads=threads))


def finished_pipeline(key: str, tag: str = TAG_KEY) -> str | None:
    """The newest finished pipeline run whose `tag` is `key` in the current experiment."""
    runs = mlflow.search_runs(
        filter_string=f"tags.`{tag}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], output_format="list",
    )
    return next((r.info.run_id for r in runs if TAG_PIPELINE in r.data.tags), None)


def run_one(request: AblationRequest, data: Path, ablation: Ablation, seed: int,
            threads: int) -> dict:
    """Train (or reuse) one ablation at one seed; returns its row of test scores."""
    profile = ablation_profile(request.profile, ablation, seed, threads)
    dataset = load_dataset(data)
    key = ablation_key(ablation, profile, dataset_fingerprint(dataset))
    pipeline_id = reused_or_trained(f"{ablation.name} seed {seed}", TAG_KEY, PipelineRequest(
        data=data, profile=profile, archs=["cnn"], esc50=request.esc50,
        registered_model=f"fat-ablation-{ablation.name}", warm_start=ablation.warm_start,
        cache_dir=request.cache_dir, progress=False,
        tags={TAG_ABLATION: ablation.name, TAG_KEY: key, "fat.seed": str(seed)}))
    return pipeline_row(pipeline_id, dataset) | {"ablation": ablation.name, "seed": seed}


def reused_or_trained(label: str, key_tag: str, request: PipelineRequest) -> str:
    """The finished pipeline run whose `key_tag` matches `request`'s, else a new one."""
    pipeline_id = finished_pipeline(request.tags[key_tag], key_tag)
    if pipeline_id:
        click.echo(f"{label}: reusing pipeline run {pipeline_id}")
        return pipeline_id
    click.echo(f"{label}: training")
    return run_pipeline(request, build_and_register)[0]


def pipeline_row(pipeline_id: str, dataset: FatDataset) -> dict:
    """Test lwlrap of every model of one pipeline run, plus its first fold model alone."""
    table = read_table(pipeline_id, "report/stage_table.csv")
    row: dict = {"pipeline_run_id": pipeline_id}
    for record in table.to_dict("records"):
        name = "ensemble" if record["stage"] == "ensemble" else f"model{record['stage'][-1]}"
        if name == "ensemble":  # the floor that the ensemble step scored on the same clips
            row |= {floor_column(training_set): value
                    for training_set, value in floors_by_training_set(record).items()}
        for column in ("lwlrap_noisy", "lwlrap_curated", "lwlrap_test", "selection_precision",
                       "selected_clips", "noisy_base_rate"):
            value = record.get(column)
            if value is not None and not pd.isna(value):
                row[f"{name}_{column.removeprefix('lwlrap_')}"] = float(value)
    stage4 = table.loc[table["stage"] == "stage4", "run_id"].iloc[0]
    row["single_fold_test"] = single_fold_lwlrap(stage4, dataset, fold=0)
    info = mlflow.get_run(pipeline_id).info
    row["minutes"] = (info.end_time - info.start_time) / 60_000
    return row


def single_fold_lwlrap(stage_run_id: str, dataset: FatDataset, fold: int) -> float:
    """Test lwlrap of one fold model, from the scores the stage run kept for that fold."""
    fnames = read_table(stage_run_id, "test_scores.csv")["fname"]
    with downloaded(stage_run_id, f"folds/fold_{fold}/scores.npz") as path, \
            np.load(path) as scores:
        fold_scores = scores["test"]
    truth = dataset.targets(dataset.test.set_index("fname").loc[fnames].reset_index())
    return lwlrap(truth, fold_scores)


def _run_task(request: AblationRequest, data: Path, name: str, seed: int, threads: int) -> dict:
    configure_tracking()
    return run_one(request, data, ABLATIONS[name], seed, threads)


def run_sweep(request: AblationRequest, data: Path) -> pd.DataFrame:
    """Every ablation at every seed, ablation by ablation (so an interrupted sweep leaves
    whole ablations behind), in `jobs` parallel processes that split the CPU threads.

    Ablations with the same settings at a seed are trained once. The reference goes first,
    alone: `no_warm_start` trains the same stage 1 at each seed and reuses it, and two
    processes must never train one stage run at once.
    """
    fingerprint = dataset_fingerprint(load_dataset(data))
    trained: dict[str, tuple[str, int]] = {}
    wanted: list[tuple[str, int, str]] = []
    for name in request.names:
        for seed in request.seeds:
            ablation = ABLATIONS[name]
            key = ablation_key(ablation, ablation_profile(request.profile, ablation, seed, 1),
                               fingerprint)
            trained.setdefault(key, (name, seed))
            wanted.append((name, seed, key))
    rows = dict(zip(trained, _train(request, data, list(trained.values()))))
    return pd.DataFrame([rows[key] | {"ablation": name, "seed": seed}
                         for name, seed, key in wanted])


def _train(request: AblationRequest, data: Path, tasks: list[tuple[str, int]]) -> list[dict]:
    """One row per (ablation, seed) task, in the order of `tasks`."""
    if request.jobs <= 1:
        threads = request.profile.train.num_threads
        return [_run_task(request, data, name, seed, threads) for name, seed in tasks]
    threads = max(1, torch.get_num_threads() // request.jobs)
    first = [task for task in tasks if task[0] == REFERENCE.ablation]
    waves = [first, [task for task in tasks if task not in first]]
    results: dict[tuple[str, int], dict] = {}
    with ProcessPoolExecutor(request.jobs, mp_context=get_context("spawn")) as pool:
        for wave in waves:
            futures = {task: pool.submit(_run_task, request, data, *task, threads)
                       for task in wave}
            results |= {task: future.result() for task, future in futures.items()}
    return [results[task] for task in tasks]


def floor_row(runs: pd.DataFrame) -> dict:
    """The logistic floor's test lwlrap, as the sweep's ensemble runs logged it (the same
    clips for every run: one dataset)."""
    return {column: float(runs[column].dropna().iloc[0]) for column in FLOOR_COLUMNS
            if column in runs and runs[column].notna().any()}


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread of each comparison over seeds, and its paired difference to the default
    pipeline with a paired t-test: with 3 seeds only large, consistent gaps are significant."""
    reference = _by_seed(runs, REFERENCE)
    rows = []
    for comparison in COMPARISONS:
        values = _by_seed(runs, comparison)
        if values.empty:
            continue
        row = {"configuration": comparison.label, "seeds": len(values),
               "mean": values.mean(), "std": values.std(ddof=1) if len(values) > 1 else np.nan,
               "min": values.min(), "max": values.max(),
               "minutes": _pipeline_minutes(runs, comparison)}
        if comparison is not REFERENCE:
            paired = pd.concat([values, reference], axis=1, join="inner").dropna()
            diff = paired.iloc[:, 0] - paired.iloc[:, 1]
            row["delta_vs_default"] = diff.mean()
            row["delta_std"] = diff.std(ddof=1) if len(diff) > 1 else np.nan
            row["p_value"] = (stats.ttest_rel(paired.iloc[:, 0], paired.iloc[:, 1]).pvalue
                              if len(diff) > 1 and diff.std() > 0 else np.nan)
            row["verdict"] = verdict(row["delta_vs_default"], row["p_value"])
        rows.append(row)
    return pd.DataFrame(rows)


def _pipeline_minutes(runs: pd.DataFrame, comparison: Comparison) -> float:
    """Mean wall minutes of the pipelines a configuration is (its ensemble): what it costs
    beside what it scores; NaN for a part of a pipeline (one stage, one fold model)."""
    if comparison.column != "ensemble_test" or "minutes" not in runs:
        return np.nan
    return float(runs.loc[runs["ablation"] == comparison.ablation, "minutes"].mean())


def verdict(delta: float, p_value: float, alpha: float = 0.05) -> str:
    if pd.isna(p_value) or p_value >= alpha:
        return "not significant"
    return "better than default" if delta > 0 else "worse than default"


def _by_seed(runs: pd.DataFrame, comparison: Comparison) -> pd.Series:
    picked = runs[runs["ablation"] == comparison.ablation]
    if comparison.column not in picked:
        return pd.Series(dtype=float)
    return picked.set_index("seed")[comparison.column].astype(float)


def table2(runs: pd.DataFrame, ablation: str = "default") -> pd.DataFrame:
    """This project's Table 2 on the data: one ablation's models, mean +- std over seeds, with
    the number of noisy clips the stage selected and the share of them labelled correctly."""
    picked = runs[runs["ablation"] == ablation]
    rows = []
    for model in ("model1", "model2", "model3", "model4", "ensemble"):
        row = {"model": model}
        for split in ("noisy", "curated", "test", "selected_clips", "selection_precision"):
            column = f"{model}_{split}"
            if column in picked and picked[column].notna().any():
                name = f"lwlrap_{split}" if split in ("noisy", "curated", "test") else split
                decimals = 1 if split == "selected_clips" else 3
                row[name] = _mean_std(picked[column], decimals)
        rows.append(row)
    return pd.DataFrame(rows).fillna("")


def _mean_std(values: pd.Series, decimals: int = 3) -> str:
    values = values.dropna().astype(float)
    spread = f" ± {values.std(ddof=1):.{decimals}f}" if len(values) > 1 else ""
    return f"{values.mean():.{decimals}f}{spread}"


def write_report(runs: pd.DataFrame, baseline: dict, profile: Profile, out_dir: Path,
                 command: str) -> list[Path]:
    """ablations.md (+ CSV and figures) in `out_dir`; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(runs)
    floor = pd.DataFrame([{"configuration": f"logistic regression on clip statistics ({label})",
                           "seeds": 1, "mean": value}
                          for label, value in (("curated", baseline.get("logreg_curated_test")),
                                               ("curated + noisy",
                                                baseline.get("logreg_curated_noisy_test")))
                          if value is not None])
    files = {"runs": out_dir / "ablation_runs.csv", "summary": out_dir / "ablations.csv",
             "figure": out_dir / "ablations.png", "markdown": out_dir / "ablations.md"}
    runs.to_csv(files["runs"], index=False)
    report = pd.concat([summary, floor], ignore_index=True)
    report.to_csv(files["summary"], index=False)
    figure = plot_ablations(report)
    figure.savefig(files["figure"], dpi=110)
    plt.close(figure)
    seeds = ", ".join(str(s) for s in sorted(runs["seed"].unique()))
    files["markdown"].write_text("\n".join([
        "# Ablations on the demo data", "",
        f"Reproduce with `{command}`. Test lwlrap over seeds {seeds}; `delta_vs_default` is "
        "the mean paired difference to the default pipeline at the same seed, `p_value` a "
        "paired t-test; `minutes` the mean wall time of a configuration's pipeline runs.", "",
        f"The default pipeline: {describe(profile)}.", "",
        cost_line(runs), "",
        report_cells(report).to_markdown(index=False, disable_numparse=True), "",
        *_table2_sections(runs),
        f"![ablations]({files['figure'].name})", "",
    ]))
    return [*files.values(), *_copy_figures(runs, out_dir)]


def _table2_sections(runs: pd.DataFrame) -> list[str]:
    """Table 2 of the default pipeline, and of the from-scratch ablation where it was run."""
    sections = []
    for ablation, title in (("default", "default pipeline"),
                            ("no_warm_start", "no warm start, every stage from scratch")):
        if (runs["ablation"] == ablation).any():
            sections += [f"## Table 2 ({title}, mean ± std over seeds)", "",
                         table2(runs, ablation).to_markdown(index=False,
                                                            disable_numparse=True), ""]
    base_rate = runs.get("model3_noisy_base_rate")
    if base_rate is not None and base_rate.notna().any():
        sections += [f"`selection_precision`: share of the clips a stage selected from the "
                     f"noisy set whose labels are all correct (`noise_truth.csv`); the noisy "
                     f"set's base rate is {base_rate.dropna().iloc[0]:.3f}.", ""]
    return sections


def describe(profile: Profile) -> str:
    """The settings an ablation toggles, in words, for the report's reader."""
    train, augment = profile.train, profile.augment
    on = {True: "on", False: "off"}
    return (f"profile `{profile.name}`, CNN-model-1 at width {train.width:g}, "
            f"{train.epochs} epochs per fold, {train.n_folds} folds, SpecMix {on[augment.specmix]}, "
            f"mixup {on[augment.mixup]}, bf16 autocast {on[train.amp]} (where the CPU has bf16 "
            "units), each stage warm-started from the previous one")


def cost_line(runs: pd.DataFrame) -> str:
    """What the sweep cost, from the pipeline runs' own start and end times."""
    if "minutes" not in runs:
        return ""
    pipelines = runs.drop_duplicates("pipeline_run_id")
    return (f"Cost: {len(pipelines)} pipeline runs, {pipelines['minutes'].sum():.0f} min of "
            f"wall time in all ({pipelines['minutes'].mean():.1f} min each; a pipeline that "
            "reuses a finished stage run takes less).")


def report_cells(table: pd.DataFrame) -> pd.DataFrame:
    """Three decimals (minutes: one), p-values below 0.001 as such, blanks where a figure
    does not apply."""
    def cell(value, column: str):
        if not isinstance(value, float):
            return value
        if pd.isna(value):
            return ""
        if column == "minutes":
            return f"{value:.1f}"
        return "< 0.001" if column == "p_value" and value < 0.001 else f"{value:.3f}"

    return pd.DataFrame({column: [cell(v, column) for v in table[column].astype(object)]
                         for column in table.columns})


def _copy_figures(runs: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Stage curves and per-class lwlrap of the first default run, for the README."""
    default = runs[runs["ablation"] == "default"].sort_values("seed")
    if default.empty:
        return []
    table = read_table(default["pipeline_run_id"].iloc[0], "report/stage_table.csv")
    wanted = {f"curves_{row.stage}.png": (row.run_id, "curves.png")
              for row in table.itertuples() if row.stage.startswith("stage")}
    ensemble = table.loc[table["stage"] == "ensemble", "run_id"]
    if len(ensemble):
        wanted["per_class_lwlrap.png"] = (ensemble.iloc[0], "per_class_lwlrap.png")
    copied = []
    for name, (run_id, artifact) in wanted.items():
        target = out_dir / name
        target.write_bytes(read_bytes(run_id, artifact))
        copied.append(target)
    return copied


def run_ablations(request: AblationRequest, out_dir: Path, command: str) -> pd.DataFrame:
    """The whole sweep + baseline + report, with the report logged as one `ablations` run."""
    configure_tracking()
    data = request.data or ensure_demo_data(DEMO_DIR, request.esc50)
    dataset = load_dataset(data)
    if not dataset.has_test_truth:
        raise DataLayoutError(f"{data / 'test_truth.csv'}: no labelled test clip (no such "
                              "file, or no test clip at all); the ablations compare test "
                              "lwlrap, so the test clips need their labels")
    runs = run_sweep(request, data)
    baseline = floor_row(runs)
    files = write_report(runs, baseline, request.profile, out_dir, command)
    with mlflow.start_run(run_name="ablations"):
        mlflow.set_tags({TAG_STAGE: "ablations", TAG_DATASET: dataset_fingerprint(dataset)})
        mlflow.log_params({"ablations": ",".join(request.names),
                           "seeds": ",".join(map(str, request.seeds)), **request.profile.flat()})
        mlflow.log_metrics({key: value for key, value in baseline.items()})
        for path in files:
            mlflow.log_artifact(str(path), "report")
    return summarise(runs)
