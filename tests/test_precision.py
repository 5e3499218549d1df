"""bfloat16 autocast and channels_last on the CPU: when they are chosen, that a bf16 step
computes what a float32 step computes, to bf16's precision, on real log-mels, and that a
scoring copy (BatchNorm folded) scores what the model it was made from scores."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from fat_mlflow.config import AugmentConfig, FeatureConfig
from fat_mlflow.data.audio import load_audio
from fat_mlflow.data.features import log_mel
from fat_mlflow.engine.augment import build_batch_augment
from fat_mlflow.engine.dataset import training_batches
from fat_mlflow.engine.models import build_model
from fat_mlflow.engine.precision import (
    CPU_CHANNELS_LAST_MIN_CHANNELS,
    Precision,
    bf16_units,
    resolve_precision,
)
from fat_mlflow.engine.predict import predict_spectrograms
from fat_mlflow.engine.training import augmented_step

CPU = torch.device("cpu")
N_CLASSES = 10
# A bf16 matmul keeps 8 bits of mantissa (relative error ~0.4 % per product): after a whole
# network, scores and the loss agree to about a percent, and the output layer's gradient points
# the same way. Gradients deeper down drift further (measured at init, cosine to float32 per
# layer: CNN-model-1 0.98, VGG-16-BN 0.5-0.9); whether training still learns as well is the
# quality comparison over seeds in docs/results (ablation "float32").
SCORE_ATOL = 0.02
LOSS_RTOL = 0.01
OUTPUT_GRADIENT_COSINE = 0.98
# Folding BatchNorm into a convolution only reorders float32 arithmetic
FUSED_SCORE_ATOL = 1e-5


@pytest.fixture(scope="module")
def real_specs(esc50_dir):
    """Whole log-mels of 6 real ESC-50 clips: several inference windows each."""
    clips = sorted((esc50_dir / "audio").iterdir())[:6]
    features = FeatureConfig()
    return [log_mel(load_audio(path, features.sample_rate), features) for path in clips]


@pytest.fixture(scope="module")
def real_batch(esc50_dir, real_specs):
    """16 random 128-frame crops of real ESC-50 clips, with one-hot targets."""
    clips = sorted((esc50_dir / "audio").iterdir())[len(real_specs):16]
    features = FeatureConfig()
    specs = real_specs + [log_mel(load_audio(path, features.sample_rate), features)
                          for path in clips]
    targets = np.eye(N_CLASSES, dtype=np.float32)[np.arange(len(specs)) % N_CLASSES]
    return next(training_batches(specs, targets, len(specs), 128, np.random.default_rng(0)))


def test_float32_when_amp_is_off_or_the_cpu_lacks_bf16_units():
    off = resolve_precision(CPU, amp=False)
    assert not off.bfloat16 and "amp is switched off" in off.reason
    auto = resolve_precision(CPU, amp=True)
    assert auto.bfloat16 is (bf16_units(CPU) is not None)
    assert (bf16_units(CPU) or "no bf16 matrix units") in auto.reason
    assert auto.describe()["fat.precision"] == ("bfloat16" if auto.bfloat16 else "float32")


def test_channels_last_only_for_convolutions_wide_enough_to_gain():
    model = resolve_precision(CPU, channels_last=True).prepare(build_model("cnn", 10, 0.125))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    layouts = {conv.out_channels: conv.weight.is_contiguous(memory_format=torch.channels_last)
               and not conv.weight.is_contiguous() for conv in convs}
    assert layouts == {8: False, 16: True, 32: True, 64: True}
    assert min(c for c, nhwc in layouts.items() if nhwc) == CPU_CHANNELS_LAST_MIN_CHANNELS
    plain = resolve_precision(CPU, channels_last=False).prepare(build_model("cnn", 10, 0.125))
    assert all(m.weight.is_contiguous() for m in plain.modules() if isinstance(m, nn.Conv2d))


def _step(precision: Precision, model: nn.Module, batch) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Scores before the step, the step's loss and the output layer's weight gradient."""
    inputs, targets = batch
    precision.prepare(model)
    model.eval()
    with torch.no_grad(), precision.autocast():
        scores = torch.sigmoid(model(inputs).float())
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # keep the weights: compare grads
    no_augment = build_batch_augment(AugmentConfig(mixup=False, specmix=False, zoom=False,
                                                   lighting=False))
    torch.manual_seed(1)  # the same dropout masks in both steps
    loss = augmented_step(model, inputs, targets, no_augment, torch.Generator().manual_seed(0),
                          optimizer, nn.BCEWithLogitsLoss(), precision)
    output_layer = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return scores, loss, output_layer.weight.grad.flatten()


@pytest.mark.parametrize("arch", ["cnn", "vgg16"])
def test_a_bf16_step_agrees_with_a_float32_step_on_the_same_batch(real_batch, arch):
    torch.manual_seed(0)
    model = build_model(arch, N_CLASSES, 0.25)
    bf16 = Precision(CPU, bfloat16=True, channels_last=True, reason="test")
    fp32 = Precision(CPU, bfloat16=False, channels_last=False, reason="test")
    scores16, loss16, grad16 = _step(bf16, copy.deepcopy(model), real_batch)
    scores32, loss32, grad32 = _step(fp32, copy.deepcopy(model), real_batch)
    assert (scores16 - scores32).abs().max() < SCORE_ATOL
    assert loss16 == pytest.approx(loss32, rel=LOSS_RTOL)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > OUTPUT_GRADIENT_COSINE


@pytest.mark.parametrize("arch", ["cnn", "vgg16"])
def test_a_scoring_copy_scores_what_its_model_scores(real_batch, real_specs, arch):
    torch.manual_seed(0)
    model = build_model(arch, N_CLASSES, 0.25)
    with torch.no_grad():  # BatchNorm statistics of real batches, not the identity of a new one
        for _ in range(3):
            model(real_batch[0])
    model.eval()
    fp32 = Precision(CPU, bfloat16=False, channels_last=False, reason="test")
    scoring = fp32.prepare_for_scoring(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in scoring.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the model is kept
    fused = predict_spectrograms([scoring], real_specs, 128, 48, precision=fp32)
    unfused = predict_spectrograms([fp32.prepare(model)], real_specs, 128, 48, precision=fp32)
    np.testing.assert_allclose(fused, unfused, atol=FUSED_SCORE_ATOL, rtol=0)

    bf16 = Precision(CPU, bfloat16=True, channels_last=True, reason="test")
    served = bf16.prepare_for_scoring(model)
    convs = [m for m in served.modules() if isinstance(m, nn.Conv2d)]
    assert all(conv.weight.is_contiguous(memory_format=torch.channels_last) for conv in convs)
    served_scores = predict_spectrograms([served], real_specs, 128, 48, precision=bf16)
    assert np.abs(served_scores - unfused).max() < SCORE_ATOL
