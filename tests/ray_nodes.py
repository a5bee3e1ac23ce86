"""Real Ray nodes for tests: ``ray start`` heads and worker nodes as subprocesses, on loopback.

Each node runs ``ray start --block`` in its own process group, on free ports, with
token authentication (a token generated under a temporary HOME, so the user's
``~/.ray`` is never read or written) and a short private ``--temp-dir``; stopping a
node stops only that process group (never a bare ``ray stop``, which would stop
every Ray on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from s3_server import free_ports

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: its `ray` and `python`


def base_env(home: Path) -> dict[str, str]:
    """The environment of a user who activated the venv, with a private HOME and loopback-only Ray."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_AUTH_", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "VIRTUAL_ENV"))}
    env.update({
        "HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_worker_niceness": "0",  # as workflows.ray_setup's private instance: workers at the user's priority
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    return env


def ray_cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def live_processes() -> list[tuple[int, list[str], str]]:
    """(pid, /proc/PID/stat fields after the name: state, ppid, pgrp, session, ...; cmdline) of live processes."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields and fields[0] != "Z":
            found.append((int(entry.name), fields, cmdline))
    return found


def group_alive(pgid: int) -> list[int]:
    """Live processes of a process group."""
    return [pid for pid, fields, _ in live_processes() if int(fields[2]) == pgid]


def session_members(sid: int) -> list[int]:
    """Live processes of a session (``setsid``)."""
    return [pid for pid, fields, _ in live_processes() if int(fields[3]) == sid]


def processes_mentioning(text: str) -> list[int]:
    return [pid for pid, _, cmdline in live_processes() if text in cmdline]


def stop_group(proc: subprocess.Popen, grace_s: float = 25) -> None:
    """SIGTERM a process group (``ray start --block`` tears its processes down), then SIGKILL.

    The raylet (and with it the node's workers) is what needs a clean stop; it exits
    within ~10 s. What outlives it here (gcs_server, the dashboard, the ``ray`` CLI)
    sits on SIGTERM for ~20 s more, which three clusters a test run would wait for
    in full, so it gets SIGKILL as soon as the raylet is gone.
    """
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and group_raylets(pgid):
        time.sleep(0.5)
    if group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def group_raylets(pgid: int) -> list[int]:
    """Live raylet processes of a process group."""
    return [pid for pid, fields, cmdline in live_processes()
            if int(fields[2]) == pgid and cmdline.split("\0", 1)[0].endswith("/raylet")]


@dataclass
class RayNode:
    proc: subprocess.Popen
    temp_dir: Path
    log: Path
    ports: dict[str, int] = field(default_factory=dict)

    def log_tail(self, chars: int = 5000) -> str:
        return self.log.read_text()[-chars:] if self.log.exists() else ""


def start_node(args: list[str], env: dict[str, str], tmp_path: Path, name: str,
               extra_env: dict[str, str] | None = None) -> RayNode:
    """``ray start --block ARGS`` in its own process group, logging to ``tmp_path/NAME.log``."""
    temp_dir = Path(tempfile.mkdtemp(prefix=f"r{name[0]}-", dir="/tmp"))  # short: unix socket paths
    log = tmp_path / f"{name}.log"
    with log.open("w") as handle:
        proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args,
                                 f"--temp-dir={temp_dir}"], env={**env, **(extra_env or {})}, cwd=PROJECT_ROOT,
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    return RayNode(proc=proc, temp_dir=temp_dir, log=log)


def start_worker_node(address: str, env: dict[str, str], tmp_path: Path, name: str = "worker",
                      num_cpus: int = 2, resources: str | None = None) -> RayNode:
    """A worker node joining the head at ``address`` (``env`` carries the token settings), on free ports.

    On one machine the node is "host" 127.0.0.2: Ray rewrites a head address of
    127.0.0.1 to the machine's outside address, which is not reachable here.
    The head must accept other nodes (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1).
    """
    names = ["agent_http", "agent_grpc", "env_agent", "metrics", "node_manager", "object_manager"]
    ports = dict(zip(names, free_ports(len(names))))
    args = [f"--address={address}", f"--num-cpus={num_cpus}", f"--node-ip-address={address.rsplit(':', 1)[0]}",
            f"--dashboard-agent-listen-port={ports['agent_http']}",
            f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
            f"--runtime-env-agent-port={ports['env_agent']}", f"--metrics-export-port={ports['metrics']}",
            f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}"]
    if resources:
        args.append(f"--resources={resources}")
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (everything on loopback, one host) refuses to join.
    node = start_node(args, env, tmp_path, name, {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"})
    node.ports = ports
    return node


def alive_nodes(driver_env: dict[str, str]) -> int:
    """Alive nodes of the cluster that ``driver_env`` (RAY_ADDRESS, token) points at."""
    probe = ("import ray; ray.init(logging_level='ERROR', log_to_driver=False); "
             "print(sum(n['Alive'] for n in ray.nodes()))")
    done = subprocess.run([sys.executable, "-c", probe], env=driver_env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=90)
    try:
        return int(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


def wait_for_nodes(driver_env: dict[str, str], count: int, nodes: list, timeout: float = 150) -> None:
    """Until ``count`` nodes are alive; fails early, with logs, if one of ``nodes`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        for node in nodes:
            if node is not None:
                assert node.proc.poll() is None, f"ray start exited {node.proc.returncode}:\n{node.log_tail()}"
        if alive_nodes(driver_env) >= count:
            return
        assert time.monotonic() < deadline, f"{count} nodes not up after {timeout} s:\n" + "\n".join(
            n.log_tail(2000) for n in nodes if n is not None)
        time.sleep(1)


@dataclass
class LocalCluster:
    """A token-authenticated Ray head on loopback (worker nodes: ``start_worker_node``)."""

    home: Path
    env: dict[str, str]
    """Environment of a driver or CLI call on this cluster (token auth on)."""
    token: str
    head: RayNode | None = None

    @property
    def gcs_address(self) -> str:
        assert self.head is not None
        return f"127.0.0.1:{self.head.ports['gcs']}"

    @property
    def dashboard(self) -> str:
        assert self.head is not None
        return f"http://127.0.0.1:{self.head.ports['dashboard']}"

    def driver_env(self, **extra: str) -> dict[str, str]:
        """Environment for ``python -m workflows...`` joining this cluster."""
        return {**self.env, "RAY_ADDRESS": self.gcs_address, **extra}


    def start_head(self, tmp_path: Path, num_cpus: int = 4, resources: str | None = None) -> RayNode:
        names = ["gcs", "dashboard", "client", "agent_http", "agent_grpc", "env_agent", "metrics",
                 "node_manager", "object_manager", "dashboard_metrics", "autoscaler_metrics"]
        ports = dict(zip(names, free_ports(len(names))))
        args = ["--head", "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
                f"--port={ports['gcs']}",
                f"--dashboard-port={ports['dashboard']}", f"--ray-client-server-port={ports['client']}",
                f"--dashboard-agent-listen-port={ports['agent_http']}",
                f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
                f"--runtime-env-agent-port={ports['env_agent']}", f"--metrics-export-port={ports['metrics']}",
                f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}"]
        if resources:
            args.append(f"--resources={resources}")
        node = start_node(args, {**self.env}, tmp_path, "head", {"DASHBOARD_METRIC_PORT": str(ports["dashboard_metrics"]),
                                                    "AUTOSCALER_METRIC_PORT": str(ports["autoscaler_metrics"])})
        node.ports = ports
        self.head = node
        self.wait_for_nodes(1)
        return node

    def wait_for_nodes(self, count: int, timeout: float = 150) -> None:
        wait_for_nodes(self.driver_env(), count, [self.head], timeout)

    def stop(self) -> list[int]:
        """Stop every node this cluster started; returns processes left running (should be none)."""
        left: list[int] = []
        for node in [self.head] if self.head else []:
            stop_group(node.proc)
            deadline = time.monotonic() + 15  # workers in their own groups notice the raylet is gone
            while processes_mentioning(str(node.temp_dir)) and time.monotonic() < deadline:
                time.sleep(0.5)
            left += group_alive(node.proc.pid) + processes_mentioning(str(node.temp_dir))
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        return left


def new_cluster(tmp_path: Path) -> LocalCluster:
    """A cluster description with its own HOME and a freshly generated token (no node started yet)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {**base_env(home), "RAY_AUTH_MODE": "token"}
    generated = ray_cli(["get-auth-token", "--generate"], env, timeout=60)
    assert generated.returncode == 0, generated.stderr
    token = (home / ".ray" / "auth_token").read_text().strip()
    assert token and generated.stdout.strip() == token
    return LocalCluster(home=home, env=env, token=token)
