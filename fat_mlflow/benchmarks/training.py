"""Training throughput (samples/s) of the profiles' networks next to their FLOPs per sample.

Runs without MLflow or librosa (random spectrograms of the real input size), so it also runs
on a GPU machine that has only torch and numpy: `python -m fat_mlflow.benchmarks.training`.
Each configuration is timed over the same number of steps in the same process, so the
ratios between rows hold even when the machine's speed drifts.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fat_mlflow.augment import build_batch_augment
from fat_mlflow.config import get_profile
from fat_mlflow.dataset import training_batches
from fat_mlflow.models import build_model, count_parameters, flops_per_sample
from fat_mlflow.training import resolve_device, train_step


def throughput(profile_name: str, arch: str, steps: int, device: torch.device,
               batch_size: int | None) -> dict[str, float | str]:
    profile = get_profile(profile_name)
    cfg = profile.train
    batch = batch_size or cfg.batch_size
    rng = np.random.default_rng(0)
    specs = [rng.normal(-40, 10, (128, 400)).astype(np.float32) for _ in range(batch)]
    targets = np.eye(80, dtype=np.float32)[rng.integers(0, 80, batch)]
    torch.manual_seed(0)
    model = build_model(arch, 80, cfg.width)
    flops = flops_per_sample(model)
    model.to(device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    augment = build_batch_augment(profile.augment)
    generator = torch.Generator().manual_seed(0)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step() -> None:
        inputs, y = next(training_batches(specs, targets, batch, cfg.crop_frames, rng))
        train_step(model, *augment(inputs, y, generator), optimizer, loss_fn, device)

    step()  # warm-up: kernel selection and allocation
    if on_gpu:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    rate = steps * batch / seconds
    return {"profile": profile_name, "arch": arch, "width": cfg.width, "batch": batch,
            "params_M": count_parameters(model) / 1e6, "GFLOP_fwd": flops / 1e9,
            "samples_per_s": rate, "train_TFLOP_per_s": 3 * flops * rate / 1e12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--paper-batch", type=int, default=None,
                        help="batch for the paper rows (default 128; smaller on a CPU)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    rows = [throughput("quick", "cnn", args.steps, device, None),
            throughput("paper", "cnn", args.steps, device, args.paper_batch),
            throughput("paper", "vgg16", args.steps, device, args.paper_batch)]
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}),"
          f" torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| profile | arch | width | batch | params (M) | GFLOP fwd/sample | samples/s "
          "| achieved train TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['profile']} | {row['arch']} | {row['width']} | {row['batch']} "
              f"| {row['params_M']:.2f} | {row['GFLOP_fwd']:.3f} | {row['samples_per_s']:.1f} "
              f"| {row['train_TFLOP_per_s']:.4f} |")


if __name__ == "__main__":
    main()
