"""Fetch the official Omniglot archives over HTTP(S), verifying their checksums.

The official release is the GitHub repository brendenlake/omniglot, files
``python/images_background.zip`` and ``python/images_evaluation.zip``. The
expected digests are the MD5 sums torchvision publishes for these two files
(``torchvision/datasets/omniglot.py``, ``zips_md5``). A mirror that serves other
bytes (e.g. rebuilt archives) needs its own digests: pass them with
``checksums={"images_background.zip": "sha256:<hex>", ...}`` or a checksum file
in ``sha256sum``/``md5sum`` format (``<hex>  <name>`` per line).

Files go to a local cache directory. A download is streamed into a temporary
file and only renamed into place once its digest matches, so a mismatch or a
broken transfer never leaves a file in the cache. A cached file whose digest
matches is reused without any network access.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Mapping

OFFICIAL_BASE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
ARCHIVE_FILES: tuple[str, str] = ("images_background.zip", "images_evaluation.zip")
OFFICIAL_CHECKSUMS: dict[str, str] = {
    # torchvision.datasets.Omniglot.zips_md5
    "images_background.zip": "md5:68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "md5:6b91aef0f799c5bb55b94e3f2daec811",
}
_ALGO_BY_HEX_LENGTH = {32: "md5", 40: "sha1", 64: "sha256", 128: "sha512"}
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download failed or its checksum did not match; the message names the URL."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "siamese-oneshot" / "omniglot"


def is_url(source: str) -> bool:
    return str(source).startswith(("http://", "https://"))


def normalize_checksum(value: str, name: str = "") -> str:
    """'algo:hex' or a bare hex digest (algorithm from its length) -> 'algo:hex'."""
    value = value.strip()
    if ":" in value:
        algo, hexdigest = value.split(":", 1)
        algo = algo.strip().lower()
    else:
        hexdigest = value
        algo = _ALGO_BY_HEX_LENGTH.get(len(value), "")
    hexdigest = hexdigest.strip().lower()
    if algo not in hashlib.algorithms_available or not hexdigest or \
            any(c not in "0123456789abcdef" for c in hexdigest):
        raise DownloadError(f"invalid checksum {value!r}{f' for {name}' if name else ''}: "
                            "use algo:hex, e.g. sha256:<64 hex digits>")
    return f"{algo}:{hexdigest}"


def parse_checksum_option(option: str) -> tuple[str, str]:
    """``name=algo:hex`` (the --checksum CLI option) -> (name, 'algo:hex')."""
    if "=" not in option:
        raise DownloadError(f"invalid --checksum {option!r}: use NAME=ALGO:HEX, "
                            "e.g. images_background.zip=sha256:<hex>")
    name, value = option.split("=", 1)
    name = name.strip()
    if not name.endswith(".zip"):
        name += ".zip"
    return name, normalize_checksum(value, name)


def read_checksum_file(path: Path | str) -> dict[str, str]:
    """Lines ``<hex>  <name>`` (sha256sum/md5sum output) -> {name: 'algo:hex'}."""
    result: dict[str, str] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise DownloadError(f"cannot read checksum file {path}: {exc}") from exc
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise DownloadError(f"bad line in checksum file {path}: {line!r}")
        hexdigest, name = parts[0], parts[1].lstrip("*").strip()
        result[Path(name).name] = normalize_checksum(hexdigest, name)
    return result


def file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_file(url: str, dest: Path, checksum: str, timeout: float = 60.0,
               log: Callable[[str], None] = print) -> Path:
    """Download ``url`` to ``dest`` unless a file with the right digest is already there."""
    algo, expected = normalize_checksum(checksum, dest.name).split(":", 1)
    if dest.is_file():
        if file_digest(dest, algo) == expected:
            log(f"[download] {dest.name}: cached copy verified ({algo} {expected})")
            return dest
        log(f"[download] {dest.name}: cached copy does not match {algo}:{expected}; downloading again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.new(algo)
        size = 0
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "siamese-oneshot-ingest"})
            with urllib.request.urlopen(request, timeout=timeout) as response, os.fdopen(fd, "wb") as out:
                fd = -1
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        except urllib.error.HTTPError as exc:
            raise DownloadError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DownloadError(f"cannot download {url}: {reason}") from exc
        actual = digest.hexdigest()
        if actual != expected:
            raise DownloadError(f"checksum mismatch for {url}: expected {algo}:{expected}, "
                                f"got {algo}:{actual} ({size} bytes); the file was discarded. "
                                "For a mirror with other archives pass --checksum NAME=ALGO:HEX")
        os.replace(tmp, dest)
        log(f"[download] {url} -> {dest} ({size} bytes, {algo} verified)")
        return dest
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp.exists():
            tmp.unlink()


def fetch_archives(base_url: str = OFFICIAL_BASE_URL, cache_dir: Path | str | None = None,
                   checksums: Mapping[str, str] | None = None, timeout: float = 60.0,
                   log: Callable[[str], None] = print) -> Path:
    """Both archives from ``base_url`` into ``cache_dir``; returns the folder holding them.

    ``checksums`` overrides the official digests per file name; any archive without
    a digest is refused (nothing unverified enters the cache).
    """
    expected = dict(OFFICIAL_CHECKSUMS)
    if checksums:
        expected.update({(k if k.endswith(".zip") else f"{k}.zip"): normalize_checksum(v, k)
                         for k, v in checksums.items()})
    unknown = sorted(set(expected) - set(ARCHIVE_FILES))
    if unknown:
        raise DownloadError(f"checksums given for unknown archives {unknown}; expected {list(ARCHIVE_FILES)}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    base = base_url.rstrip("/")
    for name in ARCHIVE_FILES:
        fetch_file(f"{base}/{name}", cache / name, expected[name], timeout=timeout, log=log)
    return cache


def clear_partial(cache_dir: Path | str) -> None:
    """Remove leftover ``*.part`` files (from a killed process) in a cache directory."""
    for part in Path(cache_dir).glob(".*.part"):
        part.unlink(missing_ok=True)


__all__ = [
    "ARCHIVE_FILES", "DownloadError", "OFFICIAL_BASE_URL", "OFFICIAL_CHECKSUMS", "default_cache_dir",
    "fetch_archives", "fetch_file", "file_digest", "is_url", "normalize_checksum",
    "parse_checksum_option", "read_checksum_file", "clear_partial",
]
