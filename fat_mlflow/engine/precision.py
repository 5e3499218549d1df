"""Number format and memory layout of the networks, chosen per device at run time.

bfloat16 autocast pays where the hardware has bf16 matrix units: NVIDIA GPUs, and CPUs with
AMX-BF16 or AVX512-BF16, whose oneDNN kernels run a bf16 matmul about six times faster than a
float32 one on our 2-core machines. Elsewhere bf16 is emulated and slower than float32, so
`train.amp` means "bf16 where it is fast", never "bf16 at any price".

channels_last (NHWC) speeds up oneDNN and cuDNN convolutions, but on the CPU it slows the
thin first layers of a narrow network (width 0.125: 8 channels). It is therefore set per
convolution: a layer goes NHWC when it has enough output channels, and once one layer's output
is NHWC the layers after it (wider still, in both networks) keep that layout. Scoring has no
backward pass and folds each BatchNorm into its convolution (`prepare_for_scoring`); there
NHWC wins from the first convolution on.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

# Measured on a 2-core AMX CPU (CNN-model-1 training step, batch 32): NHWC from 16 output
# channels on beats both all-NCHW and all-NHWC at widths 0.125-1, in bf16 and in float32.
CPU_CHANNELS_LAST_MIN_CHANNELS = 16
# Measured on the same CPU for scoring (eval mode, BatchNorm folded, batch of 4 windows): NHWC
# runs the 8-channel first block faster too (bf16 conv 0.85 vs 1.29 ms, average pool 0.48 vs
# 1.05 ms), so a scoring model is NHWC throughout.
CPU_SCORING_CHANNELS_LAST_MIN_CHANNELS = 1


@dataclass(frozen=True)
class Precision:
    """How the networks run on `device`; `reason` says why, for the run's record."""

    device: torch.device
    bfloat16: bool
    channels_last: bool
    reason: str

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bfloat16)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move `model` to the device and give each convolution its memory layout (in place)."""
        return self._place(model, CPU_CHANNELS_LAST_MIN_CHANNELS)

    def prepare_for_scoring(self, model: nn.Module) -> nn.Module:
        """A copy of `model` that only scores: eval mode, each BatchNorm folded into the
        convolution before it (torch's fx `fuse`: one pass over the activations less per
        layer, the same scores up to float rounding), then placed like `prepare`, with
        channels_last from the first convolution on. `model` itself is left as it was."""
        fused = fuse(copy.deepcopy(model).eval(), inplace=True).eval()  # a new root module
        return self._place(fused, CPU_SCORING_CHANNELS_LAST_MIN_CHANNELS)

    def _place(self, model: nn.Module, cpu_min_channels: int) -> nn.Module:
        model.to(self.device)
        if self.channels_last:
            minimum = cpu_min_channels if self.device.type == "cpu" else 1
            for layer in model.modules():
                if isinstance(layer, nn.Conv2d) and layer.out_channels >= minimum:
                    layer.to(memory_format=torch.channels_last)
        return model

    def describe(self) -> dict[str, str]:
        """The tags a run records: what was used and why."""
        return {"fat.precision": "bfloat16" if self.bfloat16 else "float32",
                "fat.channels_last": str(self.channels_last).lower(),
                "fat.precision_reason": self.reason}


def bf16_units(device: torch.device) -> str | None:
    """The bf16 matrix units of `device` by name, or None when bf16 would be emulated."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            major, minor = torch.cuda.get_device_capability(device)
            return f"CUDA compute capability {major}.{minor}"
        return None
    if device.type == "cpu":
        # torch's own CPU feature probes (the same ones oneDNN's bf16 kernels depend on)
        if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
            return "AMX-BF16"
        if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
            return "AVX512-BF16"
    return None


def resolve_precision(device: torch.device, amp: bool = True,
                      channels_last: bool = True) -> Precision:
    """bf16 autocast when `amp` is on and `device` has bf16 units; NHWC when asked for."""
    units = bf16_units(device)
    if not amp:
        bfloat16, why = False, "float32: amp is switched off"
    elif units is None:
        bfloat16, why = False, f"float32: this {device.type.upper()} has no bf16 matrix units"
    else:
        bfloat16, why = True, f"bfloat16 autocast: this {device.type.upper()} has {units}"
    layout = "channels_last" if channels_last else "contiguous (NCHW)"
    return Precision(device, bfloat16, channels_last, f"{why}; {layout}")
