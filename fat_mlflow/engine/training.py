"""Training of one fold model: random crops, batch augmentation, BCE, Adam + one-cycle.

No MLflow here: the caller receives an `EpochLog` per epoch through a callback and
decides what to record, so the engine also runs on machines without MLflow.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fat_mlflow.config import AugmentConfig, TrainConfig
from fat_mlflow.engine.augment import build_batch_augment
from fat_mlflow.engine.dataset import centre_windows, training_batches
from fat_mlflow.engine.metrics import lwlrap
from fat_mlflow.engine.precision import Precision, resolve_precision
from fat_mlflow.engine.predict import predict_spectrograms
from fat_mlflow.engine.spectrograms import Spectrograms


@dataclass(frozen=True)
class EpochLog:
    epoch: int
    train_loss: float
    val_lwlrap: float  # NaN when the epoch was not validated
    train_seconds: float  # the optimiser steps: crops, augmentation, forward, backward, update
    validation_seconds: float  # 0 when the epoch was not validated
    samples_per_second: float

    @property
    def seconds(self) -> float:
        return self.train_seconds + self.validation_seconds


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but no CUDA GPU is visible")
    return torch.device(name)


def training_precision(cfg: TrainConfig) -> Precision:
    """The device of `cfg` with bf16 autocast / channels_last as `cfg` asks and it affords."""
    return resolve_precision(resolve_device(cfg.device), cfg.amp, cfg.channels_last)


def steps_per_epoch(n_clips: int, batch_size: int) -> int:
    """Matches `training_batches`, which drops a trailing batch of one clip."""
    full, rest = divmod(n_clips, batch_size)
    return full + (1 if rest >= 2 else 0)


def train_fold(
    model: nn.Module,
    train_specs: Spectrograms,
    train_targets: np.ndarray,
    val_specs: Spectrograms,
    val_targets: np.ndarray,
    cfg: TrainConfig,
    augment: AugmentConfig,
    seed: int,
    on_epoch: Callable[[EpochLog], None] | None = None,
    progress: bool = True,
    desc: str = "",
) -> list[EpochLog]:
    """Train `model` in place for `cfg.epochs` epochs; returns the per-epoch log.

    Where the device has bf16 matrix units (a GPU, an AMX or AVX512-BF16 CPU) the
    forward/backward pass runs in bfloat16 autocast, with channels_last convolutions, unless
    `cfg` switches them off (fat_mlflow.engine.precision). Everything random draws from `seed`.
    """
    precision = training_precision(cfg)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    transform = build_batch_augment(augment)
    precision.prepare(model)
    n_steps = steps_per_epoch(len(train_specs), cfg.batch_size)
    if n_steps == 0:
        raise ValueError(f"{desc or 'fold'}: needs at least 2 training clips, got {len(train_specs)}")
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * n_steps
    )
    loss_fn = nn.BCEWithLogitsLoss()
    history: list[EpochLog] = []
    bar = tqdm(range(cfg.epochs), desc=desc or "train", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        started, total_loss, seen = time.perf_counter(), 0.0, 0
        for inputs, targets in training_batches(
            train_specs, train_targets, cfg.batch_size, cfg.crop_frames, rng
        ):
            loss = augmented_step(model, inputs, targets, transform, generator, optimizer,
                                  loss_fn, precision)
            schedule.step()
            total_loss += loss * len(targets)
            seen += len(targets)
        train_seconds = time.perf_counter() - started
        validate = (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs
        val_score = (evaluate(model, val_specs, val_targets, cfg, precision) if validate
                     else float("nan"))
        log = EpochLog(epoch, total_loss / seen, val_score, train_seconds,
                       time.perf_counter() - started - train_seconds, seen / train_seconds)
        history.append(log)
        if validate:
            bar.set_postfix(loss=f"{log.train_loss:.4f}", val_lwlrap=f"{val_score:.3f}")
        if on_epoch is not None:
            on_epoch(log)
    return history


def augmented_step(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    transform: Callable,
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    precision: Precision,
) -> float:
    """Move a batch to the device, augment it THERE, then take one optimiser step in the
    number format of `precision` (the model was prepared by it).

    The augmentations draw their randomness from `generator` (on the CPU) whatever the
    device, so a GPU run sees the same crops, partners and bands as a CPU run; only the
    pixel work moves to the GPU, where the per-sample zoom of a 128-clip batch would
    otherwise keep the network waiting.
    """
    device = precision.device
    inputs, targets = transform(inputs.to(device, non_blocking=True),
                                targets.to(device, non_blocking=True), generator)
    with precision.autocast():
        loss = loss_fn(model(inputs).float(), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def evaluate(
    model: nn.Module,
    specs: Spectrograms,
    targets: np.ndarray,
    cfg: TrainConfig,
    precision: Precision,
) -> float:
    """lwlrap on held-out clips, each scored on its centre window alone; NaN when there are
    none.

    Only the curve uses it (the fold keeps its last epoch's model, whatever the curve says),
    so one window per clip is enough: a stage-1 fold's validation costs 155 windows instead of
    the 1,413 of its out-of-fold scoring (window step 48), or 572 at a step of one window.
    """
    if len(specs) == 0 or targets.sum() == 0:
        return float("nan")
    centres = centre_windows(specs, cfg.crop_frames)
    scores = predict_spectrograms([model], centres, cfg.crop_frames, cfg.crop_frames,
                                  cfg.eval_batch_size, precision)
    return lwlrap(targets, scores)
