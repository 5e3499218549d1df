"""One process at a time on a shared resource (a folder being built, a store being created).

The lock file lives in the temp folder, keyed by the resource's resolved path, so the resource's
own folder stays clean and a lock never needs the folder to exist yet.
"""
from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from filelock import FileLock, Timeout


def lock_path(resource: Path | str) -> Path:
    """The lock file of `resource`, shared by every process that names the same path."""
    digest = hashlib.sha1(str(Path(resource).resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"fat-mlflow-{digest}.lock"


@contextmanager
def exclusive(resource: Path | str, doing: str) -> Iterator[None]:
    """Hold `resource`'s lock; a process that has to wait says for what (`doing`)."""
    lock = FileLock(lock_path(resource))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        click.echo(f"waiting for another process that is {doing} ({resource})", err=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
