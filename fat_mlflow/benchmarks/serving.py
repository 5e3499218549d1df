"""Inference speed of the served tagger: p50/p95 latency of one 5-s clip and clips/s in a batch,
for the ensemble (the pyfunc model, as `mlflow models serve` runs it) vs one of its fold models
alone (`fat_mlflow.predict`: the baseline), on the same base64 audio a client sends.

Without a model URI the ensemble is built here in the shape of the quick pipeline's (stages 2-4
per network, quick width), with untrained weights: speed does not depend on the weight values.
`--model models:/fat2019-tagger@champion` measures a registered model instead. `--http` adds
the same measurements over HTTP through `mlflow models serve`.

    python -m fat_mlflow.benchmarks.serving [--profile standard] [--model URI] [--http]
                                            [--threads N] [--data DIR | --esc50 DIR]

`--threads` sets torch's intra-op threads here and OMP_NUM_THREADS for the server: on a
machine busy with other work, fewer threads than cores avoid OpenMP spin-waiting and can be
several times faster.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import librosa
import mlflow
import pandas as pd
import requests
import torch

from fat_mlflow.benchmarks import BENCHMARK_PROFILES, BenchmarkProfile
from fat_mlflow.benchmarks.common import (
    ParamValue,
    Result,
    Table,
    machine_facts,
    median,
    passes,
    percentiles_ms,
    timed,
)
from fat_mlflow.benchmarks.features import benchmark_clips
from fat_mlflow.config import PROFILES, FeatureConfig
from fat_mlflow.dataset import window_starts
from fat_mlflow.esc50 import SOURCES_HELP
from fat_mlflow.models import build_model, save_checkpoint
from fat_mlflow.predict import predict_spectrograms
from fat_mlflow.processes import free_port, stop_group, wait_until
from fat_mlflow.tagger import (
    BASE64_COLUMN,
    EnsembleSpec,
    FatTagger,
    MemberRun,
    clip_spectrogram,
    load_local_model,
    pyfunc_arguments,
)

N_CLASSES = 80  # FAT2019's vocabulary size: the head's cost
LATENCY_CLIP_SECONDS = 5.0
LATENCY_CLIP_SLACK = 0.1  # encoders pad a few milliseconds: ESC-50's 5-s clips last 4.96-5.03 s
WARMUP_CALLS = 3  # oneDNN builds its kernels for each new input shape on first use
COLUMNS = (("p50_ms", "p50 ms (one clip)"), ("p95_ms", "p95 ms"),
           ("clips_per_s", "clips/s (batch)"),
           ("latency_speed_vs_baseline", "latency: speed vs baseline (x)"),
           ("throughput_vs_baseline", "clips/s vs baseline (x)"))


def save_tagger(folder: Path, archs: Sequence[str], runs_per_arch: int, n_folds: int) -> Path:
    """A local pyfunc tagger of untrained fold models in the quick profile's shape."""
    train = PROFILES["quick"].train
    vocabulary = tuple(f"class_{i:02d}" for i in range(N_CLASSES))
    folder.mkdir(parents=True)
    artifacts, members = {}, []
    for arch in archs:
        for run in range(runs_per_arch):
            keys = []
            for fold in range(n_folds):
                key = f"{arch}{run}_fold{fold}"
                path = folder / f"{key}.pt"
                save_checkpoint(build_model(arch, len(vocabulary), train.width), path, arch=arch,
                                width=train.width, n_classes=len(vocabulary))
                artifacts[key] = str(path)
                keys.append(key)
            members.append(MemberRun(f"{arch}{run}", f"stage{run + 2}", arch, train.crop_frames,
                                     train.window_step, tuple(keys)))
    spec = EnsembleSpec(FeatureConfig(), vocabulary, tuple(members), train.eval_batch_size)
    target = folder / "model"
    mlflow.pyfunc.save_model(target, **pyfunc_arguments(spec, folder / "ensemble.json", artifacts))
    return target


def load_tagger(model_uri: str) -> tuple[mlflow.pyfunc.PyFuncModel, FatTagger]:
    """The pyfunc model as a local caller loads it, and the FatTagger inside (its fold models)."""
    model = load_local_model(model_uri)
    tagger = model.unwrap_python_model()
    if not isinstance(tagger, FatTagger):
        raise ValueError(f"{model_uri} is a {type(tagger).__name__}, not a fat-mlflow tagger")
    return model, tagger


def latency_clip(clips: Sequence[Path], tagger: FatTagger) -> tuple[Path, float, int]:
    """The clip of at most 5 s with the most inference windows once its silence is trimmed,
    i.e. the dearest one; the shortest clip when none is that short.

    Returns (clip, its seconds, its windows)."""
    durations = {clip: librosa.get_duration(path=clip) for clip in clips}
    limit = LATENCY_CLIP_SECONDS + LATENCY_CLIP_SLACK
    candidates = ([c for c, d in durations.items() if d <= limit]
                  or [min(durations, key=durations.get)])
    member = tagger.spec.members[0]

    def windows(clip: Path) -> int:
        spec = clip_spectrogram(str(clip), None, tagger.spec.features, tagger.spec.serving,
                                tagger.audio_root)
        return len(window_starts(spec.shape[1], member.window, member.step))

    counts = {clip: windows(clip) for clip in candidates}
    best = max(counts, key=counts.get)
    return best, durations[best], counts[best]


def measure(predict: Callable[[list[str]], object], one: list[str], batch: list[str],
            latency_calls: int, repeats: int) -> dict[str, float]:
    """p50/p95 of one-clip calls and median clips/s of whole-batch calls."""
    p50, p95 = percentiles_ms(timed(lambda: predict(one), latency_calls, warmup=WARMUP_CALLS))
    seconds = median(timed(lambda: predict(batch), repeats))
    return {"p50_ms": p50, "p95_ms": p95, "clips_per_s": len(batch) / seconds}


@contextlib.contextmanager
def served(model_uri: str, env: dict[str, str] | None = None, log_path: Path | None = None,
           timeout_s: float = 120) -> Iterator[str]:
    """`mlflow models serve` in its own process group while the block runs; yields its URL
    once /ping answers. A server that exits or stays silent raises with its log's tail."""
    port = free_port()
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(log_path.open("wb")) if log_path else subprocess.DEVNULL
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
             "--env-manager", "local", "-p", str(port), "--host", "127.0.0.1", "--workers", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: _pings(url), process, log_path, f"the server for {model_uri}",
                       timeout_s)
            yield url
        finally:
            stop_group(process, signal.SIGTERM, grace_s=15)


def _pings(url: str) -> bool:
    try:
        return requests.get(f"{url}/ping", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def http_predict(url: str) -> Callable[[list[str]], object]:
    """Posts rows of base64 audio to a scoring server, as a client does."""

    def post(rows: list[str]) -> object:
        body = {"dataframe_split": {"columns": [BASE64_COLUMN], "data": [[row] for row in rows]}}
        response = requests.post(f"{url}/invocations", json=body, timeout=300)
        response.raise_for_status()
        return response

    return post


def run(clips: Sequence[Path], size: BenchmarkProfile, model_uri: str | None = None,
        http: bool = False) -> Table:
    """Ensemble (pyfunc, in process; over HTTP with `http`) vs its first fold model through
    `predict_spectrograms` (the baseline), plus decode + log-mel alone.

    Both sides get the clips as base64 and decode them the same way, so the ratio is the cost
    of the ensemble and the pyfunc layer.
    """
    clips = list(clips)[: size.batch_clips]
    with tempfile.TemporaryDirectory(prefix="fat-bench-tagger-") as tmp:
        uri = model_uri or str(save_tagger(Path(tmp) / "ensemble", size.ensemble_archs,
                                           size.ensemble_runs, size.ensemble_folds))
        model, tagger = load_tagger(uri)
        clip, clip_seconds, n_windows = latency_clip(clips, tagger)
        encoded = {path: base64.b64encode(path.read_bytes()).decode("ascii") for path in clips}
        one, batch = [encoded[clip]], [encoded[path] for path in clips]
        fold_models, member = tagger.members[0]
        spec = tagger.spec

        def single_model(rows: list[str]) -> object:
            specs = [clip_spectrogram(None, row, spec.features, spec.serving) for row in rows]
            return predict_spectrograms(fold_models[:1], specs, member.window, member.step,
                                        spec.batch_size, tagger.precision)

        def ensemble(rows: list[str]) -> object:
            return model.predict(pd.DataFrame({BASE64_COLUMN: rows}))

        n_models = sum(len(models) for models, _ in tagger.members)
        calls, repeats = size.latency_calls, size.repeats
        figures = {
            "single": measure(single_model, one, batch, calls, repeats),
            "ensemble": measure(ensemble, one, batch, calls, repeats),
        }
        decode_p50, decode_p95 = percentiles_ms(timed(
            lambda: clip_spectrogram(None, one[0], spec.features, spec.serving), calls,
            warmup=WARMUP_CALLS))
        figures["decode"] = {"p50_ms": decode_p50, "p95_ms": decode_p95}
        if http:
            with served(uri) as url:
                figures["http"] = measure(http_predict(url), one, batch, calls, repeats)
        base = figures["single"]
        for row in figures.values():
            row["latency_speed_vs_baseline"] = base["p50_ms"] / row["p50_ms"]
            if "clips_per_s" in row:
                row["throughput_vs_baseline"] = row["clips_per_s"] / base["clips_per_s"]
    shared: dict[str, ParamValue] = {
        "latency_clip": clip.name, "latency_clip_seconds": round(clip_seconds, 3),
        "latency_windows": n_windows, "latency_calls": calls, "batch_clips": len(batch),
        "repeats": repeats, "n_classes": len(spec.vocabulary)}
    source = model_uri or (f"untrained quick-shaped ensemble ({'+'.join(size.ensemble_archs)}, "
                           f"{size.ensemble_runs} runs x {size.ensemble_folds} folds)")
    arch = member.arch
    labels = {
        "single": (f"one {arch} fold model, fat_mlflow.predict", "predict_spectrograms", 1),
        "ensemble": (f"ensemble of {n_models} fold models, pyfunc in process", "pyfunc",
                     n_models),
        "http": (f"ensemble of {n_models} fold models, HTTP (mlflow models serve)", "http",
                 n_models),
        "decode": ("decode + log-mel only (shared by all models)", "preprocessing", 0),
    }
    results = tuple(
        Result(labels[key][0], {**shared, "path": labels[key][1], "n_fold_models": labels[key][2],
                                "model": source}, figures[key], baseline=key == "single")
        for key in ("single", "ensemble", "http", "decode") if key in figures)
    title = (f"{source}; latency: {clip.name} ({clip_seconds:.1f} s, {n_windows} windows "
             f"after trimming), "
             f"{calls} calls; batch: {len(batch)} clips, {passes(repeats)}")
    return Table("inference", title, COLUMNS, results, machine_facts(tagger.precision.device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(BENCHMARK_PROFILES), default="standard",
                        help="benchmark size")
    parser.add_argument("--model", default=None,
                        help="model URI (default: a quick-shaped ensemble)")
    parser.add_argument("--repeats", type=int, default=0,
                        help="timed batch passes (0: the profile's)")
    parser.add_argument("--http", action="store_true", help="also measure over HTTP")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    parser.add_argument("--data", type=Path, default=None, help="FAT2019-layout dataset")
    parser.add_argument("--esc50", type=Path, default=None,
                        help=f"ESC-50 folder ({SOURCES_HELP})")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the server
    size = BENCHMARK_PROFILES[args.profile]
    size = dataclasses.replace(size, repeats=args.repeats or size.repeats)
    clips = benchmark_clips(args.data, args.esc50, size.batch_clips)
    print(run(clips, size, args.model, http=args.http).markdown())


if __name__ == "__main__":
    main()
