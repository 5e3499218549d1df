"""Sliding-window inference: the seed's test-time procedure, shared by OOF and the ensemble."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from fat_mlflow.engine.dataset import window_batches, window_starts
from fat_mlflow.engine.precision import Precision, resolve_precision
from fat_mlflow.engine.spectrograms import Spectrograms, as_spectrograms


def window_positions(specs: Spectrograms, window: int, step: int, cover_end: bool = False
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(clip index, start frame) of every sliding window, in the order `window_batches` cuts
    them (from the clips' frame counts alone: nothing is read)."""
    specs = as_spectrograms(specs)
    starts = [window_starts(specs.frames(i), window, step, cover_end) for i in range(len(specs))]
    clips = [np.full(len(s), i, dtype=np.int64) for i, s in enumerate(starts)]
    return (np.concatenate(clips) if clips else np.zeros(0, np.int64),
            np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64))


@torch.inference_mode()
def scored_window_batches(
    models: Sequence[nn.Module],
    specs: Spectrograms,
    window: int = 128,
    step: int = 48,
    batch_size: int = 256,
    precision: Precision | None = None,
    cover_end: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(sigmoid score of each window averaged over `models`, clip index of each window), one
    batch at a time.

    Windows of many clips share one batch, and each batch is standardised once and fed
    to every model, so an ensemble costs one preprocessing pass. The models run as
    `precision` says (as in training: bf16 autocast where the device has bf16 units); they
    must already be on its device, in its layout (`Precision.prepare_for_scoring`, or
    `Precision.prepare` for a model still in training). Default: the CPU, float32.
    """
    if not models:
        raise ValueError("scoring needs at least one model")
    precision = precision or resolve_precision(torch.device("cpu"), amp=False,
                                               channels_last=False)
    for model in models:
        model.eval()
    for inputs, clip_index in window_batches(specs, window, step, batch_size, cover_end):
        inputs = inputs.to(precision.device, non_blocking=True)
        with precision.autocast():
            probs = sum(torch.sigmoid(model(inputs).float()) for model in models) / len(models)
        yield probs.cpu().numpy(), clip_index


def predict_spectrograms(
    models: Sequence[nn.Module],
    specs: Spectrograms,
    window: int = 128,
    step: int = 48,
    batch_size: int = 256,
    precision: Precision | None = None,
    cover_end: bool = False,
) -> np.ndarray:
    """Mean sigmoid score per clip: averaged over its windows, then over `models`."""
    if not models:
        raise ValueError("predict_spectrograms needs at least one model")
    sums = np.zeros((len(as_spectrograms(specs)), _output_size(models[0])), dtype=np.float64)
    counts = np.zeros(len(sums), dtype=np.float64)
    for probs, clip_index in scored_window_batches(models, specs, window, step, batch_size,
                                                   precision, cover_end):
        np.add.at(sums, clip_index, probs)
        np.add.at(counts, clip_index, 1.0)
    return (sums / counts[:, None]).astype(np.float32)


def _output_size(model: nn.Module) -> int:
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return last_linear.out_features
