"""Both networks: shapes, the paper's exact sizes, checkpoints, and FLOP counts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fat_mlflow.engine.models.slimming import slimmed
from fat_mlflow.engine.models import (
    ARCHITECTURES,
    build_model,
    count_parameters,
    flops_per_sample,
    load_checkpoint,
    save_checkpoint,
)


def conv(c_in: int, c_out: int) -> int:
    """3x3 conv with bias, followed by a BN layer (weight + bias)."""
    return c_in * c_out * 9 + c_out + 2 * c_out


def dense(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("width", [0.125, 0.25])
def test_output_shape(arch: str, width: float) -> None:
    model = build_model(arch, n_classes=7, width=width).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 128, 128)).shape == (2, 7)
        assert model(torch.randn(3, 3, 128, 200)).shape == (3, 7)  # adaptive pooling


def test_full_width_output_shape_in_training_mode() -> None:
    model = build_model("cnn", n_classes=80).train()
    logits = model(torch.randn(2, 3, 128, 128))
    assert logits.shape == (2, 80)
    logits.sum().backward()


def test_cnn_model_1_has_table_1_parameter_count() -> None:
    features = (
        conv(3, 64) + conv(64, 64)
        + conv(64, 128) + conv(128, 128)
        + conv(128, 256) + conv(256, 256)
        + conv(256, 512) + conv(512, 512)
    )
    head = (
        2 * 1024  # BN over concat(avg 512, max 512)
        + dense(1024, 512)
        + 2 * 512  # BN after the 512 ReLU
        + dense(512, 80)
    )
    assert features == 4_689_216
    assert head == 568_912
    assert count_parameters(build_model("cnn", n_classes=80)) == features + head == 5_258_128


def test_vgg16_bn_conv_stack_matches_torchvision_count() -> None:
    model = build_model("vgg16", n_classes=80)
    expected = (
        conv(3, 64) + conv(64, 64)
        + conv(64, 128) + conv(128, 128)
        + conv(128, 256) + 2 * conv(256, 256)
        + conv(256, 512) + 2 * conv(512, 512)
        + 3 * conv(512, 512)
    )
    assert expected == 14_723_136  # torchvision vgg16_bn().features
    assert sum(p.numel() for p in model.features.parameters()) == expected
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 13


def test_unknown_architecture_is_rejected() -> None:
    with pytest.raises(ValueError, match="resnet.*cnn, vgg16"):
        build_model("resnet", n_classes=80)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_checkpoint_round_trip_gives_identical_outputs(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(arch, n_classes=5, width=0.125)
    model.train()
    model(torch.randn(4, 3, 64, 64))  # moves the BN running statistics off their defaults
    model.eval()
    path = tmp_path / "model.pt"
    save_checkpoint(model, path, arch=arch, width=0.125, n_classes=5)
    loaded = load_checkpoint(path)
    assert not loaded.training
    x = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_loading_a_non_checkpoint_names_the_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pt"):
        load_checkpoint(text)
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(ValueError, match="tensor.pt"):
        load_checkpoint(tensor_only)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_flops_grow_with_width_squared(arch: str) -> None:
    narrow = flops_per_sample(build_model(arch, n_classes=80, width=0.125))
    wide = flops_per_sample(build_model(arch, n_classes=80, width=0.25))
    assert narrow > 0
    assert 3.5 < wide / narrow < 4.2


def test_cnn_flops_match_hand_count() -> None:
    """2 FLOPs per multiply-add of each conv at its resolution, plus the two dense layers."""
    model = build_model("cnn", n_classes=80)
    size, c_in, total = 128, 3, 0
    for c_out in (64, 128, 256, 512):
        total += 2 * size * size * 9 * (c_in * c_out + c_out * c_out)
        size, c_in = size // 2, c_out
    total += 2 * (1024 * 512 + 512 * 80)
    assert flops_per_sample(model) == total
    assert model.training  # the count leaves the mode as it found it


def _silence_half_the_channels(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Zero the BatchNorm scale and shift of a random half of each layer's channels (and of
    the pooled features those channels feed), so they add nothing to the output."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    last_conv_silent = None
    with torch.no_grad():
        for norm in norms:
            size = norm.num_features
            norm.running_mean.normal_(generator=generator)
            norm.running_var.uniform_(0.5, 2.0, generator=generator)
            norm.weight.uniform_(0.5, 1.5, generator=generator)
            norm.bias.normal_(generator=generator)
            if isinstance(norm, torch.nn.BatchNorm2d):
                silent = last_conv_silent = torch.randperm(size, generator=generator)[: size // 2]
            elif last_conv_silent is not None:  # the pooled features: average, then max
                silent = torch.cat([last_conv_silent, last_conv_silent + size // 2])
                last_conv_silent = None
            else:
                silent = torch.randperm(size, generator=generator)[: size // 2]
            norm.weight[silent] = 0.0
            norm.bias[silent] = 0.0


@pytest.mark.parametrize("arch", ["cnn", "vgg16"])
def test_slimming_keeps_the_channels_that_matter(arch: str) -> None:
    """A network whose dropped half of every layer is silent gives the same scores slimmed."""
    generator = torch.Generator().manual_seed(0)
    wide = build_model(arch, 7, 0.25).eval()
    _silence_half_the_channels(wide, generator)
    narrow = slimmed(wide, build_model(arch, 7, 0.125))
    x = torch.randn(2, 3, 128, 128, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(narrow(x), wide(x), rtol=1e-4, atol=1e-4)
    same = slimmed(wide, build_model(arch, 7, 0.25))
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(),
                                                 wide.state_dict().values()))
    with pytest.raises(ValueError, match="wider than the network"):
        slimmed(build_model(arch, 7, 0.125), build_model(arch, 7, 0.25))
