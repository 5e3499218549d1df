"""What the benchmarks share: timing, machine facts, result rows and their markdown table.

No MLflow or librosa here: `python -m fat_mlflow.benchmarks.training` uses this module on GPU
machines that have only torch and numpy. The MLflow side is `fat_mlflow.benchmarks.report`.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fat_mlflow.benchmarks import BenchmarkProfile
from fat_mlflow.engine.precision import bf16_units

ParamValue = str | int | float | bool


@dataclass(frozen=True)
class Result:
    """One measured setting: a row of its table and, in the report, one MLflow run.

    `params` say what was measured (sizes, settings); `metrics` hold the figures and the ratio
    against the table's baseline, which was measured in the same process on the same inputs.
    """

    setting: str
    params: dict[str, ParamValue]
    metrics: dict[str, float]
    baseline: bool = False


@dataclass(frozen=True)
class Table:
    """The results of one benchmark, with the columns its markdown table shows."""

    benchmark: str  # "features", "training" or "inference"
    title: str  # what was measured on what: the caption of the table
    columns: tuple[tuple[str, str], ...]  # (metric key, column header)
    results: tuple[Result, ...]
    facts: dict[str, ParamValue]  # the machine: cores, torch, device

    def markdown(self) -> str:
        """`### title`, the machine line, then one row per result (a missing figure is '–')."""
        header = "| setting | " + " | ".join(title for _, title in self.columns) + " |"
        lines = [f"### {self.benchmark}: {self.title}", "", describe_machine(self.facts), "",
                 header, "|" + "---|" * (len(self.columns) + 1)]
        for result in self.results:
            label = result.setting + (" (baseline)" if result.baseline else "")
            cells = [format_number(result.metrics.get(key)) for key, _ in self.columns]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def format_number(value: float | None) -> str:
    """Three significant digits below 100, whole numbers above: readable for 0.004 and 25515."""
    if value is None or not math.isfinite(value):
        return "–"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def timed(call: Callable[[], object], repeats: int, warmup: int = 0) -> list[float]:
    """Seconds of each of `repeats` calls, after `warmup` untimed ones (kernel selection,
    allocation and oneDNN's per-shape setup are not part of the steady cost)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return seconds


def timed_alternately(calls: Mapping[str, Callable[[], object]], repeats: int,
                      warmup: int = 0) -> dict[str, list[float]]:
    """`timed` for calls that are compared with each other: one timing of each in turn, for
    `repeats` rounds, so a machine whose speed drifts (other jobs) slows all of them alike."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for call in calls.values():
        for _ in range(warmup):
            call()
    seconds: dict[str, list[float]] = {key: [] for key in calls}
    for _ in range(repeats):
        for key, call in calls.items():
            seconds[key] += timed(call, 1)
    return seconds


def passes(n: int) -> str:
    """"median of 3 timed passes" / "1 timed pass": how a figure was obtained, for captions."""
    return f"median of {n} timed passes" if n != 1 else "1 timed pass"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentiles_ms(seconds: Sequence[float]) -> tuple[float, float]:
    """p50 and p95 in milliseconds."""
    p50, p95 = np.percentile(np.asarray(seconds) * 1000, [50, 95])
    return float(p50), float(p95)


def machine_facts(device: torch.device) -> dict[str, ParamValue]:
    """What the figures depend on besides the code: logged with every result."""
    return {
        "cpu_count": os.cpu_count() or 0,
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count() or 0,
        "cpu_name": _cpu_name(),
        "cpu_class": bf16_units(torch.device("cpu")) or "no bf16 units",  # what bf16 rows reach
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "python_version": platform.python_version(),
    }


def describe_machine(facts: dict[str, ParamValue]) -> str:
    return (f"Machine: {facts['usable_cpus']} usable CPU cores ({facts['cpu_name']}, "
            f"{facts['cpu_class']}), "
            f"torch {facts['torch_version']} with {facts['torch_threads']} threads, "
            f"device {facts['device_name']}.")


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


GPU_MATMUL_N = 8192  # a GPU reaches its peak only on a product this large
MIN_MATMUL_SECONDS = 0.2  # each peak figure times enough products to fill this


def matmul_products(device: torch.device, n: int,
                    dtype: torch.dtype) -> tuple[Callable[[], None], float]:
    """A call of enough n x n matmuls in `dtype` to dwarf the timer's resolution (at least
    MIN_MATMUL_SECONDS), and its FLOPs: what a peak is timed on."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device, dtype)
    b = torch.randn(n, n, generator=generator).to(device, dtype)
    count = 1

    def products() -> None:
        for _ in range(count):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    products()  # warm-up
    while (seconds := timed(products, 1)[0]) < MIN_MATMUL_SECONDS:
        count *= max(2, min(16, int(MIN_MATMUL_SECONDS / max(seconds, 1e-6))))
    return products, 2 * n**3 * count


def matmul_peaks(device: torch.device, size: BenchmarkProfile) -> tuple[int, dict[str, float]]:
    """The side of the matmul and the peak FLOP/s it reaches in float32 and in bfloat16, timed
    in turn: what the models' FLOP/s are compared with, in the same process."""
    matmul_n = GPU_MATMUL_N if device.type == "cuda" else size.matmul_n
    products = {name: matmul_products(device, matmul_n, dtype)
                for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    seconds = timed_alternately({name: call for name, (call, _) in products.items()},
                                size.repeats)
    return matmul_n, {name: flops / median(seconds[name]) for name, (_, flops) in products.items()}
