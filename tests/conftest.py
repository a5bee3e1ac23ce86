"""Shared fixtures: where the real Omniglot lives, and test markers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OMNIGLOT = PROJECT_ROOT.parent / "shared" / "data" / "omniglot"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: starts real services (Ray, S3 server, MLflow)")


@pytest.fixture(scope="session")
def omniglot_dir() -> Path:
    """The real Omniglot archives; OMNIGLOT_DIR overrides ../shared/data/omniglot."""
    path = Path(os.environ.get("OMNIGLOT_DIR", DEFAULT_OMNIGLOT))
    if not (path / "images_background.zip").is_file():
        pytest.fail(f"Omniglot not found at {path}; set OMNIGLOT_DIR to the folder with the two zips")
    return path


# --- S3 server and Ray fixtures (workflows tests) --------------------------------
from s3_server import s3_env, s3_server  # noqa: E402,F401  (moto_server subprocess on loopback)


@pytest.fixture(scope="session")
def ray_cluster():
    """One private local Ray instance for the whole session (startup costs ~10 s here)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind to loopback only
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING", runtime_env={"env_vars": {"AWS_EC2_METADATA_DISABLED": "true"}})
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
