"""Where datasets live: a local directory or any S3-compatible object store.

``resolve(uri)`` turns ``/some/dir``, ``file:///some/dir`` or ``s3://bucket/prefix``
into a ``pyarrow.fs`` filesystem and a path on it. S3 settings come from the
standard AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_REGION``/``AWS_DEFAULT_REGION``) and the endpoint
from ``endpoint_url`` or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, so the
same code talks to AWS S3, MinIO or a moto server. Credentials read from the
environment are put into the filesystem object itself, so a filesystem passed to
Ray workers (which do not inherit the driver's environment) still works.

Timeouts are short and retries bounded: an unreachable endpoint fails within
seconds. A running job is more patient (:func:`patient`): inside Ray's processes
each S3 call keeps retrying for about 10-20 s, so a brief outage is ridden out
even where Ray Train never retries (its controller writing its own state).
``check_writable`` / ``check_readable`` probe the location before any
work and turn a missing bucket, refused credentials or an unreachable endpoint
into a :class:`StorageError` that names the URI and says what to fix.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

CONNECT_TIMEOUT_S = float(os.environ.get("SIAMESE_S3_CONNECT_TIMEOUT", "3"))
REQUEST_TIMEOUT_S = float(os.environ.get("SIAMESE_S3_REQUEST_TIMEOUT", "30"))
MAX_ATTEMPTS = int(os.environ.get("SIAMESE_S3_MAX_ATTEMPTS", "3"))
"""Attempts per S3 call in commands and checks: about 1 s before an unreachable endpoint fails."""
JOB_MAX_ATTEMPTS = int(os.environ.get("SIAMESE_S3_JOB_MAX_ATTEMPTS", "6"))
"""Attempts per S3 call for a running job's checkpoints and shards (:func:`patient`): 10-20 s."""

S3_ENV_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
    "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_EC2_METADATA_DISABLED",
)
"""Environment variables that configure S3 access; forward these to Ray workers if needed."""


class StorageError(RuntimeError):
    """A storage location cannot be used; the message names the URI and what to fix."""


@dataclass(frozen=True)
class Location:
    """A resolved URI: the filesystem, the path on it, and the URI as the user wrote it."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_s3(self) -> bool:
        return self.fs.type_name == "s3"

    def join(self, *parts: str) -> str:
        return join(self.path, *parts)

    def uri_of(self, *parts: str) -> str:
        """A user-facing URI for a path below this location (for messages)."""
        return join(self.uri.rstrip("/"), *parts)


def endpoint_from_env(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint: the explicit option, else AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


class RetryingS3FileSystem(pafs.S3FileSystem):
    """An ``S3FileSystem`` that keeps its retry budget when pickled.

    Why: pyarrow (25) drops ``retry_strategy`` when it pickles an ``S3FileSystem``, so the
    copy Ray hands its controller and workers would retry 3 times whatever was asked.
    """

    def __init__(self, max_attempts: int, **options: Any) -> None:
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **options)
        self.max_attempts = max_attempts

    def options(self) -> dict[str, Any]:
        """The constructor's options (credentials included), without the retry strategy."""
        return dict(super().__reduce__()[1][0])

    def __reduce__(self) -> tuple[Any, tuple[int, dict[str, Any]]]:
        return _rebuild_s3, (self.max_attempts, self.options())


def _rebuild_s3(max_attempts: int, options: dict[str, Any]) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(max_attempts, **options)


def patient(fs: pafs.FileSystem) -> pafs.FileSystem:
    """``fs`` with a running job's retry budget (``JOB_MAX_ATTEMPTS``); local filesystems as they are."""
    if not isinstance(fs, RetryingS3FileSystem):
        return fs
    return RetryingS3FileSystem(JOB_MAX_ATTEMPTS, **fs.options())


def s3_filesystem(endpoint_url: str | None = None) -> RetryingS3FileSystem:
    """An S3 filesystem configured from the standard AWS environment and ``endpoint_url``."""
    endpoint = endpoint_from_env(endpoint_url)
    kwargs: dict[str, Any] = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "connect_timeout": CONNECT_TIMEOUT_S,
        "request_timeout": REQUEST_TIMEOUT_S,
    }
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise StorageError(f"invalid S3 endpoint {endpoint!r}: use http(s)://host:port")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    key = os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs["access_key"] = key
        kwargs["secret_key"] = secret
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return RetryingS3FileSystem(MAX_ATTEMPTS, **kwargs)


def resolve(uri: str, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """``uri`` -> (filesystem, path). Local paths and ``file://`` become absolute paths."""
    loc = locate(uri, endpoint_url)
    return loc.fs, loc.path


def locate(uri: str, endpoint_url: str | None = None) -> Location:
    """Like :func:`resolve`, keeping the user's URI for error messages."""
    uri = str(uri)
    if not uri:
        raise StorageError("empty storage URI")
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        bucket = parsed.netloc
        if len(bucket) < 3:
            raise StorageError(f"{uri}: S3 URIs look like s3://bucket/prefix (bucket names have 3+ characters)")
        path = posixpath.normpath(f"{bucket}/{parsed.path.lstrip('/')}").rstrip("/")
        return Location(s3_filesystem(endpoint_url), path, uri)
    if parsed.scheme == "file":
        return Location(pafs.LocalFileSystem(), str(Path(parsed.path).resolve()), uri)
    if parsed.scheme and len(parsed.scheme) > 1:  # not a Windows drive letter
        raise StorageError(f"unsupported storage URI {uri!r}: use a local path, file:// or s3://bucket/prefix")
    return Location(pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve()), uri)


def join(path: str, *parts: str) -> str:
    return posixpath.join(path, *parts) if parts else path


def s3_options(fs: pafs.FileSystem) -> dict[str, Any]:
    """The options of an S3 filesystem, secrets removed (for messages and tests)."""
    if fs.type_name != "s3":
        return {}
    options = fs.options() if isinstance(fs, RetryingS3FileSystem) else dict(fs.__reduce__()[1][0])
    for secret in ("secret_key", "session_token"):
        options.pop(secret, None)
    return options


def endpoint_of(fs: pafs.FileSystem) -> str | None:
    """``scheme://host:port`` of an S3 filesystem with an endpoint override, else None."""
    options = s3_options(fs)
    if not options.get("endpoint_override"):
        return None
    return f"{options.get('scheme') or 'https'}://{options['endpoint_override']}"


def bucket_of(fs: pafs.FileSystem, path: str) -> str | None:
    return path.split("/", 1)[0] if fs.type_name == "s3" else None


def explain(exc: BaseException, uri: str, fs: pafs.FileSystem | None = None) -> StorageError:
    """A StorageError for a failed storage call, with a hint at what to fix."""
    text = str(exc)
    upper = text.upper()
    if "NETWORK_CONNECTION" in upper or "COULD NOT CONNECT" in upper or "CURLCODE" in upper \
            or "TIMEOUT" in upper or "TIMED OUT" in upper:
        endpoint = endpoint_of(fs) if fs is not None else None
        hint = (f"cannot reach the S3 endpoint{f' {endpoint}' if endpoint else ''}: check --endpoint-url / "
                "AWS_ENDPOINT_URL and that the object store is running")
    elif "NO_SUCH_BUCKET" in upper or "NOSUCHBUCKET" in upper:
        hint = "the bucket does not exist: create it first (ingest never creates buckets)"
    elif any(s in upper for s in ("ACCESS_DENIED", "ACCESSDENIED", "INVALID_ACCESS_KEY", "INVALIDACCESSKEY",
                                  "SIGNATURE", "FORBIDDEN", "403", "CREDENTIALS", "EXPIRED")):
        hint = ("access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) "
                "and the key's permissions on the bucket")
    elif isinstance(exc, PermissionError):
        hint = "permission denied: choose a location you can write to"
    else:
        hint = "storage error"
    return StorageError(f"{uri}: {hint} ({type(exc).__name__}: {text})")


def check_bucket(fs: pafs.FileSystem, path: str, uri: str) -> None:
    """For S3: raise StorageError if the bucket is missing or unreachable (no-op locally)."""
    bucket = bucket_of(fs, path)
    if bucket is None:
        return
    try:
        info = fs.get_file_info(bucket)
    except OSError as exc:
        raise explain(exc, uri, fs) from exc
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri}: bucket {bucket!r} does not exist (or is not visible with these "
                           "credentials): create it first, or check the bucket name and endpoint")


def check_readable(fs: pafs.FileSystem, path: str, uri: str) -> None:
    """Raise StorageError unless ``path`` is an existing directory (or S3 prefix) we can list."""
    check_bucket(fs, path, uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{uri}: nothing there (no such directory or prefix)")
        if info.type == pafs.FileType.File:
            raise StorageError(f"{uri}: is a file; expected a dataset directory")
    except OSError as exc:
        raise explain(exc, uri, fs) from exc


def check_writable(fs: pafs.FileSystem, path: str, uri: str) -> None:
    """Raise StorageError unless a small object can be written and deleted under ``path``."""
    check_bucket(fs, path, uri)
    probe = join(path, f".write-probe-{uuid.uuid4().hex}")
    try:
        if fs.type_name != "s3":
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                raise StorageError(f"{uri}: is a file; expected a directory")
            fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as out:
            out.write(b"probe")
        fs.delete_file(probe)
    except StorageError:
        raise
    except OSError as exc:
        raise explain(exc, uri, fs) from exc


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a small file so that readers see either nothing or the whole content.

    Local: write a temporary sibling, then rename over the target. S3: a single
    PUT is atomic by itself (the object appears whole or not at all).
    """
    parent = posixpath.dirname(path)
    if fs.type_name == "s3":
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    finally:
        if exists(fs, tmp):
            fs.delete_file(tmp)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as src:
        return src.read()


def write_json(fs: pafs.FileSystem, path: str, obj: Any) -> None:
    write_bytes(fs, path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(fs: pafs.FileSystem, path: str) -> Any:
    return json.loads(read_bytes(fs, path).decode())


def delete_files(fs: pafs.FileSystem, paths: list[str]) -> None:
    """Delete exactly these files (missing ones are ignored)."""
    for path in paths:
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass


def list_files(fs: pafs.FileSystem, path: str) -> list[str]:
    """Every file below ``path`` (recursive; empty if it does not exist)."""
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    return sorted(i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File)
