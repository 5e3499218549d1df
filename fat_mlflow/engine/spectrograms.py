"""The engine's view of a set of clips' log-mels: lengths known up front, frames read on demand.

FAT2019 has ~29k clips (~12 GB of log-mels): the engine never holds them all. It asks a
`ClipSpectrograms` for the frame count of a clip (from an index, no read), a crop of it
(one training crop or a row of inference windows) or the whole clip. The feature store
(`fat_mlflow.store.PackedSpectrograms`) reads those from disk; `SpectrogramList` serves
arrays already in memory (the tagger's request clips, tests, benchmarks). Subsets and
concatenations are cheap views over either.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ClipSpectrograms(Protocol):
    """Log-mel images of some clips, each (n_mels, frames), read as the engine needs them."""

    def __len__(self) -> int: ...

    def frames(self, index: int) -> int:
        """Frame count of clip `index`, without reading its spectrogram."""

    def crop(self, index: int, start: int, width: int) -> np.ndarray:
        """(n_mels, width) frames start..start+width of clip `index`."""

    def clip(self, index: int) -> np.ndarray:
        """The whole (n_mels, frames) spectrogram of clip `index`."""


class SpectrogramList:
    """Spectrograms already in memory, as a list of (n_mels, frames) arrays."""

    def __init__(self, specs: Sequence[np.ndarray]) -> None:
        self.specs = specs

    def __len__(self) -> int:
        return len(self.specs)

    def frames(self, index: int) -> int:
        return self.specs[index].shape[1]

    def crop(self, index: int, start: int, width: int) -> np.ndarray:
        return self.specs[index][:, start:start + width]

    def clip(self, index: int) -> np.ndarray:
        return self.specs[index]


class _View:
    """Clips of several sources picked by (source, clip) pairs: subsets and concatenations."""

    def __init__(self, sources: list[ClipSpectrograms], picks: np.ndarray) -> None:
        self.sources = sources
        self.picks = picks  # (n, 2): source number, clip index in that source

    def __len__(self) -> int:
        return len(self.picks)

    def _source(self, index: int) -> tuple[ClipSpectrograms, int]:
        source, clip = self.picks[index]
        return self.sources[source], int(clip)

    def frames(self, index: int) -> int:
        source, clip = self._source(index)
        return source.frames(clip)

    def crop(self, index: int, start: int, width: int) -> np.ndarray:
        source, clip = self._source(index)
        return source.crop(clip, start, width)

    def clip(self, index: int) -> np.ndarray:
        source, clip = self._source(index)
        return source.clip(clip)


class WindowSpectrograms:
    """Fixed windows of other clips, each seen as a clip of its own (`width` frames).

    Distillation learns from the teacher's windows: as a `ClipSpectrograms`, the windows go
    through the same training loop as clips (a crop of a window is the window itself).
    """

    def __init__(self, specs: ClipSpectrograms, clips: np.ndarray, starts: np.ndarray,
                 width: int) -> None:
        if len(clips) != len(starts):
            raise ValueError(f"{len(clips)} clip indices for {len(starts)} window starts")
        self.specs, self.clips, self.starts, self.width = specs, clips, starts, width

    def __len__(self) -> int:
        return len(self.clips)

    def frames(self, index: int) -> int:
        return self.width

    def crop(self, index: int, start: int, width: int) -> np.ndarray:
        if start < 0 or start + width > self.width:
            raise ValueError(f"crop {start}..{start + width} outside a window of {self.width}")
        return self.specs.crop(int(self.clips[index]), int(self.starts[index]) + start, width)

    def clip(self, index: int) -> np.ndarray:
        return self.crop(index, 0, self.width)


Spectrograms = ClipSpectrograms | Sequence[np.ndarray]  # what the engine's functions take


def as_spectrograms(specs: Spectrograms) -> ClipSpectrograms:
    """A `ClipSpectrograms` as it is; a list of arrays wrapped as one."""
    return specs if isinstance(specs, ClipSpectrograms) else SpectrogramList(specs)


def take(specs: Spectrograms, indices: np.ndarray) -> ClipSpectrograms:
    """The clips `indices` of `specs`, in that order (a view: nothing is read)."""
    return concat([specs], [np.asarray(indices, dtype=np.int64)])


def concat(parts: Sequence[Spectrograms],
           indices: Sequence[np.ndarray] | None = None) -> ClipSpectrograms:
    """The clips of every part one after the other (of each part only `indices`, if given)."""
    sources: list[ClipSpectrograms] = []
    picks: list[np.ndarray] = []
    for number, part in enumerate(parts):
        part = as_spectrograms(part)
        chosen = np.arange(len(part)) if indices is None else np.asarray(indices[number])
        if isinstance(part, _View):  # flatten: a view of a view reads its sources directly
            offset = len(sources)
            sources.extend(part.sources)
            picked = part.picks[chosen].copy()
            picked[:, 0] += offset
            picks.append(picked)
        else:
            sources.append(part)
            picks.append(np.stack([np.full(len(chosen), len(sources) - 1), chosen], axis=1))
    flat = np.concatenate(picks) if picks else np.zeros((0, 2), np.int64)
    return _View(sources, flat.astype(np.int64).reshape(-1, 2))
