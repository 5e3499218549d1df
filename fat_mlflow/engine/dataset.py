"""From cached log-mel spectrograms to network batches: crops, windows, standardisation.

The cache holds raw log-mel images; per-image standardisation and the 3-channel copy
happen here, at batch time, so that one cache serves every model.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


def to_network_input(crops: np.ndarray) -> torch.Tensor:
    """(B, H, W) log-mel crops -> (B, 3, H, W) float tensor, each image mean 0 / std 1."""
    images = torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32))
    mean = images.mean(dim=(1, 2), keepdim=True)
    std = images.std(dim=(1, 2), keepdim=True)
    standardised = (images - mean) / (std + 1e-6)
    return standardised.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def random_crop(spec: np.ndarray, frames: int, rng: np.random.Generator) -> np.ndarray:
    """A random `frames`-wide excerpt; the cache guarantees at least `frames` frames."""
    if spec.shape[1] < frames:
        raise ValueError(f"spectrogram has {spec.shape[1]} frames, fewer than the crop {frames}")
    start = int(rng.integers(0, spec.shape[1] - frames + 1))
    return spec[:, start : start + frames]


def centre_window(spec: np.ndarray, frames: int) -> np.ndarray:
    """The `frames`-wide excerpt in the middle of a clip (the cache guarantees `frames`)."""
    start = (spec.shape[1] - frames) // 2
    return spec[:, start : start + frames]


def window_starts(n_frames: int, window: int, step: int) -> np.ndarray:
    """Start frames of the sliding inference windows (the seed's test-time shifts)."""
    if n_frames < window:
        raise ValueError(f"clip has {n_frames} frames, fewer than one window of {window}")
    return np.arange(0, n_frames - window + 1, step)


def training_batches(
    specs: Sequence[np.ndarray],
    targets: np.ndarray,
    batch_size: int,
    crop_frames: int,
    rng: np.random.Generator,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch: every clip once, in random order, as one random crop each.

    The last incomplete batch is dropped when it would hold a single clip, because
    BatchNorm cannot train on one sample.
    """
    order = rng.permutation(len(specs))
    for begin in range(0, len(order), batch_size):
        chosen = order[begin : begin + batch_size]
        if len(chosen) < 2:
            continue
        crops = np.stack([random_crop(specs[i], crop_frames, rng) for i in chosen])
        yield to_network_input(crops), torch.from_numpy(targets[chosen])


def window_batches(
    specs: Sequence[np.ndarray], window: int, step: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """All windows of all clips, batched across clips; yields (inputs, clip index per row)."""
    index = [(clip, start) for clip, spec in enumerate(specs)
             for start in window_starts(spec.shape[1], window, step)]
    for begin in range(0, len(index), batch_size):
        chunk = index[begin : begin + batch_size]
        crops = np.stack([specs[clip][:, start : start + window] for clip, start in chunk])
        yield to_network_input(crops), np.fromiter((clip for clip, _ in chunk), dtype=np.int64)
