"""Wall time of a job's phases, summed per phase: where a stage's time goes.

A stage records how long its training steps, validation, scoring, logging and loading took
(`time_*_s` metrics), so a report can show what share of it is not training.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

TRAINING_PHASE = "train_steps"  # the optimiser steps; every other phase is overhead


class PhaseClock:
    """Seconds per phase name, summed over every time the phase ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)


def non_training_share(seconds: dict[str, float]) -> float:
    """The share of the recorded time that is not a training step (NaN when none recorded)."""
    total = sum(seconds.values())
    return 1 - seconds.get(TRAINING_PHASE, 0.0) / total if total > 0 else float("nan")
