"""Network factory, checkpoints and cost figures for the two architectures of the seed."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fat_mlflow.engine.models.cnn import CNNModel1
from fat_mlflow.engine.models.vgg import VGG16BN

ARCHITECTURES = ("cnn", "vgg16")
_BUILDERS: dict[str, type[nn.Module]] = {"cnn": CNNModel1, "vgg16": VGG16BN}
_CHECKPOINT_KEYS = {"arch", "width", "n_classes", "state_dict"}


def build_model(arch: str, n_classes: int, width: float = 1.0) -> nn.Module:
    """A freshly initialised network: "cnn" (CNN-model-1) or "vgg16" (VGG-16-BN)."""
    if arch not in _BUILDERS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    return _BUILDERS[arch](n_classes=n_classes, width=width)


def save_checkpoint(
    model: nn.Module, path: str | Path, *, arch: str, width: float, n_classes: int
) -> None:
    """Weights plus what `build_model` needs to rebuild the network, in one file."""
    payload = {
        "arch": arch,
        "width": width,
        "n_classes": n_classes,
        "state_dict": model.state_dict(),
    }
    torch.save(payload, Path(path))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the network a checkpoint describes, load its weights, and set eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise ValueError(f"{path} is not a fat_mlflow checkpoint: {error}") from error
    if not isinstance(payload, dict) or not _CHECKPOINT_KEYS <= payload.keys():
        raise ValueError(
            f"{path} is not a fat_mlflow checkpoint: expected a dict with keys "
            f"{sorted(_CHECKPOINT_KEYS)}"
        )
    model = build_model(payload["arch"], payload["n_classes"], payload["width"])
    model.load_state_dict(payload["state_dict"])
    return model.to(map_location).eval()


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (BN running statistics are buffers and do not count)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flops_per_sample(model: nn.Module, input_shape: tuple[int, ...] = (3, 128, 128)) -> int:
    """Forward FLOPs of one input (torch's counter: 2 per multiply-add of convs and matmuls)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
