"""Batch augmentations of the seed: mixup, SpecMix, zoom-and-crop, lighting.

Every op takes a batch of log-mel images x (B, C, H, W) -- H mel bins (frequency), W frames
(time) -- with soft multi-label targets y (B, K), its own parameters, and a
`torch.Generator`, and returns a new (x, y). All randomness comes from the generator, so a
seeded generator replays the same batch. Random numbers are drawn on the generator's device
and moved to the batch's, so a CPU generator can drive a GPU batch.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from fat_mlflow.config import AugmentConfig

Batch = tuple[torch.Tensor, torch.Tensor]
BatchAugment = Callable[[torch.Tensor, torch.Tensor, torch.Generator], Batch]


def _check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(
            f"x must be (batch, channels, mel bins, frames), got shape {tuple(x.shape)}"
        )
    if y.ndim != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"y must be (batch, classes) with the batch size of x {x.shape[0]}, "
            f"got shape {tuple(y.shape)}"
        )


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _uniform(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) values as a (B, 1, ...) tensor broadcasting over `like`, on its device and dtype."""
    return values.to(device=like.device, dtype=like.dtype).view(-1, *[1] * (like.ndim - 1))


def _partners(batch: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(batch, generator=generator, device=generator.device)


def mixup(
    x: torch.Tensor, y: torch.Tensor, alpha: float, generator: torch.Generator
) -> Batch:
    """mixup with a random partner per sample and lambda ~ Beta(alpha, alpha) per sample.

    As in the fastai callback the notebooks use, lambda is folded to max(lambda, 1 - lambda)
    so each sample stays the dominant part of its own mix. torch's Beta sampler takes no
    generator, so a numpy generator seeded from `generator` draws the lambdas.
    """
    _check_batch(x, y)
    if alpha <= 0:
        raise ValueError(f"mixup alpha must be > 0, got {alpha}")
    batch = x.shape[0]
    partner = _partners(batch, generator).to(x.device)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    lam = np.random.default_rng(seed).beta(alpha, alpha, size=batch)
    lam = torch.from_numpy(np.maximum(lam, 1.0 - lam))
    lam_x, lam_y = _per_sample(lam, x), _per_sample(lam, y)
    return (
        lam_x * x + (1 - lam_x) * x[partner],
        lam_y * y + (1 - lam_y) * y[partner.to(y.device)],
    )


@dataclass(frozen=True)
class SpecMixDraw:
    """One SpecMix draw: who donates to whom, and which pixels they donate."""

    partner: torch.Tensor  # (B,) index of each sample's donor
    mask: torch.Tensor  # (B, H, W) bool, True where the pixel comes from the donor


def _band(batch: int, size: int, max_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """(B, size) bool: a run of L consecutive True, L uniform in [0, max_fraction*size],
    starting uniformly in [0, size - L]."""
    longest = math.floor(max_fraction * size)
    length = torch.randint(0, longest + 1, (batch,), generator=generator, device=generator.device)
    start = (_uniform(generator, batch) * (size - length + 1)).long()
    index = torch.arange(size, device=generator.device)
    return (index >= start[:, None]) & (index < (start + length)[:, None])


def draw_specmix(
    batch: int, height: int, width: int, max_fraction: float, generator: torch.Generator
) -> SpecMixDraw:
    """Partner permutation plus a frequency band and a time band per sample (same donor)."""
    _check_probability("specmix max_fraction", max_fraction)
    partner = _partners(batch, generator)
    rows = _band(batch, height, max_fraction, generator)
    cols = _band(batch, width, max_fraction, generator)
    return SpecMixDraw(partner=partner, mask=rows[:, :, None] | cols[:, None, :])


def apply_specmix(
    x: torch.Tensor, y: torch.Tensor, draw: SpecMixDraw
) -> Batch:
    """Copy the masked pixels from each partner; mix targets by the fraction copied,
    a = mask.mean() = (f*W + t*H - f*t) / (H*W)."""
    _check_batch(x, y)
    if draw.mask.shape != (x.shape[0], *x.shape[2:]):
        raise ValueError(
            f"SpecMix mask {tuple(draw.mask.shape)} does not fit batch {tuple(x.shape)}"
        )
    mask = draw.mask.to(x.device)
    partner = draw.partner.to(x.device)
    mixed = torch.where(mask[:, None], x[partner], x)
    share = _per_sample(draw.mask.flatten(1).float().mean(dim=1), y)
    return mixed, (1 - share) * y + share * y[partner.to(y.device)]


def specmix(
    x: torch.Tensor, y: torch.Tensor, max_fraction: float, generator: torch.Generator
) -> Batch:
    """SpecMix (seed): frequency and time bands replaced from one random partner."""
    _check_batch(x, y)
    draw = draw_specmix(x.shape[0], x.shape[2], x.shape[3], max_fraction, generator)
    return apply_specmix(x, y, draw)


def zoom_crop(
    x: torch.Tensor, y: torch.Tensor, zoom_max: float, prob: float, generator: torch.Generator
) -> Batch:
    """With probability `prob` per sample, enlarge by a factor uniform in [1, zoom_max]
    (bilinear) and crop back to H x W at a random offset. Targets are unchanged."""
    _check_batch(x, y)
    _check_probability("zoom prob", prob)
    if zoom_max < 1:
        raise ValueError(f"zoom_max must be >= 1, got {zoom_max}")
    batch, _, height, width = x.shape
    chosen = (_uniform(generator, batch) < prob).tolist()
    factors = (1 + _uniform(generator, batch) * (zoom_max - 1)).tolist()
    offsets = _uniform(generator, batch, 2).tolist()
    out = x.clone()
    for i in (i for i in range(batch) if chosen[i]):
        size = (round(height * factors[i]), round(width * factors[i]))
        zoomed = F.interpolate(x[i : i + 1], size=size, mode="bilinear", align_corners=False)
        top = int(offsets[i][0] * (size[0] - height + 1))
        left = int(offsets[i][1] * (size[1] - width + 1))
        out[i] = zoomed[0, :, top : top + height, left : left + width]
    return out, y


def lighting(
    x: torch.Tensor, y: torch.Tensor, max_change: float, prob: float, generator: torch.Generator
) -> Batch:
    """Contrast and brightness jitter, each applied with probability `prob` per sample.

    Inputs are standardised (mean 0, std 1), the analogue of fastai's logit space: contrast
    scales around 0 by a log-uniform factor in [1 - m, 1 / (1 - m)] (fastai's range) and
    brightness shifts by a uniform offset in [-m, m] standard deviations.
    """
    _check_batch(x, y)
    _check_probability("lighting prob", prob)
    if not 0 <= max_change < 1:
        raise ValueError(f"lighting max_change must be in [0, 1), got {max_change}")
    batch = x.shape[0]
    draws = _uniform(generator, batch, 4)
    log_low = math.log1p(-max_change)
    scale = torch.exp(log_low * (1 - 2 * draws[:, 0]))
    shift = (2 * draws[:, 1] - 1) * max_change
    scale = torch.where(draws[:, 2] < prob, scale, torch.ones_like(scale))
    shift = torch.where(draws[:, 3] < prob, shift, torch.zeros_like(shift))
    return x * _per_sample(scale, x) + _per_sample(shift, x), y


def build_batch_augment(cfg: AugmentConfig) -> BatchAugment:
    """The seed's chain: mixup, then SpecMix on the mixed batch, then zoom/crop, then
    lighting; ops switched off in `cfg` are left out."""
    candidates = (
        (cfg.mixup, partial(mixup, alpha=cfg.mixup_alpha)),
        (cfg.specmix, partial(specmix, max_fraction=cfg.specmix_max_fraction)),
        (cfg.zoom, partial(zoom_crop, zoom_max=cfg.zoom_max, prob=cfg.zoom_prob)),
        (cfg.lighting, partial(lighting, max_change=cfg.lighting_max, prob=cfg.lighting_prob)),
    )
    ops = [op for enabled, op in candidates if enabled]

    def augment(
        x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> Batch:
        for op in ops:
            x, y = op(x, y, generator=generator)
        return x, y

    return augment
