"""Shared fixtures: where the real Omniglot lives, and test markers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# What the Makefile exports, for a bare `pytest` too: set before any test module imports Ray,
# which reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported (bind to loopback, one host).
for _key, _value in (("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"), ("AWS_EC2_METADATA_DISABLED", "true"),
                     ("MLFLOW_DISABLE_TELEMETRY", "true"), ("RAY_USAGE_STATS_ENABLED", "0")):
    os.environ.setdefault(_key, _value)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OMNIGLOT = PROJECT_ROOT.parent / "shared" / "data" / "omniglot"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: starts real services (Ray, S3 server, MLflow)")


@pytest.fixture(scope="session")
def omniglot_dir() -> Path:
    """The real Omniglot archives, found as ``make demo`` finds them: OMNIGLOT_DIR (a folder with
    the two zips), else ../shared/data/omniglot, else the official archives downloaded once into
    the cache and checked against their digests (``OMNIGLOT_DIR=official``, as the Makefile sets)."""
    given = os.environ.get("OMNIGLOT_DIR", "")
    if given and given != "official":
        path = Path(given)
    elif not given and (DEFAULT_OMNIGLOT / "images_background.zip").is_file():
        path = DEFAULT_OMNIGLOT
    else:
        from workflows import download

        try:
            path = download.fetch_archives(log=lambda message: None)
        except download.DownloadError as exc:
            pytest.fail(f"Omniglot: no OMNIGLOT_DIR, no {DEFAULT_OMNIGLOT}, and the download failed ({exc}); "
                        "set OMNIGLOT_DIR to the folder with the two zips")
    if not (path / "images_background.zip").is_file():
        pytest.fail(f"Omniglot not found at {path}; set OMNIGLOT_DIR to the folder with the two zips")
    return path


# --- S3 server and Ray fixtures (workflows tests) --------------------------------
from s3_server import s3_env, s3_server  # noqa: E402,F401  (moto_server subprocess on loopback)


@pytest.fixture(scope="session")
def ray_cluster():
    """One private local Ray instance for the whole session (startup costs ~10 s here)."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        from workflows.ray_setup import LOCAL_SYSTEM_CONFIG, local_logical_cpus

        ray.init(address="local", num_cpus=local_logical_cpus(), include_dashboard=False, log_to_driver=False,
                 _system_config=LOCAL_SYSTEM_CONFIG,
                 logging_level="WARNING", runtime_env={"env_vars": {"AWS_EC2_METADATA_DISABLED": "true"}})
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


SMALL_TRAIN = {"Latin", "Greek", "Braille"}
SMALL_VALIDATION = {"Angelic", "Keble"}
SMALL_TEST = {"Atlantean", "Tengwar"}


@pytest.fixture(scope="session")
def small_shards(ray_cluster, omniglot_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Real Omniglot shards of 3 train, 2 validation and 2 test alphabets (ingested once)."""
    from omniglot_sources import make_source
    from workflows import ingest

    root = tmp_path_factory.mktemp("small-omniglot")
    source = make_source(omniglot_dir, root / "source", SMALL_TRAIN | SMALL_VALIDATION | SMALL_TEST)
    dest = root / "shards"
    ingest.ingest(str(source), str(dest), allow_subset=True, log=lambda _msg: None)
    return str(dest)
