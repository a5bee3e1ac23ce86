"""The private Ray instance a bare command starts: its workers run at the user's priority."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import os, ray
from workflows.ray_setup import ray_session

@ray.remote
def task_niceness():
    return os.nice(0)

@ray.remote
class Actor:
    def niceness(self):
        return os.nice(0)

with ray_session(num_cpus=2):
    print("niceness", os.nice(0), ray.get(task_niceness.remote()), ray.get(Actor.remote().niceness.remote()))
"""


@pytest.mark.integration
def test_a_private_instance_runs_its_workers_at_the_drivers_niceness() -> None:
    """Ray's default is nice 15: beside any busy process a Train worker then gets a few percent of a core."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("niceness"))
    driver, task, actor = (int(v) for v in line.split()[1:])
    assert task == driver and actor == driver, line
