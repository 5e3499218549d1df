"""ESC-50 on any machine: the release archive from a loopback HTTP server, verified, extracted
into the cache once, and the demo dataset built from it; every failure in one clear line.

The archive has the official layout (`ESC-50-master/audio/*.wav`, `ESC-50-master/meta/esc50.csv`)
and holds the 909 clips of ../shared plus a few the demo manifest does not name; to keep it small
(a few MB) each clip is cut to its first 0.2 s, which changes no choice the demo build makes.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import soundfile as sf

from fat_mlflow.data.demo import build_demo_dataset, demo_clip_names
from fat_mlflow.data.esc50 import Esc50Error, fetch_esc50
from fat_mlflow.data.layout import load_dataset

CLIP_SECONDS = 0.2
EXTRA_CLIPS = 6  # clips of the archive that the demo manifest leaves out
SLOW_S = 3.0  # long enough for a second process to find the download under way
TABLES = ("train_curated.csv", "train_noisy.csv", "test_truth.csv", "sample_submission.csv",
          "noise_truth.csv")


@dataclass
class Archive:
    data: bytes
    sha256: str
    n_clips: int


def release_archive(esc50_dir: Path) -> Archive:
    """The ../shared clips as the release would hold them (WAV, official names), plus
    EXTRA_CLIPS more under names of clips ../shared lacks."""
    meta = pd.read_csv(esc50_dir / "meta" / "esc50.csv")
    extra = meta.head(EXTRA_CLIPS).assign(
        filename=[f"5-90000{i}-A-{target}.wav" for i, target in
                  enumerate(meta["target"].head(EXTRA_CLIPS))],
        src_file=[f"90000{i}" for i in range(EXTRA_CLIPS)], fold=5)
    sources = list(meta["filename"]) + list(meta["filename"].head(EXTRA_CLIPS))
    release = pd.concat([meta.assign(filename=meta["filename"].map(
        lambda name: f"{Path(name).stem}.wav")), extra], ignore_index=True)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("ESC-50-master/meta/esc50.csv", release.to_csv(index=False))
        bundle.writestr("ESC-50-master/LICENSE", (esc50_dir / "LICENSE").read_text())
        for source, name in zip(sources, release["filename"]):
            with sf.SoundFile(esc50_dir / "audio" / source) as clip:
                wave = clip.read(int(CLIP_SECONDS * clip.samplerate), dtype="float32")
                rate = clip.samplerate
            wav = io.BytesIO()
            sf.write(wav, wave, rate, format="WAV", subtype="PCM_16")
            bundle.writestr(f"ESC-50-master/audio/{name}", wav.getvalue())
    data = buffer.getvalue()
    return Archive(data, hashlib.sha256(data).hexdigest(), len(release))


class ArchiveServer(http.server.ThreadingHTTPServer):
    """Serves the archive at /<name>.zip. A name with "flaky" stops half-way through the body
    and closes the first time, "broken" every time; "slow" waits SLOW_S before the body."""

    def __init__(self, archive: Archive):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.archive = archive
        self.gets: Counter[str] = Counter()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}.zip"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: ArchiveServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.gets[self.path] += 1
        data = self.server.archive.data
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if "slow" in self.path:
            time.sleep(SLOW_S)
        cut = "broken" in self.path or ("flaky" in self.path and self.server.gets[self.path] == 1)
        self.wfile.write(data[: len(data) // 2] if cut else data)
        if cut:
            self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def archive(esc50_dir: Path) -> Archive:
    return release_archive(esc50_dir)


@pytest.fixture(scope="module")
def server(archive: Archive) -> Iterator[ArchiveServer]:
    httpd = ArchiveServer(archive)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache root for this test only (the session's feature cache stays untouched)."""
    monkeypatch.setenv("FAT_MLFLOW_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "esc50"


@pytest.fixture()
def fresh_clone(tmp_path: Path) -> Path:
    """A working directory with no ../shared beside it."""
    folder = tmp_path / "clone" / "repo"
    folder.mkdir(parents=True)
    assert not (folder.parent / "shared").exists()
    return folder


def leftovers(cache: Path) -> list[Path]:
    """Anything a failed or finished fetch must not leave: staging folders, downloads."""
    return [p for p in cache.rglob("*") if ".extracting-" in p.name or "downloads" in p.parts
            and p.is_file()] if cache.exists() else []


def cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`fat-mlflow ...` as a user types it, in `cwd`, with `env` added to the environment."""
    return subprocess.run([sys.executable, "-c", "from fat_mlflow.cli import main; main()", *args],
                          cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)


def assert_one_clean_line(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, done.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_download_verify_extract_once_and_reuse(server, archive, cache):
    url = server.url("ok")
    folder = fetch_esc50(url, archive.sha256)
    assert folder.parent == cache
    meta = pd.read_csv(folder / "meta" / "esc50.csv")
    assert len(meta) == archive.n_clips == len(list((folder / "audio").glob("*.wav")))
    assert (folder / "LICENSE").is_file()
    assert leftovers(cache) == []  # the archive is deleted once extracted
    assert fetch_esc50(url, archive.sha256) == folder  # reused: no second download
    assert server.gets["/ok.zip"] == 1


def test_demo_from_the_download_is_the_demo_of_the_shared_copy(server, archive, cache, esc50_dir,
                                                               fresh_clone):
    """Through the CLI, in a folder without ../shared, the archive named by the two variables."""
    env = {"FAT_MLFLOW_ESC50_URL": server.url("demo"), "FAT_MLFLOW_ESC50_SHA256": archive.sha256}
    done = cli(["demo-data", "demo", "--scale", "0.15"], fresh_clone, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert server.gets["/demo.zip"] == 1
    downloaded = fresh_clone / "demo"
    shared = fresh_clone / "from-shared"
    build_demo_dataset(esc50_dir, shared, scale=0.15)
    for table in TABLES:  # the same clips, splits, names and labels
        assert (downloaded / table).read_bytes() == (shared / table).read_bytes(), table
    stems = [pd.read_csv(root / "demo_sources.csv")["sources"].str.replace(r"\.\w+", "", regex=True)
             for root in (downloaded, shared)]
    pd.testing.assert_series_equal(*stems)
    load_dataset(downloaded)


def test_manifest_picks_the_shared_clips_from_a_complete_release(esc50_dir, tmp_path):
    """A release folder (official names, 6 clips more than ../shared) gives byte for byte the
    demo of ../shared; with clips 'all' the 6 extra clips are used too."""
    release = tmp_path / "release"
    (release / "audio").mkdir(parents=True)
    (release / "meta").mkdir()
    meta = pd.read_csv(esc50_dir / "meta" / "esc50.csv")
    extra = meta.head(EXTRA_CLIPS).assign(filename=[f"5-90000{i}-A-0.wav"
                                                    for i in range(EXTRA_CLIPS)],
                                          src_file=[f"90000{i}" for i in range(EXTRA_CLIPS)])
    renamed = meta.assign(filename=meta["filename"].map(lambda name: f"{Path(name).stem}.wav"))
    for source, name in zip([*meta["filename"], *meta["filename"].head(EXTRA_CLIPS)],
                            [*renamed["filename"], *extra["filename"]]):
        (release / "audio" / name).symlink_to(esc50_dir / "audio" / source)  # decoded by content
    pd.concat([renamed, extra]).sample(frac=1, random_state=0).to_csv(
        release / "meta" / "esc50.csv", index=False)
    (release / "LICENSE").symlink_to(esc50_dir / "LICENSE")
    assert {Path(name).stem for name in meta["filename"]} == demo_clip_names()

    built = {name: build_demo_dataset(root, tmp_path / f"demo-{name}", scale=0.15)
             for name, root in (("shared", esc50_dir), ("release", release))}
    assert {k: v for k, v in built["release"].items() if k != "root"} == {
        k: v for k, v in built["shared"].items() if k != "root"}
    for path in sorted((tmp_path / "demo-shared").rglob("*")):
        twin = tmp_path / "demo-release" / path.relative_to(tmp_path / "demo-shared")
        if path.name == "demo_sources.csv":  # names the files used: .ogg/.flac vs .wav
            continue
        assert path.is_dir() or path.read_bytes() == twin.read_bytes(), path.name

    everything = build_demo_dataset(release, tmp_path / "all", scale=0.15, clips="all")
    assert everything["clips"] == "all"
    used = pd.read_csv(tmp_path / "all" / "demo_sources.csv")["sources"].str.cat(sep=";")
    assert "5-90000" in used


def test_a_folder_without_the_demo_clips_is_refused_by_name(esc50_dir, tmp_path):
    partial = tmp_path / "partial"
    (partial / "meta").mkdir(parents=True)
    (partial / "audio").symlink_to(esc50_dir / "audio")
    meta = pd.read_csv(esc50_dir / "meta" / "esc50.csv")
    meta.iloc[1:].to_csv(partial / "meta" / "esc50.csv", index=False)
    with pytest.raises(Esc50Error, match=rf"1 of the 909 clips .* \(e.g. "
                                         rf"{Path(meta['filename'][0]).stem}\)"):
        build_demo_dataset(partial, tmp_path / "demo", scale=0.15)
    assert not (tmp_path / "demo").exists()


def test_wrong_checksum_is_refused_in_one_line(server, cache, fresh_clone):
    url = server.url("tampered")
    done = cli(["demo-data", "demo"], fresh_clone,
               {"FAT_MLFLOW_ESC50_URL": url, "FAT_MLFLOW_ESC50_SHA256": "0" * 64})
    assert_one_clean_line(done, "Esc50Error", url, "does not match", "FAT_MLFLOW_ESC50_SHA256",
                          "--esc50 DIR")
    assert leftovers(cache) == [] and not list(cache.glob("sha256-*"))
    assert not (fresh_clone / "demo").exists()


def test_interrupted_transfer_is_started_again(server, archive, cache):
    folder = fetch_esc50(server.url("flaky"), archive.sha256)
    assert server.gets["/flaky.zip"] == 2
    assert len(pd.read_csv(folder / "meta" / "esc50.csv")) == archive.n_clips
    assert leftovers(cache) == []


def test_transfer_that_keeps_failing_and_no_connection_fail_in_one_line(server, archive, cache,
                                                                      fresh_clone):
    env = {"FAT_MLFLOW_ESC50_SHA256": archive.sha256}
    broken = cli(["demo-data", "demo"], fresh_clone,
                 {**env, "FAT_MLFLOW_ESC50_URL": server.url("broken")})
    assert_one_clean_line(broken, server.url("broken"), "3 attempts", "--esc50 DIR")
    assert server.gets["/broken.zip"] == 3
    with http.server.HTTPServer(("127.0.0.1", 0), _Handler) as closed:  # bound, never served
        offline_url = f"http://127.0.0.1:{closed.server_address[1]}/esc50.zip"
        closed.socket.close()
        offline = cli(["demo-data", "demo"], fresh_clone, {**env, "FAT_MLFLOW_ESC50_URL": offline_url})
    assert_one_clean_line(offline, offline_url, "Connection refused", "--esc50 DIR")
    assert leftovers(cache) == [] and not list(cache.glob("sha256-*"))


FULL_DISK = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from fat_mlflow.cli import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize("where", ["download", "extraction"])
def test_disk_full_fails_in_one_line_and_leaves_nothing_half_done(server, archive, cache,
                                                                 fresh_clone, where):
    """Writes beyond a size limit fail as on a full disk (RLIMIT_FSIZE: EFBIG instead of
    ENOSPC). For the extraction case the archive is already downloaded and only unzipping
    fails (each clip is larger than the limit)."""
    url = server.url(f"disk-{where}")
    if where == "extraction":
        fetch_esc50(url, archive.sha256)  # fill the cache, then take the folder away again
        folder = next(cache.glob("sha256-*"))
        downloads = cache / "downloads" / folder.name
        downloads.mkdir(parents=True)
        (downloads / "archive.zip").write_bytes(archive.data)
        os.rename(folder, cache / f".{folder.name}.extracting-killed")  # a killed extraction
    limit = 4096 if where == "download" else 2048
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(limit), "demo-data", "demo"],
                          cwd=fresh_clone, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "FAT_MLFLOW_ESC50_URL": url,
                               "FAT_MLFLOW_ESC50_SHA256": archive.sha256})
    expected = "cannot write the ESC-50 archive" if where == "download" else "cannot extract"
    assert_one_clean_line(done, expected, "File too large", "--esc50 DIR")
    assert not list(cache.glob("sha256-*")) and not list(cache.glob(".*extracting*"))
    fetched = fetch_esc50(url, archive.sha256)  # and the next run starts cleanly
    assert len(list((fetched / "audio").glob("*.wav"))) == archive.n_clips
    assert leftovers(cache) == []


def test_a_missing_esc50_folder_is_a_clean_error(fresh_clone, tmp_path):
    done = cli(["demo-data", "demo", "--esc50", str(tmp_path / "nowhere")], fresh_clone, {})
    assert_one_clean_line(done, "Esc50Error", str(tmp_path / "nowhere"),
                          "not an ESC-50 folder (no meta/esc50.csv)")
    done = cli(["pipeline", "--profile", "tiny"], fresh_clone,
               {"FAT_MLFLOW_ESC50": str(tmp_path / "nowhere")})
    assert_one_clean_line(done, str(tmp_path / "nowhere"), "not an ESC-50 folder")


ENSURE_DEMO = """
import sys
from pathlib import Path
from fat_mlflow.warmup.pipeline import ensure_demo_data
ensure_demo_data(Path("demo_data"))
print("demo ready")
"""


def test_two_runs_at_once_download_once_and_build_one_demo(server, archive, cache, fresh_clone):
    """What `fat-mlflow pipeline` does first, twice at once in one fresh folder: one download,
    one demo build; the second process waits for both and reuses them."""
    env = {**os.environ, "FAT_MLFLOW_ESC50_URL": server.url("slow"),
           "FAT_MLFLOW_ESC50_SHA256": archive.sha256}
    runs = []
    for _ in range(2):
        runs.append(subprocess.Popen([sys.executable, "-c", ENSURE_DEMO], cwd=fresh_clone,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True))
        time.sleep(0.5)
    outputs = [run.communicate(timeout=300) for run in runs]
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0 and "demo ready" in out, err[-3000:]
    assert server.gets["/slow.zip"] == 1
    assert any("waiting for another process" in err for _, err in outputs)
    demo = fresh_clone / "demo_data"
    dataset = load_dataset(demo)
    assert json.loads((demo / "demo_summary.json").read_text())["n_train_curated"] == len(
        dataset.curated)
    assert [p.name for p in fresh_clone.iterdir()] == ["demo_data"]  # no staging folder left
