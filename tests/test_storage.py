"""Storage URIs, S3 error reporting against a real (moto) S3 server, and verified downloads."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import pickle
import shutil
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from flaky_proxy import FlakyProxy
from s3_server import closed_port
from workflows import download, storage
from workflows.storage import StorageError

# --------------------------------------------------------------------------- resolve


def test_resolve_local_paths(tmp_path: Path) -> None:
    fs, path = storage.resolve(str(tmp_path / "a" / ".." / "b"))
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(tmp_path / "b")
    fs, path = storage.resolve(f"file://{tmp_path}/c")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "c")


def test_resolve_s3_endpoint_from_option_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://objects.example:9443")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    fs, path = storage.resolve("s3://my-bucket/some/prefix/")
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == "my-bucket/some/prefix"
    assert storage.endpoint_of(fs) == "https://objects.example:9443"
    fs, _ = storage.resolve("s3://my-bucket/x", endpoint_url="http://127.0.0.1:9000")
    assert storage.endpoint_of(fs) == "http://127.0.0.1:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://10.0.0.1:1234")
    fs, _ = storage.resolve("s3://my-bucket/x")
    assert storage.endpoint_of(fs) == "http://10.0.0.1:1234"
    assert storage.s3_options(fs)["access_key"] == "AKIDEXAMPLE"
    assert "secret_key" not in storage.s3_options(fs)


def test_importing_the_packages_changes_no_environment() -> None:
    """No side effect on import: on an AWS node an inherited AWS_EC2_METADATA_DISABLED=true would
    hide the instance profile's credentials, so no module may set it (or anything else)."""
    import subprocess
    import sys

    modules = ["siamese_core", "workflows"] + [f"siamese_core.{m}" for m in (
        "config", "model", "images", "loop", "evaluation", "reid", "retrieval", "mining", "serving", "omniglot")] + [
        f"workflows.{m}" for m in ("storage", "shards", "sources", "ingest", "data", "train", "tune", "evaluate",
                                   "predict", "embed", "tracking", "ray_setup", "models", "config", "download")]
    # the libraries' own import effects (Ray sets RAY_CLIENT_MODE) are theirs: measure from after them
    code = ("import json, os, sys, torch, pyarrow.fs, mlflow, ray, ray.data, ray.train, ray.tune\n"
            "before = dict(os.environ)\n"
            f"for name in {modules!r}: __import__(name)\n"
            "after = dict(os.environ)\n"
            "print(json.dumps({k: [before.get(k), after.get(k)] for k in set(before) | set(after) "
            "if before.get(k) != after.get(k)}))")
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_EC2_METADATA_DISABLED", "MLFLOW_DISABLE_TELEMETRY",
                                                             "RAY_USAGE_STATS_ENABLED",
                                                             "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    changed = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    assert changed == {}, changed


@pytest.mark.parametrize("uri", ["s3://ab/x", "gs://bucket/x", "s3://my-bucket/x?endpoint=ftp://h"])
def test_resolve_rejects_bad_uris(uri: str) -> None:
    with pytest.raises(StorageError):
        storage.resolve(uri, endpoint_url="ftp://host:1" if "endpoint" in uri else None)


def test_local_checks_and_json(tmp_path: Path) -> None:
    fs, path = storage.resolve(str(tmp_path / "new" / "dir"))
    storage.check_writable(fs, path, "somewhere")  # creates the directory, leaves no probe
    assert storage.list_files(fs, path) == []
    storage.write_json(fs, f"{path}/m.json", {"a": 1})
    assert storage.read_json(fs, f"{path}/m.json") == {"a": 1}
    assert sorted(os.listdir(tmp_path / "new" / "dir")) == ["m.json"]  # no temporary left behind
    (tmp_path / "file").write_text("x")
    fs, path = storage.resolve(str(tmp_path / "file"))
    with pytest.raises(StorageError, match="is a file"):
        storage.check_writable(fs, path, str(tmp_path / "file"))


# --------------------------------------------------------------------------- S3 errors


@pytest.mark.integration
def test_s3_writable_and_readable(s3_env) -> None:
    bucket = s3_env.create_bucket()
    uri = f"s3://{bucket}/data"
    fs, path = storage.resolve(uri, endpoint_url=s3_env.endpoint_url)
    storage.check_writable(fs, path, uri)
    storage.write_json(fs, f"{path}/x.json", {"ok": True})
    storage.check_readable(fs, path, uri)
    assert storage.read_json(fs, f"{path}/x.json") == {"ok": True}
    # The write probe was removed (pyarrow may leave an empty "data/" directory marker).
    assert [k for k in s3_env.keys(bucket) if not k.endswith("/")] == ["data/x.json"]


@pytest.mark.integration
def test_checkpoint_loads_from_s3_and_an_empty_checkpoint_folder_says_so(s3_env, tmp_path: Path) -> None:
    import torch

    from siamese_core import checkpoint as ckpt_io
    from siamese_core.config import ModelConfig
    from siamese_core.model import SiameseNet
    from workflows.models import ModelLoadError, load_any

    bucket = s3_env.create_bucket()
    fs, path = storage.resolve(f"s3://{bucket}/runs/r", endpoint_url=s3_env.endpoint_url)
    net = SiameseNet(ModelConfig(preset="tiny", input_size=35, channels=(4, 8, 8, 16), kernels=(3, 3, 2, 2),
                                 embedding_dim=32)).eval()
    ckpt_io.save(tmp_path, net, epoch=3)
    storage.write_bytes(fs, f"{path}/checkpoint_a/{ckpt_io.MODEL_FILE}", (tmp_path / ckpt_io.MODEL_FILE).read_bytes())
    fs.create_dir(f"{path}/checkpoint_b")  # what Ray Train leaves when the store vanishes before the upload

    loaded = load_any(f"s3://{bucket}/runs/r/checkpoint_a", endpoint_url=s3_env.endpoint_url)
    x = torch.rand(2, 1, 35, 35)
    assert torch.equal(loaded.similarity(x, x.flip(0)), net.similarity(x, x.flip(0)))
    with pytest.raises(ModelLoadError, match="no model.pt there, so it is not a complete"):
        load_any(f"s3://{bucket}/runs/r/checkpoint_b", endpoint_url=s3_env.endpoint_url)


@pytest.mark.integration
def test_a_jobs_filesystem_keeps_its_retries_through_pickling_and_rides_out_an_outage(s3_env) -> None:
    bucket = s3_env.create_bucket()
    proxy = FlakyProxy(int(s3_env.endpoint_url.rsplit(":", 1)[1]))
    try:
        quick, path = storage.resolve(f"s3://{bucket}/d", endpoint_url=proxy.url)
        storage.write_json(quick, f"{path}/x.json", {"ok": 1})
        # What Ray's controller and workers get: a pickled copy (pyarrow's own S3FileSystem loses its retries).
        job = pickle.loads(pickle.dumps(pickle.loads(pickle.dumps(storage.patient(quick)))))
        assert (job.max_attempts, quick.max_attempts) == (storage.JOB_MAX_ATTEMPTS, storage.MAX_ATTEMPTS)
        assert storage.s3_options(job) == storage.s3_options(quick)
        local = pafs.LocalFileSystem()
        assert storage.patient(local) is local

        proxy.down()
        with pytest.raises(OSError, match="NETWORK_CONNECTION"):  # a command's filesystem gives up within about a second
            storage.read_json(pickle.loads(pickle.dumps(quick)), f"{path}/x.json")
        threading.Timer(2.0, proxy.up).start()  # the store is back 2 s later
        assert storage.read_json(job, f"{path}/x.json") == {"ok": 1}
    finally:
        proxy.down()


@pytest.mark.integration
def test_s3_missing_bucket(s3_env) -> None:
    uri = "s3://no-such-bucket-here/data"
    fs, path = storage.resolve(uri, endpoint_url=s3_env.endpoint_url)
    with pytest.raises(StorageError) as err:
        storage.check_writable(fs, path, uri)
    assert uri in str(err.value) and "does not exist" in str(err.value)


@pytest.mark.integration
@pytest.mark.parametrize("which", ["secret", "key-id"])
def test_s3_bad_credentials(s3_env, monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    bucket = s3_env.create_bucket()
    uri = f"s3://{bucket}/data"
    if which == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret_key[:-4] + "XXXX")
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
    fs, path = storage.resolve(uri, endpoint_url=s3_env.endpoint_url)
    with pytest.raises(StorageError) as err:
        storage.check_writable(fs, path, uri)
    assert uri in str(err.value) and "AWS_SECRET_ACCESS_KEY" in str(err.value)
    assert s3_env.keys(bucket) == []


@pytest.mark.integration
def test_s3_unreachable_endpoint_fails_fast(s3_env) -> None:
    uri = "s3://omniglot/data"
    endpoint = f"http://127.0.0.1:{closed_port()}"
    fs, path = storage.resolve(uri, endpoint_url=endpoint)
    start = time.time()
    with pytest.raises(StorageError) as err:
        storage.check_writable(fs, path, uri)
    assert time.time() - start < 15
    assert uri in str(err.value) and "cannot reach" in str(err.value)


# --------------------------------------------------------------------------- downloads


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output clean
        pass


@pytest.fixture
def http_dir(tmp_path: Path):
    """A local HTTP server on 127.0.0.1 serving a temporary folder; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/omniglot/python"
    finally:
        server.shutdown()
        server.server_close()


def _serve_real_archives(root: Path, omniglot_dir: Path) -> None:
    target = root / "omniglot" / "python"
    target.mkdir(parents=True)
    for name in download.ARCHIVE_FILES:
        shutil.copy(omniglot_dir / name, target / name)


def test_checksum_parsing(tmp_path: Path) -> None:
    assert download.parse_checksum_option("images_background=sha256:" + "a" * 64) == \
        ("images_background.zip", "sha256:" + "a" * 64)
    assert download.normalize_checksum("B" * 32) == "md5:" + "b" * 32
    with pytest.raises(download.DownloadError):
        download.parse_checksum_option("images_background.zip")
    with pytest.raises(download.DownloadError):
        download.normalize_checksum("sha256:xyz")
    sums = tmp_path / "SUMS"
    sums.write_text(f"{'c' * 64}  images_background.zip\n{'d' * 64} *images_evaluation.zip\n")
    assert download.read_checksum_file(sums) == {"images_background.zip": "sha256:" + "c" * 64,
                                                 "images_evaluation.zip": "sha256:" + "d" * 64}


def test_official_checksums_are_torchvisions() -> None:
    assert download.OFFICIAL_BASE_URL == "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
    assert download.OFFICIAL_CHECKSUMS == {"images_background.zip": "md5:68d2efa1b9178cc56df9314c21c6e718",
                                           "images_evaluation.zip": "md5:6b91aef0f799c5bb55b94e3f2daec811"}


def test_download_verified_and_cached(http_dir, omniglot_dir: Path, tmp_path: Path) -> None:
    root, base = http_dir
    _serve_real_archives(root, omniglot_dir)
    cache = tmp_path / "cache"
    sums = download.read_checksum_file(omniglot_dir / "SHA256SUMS")
    folder = download.fetch_archives(base, cache, {k: v for k, v in sums.items() if k.endswith(".zip")},
                                     log=lambda m: None)
    assert sorted(p.name for p in folder.iterdir()) == sorted(download.ARCHIVE_FILES)
    for name in download.ARCHIVE_FILES:
        assert (folder / name).read_bytes() == (omniglot_dir / name).read_bytes()
    # Cached copies are verified and reused without the server.
    shutil.rmtree(root / "omniglot")
    messages: list[str] = []
    download.fetch_archives(base, cache, sums_only_zips(sums), log=messages.append)
    assert all("cached copy verified" in m for m in messages)


def sums_only_zips(sums: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in sums.items() if k.endswith(".zip")}


def test_download_checksum_mismatch_leaves_nothing(http_dir, omniglot_dir: Path, tmp_path: Path) -> None:
    """The local archives are rebuilt, so the official MD5s must reject them."""
    root, base = http_dir
    _serve_real_archives(root, omniglot_dir)
    cache = tmp_path / "cache"
    with pytest.raises(download.DownloadError) as err:
        download.fetch_archives(base, cache, log=lambda m: None)
    message = str(err.value)
    url = f"{base}/images_background.zip"
    actual = hashlib.md5((omniglot_dir / "images_background.zip").read_bytes()).hexdigest()
    assert url in message
    assert "68d2efa1b9178cc56df9314c21c6e718" in message and actual in message
    assert list(cache.iterdir()) == []  # no archive, no partial file


def test_download_http_error_names_url(http_dir, tmp_path: Path) -> None:
    _, base = http_dir
    with pytest.raises(download.DownloadError) as err:
        download.fetch_archives(base, tmp_path / "cache", log=lambda m: None)
    assert f"{base}/images_background.zip" in str(err.value) and "404" in str(err.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_download_unreachable_names_url(tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{closed_port()}/omniglot"
    with pytest.raises(download.DownloadError) as err:
        download.fetch_archives(base, tmp_path / "cache", timeout=5, log=lambda m: None)
    assert f"{base}/images_background.zip" in str(err.value)
