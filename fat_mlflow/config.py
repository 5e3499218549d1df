"""All tunable numbers of the pipeline, in one typed place, with named profiles.

`paper` reproduces the seed's settings; `quick` shrinks the network and the schedule so
the demo pipeline runs on a 2-core laptop. Everything else in the package takes these
dataclasses instead of loose numbers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from typing import Any

# Settings that say where and how fast training runs, not what it trains.
RUNTIME_SETTINGS = frozenset({"train.device", "train.num_threads"})


@dataclass(frozen=True)
class FeatureConfig:
    """Log-mel preprocessing of the seed (implementation notes, "Preprocessing")."""

    sample_rate: int = 44_100
    n_mels: int = 128
    n_fft: int = 2560
    hop_length: int = 694  # notebooks: 347 * 2; the README's 347 is an option
    fmin: float = 20.0
    fmax: float = 22_050.0
    top_db: float = 60.0  # silence trim threshold
    min_frames: int = 128  # clips are padded to at least one window

    def cache_key(self) -> str:
        """Stable short hash: a different parameter gives a different cache folder."""
        payload = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class AugmentConfig:
    """Batch augmentations; each can be switched off on its own (ablations)."""

    mixup: bool = True
    mixup_alpha: float = 0.4
    specmix: bool = True
    specmix_max_fraction: float = 0.25  # band sizes uniform in [0, 25%] of each axis
    zoom: bool = True
    zoom_max: float = 1.05
    zoom_prob: float = 0.75
    lighting: bool = True
    lighting_max: float = 0.2  # brightness and contrast change
    lighting_prob: float = 0.75


@dataclass(frozen=True)
class TrainConfig:
    """Network, optimisation and cross-validation of one stage."""

    arch: str = "cnn"  # "cnn" (CNN-model-1) or "vgg16" (VGG-16-BN)
    width: float = 1.0  # channel multiplier; 1 is the paper's network
    n_folds: int = 10
    epochs: int = 80
    batch_size: int = 128
    lr: float = 3e-3  # peak learning rate of the one-cycle schedule
    weight_decay: float = 0.0
    crop_frames: int = 128  # training crops and inference windows
    window_step: int = 48  # sliding-window step at inference (and for OOF predictions)
    val_every: int = 1  # validate (centre window of each held-out clip) every n-th epoch and
    # after the last one: only the curve uses it, the fold keeps its last epoch's model
    eval_batch_size: int = 256
    seed: int = 42
    device: str = "auto"  # "auto", "cpu" or "cuda"
    amp: bool = True  # bfloat16 autocast where the device has bf16 units (GPU, AMX/AVX512-BF16 CPU)
    channels_last: bool = True  # NHWC convolutions (on the CPU from 16 channels on: precision.py)
    num_threads: int = 0  # 0: torch's default


@dataclass(frozen=True)
class DemoConfig:
    """How the demo dataset is cut from the ESC-50 clips (fat_mlflow.data.demo).

    Only classes with enough recordings take part: 29 of the 50 classes in this project's copy
    have 8-10 clips, about 3 curated clips each, too few for any network to learn them (the
    issue-18 study, docs/study). The 21 classes with 32 clips give 13 curated clips per class.
    """

    min_clips_per_class: int = 30  # classes with fewer clips in the source are left out
    curated_share: float = 0.4  # of each class's clips (whole recordings): curated / noisy / test
    noisy_share: float = 0.3
    test_share: float = 0.3
    curated_per_class: int = 0  # > 0: keep at most this many curated clips per class (the
    # study's data axis; the noisy and test sets stay the same); 0: all

    def __post_init__(self) -> None:
        shares = (self.curated_share, self.noisy_share, self.test_share)
        if min(shares) <= 0 or abs(sum(shares) - 1) > 1e-9:
            raise ValueError(f"the demo's split shares must be positive and sum to 1, got "
                             f"{shares}")
        if self.min_clips_per_class < 1 or self.curated_per_class < 0:
            raise ValueError("min_clips_per_class must be >= 1 and curated_per_class >= 0")

    def split_shares(self) -> dict[str, float]:
        return {"curated": self.curated_share, "noisy": self.noisy_share,
                "test": self.test_share}


@dataclass(frozen=True)
class RehearsalConfig:
    """FAT2019 at its real size and shape, cut from the ESC-50 clips (fat_mlflow.rehearsal).

    FAT2019: 80 classes, 4,970 curated clips of 0.3-30 s (10.5 h), 19,815 noisy clips mostly
    15 s long (80 h), about 4,500 test clips; about 1.2 labels a clip. The 49 ESC-50 classes
    with at least two source recordings (one for test, the rest for training) are classes as
    they are; the others are fixed pairs of them heard together.
    """

    n_classes: int = 80
    n_curated: int = 4_970
    n_noisy: int = 19_815
    n_test: int = 4_500
    median_seconds: float = 5.0  # curated and test: log-normal durations, clipped
    seconds_sigma: float = 0.9  # (mean about 7.5 s: FAT2019 curated's 10.5 h / 4,970 clips)
    min_seconds: float = 0.3
    max_seconds: float = 30.0
    noisy_seconds: float = 15.0
    noisy_full_share: float = 0.9  # noisy clips of exactly noisy_seconds; the rest shorter
    second_label_share: float = 0.15  # clips with two labels (two classes mixed)
    noisy_clean_share: float = 0.5  # noisy clips whose labels are right (noise_truth.csv)
    test_recording_share: float = 0.25  # of each class's clips, by whole source recording
    min_recordings: int = 2  # an ESC-50 class needs a test and a training recording
    sources_per_class: int = 0  # > 0: at most this many ESC-50 clips per class and split
    # (builds a scaled rehearsal in seconds: fewer clips to decode)

    def __post_init__(self) -> None:
        if min(self.n_curated, self.n_noisy, self.n_test) < 1 or self.n_classes < 2:
            raise ValueError("a rehearsal needs clips in every split and two classes or more")
        if not 0 < self.min_seconds <= self.max_seconds:
            raise ValueError("rehearsal durations: need 0 < min_seconds <= max_seconds")


@dataclass(frozen=True)
class ServingConfig:
    """Per-clip limits of the served model: one huge upload must not exhaust the server.

    A clip over a limit becomes an error row; the rest of its batch is still scored.
    """

    max_clip_bytes: int = 50_000_000  # encoded audio, i.e. the file or the decoded base64
    max_clip_seconds: float = 600.0  # 10 minutes of audio
    batch_clips: int = 16  # clips per request when the CLI scores a folder
    # BLAS threads of a request's log-mels (0: the library's default, one per core). One is
    # faster: the mel products are small, and idle BLAS threads spin on the cores the
    # networks run on next (log-mel + scoring of one clip by 9 fold models, 2 threads on a
    # busy 2-core machine: 134 -> 68 ms; docs/benchmarks.md).
    log_mel_blas_threads: int = 1


@dataclass(frozen=True)
class DistillConfig:
    """The student that `distill` trains on the ensemble's soft scores (docs/distill.md).

    Each window of the curated, noisy and test clips (`teacher_step` apart) is one training
    sample; its target is the ensemble's score, blended on curated windows with the label:
    label_weight * label + (1 - label_weight) * teacher (BCE is linear in its target, so this
    is the weighted sum of the two losses). The student scores a served clip every
    `window_step` frames (0: as the ensemble does), plus, with `cover_end`, one window at the
    clip's end, so a long step saves windows without leaving the clip's tail unheard.
    """

    # defaults from docs/distill.md's tuning on the demo (seed-42 teacher, 2 cores): within
    # 0.01 of the ensemble at ~13 % of the main job's time
    arch: str = "cnn"
    width: float = 0.25
    epochs: int = 2
    batch_size: int = 32
    lr: float = 3e-4  # a warm-started student: 1e-3 forgets its start (gap 0.04)
    label_weight: float = 0.5
    teacher_step: int = 128  # windows the teacher scores: its cost, the step's main one
    window_step: int = 192  # 0: the ensemble's (the seed's 48); with cover_end a 5-s clip is 2
    cover_end: bool = True  # teacher and served windows: one more, aligned with the clip's end
    warm_start: bool = True  # start from the ensemble's last fold model, slimmed to `width`
    with_noisy: bool = True
    with_test: bool = True  # the test clips' windows, unlabelled (transductive)
    seed: int = 42

    def override(self, overrides: dict[str, Any]) -> DistillConfig:
        """`distill.field=value` (or `field=value`) overrides, coerced to the field's type."""
        known = {f.name: f for f in fields(self)}
        values = {}
        for dotted, raw in overrides.items():
            name = dotted.removeprefix("distill.")
            if name not in known:
                raise ValueError(f"unknown setting {dotted!r}; distill has: "
                                 f"{', '.join(sorted(known))}")
            values[name] = _coerce(raw, type(getattr(self, name)), dotted)
        return replace(self, **values)

    def flat(self) -> dict[str, Any]:
        return {f"distill.{key}": value for key, value in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Profile:
    name: str
    features: FeatureConfig = field(default_factory=FeatureConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def flat(self) -> dict[str, Any]:
        """Dotted-name view, the form logged as MLflow params and accepted as overrides."""
        out: dict[str, Any] = {"profile": self.name}
        for section in ("features", "augment", "train"):
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                out[f"{section}.{key}"] = value
        return out

    def settings(self) -> dict[str, Any]:
        """`flat()` without the settings that only say where and how fast it trains: what
        makes two runs interchangeable (a rerun with other threads reuses finished work)."""
        return {key: value for key, value in self.flat().items() if key not in RUNTIME_SETTINGS}

    def override(self, overrides: dict[str, Any]) -> Profile:
        """Apply `section.field=value` overrides (strings are coerced to the field's type)."""
        sections = {s: getattr(self, s) for s in ("features", "augment", "train")}
        for dotted, raw in overrides.items():
            section, _, name = dotted.partition(".")
            if section not in sections or not name:
                raise ValueError(
                    f"unknown setting {dotted!r}: use section.field with section in "
                    f"{sorted(sections)}"
                )
            target = sections[section]
            known = {f.name: f for f in fields(target)}
            if name not in known:
                raise ValueError(
                    f"unknown setting {dotted!r}; {section} has: {', '.join(sorted(known))}"
                )
            value = _coerce(raw, type(getattr(target, name)), dotted)
            sections[section] = replace(target, **{name: value})
        return replace(self, **sections)


def parse_bool(raw: Any, name: str) -> bool:
    """A switch given as a bool or as text (true/false, yes/no, on/off, 1/0)."""
    if isinstance(raw, bool):
        return raw
    lowered = str(raw).strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{name}: expected a boolean, got {raw!r}")


def _coerce(raw: Any, kind: type, name: str) -> Any:
    if kind is bool:
        return parse_bool(raw, name)
    if not isinstance(raw, str):
        return kind(raw)
    try:
        return kind(raw)
    except ValueError as error:
        raise ValueError(f"{name}: expected {kind.__name__}, got {raw!r}") from error


@dataclass(frozen=True)
class StudyGrid:
    """The points `fat-mlflow study` trains unless told otherwise (docs/study)."""

    budgets: tuple[tuple[float, int], ...] = (
        (0.125, 16), (0.125, 32), (0.25, 8), (0.25, 16), (0.25, 32))  # width x epochs per fold
    curated_per_class: tuple[int, ...] = (3, 6, 9, 0)  # 0: every curated clip of the demo

    def budgets_text(self) -> str:
        """The form `--budgets` takes."""
        return ",".join(f"{width:g}x{epochs}" for width, epochs in self.budgets)


@dataclass(frozen=True)
class Ablation:
    """One variant of the pipeline that `fat-mlflow ablations` compares with the profile."""

    name: str
    description: str
    overrides: dict[str, str] = field(default_factory=dict)
    warm_start: bool = True


ABLATIONS: dict[str, Ablation] = {a.name: a for a in (
    Ablation("default", "the profile as given"),
    Ablation("specmix", "SpecMix without mixup",
             {"augment.specmix": "true", "augment.mixup": "false"}),
    Ablation("specmix_mixup", "SpecMix + mixup (the seed's augmentation)",
             {"augment.specmix": "true", "augment.mixup": "true"}),
    Ablation("mixup", "mixup without SpecMix",
             {"augment.specmix": "false", "augment.mixup": "true"}),
    Ablation("no_mixing", "neither SpecMix nor mixup",
             {"augment.specmix": "false", "augment.mixup": "false"}),
    Ablation("no_warm_start", "every stage from scratch", warm_start=False),
    Ablation("float32", "float32 throughout (no bf16 autocast, no channels_last)",
             {"train.amp": "false", "train.channels_last": "false"}),
)}
# What `ablations` and `results` run without --only: what SpecMix and the warm-up do at the
# profile's budget (each is about one main job of CPU time per seed).
DEFAULT_ABLATIONS = ("default", "specmix", "no_warm_start")


PROFILES: dict[str, Profile] = {
    "paper": Profile(name="paper"),
    # The demo's budget (issue-18 study, docs/study): on ~13 curated clips per class a network of
    # width 0.25 needs ~32 epochs to pass the logistic floor, and mixup/SpecMix at this budget
    # cost more than they give (0.53 vs 0.69 test lwlrap at 16 epochs); bf16 pays for the width.
    # 64 mel bands at 40 epochs (issue 29, docs/speed.md "Fewer mel bands"): 0.64x the main job's
    # time of 128 bands at 32 epochs, and 0.802 +- 0.009 against 0.785 +- 0.004 over 3 seeds.
    "quick": Profile(
        name="quick",
        features=FeatureConfig(n_mels=64),
        augment=AugmentConfig(mixup=False, specmix=False),
        train=TrainConfig(
            width=0.25, n_folds=3, epochs=40, batch_size=16, lr=3e-3, eval_batch_size=128,
            val_every=8,
        ),
    ),
    # The full-size rehearsal (fat_mlflow.rehearsal) in a working session on a 2-core CPU:
    # every stage, the floor and the ensemble at the smallest budget that trains (docs/scale.md).
    "rehearsal": Profile(
        name="rehearsal",
        augment=AugmentConfig(mixup=False, specmix=False),
        train=TrainConfig(width=0.125, n_folds=2, epochs=1, batch_size=32, eval_batch_size=128),
    ),
    # A few seconds per stage: what the tests run.
    "tiny": Profile(
        name="tiny",
        train=TrainConfig(width=0.125, n_folds=2, epochs=2, batch_size=16, eval_batch_size=64),
    ),
}


def get_profile(name: str, overrides: dict[str, Any] | None = None) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    return PROFILES[name].override(overrides or {})


def parse_overrides(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """`["train.epochs=3", ...]` -> `{"train.epochs": "3"}` with a clear error on bad items."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} must look like section.field=value")
        out[key.strip()] = value.strip()
    return out
