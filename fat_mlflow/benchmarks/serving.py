"""Serving speed of the tagger: one-clip latency (p50/p95) and batch throughput, in process and
over HTTP (`mlflow models serve`), for the ensemble vs a single fold model.

By default the ensemble has the shape of the `quick` pipeline's (per network: stage 2, 3 and 4
runs of 3 folds each, width 0.25; CNN and VGG), with untrained weights: speed does not depend
on the weight values. `--model models:/fat2019-tagger@champion` measures a registered model
instead; the single-model rows always use one untrained fold model of the first network.

    python -m fat_mlflow.benchmarks.serving [--archs cnn,vgg16] [--repeats 20] [--batch 32] [--no-http]
                                       [--threads N]

`--threads` sets torch's intra-op threads here and OMP_NUM_THREADS for the server: on a
machine busy with other work, fewer threads than cores avoid OpenMP spin-waiting and can be
several times faster.
"""
from __future__ import annotations

import argparse
import base64
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import requests
import torch

from fat_mlflow.demo import default_esc50_dir
from fat_mlflow.config import PROFILES, FeatureConfig, ServingConfig
from fat_mlflow.dataset import window_starts
from fat_mlflow.models import build_model, save_checkpoint
from fat_mlflow.tagger import (
    SPEC_ARTIFACT,
    EnsembleSpec,
    FatTagger,
    MemberRun,
    clip_spectrogram,
    model_signature,
)

N_CLASSES = 80  # FAT2019's vocabulary size: the head's cost


def save_tagger(folder: Path, archs: list[str], runs_per_arch: int, n_folds: int) -> Path:
    """A local pyfunc tagger of untrained fold models in the quick profile's shape."""
    train = PROFILES["quick"].train
    folder.mkdir(parents=True)
    vocabulary = tuple(f"class_{i:02d}" for i in range(N_CLASSES))
    artifacts, members = {}, []
    for arch in archs:
        for run in range(runs_per_arch):
            keys = []
            for fold in range(n_folds):
                key = f"{arch}{run}_fold{fold}"
                path = folder / f"{key}.pt"
                save_checkpoint(build_model(arch, N_CLASSES, train.width), path, arch=arch,
                                width=train.width, n_classes=N_CLASSES)
                artifacts[key] = str(path)
                keys.append(key)
            members.append(MemberRun(f"{arch}{run}", f"stage{run + 2}", arch, train.crop_frames,
                                     train.window_step, tuple(keys)))
    spec = EnsembleSpec(FeatureConfig(), vocabulary, tuple(members), train.eval_batch_size)
    (folder / "ensemble.json").write_text(spec.to_json())
    target = folder / "model"
    mlflow.pyfunc.save_model(target, python_model=FatTagger(),
                             artifacts={**artifacts, SPEC_ARTIFACT: str(folder / "ensemble.json")},
                             signature=model_signature(vocabulary))
    return target


def latencies(call, repeats: int, warmup: int = 3) -> tuple[float, float]:
    """p50 and p95 of `call()` in milliseconds, after warm-up calls (oneDNN builds its
    kernels for each new input shape on first use)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - start))
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def throughput(call, n_clips: int) -> float:
    start = time.perf_counter()
    call()
    return n_clips / (time.perf_counter() - start)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(model_uri: str) -> tuple[subprocess.Popen, str]:
    """`mlflow models serve` in its own process group; returns once /ping answers."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
         "local", "-p", str(port), "--host", "127.0.0.1", "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return process, url
        except requests.ConnectionError:
            time.sleep(0.5)
    stop(process)
    raise SystemExit(f"server for {model_uri} did not start")


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


def measure(label: str, model_uri: str, clip: Path, batch: list[Path], repeats: int,
            http: bool) -> list[tuple[str, float, float, float]]:
    """Rows (setting, p50 ms, p95 ms, clips/s) for one model, in process and over HTTP."""
    model = mlflow.pyfunc.load_model(model_uri)
    one = pd.DataFrame({"audio_base64": [base64.b64encode(clip.read_bytes()).decode("ascii")]})
    many = pd.DataFrame({"path": [str(p) for p in batch]})
    p50, p95 = latencies(lambda: model.predict(one), repeats)
    rows = [(f"{label}, pyfunc in process", p50, p95,
             throughput(lambda: model.predict(many), len(batch)))]
    if http:
        process, url = serve(model_uri)
        try:
            payload = {"dataframe_split": one.to_dict(orient="split", index=False)}
            batch_payload = {"dataframe_split": {"columns": ["audio_base64"], "data": [
                [base64.b64encode(p.read_bytes()).decode("ascii")] for p in batch]}}

            def post(body):
                response = requests.post(f"{url}/invocations", json=body, timeout=300)
                response.raise_for_status()

            p50, p95 = latencies(lambda: post(payload), repeats)
            rows.append((f"{label}, HTTP (mlflow models serve)", p50, p95,
                         throughput(lambda: post(batch_payload), len(batch))))
        finally:
            stop(process)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model URI (default: a quick-shaped ensemble)")
    parser.add_argument("--archs", default="cnn,vgg16")
    parser.add_argument("--runs-per-arch", type=int, default=3)
    parser.add_argument("--folds", type=int, default=PROFILES["quick"].train.n_folds)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32, help="clips in the throughput batch")
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP rows")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    parser.add_argument(
        "--esc50", type=Path, default=default_esc50_dir())
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the server
    names = pd.read_csv(args.esc50 / "meta" / "esc50.csv")["filename"].sort_values()
    clips = [args.esc50 / "audio" / name for name in names.iloc[: args.batch]]
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    features, train = FeatureConfig(), PROFILES["quick"].train
    frames = [clip_spectrogram(str(c), None, features, ServingConfig()).shape[1] for c in clips]
    longest = int(np.argmax(frames))  # most clips are shorter once their silence is trimmed
    n_windows = len(window_starts(frames[longest], train.crop_frames, train.window_step))
    with tempfile.TemporaryDirectory() as tmp:
        ensemble = args.model or str(save_tagger(Path(tmp) / "ensemble", archs,
                                                 args.runs_per_arch, args.folds))
        single = str(save_tagger(Path(tmp) / "single", archs[:1], 1, 1))
        n_models = len(archs) * args.runs_per_arch * args.folds
        rows = measure(f"ensemble ({n_models} fold models)" if not args.model else args.model,
                       ensemble, clips[longest], clips, args.repeats, not args.no_http)
        rows += measure(f"single {archs[0]} fold model", single, clips[longest], clips,
                        args.repeats, not args.no_http)
    pre50, pre95 = latencies(
        lambda: clip_spectrogram(str(clips[longest]), None, features, ServingConfig()), args.repeats)
    rows.append(("decode + log-mel only (shared by all models)", pre50, pre95, float("nan")))
    table = pd.DataFrame(rows, columns=["setting", "p50 ms (one 5-s clip)", "p95 ms",
                                        f"clips/s (batch of {len(clips)})"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPU cores, device {device}; latency clip {clips[longest].name}: "
          f"{frames[longest]} frames after trimming = {n_windows} windows")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))


if __name__ == "__main__":
    main()
