"""Local server processes: a free loopback port, waiting until one answers, stopping its group.

Shared by the serving benchmark (`mlflow models serve`) and the tests' throwaway servers
(PostgreSQL, `mlflow server`). Each server runs in its own process group
(`start_new_session=True`), so stopping it also stops the workers it forked.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


class ServerError(RuntimeError):
    """A server did not come up; the message ends with the tail of its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(log: Path | None, chars: int = 3000) -> str:
    if log is None or not log.exists():
        return "(no log)"
    return log.read_text(errors="replace")[-chars:]


def wait_until(ready: Callable[[], bool], process: subprocess.Popen, log: Path | None,
               what: str, timeout_s: float, error: type[ServerError] = ServerError) -> None:
    """Poll `ready` until it holds; fail fast with the log when the process dies or hangs."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None:
            raise error(f"{what} exited with code {process.returncode}:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise error(f"{what} not up after {timeout_s:.0f} s:\n{log_tail(log)}")
        time.sleep(0.3)


def stop_group(process: subprocess.Popen, sig: signal.Signals = signal.SIGTERM,
               grace_s: float = 30) -> None:
    """Send `sig` to the process group, then SIGKILL whatever is left of it after a grace time."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # a worker that outlived its parent
    process.wait()
