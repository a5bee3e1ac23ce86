"""A real S3-compatible server for tests: ``moto_server`` in its own process on loopback.

Not an in-process mock: the code under test talks HTTP to a separate process,
exactly as it would to MinIO or AWS. Authentication is switched on
(``INITIAL_NO_AUTH_ACTION_COUNT``): the first few requests create an IAM user
with full access and an access key without credentials, and from then on the
server checks every request's signature, so a wrong key is really refused.

Import the fixtures into ``conftest.py``::

    from s3_server import s3_server, s3_env  # noqa: F401
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

REGION = "us-east-1"
_SETUP_ACTIONS = 3  # create_user, put_user_policy, create_access_key (unauthenticated)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports outside Ray's default worker port range (10002-19999)."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports and not 10002 <= port <= 19999:
            ports.append(port)
    return ports


def closed_port() -> int:
    """A loopback port that nothing listens on (for 'unreachable endpoint' tests)."""
    return free_port()


def _moto_server_command() -> list[str]:
    exe = Path(sys.executable).with_name("moto_server")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("moto_server")
    if found:
        return [found]
    pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    raise AssertionError  # unreachable


@dataclass
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    log_path: Path

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION,
                            aws_access_key_id=access_key or self.access_key,
                            aws_secret_access_key=secret_key or self.secret_key)

    def create_bucket(self, prefix: str = "omniglot") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}


def start_s3_server(tmp_dir: Path, timeout: float = 30.0) -> S3Server:
    port = free_port()
    log_path = tmp_dir / f"moto-{port}.log"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_SETUP_ACTIONS),
           "AWS_EC2_METADATA_DISABLED": "true"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(_moto_server_command() + ["-H", "127.0.0.1", "-p", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with {process.returncode}: {log_path.read_text()}")
        try:
            # The moto-api dashboard data does not count as an AWS action.
            with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=1):
                break
        except (urllib.error.URLError, OSError):
            if time.time() > deadline:
                process.kill()
                raise RuntimeError(f"moto_server did not answer on {endpoint} within {timeout}s")
            time.sleep(0.2)
    try:
        import boto3

        iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION,
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="ingest")
        iam.put_user_policy(UserName="ingest", PolicyName="full-access", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="ingest")["AccessKey"]
    except Exception:
        process.kill()
        raise
    return S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"], process, log_path)


def stop_s3_server(server: S3Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto S3 server process on 127.0.0.1 with authentication enforced."""
    server = start_s3_server(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        stop_s3_server(server)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point the standard AWS variables at the test server's valid credentials."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    return s3_server
