"""Peak resident memory of one step of the pipeline, for the `peak_rss_mb` metric of its run.

The kernel keeps a process's high-water mark (VmHWM); writing "5" to /proc/self/clear_refs
resets it to the current size, so a step that resets it when it starts reads its own peak at
the end, even when it runs after a bigger step in the same process. Worker processes are
counted by their own peak (ru_maxrss of the waited-for children: the largest child so far,
which the kernel cannot reset). Where the reset is refused the peak counts from the process's
start (an upper bound); where /proc is missing (not Linux) only the children's figure is given.
"""
from __future__ import annotations

import resource
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
RESET_PEAK = "5"  # clear_refs: reset the peak RSS (VmHWM) to the current RSS


@dataclass
class PeakMemory:
    """What `peak_memory` measured, as MLflow metrics (`peak_rss_mb`, ...)."""

    prefix: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


def _status_kb(name: str) -> float | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(f"{name}:"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Reset this process's high-water mark; False where the kernel does not allow it."""
    try:
        CLEAR_REFS.write_text(RESET_PEAK)
    except OSError:
        return False
    return True


@contextmanager
def peak_memory(prefix: str = "") -> Iterator[PeakMemory]:
    """Measure the block's peak RSS: `<prefix>peak_rss_mb` (this process) and
    `<prefix>peak_rss_children_mb` (the largest worker process waited for, if any)."""
    measured = PeakMemory(prefix)
    reset_peak()
    yield measured
    peak = _status_kb("VmHWM")
    if peak is not None:
        measured.metrics[f"{prefix}peak_rss_mb"] = peak / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    if children:
        measured.metrics[f"{prefix}peak_rss_children_mb"] = children / 1024
