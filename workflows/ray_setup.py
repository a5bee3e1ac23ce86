"""Start or join Ray cheaply and safely.

- Already initialised in this process (a test fixture, another workflow): reuse it.
- ``RAY_ADDRESS`` set: join that cluster.
- Otherwise start a private single-host instance, its dashboard bound to loopback.
  On machines where Ray binds to an address its own driver cannot reach, start the
  process with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (the Makefile and the tests do):
  Ray reads it when it is imported, so it belongs to the environment, not to this code.

Workers do not inherit the driver's environment, so the S3 variables that are
set (and telemetry switches) are forwarded through ``runtime_env["env_vars"]``.
Workflows should still pass explicit ``pyarrow.fs`` filesystems to Ray Data.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from workflows.storage import S3_ENV_VARS

FORWARDED_ENV = S3_ENV_VARS + ("MLFLOW_DISABLE_TELEMETRY", "MLFLOW_TRACKING_URI", "RAY_USAGE_STATS_ENABLED")


def worker_env() -> dict[str, str]:
    """Environment variables the driver has that Ray workers need too (only those it has: on a cloud
    node, an unset ``AWS_EC2_METADATA_DISABLED`` leaves the instance's credentials usable)."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def _job_env_var_keys() -> set[str]:
    """Env var keys the submitted job's runtime env already sets (empty outside ``ray job submit``).

    Ray refuses to merge a job's runtime env with a driver's ``ray.init(runtime_env=...)``
    that names the same env var ("Failed to merge the Job's runtime env ... because of a
    conflict"); the job's value is already in this process's environment and reaches the
    workers through the job, so the driver leaves those keys out.
    """
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    try:
        return set(((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}).keys())
    except (ValueError, AttributeError):
        return set()


LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}
"""A private instance runs its workers at the user's priority, not Ray's default nice 15.

Why: the kernel weighs nice 15 against nice 0 as 36 to 1,024, so beside any busy process at
the user's priority a Train worker gets a few percent of a core; on a busy laptop its epochs
crawl and Ray Train's health check of the starved worker fails. A cluster started with
``ray start`` keeps its own setting (``RAY_worker_niceness``; docs/cluster.md).
"""


def local_logical_cpus() -> int:
    """CPU slots for a private single-host Ray: at least 4, whatever the cores.

    Ray's CPUs are scheduling tokens. With exactly 2 slots on a 2-core machine,
    two Train workers leave Ray Data's read and pair stages no slot and the
    job hangs silently; more tokens than cores lets every stage run (the
    threads each stage uses are set separately).
    """
    return max(4, os.cpu_count() or 1)


def init_ray(num_cpus: int | None = None, quiet: bool | None = None) -> bool:
    """Make sure Ray is initialised; returns True if this call started (or joined) it.

    ``quiet`` (default: unless ``--verbose``/``SIAMESE_VERBOSE``) keeps the workers' output and
    Ray's INFO lines off the console; Ray still writes them to its session's log files.
    """
    import ray

    from workflows import cli

    if ray.is_initialized():
        return False
    quiet = (not cli.verbose()) if quiet is None else quiet
    in_job = _job_env_var_keys()
    env_vars = {k: v for k, v in worker_env().items() if k not in in_job}
    kwargs: dict = {"runtime_env": {"env_vars": env_vars}, "log_to_driver": not quiet,
                    "configure_logging": True, "logging_level": "WARNING" if quiet else "INFO"}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        if "://" not in address and "RAY_ADDRESS" not in in_job:
            # Ray Train's placement-group cleaner (a worker-side actor) looks the cluster
            # up through the state API; without the address it refuses when several Ray
            # instances run on the host ("Found multiple active Ray instances").
            env_vars["RAY_ADDRESS"] = address
        ray.init(address=address, **kwargs)
    else:
        # The dashboard (on loopback) serves Ray's state API, which Ray Train's placement-group
        # cleaner needs: without it, the resources of a trial that Tune stops are never freed
        # and later trials wait for them forever.
        ray.init(address="local", num_cpus=num_cpus or local_logical_cpus(),
                 include_dashboard=True, dashboard_host="127.0.0.1", _system_config=LOCAL_SYSTEM_CONFIG, **kwargs)
    return True


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None, quiet: bool | None = None) -> Iterator[None]:
    """``init_ray`` for the duration of a block; shuts down only what it started."""
    import ray

    started = init_ray(num_cpus=num_cpus, quiet=quiet)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
