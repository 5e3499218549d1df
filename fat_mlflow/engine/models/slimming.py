"""A trained network cut down to a narrower one of the same kind, keeping its strongest channels.

"Network slimming" (Liu et al., 2017): each BatchNorm's scale says how much its channel
contributes, so the channels with the largest |scale| are kept, with the weights that produce
and read them. A distilled student that starts from the teacher's slimmed weights starts from
what the teacher learnt instead of from noise; a few epochs of distillation then repair what
the cut removed. Both networks of the seed are a chain of conv-BN-ReLU units and the pooled
head (concat of average and max pool, BN, Linear, BN, Linear), which is all this needs.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_WEIGHTED = (nn.Conv2d, nn.Linear, _BatchNorm)


def slimmed(trained: nn.Module, narrow: nn.Module) -> nn.Module:
    """`narrow` (a fresh network of the same architecture, at most as wide) holding the
    strongest channels of `trained`; returned in `trained`'s train/eval mode."""
    wide_layers, narrow_layers = _weighted_layers(trained), _weighted_layers(narrow)
    if [type(w) for w in wide_layers] != [type(n) for n in narrow_layers]:
        raise ValueError("slimming needs two networks of the same architecture")
    first = wide_layers[0]
    keep = torch.arange(first.weight.shape[1])  # the input channels all stay
    with torch.no_grad():
        for index, (wide, small) in enumerate(zip(wide_layers, narrow_layers)):
            if isinstance(wide, _BatchNorm):
                if wide.num_features == 2 * _producer_size(wide_layers, index):  # concat pool
                    keep = torch.cat([keep, keep + wide.num_features // 2])
                _copy_batchnorm(wide, small, keep)
                continue
            following = wide_layers[index + 1] if index + 1 < len(wide_layers) else None
            if isinstance(following, _BatchNorm):
                out = strongest_channels(following.weight, small.weight.shape[0])
            elif small.weight.shape[0] == wide.weight.shape[0]:
                out = torch.arange(wide.weight.shape[0])  # the class logits
            else:
                raise ValueError(f"{type(wide).__name__} {index}: no BatchNorm to rank its "
                                 "channels by")
            small.weight.copy_(wide.weight[out][:, keep])
            small.bias.copy_(wide.bias[out])
            keep = out
    return narrow.train(trained.training)


def strongest_channels(scale: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (ascending) of the `count` channels with the largest |BatchNorm scale|."""
    if count > scale.numel():
        raise ValueError(f"cannot keep {count} of {scale.numel()} channels: the student is "
                         "wider than the network it is cut from")
    return torch.sort(torch.topk(scale.abs(), count).indices).values


def _weighted_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _WEIGHTED)]


def _producer_size(layers: list[nn.Module], index: int) -> int:
    """Output channels of the last convolution or linear layer before `layers[index]`."""
    producer = next(m for m in reversed(layers[:index]) if not isinstance(m, _BatchNorm))
    return producer.weight.shape[0]


def _copy_batchnorm(wide: _BatchNorm, small: _BatchNorm, keep: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(small, name).copy_(getattr(wide, name)[keep])
    small.num_batches_tracked.copy_(wide.num_batches_tracked)
