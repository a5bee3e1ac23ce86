"""Print infra/runtime_env.yaml as JSON for ``ray job submit --runtime-env-json``, plus secrets from this shell.

``ray job submit`` takes either ``--runtime-env FILE`` or ``--runtime-env-json JSON``,
not both. To hand a job S3 or MLflow credentials without writing them into a file::

    export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... AWS_REGION=...   # AWS_ENDPOINT_URL for MinIO
    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json "$(python infra/runtime_env_json.py)" -- python -m workflows.train ...

Only the variables below that are set in this shell are added. The job's driver and
every worker it starts get them (Ray workers do not inherit a driver's environment;
a runtime env's ``env_vars`` reach both). Anyone holding the cluster token can read a
job's runtime env in the dashboard, as they can run code on the cluster.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

FORWARDED = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
)


def runtime_env(base: Path, environ: dict[str, str]) -> dict:
    env = yaml.safe_load(base.read_text()) or {}
    env_vars = dict(env.get("env_vars") or {})
    env_vars.update({k: environ[k] for k in FORWARDED if environ.get(k)})
    env["env_vars"] = env_vars
    return env


if __name__ == "__main__":
    base = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("runtime_env.yaml")
    print(json.dumps(runtime_env(base, dict(os.environ))))
