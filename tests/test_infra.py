"""infra/: the local stack really starts and stops; cluster configs are valid and run real commands.

- ``infra/local_stack.sh``: its command line here; up -> Ray (token auth), S3 (moto) and
  MLflow answer -> down -> nothing left is in ``tests/test_cluster.py``, which runs
  the multi-node and fault tests on that stack.
- ``infra/cluster-aws.yaml``: valid against the schema shipped in the installed Ray,
  accepted by Ray's own config checks, GPU workers that autoscale.
- ``infra/kuberay/``: what KubeRay needs, entrypoints that the project's CLI accepts,
  no credentials in the files.
- ``infra/Dockerfile``: Ray's image at the Ray version pyproject.toml pins.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
STACK = INFRA / "local_stack.sh"
KUBERAY = INFRA / "kuberay"


def pinned_ray_version() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        match = re.fullmatch(r"ray(\[[^\]]*\])?==([0-9.]+)", dep.replace(" ", ""))
        if match:
            return match.group(2)
    raise AssertionError("pyproject.toml does not pin ray==X.Y.Z")


# --- local stack -------------------------------------------------------------------

def _stack(args: list[str], state: Path, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(["bash", str(STACK), *args], env={**os.environ, "STACK_DIR": str(state), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def test_local_stack_script_basics(tmp_path: Path) -> None:
    assert os.access(STACK, os.X_OK), "infra/local_stack.sh must be executable"
    assert subprocess.run(["bash", "-n", str(STACK)], capture_output=True).returncode == 0
    assert _stack(["help"], tmp_path).returncode == 0
    assert _stack(["bogus"], tmp_path).returncode == 2
    not_up = _stack(["env"], tmp_path)
    assert not_up.returncode != 0 and "not up" in not_up.stderr
    assert _stack(["status"], tmp_path).returncode != 0
    assert _stack(["down"], tmp_path).returncode == 0  # nothing started: nothing to stop
    text = STACK.read_text()
    assert not re.search(r"^\s*[^#\n]*\bray stop\b", text, re.M), "down must not run `ray stop`"
    assert "/.stack/" in (ROOT / ".gitignore").read_text().split()


# --- AWS cluster launcher ------------------------------------------------------------

def test_cluster_aws_is_valid_for_the_installed_ray() -> None:
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "cluster-aws.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # Ray's own checks (`ray up` runs the same)

    assert config["provider"]["type"] == "aws"
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = {name: node for name, node in nodes.items() if name != config["head_node_type"]}
    assert workers
    for name, node in workers.items():
        assert node["resources"].get("GPU", 0) >= 1, f"worker type {name} requests no GPU"
        assert node["node_config"]["InstanceType"].startswith(("g", "p")), name
        assert node["min_workers"] < node["max_workers"] <= config["max_workers"], f"{name} does not autoscale"

    version = pinned_ray_version()
    for key in ("image", "head_image", "worker_image"):
        if key in config["docker"]:
            image, tag = config["docker"][key].split(":")
            assert image == "rayproject/ray" and tag.startswith(f"{version}-py311"), config["docker"][key]
    # The project (with its pins) is installed on every node; secrets never live here.
    assert any("pip install" in cmd and "siamese-oneshot" in cmd for cmd in config["setup_commands"])
    assert any("RAY_AUTH_MODE=token" in cmd for cmd in config["head_start_ray_commands"])
    assert any("RAY_AUTH_MODE=token" in cmd for cmd in config["worker_start_ray_commands"])


# --- KubeRay ---------------------------------------------------------------------------

def _manifests() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path, doc))
    return docs


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    specs = []
    for path, doc in _manifests():
        if doc["kind"] == "RayCluster":
            specs.append((path.name, doc["spec"]))
        elif doc["kind"] == "RayJob":
            specs.append((path.name, doc["spec"]["rayClusterSpec"]))
    return specs


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def test_kuberay_manifests_have_what_kuberay_needs() -> None:
    manifests = _manifests()
    kinds = {doc["kind"] for _, doc in manifests}
    assert {"RayCluster", "RayJob", "ConfigMap"} <= kinds
    version = pinned_ray_version()
    for path, doc in manifests:
        assert doc["metadata"]["name"], path
        if doc["kind"] in ("RayCluster", "RayJob"):
            assert doc["apiVersion"] == "ray.io/v1", path
    for name, spec in _ray_cluster_specs():
        assert spec["rayVersion"] == version, name
        assert spec.get("authOptions", {}).get("mode") == "token", f"{name}: Ray token auth is off"
        head = spec["headGroupSpec"]
        assert isinstance(head["rayStartParams"], dict), name
        for container in _containers(spec):
            assert container["image"] and container["name"], name
        assert spec["workerGroupSpecs"], name
        for group in spec["workerGroupSpecs"]:
            for key in ("groupName", "replicas", "minReplicas", "maxReplicas"):
                assert key in group, f"{name}: worker group without {key}"
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
            assert isinstance(group["rayStartParams"], dict), name
            for container in group["template"]["spec"]["containers"]:
                limits = container["resources"]["limits"]
                assert int(limits["nvidia.com/gpu"]) >= 1, f"{name}: worker group {group['groupName']} has no GPU"
    for path, doc in manifests:
        if doc["kind"] == "RayJob":
            assert doc["spec"]["entrypoint"].strip() and doc["spec"]["rayClusterSpec"], path


def test_kuberay_settings_come_from_secret_and_configmap() -> None:
    secretish = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL", re.I)
    configmaps = {doc["metadata"]["name"]: doc for _, doc in _manifests() if doc["kind"] == "ConfigMap"}
    for doc in configmaps.values():
        leaked = [key for key in doc.get("data", {}) if secretish.search(key)]
        assert not leaked, f"ConfigMap {doc['metadata']['name']} holds credentials: {leaked}"
    assert not [d for _, d in _manifests() if d["kind"] == "Secret"], "ship no Secret manifests (kubectl create secret)"
    for name, spec in _ray_cluster_specs():
        for container in _containers(spec):
            env = {e["name"]: e for e in container.get("env", [])}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert "value" not in env[key] and env[key]["valueFrom"]["secretKeyRef"]["name"], (name, key)
            for var in env.values():
                if secretish.search(var["name"]):
                    assert "value" not in var and "secretKeyRef" in var.get("valueFrom", {}), (name, var["name"])
            refs = [src["configMapRef"]["name"] for src in container.get("envFrom", []) if "configMapRef" in src]
            assert refs and all(ref in configmaps for ref in refs), name
            assert "MLFLOW_TRACKING_URI" in configmaps[refs[0]]["data"], name
    text = "\n".join(p.read_text() for p in KUBERAY.glob("*.yaml"))
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "an AWS access key id in the manifests"


def test_kuberay_entrypoints_are_real_commands() -> None:
    jobs = [(path, doc) for path, doc in _manifests() if doc["kind"] == "RayJob"]
    assert jobs
    for path, doc in jobs:
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[:2] == ["python", "-m"], f"{path.name}: entrypoint is not `python -m <module> ...`"
        module = argv[2]
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"{path.name}: no module {module} in the repo"
        # The project's own CLI parses these exact flags and resolves a configuration.
        env = {**os.environ, "MLFLOW_TRACKING_URI": "http://mlflow.example:5000"}
        run = subprocess.run([sys.executable, "-m", module, *argv[3:], "--print-config"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, f"{path.name}: {' '.join(argv)} is refused:\n{run.stderr}"
        config = yaml.safe_load(run.stdout)
        flags = dict(zip(argv[3::2], argv[4::2]))
        if "--data" in flags:
            assert config["data"]["uri"] == flags["--data"]
        if "--workers" in flags:
            assert config["cluster"]["workers"] == int(flags["--workers"])
            group = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
            gpus = float(flags.get("--gpus-per-worker", 0))
            assert group["maxReplicas"] * int(group["template"]["spec"]["containers"][0]["resources"]["limits"]
                                              ["nvidia.com/gpu"]) >= config["cluster"]["workers"] * gpus
        if "--storage-path" in flags:
            assert config["cluster"]["storage_path"] == flags["--storage-path"]
            assert flags["--storage-path"].startswith("s3://"), "checkpoints on a cluster belong in object storage"


# --- Docker image -------------------------------------------------------------------------

def test_dockerfile_uses_rays_image_at_the_pinned_version() -> None:
    lines = [line.strip() for line in (INFRA / "Dockerfile").read_text().splitlines()]
    froms = [line.split()[1] for line in lines if line.upper().startswith("FROM ")]
    assert froms, "no FROM"
    image, tag = froms[0].split(":")
    assert image == "rayproject/ray"
    assert tag.split("-")[0] == pinned_ray_version(), f"{froms[0]} does not match ray=={pinned_ray_version()}"
    assert re.search(r"-py311\b", tag), "the image's Python must match the project's (3.11)"
    assert any("pip install" in line for line in lines)
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv/", "data/", "mlflow.db", "runs/", ".git/"):
        assert entry in ignored, f".dockerignore misses {entry}"


def test_the_cluster_paths_leave_the_instance_credentials_alone() -> None:
    """AWS_EC2_METADATA_DISABLED=true belongs to the local stack and the tests only: set in a job's runtime
    env, the AWS launcher or KubeRay, it would hide the node's instance-profile credentials from the job."""
    cluster_files = [ROOT / "infra" / "runtime_env.yaml", ROOT / "infra" / "cluster-aws.yaml",
                     *sorted((ROOT / "infra" / "kuberay").glob("*.yaml")), ROOT / "infra" / "Dockerfile"]
    assert len(cluster_files) >= 5 and all(p.is_file() for p in cluster_files)
    for path in cluster_files:
        assert "AWS_EC2_METADATA_DISABLED" not in path.read_text(), path
    runtime_env = yaml.safe_load((ROOT / "infra" / "runtime_env.yaml").read_text())
    assert "AWS_EC2_METADATA_DISABLED" not in (runtime_env.get("env_vars") or {})
