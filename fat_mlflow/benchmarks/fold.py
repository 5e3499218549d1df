"""One fold of a stage on precomputed log-mels, on any device, without MLflow or librosa.

The GPU check: `pack` (run where the feature cache lives) writes one split's log-mels,
targets and fold assignment (the noisy set: stage 1; the curated set: stage 2 from scratch),
optionally with the test set, into one .npz; `run` trains one fold from it with a profile
(the paper's by default) and prints epoch time, samples/s and, with a packed test set, the
fold model's test lwlrap; `compare` trains the same small configuration on the CPU and on the
GPU, with and without bfloat16, and reports how far their scores drift apart. The training
is the pipeline's own engine (`run_cross_validation`), with the fold results kept in memory
instead of an MLflow run.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fat_mlflow.config import Profile, get_profile, parse_overrides
from fat_mlflow.engine.crossval import ClipSet, FoldResult, run_cross_validation
from fat_mlflow.engine.metrics import lwlrap
from fat_mlflow.engine.models import build_model, flops_per_sample
from fat_mlflow.engine.precision import resolve_precision
from fat_mlflow.engine.predict import predict_spectrograms
from fat_mlflow.engine.training import EpochLog, resolve_device, training_precision


@dataclass
class MemoryFoldStore:
    """FoldStore that keeps everything in memory: no tracking on the benchmark machine."""

    epochs: list[EpochLog] = field(default_factory=list)
    folds: dict[int, FoldResult] = field(default_factory=dict)
    models: dict[int, nn.Module] = field(default_factory=dict)

    def finished_folds(self) -> dict[int, FoldResult]:
        return dict(self.folds)

    def log_epoch(self, fold: int, log: EpochLog) -> None:
        self.epochs.append(log)

    def save_fold(self, result: FoldResult, model: nn.Module) -> None:
        self.folds[result.fold] = result
        self.models[result.fold] = model


@dataclass
class Packed:
    """What `pack` wrote: the training split with its folds, and the test set if packed."""

    train: ClipSet
    test: ClipSet | None
    vocabulary: list[str]
    n_folds: int


def pack(data: Path, out: Path, profile: Profile, cache_dir: Path | None,
         max_frames: int | None = None, split: str = "noisy", with_test: bool = False) -> None:
    """Log-mels (float16, concatenated along time) + targets of `split` (+ test) in one file.

    `max_frames` keeps the head of longer clips, to fit a size limit on the copy to a
    benchmark machine (training only ever sees random crops of `crop_frames` anyway).
    """
    from fat_mlflow.data.features import BadAudioError, FeatureCache
    from fat_mlflow.data.layout import load_dataset
    from fat_mlflow.engine.folds import stratified_folds

    dataset = load_dataset(data)
    frames = {"train": dataset.noisy if split == "noisy" else dataset.curated}
    if with_test:
        frames["test"] = dataset.test
    cache = FeatureCache(cache_dir, profile.features)
    arrays: dict = {"split": split, "vocabulary": np.array(dataset.vocabulary),
                    "n_folds": profile.train.n_folds}
    for part, frame in frames.items():
        failures = cache.compute(list(frame["path"]), progress=False).failures
        if failures:
            raise BadAudioError(failures)
        stored = cache.open(frame["path"])
        specs = [stored.clip(i)[:, :max_frames] for i in range(len(stored))]
        arrays[f"{part}_specs"] = np.concatenate(specs, axis=1).astype(np.float16)
        arrays[f"{part}_lengths"] = np.array([s.shape[1] for s in specs])
        arrays[f"{part}_targets"] = dataset.targets(frame)
    arrays["train_folds"] = stratified_folds(arrays["train_targets"], profile.train.n_folds,
                                             profile.train.seed)
    np.savez(out, **arrays)


def load_pack(path: Path) -> Packed:
    with np.load(path) as packed:
        def clip_set(part: str, folds: np.ndarray | None) -> ClipSet:
            bounds = np.cumsum(packed[f"{part}_lengths"])[:-1]
            specs = [s.astype(np.float32)
                     for s in np.split(packed[f"{part}_specs"], bounds, axis=1)]
            return ClipSet(str(packed["split"]) if part == "train" else part,
                           [f"{part}{i}" for i in range(len(specs))], specs,
                           packed[f"{part}_targets"].astype(np.float32),
                           folds if folds is not None else np.full(len(specs), -1))

        return Packed(clip_set("train", packed["train_folds"]),
                      clip_set("test", None) if "test_specs" in packed else None,
                      [str(v) for v in packed["vocabulary"]], int(packed["n_folds"]))


def train_one_fold(packed: Packed, profile: Profile, fold: int = 0) -> dict:
    """One fold from scratch on the packed split; timings and the fold model's scores."""
    cfg = profile.train
    clips, vocabulary = packed.train, packed.vocabulary
    store = MemoryFoldStore()
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = run_cross_validation(
        {clips.name: clips}, {clips.name: np.ones(len(clips.fnames), bool)}, packed.test,
        vocabulary,
        profile, lambda _: build_model(cfg.arch, len(vocabulary), cfg.width), store,
        progress=False, only_folds=[fold])
    seconds = time.perf_counter() - started
    steady = store.epochs[1:] or store.epochs  # epoch 0 pays for kernel selection
    model = build_model(cfg.arch, len(vocabulary), cfg.width)
    rate = float(np.median([e.samples_per_second for e in steady]))
    test_scores = store.folds[fold].test
    return {
        "split": clips.name, "seed": cfg.seed, "specmix": profile.augment.specmix,
        "mixup": profile.augment.mixup, "arch": cfg.arch, "width": cfg.width, "batch": cfg.batch_size, "epochs": cfg.epochs,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "amp": training_precision(cfg).bfloat16,
        "channels_last": cfg.channels_last,
        "train_clips": int((clips.folds != fold).sum()),
        "epoch_seconds_median": float(np.median([e.seconds for e in steady])),
        "samples_per_s": rate,
        "train_TFLOP_per_s": 3 * flops_per_sample(model) * rate / 1e12,
        "fold_seconds": seconds,
        "val_lwlrap_last_epoch": store.epochs[-1].val_lwlrap,
        "oof_lwlrap": result.lwlrap.get(clips.name, float("nan")),
        "test_lwlrap": (lwlrap(packed.test.targets, test_scores) if packed.test is not None
                        else float("nan")),
        "peak_memory_GiB": (torch.cuda.max_memory_allocated() / 2**30
                            if device.type == "cuda" else float("nan")),
        "scores": store.folds[fold].oof[clips.name],
        "model": store.models[fold],
    }


def compare_devices(packed: Packed, profile: Profile) -> list[dict]:
    """The same small run on the CPU, on the GPU in float32 and on the GPU in bfloat16."""
    variants = [("cpu", False), ("cuda", False), ("cuda", True)]
    runs = []
    for device, amp in variants:
        train = replace(profile.train, device=device, amp=amp)
        runs.append(train_one_fold(packed, replace(profile, train=train)))
    reference = runs[0]
    for run in runs:
        run["max_abs_score_diff_vs_cpu"] = float(np.abs(run["scores"] - reference["scores"]).max())
        run["oof_lwlrap_diff_vs_cpu"] = run["oof_lwlrap"] - reference["oof_lwlrap"]
    return [*runs, inference_agreement(reference["model"], packed.train, profile)]


def inference_agreement(model: nn.Module, clips: ClipSet, profile: Profile,
                        fold: int = 0) -> dict:
    """One trained model scoring the same clips on the CPU and on the GPU (float32, bfloat16):
    training drifts apart chaotically, inference must agree to rounding."""
    cfg = profile.train
    specs = clips.subset(clips.folds == fold).specs
    def score(device: str, amp: bool) -> np.ndarray:
        precision = resolve_precision(torch.device(device), amp, cfg.channels_last)
        return predict_spectrograms([precision.prepare_for_scoring(model)], specs,
                                    cfg.crop_frames, cfg.window_step, cfg.eval_batch_size,
                                    precision)

    scores = {(device, amp): score(device, amp)
              for device, amp in (("cpu", False), ("cuda", False), ("cuda", True))}
    cpu = scores[("cpu", False)]
    return {"check": "inference_agreement", "clips": len(specs),
            "max_abs_diff_gpu_fp32": float(np.abs(scores[("cuda", False)] - cpu).max()),
            "max_abs_diff_gpu_bf16": float(np.abs(scores[("cuda", True)] - cpu).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["pack", "run", "compare"])
    parser.add_argument("--pack", type=Path, default=Path("noisy_features.npz"),
                        help="the .npz written by `pack` and read by `run`/`compare`")
    parser.add_argument("--data", type=Path, help="dataset root (pack only)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--max-frames", type=int, default=None,
                        help="pack only: keep at most this many frames of each clip")
    parser.add_argument("--split", choices=["noisy", "curated"], default="noisy",
                        help="pack only: the set to train on (noisy = stage 1, curated = "
                             "stage 2 from scratch)")
    parser.add_argument("--with-test", action="store_true",
                        help="pack only: add the test set, so that `run` reports test lwlrap")
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--arch", default="cnn", help="cnn or vgg16")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[],
                        metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = parser.parse_args()
    overrides = {"train.arch": args.arch, **parse_overrides(args.overrides)}
    profile = get_profile(args.profile, overrides)
    if args.command == "pack":
        if args.data is None:
            parser.error("pack needs --data")
        pack(args.data, args.pack, profile, args.cache_dir, args.max_frames, args.split,
             args.with_test)
        print(f"wrote {args.pack} ({args.pack.stat().st_size / 2**20:.1f} MiB)")
        return
    packed = load_pack(args.pack)
    if packed.n_folds != profile.train.n_folds:
        profile = replace(profile, train=replace(profile.train, n_folds=packed.n_folds))
    runs = (compare_devices(packed, profile) if args.command == "compare"
            else [train_one_fold(packed, profile)])
    for run in runs:
        run.pop("scores", None)
        run.pop("model", None)
        line = json.dumps({"command": args.command, "profile": profile.name, **run})
        print(line)
        if args.out:
            with args.out.open("a") as handle:
                handle.write(line + "\n")


if __name__ == "__main__":
    main()
