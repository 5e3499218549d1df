"""From cached log-mel spectrograms to network batches: crops, windows, standardisation.

The cache holds raw log-mel images; per-image standardisation and the 3-channel copy
happen here, at batch time, so that one cache serves every model. Clips are read through
`ClipSpectrograms`: a batch reads its crops, a clip's windows read the clip once, and no
more is ever held than one batch and one clip.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from fat_mlflow.engine.spectrograms import ClipSpectrograms, Spectrograms, as_spectrograms


def to_network_input(crops: np.ndarray) -> torch.Tensor:
    """(B, H, W) log-mel crops -> (B, 3, H, W) float tensor, each image mean 0 / std 1."""
    images = torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32))
    mean = images.mean(dim=(1, 2), keepdim=True)
    std = images.std(dim=(1, 2), keepdim=True)
    standardised = (images - mean) / (std + 1e-6)
    return standardised.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def random_crop(specs: ClipSpectrograms, index: int, frames: int,
                rng: np.random.Generator) -> np.ndarray:
    """A random `frames`-wide excerpt of clip `index`; the cache guarantees at least `frames`
    frames."""
    length = specs.frames(index)
    if length < frames:
        raise ValueError(f"spectrogram has {length} frames, fewer than the crop {frames}")
    start = int(rng.integers(0, length - frames + 1))
    return specs.crop(index, start, frames)


def centre_windows(specs: Spectrograms, frames: int) -> list[np.ndarray]:
    """The `frames`-wide excerpt in the middle of each clip (the cache guarantees `frames`)."""
    specs = as_spectrograms(specs)
    return [specs.crop(i, (specs.frames(i) - frames) // 2, frames) for i in range(len(specs))]


def window_starts(n_frames: int, window: int, step: int, cover_end: bool = False) -> np.ndarray:
    """Start frames of the sliding inference windows (the seed's test-time shifts).

    They start at multiples of `step` and stop before the clip's end, leaving up to
    step - 1 frames unscored; `cover_end` adds one window aligned with the end when they do,
    so a long step still hears the whole clip.
    """
    if n_frames < window:
        raise ValueError(f"clip has {n_frames} frames, fewer than one window of {window}")
    starts = np.arange(0, n_frames - window + 1, step)
    if cover_end and starts[-1] + window < n_frames:
        starts = np.append(starts, n_frames - window)
    return starts


def training_batches(
    specs: Spectrograms,
    targets: np.ndarray,
    batch_size: int,
    crop_frames: int,
    rng: np.random.Generator,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch: every clip once, in random order, as one random crop each.

    The last incomplete batch is dropped when it would hold a single clip, because
    BatchNorm cannot train on one sample.
    """
    specs = as_spectrograms(specs)
    order = rng.permutation(len(specs))
    for begin in range(0, len(order), batch_size):
        chosen = order[begin : begin + batch_size]
        if len(chosen) < 2:
            continue
        crops = np.stack([random_crop(specs, i, crop_frames, rng) for i in chosen])
        yield to_network_input(crops), torch.from_numpy(targets[chosen])


def window_batches(
    specs: Spectrograms, window: int, step: int, batch_size: int, cover_end: bool = False
) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """All windows of all clips, batched across clips; yields (inputs, clip index per row).

    Each clip is read once, whole, and cut into its windows; a batch may end inside a clip.
    """
    specs = as_spectrograms(specs)
    crops: list[np.ndarray] = []
    owners: list[int] = []
    for clip in range(len(specs)):
        starts = window_starts(specs.frames(clip), window, step, cover_end)
        whole = specs.clip(clip)
        for start in starts:
            crops.append(whole[:, start : start + window])
            owners.append(clip)
            if len(crops) == batch_size:
                yield to_network_input(np.stack(crops)), np.array(owners, dtype=np.int64)
                crops, owners = [], []
    if crops:
        yield to_network_input(np.stack(crops)), np.array(owners, dtype=np.int64)
