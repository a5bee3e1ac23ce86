"""The job configuration: recipes, files, --set overrides and their validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from siamese_core.config import ConfigError
from workflows import config as job_config


def test_demo_recipe_uses_cpu_preset_and_paper_recipe_koch() -> None:
    assert job_config.build("demo").model.preset == "cpu-medium"
    assert job_config.build("paper").model.preset == "koch"
    with pytest.raises(ConfigError, match="unknown recipe"):
        job_config.build("nope")


def test_set_overrides_are_typed() -> None:
    cfg = job_config.build("demo", overrides={
        "optim.lr": "0.02", "model.channels": "8,16,16,32", "training.time_budget_s": "300",
        "tracking.registered_model": "none", "cluster.mixed_precision": "false",
        "optim.lr_multipliers.fc": "3", "cluster.channels_last": "none"})
    assert cfg.optim.lr == 0.02 and isinstance(cfg.optim.lr, float)
    assert cfg.model.channels == (8, 16, 16, 32)
    assert cfg.training.time_budget_s == 300.0
    assert cfg.tracking.registered_model is None
    assert cfg.cluster.mixed_precision is False
    assert cfg.cluster.channels_last is None  # by device
    assert job_config.build("demo", overrides={"cluster.channels_last": "true"}).cluster.channels_last is True
    assert cfg.optim.layer_lr("fc") == pytest.approx(0.06)


@pytest.mark.parametrize("overrides, message", [
    ({"optim.lrr": "1"}, "unknown config key 'optim.lrr'"),
    ({"bogus": "1"}, "unknown config key 'bogus'"),
    ({"cluster.workers": "two"}, "cluster.workers"),
    ({"cluster.workers": "0"}, "cluster.workers must be >= 1"),
    ({"optim.ema_decay": "1"}, "optim.ema_decay must be in (0, 1) or none"),
    ({"optim.lr_multipliers.conv9": "2"}, "unknown layers"),
    ({"optim": "1"}, "section"),
    ({"distort.probability": "1.5"}, "distort.probability"),
    ({"model.batch_norm": "maybe"}, "model.batch_norm"),
    ({"data.decoded_cache_mb": "-1"}, "data.decoded_cache_mb must be >= 0"),
    ({"data.chunk_pairs": "0"}, "data.chunk_pairs must be >= 1"),
    ({"training.in_batch_negatives": "-0.5"}, "training.in_batch_negatives must be >= 0"),
    ({"training.in_batch_hardest": "0"}, "training.in_batch_hardest must be in .0, 1."),
    ({"training.in_batch_hardest_epochs": "-1"}, "training.in_batch_hardest_epochs must be >= 0"),
    ({"evaluation.validation_runs_multiplier": "0"}, "evaluation.validation_runs_multiplier must be >= 1"),
    ({"model.test_time_shift_px": "-1"}, "model.test_time_shift_px must be an integer in .0, 17. .0 turns"),
    ({"model.test_time_shift_px": "17"}, "model.test_time_shift_px must be an integer in .0, 17. .0 turns"),
    ({"model.test_time_shift_px": "1.5"}, "model.test_time_shift_px"),
    ({"model.test_time_views": "diamond"}, "model.test_time_views must be one of .'cross', 'square'., got 'diamond'"),
    ({"training.validation_views": "all"}, "training.validation_views must be one of .'model', 'single'., got 'all'"),
])
def test_bad_values_fail_with_what_to_fix(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        job_config.build("demo", overrides=overrides)


def test_yaml_file_then_set_wins(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("optim:\n  lr: 0.03\n  momentum: 0.8\ncluster:\n  workers: 3\n")
    cfg = job_config.build("demo", [str(path)], {"cluster.workers": "4"})
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.cluster.workers) == (0.03, 0.8, 4)
    (tmp_path / "bad.yaml").write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        job_config.build("demo", [str(tmp_path / "bad.yaml")])


def test_written_config_reads_back_identically(tmp_path: Path) -> None:
    cfg = job_config.build("paper", overrides={"optim.lr_multipliers.head": "2", "pairs.sources": "01,02,03", "model.preprocess.mean": "[]"})
    job_config.write(cfg, tmp_path / "resolved.yaml")
    again = job_config.build("demo", [str(tmp_path / "resolved.yaml")])
    assert again == cfg


def test_relative_local_paths_become_absolute_uris_stay(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = job_config.build("demo", overrides={"data.uri": "shards", "cluster.storage_path": "s3://b/runs"})
    assert job_config.absolute_paths(cfg) == {"data.uri": str(tmp_path / "shards")}


def test_placement_strategy_is_validated() -> None:
    assert job_config.build("demo", overrides={"cluster.placement_strategy": "STRICT_SPREAD"}
                            ).cluster.placement_strategy == "STRICT_SPREAD"
    with pytest.raises(ConfigError, match="cluster.placement_strategy"):
        job_config.build("demo", overrides={"cluster.placement_strategy": "SCATTER"})


def test_the_in_batch_share_ramps_linearly_to_the_hardest_share() -> None:
    from siamese_core.config import TrainingConfig

    ramped = TrainingConfig(in_batch_hardest=0.25, in_batch_hardest_epochs=4)
    assert [ramped.in_batch_share(e) for e in range(6)] == [1.0, 0.8125, 0.625, 0.4375, 0.25, 0.25]
    assert TrainingConfig(in_batch_hardest=0.25).in_batch_share(0) == 0.25
    assert TrainingConfig().in_batch_share(7) == 1.0
