"""What a feature-cache root holds, and removing what is no longer used (`fat-mlflow cache`).

Each feature setting has its own store (`logmel-<key>/`, ~12 GB for FAT2019 at the default
hop, ~24 GB at hop 347); entries are keyed by the audio's content, so moving the data adds
nothing, but a store of settings no longer trained keeps its size until it is removed. The
rule: `--prune` removes the folders of the old one-file-per-clip format (`<key>/` with .npy
files, which this version never reads) and the stores not used (computed into or checked by
a stage) for `--unused-days` days.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from fat_mlflow.data.features import STORE_PREFIX
from fat_mlflow.data.store import FeatureStore

OLD_FORMAT = re.compile(r"^[0-9a-f]{12}$")  # the per-clip .npy folders of earlier versions
DAY_SECONDS = 86_400


@dataclass(frozen=True)
class CacheFolder:
    path: Path
    kind: str  # "store" or "old format"
    settings: str  # the feature settings, in short
    entries: int
    bytes: int
    idle_days: float  # since last used (a store) or last written (old format)


def cache_folders(root: Path) -> list[CacheFolder]:
    """The feature stores and old-format folders under `root`, largest first."""
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name.startswith(STORE_PREFIX) and folder.is_dir():
            store = FeatureStore(folder)
            used = folder / "last_used"
            found.append(CacheFolder(folder, "store", _settings(folder), len(store.digests()),
                                     store.disk_bytes(), _idle_days(used if used.exists()
                                                                    else folder)))
        elif OLD_FORMAT.match(folder.name) and (folder / "params.json").is_file():
            files = list(folder.glob("*.npy"))
            found.append(CacheFolder(folder, "old format", _settings(folder), len(files),
                                     sum(f.stat().st_size for f in files), _idle_days(folder)))
    return sorted(found, key=lambda entry: -entry.bytes)


def stale(folders: list[CacheFolder], unused_days: float) -> list[CacheFolder]:
    """What `--prune` removes: old-format folders, and stores idle for `unused_days` days."""
    return [f for f in folders if f.kind == "old format" or f.idle_days >= unused_days]


def remove(folders: list[CacheFolder]) -> int:
    """Delete the folders; returns the bytes freed."""
    for folder in folders:
        shutil.rmtree(folder.path)
    return sum(folder.bytes for folder in folders)


def _settings(folder: Path) -> str:
    try:
        params = json.loads((folder / "params.json").read_text())
    except (OSError, ValueError):
        return "?"
    return (f"{params.get('sample_rate')} Hz, {params.get('n_mels')} mels, hop "
            f"{params.get('hop_length')}, n_fft {params.get('n_fft')}")


def _idle_days(path: Path) -> float:
    return (time.time() - path.stat().st_mtime) / DAY_SECONDS
