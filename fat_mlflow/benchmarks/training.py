"""Training throughput (samples/s) of the quick and paper networks, their FLOPs per sample and
the share of the machine's peak that implies.

The peak is measured in the same process with a large matmul (float32 on a CPU, bfloat16 on
a GPU, the precision training runs in there), so "share of peak" = achieved model FLOP/s
(3 x forward FLOPs per sample: forward, and backward at twice its cost) / matmul FLOP/s
holds on a machine whose speed drifts. On a GPU the steps run as in the engine: bfloat16
autocast and channels_last.

Needs neither MLflow nor librosa: the inputs are random spectrograms of the real size, or
log-mels precomputed as .npy files (a feature-cache folder), so it runs on a GPU machine with
only torch and numpy:

    python -m fat_mlflow.benchmarks.training [--profile standard] [--npy-dir DIR] [--device cuda]
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fat_mlflow.augment import build_batch_augment
from fat_mlflow.benchmarks import BENCHMARK_PROFILES, BenchmarkProfile
from fat_mlflow.benchmarks.common import Result, Table, machine_facts, median, passes, timed
from fat_mlflow.config import get_profile
from fat_mlflow.dataset import training_batches
from fat_mlflow.models import build_model, count_parameters, flops_per_sample
from fat_mlflow.precision import resolve_precision
from fat_mlflow.training import augmented_step, resolve_device

CONFIGS = (("quick", "cnn"), ("paper", "cnn"), ("paper", "vgg16"))  # (training profile, network)
N_CLASSES = 80  # FAT2019's vocabulary: the size of the head
GPU_MATMUL_N = 8192  # a GPU reaches its peak only on a product this large
MIN_MATMUL_SECONDS = 0.2  # each peak figure times enough products to fill this
COLUMNS = (("params_M", "params (M)"), ("gflop_fwd_per_sample", "GFLOP fwd/sample"),
           ("samples_per_s", "samples/s"), ("tflop_per_s", "TFLOP/s (train = 3 x fwd)"),
           ("share_of_peak", "share of matmul peak"))


def synthetic_spectrograms(n: int, frames: int = 400, seed: int = 0) -> list[np.ndarray]:
    """Random log-mels (128 mels, dB-like values): the speed depends on the shape only."""
    rng = np.random.default_rng(seed)
    return [rng.normal(-40, 10, (128, frames)).astype(np.float32) for _ in range(n)]


def load_npy_dir(folder: Path, n: int) -> list[np.ndarray]:
    """The first `n` .npy spectrograms of a folder (e.g. a feature-cache folder), in name order."""
    files = sorted(Path(folder).glob("*.npy"))[:n]
    if not files:
        raise FileNotFoundError(f"{folder}: no .npy spectrograms found")
    return [np.load(path) for path in files]


def matmul_flops_per_s(device: torch.device, n: int, repeats: int) -> float:
    """Median FLOP/s of n x n matmuls: the peak the training rows are compared with."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device, dtype)
    b = torch.randn(n, n, generator=generator).to(device, dtype)
    count = 1

    def products() -> None:
        for _ in range(count):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    products()  # warm-up, then enough products per timing to dwarf the timer's resolution
    while (seconds := timed(products, 1)[0]) < MIN_MATMUL_SECONDS:
        count *= max(2, min(16, int(MIN_MATMUL_SECONDS / max(seconds, 1e-6))))
    return 2 * n**3 * count / median(timed(products, repeats))


def training_rate(profile_name: str, arch: str, specs: Sequence[np.ndarray], batch: int,
                  steps: int, repeats: int, device: torch.device) -> tuple[float, torch.nn.Module]:
    """Median samples/s over `repeats` passes of `steps` engine steps; returns the model too."""
    profile = get_profile(profile_name)
    cfg = profile.train
    pool = [specs[i % len(specs)] for i in range(batch)]  # one step = one full batch
    rng = np.random.default_rng(0)
    targets = np.eye(N_CLASSES, dtype=np.float32)[rng.integers(0, N_CLASSES, batch)]
    torch.manual_seed(0)
    precision = resolve_precision(device, cfg.amp, cfg.channels_last)
    model = precision.prepare(build_model(arch, N_CLASSES, cfg.width))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    augment = build_batch_augment(profile.augment)
    generator = torch.Generator().manual_seed(0)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def run_steps() -> None:
        for _ in range(steps):
            inputs, y = next(training_batches(pool, targets, batch, cfg.crop_frames, rng))
            augmented_step(model, inputs, y, augment, generator, optimizer, loss_fn, precision)

    # augmented_step ends with loss.item(), which waits for the GPU: the timings are complete
    seconds = median(timed(run_steps, repeats, warmup=1))
    return steps * batch / seconds, model


def run(size: BenchmarkProfile, device: torch.device,
        specs: Sequence[np.ndarray] | None = None,
        configs: Sequence[tuple[str, str]] = CONFIGS, paper_batch: int | None = None,
        input_name: str = "synthetic log-mels") -> Table:
    """The matmul peak (the baseline) and one row per (training profile, network).

    Paper rows use `paper_batch`, else the profile's batch of 128 on a GPU and
    `size.paper_batch_cpu` on a CPU, where 128 would take minutes per step.
    """
    specs = specs if specs is not None else synthetic_spectrograms(8)
    matmul_n = GPU_MATMUL_N if device.type == "cuda" else size.matmul_n
    peak = matmul_flops_per_s(device, matmul_n, size.repeats)
    on_gpu = device.type == "cuda"
    shared = {"device": device.type, "repeats": size.repeats}
    results = [Result(f"matmul {matmul_n}x{matmul_n}, {'bfloat16' if on_gpu else 'float32'}",
                      {**shared, "measure": "peak", "matmul_n": matmul_n,
                       "dtype": "bfloat16" if on_gpu else "float32"},
                      {"tflop_per_s": peak / 1e12, "share_of_peak": 1.0}, baseline=True)]
    for profile_name, arch in configs:
        cfg = get_profile(profile_name).train
        batch = cfg.batch_size
        if profile_name == "paper":
            batch = paper_batch or (cfg.batch_size if on_gpu else size.paper_batch_cpu)
        rate, model = training_rate(profile_name, arch, specs, batch, size.train_steps,
                                    size.repeats, device)
        flops = flops_per_sample(model)
        results.append(Result(
            f"{profile_name}, {arch}, width {cfg.width:g}, batch {batch}",
            {**shared, "measure": "training", "profile": profile_name, "arch": arch,
             "width": cfg.width, "batch": batch, "steps": size.train_steps,
             "amp_bfloat16": on_gpu, "channels_last": on_gpu, "input": input_name,
             "n_classes": N_CLASSES},
            {"params_M": count_parameters(model) / 1e6, "gflop_fwd_per_sample": flops / 1e9,
             "samples_per_s": rate, "tflop_per_s": 3 * flops * rate / 1e12,
             "share_of_peak": 3 * flops * rate / peak}))
    title = (f"steps of the training engine on {input_name} (128-frame crops, all "
             f"augmentations), {passes(size.repeats)} of {size.train_steps} step"
             f"{'s' if size.train_steps != 1 else ''}")
    return Table("training", title, COLUMNS, tuple(results), machine_facts(device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(BENCHMARK_PROFILES), default="standard",
                        help="benchmark size")
    parser.add_argument("--repeats", type=int, default=0, help="timed passes (0: the profile's)")
    parser.add_argument("--steps", type=int, default=0, help="steps per pass (0: the profile's)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--paper-batch", type=int, default=None,
                        help="batch of the paper rows (default: 128 on a GPU, the "
                             "profile's on a CPU)")
    parser.add_argument("--configs", default=",".join(f"{p}/{a}" for p, a in CONFIGS),
                        help="comma-separated PROFILE/ARCH pairs to measure")
    parser.add_argument("--npy-dir", type=Path, default=None,
                        help="folder of precomputed log-mel .npy files (default: random ones)")
    args = parser.parse_args()
    size = BENCHMARK_PROFILES[args.profile]
    size = dataclasses.replace(size, repeats=args.repeats or size.repeats,
                               train_steps=args.steps or size.train_steps)
    configs = [tuple(item.strip().split("/", 1))
               for item in args.configs.split(",") if item.strip()]
    if any(len(pair) != 2 for pair in configs):
        parser.error(f"--configs takes PROFILE/ARCH pairs, got {args.configs!r}")
    specs = load_npy_dir(args.npy_dir, size.feature_clips) if args.npy_dir else None
    input_name = f"log-mels from {args.npy_dir}" if args.npy_dir else "synthetic log-mels"
    table = run(size, resolve_device(args.device), specs, configs=configs,
                paper_batch=args.paper_batch, input_name=input_name)
    print(table.markdown())


if __name__ == "__main__":
    main()
