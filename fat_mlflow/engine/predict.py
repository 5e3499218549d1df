"""Sliding-window inference: the seed's test-time procedure, shared by OOF and the ensemble."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fat_mlflow.engine.dataset import window_batches
from fat_mlflow.engine.precision import Precision, resolve_precision
from fat_mlflow.engine.spectrograms import Spectrograms


@torch.inference_mode()
def predict_spectrograms(
    models: Sequence[nn.Module],
    specs: Spectrograms,
    window: int = 128,
    step: int = 48,
    batch_size: int = 256,
    precision: Precision | None = None,
) -> np.ndarray:
    """Mean sigmoid score per clip: averaged over its windows, then over `models`.

    Windows of many clips share one batch, and each batch is standardised once and fed
    to every model, so an ensemble costs one preprocessing pass. The models run as
    `precision` says (as in training: bf16 autocast where the device has bf16 units); they
    must already be on its device, in its layout (`Precision.prepare_for_scoring`, or
    `Precision.prepare` for a model still in training). Default: the CPU, float32.
    """
    if not models:
        raise ValueError("predict_spectrograms needs at least one model")
    precision = precision or resolve_precision(torch.device("cpu"), amp=False,
                                               channels_last=False)
    device = precision.device
    n_classes = _output_size(models[0])
    sums = torch.zeros(len(specs), n_classes, dtype=torch.float64)
    counts = torch.zeros(len(specs), dtype=torch.float64)
    for model in models:
        model.eval()
    for inputs, clip_index in window_batches(specs, window, step, batch_size):
        inputs = inputs.to(device, non_blocking=True)
        with precision.autocast():
            probs = sum(torch.sigmoid(model(inputs).float()) for model in models) / len(models)
        index = torch.from_numpy(clip_index)
        sums.index_add_(0, index, probs.double().cpu())
        counts.index_add_(0, index, torch.ones(len(index), dtype=torch.float64))
    return (sums / counts.unsqueeze(1)).numpy().astype(np.float32)


def _output_size(model: nn.Module) -> int:
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return last_linear.out_features
