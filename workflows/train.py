"""``python -m workflows.train``: data-parallel siamese training on Ray Train, tracked in MLflow.

Flow: preflight checks (config, data manifest, checkpoint storage, MLflow) ->
one MLflow run -> ``TorchTrainer`` with N workers, each streaming its share of
the pair dataset (``workflows.data``) -> per-epoch validation on rank 0,
checkpoint, early stopping -> the best checkpoint scored on the 400 test
trials -> model logged and registered in MLflow.

Examples::

    python -m workflows.train                                   # CPU demo recipe, workers to fit the machine
    python -m workflows.train --recipe paper --workers 4 --gpus-per-worker 1 \\
        --data s3://bucket/omniglot --storage-path s3://bucket/runs
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

from siamese_core.config import ConfigError, apply_overrides
from workflows import cli
from workflows import config as job_config
from workflows.config import JobConfig

log = logging.getLogger(__name__)  # in a Train worker: Ray Train's worker log file (and the console with --verbose)


# --------------------------------------------------------------------------- worker side

def _broadcast(obj: Any) -> Any:
    """Rank 0's value on every rank (identity on a single worker)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _mean_across_ranks(value: float) -> float:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _all_gather(obj: Any) -> list[Any]:
    """Every rank's value, in rank order ([obj] on a single worker)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mining_share(dataset: Any, cfg: JobConfig, net: Any, rank: int, world: int) -> Any:
    """This rank's share of the training images (every ``world``-th shard), embedded for mining.

    The decoded shards stay in this worker's :class:`ShardCache` (``data.decoded_cache_mb``, as
    the pair stage's), so only the first mining epoch reads and decodes them.
    """
    import numpy as np
    import torch

    from siamese_core.loop import embed_for_mining
    from workflows.data import cached_shard, process_cache

    parts = []
    cache = process_cache(int(cfg.data.decoded_cache_mb * 2**20))
    for index, path in enumerate(dataset.shard_paths("train")):
        if index % world != rank:
            continue
        shard = cached_shard(cache, dataset, str(path), index, cfg.pairs, net.config, dataset.manifest.unknown_label)
        shard.ensure_decoded(np.arange(len(shard.label)), net.config)
        parts.append((embed_for_mining(net, torch.from_numpy(shard.images)), shard.image_key, shard.class_key,
                      shard.unit.astype(object)))
    if not parts:
        return torch.zeros((0, net.config.embedding_dim)), np.zeros(0, np.int64), np.zeros(0, np.int64), \
            np.zeros(0, object)
    return (torch.cat([p[0] for p in parts]), *(np.concatenate([p[i] for p in parts]) for i in (1, 2, 3)))


def _nodes_in_use() -> int:
    """How many distinct Ray nodes this run's workers are on (recorded, so a user sees the spread)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 1
    nodes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return len(set(nodes))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Train worker: the core's training loop, fed by the Ray Data stream, reporting with checkpoints."""
    import ray.train
    import ray.train.torch
    import torch

    from siamese_core import checkpoint as ckpt_io
    from siamese_core.evaluation import Validator
    from siamese_core.heap import keep_freed_memory
    from siamese_core.loop import LoopState, TrainingLoop, new_model
    from siamese_core.model import place_model
    from siamese_core.optim import build_optimizer
    from workflows.data import worker_stream

    cfg: JobConfig = job_config.build(loop_config["recipe"], overrides=loop_config["overrides"])
    dataset = loop_config["dataset"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Share the node's cores between its workers unless told otherwise.
    torch.set_num_threads(cfg.training.threads or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    if cfg.training.keep_freed_memory:
        keep_freed_memory()
    device = ray.train.torch.get_device()

    model = new_model(cfg.model, cfg.training.seed, cfg.training.fan_in_scaled)
    state, payload = LoopState(), None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        try:
            with restored.as_directory() as directory:
                payload = ckpt_io.load_payload(directory)
        except (OSError, FileNotFoundError) as exc:
            raise RuntimeError(f"StorageError: could not read the last checkpoint {restored.path} back from "
                               f"{cfg.cluster.storage_path} (is the storage reachable?): {exc}") from exc
        state = LoopState.from_state_dict(payload["loop"], cfg.training.patience)
        if rank == 0:
            log.info("[rank 0] restored epoch %s from %s; training goes on at epoch %s", payload["epoch"],
                     restored.path, state.next_epoch)
    model = ray.train.torch.prepare_model(place_model(model, device, cfg.cluster.channels_last))
    optimizer = build_optimizer(ckpt_io.unwrap(model), cfg.optim)
    autocast = torch.bfloat16 if device.type == "cuda" and cfg.cluster.mixed_precision else None

    worker_nodes = _nodes_in_use()
    validator = None
    if rank == 0:
        net_config = ckpt_io.unwrap(model).config
        validator = Validator(dataset.load_images("validation", net_config.input_size, net_config.preprocess),
                              cfg.evaluation,
                              device, cfg.training.negatives, cfg.training.validation_views)  # type: ignore[arg-type]
    # Pulls each epoch's pairs ahead and starts the next epoch's pass while this one trains.
    stream = worker_stream(ray.train.get_dataset_shard("train"), cfg, loop_config["epoch_clock"])
    loop = TrainingLoop(cfg.recipe, model, optimizer, device, validator, rank=rank, world=world,
                        autocast_dtype=autocast, mean_across_ranks=_mean_across_ranks, from_rank0=_broadcast)
    if payload is not None:
        loop.restore(payload)  # the weights, optimizer and moving average of the last checkpoint

    # The first row after a restore says so: the driver's quiet console (which reads the MLflow
    # run, not the workers' logs) and the run's history then show the restart.
    restored_from = {RESTORED_FROM_EPOCH: payload["epoch"], RESTORED_AT: time.time()} if payload is not None else {}

    def report(row: dict[str, Any], loop_state: LoopState) -> None:
        row = {**row, "worker_nodes": worker_nodes,
               CHECKPOINT_RANK: checkpoint_rank(row["val_oneshot_accuracy"], row["epoch"])}
        row.update(restored_from)
        restored_from.clear()
        if rank == 0:
            log.info(f"[rank 0] epoch {row['epoch']:3d} loss {row['train_loss']:.4f} "
                     f"val verif {row['val_verification_accuracy']:.4f} "
                     f"val 1-shot {row['val_oneshot_accuracy']:.4f}{' *' if row['improved'] else ''} "
                     f"({row['epoch_seconds']:.1f}s, {row['train_pairs_per_second']:.0f} pairs/s)")
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if rank == 0:
                ckpt_io.save(directory, loop.eval_net, epoch=row["epoch"], loop=loop_state.state_dict(),
                             metrics=row, **loop.resume_state())
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(row, checkpoint=checkpoint)

    miner = None
    if cfg.mining.enabled:
        import ray

        from siamese_core.loop import Miner

        clock = loop_config["epoch_clock"]

        def publish(assignment: Any) -> None:  # rank 0 tells the pair stage (the other ranks' stages share it)
            if rank == 0:
                ray.get(clock.set_assignment.remote([ray.put(assignment.state_dict())]))

        manifest = dataset.manifest
        miner = Miner(cfg.recipe, lambda: loop.net, lambda: mining_share(dataset, cfg, loop.net, rank, world),
                      publish, manifest.has_group, dataset.group_count("train") if manifest.has_group
                      else len(dataset.shard_paths("train")), dataset.class_count("train"), rank=rank,
                      gather=_all_gather, from_rank0=_broadcast)
        miner.restore(state)
    loop.run(stream.epoch, state, on_epoch=report, prepare=miner)
    stream.close()  # the next epoch's pass may have started already


# --------------------------------------------------------------------------- driver side

def preflight(cfg: JobConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """Everything that can be checked before asking Ray for resources; fails with what to fix.

    Opens the data set once; the handle travels to the pair stage and the workers. The
    configuration is fitted to the data (its preprocessing defaults, its sources and groups),
    so the returned ``cfg`` and ``overrides`` are what every worker builds.
    """
    from workflows import shards, storage, tracking

    if cfg.cluster.workers is not None:
        check_batches(cfg)
    dataset = shards.DataSet.open(cfg.data.uri, cfg.data.endpoint_url)
    for split in ("train", "validation", "test"):
        if not dataset.manifest.shards_of(split):
            raise ConfigError(f"{cfg.data.uri} has no {split!r} shards; re-run workflows.ingest")
    cfg, overrides = fit_to_data(cfg, overrides, dataset)
    loc = storage.locate(cfg.cluster.storage_path, cfg.data.endpoint_url)
    storage.check_writable(loc.fs, loc.path, loc.uri)
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_reachable(tracking_uri)
    return {"dataset": dataset, "storage": loc, "tracking_uri": tracking_uri, "cfg": cfg, "overrides": overrides}


def check_batches(cfg: JobConfig) -> None:
    per_worker = cfg.pairs.pairs_per_epoch // (cfg.cluster.workers or 1)
    if per_worker < cfg.training.batch_size:
        raise ConfigError(f"pairs.pairs_per_epoch={cfg.pairs.pairs_per_epoch} over {cfg.cluster.workers} workers "
                          f"gives {per_worker} pairs each, less than one batch of training.batch_size="
                          f"{cfg.training.batch_size}: no training step would run. Raise pairs.pairs_per_epoch "
                          "or lower training.batch_size / cluster.workers")


def fit_to_data(cfg: JobConfig, overrides: dict[str, Any], dataset: Any) -> tuple[JobConfig, dict[str, Any]]:
    """The configuration with the data set's defaults filled in, checked against the data.

    What the config leaves open (``model.preprocess.*`` and ``pairs.new_classes`` None) comes
    from the manifest, and goes into the overrides as explicit values, so every worker, the
    checkpoint and the registered model carry the same resolved values. Refuses, before Ray
    starts, sources the data has not got and one-shot episodes larger than its validation or
    test groups allow.
    """
    from siamese_core.oneshot import max_n_way

    manifest = dataset.manifest
    resolved = cfg.model.preprocess.resolved(manifest.preprocessing)
    extra = {f"model.preprocess.{k}": (v if not isinstance(v, tuple) else (",".join(map(str, v)) or "[]"))
             for k, v in dataclasses.asdict(resolved).items()}
    extra["pairs.new_classes"] = cfg.pairs.resolved(manifest.new_classes).new_classes
    overrides = {**overrides, **extra}
    try:
        cfg = apply_overrides(cfg, extra)
    except ConfigError as exc:
        raise ConfigError(f"{dataset.uri}: its preprocessing does not fit the model: {exc}") from exc
    if cfg.pairs.sources and not manifest.has_source:
        raise ConfigError(f"pairs.sources={list(cfg.pairs.sources)} names sources, but {dataset.uri} has no source "
                          "column; set pairs.sources=[] (every image)")
    if cfg.pairs.sources:
        known = set(manifest.splits["train"].get("source_names", cfg.pairs.sources))
        unknown = sorted(set(cfg.pairs.sources) - known)
        if unknown:
            raise ConfigError(f"pairs.sources names {unknown}, which {dataset.uri} has not got in its training "
                              f"split (it has {sorted(known)})")
    for split in ("validation", "test"):
        table = dataset.read_table(split, ["label"] + (["group"] if manifest.has_group else []))
        labels = table.column("label").to_numpy(zero_copy_only=False)
        keep = labels != manifest.unknown_label if manifest.unknown_label else np.ones(len(labels), bool)
        groups = table.column("group").to_numpy(zero_copy_only=False)[keep] if manifest.has_group else None
        codes = np.unique(labels[keep], return_inverse=True)[1]
        try:
            cfg.evaluation.episodes(manifest.has_group, max_n_way(codes, cfg.evaluation.k_shot, groups),
                                    validation=split == "validation")
        except ConfigError as exc:
            raise ConfigError(f"{dataset.uri}, {split} split: {exc}") from exc
    return cfg, overrides


def fit_to_cluster(cfg: JobConfig, overrides: dict[str, Any], per_trial: bool = False
                   ) -> tuple[JobConfig, dict[str, Any]]:
    """``cluster.workers`` none made concrete for the cluster Ray runs on, then the resources checked.

    One worker per ``gpus_per_worker`` GPUs; on CPU one per 4 CPU slots (at least one: on a
    2-core machine one worker with both cores' threads trains faster than two sharing them);
    one per trial in a search, whose parallelism is its concurrent trials. The chosen number
    goes into the overrides, so the workers build the same configuration.
    """
    import ray

    if cfg.cluster.workers is None:
        total = ray.cluster_resources()
        if per_trial:
            workers = 1
        elif cfg.cluster.use_gpu:
            workers = max(1, int(total.get("GPU", 0.0) // cfg.cluster.gpus_per_worker))
        else:
            workers = max(1, int(total.get("CPU", 1.0)) // 4)
        overrides = {**overrides, "cluster.workers": workers}
        cfg = apply_overrides(cfg, {"cluster.workers": workers})
        check_batches(cfg)
    check_resources(cfg)
    return cfg, overrides


def check_resources(cfg: JobConfig) -> None:
    """Refuse a request the cluster can never satisfy (instead of hanging forever)."""
    import ray

    total = ray.cluster_resources()
    need_cpu = (cfg.cluster.workers * cfg.cluster.cpus_per_worker
                + cfg.data.pair_stage_cpus * cfg.data.pair_stage_concurrency + cfg.data.read_cpus)
    need_gpu = cfg.cluster.workers * cfg.cluster.gpus_per_worker
    if need_gpu > total.get("GPU", 0.0):
        raise ConfigError(f"{cfg.cluster.workers} workers x {cfg.cluster.gpus_per_worker} GPU need {need_gpu} GPUs; "
                          f"the cluster has {total.get('GPU', 0.0):g}. Lower cluster.workers or "
                          "cluster.gpus_per_worker, or add GPU nodes")
    if need_cpu > total.get("CPU", 0.0):
        raise ConfigError(f"{cfg.cluster.workers} workers x {cfg.cluster.cpus_per_worker} CPU + "
                          f"{cfg.data.pair_stage_cpus * cfg.data.pair_stage_concurrency + cfg.data.read_cpus:g} for the data stages need {need_cpu:g} CPUs; the cluster has "
                          f"{total.get('CPU', 0.0):g}. Lower cluster.cpus_per_worker or cluster.workers")


def build_trainer(cfg: JobConfig, loop_config: dict[str, Any], dataset: Any, storage_loc: Any,
                  callbacks: list) -> Any:
    """A ``TorchTrainer`` over the streaming pair dataset, its workers and the stage sharing an epoch clock."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from workflows import storage
    from workflows.data import start_epoch_clock, training_pairs

    # Progress is the per-epoch line (and Tune's table). Ray Data's bars, redrawn for every
    # epoch's two-second pass, would bury it and cost the driver CPU beside the workers.
    ray.data.DataContext.get_current().enable_progress_bars = False
    clock = start_epoch_clock()
    loop_config = {**loop_config, "epoch_clock": clock, "dataset": dataset}
    pairs = training_pairs(dataset, cfg.pairs, cfg.model, cfg.training.seed, clock=clock,
                           negatives=cfg.training.negatives, num_cpus=cfg.data.pair_stage_cpus,
                           read_cpus=cfg.data.read_cpus, concurrency=cfg.data.pair_stage_concurrency,
                           cache_mb=cfg.data.decoded_cache_mb, shards_per_task=cfg.data.shards_per_task)
    # Blocks in order: the stream, and so a seeded run, does not depend on which task finishes first.
    ingest_options = ray.data.ExecutionOptions(preserve_order=True)
    resources = {"CPU": cfg.cluster.cpus_per_worker}
    if cfg.cluster.use_gpu:
        resources["GPU"] = cfg.cluster.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.cluster.workers, use_gpu=cfg.cluster.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=cfg.cluster.placement_strategy),
        run_config=ray.train.RunConfig(
            name=cfg.cluster.name,
            storage_path=storage_loc.path,
            storage_filesystem=storage.patient(storage_loc.fs),  # rides out a brief outage
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.cluster.checkpoints_to_keep,
                                                         checkpoint_score_attribute=CHECKPOINT_RANK,
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.cluster.max_failures),
            callbacks=callbacks,
        ),
        datasets={"train": pairs},
        dataset_config=ray.train.DataConfig(execution_options={"train": ingest_options}),
    )


RESTORED_FROM_EPOCH, RESTORED_AT = "restored_from_epoch", "restored_at"
"""In the first epoch's metrics after the workers restored a checkpoint: that checkpoint's epoch, and
when (Unix seconds: tells this restart from an earlier one, even of the same epoch)."""

CHECKPOINT_RANK = "checkpoint_rank"
"""The metric Ray Train keeps checkpoints by (``CheckpointConfig.checkpoint_score_attribute``)."""


def checkpoint_rank(val_oneshot_accuracy: float, epoch: int) -> float:
    """Validation one-shot accuracy, with ties going to the earlier epoch.

    Why: Ray Train keeps the later of two equally scored checkpoints, while the paper's
    early stopping (a strict improvement) calls the earlier one best; ranking on the bare
    accuracy would register a later epoch than the one the metrics call best. 1e-9 per epoch cannot reorder two different accuracies: over fewer
    than a million trials they differ by more than 1e-6, and runs have fewer than 1,000 epochs.
    """
    return float(val_oneshot_accuracy) - 1e-9 * int(epoch)


def best_checkpoint(result: Any) -> tuple[Any, dict[str, Any]]:
    """The kept checkpoint with the highest validation one-shot accuracy (the paper's 'best epoch')."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if "val_oneshot_accuracy" in m]
    if not candidates:
        raise RuntimeError("training produced no checkpoint with validation metrics")
    return max(candidates, key=lambda cm: checkpoint_rank(cm[1]["val_oneshot_accuracy"], cm[1]["epoch"]))


def run(cfg: JobConfig, recipe: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The whole job; returns a summary (test accuracy beside the pixel baseline, MLflow run id, best epoch)."""
    from workflows import ray_setup

    from workflows import tracking

    checks = preflight(cfg, overrides)
    cfg, overrides, dataset = checks["cfg"], checks["overrides"], checks["dataset"]
    tracking_uri = checks["tracking_uri"]
    # a finished run's name is refused before Ray starts; an unfinished one is resumed
    checks["resumed"] = tracking.previous_run(checks["storage"], cfg.cluster.name, tracking_uri, "training run")
    ray_scope = contextlib.ExitStack()  # Ray stops before the test trials, which need none of it
    with ray_scope:
        ray_scope.enter_context(ray_setup.ray_session())
        cfg, overrides = fit_to_cluster(cfg, overrides)  # a request the cluster cannot meet: exit 2, no run made
        cli.started_work()
        return _train_and_report(cfg, recipe, overrides, checks, dataset, tracking_uri, ray_scope)


def _train_and_report(cfg: JobConfig, recipe: str, overrides: dict[str, Any], checks: dict[str, Any], dataset: Any,
                      tracking_uri: str, ray_scope: contextlib.ExitStack) -> dict[str, Any]:
    import mlflow

    from siamese_core import checkpoint as ckpt_io
    from workflows import evaluate, tracking
    from workflows.progress import EpochProgress

    run_name = cfg.tracking.run_name or f"train-{dataset.name}-{cfg.model.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    resumed = checks["resumed"]
    with tracking.mlflow_run(tracking_uri, cfg.tracking.experiment, run_name, run_id=resumed,
                             tags={"job": "train", "preset": cfg.model.preset, "data": dataset.name}) as mlrun:
        if resumed is None:
            tracking.log_config(cfg)
            tracking.log_dataset(dataset, context="training")
            tracking.remember_run(checks["storage"], cfg.cluster.name, tracking_uri, mlrun.info.run_id)
        else:
            print(f"Resuming {cfg.cluster.name!r} from {checks['storage'].uri}: MLflow run {resumed}")
        loop_config = {"recipe": recipe, "overrides": overrides}
        trainer = build_trainer(cfg, loop_config, dataset, checks["storage"],
                                [tracking.EpochMetricsCallback(tracking_uri, mlrun.info.run_id)])
        started = time.perf_counter()
        if cli.verbose():  # the workers' own epoch lines reach the console
            result = trainer.fit()
        else:
            display = EpochProgress(cfg.training.epochs, cfg.training.time_budget_s)
            print(f"training on {cfg.cluster.workers} worker(s): {dataset.name}, recipe {recipe}, "
                  f"run {cfg.cluster.name!r}", file=sys.stderr, flush=True)
            try:
                with tracking.following_epochs(tracking_uri, mlrun.info.run_id, display.show):
                    result = trainer.fit()
            finally:
                display.close()
        train_seconds = time.perf_counter() - started
        ray_scope.close()
        checkpoint, best_metrics = best_checkpoint(result)
        with checkpoint.as_directory() as directory:
            model = ckpt_io.load_model(directory)
        report = evaluate.final_report(model, dataset, cfg.evaluation, seed=cfg.training.seed)
        mlflow.log_metrics({"best_epoch": best_metrics["epoch"],
                            "best_val_oneshot_accuracy": best_metrics["val_oneshot_accuracy"],
                            "train_wall_seconds": train_seconds})
        tracking.log_report(report, "test")
        model_uri = tracking.log_model(model, cfg.tracking.registered_model,
                                       new_threshold=report.reid.threshold_p if report.reid else None)
        tracking.describe_run(dataset, recipe, report)
        tracking.remember_run(checks["storage"], cfg.cluster.name, tracking_uri, mlrun.info.run_id, finished=True)
        test = report.evaluation
        return {"run_id": mlrun.info.run_id, "tracking_uri": tracking_uri, "data": dataset.name,
                "test_accuracy": test.result.accuracy, "test_accuracy_single_view": report.single_view_accuracy,
                "test_pixel_nn_accuracy": report.baseline.accuracy, "protocol": report.protocol,
                "test_time_shift_px": model.config.test_time_shift_px, "test_time_views": model.config.test_time_views,
                "test_correct": test.result.correct, "test_trials": test.result.trials,
                "best_epoch": int(best_metrics["epoch"]),
                "best_val_oneshot_accuracy": float(best_metrics["val_oneshot_accuracy"]),
                "validation_views": cfg.training.validation_views,
                "checkpoint": checkpoint.path, "model_uri": model_uri, "train_seconds": train_seconds,
                "reid": None if report.reid is None else {**report.reid.test.metrics(),
                                                          "pixel": report.reid.baseline}}


def training_failure_message(cfg: JobConfig, exc: BaseException) -> str:
    """What failed, what was kept, and how to go on, after Ray Train gave up (``max_failures`` used up)."""
    cause = str(exc).strip().splitlines()
    detail = next((line.strip() for line in reversed(cause) if "Error" in line), cause[-1] if cause else "")
    return (f"error: training failed after {cfg.cluster.max_failures} restart(s) from the last checkpoint: "
            f"{detail[:500]}\n"
            f"The checkpoints kept so far (the latest and the best) are in {cfg.cluster.storage_path}/"
            f"{cfg.cluster.name}; no epoch was logged to MLflow before its checkpoint was stored. If the storage ({cfg.cluster.storage_path}) or a node was unavailable, "
            f"fix that and re-run the same command (same --name) to resume.")


SHORTCUTS = {  # flag -> config key
    "data": "data.uri", "endpoint_url": "data.endpoint_url", "workers": "cluster.workers",
    "gpus_per_worker": "cluster.gpus_per_worker", "cpus_per_worker": "cluster.cpus_per_worker",
    "storage_path": "cluster.storage_path", "name": "cluster.name", "epochs": "training.epochs",
    "seed": "training.seed", "tracking_uri": "tracking.uri", "experiment": "tracking.experiment",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workflows.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    job_config.add_arguments(parser)
    d = job_config.build("demo")
    parser.add_argument("--data", help=f"shards from workflows.ingest, a folder or s3:// (default: {d.data.uri})")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// URIs (default: AWS_ENDPOINT_URL "
                                               "or AWS's own)")
    parser.add_argument("--workers", type=int, help="Ray Train workers (default: fit the cluster: one per GPU, "
                                                    "else one per 4 CPUs)")
    parser.add_argument("--gpus-per-worker", type=float,
                        help=f"0 for CPU (gloo), >0 for GPU (NCCL) (default: {d.cluster.gpus_per_worker:g})")
    parser.add_argument("--cpus-per-worker", type=float,
                        help=f"Ray CPU slots per worker (default: {d.cluster.cpus_per_worker:g})")
    parser.add_argument("--storage-path", help=f"checkpoints: a local dir or s3://bucket/prefix "
                                               f"(default: {d.cluster.storage_path})")
    parser.add_argument("--name", help=f"run name under the storage path; re-use it to resume "
                                       f"(default: {d.cluster.name})")
    parser.add_argument("--epochs", type=int, help=f"most epochs (default: the recipe's; demo {d.training.epochs})")
    parser.add_argument("--seed", type=int, help=f"fixes pairs, distortions, trials and the initial weights "
                                                 f"(default: {d.training.seed})")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                                               "sqlite:///./mlflow.db)")
    parser.add_argument("--experiment", help=f"MLflow experiment (default: {d.tracking.experiment})")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    cli.add_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[JobConfig, str, dict[str, Any], argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = job_config.collect_overrides(args, SHORTCUTS)
    cfg, overrides = job_config.resolve(args.recipe, overrides)
    return cfg, args.recipe, overrides, args


def main(argv: list[str] | None = None) -> int:
    job: dict[str, JobConfig] = {}

    def failure(exc: BaseException) -> str | None:
        from ray.train import TrainingFailedError

        return training_failure_message(job["cfg"], exc) if isinstance(exc, TrainingFailedError) else None

    return cli.run(lambda: _main(argv, job), on_failure=failure)


def _main(argv: list[str] | None, job: dict[str, JobConfig]) -> int:
    cfg, recipe, overrides, args = parse_args(argv)
    cli.configure_console(args.verbose)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(job_config.to_plain(cfg.to_dict()), sort_keys=True))
        return 0
    job["cfg"] = cfg
    summary = run(cfg, recipe, overrides)
    single = summary["test_accuracy_single_view"]
    val_views = ", one view" if summary["validation_views"] == "single" and summary["test_time_shift_px"] else ""
    print(f"test one-shot accuracy: {summary['test_accuracy']:.2%} ({summary['test_correct']}/"
          f"{summary['test_trials']} trials, {summary['protocol']}"
          + (f"; one view, as in the paper: {single:.2%}" if single is not None else "")
          + f"); pixel nearest neighbour on the same trials: {summary['test_pixel_nn_accuracy']:.2%}; "
          f"best epoch {summary['best_epoch']} (validation {summary['best_val_oneshot_accuracy']:.2%}{val_views}), "
          f"training {summary['train_seconds']:.0f}s")
    if summary["reid"]:
        r = summary["reid"]
        print(f"re-identification on test ({int(r['queries'])} queries, {int(r['new_queries'])} of new individuals): "
              f"top-1 {r['top1']:.2%}, top-5 {r['top5']:.2%}, MAP@5 {r['map5']:.3f} (pixels {r['pixel']['map5']:.3f}); "
              f"with 'new' at p = {r['threshold_p']:.3f} (chosen on validation): MAP@5 {r['map5_new']:.3f} "
              f"(pixels {r['pixel']['map5_new']:.3f})")
    print(f"MLflow run {summary['run_id']}; model {summary['model_uri']}")
    from workflows import tracking

    print(f"Review it: {tracking.ui_hint(summary['tracking_uri'])}")
    return 0


if __name__ == "__main__":
    # through the package module, so the errors raised are the classes workflows.cli knows
    from workflows.train import main as entry

    sys.exit(entry())
