"""Where the CNN pipeline passes the floor: test lwlrap against budget and against data.

Two axes, each point one whole pipeline run (tagged `fat.study`, found again by a hash of its
inputs and reused, so an interrupted study resumes and a rerun only redraws the report):

- budget: network width x epochs per fold on the default demo;
- data: curated clips per class (`fat-mlflow demo-data --curated-per-class`), the noisy and
  test sets unchanged, at the default budget.

Beside every point the logistic floor (fat_mlflow.serving.baseline) on the same clips, and how many
noisy clips stages 3 and 4 select and how many of them carry exactly the right labels.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd

from fat_mlflow.config import DemoConfig, Profile, StudyGrid
from fat_mlflow.data.layout import dataset_fingerprint, load_dataset
from fat_mlflow.experiments.ablations import pipeline_row, report_cells, reused_or_trained
from fat_mlflow.plots import plot_study_axis
from fat_mlflow.warmup.pipeline import DEMO_DIR, PipelineRequest, ensure_demo_data
from fat_mlflow.warmup.tracking import TAG_STAGE, configure_tracking

TAG_STUDY = "fat.study"
TAG_STUDY_KEY = "fat.study_key"


@dataclass(frozen=True)
class StudyPoint:
    axis: str  # "budget" or "data"
    width: float
    epochs: int
    curated_per_class: int  # 0: every curated clip of the demo

    def label(self) -> str:
        clips = self.curated_per_class or "all"
        return f"width {self.width:g}, {self.epochs} epochs, {clips} curated/class"


@dataclass
class StudyRequest:
    profile: Profile  # the default budget and every other setting
    seeds: list[int]
    budgets: list[tuple[float, int]] = field(default_factory=lambda: list(StudyGrid().budgets))
    curated_per_class: list[int] = field(
        default_factory=lambda: list(StudyGrid().curated_per_class))
    esc50: Path | None = None
    demo_dir: Path = DEMO_DIR  # the default demo; the thinned ones go beside it
    demo_scale: float = 1.0  # < 1: smaller demos (the tests)
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("the study needs at least one seed")
        if any(width <= 0 or epochs < 1 for width, epochs in self.budgets):
            raise ValueError(f"budgets must have width > 0 and epochs >= 1, got {self.budgets}")
        if any(k < 0 for k in self.curated_per_class):
            raise ValueError("curated clips per class must be >= 0 (0: all)")

    def points(self) -> list[StudyPoint]:
        default = (self.profile.train.width, self.profile.train.epochs)
        return ([StudyPoint("budget", w, e, 0) for w, e in self.budgets]
                + [StudyPoint("data", *default, k) for k in self.curated_per_class])


def study_data(request: StudyRequest, curated_per_class: int) -> Path:
    """The demo with at most `curated_per_class` curated clips per class (0: the demo itself,
    the main job's when it is there), built once beside `request.demo_dir`."""
    demo = request.demo_dir
    out = demo.parent / f"{demo.name}_curated{curated_per_class}" if curated_per_class else demo
    return ensure_demo_data(out, request.esc50, DemoConfig(curated_per_class=curated_per_class),
                            scale=request.demo_scale)


def point_key(profile: Profile, fingerprint: str) -> str:
    """Everything that makes two runs of a point interchangeable (width, epochs and seed are in
    the profile, the curated clips per class in the dataset)."""
    payload = {"profile": profile.settings(), "dataset": fingerprint}
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def run_point(request: StudyRequest, point: StudyPoint, seed: int) -> dict:
    """Train (or reuse) one point at one seed; its row of test scores, floors and selections."""
    data = study_data(request, point.curated_per_class)
    dataset = load_dataset(data)
    profile = request.profile.override({"train.width": point.width, "train.epochs": point.epochs,
                                        "train.seed": seed})
    key = point_key(profile, dataset_fingerprint(dataset))
    pipeline_id = reused_or_trained(
        f"{point.label()}, seed {seed}", TAG_STUDY_KEY,
        PipelineRequest(data=data, profile=profile, archs=["cnn"], esc50=request.esc50,
                        registered_model="fat-study", cache_dir=request.cache_dir, progress=False,
                        tags={TAG_STUDY: point.axis, TAG_STUDY_KEY: key, "fat.seed": str(seed)}))
    per_class = dataset.curated["labels"].map(len).sum() / len(dataset.vocabulary)
    return {"axis": point.axis, "width": point.width, "epochs": point.epochs,
            "curated_per_class": round(per_class, 1), "seed": seed,
            **pipeline_row(pipeline_id, dataset)}


def crossing(x: pd.Series, cnn: pd.Series, floor: pd.Series) -> float | None:
    """The first x (linear interpolation) where the CNN curve rises above the floor's."""
    gap = (cnn - floor).to_numpy()
    xs = x.to_numpy(dtype=float)
    for i in range(len(gap)):
        if gap[i] > 0:
            if i == 0:
                return float(xs[0])
            return float(np.interp(0.0, [gap[i - 1], gap[i]], [xs[i - 1], xs[i]]))
    return None


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per point: means over seeds of the ensemble, the floors and the selections."""
    columns = ["ensemble_test", "logreg_curated_test", "logreg_curated_noisy_test",
               "model3_selected_clips", "model3_selection_precision",
               "model4_selected_clips", "model4_selection_precision"]
    present = [c for c in columns if c in rows]
    return (rows.groupby(["axis", "width", "epochs", "curated_per_class"], sort=False)[present]
            .mean().reset_index())


def write_report(rows: pd.DataFrame, out_dir: Path, command: str) -> list[Path]:
    """study.md, study_runs.csv and one figure per axis in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    files = [out_dir / "study_runs.csv", out_dir / "study.md"]
    rows.to_csv(files[0], index=False)
    sections = [f"# Where the CNN pipeline passes the floor\n\nReproduce with `{command}`. Test "
                f"lwlrap of the ensemble (stages 2-4) and of the logistic floor on the same "
                f"clips; seeds {', '.join(map(str, sorted(rows['seed'].unique())))}, means.\n"]
    for axis, x, xlabel in (("budget", "epochs", "epochs per fold"),
                            ("data", "curated_per_class", "curated clips per class")):
        part = summary[summary["axis"] == axis].sort_values(["width", x])
        if part.empty:
            continue
        figure = plot_study_axis(part, x, xlabel)
        files.append(out_dir / f"study_{axis}.png")
        figure.savefig(files[-1], dpi=110)
        plt.close(figure)
        sections += [f"## Against {xlabel}\n",
                     report_cells(part.drop(columns="axis")).to_markdown(
                         index=False, disable_numparse=True), "",
                     *_crossings(part, x, xlabel), f"![{axis}]({files[-1].name})\n"]
    files[1].write_text("\n".join(sections))
    return files


def _crossings(part: pd.DataFrame, x: str, xlabel: str) -> list[str]:
    lines = []
    for width, curve in part.groupby("width"):
        floor = curve[["logreg_curated_test", "logreg_curated_noisy_test"]].max(axis=1)
        at = crossing(curve[x], curve["ensemble_test"], floor)
        if at is None:
            where = f"stays below the floor up to {curve[x].max():g} {xlabel}"
        elif at == curve[x].min():
            where = f"is above the floor from the smallest point measured, {at:g} {xlabel}"
        else:
            where = f"passes the floor at about {at:.1f} {xlabel}"
        lines.append(f"- width {width:g}: the ensemble {where}.")
    return [*lines, ""]


def run_study(request: StudyRequest, out_dir: Path, command: str) -> pd.DataFrame:
    """Every point at every seed, then the report, logged as one `study` run."""
    configure_tracking()
    rows = pd.DataFrame([run_point(request, point, seed)
                         for point in request.points() for seed in request.seeds])
    files = write_report(rows, out_dir, command)
    with mlflow.start_run(run_name="study"):
        mlflow.set_tag(TAG_STAGE, "study")
        mlflow.log_params({"seeds": ",".join(map(str, request.seeds)),
                           "budgets": StudyGrid(tuple(request.budgets)).budgets_text(),
                           "curated_per_class": ",".join(map(str, request.curated_per_class)),
                           **request.profile.flat()})
        for path in files:
            mlflow.log_artifact(str(path), "report")
    return summarise(rows)
