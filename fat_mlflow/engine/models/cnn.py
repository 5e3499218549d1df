"""CNN-model-1 (Table 1 of the seed) and the building blocks VGG-16-BN shares with it."""
from __future__ import annotations

import torch
from torch import nn

CNN_CHANNELS = (64, 128, 256, 512)
HEAD_HIDDEN = 512


def scaled(channels: int, width: float) -> int:
    """Channel count under the width multiplier; width 1 keeps the paper's sizes."""
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    return max(1, round(channels * width))


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """3x3 Conv(stride 1, pad 1) - BN - ReLU, the unit of both networks."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class ConcatPool(nn.Module):
    """concat(AdaptiveAvgPool2d(1), AdaptiveMaxPool2d(1)) flattened: any input size works."""

    def __init__(self) -> None:
        super().__init__()
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.max = nn.AdaptiveMaxPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.avg(x), self.max(x)], dim=1).flatten(1)


def pooled_head(in_channels: int, n_classes: int, width: float) -> nn.Sequential:
    """Table 1's head: Flatten-(2C)-BN-Dropout 25%, Dense-512-ReLU-BN-Dropout 50%, Dense-K."""
    features = 2 * in_channels
    hidden = scaled(HEAD_HIDDEN, width)
    return nn.Sequential(
        ConcatPool(),
        nn.BatchNorm1d(features),
        nn.Dropout(0.25),
        nn.Linear(features, hidden),
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(hidden),
        nn.Dropout(0.5),
        nn.Linear(hidden, n_classes),
    )


def init_weights(model: nn.Module) -> None:
    """Kaiming (fan-out, ReLU) for convolutions: the networks are trained from scratch."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)


class CNNModel1(nn.Module):
    """Four blocks of [conv-BN-ReLU] x 2 + 2x2 average pool (the notebooks' pool), then the head.

    Input (B, 3, H, W) log-mel images (128 x 128 in the paper), output (B, n_classes) logits.
    """

    def __init__(self, n_classes: int, width: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for channels in CNN_CHANNELS:
            current = scaled(channels, width)
            layers += conv_bn_relu(previous, current) + conv_bn_relu(current, current)
            layers.append(nn.AvgPool2d(2))
            previous = current
        self.features = nn.Sequential(*layers)
        self.head = pooled_head(previous, n_classes, width)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
