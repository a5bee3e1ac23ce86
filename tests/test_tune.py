"""The Ray Tune search: search space, seeded suggestions, and a real tiny search on a Ray cluster.

The integration part runs ``python -m workflows.tune`` against a token-authenticated
local cluster (``ray start``), interrupts it with SIGINT (Ctrl-C) once the first
trial has finished, runs the same command again to resume it, and then checks
MLflow, ASHA and the written best configuration.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from siamese_core.config import ConfigError
from workflows import config as job_config
from workflows import search_space, tune
from workflows.config import SearchSection

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLES, EPOCHS = 3, 2  # seed 7 draws lr 0.06, 0.06, 0.0005: the third is the one ASHA stops
EXPERIMENT = "t-tune"


# --------------------------------------------------------------------------- search space

def test_default_space_is_valid_and_covers_rates_momentum_l2_and_distortions() -> None:
    space = search_space.load(None)
    search_space.validate(space, job_config.build("demo"))
    keys = set(search_space.searched_keys(space))
    assert {"optim.lr", "optim.momentum", "optim.weight_decay", "pairs.distorted_copies",
            "distort.probability", "distort.rotation_deg", "distort.shear", "distort.translate_px"} <= keys
    assert any(k.startswith("optim.lr_multipliers.") for k in keys)


def test_the_mining_space_searches_the_mining_keys_and_is_valid() -> None:
    space = search_space.load("mining")
    search_space.validate(space, job_config.build("demo"))
    keys = set(search_space.searched_keys(space))
    assert {"mining.every", "mining.share", "mining.noise_start", "mining.noise_end", "mining.noise_epochs",
            "mining.exclude_used"} <= keys
    assert space["mining.policy"] == "mined" and "mining.policy" not in keys  # a constant: every trial mines
    params = search_space.to_tune(space)
    assert params["mining.policy"] == "mined" and set(params) == set(space)


def test_space_file_round_trips_and_replaces_the_default(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(search_space.dump(search_space.DEFAULT_SPACE))
    assert search_space.load(path) == search_space.DEFAULT_SPACE
    path.write_text("optim.lr: {loguniform: [0.001, 0.1]}\ntraining.batch_size: 64\n")
    space = search_space.load(path)
    assert set(space) == {"optim.lr", "training.batch_size"}
    assert search_space.searched_keys(space) == ["optim.lr"]
    param_space = search_space.to_tune(space)
    assert param_space["training.batch_size"] == 64
    assert 0.001 <= param_space["optim.lr"].sample() <= 0.1


@pytest.mark.parametrize("text, message", [
    ("optim.lrr: {uniform: [0.1, 0.2]}", "unknown config key 'optim.lrr'"),
    ("distort.probability: {uniform: [0.2, 1.5]}", "distort.probability must be in"),
    ("optim.lr: {loguniform: [0, 0.1]}", "loguniform needs low > 0"),
    ("optim.lr: {uniform: [0.2, 0.1]}", "low must be below high"),
    ("optim.lr: {gaussian: [0.1, 0.2]}", "expected one of"),
    ("pairs.distorted_copies: {int: [0, 2.5]}", "integer bounds"),
    ("[1, 2]", "non-empty mapping"),
])
def test_bad_space_fails_with_the_key_and_what_to_fix(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        search_space.validate(search_space.load(path), job_config.build("demo"))


def test_search_section_validates_and_cli_refuses_unknown_keys(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match="search.algorithm"):
        SearchSection(algorithm="grid")
    assert tune.main(["--set", "search.samples=3"]) == 2
    assert "search.samples" in capsys.readouterr().err
    assert tune.main(["--epochs", "1", "--set", "search.grace_period=2"]) == 2
    assert "grace_period" in capsys.readouterr().err


def test_print_space_prints_a_loadable_space(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert tune.main(["--print-space"]) == 0
    path = tmp_path / "printed.yaml"
    path.write_text(capsys.readouterr().out)
    assert search_space.load(path) == search_space.DEFAULT_SPACE


def _suggestions(seed: int, n: int = 6) -> list[dict]:
    """What the searcher proposes, given the same made-up results back (TPE takes over after 3)."""
    searcher = tune.make_searcher(SearchSection(seed=seed, startup_trials=3))
    searcher.set_search_properties(tune.OBJECTIVE, "max", search_space.to_tune(search_space.DEFAULT_SPACE))
    out = []
    for i in range(n):
        config = searcher.suggest(str(i))
        out.append(config)
        score = 1.0 / (1.0 + abs(config["optim.lr"] - 0.06)) - config["pairs.distorted_copies"] * 0.01
        searcher.on_trial_complete(str(i), {tune.OBJECTIVE: score})
    return out


def test_same_seed_gives_the_same_suggestions() -> None:
    first, again, other = _suggestions(7), _suggestions(7), _suggestions(8)
    assert first == again
    assert first != other
    assert len({c["optim.lr"] for c in first}) == len(first)  # really sampled


# --------------------------------------------------------------------------- a real search

def _child_runs(client, experiment_id: str, parent_id: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


@pytest.fixture(scope="module")
def resumed_search(small_shards: str, s3_server, tmp_path_factory: pytest.TempPathFactory):
    """A tiny search, its state and checkpoints in S3, interrupted with SIGINT after its first
    trial, then resumed by the same command."""
    from mlflow.tracking import MlflowClient
    from ray_nodes import new_cluster

    tmp_path = tmp_path_factory.mktemp("tune")
    out = tmp_path / "out"
    out.mkdir()
    space = tmp_path / "space.yaml"
    # A tiny learning rate next to a good one: trials that ASHA can tell apart.
    space.write_text("optim.lr: {choice: [0.0005, 0.06]}\noptim.momentum: {uniform: [0.5, 0.9]}\n")
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    bucket = s3_server.create_bucket("tune")
    command = [sys.executable, "-m", "workflows.tune", "--data", small_shards,
               "--storage-path", f"s3://{bucket}/runs", "--endpoint-url", s3_server.endpoint_url,
               "--tracking-uri", tracking_uri, "--experiment", EXPERIMENT, "--name", "tiny",
               "--samples", str(SAMPLES), "--concurrent", "1", "--space", str(space), "--epochs", str(EPOCHS),
               "--seed", "7", "--best-config", str(out / "best.yaml"),
               "--set", "search.grace_period=1", "--set", "training.threads=1",
               "--set", "pairs.pairs_per_epoch=240", "--set", "cluster.workers=1",
               "--set", "training.batch_size=32"]
    cluster = new_cluster(tmp_path)
    logs: list[Path] = []
    try:
        cluster.start_head(tmp_path, num_cpus=4)
        env = cluster.driver_env(**s3_server.env())
        # 1. start, and interrupt (Ctrl-C) once the first trial has trained all its epochs
        logs.append(tmp_path / "first.log")
        with logs[-1].open("w") as handle:
            first = subprocess.Popen(command, env=env, cwd=PROJECT_ROOT, stdout=handle, stderr=subprocess.STDOUT)
        client = MlflowClient(tracking_uri)
        finished_before: list = []
        deadline = time.monotonic() + 420
        while not finished_before:
            assert first.poll() is None, f"search exited {first.returncode}:\n{logs[-1].read_text()[-8000:]}"
            assert time.monotonic() < deadline, f"no trial finished:\n{logs[-1].read_text()[-8000:]}"
            time.sleep(2)
            experiment = client.get_experiment_by_name(EXPERIMENT)
            if experiment is not None:
                finished_before = client.search_runs(
                    [experiment.experiment_id],
                    filter_string=f"tags.job = 'tune-trial' and metrics.epochs_completed = {EPOCHS}")
        interrupted_at = time.monotonic()
        first.send_signal(signal.SIGINT)
        first_rc = first.wait(timeout=180)
        interrupt_s = time.monotonic() - interrupted_at
        parents_before = client.search_runs([experiment.experiment_id], filter_string="tags.job = 'tune'")
        # 2. the same command again
        logs.append(tmp_path / "second.log")
        with logs[-1].open("w") as handle:
            second = subprocess.run(command, env=env, cwd=PROJECT_ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                    timeout=900)
        yield {"bucket": bucket, "s3": s3_server, "first_rc": first_rc, "second_rc": second.returncode, "first_log": logs[0].read_text(),
               "second_log": logs[1].read_text(), "tracking_uri": tracking_uri, "out": out,
               "finished_before": finished_before, "parents_before": parents_before, "interrupt_s": interrupt_s,
               "experiment_id": experiment.experiment_id}
    except BaseException:
        for log in logs:
            print(f"--- {log.name} ---\n{log.read_text()[-10000:]}")
        raise
    finally:
        left = cluster.stop()
        assert not left, f"Ray processes left running: {left}"


@pytest.mark.integration
def test_interrupted_search_resumes_where_it_stopped(resumed_search) -> None:
    from mlflow.tracking import MlflowClient

    r = resumed_search
    assert r["first_rc"] == 130, r["first_log"][-5000:]
    assert "re-run the same command (same --name tiny and storage path) to resume" in r["first_log"]
    assert r["second_rc"] == 0, r["second_log"][-8000:]
    assert "Resuming search 'tiny'" in r["second_log"]
    keys = r["s3"].keys(r["bucket"], "runs/tiny/")
    assert any(k.endswith("tuner.pkl") for k in keys) and "runs/tiny/best_config.yaml" in keys
    assert any("/train/" in k and "/checkpoint_" in k for k in keys)  # the trials' checkpoints, in S3
    client = MlflowClient(r["tracking_uri"])
    parents = client.search_runs([r["experiment_id"]], filter_string="tags.job = 'tune'")
    assert [p.info.run_id for p in parents] == [p.info.run_id for p in r["parents_before"]]  # still one search
    children = _child_runs(client, r["experiment_id"], parents[0].info.run_id)
    assert len({c.data.tags["tune.trial_id"] for c in children}) == len(children) == SAMPLES
    # a trial finished before the interrupt was not trained again: one value per epoch
    for done in r["finished_before"]:
        steps = [m.step for m in client.get_metric_history(done.info.run_id, "val_oneshot_accuracy")]
        assert sorted(steps) == list(range(EPOCHS)), steps


@pytest.mark.integration
def test_search_is_one_parent_run_with_a_child_run_per_trial(resumed_search) -> None:
    from mlflow.tracking import MlflowClient

    r = resumed_search
    client = MlflowClient(r["tracking_uri"])
    parent = client.search_runs([r["experiment_id"]], filter_string="tags.job = 'tune'")[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search.num_samples"] == str(SAMPLES)
    assert parent.data.metrics["trials"] == SAMPLES
    assert 0.0 <= parent.data.metrics["test_oneshot_accuracy"] <= 1.0
    assert parent.data.metrics["test_oneshot_trials"] == 80  # 2 test alphabets x 2 runs x 20, once
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_config.yaml", "trials.csv", "search_space.yaml", "config.yaml"} <= artifacts
    children = _child_runs(client, r["experiment_id"], parent.info.run_id)
    best_child = [c for c in children if c.data.tags["tune.trial_id"] == parent.data.tags["best_trial_id"]]
    assert len(best_child) == 1
    assert parent.data.params["best.optim.lr"] == best_child[0].data.params["optim.lr"]
    assert parent.data.metrics["best_val_oneshot_accuracy"] == pytest.approx(
        max(c.data.metrics["best_val_oneshot_accuracy"] for c in children))
    for child in children:
        assert child.info.status in ("FINISHED", "KILLED")
        assert child.data.params["optim.lr"] in ("0.0005", "0.06")
        history = client.get_metric_history(child.info.run_id, "val_oneshot_accuracy")
        assert 1 <= len({m.step for m in history}) <= EPOCHS
        assert all(0.0 <= m.value <= 1.0 for m in history)
        assert not any(k.startswith("test_") for k in child.data.metrics)  # trials never see the test alphabets


@pytest.mark.integration
def test_asha_stopped_at_least_one_trial_early(resumed_search) -> None:
    from mlflow.tracking import MlflowClient

    r = resumed_search
    client = MlflowClient(r["tracking_uri"])
    parent = client.search_runs([r["experiment_id"]], filter_string="tags.job = 'tune'")[0]
    children = _child_runs(client, r["experiment_id"], parent.info.run_id)
    stopped = [c for c in children if c.data.tags.get("tune.stopped_early") == "true"]
    assert stopped and parent.data.metrics["trials_stopped_early"] == len(stopped)
    for child in stopped:
        assert child.info.status == "KILLED"
        assert child.data.metrics["epochs_completed"] < EPOCHS
    assert any(c.data.metrics["epochs_completed"] == EPOCHS for c in children)


@pytest.mark.integration
def test_written_best_config_trains(resumed_search, ray_cluster, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from workflows import train

    r = resumed_search
    best_file = r["out"] / "best.yaml"
    best = yaml.safe_load(best_file.read_text())
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert train.main(["--config", str(best_file), "--name", "from-best", "--epochs", "1",
                       "--storage-path", str(tmp_path / "runs"), "--tracking-uri", tracking_uri,
                       "--experiment", "t-best", "--set", "tracking.registered_model=none"]) == 0
    client = MlflowClient(tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("t-best").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert float(run.data.params["optim.lr"]) == best["optim"]["lr"]
    assert float(run.data.params["optim.momentum"]) == pytest.approx(best["optim"]["momentum"])
    assert run.data.metrics["steps"] >= 1
