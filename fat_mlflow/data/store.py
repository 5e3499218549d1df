"""A folder of log-mels packed into a few large shard files, with an SQLite index.

Why packed: one file per clip held one open descriptor per clip while it was memory-mapped,
and FAT2019's 29k clips stopped stage 1 with "Too many open files". Here a spectrogram is
stored time-major (frames x n_mels, float32), so a training crop or a clip's inference
windows is ONE contiguous `os.pread`; a reader keeps one descriptor per shard (a handful),
and reads with pread, not mmap, so the pages it reads count in the page cache, not in the
process's resident memory.

Entries are keyed by a digest of the audio file's CONTENT: moving or re-extracting the
dataset finds every entry again (after re-hashing the files). A (path, size, mtime) ->
digest table spares that re-hashing while the files stay where they are.

Commit protocol: a writer appends to a shard it holds an exclusive `flock` on, fsyncs it,
and only then inserts the index rows, in one transaction. A killed writer leaves at most
unindexed bytes at a shard's end (never read); concurrent writers use different shards,
and an entry computed twice is indexed once.

Needs only numpy and the standard library: the GPU box reads a store without librosa.
"""
from __future__ import annotations

import fcntl
import os
import sqlite3
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np

INDEX_FILE = "index.sqlite"
SHARD_SUFFIX = ".f32"
SHARD_BYTES = 1 << 31  # a writer starts a new shard past 2 GiB
BUSY_TIMEOUT_S = 600.0  # concurrent writers wait for each other's short transactions
FLOAT_BYTES = 4
ENTRY_DTYPE = np.dtype([("shard", np.int32), ("offset", np.int64), ("frames", np.int64),
                        ("n_mels", np.int32)])
SCHEMA = """
CREATE TABLE IF NOT EXISTS clips (digest TEXT PRIMARY KEY, shard TEXT NOT NULL,
    offset INTEGER NOT NULL, frames INTEGER NOT NULL, n_mels INTEGER NOT NULL,
    seconds REAL NOT NULL);
CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, digest TEXT NOT NULL);
"""


class StoreError(RuntimeError):
    """The store on disk does not hold what its index says (a shard cut short or removed)."""


def connect(folder: Path) -> sqlite3.Connection:
    """The folder's index; waits for other writers instead of failing."""
    return sqlite3.connect(folder / INDEX_FILE, timeout=BUSY_TIMEOUT_S, isolation_level=None)


def _chunks(items: list, size: int = 500) -> Iterator[list]:
    """SQLite limits the parameters of one statement: ask in chunks."""
    for begin in range(0, len(items), size):
        yield items[begin:begin + size]


class FeatureStore:
    """The packed spectrograms of one folder (one feature setting)."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        with closing(connect(self.folder)) as db:
            db.executescript(SCHEMA)

    def known_files(self, stats: dict[str, os.stat_result]) -> dict[str, str]:
        """path -> digest of the files whose size and mtime are as when they were hashed."""
        found: dict[str, str] = {}
        with closing(connect(self.folder)) as db:
            for chunk in _chunks(list(stats)):
                rows = db.execute(f"SELECT path, size, mtime_ns, digest FROM files WHERE path IN "
                                  f"({','.join('?' * len(chunk))})", chunk).fetchall()
                found.update({path: digest for path, size, mtime, digest in rows
                              if (stats[path].st_size, stats[path].st_mtime_ns) == (size, mtime)})
        return found

    def stored(self, digests: Iterable[str]) -> set[str]:
        """The digests among `digests` that have an entry."""
        present: set[str] = set()
        with closing(connect(self.folder)) as db:
            for chunk in _chunks(list(set(digests))):
                present.update(row[0] for row in db.execute(
                    f"SELECT digest FROM clips WHERE digest IN ({','.join('?' * len(chunk))})",
                    chunk))
        return present

    def open(self, digests: list[str]) -> PackedSpectrograms:
        """The entries of `digests`, in that order; KeyError names the first one missing."""
        rows: dict[str, tuple] = {}
        with closing(connect(self.folder)) as db:
            for chunk in _chunks(list(set(digests))):
                rows.update((row[0], row[1:]) for row in db.execute(
                    f"SELECT digest, shard, offset, frames, n_mels FROM clips WHERE digest IN "
                    f"({','.join('?' * len(chunk))})", chunk))
        missing = [digest for digest in digests if digest not in rows]
        if missing:
            raise KeyError(missing[0])
        shards = sorted({rows[digest][0] for digest in digests})
        number = {name: i for i, name in enumerate(shards)}
        entries = np.array([(number[rows[d][0]], *rows[d][1:]) for d in digests],
                           dtype=ENTRY_DTYPE)
        return PackedSpectrograms(_ShardFiles([self.folder / name for name in shards]), entries)

    def digests(self) -> list[str]:
        """Every stored entry's digest, sorted (benchmarks and checks of a whole store)."""
        with closing(connect(self.folder)) as db:
            return [row[0] for row in db.execute("SELECT digest FROM clips ORDER BY digest")]

    def disk_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.folder.iterdir() if path.is_file())

    @contextmanager
    def writer(self, commit_every: int = 32) -> Iterator[StoreWriter]:
        """A writer holding one shard of its own, committing every `commit_every` index rows;
        what it appended is committed on exit, also when the caller stops with an exception
        (nothing computed is lost)."""
        writer = StoreWriter(self.folder, commit_every)
        try:
            yield writer
        finally:
            writer.close()


class StoreWriter:
    """Appends entries to a shard it holds alone; `commit` makes them durable, then visible."""

    def __init__(self, folder: Path, commit_every: int) -> None:
        self.folder = folder
        self.commit_every = commit_every
        self.db = connect(folder)
        self.shard, self.fd = self._claim_shard()
        self.clips: list[tuple] = []
        self.files: list[tuple] = []
        self.appended: set[str] = set()

    def _claim_shard(self) -> tuple[str, int]:
        """An existing shard under the size limit that no other writer holds, else a new one."""
        for path in sorted(self.folder.glob(f"*{SHARD_SUFFIX}")):
            if path.stat().st_size >= SHARD_BYTES:
                continue
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return path.name, fd
            except BlockingIOError:
                os.close(fd)
        name = f"shard-{uuid.uuid4().hex[:12]}{SHARD_SUFFIX}"
        fd = os.open(self.folder / name, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return name, fd

    def append(self, digest: str, spec: np.ndarray, seconds: float) -> int:
        """Write one (n_mels, frames) spectrogram; returns its bytes. Visible after `commit`."""
        data = np.ascontiguousarray(spec.T, dtype=np.float32).tobytes()
        offset = os.fstat(self.fd).st_size  # only this writer appends to its shard
        written = os.write(self.fd, data)
        if written != len(data):
            raise OSError(f"{self.folder / self.shard}: short write ({written} of {len(data)} "
                          "bytes); is the disk full?")
        self.clips.append((digest, self.shard, offset, spec.shape[1], spec.shape[0], seconds))
        self.appended.add(digest)
        self._commit_when_due()
        return len(data)

    def has(self, digest: str) -> bool:
        """Whether this writer appended that content already (two files, one content)."""
        return digest in self.appended

    def record_file(self, path: str, stat: os.stat_result, digest: str) -> None:
        """Remember which content `path` held (at this size and mtime)."""
        self.files.append((path, stat.st_size, stat.st_mtime_ns, digest))
        self._commit_when_due()

    def _commit_when_due(self) -> None:
        if len(self.clips) + len(self.files) >= self.commit_every:
            self.commit()

    def commit(self) -> None:
        """fsync the shard, then index its new entries and file digests in one transaction."""
        if not self.clips and not self.files:
            return
        os.fsync(self.fd)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany("INSERT OR IGNORE INTO clips VALUES (?, ?, ?, ?, ?, ?)",
                                self.clips)
            self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", self.files)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.clips, self.files = [], []

    def close(self) -> None:
        try:
            self.commit()
        finally:
            os.close(self.fd)  # releases the flock
            self.db.close()


class _ShardFiles:
    """One read-only descriptor per shard, opened on first use, closed with the last reader."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.fds: dict[int, int] = {}
        weakref.finalize(self, _close_all, self.fds)

    def fd(self, shard: int) -> int:
        if shard not in self.fds:
            self.fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return self.fds[shard]


def _close_all(fds: dict[int, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


class PackedSpectrograms:
    """`ClipSpectrograms` read from a feature store with pread: memory = what is asked for."""

    def __init__(self, files: _ShardFiles, entries: np.ndarray) -> None:
        self.files = files
        self.entries = entries.tolist()  # (shard, offset, frames, n_mels) tuples: fast lookups

    def __len__(self) -> int:
        return len(self.entries)

    def frames(self, index: int) -> int:
        return self.entries[index][2]

    def crop(self, index: int, start: int, width: int) -> np.ndarray:
        shard, offset, frames, n_mels = self.entries[index]
        if start < 0 or width < 0 or start + width > frames:
            raise ValueError(f"frames {start}..{start + width} asked of a clip of {frames}")
        size = width * n_mels * FLOAT_BYTES
        data = os.pread(self.files.fd(shard), size, offset + start * n_mels * FLOAT_BYTES)
        if len(data) != size:
            raise StoreError(f"{self.files.paths[shard]}: {len(data)} of {size} bytes at "
                             f"offset {offset}: the shard is shorter than its index says")
        return np.frombuffer(data, dtype=np.float32).reshape(width, n_mels).T

    def clip(self, index: int) -> np.ndarray:
        return self.crop(index, 0, self.frames(index))


def touch(folder: Path) -> None:
    """Mark a store as used now (what `fat-mlflow cache` lists and prunes by)."""
    (folder / "last_used").write_text(f"{time.time():.0f}\n")
