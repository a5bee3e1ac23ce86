"""``python -m workflows.train``: data-parallel siamese training on Ray Train, tracked in MLflow.

Flow: preflight checks (config, data manifest, checkpoint storage, MLflow) ->
one MLflow run -> ``TorchTrainer`` with N workers, each streaming its share of
the pair dataset (``workflows.data``) -> per-epoch validation on rank 0,
checkpoint, early stopping -> the best checkpoint scored on the 400 test
trials -> model logged and registered in MLflow.

Examples::

    python -m workflows.train                                   # CPU demo recipe, 2 workers
    python -m workflows.train --recipe paper --workers 4 --gpus-per-worker 1 \\
        --data s3://bucket/omniglot --storage-path s3://bucket/runs
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from siamese_core.config import ConfigError, DistortionConfig
from workflows import config as job_config
from workflows.config import JobConfig


# --------------------------------------------------------------------------- worker side

@dataclass
class Validation:
    """Rank 0's fixed validation data: verification pairs (``left``/``right``: row indices into
    ``images``) and Koch's 320 one-shot trials."""

    images: Any
    left: Any
    right: Any
    same: Any
    runs: list

    @staticmethod
    def load(cfg: JobConfig, device: Any) -> "Validation":
        import torch

        from siamese_core.fit import fixed_validation_pairs, oneshot_trials
        from workflows.evaluate import load_split_arrays

        arrays = load_split_arrays(cfg.data.uri, "validation", cfg.data.endpoint_url, size=cfg.model.input_size)
        images = torch.from_numpy(np.ascontiguousarray(arrays.images)).to(device)
        pairs = fixed_validation_pairs(arrays, negatives=cfg.training.negatives)  # type: ignore[arg-type]
        return Validation(images=images, left=torch.from_numpy(pairs.left), right=torch.from_numpy(pairs.right),
                          same=torch.from_numpy(pairs.same), runs=oneshot_trials(arrays))

    def evaluate(self, model: Any, device: Any, views: str = "model") -> dict[str, float]:
        """Verification accuracy, and one-shot accuracy with ``views`` (``training.validation_views``)."""
        from siamese_core.fit import evaluate_oneshot, validation_model
        from siamese_core.train_step import verification_accuracy

        oneshot = evaluate_oneshot(validation_model(model, views), self.images, self.runs, device)
        return {"val_verification_accuracy": verification_accuracy(model, self.images, self.left, self.right, self.same),
                "val_oneshot_accuracy": oneshot.accuracy}


def _distortion_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank, 0xD157]).generate_state(1, np.uint64)[0] >> np.uint64(1))


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
    """One Train worker: stream pairs, step, validate (rank 0), checkpoint, early-stop."""
    import ray.train
    import ray.train.torch
    import torch

    from siamese_core import checkpoint as ckpt_io
    from siamese_core.fit import EarlyStopping, new_model
    from siamese_core.heap import keep_freed_memory
    from siamese_core.model import place_model
    from siamese_core.optim import apply_epoch_schedule, build_optimizer
    from siamese_core.train_step import train_step
    from workflows.data import expand_copies, iter_steps, worker_stream

    cfg: JobConfig = job_config.build(loop_config["recipe"], overrides=loop_config["overrides"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Share the node's cores between its workers unless told otherwise.
    torch.set_num_threads(cfg.training.threads or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    if cfg.training.keep_freed_memory:
        keep_freed_memory()
    device = ray.train.torch.get_device()
    gpu = device.type == "cuda"

    model = new_model(cfg.model, cfg.training.seed, cfg.training.fan_in_scaled)
    stopper = EarlyStopping(cfg.training.patience)
    start_epoch, payload = 0, None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        try:
            with restored.as_directory() as directory:
                payload = ckpt_io.load_payload(directory)
        except (OSError, FileNotFoundError) as exc:
            raise RuntimeError(f"StorageError: could not read the last checkpoint {restored.path} back from "
                               f"{cfg.cluster.storage_path} (is the storage reachable?): {exc}") from exc
        model.load_state_dict(payload["state_dict"])
        stopper.load_state_dict(payload["early_stopping"])
        start_epoch = int(payload["epoch"]) + 1
        if rank == 0:
            print(f"[rank 0] restored epoch {payload['epoch']} from {restored.path}; "
                  f"training goes on at epoch {start_epoch}", flush=True)
    model = ray.train.torch.prepare_model(place_model(model, device, cfg.cluster.channels_last))
    optimizer = build_optimizer(ckpt_io.unwrap(model), cfg.optim)
    if payload is not None:
        optimizer.load_state_dict(payload["optimizer"])
    autocast = torch.bfloat16 if gpu and cfg.cluster.mixed_precision else None
    distort_cfg: DistortionConfig | None = cfg.distort if cfg.pairs.distorted_copies > 0 else None

    worker_nodes = _nodes_in_use()
    validation = Validation.load(cfg, device) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    # Pulls each epoch's pairs ahead and starts the next epoch's pass while this one trains.
    stream = worker_stream(shard, cfg, loop_config["epoch_clock"])
    started = time.perf_counter()
    epoch_seconds: list[float] = []
    for epoch in range(start_epoch, cfg.training.epochs):
        t0 = time.perf_counter()
        apply_epoch_schedule(optimizer, cfg.optim, epoch)
        generator = torch.Generator(device=device).manual_seed(_distortion_seed(cfg.training.seed, epoch, rank))
        loss_sum, steps, pairs_seen, pairs_epoch = 0.0, 0, 0, -1
        for batch in stream.epoch(epoch):
            pairs_epoch = int(batch["epoch"][0]) if pairs_epoch < 0 and len(batch["epoch"]) else pairs_epoch
            expanded = expand_copies(batch["left"], batch["right"], batch["same"], cfg.pairs.distorted_copies)
            for left, right, same, mask in iter_steps(*expanded, cfg.training.batch_size, generator):
                loss_sum += train_step(model, optimizer, left, right, same, mask, distort_cfg, generator,
                                       autocast_dtype=autocast,
                                       in_batch_negatives=cfg.training.in_batch_negatives)
                steps += 1
                pairs_seen += left.shape[0]
        train_seconds = time.perf_counter() - t0
        train_loss = _mean_across_ranks(loss_sum / max(1, steps))

        metrics: dict[str, Any] = {}
        if rank == 0:
            assert validation is not None
            metrics = validation.evaluate(ckpt_io.unwrap(model), device, cfg.training.validation_views)
            improved = stopper.update(epoch, metrics["val_oneshot_accuracy"])
            elapsed = time.perf_counter() - started
            epoch_seconds.append(time.perf_counter() - t0)
            over_budget = (cfg.training.time_budget_s is not None
                           and elapsed + max(epoch_seconds[-3:]) > cfg.training.time_budget_s)
            metrics.update({
                "epoch": epoch, "epochs_completed": epoch + 1, "train_loss": train_loss, "improved": int(improved),
                "best_val_oneshot_accuracy": stopper.best_value, "best_epoch": stopper.best_epoch,
                CHECKPOINT_RANK: checkpoint_rank(metrics["val_oneshot_accuracy"], epoch),
                "lr": float(optimizer.param_groups[0]["lr"]),
                "momentum": float(optimizer.param_groups[0].get("momentum", 0.0)),
                "train_seconds": train_seconds, "epoch_seconds": time.perf_counter() - t0,
                "train_pairs_per_second": pairs_seen * world / max(train_seconds, 1e-9),
                "steps": steps, "workers": world, "worker_nodes": worker_nodes,
                "pairs_epoch": pairs_epoch,  # the epoch the pair stage drew for: equal to "epoch" when in step
                "stop": "early_stopping" if stopper.should_stop else "time_budget" if over_budget
                else "epochs" if epoch + 1 >= cfg.training.epochs else "",
            })
            print(f"[rank 0] epoch {epoch:3d} loss {train_loss:.4f} "
                  f"val verif {metrics['val_verification_accuracy']:.4f} "
                  f"val 1-shot {metrics['val_oneshot_accuracy']:.4f}{' *' if improved else ''} "
                  f"({metrics['epoch_seconds']:.1f}s, {metrics['train_pairs_per_second']:.0f} pairs/s)",
                  flush=True)
        metrics = _broadcast(metrics)
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if rank == 0:
                ckpt_io.save(directory, model, optimizer=optimizer.state_dict(), epoch=epoch,
                             early_stopping=stopper.state_dict(), metrics=metrics)
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint)
        if metrics["stop"]:
            break
    stream.close()  # the next epoch's pass may have started already


# --------------------------------------------------------------------------- driver side

def preflight(cfg: JobConfig) -> dict[str, Any]:
    """Everything that can be checked before asking Ray for resources; fails with what to fix."""
    from workflows import shards, storage, tracking

    per_worker = cfg.pairs.pairs_per_epoch // cfg.cluster.workers
    if per_worker < cfg.training.batch_size:
        raise ConfigError(f"pairs.pairs_per_epoch={cfg.pairs.pairs_per_epoch} over {cfg.cluster.workers} workers "
                          f"gives {per_worker} pairs each, less than one batch of training.batch_size="
                          f"{cfg.training.batch_size}: no training step would run. Raise pairs.pairs_per_epoch "
                          "or lower training.batch_size / cluster.workers")
    manifest = shards.read_manifest(cfg.data.uri, cfg.data.endpoint_url)
    for split in ("train", "validation", "test"):
        if not manifest.shards_of(split):
            raise ConfigError(f"{cfg.data.uri} has no {split!r} shards; re-run workflows.ingest")
    loc = storage.locate(cfg.cluster.storage_path, cfg.data.endpoint_url)
    storage.check_writable(loc.fs, loc.path, loc.uri)
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_reachable(tracking_uri)
    return {"manifest": manifest, "storage": loc, "tracking_uri": tracking_uri}


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


def build_trainer(cfg: JobConfig, loop_config: dict[str, Any], storage_loc: Any, callbacks: list) -> Any:
    """A ``TorchTrainer`` over the streaming pair dataset, its workers and the stage sharing an epoch clock."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from workflows import storage
    from workflows.data import start_epoch_clock, training_pairs

    import ray.data

    # Progress is the per-epoch line (and Tune's table). Ray Data's bars, redrawn for every
    # epoch's two-second pass, would bury it and cost the driver CPU beside the workers.
    ray.data.DataContext.get_current().enable_progress_bars = False
    clock = start_epoch_clock()
    loop_config = {**loop_config, "epoch_clock": clock}
    dataset = training_pairs(cfg.data.uri, cfg.pairs, cfg.model.input_size, cfg.training.seed,
                             cfg.data.endpoint_url, clock=clock, negatives=cfg.training.negatives,
                             num_cpus=cfg.data.pair_stage_cpus, read_cpus=cfg.data.read_cpus,
                             concurrency=cfg.data.pair_stage_concurrency, cache_mb=cfg.data.decoded_cache_mb,
                             shards_per_task=cfg.data.shards_per_task)
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
        datasets={"train": dataset},
    )


CHECKPOINT_RANK = "checkpoint_rank"
"""The metric Ray Train keeps checkpoints by (``CheckpointConfig.checkpoint_score_attribute``)."""


def checkpoint_rank(val_oneshot_accuracy: float, epoch: int) -> float:
    """Validation one-shot accuracy, with ties going to the earlier epoch.

    Why: Ray Train keeps the later of two equally scored checkpoints, while the paper's
    early stopping (a strict improvement) calls the earlier one best; ranking on the bare
    accuracy let a ``make demo`` run register epoch 43 while its metrics said best epoch 39
    (both 74.69%). 1e-9 per epoch cannot reorder two different accuracies: over fewer
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
    """The whole job; returns a summary (test accuracy, MLflow run id, best epoch)."""
    import mlflow

    from siamese_core import checkpoint as ckpt_io
    from siamese_core.fit import evaluate_oneshot
    from siamese_core.model import with_test_time_shift
    from workflows import evaluate, ray_setup, tracking

    checks = preflight(cfg)
    tracking_uri = checks["tracking_uri"]
    run_name = cfg.tracking.run_name or f"train-{cfg.model.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    resumed = tracking.previous_run(checks["storage"], cfg.cluster.name, tracking_uri, "training run")
    with tracking.mlflow_run(tracking_uri, cfg.tracking.experiment, run_name, run_id=resumed,
                             tags={"job": "train", "preset": cfg.model.preset}) as mlrun:
        if resumed is None:
            tracking.log_config(cfg)
            tracking.remember_run(checks["storage"], cfg.cluster.name, tracking_uri, mlrun.info.run_id)
        else:
            print(f"Resuming {cfg.cluster.name!r} from {checks['storage'].uri}: MLflow run {resumed}")
        with ray_setup.ray_session(quiet=False):
            check_resources(cfg)
            loop_config = {"recipe": recipe, "overrides": overrides}
            trainer = build_trainer(cfg, loop_config, checks["storage"],
                                    [tracking.EpochMetricsCallback(tracking_uri, mlrun.info.run_id)])
            started = time.perf_counter()
            result = trainer.fit()
            train_seconds = time.perf_counter() - started
        checkpoint, best_metrics = best_checkpoint(result)
        with checkpoint.as_directory() as directory:
            model = ckpt_io.load_model(directory)
        test = evaluate.evaluate_model(model, cfg.data.uri, "test", seed=cfg.training.seed,
                                       endpoint_url=cfg.data.endpoint_url)
        mlflow.log_metrics({"best_epoch": best_metrics["epoch"],
                            "best_val_oneshot_accuracy": best_metrics["val_oneshot_accuracy"],
                            "train_wall_seconds": train_seconds})
        tracking.log_oneshot(test.result, "test")
        tracking.log_oneshot_figures(test, "test")
        single_view = None
        if model.config.test_time_shift_px:  # also the paper's protocol: one view per image
            single_view = evaluate_oneshot(with_test_time_shift(model, 0), test.arrays, test.runs).accuracy
            mlflow.log_metric("test_oneshot_accuracy_single_view", single_view)
        model_uri = tracking.log_model(model, cfg.tracking.registered_model)
        tracking.remember_run(checks["storage"], cfg.cluster.name, tracking_uri, mlrun.info.run_id, finished=True)
        return {"run_id": mlrun.info.run_id, "tracking_uri": tracking_uri, "test_accuracy": test.result.accuracy,
                "test_accuracy_single_view": single_view, "test_time_shift_px": model.config.test_time_shift_px,
                "test_time_views": model.config.test_time_views,
                "test_correct": test.result.correct, "test_trials": test.result.trials,
                "best_epoch": int(best_metrics["epoch"]),
                "best_val_oneshot_accuracy": float(best_metrics["val_oneshot_accuracy"]),
                "validation_views": cfg.training.validation_views,
                "checkpoint": checkpoint.path, "model_uri": model_uri, "train_seconds": train_seconds}


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


def parse_args(argv: list[str] | None = None) -> tuple[JobConfig, str, dict[str, Any], argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m workflows.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    job_config.add_arguments(parser)
    parser.add_argument("--data", help="shards from workflows.ingest (dir or s3://)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// URIs")
    parser.add_argument("--workers", type=int, help="Ray Train workers")
    parser.add_argument("--gpus-per-worker", type=float, help="0 for CPU (gloo), >0 for GPU (NCCL)")
    parser.add_argument("--cpus-per-worker", type=float)
    parser.add_argument("--storage-path", help="checkpoints: a local dir or s3://bucket/prefix")
    parser.add_argument("--name", help="run name under the storage path; re-use it to resume")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default ./mlflow.db)")
    parser.add_argument("--experiment")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    overrides = job_config.collect_overrides(args, SHORTCUTS)
    cfg, overrides = job_config.resolve(args.recipe, overrides)
    return cfg, args.recipe, overrides, args


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, recipe, overrides, args = parse_args(argv)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(job_config.to_plain(cfg.to_dict()), sort_keys=True))
        return 0
    from workflows.shards import DatasetError
    from workflows.storage import StorageError

    try:
        summary = run(cfg, recipe, overrides)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except (DatasetError, StorageError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from ray.train import TrainingFailedError

        if not isinstance(exc, TrainingFailedError):
            raise
        print(training_failure_message(cfg, exc), file=sys.stderr)
        return 1
    from workflows.evaluate import views_description

    views = views_description(summary["test_time_shift_px"], summary["test_time_views"])
    if summary["test_accuracy_single_view"] is not None:
        views += f"; one view, as in the paper: {summary['test_accuracy_single_view']:.2%}"
    val_views = ", one view" if summary["validation_views"] == "single" and summary["test_time_shift_px"] else ""
    print(f"test one-shot accuracy: {summary['test_accuracy']:.2%} ({summary['test_correct']}/"
          f"{summary['test_trials']} trials, 20-way within-alphabet, Lake's 10 test alphabets{views}); "
          f"best epoch {summary['best_epoch']} (validation {summary['best_val_oneshot_accuracy']:.2%}{val_views}), "
          f"training {summary['train_seconds']:.0f}s")
    print(f"MLflow run {summary['run_id']}; model {summary['model_uri']}")
    from workflows import tracking

    print(f"Review it: {tracking.ui_hint(summary['tracking_uri'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
