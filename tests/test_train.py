"""The main job end to end on real Omniglot shards: Ray Train with 2 workers -> MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from siamese_core import checkpoint as ckpt_io
from siamese_core.config import ConfigError
from workflows import config as job_config
from workflows import train
from workflows.shards import DataSet
from siamese_core.omniglot import OMNIGLOT_NEW_CLASSES

pytestmark = pytest.mark.integration


def _overrides(small_shards: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"data.uri": small_shards, "cluster.storage_path": str(tmp_path / "runs"),
            "cluster.name": "t", "cluster.workers": "2", "training.epochs": "2",
            "training.threads": "1", "pairs.pairs_per_epoch": "240", "pairs.distorted_copies": "1",
            "training.batch_size": "32",
            "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db", "tracking.experiment": "t-train",
            "tracking.registered_model": "t-siamese", **extra}


AVERAGED = {"optim.ema_decay": "0.9"}
"""The shared run keeps a moving average of its weights: what it validates, keeps and registers is the average."""


@pytest.fixture(scope="module")
def trained(small_shards: str, tmp_path_factory: pytest.TempPathFactory):
    tmp_path = tmp_path_factory.mktemp("train")
    overrides = _overrides(small_shards, tmp_path, **AVERAGED)
    cfg = job_config.build("demo", overrides=overrides)
    summary = train.run(cfg, "demo", overrides)
    return summary, cfg, tmp_path


def test_one_mlflow_run_with_params_history_and_test_result(trained) -> None:
    from mlflow.tracking import MlflowClient

    summary, cfg, _ = trained
    client = MlflowClient(summary["tracking_uri"])
    experiment = client.get_experiment_by_name("t-train")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [summary["run_id"]]  # 2 workers, one run
    run = runs[0]
    assert run.data.params["cluster.workers"] == "2"
    assert run.data.params["model.preset"] == "cpu-medium"
    assert float(run.data.params["optim.lr"]) == cfg.optim.lr
    assert run.data.params["optim.ema_decay"] == "0.9"
    history = client.get_metric_history(run.info.run_id, "val_oneshot_accuracy")
    assert sorted(m.step for m in history) == [0, 1]
    assert all(0.0 <= m.value <= 1.0 for m in history)
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
    # 120 pairs per worker come as one chunk (data.chunk_pairs 2,048), expanded x2 = 240 rows
    # -> 7 full batches of 32 per epoch (the last 16 rows are dropped).
    assert [m.value for m in client.get_metric_history(run.info.run_id, "steps")] == [7.0, 7.0]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "pairs_epoch")] == [0.0, 1.0]
    # 2 test alphabets x 2 runs x 20 queries, scored once from the best checkpoint.
    assert summary["test_trials"] == 80
    assert run.data.metrics["test_oneshot_accuracy"] == pytest.approx(summary["test_accuracy"])
    # the demo recipe scores with test-time shifts and also reports the paper's single view
    assert cfg.model.test_time_shift_px > 0
    assert run.data.params["model.test_time_shift_px"] == str(cfg.model.test_time_shift_px) == \
        str(summary["test_time_shift_px"])
    assert run.data.metrics["test_oneshot_accuracy_single_view"] == pytest.approx(summary["test_accuracy_single_view"])
    assert run.data.params["model.test_time_views"] == cfg.model.test_time_views == "cross"
    assert run.data.params["training.validation_views"] == summary["validation_views"] == "single"
    assert {"test_oneshot_accuracy.Atlantean", "test_oneshot_accuracy.Tengwar"} <= set(run.data.metrics)
    best = max(history, key=lambda m: (m.value, -m.step))
    assert summary["best_epoch"] == best.step
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "oneshot")}
    assert {"oneshot/test_trials.png", "oneshot/test_per_group.png", "oneshot/test.json"} <= artifacts
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # MLflow knows the data: an input of the run, with the manifest's checksum as digest
    [data_input] = run.inputs.dataset_inputs
    manifest = DataSet.open(cfg.data.uri).manifest
    assert data_input.dataset.name == "omniglot"
    assert data_input.dataset.digest == manifest.content_checksum.split(":")[1][:16]
    assert run.data.tags["data.uri"] == cfg.data.uri
    # the description states the data, the recipe and the headline figure beside its baseline
    note = run.data.tags["mlflow.note.content"]
    assert "omniglot" in note and "`demo`" in note and f"{summary['test_accuracy']:.2%}" in note
    assert f"{summary['test_pixel_nn_accuracy']:.2%}" in note
    assert run.data.metrics["test_pixel_nn_accuracy"] == pytest.approx(summary["test_pixel_nn_accuracy"])
    # the preprocessing the data set asked for is in the run's config, resolved
    assert run.data.params["model.preprocess.color"] == "gray" and run.data.params["model.preprocess.invert"] == "True"
    # ... and so are the new classes it makes of each character (Omniglot's manifest says which)
    assert run.data.params["pairs.new_classes"] == OMNIGLOT_NEW_CLASSES != "unchanged"


def test_registered_model_is_the_best_checkpoint(trained) -> None:
    from workflows.models import load_any

    summary, cfg, _ = trained
    registered = load_any("models:/t-siamese/1", tracking_uri=summary["tracking_uri"])
    from_checkpoint = ckpt_io.load_model(summary["checkpoint"])
    payload = ckpt_io.load_payload(summary["checkpoint"])
    assert payload["epoch"] == summary["best_epoch"]
    # the checkpoint's weights are the moving average; the trained ones travel beside them to resume
    assert payload["average_steps"] == 7 * (summary["best_epoch"] + 1)  # 7 steps an epoch (below)
    assert not torch.equal(payload["state_dict"]["fc.weight"], payload["training_state_dict"]["fc.weight"])
    x = torch.rand(3, 1, cfg.model.input_size, cfg.model.input_size)
    torch.testing.assert_close(registered.embed(x), from_checkpoint.embed(x))
    # the test-time views travel with the model: predict and evaluate score as training did
    assert registered.config.test_time_shift_px == from_checkpoint.config.test_time_shift_px == \
        cfg.model.test_time_shift_px > 0
    torch.testing.assert_close(registered.scoring_embed(x), from_checkpoint.scoring_embed(x))
    assert registered.config.test_time_views == from_checkpoint.config.test_time_views == "cross"


def test_a_rerun_with_the_seed_trains_the_same_weights_on_two_workers(trained, small_shards, tmp_path) -> None:
    """Each epoch's pairs, which worker trains on which of them, the distortions of their copies
    and gloo's averaging of the two workers' gradients all repeat: a second run of the same job
    trains the same weights bit for bit (docs/training.md, "Reproducibility")."""
    summary, _, _ = trained
    overrides = _overrides(small_shards, tmp_path, **AVERAGED)
    again = train.run(job_config.build("demo", overrides=overrides), "demo", overrides)
    assert again["best_epoch"] == summary["best_epoch"]
    assert again["best_val_oneshot_accuracy"] == summary["best_val_oneshot_accuracy"]
    first = ckpt_io.load_payload(summary["checkpoint"])["state_dict"]
    second = ckpt_io.load_payload(again["checkpoint"])["state_dict"]
    assert first.keys() == second.keys()
    differing = [k for k in first if not torch.equal(first[k], second[k])]
    assert differing == []


def test_epochs_are_selected_on_single_view_validation(trained, small_shards) -> None:
    """The demo selects epochs on one view (training.validation_views=single): the best
    checkpoint's logged validation accuracy is its one-view score, not its 13-view one."""
    from siamese_core.evaluation import VALIDATION_SEED, episodes, evaluate_oneshot
    from siamese_core.model import place_model, with_test_time_shift

    summary, cfg, _ = trained
    model = place_model(ckpt_io.load_model(summary["checkpoint"]), "cpu", cfg.cluster.channels_last)
    images = DataSet.open(small_shards).load_images("validation", cfg.model.input_size, model.config.preprocess)
    runs = episodes(images, cfg.evaluation, VALIDATION_SEED, validation=True)
    one_view = evaluate_oneshot(with_test_time_shift(model, 0), images, runs).accuracy
    assert summary["best_val_oneshot_accuracy"] == pytest.approx(one_view, abs=1e-9)


MINED = {"mining.policy": "mined", "mining.first_epoch": "0", "mining.every": "1"}


@pytest.mark.parametrize("mining", [{}, MINED], ids=["random-pairs", "mined-pairs"])
def test_the_ray_job_and_the_plain_loop_train_the_same_epochs(small_shards, tmp_path, monkeypatch,
                                                              mining: dict[str, str]) -> None:
    """One loop: with one worker, the Ray Train job (pairs streamed by Ray Data) and ``siamese_core.loop.fit``
    (pairs drawn in this process) log the same losses and validation scores, epoch for epoch, with random
    pairs and with mined ones (the worker's assignment reaches the Ray Data pair stage); and the driver
    reads the data set's manifest once, whatever asks for it."""
    from siamese_core.loop import fit
    from workflows import shards

    reads = []
    original = shards.read_manifest_at
    monkeypatch.setattr(shards, "read_manifest_at", lambda loc: (reads.append(loc.uri), original(loc))[1])
    overrides = _overrides(small_shards, tmp_path, **{"cluster.workers": "1", "cluster.name": "one"}, **mining)
    cfg = job_config.build("demo", overrides=overrides)
    summary = train.run(cfg, "demo", overrides)
    assert reads == [small_shards]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    logged = {k: [m.value for m in sorted(client.get_metric_history(summary["run_id"], k), key=lambda m: m.step)]
              for k in ("train_loss", "val_verification_accuracy", "val_oneshot_accuracy", "steps", "mined_pairs")}
    resolved, _ = train.fit_to_data(cfg, overrides, DataSet.open(small_shards))
    dataset = DataSet.open(small_shards)
    images = {s: dataset.load_images(s, resolved.model.input_size, resolved.model.preprocess)
              for s in ("train", "validation")}
    threads = torch.get_num_threads()
    torch.set_num_threads(resolved.training.threads or 1)  # the worker's
    try:
        plain = fit(resolved.recipe, images["train"], images["validation"], log=None,
                    chunk_pairs=resolved.data.chunk_pairs)
    finally:
        torch.set_num_threads(threads)
    for key in ("train_loss", "val_verification_accuracy", "val_oneshot_accuracy", "steps"):
        assert [row[key] for row in plain.history] == logged[key], key
    assert [row["mined_pairs"] for row in plain.history if "mined_pairs" in row] == logged["mined_pairs"]
    assert len(logged["mined_pairs"]) == (2 if mining else 0)


def test_mining_on_two_workers_embeds_each_training_image_once(small_shards, tmp_path) -> None:
    """Each worker embeds its shards, the gathered embeddings cover the training split once
    (an image twice would be refused), and rank 0's assignment feeds both workers' pair stages."""
    overrides = _overrides(small_shards, tmp_path, **{"cluster.name": "mined"}, **MINED)
    summary = train.run(job_config.build("demo", overrides=overrides), "demo", overrides)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    images = [m.value for m in client.get_metric_history(summary["run_id"], "mining_images")]
    mined = [m.value for m in client.get_metric_history(summary["run_id"], "mined_pairs")]
    n_train = len(DataSet.open(small_shards).read_table("train", ["image_id"]))
    assert images == [n_train, n_train] and all(m > 0 for m in mined)


def test_a_colour_data_set_trains_on_two_workers_and_predicts(ray_cluster, tmp_path) -> None:
    """Own images end to end: a folder of RGB photographs (synthetic colour patterns) -> ingest ->
    Ray Train with 2 workers -> a registered model whose preprocessing predict uses."""
    import numpy as np
    from PIL import Image

    from workflows import ingest, predict

    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for c in range(30):
        colour = rng.integers(40, 255, 3)
        (root / f"thing{c:02d}").mkdir(parents=True)
        for k in range(4):
            pixels = np.clip(colour + rng.normal(0, 25, (20 + k, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(root / f"thing{c:02d}" / f"{k}.jpg", quality=90)
    dest = tmp_path / "shards"
    ingest.ingest(str(root), str(dest), log=lambda _m: None)
    overrides = {"data.uri": str(dest), "cluster.storage_path": str(tmp_path / "runs"), "cluster.name": "rgb",
                 "cluster.workers": "2", "training.epochs": "2", "training.threads": "1",
                 "pairs.pairs_per_epoch": "256", "training.batch_size": "32",
                 "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db", "tracking.experiment": "rgb",
                 "tracking.registered_model": "rgb-model"}
    cfg = job_config.build("demo", overrides=overrides)
    summary = train.run(cfg, "demo", overrides)
    assert summary["data"] == "photos" and summary["test_trials"] > 0
    assert "over the test split's" in summary["protocol"]  # no groups: episodes over the split's classes
    # no groups: the job scored re-identification too, chose the "new" threshold on validation and
    # stored it with the registered model (predict --new-threshold auto reads it)
    from mlflow.tracking import MlflowClient

    from workflows.models import load_any

    client = MlflowClient(overrides["tracking.uri"])
    metrics = client.get_run(summary["run_id"]).data.metrics
    assert client.get_run(summary["run_id"]).data.params["pairs.new_classes"] == "unchanged"  # photographs
    for key in ("test_reid_top1", "test_reid_top5", "test_reid_map5", "test_reid_map5_new", "validation_reid_map5_new",
                "test_reid_pixel_map5", "new_threshold"):
        assert key in metrics, (key, sorted(metrics))
    assert summary["reid"] is not None and summary["reid"]["map5"] == pytest.approx(metrics["test_reid_map5"])
    pictures = {a.path for a in client.list_artifacts(summary["run_id"], "reid")}
    assert {"reid/validation_map5_by_threshold.png"} <= pictures and len(pictures) >= 2, pictures
    registered = load_any("models:/rgb-model/1", tracking_uri=overrides["tracking.uri"])
    assert registered.new_threshold == pytest.approx(metrics["new_threshold"])
    model = ckpt_io.load_model(summary["checkpoint"])
    assert model.conv1.in_channels == 3 and model.config.preprocess.color == "rgb"
    assert model.config.preprocess.fit == "pad" and len(model.config.preprocess.mean) == 3  # the data set's
    support, query = tmp_path / "support", tmp_path / "query"
    support.mkdir()
    query.mkdir()
    for c in (0, 1, 2):
        (support / f"thing{c:02d}.jpg").write_bytes((root / f"thing{c:02d}" / "0.jpg").read_bytes())
        (query / f"q{c}.jpg").write_bytes((root / f"thing{c:02d}" / "1.jpg").read_bytes())
    out = tmp_path / "predictions.csv"
    assert predict.main(["--model", "models:/rgb-model/1", "--tracking-uri", overrides["tracking.uri"],
                         "--support", str(support), "--query", str(query), "--output", str(out)]) == 0
    assert out.read_text().splitlines()[0] == "query,predicted,score" and len(out.read_text().splitlines()) == 4


def test_the_data_sets_new_classes_fill_only_what_the_config_leaves_open(small_shards: str) -> None:
    dataset = DataSet.open(small_shards)
    for given, expected in ((None, OMNIGLOT_NEW_CLASSES), ("unchanged", "unchanged"), ("dihedral", "dihedral")):
        overrides = {"data.uri": small_shards, **({"pairs.new_classes": given} if given else {})}
        resolved, out = train.fit_to_data(job_config.build("demo", overrides=overrides), overrides, dataset)
        assert resolved.pairs.new_classes == expected == out["pairs.new_classes"]
        assert resolved.recipe.pairs.classes_per_class == {"dihedral": 8, "unchanged": 1, "rot90": 4}[expected]


def test_checkpoints_rank_by_accuracy_with_ties_to_the_earlier_epoch() -> None:
    # Ray keeps the higher-ranked checkpoints; early stopping calls the earlier of two equal epochs best.
    assert train.checkpoint_rank(0.746875, 39) > train.checkpoint_rank(0.746875, 43)
    # ...and no real difference in accuracy is overturned, even over 100,000 trials and 999 epochs.
    assert train.checkpoint_rank(0.5 + 1e-5, 999) > train.checkpoint_rank(0.5, 0)
    assert train.checkpoint_rank(0.75, 0) == 0.75


def test_missing_data_fails_before_ray(tmp_path: Path) -> None:
    from workflows.shards import DatasetError

    cfg = job_config.build("demo", overrides={"data.uri": str(tmp_path / "nothing"),
                                              "tracking.uri": f"sqlite:///{tmp_path}/m.db"})
    with pytest.raises(DatasetError, match="nothing"):
        train.preflight(cfg, {})


def test_impossible_resources_are_refused(small_shards: str, tmp_path: Path, ray_cluster) -> None:
    cfg = job_config.build("demo", overrides=_overrides(small_shards, tmp_path, **{"cluster.gpus_per_worker": "1"}))
    with pytest.raises(ConfigError, match="GPU"):
        train.check_resources(cfg)


def test_workers_none_fits_the_cluster(small_shards: str, tmp_path: Path, ray_cluster) -> None:
    """A bare ``python -m workflows.train``: one CPU worker per 4 CPU slots (at least one), one per GPU group."""
    resources = ray_cluster.cluster_resources()
    expected = max(1, int(resources["CPU"]) // 4)
    overrides = {k: v for k, v in _overrides(small_shards, tmp_path).items()
                 if k not in ("cluster.workers", "training.threads")}
    overrides["pairs.pairs_per_epoch"] = str(64 * expected)  # a batch for every worker
    cfg = job_config.build("demo", overrides=overrides)
    assert cfg.cluster.workers is None and cfg.training.threads is None
    fitted, fitted_overrides = train.fit_to_cluster(cfg, overrides)
    assert fitted.cluster.workers == expected and fitted_overrides["cluster.workers"] == expected
    if not resources.get("GPU"):  # GPU workers on a cluster without GPUs: refused, not hung
        with pytest.raises(ConfigError, match="GPU"):
            train.fit_to_cluster(job_config.build("demo", overrides={**overrides, "cluster.gpus_per_worker": "1"}),
                                 overrides)


def test_too_few_pairs_for_one_step_is_refused(tmp_path: Path) -> None:
    cfg = job_config.build("demo", overrides={"pairs.pairs_per_epoch": "200", "cluster.workers": "2",
                                              "training.batch_size": "128"})
    with pytest.raises(ConfigError, match="no training step"):
        train.preflight(cfg, {})


def test_unknown_key_exits_2_with_message(capsys) -> None:
    assert train.main(["--set", "optim.lrr=0.1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_rerunning_a_finished_job_name_is_refused(trained) -> None:
    summary, cfg, _ = trained
    from workflows import storage, tracking

    loc = storage.locate(cfg.cluster.storage_path)
    with pytest.raises(ConfigError, match="already finished"):
        tracking.previous_run(loc, cfg.cluster.name, summary["tracking_uri"], "training run")
    with pytest.raises(ConfigError, match="already finished"):  # the job itself, before it asks Ray for anything
        train.run(cfg, "demo", {})
