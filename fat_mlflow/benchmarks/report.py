"""The `benchmark` entry point: run the benchmarks, log each result as an MLflow run, and write
one markdown document of all tables.

One parent run (the `mlflow run` run, or a new one) holds the document as `benchmarks.md`;
under it, one child run per result holds what was measured and the machine as params, and the
figures with their ratio against the baseline as metrics, so results of several machines or
commits can be compared with `mlflow.search_runs`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import mlflow

from fat_mlflow.benchmarks import BENCHMARK_PROFILES, BenchmarkProfile
from fat_mlflow.benchmarks import distill as distill_bench
from fat_mlflow.benchmarks import features as features_bench
from fat_mlflow.benchmarks import pipeline as pipeline_bench
from fat_mlflow.benchmarks import serving as serving_bench
from fat_mlflow.benchmarks import training as training_bench
from fat_mlflow.benchmarks.common import Table, machine_facts
from fat_mlflow.config import FeatureConfig
from fat_mlflow.data.features import BadAudioError, FeatureCache
from fat_mlflow.engine.training import resolve_device
from fat_mlflow.warmup.tracking import TAG_STAGE, configure_tracking

BENCHMARKS = ("features", "training", "inference", "pipeline", "distill")
# what runs unless asked: `pipeline` trains two whole main jobs (about 25 minutes on 2 cores);
# `distill` serves finished runs' models
DEFAULT_BENCHMARKS = ("features", "training", "inference")
TAG_BENCHMARK = "fat.benchmark"
TAG_BASELINE = "fat.baseline"
DOCUMENT_ARTIFACT = "benchmarks.md"
DISTILL_FIGURE = "distill_tradeoff.png"


@dataclass(frozen=True)
class BenchmarkRequest:
    """What `fat-mlflow benchmark` asks for; `repeats` 0 keeps the profile's."""

    only: tuple[str, ...] = DEFAULT_BENCHMARKS
    profile: BenchmarkProfile = field(default_factory=lambda: BENCHMARK_PROFILES["standard"])
    repeats: int = 0
    data: Path | None = None  # FAT2019 layout; None: ESC-50 clips
    esc50: Path | None = None
    model_uri: str | None = None  # None: an untrained quick-shaped ensemble built here
    distill_runs: tuple[str, ...] = ()  # (): the newest finished distill run of each teacher
    out: Path = Path("benchmarks.md")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.only) - set(BENCHMARKS))
        if unknown or not self.only:
            raise ValueError(f"unknown benchmark(s) {', '.join(unknown) or '(none given)'}; "
                             f"choose from {', '.join(BENCHMARKS)}")
        if self.repeats < 0:
            raise ValueError(f"repeats must be >= 0 (0: the profile's), got {self.repeats}")


def run_benchmarks(request: BenchmarkRequest) -> tuple[str, str]:
    """Run the chosen benchmarks in a fixed order; returns (parent run ID, markdown)."""
    size = replace(request.profile, repeats=request.repeats or request.profile.repeats)
    needs_clips = request.data is not None or {"features", "inference"} & set(request.only)
    clips = (features_bench.benchmark_clips(request.data, request.esc50,
                                            max(size.feature_clips, size.batch_clips))
             if needs_clips else [])  # synthetic training needs no audio, nor ESC-50
    configure_tracking()
    request.out.parent.mkdir(parents=True, exist_ok=True)
    tables: list[Table] = []
    with mlflow.start_run(run_name="benchmark", nested=mlflow.active_run() is not None) as parent:
        mlflow.set_tag(TAG_STAGE, "benchmark")
        # "benchmark." keys: `mlflow run` already logged the raw entry-point parameters
        mlflow.log_params({
            "benchmark.only": ",".join(request.only), "benchmark.profile": size.name,
            "benchmark.repeats": size.repeats, "benchmark.data": str(request.data or ""),
            "benchmark.clips": "data" if request.data else "esc50",
            "benchmark.model_uri": request.model_uri or "",
            **machine_facts(resolve_device("auto"))})
        for name in BENCHMARKS:
            if name not in request.only:
                continue
            if name == "features":
                table = features_bench.run(clips[: size.feature_clips], size.repeats)
            elif name == "training":
                table = _training(request, size, clips[: size.feature_clips])
            elif name == "inference":
                table = serving_bench.run(clips, size, request.model_uri)
            elif name == "pipeline":
                table = pipeline_bench.run(size, request.data, request.esc50)
            else:
                table, figure = distill_bench.run(size, request.distill_runs)
                figure.savefig(request.out.with_name(DISTILL_FIGURE), dpi=120)
                mlflow.log_figure(figure, DISTILL_FIGURE)
            log_results(table, size)  # at once: a later failure keeps the earlier results
            tables.append(table)
        text = document(tables, size)
        request.out.write_text(text)
        mlflow.log_text(text, DOCUMENT_ARTIFACT)
    return parent.info.run_id, text


def _training(request: BenchmarkRequest, size: BenchmarkProfile, clips: list[Path]) -> Table:
    """Training on the cached log-mels of the dataset's clips, or on synthetic ones."""
    device = resolve_device("auto")
    if request.data is None:
        return training_bench.run(size, device)
    cache = FeatureCache(None, FeatureConfig())  # the seed's 128 bands (the quick profile: 64)
    stats = cache.compute(clips, progress=False)
    if stats.failures:
        raise BadAudioError(stats.failures)
    return training_bench.run(size, device, cache.open(clips),
                              input_name=f"the cached log-mels of {len(clips)} clips of "
                                         f"{request.data}")


def log_results(table: Table, size: BenchmarkProfile) -> None:
    """One child run per result: params = what and where, metrics = figures and ratios."""
    for result in table.results:
        with mlflow.start_run(run_name=f"{table.benchmark}: {result.setting}", nested=True):
            mlflow.set_tags({TAG_STAGE: "benchmark-result", TAG_BENCHMARK: table.benchmark,
                             TAG_BASELINE: str(result.baseline).lower()})
            mlflow.log_params({**table.facts, **result.params, "benchmark": table.benchmark,
                               "setting": result.setting, "baseline": result.baseline,
                               "benchmark_profile": size.name})
            mlflow.log_metrics(result.metrics)


def document(tables: list[Table], size: BenchmarkProfile) -> str:
    """The markdown written to --out and logged as the parent run's artifact."""
    header = (f"# fat-mlflow benchmarks\n\nProfile `{size.name}`. Every ratio compares with the "
              f"baseline row of its table, measured in the same process on the same inputs.\n")
    return "\n".join([header, *(table.markdown() for table in tables)])
