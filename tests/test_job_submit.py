"""The documented local cluster, for real: token auth, loopback, ``ray job submit``.

Does what docs/cluster.md "Local Ray cluster (ray job submit)" and infra/local-ray.md tell a
user to type, in a private sandbox:

- a token generated with ``ray get-auth-token --generate`` under a temporary HOME
  (the user's real ``~/.ray`` is never read or written);
- an authenticated head (``RAY_AUTH_MODE=token``, loopback only) started with
  ``ray start --head --block`` as a subprocess in its own process group, on free
  ports and its own ``--temp-dir`` so it cannot collide with the test session's
  in-process Ray or any other Ray on the machine;
- the tiny training submitted with ``ray job submit --working-dir <project>
  --runtime-env infra/runtime_env.yaml``, run to SUCCEEDED, and its MLflow run
  found in the sqlite store the job wrote;
- a submission without the token, and one with a wrong token, refused;
- only that process group stopped (never a bare ``ray stop``, which would stop
  every Ray on the machine), and checked gone.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from ray_nodes import new_cluster, ray_cli

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RUNTIME_ENV = PROJECT_ROOT / "infra" / "runtime_env.yaml"
JOB_TIMEOUT_S = 420  # the job took 272 s on 2 cores at load average ~20
EXPERIMENT = "job-submit-test"


def test_driver_leaves_job_env_vars_to_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a submitted job, the driver must not repeat the job's env vars (Ray refuses the merge)."""
    from workflows import ray_setup

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert ray_setup._job_env_var_keys() == set()
    job = {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert ray_setup._job_env_var_keys() == {"MLFLOW_DISABLE_TELEMETRY"}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": None}))
    assert ray_setup._job_env_var_keys() == set()


def test_runtime_env_excludes_the_bulk() -> None:
    import yaml

    excludes = set(yaml.safe_load(RUNTIME_ENV.read_text())["excludes"])
    assert {".venv/", "data/", "mlflow.db", "mlartifacts/", "runs/", ".git/"} <= excludes


def _http(url: str, token: str | None, timeout: float = 10) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


@pytest.mark.integration
def test_authenticated_local_cluster_runs_training_job(small_shards: str, tmp_path: Path) -> None:
    started = time.monotonic()
    out = tmp_path / "out"
    out.mkdir()
    # 1-2. the token (in a temporary HOME only) and the authenticated head, on free ports
    cluster = new_cluster(tmp_path)
    token, auth_env = cluster.token, cluster.env
    base_env = {k: v for k, v in auth_env.items() if k != "RAY_AUTH_MODE"}
    address = ""
    submission_id = f"test-{uuid.uuid4().hex[:8]}"
    job_logs = ""
    try:
        head = cluster.start_head(tmp_path, num_cpus=4)
        temp_dir = head.temp_dir
        address = cluster.dashboard
        deadline = time.monotonic() + 120
        while True:
            assert head.proc.poll() is None, f"ray start exited {head.proc.returncode}:\n{head.log_tail()}"
            try:
                status, _ = _http(f"{address}/api/jobs/", token, timeout=5)
            except (urllib.error.URLError, OSError):
                status = 0
            if status == 200:
                break
            assert time.monotonic() < deadline, f"dashboard not up after 120 s:\n{head.log_tail()}"
            time.sleep(1)
        head_up_s = time.monotonic() - started

        # 3. the job, exactly as documented (plus a fixed submission id and --no-wait)
        tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
        submit_args = ["job", "submit", "--address", address, "--submission-id", submission_id, "--no-wait",
                       "--working-dir", ".", "--runtime-env", str(RUNTIME_ENV.relative_to(PROJECT_ROOT)), "--",
                       "python", "-m", "workflows.train", "--data", small_shards,
                       "--tracking-uri", tracking_uri, "--storage-path", str(out / "runs"),
                       "--experiment", EXPERIMENT, "--workers", "2", "--epochs", "1",
                       # 256 pairs over 2 workers at batch 64: two real steps per worker
                       "--set", "pairs.pairs_per_epoch=256", "--set", "training.batch_size=64",
                       "--set", "pairs.distorted_copies=1", "--set", "training.threads=1",
                       "--set", "tracking.registered_model=none"]
        deadline = time.monotonic() + 90
        while True:  # the dashboard answers before the head's job agent has registered
            submit = ray_cli(submit_args, auth_env)
            if submit.returncode == 0 or "No available agent" not in submit.stderr or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        assert "Uploading package gcs://" in submit.stdout + submit.stderr

        deadline = time.monotonic() + JOB_TIMEOUT_S
        job_status = "PENDING"
        while time.monotonic() < deadline:
            code, body = _http(f"{address}/api/jobs/{submission_id}", token)
            assert code == 200, body
            job_status = json.loads(body)["status"]
            if job_status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(3)
        job_s = time.monotonic() - started - head_up_s
        logs = ray_cli(["job", "logs", "--address", address, submission_id], auth_env)
        job_logs = logs.stdout + logs.stderr
        if job_status not in ("SUCCEEDED", "FAILED", "STOPPED"):
            ray_cli(["job", "stop", "--address", address, "--no-wait", submission_id], auth_env)
        assert job_status == "SUCCEEDED", f"job {submission_id} is {job_status}; logs:\n{job_logs[-20000:]}"
        assert logs.returncode == 0 and "test one-shot accuracy" in job_logs
        # two Ray instances on this host (this head, the session's): workers must know which is theirs
        assert "Found multiple active Ray instances" not in job_logs

        # the working dir the job ran in: the project's code, none of the excluded bulk
        packages = [p for p in temp_dir.glob("session_2*/runtime_resources/working_dir_files/_ray_pkg_*")
                    if p.is_dir()]
        assert len(packages) == 1, packages
        shipped = {p.name for p in packages[0].iterdir()}
        assert {"workflows", "siamese_core", "pyproject.toml"} <= shipped, shipped
        assert not shipped & {".venv", "data", "mlflow.db", "mlartifacts", "runs", ".git"}, shipped
        assert sum(f.stat().st_size for f in packages[0].rglob("*") if f.is_file()) < 20 * 2**20

        # 4. the MLflow run the job wrote
        from mlflow.tracking import MlflowClient

        mlflow_client = MlflowClient(tracking_uri=tracking_uri)
        experiment = mlflow_client.get_experiment_by_name(EXPERIMENT)
        assert experiment is not None
        runs = mlflow_client.search_runs([experiment.experiment_id])
        assert len(runs) == 1
        run = runs[0]
        assert run.info.status == "FINISHED"
        assert run.data.params["cluster.workers"] == "2"
        assert run.data.params["data.uri"] == small_shards
        assert run.data.params["pairs.pairs_per_epoch"] == "256"
        history = mlflow_client.get_metric_history(run.info.run_id, "val_oneshot_accuracy")
        assert len(history) == 1 and 0.0 <= history[0].value <= 1.0
        assert 0.0 <= run.data.metrics["test_oneshot_accuracy"] <= 1.0
        assert run.data.metrics["steps"] >= 1  # the workers really trained

        # 5. without the token: refused
        no_token_home = tmp_path / "no-token-home"
        no_token_home.mkdir()
        refused = ray_cli(["job", "submit", "--address", address, "--no-wait", "--", "echo", "hi"],
                       {**base_env, "HOME": str(no_token_home)}, timeout=60)
        assert refused.returncode != 0
        assert "Authentication required" in refused.stdout + refused.stderr
        wrong = ray_cli(["job", "submit", "--address", address, "--no-wait", "--", "echo", "hi"],
                     {**auth_env, "HOME": str(no_token_home), "RAY_AUTH_TOKEN": uuid.uuid4().hex}, timeout=60)
        assert wrong.returncode != 0
        assert "Invalid authentication token" in wrong.stdout + wrong.stderr
        assert _http(f"{address}/api/jobs/", None)[0] == 401
        code, body = _http(f"{address}/api/jobs/", token)
        # the only submitted job is ours (drivers that merely connected, like the node probe, list as DRIVER)
        submitted = [job["submission_id"] for job in json.loads(body) if job.get("type") == "SUBMISSION"]
        assert code == 200 and submitted == [submission_id], body[-3000:]
        print(f"head up {head_up_s:.0f}s, job {job_s:.0f}s, total {time.monotonic() - started:.0f}s")
    except BaseException:
        if job_logs:
            print(f"--- job logs ({submission_id}) ---\n{job_logs[-20000:]}")
        if cluster.head is not None:
            print(f"--- head log ---\n{cluster.head.log_tail()}")
        raise
    finally:
        # 6. stop only what this test started, and check it is gone
        left = cluster.stop()
    assert cluster.head is not None and cluster.head.proc.returncode is not None
    assert not left, f"processes of the test's head still running: {left}"
