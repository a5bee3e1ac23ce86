"""``python -m workflows.evaluate`` on real shards: checkpoint vs registered model, and the pixel baseline.

Uses the session's small real shards (2 test alphabets: 2 runs x 20 trials
each = 80 one-shot trials) and a throwaway MLflow SQLite store per test.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from siamese_core import checkpoint
from siamese_core.evaluation import evaluate_oneshot
from siamese_core.model import build_model, with_test_time_shift
from workflows import evaluate, tracking
from workflows.models import load_any
from workflows.shards import DataSet

pytestmark = pytest.mark.integration

TRIALS = 80  # 2 test alphabets x 2 runs x 20 trials


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite tracking store; the default ./mlflow.db is pointed away from the repository."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    (tmp_path / "tracking").mkdir()
    return f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}"


def _runs(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment} in {uri}"
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])


def _artifacts(uri: str, run_id: str, folder: str) -> set[str]:
    from mlflow.tracking import MlflowClient

    return {a.path for a in MlflowClient(uri).list_artifacts(run_id, folder)}


def test_checkpoint_and_registered_model_score_the_same(small_shards, store, tmp_path, capsys):
    model = build_model("cpu-small", seed=3)
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    checkpoint.save(ckpt, model)
    with tracking.mlflow_run(store, "register", run_name="register-t-model"):
        tracking.log_model(model, "t-model")

    common = ["--data", small_shards, "--split", "test", "--seed", "7", "--tracking-uri", store,
              "--experiment", "eval-test"]
    assert evaluate.main([*common, "--model", str(ckpt)]) == 0
    from_ckpt = capsys.readouterr().out
    assert evaluate.main([*common, "--model", "models:/t-model/1"]) == 0
    from_registry = capsys.readouterr().out
    assert f"/{TRIALS} trials" in from_ckpt and "Recorded in MLflow run" in from_registry

    runs = _runs(store, "eval-test")
    assert [r.data.params["model"] for r in runs] == [str(ckpt), "models:/t-model/1"]
    accuracies = [r.data.metrics["test_oneshot_accuracy"] for r in runs]
    assert accuracies[0] == accuracies[1]
    for run in runs:
        assert run.data.metrics["test_oneshot_trials"] == TRIALS
        assert run.data.tags["job"] == "evaluate"
        assert run.data.params["seed"] == "7"
        assert {"oneshot/test_per_group.png", "oneshot/test_trials.png", "oneshot/test.json"} <= \
            _artifacts(store, run.info.run_id, "oneshot")
        assert 0.0 <= run.data.metrics["test_pixel_nn_accuracy"] <= 1.0  # the baseline on the same trials
        assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["omniglot"]
    # the printed accuracy is the recorded one
    printed = re.search(r"on omniglot test: ([\d.]+)% \((\d+)/(\d+) trials", from_ckpt)
    assert printed is not None and int(printed[3]) == TRIALS
    assert float(printed[1]) / 100 == pytest.approx(accuracies[0], abs=5e-5)

    # Stronger than equal accuracy: the same choice in every trial.
    dataset = DataSet.open(small_shards)
    a = evaluate.evaluate_model(load_any(str(ckpt)), dataset, "test", seed=7).result
    b = evaluate.evaluate_model(load_any("models:/t-model/1", tracking_uri=store), dataset, "test", seed=7).result
    np.testing.assert_array_equal(a.predicted, b.predicted)
    assert a.trials == b.trials == TRIALS
    assert a.accuracy == accuracies[0]


def test_test_time_views_travel_with_the_checkpoint_and_can_be_overridden(small_shards, tmp_path, capsys):
    plain = build_model("cpu-small", seed=3)
    viewed_model = with_test_time_shift(plain, 2)
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    checkpoint.save(ckpt, viewed_model)
    dataset = DataSet.open(small_shards)
    viewed = evaluate.evaluate_model(load_any(str(ckpt)), dataset)
    single = evaluate.evaluate_model(load_any(str(ckpt), test_time_shift_px=0), dataset)
    assert "9 views" in viewed.protocol and "views" not in single.protocol
    np.testing.assert_array_equal(
        viewed.result.predicted, evaluate_oneshot(viewed_model, viewed.images, viewed.runs).predicted)
    np.testing.assert_array_equal(
        single.result.predicted, evaluate_oneshot(plain, single.images, single.runs).predicted)
    assert not np.array_equal(viewed.result.predicted, single.result.predicted)  # the views change choices

    assert evaluate.main(["--data", small_shards, "--model", str(ckpt), "--no-mlflow"]) == 0
    assert "mean embedding over 9 views (cross of shifts up to 2 px)" in capsys.readouterr().out
    assert evaluate.main(["--data", small_shards, "--model", str(ckpt), "--no-mlflow",
                          "--test-time-shift-px", "0"]) == 0
    assert "shifts" not in capsys.readouterr().out
    assert evaluate.main(["--data", small_shards, "--model", str(ckpt), "--no-mlflow",
                          "--test-time-shift-px", "40"]) == 2
    err = capsys.readouterr().err
    assert "--test-time-shift-px" in err and "model.test_time_shift_px must be an integer in [0, 17)" in err

    # The pattern of the views travels too, and an override of the shift keeps it.
    square = tmp_path / "square"
    square.mkdir()
    checkpoint.save(square, with_test_time_shift(plain, 2, "square"))
    assert evaluate.main(["--data", small_shards, "--model", str(square), "--no-mlflow"]) == 0
    assert "mean embedding over 25 views (square of shifts up to 2 px)" in capsys.readouterr().out
    assert evaluate.main(["--data", small_shards, "--model", str(square), "--no-mlflow",
                          "--test-time-shift-px", "1"]) == 0
    assert "mean embedding over 9 views (square of shifts up to 1 px)" in capsys.readouterr().out
    assert evaluate.main(["--data", small_shards, "--model", str(ckpt), "--no-mlflow",
                          "--test-time-views", "square"]) == 0  # the pattern alone, on the cross checkpoint
    assert "mean embedding over 25 views (square of shifts up to 2 px)" in capsys.readouterr().out


def test_pixel_baseline_beats_chance(small_shards, store, capsys):
    assert evaluate.main(["--data", small_shards, "--model", "pixel-nn", "--tracking-uri", store]) == 0
    out = capsys.readouterr().out
    assert "pixel-nn on omniglot test:" in out and "Atlantean" in out and "Tengwar" in out
    assert "pixels at 105 px" in out  # the images' own size, as they all share it
    [run] = _runs(store, tracking.DEFAULT_EXPERIMENT)
    accuracy = run.data.metrics["test_oneshot_accuracy"]
    assert run.data.metrics["test_oneshot_trials"] == TRIALS
    assert accuracy >= 0.15, f"pixel-nn {accuracy:.2%} is not well above chance (5%)"
    assert "oneshot/test_per_group.png" in _artifacts(store, run.info.run_id, "oneshot")
    # Deterministic: the same trials and accuracy again, without recording.
    assert evaluate.main(["--data", small_shards, "--model", "pixel-nn", "--no-mlflow"]) == 0
    assert f"{accuracy:.2%}" in capsys.readouterr().out
    assert not (Path.cwd() / "mlflow.db").exists()


def test_unloadable_model_is_a_clear_error(small_shards, tmp_path, capsys):
    (tmp_path / "empty-checkpoint").mkdir()
    for model in [tmp_path / "no-such-model", tmp_path / "empty-checkpoint"]:
        code = evaluate.main(["--data", small_shards, "--model", str(model), "--no-mlflow"])
        out, err = capsys.readouterr()
        assert code == 2 and out == ""
        assert err.startswith(f"error: cannot load --model {model}: ") and "Traceback" not in err, err
