"""Figures people would rather look at than read: training curves and the stage table."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402


def plot_fold_curves(histories: dict[int, pd.DataFrame], title: str = "") -> Figure:
    """Train loss and validation lwlrap per epoch, one line per fold.

    `histories[fold]` has columns epoch, train_loss, val_lwlrap.
    """
    figure, (loss_axis, score_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    for fold, history in sorted(histories.items()):
        loss_axis.plot(history["epoch"], history["train_loss"], label=f"fold {fold}")
        validated = history.dropna(subset=["val_lwlrap"])  # val_every > 1 leaves gaps
        score_axis.plot(validated["epoch"], validated["val_lwlrap"], marker=".", label=f"fold {fold}")
    loss_axis.set(xlabel="epoch", ylabel="train BCE loss", title="training loss")
    score_axis.set(xlabel="epoch", ylabel="lwlrap", title="validation lwlrap (held-out fold)")
    score_axis.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_stage_table(table: pd.DataFrame) -> Figure:
    """Grouped bars of the seed's Table 2 columns (lwlrap noisy / curated / test) per model."""
    columns = [c for c in ("lwlrap_noisy", "lwlrap_curated", "lwlrap_test") if c in table]
    figure, axis = plt.subplots(figsize=(1.6 + 1.3 * len(table), 3.8))
    width = 0.8 / max(len(columns), 1)
    for i, column in enumerate(columns):
        positions = [x + i * width for x in range(len(table))]
        bars = axis.bar(positions, table[column], width, label=column.removeprefix("lwlrap_"))
        axis.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
    axis.set_xticks([x + width * (len(columns) - 1) / 2 for x in range(len(table))])
    axis.set_xticklabels(table["model"], rotation=20, ha="right")
    axis.set(ylabel="lwlrap", ylim=(0, 1.05), title="warm-up pipeline: lwlrap per stage")
    axis.legend(fontsize="small", ncols=len(columns))
    figure.tight_layout()
    return figure


def plot_per_class(per_class: pd.Series, title: str) -> Figure:
    """Horizontal bars of per-class lwlrap, worst classes at the bottom."""
    ordered = per_class.sort_values()
    figure, axis = plt.subplots(figsize=(6, 0.18 * len(ordered) + 1.2))
    axis.barh(ordered.index, ordered.values)
    axis.set(xlabel="lwlrap", xlim=(0, 1), title=title)
    axis.tick_params(axis="y", labelsize=6)
    figure.tight_layout()
    return figure


def plot_ablations(report: pd.DataFrame) -> Figure:
    """Mean test lwlrap per configuration with its seed spread (std) as error bars."""
    ordered = report.iloc[::-1]
    figure, axis = plt.subplots(figsize=(7.5, 0.42 * len(ordered) + 1.3))
    errors = ordered["std"].fillna(0) if "std" in ordered else None
    axis.barh(ordered["configuration"], ordered["mean"], xerr=errors, capsize=3,
              color=["tab:gray" if "logistic" in c else "tab:blue" for c in ordered["configuration"]])
    ends = ordered["mean"] + (errors if errors is not None else 0)
    for position, (value, end) in enumerate(zip(ordered["mean"], ends)):
        axis.text(end + 0.008, position, f"{value:.3f}", va="center", fontsize=7)
    axis.set_xlim(0, max(ends) * 1.12)
    axis.set(xlabel="test lwlrap (mean ± std over seeds)", title="ablations on the demo data")
    axis.tick_params(axis="y", labelsize=8)
    figure.tight_layout()
    return figure


def plot_study_axis(points: pd.DataFrame, x: str, xlabel: str) -> Figure:
    """Ensemble test lwlrap per network width against `x`, the logistic floors dashed."""
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for width, curve in points.groupby("width"):
        axis.plot(curve[x], curve["ensemble_test"], marker="o",
                  label=f"CNN pipeline, width {width:g}")
    floors = points.drop_duplicates(x).sort_values(x)
    for column, label in (("logreg_curated_test", "floor: logistic regression, curated"),
                          ("logreg_curated_noisy_test", "floor: the same, curated + noisy")):
        if column in floors:
            axis.plot(floors[x], floors[column], linestyle="--", color="gray",
                      marker="x" if "noisy" in column else "", label=label)
    axis.set(xlabel=xlabel, ylabel="test lwlrap", title=f"demo test lwlrap against {xlabel}")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def plot_distill_tradeoff(points: pd.DataFrame, bound_ms: float | None = None,
                          target_fraction: float | None = None) -> Figure:
    """Each student's test lwlrap against its served p50, its teacher ensemble beside it (open
    marker) and the floor dashed: what one network buys back of the ensemble, and at what cost.
    `bound_ms`, dotted: the p50 no student on these features gets under (request + log-mel);
    `target_fraction`, dash-dotted: that fraction of the ensembles' mean p50.

    `points` has label, teacher, lwlrap_test, p50_ms, teacher_lwlrap, teacher_p50,
    floor_lwlrap_test (one row per student)."""
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for label, group in points.groupby("label", sort=False):
        axis.scatter(group["p50_ms"], group["lwlrap_test"], label=label, zorder=3)
    teachers = points.drop_duplicates("teacher")
    axis.scatter(teachers["teacher_p50"], teachers["teacher_lwlrap"], facecolors="none",
                 edgecolors="black", label="ensemble (teacher)", zorder=3)
    floor = points["floor_lwlrap_test"].dropna()
    if len(floor):
        axis.axhline(floor.mean(), linestyle="--", color="gray", label="floor (logistic)")
    if bound_ms is not None:
        axis.axvline(bound_ms, linestyle=":", color="gray",
                     label="p50 bound: request + decode and log-mel")
    if target_fraction is not None:
        axis.axvline(target_fraction * teachers["teacher_p50"].mean(), linestyle="-.",
                     color="tab:red", label=f"target: {target_fraction:g} of the ensemble's p50")
    axis.set_xscale("log")
    axis.xaxis.set_major_formatter(ScalarFormatter())  # 20, 30, 100: not 2x10^1
    axis.xaxis.set_minor_formatter(ScalarFormatter())
    axis.set(xlabel="served p50 of one 5-s clip, ms (log scale)", ylabel="test lwlrap",
             title="the student's lwlrap against its latency")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure
