"""Start or join Ray cheaply and safely.

- Already initialised in this process (a test fixture, another workflow): reuse it.
- ``RAY_ADDRESS`` set: join that cluster.
- Otherwise start a private single-host instance with no dashboard and no usage
  stats, bound to loopback (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, see
  REFERENCE.md: on these machines Ray otherwise binds to an address its own
  driver cannot reach).

Workers do not inherit the driver's environment, so the S3 variables that are
set (and telemetry switches) are forwarded through ``runtime_env["env_vars"]``.
Workflows should still pass explicit ``pyarrow.fs`` filesystems to Ray Data.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from workflows.storage import S3_ENV_VARS

FORWARDED_ENV = S3_ENV_VARS + ("MLFLOW_DISABLE_TELEMETRY", "MLFLOW_TRACKING_URI")


def worker_env() -> dict[str, str]:
    """Environment variables the driver has that Ray workers need too."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    return env


def local_logical_cpus() -> int:
    """CPU slots for a private single-host Ray: at least 4, whatever the cores.

    Ray's CPUs are scheduling tokens. With exactly 2 slots on a 2-core machine,
    two Train workers leave Ray Data's read and pair stages no slot and the
    job hangs silently; more tokens than cores lets every stage run (the
    threads each stage uses are set separately).
    """
    return max(4, os.cpu_count() or 1)


def init_ray(num_cpus: int | None = None, quiet: bool = True) -> bool:
    """Make sure Ray is initialised; returns True if this call started (or joined) it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict = {"runtime_env": {"env_vars": worker_env()}, "log_to_driver": not quiet,
                    "configure_logging": True, "logging_level": "WARNING" if quiet else "INFO"}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(address="local", num_cpus=num_cpus or local_logical_cpus(),
                 include_dashboard=False, **kwargs)
    return True


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None, quiet: bool = True) -> Iterator[None]:
    """``init_ray`` for the duration of a block; shuts down only what it started."""
    import ray

    started = init_ray(num_cpus=num_cpus, quiet=quiet)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
