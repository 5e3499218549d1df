"""Training throughput (samples/s) of the quick and paper networks in float32 and in the
engine's bf16 (autocast + channels_last, where the device has bf16 units), their FLOPs per
sample and the share of the machine's peaks that implies.

Both peaks are measured in the same process with a large matmul, in float32 and in bfloat16,
so "share of peak" = achieved model FLOP/s (3 x forward FLOPs per sample: forward, and
backward at twice its cost) / matmul FLOP/s holds on a machine whose speed drifts. The two
number formats of a network are timed in turn, pass by pass, and the bf16 row's speed is
given against its float32 row.

Needs neither MLflow nor librosa: the inputs are random spectrograms of the real size, or
log-mels of a feature store (a feature-cache folder, `logmel-<key>`), so it runs on a GPU
machine with only torch and numpy:

    python -m fat_mlflow.benchmarks.training [--profile standard] [--store DIR] [--device cuda]
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fat_mlflow.benchmarks import BENCHMARK_PROFILES, BenchmarkProfile
from fat_mlflow.benchmarks.common import (
    Result,
    Table,
    machine_facts,
    matmul_peaks,
    median,
    passes,
    timed_alternately,
)
from fat_mlflow.config import get_profile
from fat_mlflow.data.store import FeatureStore
from fat_mlflow.engine.augment import build_batch_augment
from fat_mlflow.engine.dataset import training_batches
from fat_mlflow.engine.models import build_model, count_parameters, flops_per_sample
from fat_mlflow.engine.precision import Precision, resolve_precision
from fat_mlflow.engine.spectrograms import Spectrograms, take
from fat_mlflow.engine.training import augmented_step, resolve_device

# (training profile, network, width, batch; None: the profile's): the quick network at its
# width and half it, the paper's
Config = tuple[str, str, float, int | None]
CONFIGS: tuple[Config, ...] = (("quick", "cnn", 0.125, None), ("quick", "cnn", 0.25, None),
                               ("paper", "cnn", 1.0, None), ("paper", "vgg16", 1.0, None))
N_CLASSES = 80  # FAT2019's vocabulary: the size of the head
COLUMNS = (("params_M", "params (M)"), ("gflop_fwd_per_sample", "GFLOP fwd/sample"),
           ("samples_per_s", "samples/s"), ("tflop_per_s", "TFLOP/s (train = 3 x fwd)"),
           ("share_of_float32_peak", "share of float32 peak"),
           ("share_of_bfloat16_peak", "share of bf16 peak"),
           ("speed_vs_float32", "speed vs float32 (x)"))


def synthetic_spectrograms(n: int, frames: int = 400, seed: int = 0) -> list[np.ndarray]:
    """Random log-mels (128 mels, dB-like values): the speed depends on the shape only."""
    rng = np.random.default_rng(seed)
    return [rng.normal(-40, 10, (128, frames)).astype(np.float32) for _ in range(n)]


def training_steps(profile_name: str, arch: str, width: float, precision: Precision,
                   specs: Spectrograms, batch: int, steps: int
                   ) -> tuple[Callable[[], None], nn.Module]:
    """`steps` engine steps of a fresh network in `precision`, as a call to time, and the net."""
    profile = get_profile(profile_name)
    cfg = profile.train
    pool = take(specs, np.arange(batch) % len(specs))  # one step = one full batch
    rng = np.random.default_rng(0)
    targets = np.eye(N_CLASSES, dtype=np.float32)[rng.integers(0, N_CLASSES, batch)]
    torch.manual_seed(0)
    model = precision.prepare(build_model(arch, N_CLASSES, width))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    augment = build_batch_augment(profile.augment)
    generator = torch.Generator().manual_seed(0)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def run_steps() -> None:
        # augmented_step ends with loss.item(), which waits for the GPU: timings are complete
        for _ in range(steps):
            inputs, y = next(training_batches(pool, targets, batch, cfg.crop_frames, rng))
            augmented_step(model, inputs, y, augment, generator, optimizer, loss_fn, precision)

    return run_steps, model


def precisions(device: torch.device) -> dict[str, Precision]:
    """float32 (NCHW: `train.amp=false train.channels_last=false`) and, where the device has
    bf16 units, the engine's default: bf16 autocast with channels_last as precision.py sets."""
    chosen = {"float32": resolve_precision(device, amp=False, channels_last=False)}
    default = resolve_precision(device)
    if default.bfloat16:
        chosen["bfloat16"] = default
    return chosen


def run(size: BenchmarkProfile, device: torch.device,
        specs: Spectrograms | None = None,
        configs: Sequence[Config] = CONFIGS, paper_batch: int | None = None,
        input_name: str = "synthetic log-mels") -> Table:
    """The float32 matmul peak (the baseline) and the bf16 one, then per (training profile,
    network, width, batch) one row per number format; each network's formats are timed in turn.

    A config without a batch takes the profile's, except paper rows: `paper_batch`, else the
    profile's batch of 128 on a GPU and `size.paper_batch_cpu` on a CPU, where 128 would take
    minutes per step.
    """
    specs = specs if specs is not None else synthetic_spectrograms(8)
    on_gpu = device.type == "cuda"
    formats = precisions(device)
    matmul_n, peaks = matmul_peaks(device, size)

    def shares(flop_per_s: float, speed_vs_float32: float) -> dict[str, float]:
        return {"tflop_per_s": flop_per_s / 1e12,
                "share_of_float32_peak": flop_per_s / peaks["float32"],
                "share_of_bfloat16_peak": flop_per_s / peaks["bfloat16"],
                "speed_vs_float32": speed_vs_float32}

    shared = {"device": device.type, "repeats": size.repeats}
    results = [Result(f"matmul {matmul_n}x{matmul_n}, {name}",
                      {**shared, "measure": "peak", "matmul_n": matmul_n, "dtype": name},
                      shares(peak, peak / peaks["float32"]), baseline=name == "float32")
               for name, peak in peaks.items()]
    for profile_name, arch, width, asked_batch in configs:
        cfg = get_profile(profile_name).train
        if asked_batch:
            batch = asked_batch
        elif profile_name == "paper":
            batch = paper_batch or (cfg.batch_size if on_gpu else size.paper_batch_cpu)
        else:
            batch = cfg.batch_size
        built = {name: training_steps(profile_name, arch, width, precision, specs, batch,
                                      size.train_steps)
                 for name, precision in formats.items()}
        seconds = timed_alternately({name: call for name, (call, _) in built.items()},
                                    size.repeats, warmup=1)
        rates = {name: size.train_steps * batch / median(seconds[name]) for name in built}
        for name, (_, model) in built.items():
            precision = formats[name]
            flops = flops_per_sample(model)
            results.append(Result(
                f"{profile_name}, {arch}, width {width:g}, batch {batch}, {name}"
                + (" + channels_last" if precision.channels_last else ""),
                {**shared, "measure": "training", "profile": profile_name, "arch": arch,
                 "width": width, "batch": batch, "steps": size.train_steps,
                 "amp_bfloat16": precision.bfloat16, "channels_last": precision.channels_last,
                 "input": input_name, "n_classes": N_CLASSES},
                {"params_M": count_parameters(model) / 1e6, "gflop_fwd_per_sample": flops / 1e9,
                 "samples_per_s": rates[name],
                 **shares(3 * flops * rates[name], rates[name] / rates["float32"])}))
    title = (f"steps of the training engine on {input_name} (128-frame crops, all "
             f"augmentations), {passes(size.repeats)} of {size.train_steps} step"
             f"{'s' if size.train_steps != 1 else ''}, the number formats of a network in turn")
    return Table("training", title, COLUMNS, tuple(results), machine_facts(device))


def parse_config(item: str) -> Config:
    """"quick/cnn/0.25/32" -> ("quick", "cnn", 0.25, 32); without a width or a batch, the
    profile's."""
    parts = item.strip().split("/")
    if len(parts) not in (2, 3, 4):
        raise ValueError(f"{item!r} is not PROFILE/ARCH[/WIDTH[/BATCH]]")
    width = float(parts[2]) if len(parts) >= 3 else get_profile(parts[0]).train.width
    return parts[0], parts[1], width, int(parts[3]) if len(parts) == 4 else None


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
    parser.add_argument("--configs", default=",".join(f"{p}/{a}/{w:g}" for p, a, w, _ in CONFIGS),
                        help="comma-separated PROFILE/ARCH[/WIDTH[/BATCH]] to measure, e.g. "
                             "quick/cnn/0.25/8,quick/cnn/0.25/32 (default width and batch: the "
                             "profile's)")
    parser.add_argument("--store", type=Path, default=None,
                        help="a feature-store folder (.fat_cache/logmel-<key>) whose log-mels "
                             "are the inputs (default: random ones)")
    args = parser.parse_args()
    size = BENCHMARK_PROFILES[args.profile]
    size = dataclasses.replace(size, repeats=args.repeats or size.repeats,
                               train_steps=args.steps or size.train_steps)
    try:
        configs = [parse_config(item) for item in args.configs.split(",") if item.strip()]
    except (ValueError, KeyError) as error:
        parser.error(f"--configs takes PROFILE/ARCH[/WIDTH[/BATCH]] items, got "
                     f"{args.configs!r}: {error}")
    store = FeatureStore(args.store) if args.store else None
    specs = store.open(store.digests()[: size.feature_clips]) if store else None
    input_name = f"log-mels from {args.store}" if args.store else "synthetic log-mels"
    table = run(size, resolve_device(args.device), specs, configs=configs,
                paper_batch=args.paper_batch, input_name=input_name)
    print(table.markdown())


if __name__ == "__main__":
    main()
