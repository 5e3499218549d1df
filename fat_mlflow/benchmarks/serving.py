"""Inference speed of the served tagger: p50/p95 latency of one 5-s clip and clips/s in a batch,
for the whole ensemble scored eagerly in float32 (the baseline), eagerly in bf16 (the previous
default), the served way (BatchNorm folded, channels_last, 1-thread log-mels) in float32 and
bf16, and as the pyfunc model `mlflow models serve` runs, on the same base64 audio a client
sends. Beside them, the compute bound: the fold models' FLOPs for the latency clip at the
matmul peak measured in the same run, plus decoding and the log-mel.

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
from dataclasses import dataclass
from functools import partial
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
    matmul_peaks,
    median,
    passes,
    percentiles_ms,
    timed_alternately,
)
from fat_mlflow.benchmarks.features import benchmark_clips
from fat_mlflow.config import PROFILES, FeatureConfig
from fat_mlflow.data.esc50 import SOURCES_HELP
from fat_mlflow.engine.dataset import window_starts
from fat_mlflow.engine.models import build_model, flops_per_sample, save_checkpoint
from fat_mlflow.engine.precision import Precision, resolve_precision
from fat_mlflow.processes import free_port, stop_group, wait_until
from fat_mlflow.serving.tagger import (
    BASE64_COLUMN,
    EnsembleSpec,
    FatTagger,
    MemberRun,
    clip_spectrogram,
    ensemble_scores,
    load_local_model,
    load_members,
    pyfunc_arguments,
)

N_CLASSES = 80  # FAT2019's vocabulary size: the head's cost
LATENCY_CLIP_SECONDS = 5.0
LATENCY_CLIP_SLACK = 0.1  # encoders pad a few milliseconds: ESC-50's 5-s clips last 4.96-5.03 s
WARMUP_CALLS = 3  # oneDNN builds its kernels for each new input shape on first use
COLUMNS = (("p50_ms", "p50 ms (one clip)"), ("p95_ms", "p95 ms"),
           ("clips_per_s", "clips/s (batch)"),
           ("latency_speed_vs_baseline", "latency: speed vs baseline (x)"),
           ("throughput_vs_baseline", "clips/s vs baseline (x)"),
           ("models_share_of_peak", "fold models: share of matmul peak"))


def save_tagger(folder: Path, archs: Sequence[str], runs_per_arch: int, n_folds: int) -> Path:
    """A local pyfunc tagger of untrained fold models of the quick profile's networks, on the
    seed's 128-band features (the inference benchmark's shape before issue 29's 64 bands)."""
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
    counts = {clip: clip_windows(clip, tagger) for clip in candidates}
    best = max(counts, key=counts.get)
    return best, durations[best], counts[best]


def clip_windows(clip: Path, tagger: FatTagger) -> int:
    """How many windows `tagger` scores in `clip` once its silence is trimmed."""
    spec = clip_spectrogram(str(clip), None, tagger.spec.features, tagger.spec.serving,
                            tagger.audio_root)
    member = tagger.spec.members[0]
    return len(window_starts(spec.shape[1], member.window, member.step, member.cover_end))


def preprocessing(tagger: FatTagger, row: str) -> Callable[[], object]:
    """What the served model does to a base64 row before any network: decode and log-mel."""
    spec = tagger.spec
    return partial(clip_spectrogram, None, row, spec.features, spec.serving)


def measure(predicts: dict[str, Callable[[list[str]], object]], one: list[str],
            batch: list[str], latency_calls: int, repeats: int,
            latency_only: dict[str, Callable[[], object]] | None = None
            ) -> dict[str, dict[str, float]]:
    """p50/p95 of one-clip calls and median clips/s of whole-batch calls, per predictor; the
    predictors (and the `latency_only` calls) take turns, so drift slows all alike."""
    latency = timed_alternately({**{key: partial(predict, one) for key, predict in
                                    predicts.items()}, **(latency_only or {})},
                                latency_calls, warmup=WARMUP_CALLS)
    throughput = timed_alternately({key: partial(predict, batch)
                                    for key, predict in predicts.items()}, repeats)
    figures = {key: dict(zip(("p50_ms", "p95_ms"), percentiles_ms(seconds)))
               for key, seconds in latency.items()}
    for key, seconds in throughput.items():
        figures[key]["clips_per_s"] = len(batch) / median(seconds)
    return figures


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


def http_predict(url: str, column: str = BASE64_COLUMN) -> Callable[[list[str]], object]:
    """Posts rows of `column` (base64 audio) to a scoring server, as a client does: one
    kept-alive connection, the JSON body encoded per call."""
    session = requests.Session()

    def post(rows: list[str]) -> object:
        body = {"dataframe_split": {"columns": [column], "data": [[row] for row in rows]}}
        response = session.post(f"{url}/invocations", json=body, timeout=300)
        response.raise_for_status()
        return response

    return post


@dataclass(frozen=True)
class ScoringPath:
    """One way to score the ensemble: its number format, its fold models, its log-mel."""

    key: str
    precision: Precision
    optimised: bool  # scoring copies and 1-thread log-mels (the served path), or eager

    def describe(self, details: bool = True) -> str:
        number = "bf16 autocast" if self.precision.bfloat16 else "float32"
        if self.optimised:
            return f"{number}, served path" + (
                " (BN folded, NHWC, log-mel on 1 BLAS thread)" if details else "")
        layout = "NHWC from 16 channels" if self.precision.channels_last else "NCHW"
        return f"{number}, eager (BN unfused, {layout}, log-mel on all BLAS threads)"


def scoring_paths(device: torch.device) -> list[ScoringPath]:
    """float32 eager (the baseline: the seed's way), the previous default (bf16 autocast,
    eager) and the served path in float32 and bf16; bf16 rows only where bf16 is fast."""
    float32 = resolve_precision(device, amp=False)
    paths = [ScoringPath("eager_float32", resolve_precision(device, amp=False,
                                                             channels_last=False), False)]
    bf16 = resolve_precision(device, amp=True)
    if bf16.bfloat16:
        paths.append(ScoringPath("eager_bf16", bf16, False))
    paths.append(ScoringPath("served_float32", float32, True))
    if bf16.bfloat16:
        paths.append(ScoringPath("served_bf16", bf16, True))
    return paths


def direct_scoring(tagger: FatTagger, path: ScoringPath) -> Callable[[list[str]], object]:
    """What FatTagger.predict computes for rows of base64 audio, scored the way `path` says."""
    spec = tagger.spec
    prepare = path.precision.prepare_for_scoring if path.optimised else path.precision.prepare
    members = load_members(spec, tagger.checkpoints, prepare)
    serving = spec.serving if path.optimised else dataclasses.replace(
        spec.serving, log_mel_blas_threads=0)

    def score(rows: list[str]) -> object:
        specs = [clip_spectrogram(None, row, spec.features, serving) for row in rows]
        return ensemble_scores(members, specs, spec.batch_size, path.precision)

    return score


def scoring_flops(tagger: FatTagger, n_windows: int) -> int:
    """Forward FLOPs of every fold model on `n_windows` windows: the work of one clip."""
    n_mels = tagger.spec.features.n_mels
    return n_windows * sum(flops_per_sample(model, (3, n_mels, member.window))
                           for models, member in tagger.members for model in models)


def add_peak_shares(figures: dict[str, dict[str, float]], clip_flops: float,
                    peak_flop_per_s: float) -> None:
    """Each scoring row's fold-model FLOP/s (its one-clip p50 less decode + log-mel) as a share
    of the matmul peak, and the `bound` row: the p50 a clip would take at that peak. Scoring
    is compute-bound, so no code reaches below the bound on this machine."""
    decode_ms = figures["decode"]["p50_ms"]
    models_at_peak_ms = clip_flops / peak_flop_per_s * 1e3
    for key, row in figures.items():
        if key != "decode" and row["p50_ms"] > decode_ms:
            row["models_share_of_peak"] = models_at_peak_ms / (row["p50_ms"] - decode_ms)
    figures["bound"] = {"p50_ms": decode_ms + models_at_peak_ms}


def run(clips: Sequence[Path], size: BenchmarkProfile, model_uri: str | None = None,
        http: bool = False) -> Table:
    """The ensemble scored eagerly in float32 (the baseline), eagerly in bf16, and the served
    way in float32 and bf16, each as FatTagger.predict computes it; then the pyfunc model in
    process (over HTTP with `http`) and decode + log-mel alone.

    Every row decodes the same base64 audio a client sends, in the same process.
    """
    clips = list(clips)[: size.batch_clips]
    with tempfile.TemporaryDirectory(prefix="fat-bench-tagger-") as tmp:
        uri = model_uri or str(save_tagger(Path(tmp) / "ensemble", size.ensemble_archs,
                                           size.ensemble_runs, size.ensemble_folds))
        model, tagger = load_tagger(uri)
        clip, clip_seconds, n_windows = latency_clip(clips, tagger)
        encoded = {path: base64.b64encode(path.read_bytes()).decode("ascii") for path in clips}
        one, batch = [encoded[clip]], [encoded[path] for path in clips]
        spec = tagger.spec
        paths = scoring_paths(tagger.precision.device)
        calls, repeats = size.latency_calls, size.repeats
        predicts = {path.key: direct_scoring(tagger, path) for path in paths}

        def ensemble(rows: list[str]) -> object:
            return model.predict(pd.DataFrame({BASE64_COLUMN: rows}))

        predicts["pyfunc"] = ensemble
        figures = measure(predicts, one, batch, calls, repeats,
                          latency_only={"decode": preprocessing(tagger, one[0])})
        if http:
            with served(uri) as url:
                figures.update(measure({"http": http_predict(url)}, one, batch, calls, repeats))
        clip_flops = scoring_flops(tagger, n_windows)
        matmul_n, peaks = matmul_peaks(tagger.precision.device, size)
        peak_name = "bfloat16" if tagger.precision.bfloat16 else "float32"
        add_peak_shares(figures, clip_flops, peaks[peak_name])
        base = figures[paths[0].key]
        for row in figures.values():
            row["latency_speed_vs_baseline"] = base["p50_ms"] / row["p50_ms"]
            if "clips_per_s" in row:
                row["throughput_vs_baseline"] = row["clips_per_s"] / base["clips_per_s"]
    n_models = sum(len(models) for models, _ in tagger.members)
    shared: dict[str, ParamValue] = {
        "latency_clip": clip.name, "latency_clip_seconds": round(clip_seconds, 3),
        "latency_windows": n_windows, "latency_calls": calls, "batch_clips": len(batch),
        "repeats": repeats, "n_classes": len(spec.vocabulary), "n_fold_models": n_models,
        "latency_gflop": round(clip_flops / 1e9, 2), "matmul_n": matmul_n,
        "matmul_peak_dtype": peak_name}
    source = model_uri or (f"untrained quick-shaped ensemble ({'+'.join(size.ensemble_archs)}, "
                           f"{size.ensemble_runs} runs x {size.ensemble_folds} folds)")
    served_as = ScoringPath("pyfunc", tagger.precision, True)
    labels = {
        **{path.key: (f"ensemble, {path.describe()}", "direct", path) for path in paths},
        "pyfunc": (f"ensemble, pyfunc in process ({served_as.describe(False)})", "pyfunc",
                   served_as),
        "http": (f"ensemble, HTTP (mlflow models serve, {served_as.describe(False)})", "http",
                 served_as),
        "decode": ("decode + log-mel only (shared by all models)", "preprocessing", None),
        "bound": (f"bound: decode + log-mel, then the fold models at the {peak_name} matmul "
                  "peak", "bound", None),
    }
    results = []
    for key in (*(path.key for path in paths), "pyfunc", "http", "decode", "bound"):
        if key not in figures:
            continue
        setting, route, scoring = labels[key]
        params: dict[str, ParamValue] = {**shared, "path": route, "model": source}
        if scoring is not None:
            params.update({"precision": "bfloat16" if scoring.precision.bfloat16 else "float32",
                           "served_path": scoring.optimised})
        results.append(Result(setting, params, figures[key], baseline=key == paths[0].key))
    title = (f"{source}, {n_models} fold models; latency: {clip.name} ({clip_seconds:.1f} s, "
             f"{n_windows} windows after trimming: {clip_flops / 1e9:.1f} GFLOP in the fold "
             f"models), {calls} calls; batch: {len(batch)} clips, {passes(repeats)}; matmul "
             f"peak {peaks[peak_name] / 1e12:.3f} TFLOP/s ({peak_name}, {matmul_n}x{matmul_n})")
    return Table("inference", title, COLUMNS, tuple(results),
                 machine_facts(tagger.precision.device))


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
