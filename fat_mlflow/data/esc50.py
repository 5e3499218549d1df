"""Where the ESC-50 clips of the demo dataset come from, and their download when none is at hand.

Sources, the first one found wins:
1. the folder given with `--esc50 DIR` or `$FAT_MLFLOW_ESC50` (an error if it is not ESC-50);
2. `../shared/data/esc50` beside the working directory (this project's own machines);
3. the official release archive, extracted earlier into the user cache;
4. that archive downloaded now: verified against its checksum, extracted into the cache.

The cache is `$FAT_MLFLOW_CACHE/esc50/` (beside the feature cache's folders, which are 12-digit
hashes) or, when the variable is unset, `fat-mlflow/esc50/` in the platform's user cache folder.
`$FAT_MLFLOW_ESC50_URL` and `$FAT_MLFLOW_ESC50_SHA256` replace the archive's address and checksum
(a mirror behind a firewall; the tests).

Download and extraction happen under a file lock, so concurrent runs download once and the others
wait and reuse the result. The archive is downloaded to a temporary file (by pooch) and extracted
into a staging folder that is renamed into place only once complete: an interrupted download or
extraction is never taken for a good one, and the next run starts it again from scratch.
"""
from __future__ import annotations

import os
import shutil
import uuid
import zipfile
from pathlib import Path

import click
import pandas as pd
import pooch
import requests
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from fat_mlflow.data.features import CACHE_ENV
from fat_mlflow.locking import exclusive

ESC50_ENV = "FAT_MLFLOW_ESC50"
URL_ENV = "FAT_MLFLOW_ESC50_URL"
HASH_ENV = "FAT_MLFLOW_ESC50_SHA256"
ARCHIVE_URL = "https://github.com/karolpiczak/ESC-50/archive/master.zip"
# GitHub builds this archive from the repository's newest commit, and it publishes no checksum.
# This MD5 is the one soundata's maintainers found for it in June 2025 (soundata issue #208,
# after the README commit that changed the archive); pooch takes "md5:" hashes. A newer commit
# upstream changes it: the checksum error then says how to override it.
ARCHIVE_HASH = "md5:629e8e9ebc1592bcceb06da6bec40275"
META = Path("meta") / "esc50.csv"
DOWNLOAD_ATTEMPTS = 3
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60
SOURCES_HELP = (f"default: ${ESC50_ENV}, else ../shared/data/esc50, else the official ESC-50 "
                "archive, downloaded once into the cache")
LOCAL_COPY_HINT = (f"to use a copy you have, pass --esc50 DIR or set {ESC50_ENV}=DIR (the folder "
                   "holding audio/ and meta/esc50.csv)")


class Esc50Error(RuntimeError):
    """The ESC-50 clips cannot be found or fetched; the message says why and what to do."""


def locate_esc50(explicit: Path | str | None = None) -> Path:
    """The ESC-50 folder to build the demo from: given, shared, cached, or downloaded now."""
    given = explicit or os.environ.get(ESC50_ENV)
    if given:
        if not (Path(given) / META).is_file():
            raise Esc50Error(f"{given}: not an ESC-50 folder (no {META}); {LOCAL_COPY_HINT}")
        return Path(given)
    shared = Path.cwd().parent / "shared" / "data" / "esc50"
    if (shared / META).is_file():
        return shared
    return fetch_esc50()


def cache_root() -> Path:
    """Where downloaded archives are extracted: see the module docstring."""
    base = os.environ.get(CACHE_ENV)
    return (Path(base) if base else Path(pooch.os_cache("fat-mlflow"))) / "esc50"


def fetch_esc50(url: str | None = None, known_hash: str | None = None) -> Path:
    """The extracted release archive, downloaded and extracted first if not in the cache yet.

    The cache folder is named after the checksum, so a different archive never reuses another's.
    """
    url = url or os.environ.get(URL_ENV) or ARCHIVE_URL
    known_hash = known_hash or os.environ.get(HASH_ENV) or ARCHIVE_HASH
    root = cache_root()
    algorithm, _, digest = known_hash.rpartition(":")
    final = root / f"{algorithm or 'sha256'}-{digest.lower()[:16]}"
    if (final / META).is_file():
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise Esc50Error(f"cannot create the ESC-50 cache folder {root}: {error.strerror}; set "
                         f"{CACHE_ENV} to a writable folder, or {LOCAL_COPY_HINT}") from error
    downloads = root / "downloads" / final.name
    with exclusive(final, "downloading ESC-50"):
        if not (final / META).is_file():
            _remove_leftovers(final, downloads)
            archive = _download(url, known_hash, downloads, "archive.zip")
            _extract(archive, final, url)
            shutil.rmtree(downloads)
    return final


def _remove_leftovers(final: Path, downloads: Path) -> None:
    """What runs killed half-way left behind (only ever called under the lock)."""
    for staging in final.parent.glob(f".{final.name}.extracting-*"):
        shutil.rmtree(staging, ignore_errors=True)
    for partial in downloads.glob("tmp*"):  # pooch's temporary download files
        partial.unlink()


def _download(url: str, known_hash: str, folder: Path, fname: str) -> Path:
    """pooch download into `folder` (a temporary file, renamed once its checksum matches);
    a failed or interrupted transfer is tried again from the start."""
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            return _retrieve(url, known_hash, folder, fname)
        except requests.RequestException as error:
            if attempt == DOWNLOAD_ATTEMPTS:
                raise Esc50Error(f"cannot download the ESC-50 archive from {url} "
                                 f"({DOWNLOAD_ATTEMPTS} attempts, last: {_reason(error)}); check "
                                 f"the connection and rerun, or set {URL_ENV} to a reachable "
                                 f"copy, or {LOCAL_COPY_HINT}") from error
            click.echo(f"download of {url} failed ({_reason(error)}); starting again, attempt "
                       f"{attempt + 1} of {DOWNLOAD_ATTEMPTS}", err=True)
        except ValueError as error:  # pooch: the checksum does not match
            raise Esc50Error(f"the ESC-50 archive from {url} is not the expected file: {error} "
                             f"If you trust this archive, set {HASH_ENV} to its checksum; or "
                             f"{LOCAL_COPY_HINT}") from error
        except OSError as error:
            raise Esc50Error(f"cannot write the ESC-50 archive from {url} into {folder}: "
                             f"{_reason(error)}; free about 1.5 GB there or set {CACHE_ENV} to "
                             f"another folder, or {LOCAL_COPY_HINT}") from error
    raise AssertionError("unreachable: the last attempt returns or raises")


def _retrieve(url: str, known_hash: str, folder: Path, fname: str) -> Path:
    """One pooch download, with a progress bar that is closed however it ends (pooch closes
    its own only on success, and the error message would follow the bar on its line)."""
    # total=1 until pooch sets the size: pooch tests `if progressbar`, false for a bar without one;
    # pooch's log lines go through tqdm, above the bar instead of into it
    with logging_redirect_tqdm(loggers=[pooch.get_logger()]), \
            tqdm(desc="ESC-50 archive", total=1, unit="B", unit_scale=True) as bar:
        downloader = pooch.HTTPDownloader(progressbar=bar, chunk_size=CHUNK_BYTES,
                                          timeout=TIMEOUT_S)
        return Path(pooch.retrieve(url, known_hash, fname=fname, path=folder,
                                   downloader=downloader))


def _extract(archive: Path, final: Path, url: str) -> None:
    """Unzip into a staging folder beside `final`, check it, then rename it into place."""
    staging = final.parent / f".{final.name}.extracting-{uuid.uuid4().hex[:8]}"
    try:
        with zipfile.ZipFile(archive) as bundle:
            for member in tqdm(bundle.infolist(), desc="extracting ESC-50", unit="file"):
                bundle.extract(member, staging)
        top = _esc50_folder(staging, url)
        top.rename(final)
    except zipfile.BadZipFile as error:
        raise Esc50Error(f"the archive from {url} ({archive}) is not a readable zip file "
                         f"({error}); {LOCAL_COPY_HINT}") from error
    except OSError as error:
        raise Esc50Error(f"cannot extract the ESC-50 archive into {final.parent}: "
                         f"{_reason(error)}; free about 1 GB there or set {CACHE_ENV} to "
                         f"another folder, or {LOCAL_COPY_HINT}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _esc50_folder(staging: Path, url: str) -> Path:
    """The extracted folder holding meta/esc50.csv (the archive's single top folder, e.g.
    ESC-50-master/), after checking that every clip its metadata names is there."""
    candidates = [staging, *(child for child in staging.iterdir() if child.is_dir())]
    top = next((folder for folder in candidates if (folder / META).is_file()), None)
    if top is None:
        raise Esc50Error(f"the archive from {url} has no {META}: not the ESC-50 release archive; "
                         f"{LOCAL_COPY_HINT}")
    names = pd.read_csv(top / META)["filename"]
    missing = [name for name in names if not (top / "audio" / name).is_file()]
    if missing:
        raise Esc50Error(f"the archive from {url} lacks {len(missing)} of the {len(names)} clips "
                         f"its {META} names (e.g. audio/{missing[0]}); {LOCAL_COPY_HINT}")
    return top


def _reason(error: BaseException) -> str:
    """The innermost cause in one line: requests nests urllib3's errors several levels deep."""
    while error.__context__ is not None and str(error.__context__):
        error = error.__context__
    return " ".join(str(error).split()) or type(error).__name__
