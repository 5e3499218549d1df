"""VGG-16 with batch normalisation (configuration "D"), trained from scratch on 128x128x3
log-mel images, ending in CNN-model-1's pooled multi-label head."""
from __future__ import annotations

import torch
from torch import nn

from fat_mlflow.engine.models.cnn import conv_bn_relu, init_weights, pooled_head, scaled

VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


class VGG16BN(nn.Module):
    """Thirteen 3x3 conv-BN-ReLU layers in five max-pooled stages, then the pooled head."""

    def __init__(self, n_classes: int, width: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for item in VGG16_CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                current = scaled(int(item), width)
                layers += conv_bn_relu(previous, current)
                previous = current
        self.features = nn.Sequential(*layers)
        self.head = pooled_head(previous, n_classes, width)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
