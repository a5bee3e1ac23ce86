"""From laptop to cluster, on one machine: two Ray nodes, S3 and an MLflow server, and faults.

The documented local stack (``infra/local_stack.sh up``: an authenticated Ray head,
moto as the S3-compatible store, an MLflow server over HTTP with artifacts in S3)
plus a second Ray node started with ``ray start --address``, all on loopback. The
training job runs as a user runs it: ``python -m workflows.train`` as a driver
joining the cluster, data read from and checkpoints written to S3.

Faults, each on a real run: a Train worker killed mid-epoch, the driver killed,
the object store unreachable for a few seconds and for good, and bad
configuration; then no secret anywhere in MLflow or the job's output.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
from flaky_proxy import FlakyProxy
from ray_nodes import PROJECT_ROOT, RayNode, session_members, start_worker_node, stop_group, wait_for_nodes
from s3_server import closed_port, free_ports

pytestmark = pytest.mark.integration

STACK = PROJECT_ROOT / "infra" / "local_stack.sh"
EXPERIMENT = "cluster-test"
BUCKET = "cluster-test"
RUN_TIMEOUT_S = 420
SPREAD_EPOCHS = 4
"""Epochs of the two-node run: the worker is killed after epoch 1, so two epochs remain to resume."""


@dataclass
class Stack:
    env: dict[str, str]
    """A driver's environment: what ``local_stack.sh env`` prints, on top of a clean environment."""
    state: Path
    tmp: Path
    worker: RayNode
    outputs: list[str] = field(default_factory=list)
    """Everything the jobs printed (checked for secrets at the end)."""
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def tracking_uri(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)


def _http_status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _stack(args: list[str], state: Path, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(STACK), *args], env={**os.environ, "STACK_DIR": str(state), **env},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def stack(omniglot_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from conftest import SMALL_TEST, SMALL_TRAIN, SMALL_VALIDATION
    from omniglot_sources import make_source

    tmp = tmp_path_factory.mktemp("cluster")
    state = Path(tempfile.mkdtemp(prefix="stk", dir="/tmp"))  # short: Ray's unix sockets live below it
    names = ["STACK_RAY_PORT", "STACK_DASHBOARD_PORT", "STACK_CLIENT_PORT", "STACK_AGENT_PORT",
             "STACK_S3_PORT", "STACK_MLFLOW_PORT"]
    settings = {**dict(zip(names, map(str, free_ports(len(names))))), "STACK_BUCKET": BUCKET,
                "STACK_PYTHON": sys.executable, "STACK_START_TIMEOUT": "300", "STACK_RAY_CPUS": "2",
                "STACK_MULTI_NODE": "1"}
    worker = None
    sessions: dict[str, int] = {}
    try:
        started = time.monotonic()
        up = _stack(["up"], state, settings, timeout=600)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((state / "logs").glob("*.log")))
        assert up.returncode == 0, f"stack up failed:\n{up.stdout}\n{up.stderr}\n{logs}"
        print(f"stack up in {time.monotonic() - started:.0f}s")
        sessions = {name: int((state / f"{name}.pid").read_text()) for name in ("ray", "s3", "mlflow")}
        printed = _stack(["env"], state, settings)
        exported = dict(line[len("export "):].split("=", 1) for line in printed.stdout.splitlines()
                        if line.startswith("export "))
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
        env = {**clean, **exported, "HOME": str(tmp)}
        # the second node: a worker joining the head (token from the stack), two CPUs
        gcs_port = env["RAY_ADDRESS"].rsplit(":", 1)[1]
        worker = start_worker_node(f"127.0.0.2:{gcs_port}", env, tmp, "worker-node", num_cpus=2)
        wait_for_nodes(env, 2, [worker])
        source = make_source(omniglot_dir, tmp / "source", SMALL_TRAIN | SMALL_VALIDATION | SMALL_TEST)
        ingest = subprocess.run([sys.executable, "-m", "workflows.ingest", "--source", str(source),
                                 "--dest", f"s3://{BUCKET}/omniglot", "--allow-subset"],
                                env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
        assert ingest.returncode == 0, ingest.stdout[-3000:] + ingest.stderr[-5000:]
        yield Stack(env=env, state=state, tmp=tmp, worker=worker, outputs=[ingest.stdout + ingest.stderr],
                    settings=settings)
    finally:
        if worker is not None:
            stop_group(worker.proc)
        # A short grace before SIGKILL: Ray's gcs_server and dashboard sit ~30 s on SIGTERM, and
        # nothing of this stack needs a clean shutdown (moto and Ray keep state in memory).
        down_started = time.monotonic()
        down = _stack(["down"], state, {**settings, "STACK_STOP_TIMEOUT": "6"}, timeout=300)
        print(f"stack down in {time.monotonic() - down_started:.0f}s")
    # `down` stops exactly what `up` started: no process of its sessions, no port still bound
    assert down.returncode == 0, down.stderr
    left = {name: session_members(sid) for name, sid in sessions.items()}
    assert not any(left.values()), f"processes left after down: {left}"
    for name in names:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", int(settings[name])))  # nothing listens any more
    assert _stack(["status"], state, settings).returncode != 0
    shutil.rmtree(state, ignore_errors=True)


def train_command(name: str, *extra: str, epochs: int = 2, pairs: int = 512) -> list[str]:
    return [sys.executable, "-m", "workflows.train", "--data", f"s3://{BUCKET}/omniglot",
            "--storage-path", f"s3://{BUCKET}/runs", "--name", name, "--experiment", EXPERIMENT,
            "--workers", "2", "--epochs", str(epochs),
            "--set", f"pairs.pairs_per_epoch={pairs}", "--set", "training.batch_size=32",
            "--set", "pairs.distorted_copies=0", "--set", "training.threads=1",
            "--set", "tracking.registered_model=none", "--set", f"tracking.run_name={name}", *extra]


def run_job(stack: Stack, command: list[str], env: dict[str, str] | None = None,
            timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=env or stack.env, cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=timeout)
    stack.outputs.append(done.stdout + done.stderr)
    return done


def start_job(stack: Stack, command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with log.open("w") as handle:
        return subprocess.Popen(command, env=env or stack.env, cwd=PROJECT_ROOT, stdout=handle,
                                stderr=subprocess.STDOUT)


def run_named(stack: Stack, name: str):
    runs = stack.client().search_runs([stack.client().get_experiment_by_name(EXPERIMENT).experiment_id],
                                      filter_string=f"attributes.run_name = '{name}'")
    return runs


def wait_for_epoch(stack: Stack, name: str, epoch: int, proc: subprocess.Popen, log: Path,
                   timeout: float = RUN_TIMEOUT_S) -> float:
    """Until the run has logged ``epoch``'s validation metric (so its checkpoint is in storage)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"job exited {proc.returncode}:\n{log.read_text()[-8000:]}"
        experiment = stack.client().get_experiment_by_name(EXPERIMENT)
        runs = run_named(stack, name) if experiment is not None else []
        if runs and any(m.step >= epoch for m in
                        stack.client().get_metric_history(runs[0].info.run_id, "val_oneshot_accuracy")):
            return time.time()
        time.sleep(1)
    raise AssertionError(f"epoch {epoch} of {name} not logged within {timeout} s:\n{log.read_text()[-8000:]}")


def ray_probe(stack: Stack, code: str) -> str:
    done = subprocess.run([sys.executable, "-c", "import ray; ray.init(logging_level='ERROR', "
                           "log_to_driver=False)\n" + code], env=stack.env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def train_workers(stack: Stack) -> list[tuple[int, str]]:
    """(pid, node id) of the alive Ray Train workers, from Ray's state API."""
    out = ray_probe(stack, "from ray.util.state import list_actors\n"
                           "for a in list_actors(filters=[('class_name', '=', 'RayTrainWorker'), "
                           "('state', '=', 'ALIVE')]): print(a.pid, a.node_id)")
    return [(int(line.split()[0]), line.split()[1]) for line in out.splitlines() if line.strip()]


def history(stack: Stack, run_id: str, key: str = "val_oneshot_accuracy") -> list:
    return sorted(stack.client().get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))


def assert_average_went_on(stack: Stack, run_id: str, name: str) -> None:
    """The weights' moving average went on from the checkpoint after a restart: every kept
    checkpoint's step count is the steps of its epochs, each counted once."""
    steps = {m.step: int(m.value) for m in history(stack, run_id, "steps")}
    kept = checkpoints(stack, name)
    assert kept and all(payload["average_steps"] == sum(steps[e] for e in range(epoch + 1))
                        for epoch, payload in kept.items()), ({e: p["average_steps"] for e, p in kept.items()}, steps)


def checkpoint_epochs(stack: Stack, name: str) -> list[int]:
    return sorted(checkpoints(stack, name))


def checkpoints(stack: Stack, name: str) -> dict[int, dict]:
    """Each complete checkpoint under s3://BUCKET/runs/NAME: its ``model.pt`` payload, by epoch.

    Ray Train creates a checkpoint's folder before it uploads ``model.pt``; when
    the store vanishes in between, an empty folder is left that Ray never
    recorded. Such a folder must be empty (nothing half-written) and is not a checkpoint.
    """
    import pyarrow.fs as pafs

    from siamese_core import checkpoint as ckpt_io
    from workflows import storage

    saved = {k: os.environ.get(k) for k in stack.env if k.startswith("AWS_")}
    os.environ.update({k: v for k, v in stack.env.items() if k.startswith("AWS_")})
    try:
        loc = storage.locate(f"s3://{BUCKET}/runs/{name}")
        found = {}
        for info in loc.fs.get_file_info(pafs.FileSelector(loc.path)):
            if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_"):
                files = [f.base_name for f in loc.fs.get_file_info(pafs.FileSelector(info.path, recursive=True))
                         if f.type == pafs.FileType.File]
                if ckpt_io.MODEL_FILE not in files:
                    assert not files, f"{info.path} holds {files} but no {ckpt_io.MODEL_FILE}: a half-written checkpoint"
                    print(f"{info.path}: empty folder of an interrupted checkpoint upload")
                    continue
                local = Path(tempfile.mkdtemp(dir=stack.tmp))
                pafs.copy_files(info.path, str(local), source_filesystem=loc.fs,
                                destination_filesystem=pafs.LocalFileSystem())
                payload = ckpt_io.load_payload(str(local))
                found[int(payload["epoch"])] = payload
        return found
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --------------------------------------------------------------------------- the local stack

def test_local_stack_is_authenticated_and_prints_the_job_environment(stack: Stack) -> None:
    env, state = stack.env, stack.state
    assert oct((state / "ray_auth_token").stat().st_mode & 0o777) == "0o600"
    assert oct((state / "s3.env").stat().st_mode & 0o777) == "0o600"
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
        assert env.get(key), f"`env` does not export {key}"
    assert env["RAY_ADDRESS"] == f"127.0.0.1:{stack.settings['STACK_RAY_PORT']}"
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{stack.settings['STACK_S3_PORT']}"
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{stack.settings['STACK_MLFLOW_PORT']}"
    # Ray: the dashboard answers with the token and refuses without it or with a wrong one
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    dashboard = f"http://127.0.0.1:{stack.settings['STACK_DASHBOARD_PORT']}/api/version"
    assert _http_status(dashboard, {"Authorization": f"Bearer {token}"}) == 200
    assert _http_status(dashboard) == 401
    assert _http_status(dashboard, {"Authorization": "Bearer wrong"}) == 403
    # S3: the bucket exists, the stack's keys work and other keys are refused
    import boto3
    from botocore.exceptions import ClientError

    def s3(key: str, secret: str):
        return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                            aws_access_key_id=key, aws_secret_access_key=secret)

    assert BUCKET in [b["Name"] for b in s3(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]).list_buckets()["Buckets"]]
    with pytest.raises(ClientError):
        s3("AKIAWRONGWRONGWRONG0", "wrong").list_buckets()
    assert _http_status(f"{env['MLFLOW_TRACKING_URI']}/health") == 200
    status = _stack(["status"], state, stack.settings)
    assert status.returncode == 0 and status.stdout.count("answering") == 3, status.stdout


# --------------------------------------------------------------------------- multi-node, a worker killed

@pytest.fixture(scope="module")
def spread_run(stack: Stack) -> dict:
    """Two workers on two nodes (STRICT_SPREAD), data and checkpoints in S3; one worker killed mid-run.

    One run serves two checks (it is the slowest thing here): where the workers ran and
    what MLflow recorded, and how the run came back from the lost worker.
    """
    log = stack.tmp / "spread.log"
    started = time.monotonic()
    proc = start_job(stack, train_command("spread", "--set", "cluster.placement_strategy=STRICT_SPREAD",
                                          "--set", "optim.ema_decay=0.99", epochs=SPREAD_EPOCHS, pairs=1024), log)
    try:
        # Look the workers up first (a Ray state query takes seconds, and an epoch here ~4 s):
        # the kill must land right after epoch 1's checkpoint, not after the last epoch.
        wait_for_epoch(stack, "spread", 0, proc, log)
        workers = train_workers(stack)
        pid, _ = workers[-1]
        wait_for_epoch(stack, "spread", 1, proc, log)
        os.kill(pid, signal.SIGKILL)  # a worker process dies mid-epoch
        killed_at = time.time()
        rc = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    stack.outputs.append(output)
    print(f"two-node run with a killed worker: {time.monotonic() - started:.0f}s")
    return {"rc": rc, "output": output, "workers": workers, "killed_at": killed_at}


def test_two_workers_on_two_nodes_with_s3_and_mlflow_server(stack: Stack, spread_run: dict) -> None:
    assert spread_run["rc"] == 0, spread_run["output"][-8000:]
    assert len({node for _, node in spread_run["workers"]}) == 2, spread_run["workers"]  # Ray's own view
    [run] = run_named(stack, "spread")
    assert run.info.status == "FINISHED"
    assert run.data.params["data.uri"] == f"s3://{BUCKET}/omniglot"
    assert run.data.params["cluster.storage_path"] == f"s3://{BUCKET}/runs"
    assert run.data.metrics["workers"] == 2
    assert run.data.metrics["worker_nodes"] == 2  # one worker on each node, also after the restart
    # the quiet console: the display's line per epoch, none of Ray Train's or Ray Data's own lines
    output = spread_run["output"]
    for noise in ("TrainingReport", "Checkpoint successfully created", "Reporting training result", "Traceback"):
        assert noise not in output, (noise, output[-4000:])
    shown = [int(e) for e in re.findall(r"^training: epoch (\d+) \(", output, flags=re.M)]
    # each shown once, in order (two epochs logged within one 2 s poll show only the later)
    assert shown == sorted(set(shown)) and shown[-1] == SPREAD_EPOCHS - 1, output[-4000:]
    assert 0.0 <= run.data.metrics["test_oneshot_accuracy"] <= 1.0
    # artifacts went through the MLflow server into the object store
    assert "config.yaml" in {a.path for a in stack.client().list_artifacts(run.info.run_id)}
    assert checkpoint_epochs(stack, "spread")  # checkpoints are in S3


def test_killed_worker_restores_from_last_checkpoint(stack: Stack, spread_run: dict) -> None:
    assert spread_run["rc"] == 0, spread_run["output"][-8000:]
    [run] = run_named(stack, "spread")
    points = history(stack, run.info.run_id)
    assert sorted({m.step for m in points}) == list(range(SPREAD_EPOCHS))  # complete history, one MLflow run
    killed_at = spread_run["killed_at"]
    before = [m.step for m in points if m.timestamp < killed_at * 1000]
    assert before and all([m.step for m in points].count(s) == 1 for s in before)  # checkpointed epochs not redone
    after = [m for m in points if m.timestamp >= killed_at * 1000]
    recovery_s = min(m.timestamp for m in after) / 1000 - killed_at
    restored = [int(e) for e in re.findall(r"workers restarted from the checkpoint of epoch (\d+)",
                                           spread_run["output"])]
    assert restored and restored[0] >= max(before), restored  # the restart says where it went on from
    # The pair stage drew each epoch's own pairs, also after the restart.
    drawn = history(stack, run.info.run_id, "pairs_epoch")
    assert drawn and all(m.value == m.step for m in drawn), [(m.step, m.value) for m in drawn]
    assert_average_went_on(stack, run.info.run_id, "spread")
    print(f"worker killed after epoch {max(before)}: next epoch logged {recovery_s:.1f}s later; "
          f"epochs trained twice: {sorted({m.step for m in after} & set(before)) or 'none'}")


def test_killed_driver_resumes_when_resubmitted(stack: Stack) -> None:
    log = stack.tmp / "kill-driver.log"
    command = train_command("kill-driver", "--set", "optim.ema_decay=0.99", epochs=3, pairs=1024)
    proc = start_job(stack, command, log)
    try:
        wait_for_epoch(stack, "kill-driver", 1, proc, log)
        proc.send_signal(signal.SIGKILL)  # the whole job's driver is gone
        killed_at = time.time()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    stack.outputs.append(log.read_text())
    deadline = time.monotonic() + 120
    while train_workers(stack) and time.monotonic() < deadline:  # Ray reaps the dead job's workers
        time.sleep(2)
    done = run_job(stack, command)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-8000:]
    assert "Resuming 'kill-driver'" in done.stdout
    [run] = run_named(stack, "kill-driver")  # the same MLflow run, continued
    assert run.info.status == "FINISHED"
    points = history(stack, run.info.run_id)
    assert sorted({m.step for m in points}) == [0, 1, 2]
    before = [m.step for m in points if m.timestamp < killed_at * 1000]
    assert before and all([m.step for m in points].count(s) == 1 for s in before)
    after = [m for m in points if m.timestamp >= killed_at * 1000]
    # The resubmitted job's pair stage went on from the restored epoch instead of drawing epoch 0 again.
    drawn = history(stack, run.info.run_id, "pairs_epoch")
    assert drawn and all(m.value == m.step for m in drawn), [(m.step, m.value) for m in drawn]
    assert_average_went_on(stack, run.info.run_id, "kill-driver")
    print(f"driver killed after epoch {max(before)}; resubmitted, next epoch logged "
          f"{min(m.timestamp for m in after) / 1000 - killed_at:.1f}s after the kill; "
          f"epochs trained twice: {sorted({m.step for m in after} & set(before)) or 'none'}")


@dataclass
class ProxiedJob:
    """A training job whose S3 traffic goes through a proxy the test switches off and on."""

    proc: subprocess.Popen
    proxy: FlakyProxy
    log: Path
    output: str = ""


@contextlib.contextmanager
def job_through_proxy(stack: Stack, name: str, command: list[str]) -> Iterator[ProxiedJob]:
    """Start ``command`` with S3 behind a :class:`FlakyProxy`; on leaving, the proxy is down,
    the job has ended and its output is in ``job.output`` (and in the stack's outputs)."""
    proxy = FlakyProxy(int(stack.env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    log = stack.tmp / f"{name}.log"
    job = ProxiedJob(start_job(stack, command, log, env={**stack.env, "AWS_ENDPOINT_URL": proxy.url}), proxy, log)
    try:
        yield job
    finally:
        proxy.down()
        if job.proc.poll() is None:
            job.proc.kill()
        job.output = log.read_text()
        stack.outputs.append(job.output)


def test_object_store_briefly_unavailable_leaves_no_gap(stack: Stack) -> None:
    """An 8 s outage after epoch 1. Usually ridden out (retries, or a restart from the last
    checkpoint). If it hits Ray Train's controller writing its own state (Ray 2.60 never
    retries that), or every allowed restart falls inside it, the job must stop with a clear
    error naming the storage call, and the same command resume it.
    Either way the history ends complete, every logged epoch with its checkpoint."""
    command = train_command("s3-blip", "--set", "cluster.checkpoints_to_keep=10", epochs=3, pairs=1024)
    with job_through_proxy(stack, "s3-blip", command) as job:
        wait_for_epoch(stack, "s3-blip", 1, job.proc, job.log)
        job.proxy.down()
        time.sleep(8)
        job.proxy.up()
        rc = job.proc.wait(timeout=RUN_TIMEOUT_S)
    output = job.output
    if rc != 0:  # the controller case, or every restart within the outage (docs/cluster.md, "When things fail")
        assert "error: training failed" in output, output[-8000:]
        assert "checkpoint_manager_snapshot" in output or "could not read the last checkpoint" in output, output[-8000:]
        again = run_job(stack, command)
        assert again.returncode == 0, again.stdout[-5000:] + again.stderr[-8000:]
        assert "Resuming 's3-blip'" in again.stdout
    restarts = output.count("workers restarted from the checkpoint")
    print("object store back after 8 s: " + (f"ridden out ({restarts} restart(s) from a checkpoint)" if rc == 0
                                               else "the job stopped; resumed by re-running"))
    [run] = run_named(stack, "s3-blip")
    logged = sorted({m.step for m in history(stack, run.info.run_id)})
    assert logged == [0, 1, 2]
    assert set(logged) <= set(checkpoint_epochs(stack, "s3-blip"))  # every logged epoch has its checkpoint


def test_object_store_gone_fails_clearly(stack: Stack) -> None:
    command = train_command("s3-gone", "--set", "cluster.max_failures=0", epochs=6, pairs=1024)  # no restart: one outage window
    with job_through_proxy(stack, "s3-gone", command) as job:
        wait_for_epoch(stack, "s3-gone", 0, job.proc, job.log)
        job.proxy.down()
        lost_at = time.monotonic()
        rc = job.proc.wait(timeout=RUN_TIMEOUT_S)
        failed_after_s = time.monotonic() - lost_at
    output = job.output
    assert rc == 1, output[-5000:]  # a failure at run time (docs/cluster.md, exit codes)
    assert "error: training failed" in output and f"s3://{BUCKET}/runs" in output, output[-5000:]
    print(f"object store gone: the job failed {failed_after_s:.0f}s later with: "
          + next(line for line in output.splitlines() if line.startswith("error: training failed")))
    [run] = run_named(stack, "s3-gone")
    assert run.info.status == "FAILED"
    logged = {m.step for m in history(stack, run.info.run_id)}
    assert logged <= set(checkpoint_epochs(stack, "s3-gone"))  # no epoch reported without its checkpoint


@pytest.mark.parametrize("case", ["unknown key", "missing bucket", "wrong credentials", "unreachable MLflow"])
def test_bad_configuration_fails_before_ray_is_contacted(stack: Stack, case: str) -> None:
    nowhere = f"127.0.0.1:{closed_port()}"  # if the job asked Ray for anything, it would hang or fail here
    env = {**stack.env, "RAY_ADDRESS": nowhere}
    command = train_command(f"bad-{case.replace(' ', '-')}")
    expected = {
        "unknown key": ("--set", "optim.lrr=0.1", "unknown config key 'optim.lrr'"),
        "missing bucket": ("--storage-path", "s3://no-such-bucket-here/runs", "no-such-bucket-here"),
        "wrong credentials": (None, None, "access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"),
        "unreachable MLflow": (None, None, "not reachable"),
    }[case]
    if expected[0]:
        command += [expected[0], expected[1]]
    if case == "wrong credentials":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    if case == "unreachable MLflow":
        env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{closed_port()}"
        env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"
    started = time.monotonic()
    done = run_job(stack, command, env=env, timeout=180)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert expected[2] in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    print(f"{case}: exit 2 in {time.monotonic() - started:.1f}s: {done.stderr.strip().splitlines()[-1][:200]}")


def test_impossible_resources_fail_before_anything_is_scheduled(stack: Stack) -> None:
    done = run_job(stack, train_command("too-big", "--gpus-per-worker", "1"), timeout=180)
    assert done.returncode == 2
    assert "GPU" in done.stderr and "cluster has 0" in done.stderr, done.stderr[-3000:]
    assert not train_workers(stack)
    assert run_named(stack, "too-big") == []  # refused before the MLflow run was made


def test_no_secret_in_mlflow_or_job_output(stack: Stack) -> None:
    """Runs last in this module: everything the jobs above logged or printed."""
    secrets = [stack.env["AWS_SECRET_ACCESS_KEY"], Path(stack.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()]
    assert all(len(s) >= 16 for s in secrets)
    client = stack.client()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) >= 3
    for run in runs:
        text = repr(run.data.params) + repr(run.data.tags) + repr(run.data.metrics)
        assert not any(s in text for s in secrets), run.info.run_id
    # every artifact of every run, where the MLflow server keeps them: s3://BUCKET/mlartifacts
    import boto3

    s3 = boto3.client("s3", endpoint_url=stack.env["AWS_ENDPOINT_URL"], region_name=stack.env["AWS_REGION"],
                      aws_access_key_id=stack.env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=secrets[0])
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="mlartifacts/")
            for o in page.get("Contents", [])]
    assert any(k.endswith("config.yaml") for k in keys) and any(k.endswith(".png") for k in keys)
    for key in keys:
        data = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert not any(s.encode() in data for s in secrets), key
    assert len(stack.outputs) >= 4
    for output in stack.outputs:
        assert not any(s in output for s in secrets)
