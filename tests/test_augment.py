"""Batch augmentations: SpecMix's exact pixel/target bookkeeping, mixup, zoom, lighting."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fat_mlflow.config import AugmentConfig
from fat_mlflow.engine.augment import (
    apply_specmix,
    build_batch_augment,
    draw_specmix,
    lighting,
    mixup,
    specmix,
    zoom_crop,
)

B, C, H, W = 24, 3, 128, 96


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous images (partners differ at every pixel) and one distinct class per sample."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, W, generator=g), torch.eye(B)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_specmix_target_weight_is_the_replaced_pixel_fraction() -> None:
    x, y = batch()
    draw = draw_specmix(B, H, W, 0.25, gen(1))
    mixed, targets = apply_specmix(x, y, draw)
    partner = draw.partner
    changed = (mixed != x).any(dim=1)
    from_partner = (mixed == x[partner]).all(dim=1)
    for i in range(B):
        mask = draw.mask[i]
        assert torch.equal(mixed[i][:, ~mask], x[i][:, ~mask])  # outside the bands: untouched
        assert from_partner[i][mask].all()
        if partner[i] != i:
            assert torch.equal(changed[i], mask)
            share = changed[i].float().mean()
            assert targets[i, i] == pytest.approx(1 - share.item())
            assert targets[i, partner[i]] == pytest.approx(share.item())
        f = int(mask.all(dim=1).sum())  # rows fully replaced: the frequency band
        t = int(mask.all(dim=0).sum())  # columns fully replaced: the time band
        expected = (f * W + t * H - f * t) / (H * W)
        assert mask.float().mean().item() == pytest.approx(expected)
    assert torch.allclose(targets.sum(dim=1), torch.ones(B))


def test_specmix_bands_are_contiguous_and_within_a_quarter_of_each_axis() -> None:
    g = gen(2)
    lengths: dict[str, list[int]] = {"f": [], "t": []}
    for _ in range(20):
        draw = draw_specmix(B, H, W, 0.25, g)
        rows = draw.mask.all(dim=2)
        cols = draw.mask.all(dim=1)
        assert torch.equal(draw.mask, rows[:, :, None] | cols[:, None, :])
        for band, name in ((rows, "f"), (cols, "t")):
            padded = torch.nn.functional.pad(band.int(), (1, 0))
            starts = (padded.diff(dim=1) == 1).sum(dim=1)
            assert (starts <= 1).all()  # one run of consecutive bins/frames at most
            lengths[name] += band.sum(dim=1).tolist()
    assert max(lengths["f"]) <= 0.25 * H and max(lengths["t"]) <= 0.25 * W
    assert min(lengths["f"]) <= 3 and max(lengths["f"]) >= 0.25 * H - 3  # covers the range
    assert min(lengths["t"]) <= 3 and max(lengths["t"]) >= 0.25 * W - 3


def test_specmix_is_draw_then_apply() -> None:
    x, y = batch()
    expected = apply_specmix(x, y, draw_specmix(B, H, W, 0.25, gen(3)))
    actual = specmix(x, y, 0.25, gen(3))
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


def test_specmix_with_zero_fraction_changes_nothing() -> None:
    x, y = batch()
    mixed, targets = specmix(x, y, 0.0, gen(4))
    assert torch.equal(mixed, x) and torch.equal(targets, y)


def test_mixup_is_a_convex_combination_with_the_same_lambda_for_x_and_y() -> None:
    x, y = batch()
    mixed, targets = mixup(x, y, 0.4, gen(5))
    assert torch.allclose(targets.sum(dim=1), torch.ones(B))
    assert (targets >= 0).all() and (targets <= 1).all()
    for i in range(B):
        lam = targets[i, i]
        assert lam >= 0.5  # each sample dominates its own mix
        if lam < 1:
            partner = int(torch.topk(targets[i], 2).indices[1])
            assert torch.allclose(mixed[i], lam * x[i] + (1 - lam) * x[partner], atol=1e-6)


def test_zoom_crop_keeps_shape_dtype_and_targets() -> None:
    x, y = batch()
    zoomed, targets = zoom_crop(x, y, 1.05, 1.0, gen(6))
    assert zoomed.shape == x.shape and zoomed.dtype == x.dtype
    assert torch.equal(targets, y)
    assert not torch.equal(zoomed, x)
    unchanged, _ = zoom_crop(x, y, 1.05, 0.0, gen(6))
    assert torch.equal(unchanged, x)


def test_zoom_crop_is_an_enlarged_window_of_the_input() -> None:
    """A smooth ramp along time stays monotonic and within its range after zoom and crop."""
    ramp = torch.linspace(0, 1, W).expand(1, C, H, W).clone()
    zoomed, _ = zoom_crop(ramp, torch.ones(1, 2), 1.3, 1.0, gen(7))
    assert (zoomed.diff(dim=3) >= -1e-6).all()
    assert zoomed.min() >= 0 and zoomed.max() <= 1
    assert zoomed.diff(dim=3).mean() < ramp.diff(dim=3).mean()  # stretched


def test_lighting_is_a_bounded_per_sample_affine_change() -> None:
    x, y = batch()
    lit, targets = lighting(x, y, 0.2, 1.0, gen(8))
    assert lit.shape == x.shape and lit.dtype == x.dtype and torch.equal(targets, y)
    flat_x, flat_lit = x.flatten(1), lit.flatten(1)
    for i in range(B):
        scale = torch.cov(torch.stack([flat_x[i], flat_lit[i]]))[0, 1] / flat_x[i].var()
        shift = (flat_lit[i] - scale * flat_x[i]).mean()
        assert torch.allclose(flat_lit[i], scale * flat_x[i] + shift, atol=1e-4)
        assert 0.8 - 1e-4 <= scale <= 1.25 + 1e-4 and abs(shift) <= 0.2 + 1e-4
    assert torch.equal(lighting(x, y, 0.2, 0.0, gen(8))[0], x)


def test_all_off_config_leaves_the_batch_untouched() -> None:
    x, y = batch()
    cfg = AugmentConfig(mixup=False, specmix=False, zoom=False, lighting=False)
    out_x, out_y = build_batch_augment(cfg)(x.clone(), y.clone(), gen(9))
    assert torch.equal(out_x, x) and torch.equal(out_y, y)


def test_seed_determines_the_augmented_batch() -> None:
    x, y = batch()
    augment = build_batch_augment(AugmentConfig())
    first = augment(x, y, gen(10))
    again = augment(x, y, gen(10))
    other = augment(x, y, gen(11))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert first[0].shape == x.shape and first[1].shape == y.shape
    assert torch.allclose(first[1].sum(dim=1), torch.ones(B))


def test_chain_order_is_mixup_then_specmix() -> None:
    """Up to four clips meet in one sample: the mixup pair, then a mixed SpecMix donor."""
    x, y = batch()
    cfg = replace(AugmentConfig(), zoom=False, lighting=False)
    _, targets = build_batch_augment(cfg)(x, y, gen(12))
    g = gen(12)
    expected = specmix(*mixup(x, y, cfg.mixup_alpha, g), cfg.specmix_max_fraction, g)[1]
    assert torch.equal(targets, expected)
    assert (targets > 0).sum(dim=1).max() > 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: specmix(torch.zeros(2, 8, 8), torch.zeros(2, 3), 0.25, gen(0)), "x must be"),
        (lambda: specmix(torch.zeros(2, 1, 8, 8), torch.zeros(3, 3), 0.25, gen(0)), "y must be"),
        (lambda: specmix(torch.zeros(2, 1, 8, 8), torch.zeros(2, 3), 1.5, gen(0)), "max_fraction"),
        (lambda: mixup(torch.zeros(2, 1, 8, 8), torch.zeros(2, 3), 0.0, gen(0)), "alpha"),
        (lambda: zoom_crop(torch.zeros(2, 1, 8, 8), torch.zeros(2, 3), 0.9, 1, gen(0)), "zoom_max"),
        (lambda: lighting(torch.zeros(2, 1, 8, 8), torch.zeros(2, 3), 0.2, 2, gen(0)), "prob"),
    ],
)
def test_bad_arguments_are_rejected(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
