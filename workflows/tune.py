"""``python -m workflows.tune``: Ray Tune search over learning rates and affine distortions.

Each trial is one run of the main job (Ray Train inside Tune, Train V2's
pattern: a driver function per trial builds and fits a ``TorchTrainer`` whose
``TuneReportCallback`` forwards every epoch's metrics to Tune). Optuna's TPE
(a Bayesian, model-based sampler, seeded) suggests configurations and ASHA
stops trials whose validation one-shot accuracy lags; the test alphabets are
scored once, at the end, from the best trial's best checkpoint.

MLflow: the search is one parent run; each trial is a child run with its config
and per-epoch metrics; the parent records the best trial, its config (also
written as a file ``workflows.train --config`` reads) and its test accuracy.
Re-running with the same ``--name`` and storage path resumes an interrupted search.

Examples::

    python -m workflows.tune --samples 8 --set training.epochs=6
    python -m workflows.tune --space my_space.yaml --name lr-search --storage-path s3://bucket/runs
    python -m workflows.tune --print-space > my_space.yaml      # the default space, to edit
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from siamese_core.config import ConfigError, apply_overrides
from workflows import cli
from workflows import config as job_config
from workflows import search_space
from workflows.config import JobConfig, SearchSection

OBJECTIVE = "val_oneshot_accuracy"
"""What the search maximises: accuracy on the 320 validation one-shot trials (never the test alphabets)."""


@dataclass(frozen=True)
class SearchPlan:
    """What every trial needs to become a training run and an MLflow child run (sent to trial actors)."""

    recipe: str
    base_overrides: dict[str, Any]
    tracking_uri: str
    experiment: str
    parent_run_id: str
    train_storage: str
    """Where the trials' Train runs keep checkpoints: ``<storage>/<search name>/train/<trial id>``."""
    dataset: Any = None
    """The data set, opened once by the search's driver (``shards.DataSet``); every trial reads it."""

    def trial_overrides(self, params: Mapping[str, Any], trial_id: str) -> dict[str, Any]:
        return {**self.base_overrides, **params, "cluster.name": trial_id,
                "cluster.storage_path": self.train_storage, "tracking.registered_model": None}


# --------------------------------------------------------------------------- trial side

def run_trial(params: dict[str, Any], plan: SearchPlan) -> None:
    """One trial: the main job's training with ``params`` overridden, reporting each epoch to Tune."""
    import ray.tune
    from mlflow.tracking import MlflowClient
    from ray.tune.integration.ray_train import TuneReportCallback

    from workflows import storage, tracking
    from workflows.train import build_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    overrides = plan.trial_overrides(params, trial_id)
    cfg = job_config.build(plan.recipe, overrides=overrides)
    child = child_run(plan, trial_id, cfg)
    loc = storage.locate(cfg.cluster.storage_path, cfg.data.endpoint_url)
    trainer = build_trainer(cfg, {"recipe": plan.recipe, "overrides": overrides}, plan.dataset, loc,
                            [tracking.EpochMetricsCallback(plan.tracking_uri, child), TuneReportCallback()])
    trainer.fit()
    MlflowClient(plan.tracking_uri).set_terminated(child, "FINISHED")


def child_run(plan: SearchPlan, trial_id: str, cfg: JobConfig) -> str:
    """The trial's MLflow child run: found again when a resumed search restarts the trial."""
    from mlflow.tracking import MlflowClient

    from workflows import tracking

    client = MlflowClient(plan.tracking_uri)
    experiment_id = tracking.ensure_experiment(plan.tracking_uri, plan.experiment)
    existing = find_child_runs(client, experiment_id, plan.parent_run_id, trial_id)
    if existing:
        client.update_run(existing[0].info.run_id, status="RUNNING")
        return existing[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"trial-{trial_id}",
                            tags={"mlflow.parentRunId": plan.parent_run_id, "tune.trial_id": trial_id,
                                  "job": "tune-trial", "preset": cfg.model.preset})
    tracking.log_config(cfg, client=client, run_id=run.info.run_id)
    return run.info.run_id


def find_child_runs(client: Any, experiment_id: str, parent_run_id: str, trial_id: str | None = None) -> list:
    query = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    if trial_id is not None:
        query += f" and tags.`tune.trial_id` = '{trial_id}'"
    return client.search_runs([experiment_id], filter_string=query, max_results=10_000)


# --------------------------------------------------------------------------- search side

def make_searcher(search: SearchSection) -> Any:
    """Optuna's TPE: Bayesian optimisation as in the paper, cheap per suggestion, seeded,
    at ease with log-scaled, integer and categorical keys, and restored with the search."""
    import warnings

    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if search.algorithm == "random":
        sampler = optuna.samplers.RandomSampler(seed=search.seed)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=search.startup_trials,
                                                 multivariate=True)
    return OptunaSearch(sampler=sampler)


def make_scheduler(search: SearchSection, cfg: JobConfig) -> Any:
    """ASHA on validation one-shot accuracy, in epochs; None runs every trial to its end."""
    if search.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epochs_completed", max_t=cfg.training.epochs,
                         grace_period=search.grace_period, reduction_factor=search.reduction_factor)


def make_tuner(plan: SearchPlan, space: Mapping[str, Any], search: SearchSection, cfg: JobConfig,
               loc: Any) -> tuple[Any, bool]:
    """A new Tuner, or the interrupted one restored from storage; True when restored."""
    from ray import tune

    from workflows import storage

    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"CPU": search.trial_cpus})
    path = loc.join(search.name)
    fs = storage.patient(loc.fs)  # Ray's processes ride out a brief object-store outage
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=fs), True
    tuner = tune.Tuner(
        trainable,
        param_space=search_space.to_tune(space),
        tune_config=tune.TuneConfig(metric=OBJECTIVE, mode="max", search_alg=make_searcher(search),
                                    scheduler=make_scheduler(search, cfg), num_samples=search.num_samples,
                                    max_concurrent_trials=search.max_concurrent_trials),
        run_config=tune.RunConfig(name=search.name, storage_path=loc.path, storage_filesystem=fs,
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )
    return tuner, False


@dataclass
class TrialSummary:
    trial_id: str
    params: dict[str, Any]
    epochs: int
    best_val: float
    best_epoch: int
    stopped_early: bool
    error: str | None
    rows: list[dict[str, Any]]


def summarize(grid: Any, epochs: int) -> list[TrialSummary]:
    """Each trial's outcome from Tune's results: best validation epoch, early stop, error."""
    out = []
    for result in grid:
        frame = result.metrics_dataframe
        rows = [] if frame is None or OBJECTIVE not in frame else [
            r for r in frame.to_dict("records") if r.get(OBJECTIVE) == r.get(OBJECTIVE)]
        trial_id = str((result.metrics or {}).get("trial_id") or Path(result.path).name)
        last = rows[-1] if rows else {}
        best = max(rows, key=lambda r: (r[OBJECTIVE], -r["epoch"])) if rows else {}
        out.append(TrialSummary(
            trial_id=trial_id, params=dict(result.config or {}),
            epochs=int(last.get("epochs_completed", 0)),
            best_val=float(best.get(OBJECTIVE, float("nan"))), best_epoch=int(best.get("epoch", -1)),
            stopped_early=(result.error is None and bool(rows) and not last.get("stop")
                           and int(last.get("epochs_completed", 0)) < epochs),
            error=None if result.error is None else str(result.error).splitlines()[0][:300],
            rows=rows))
    return out


def best_trial_checkpoint(trials: list[TrialSummary], loc: Any) -> tuple[TrialSummary, dict[str, Any]]:
    """The trial and epoch with the highest validation one-shot accuracy whose checkpoint was kept."""
    from workflows import storage

    scored = [(r, t) for t in trials if t.error is None for r in t.rows if r.get("checkpoint_path")]
    for row, trial in sorted(scored, key=lambda rt: (-rt[0][OBJECTIVE], rt[0]["epoch"])):
        if storage.exists(loc.fs, str(row["checkpoint_path"])):
            return trial, row
    raise RuntimeError("no trial left a checkpoint with validation metrics; see the trials' errors above")


def trials_csv(trials: list[TrialSummary], keys: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial_id", *keys, "best_val_oneshot_accuracy", "best_epoch", "epochs", "stopped_early", "error"])
    for t in trials:
        writer.writerow([t.trial_id, *[t.params.get(k) for k in keys], t.best_val, t.best_epoch, t.epochs,
                         t.stopped_early, t.error or ""])
    return buffer.getvalue()


def close_child_runs(tracking_uri: str, experiment: str, parent_run_id: str, trials: list[TrialSummary]) -> None:
    """Trials ASHA stopped never return; mark their child runs here (KILLED, ``tune.stopped_early``)."""
    from mlflow.tracking import MlflowClient

    from workflows import tracking

    client = MlflowClient(tracking_uri)
    experiment_id = tracking.ensure_experiment(tracking_uri, experiment)
    for t in trials:
        for run in find_child_runs(client, experiment_id, parent_run_id, t.trial_id):
            client.set_tag(run.info.run_id, "tune.stopped_early", str(t.stopped_early).lower())
            client.log_metric(run.info.run_id, "best_val_oneshot_accuracy", t.best_val)
            status = "FAILED" if t.error else "KILLED" if t.stopped_early else "FINISHED"
            if run.info.status != status:
                client.set_terminated(run.info.run_id, status)


class SearchInterrupted(RuntimeError):
    """The search stopped before every trial finished (Ctrl-C); its state is in storage."""


def search(cfg: JobConfig, search_cfg: SearchSection, recipe: str, overrides: dict[str, Any],
           best_config_path: str | Path | None = None) -> dict[str, Any]:
    """The whole search; returns a summary (best trial, its validation and test accuracy, files)."""
    import mlflow

    from siamese_core import checkpoint as ckpt_io
    from workflows import evaluate, ray_setup, storage, tracking
    from workflows.train import fit_to_cluster, preflight

    space = search_space.load(search_cfg.space)
    search_space.validate(space, cfg)
    if search_cfg.scheduler == "asha" and search_cfg.grace_period > cfg.training.epochs:
        raise ConfigError(f"search.grace_period={search_cfg.grace_period} exceeds training.epochs="
                          f"{cfg.training.epochs}: ASHA could never compare trials. Lower it or raise the epochs")
    checks = preflight(cfg, overrides)
    cfg, overrides, dataset = checks["cfg"], checks["overrides"], checks["dataset"]
    tracking_uri, loc = checks["tracking_uri"], checks["storage"]
    resumed = tracking.previous_run(loc, search_cfg.name, tracking_uri, "search")
    with tracking.mlflow_run(tracking_uri, cfg.tracking.experiment, search_cfg.name, run_id=resumed,
                             tags={"job": "tune", "preset": cfg.model.preset}) as parent:
        if resumed is None:
            tracking.log_config(cfg)
            tracking.log_dataset(dataset, context="training")
            mlflow.log_params({f"search.{k}": str(v) for k, v in tracking.flatten_params(search_cfg).items()})
            mlflow.log_text(search_space.dump(space), "search_space.yaml")
            tracking.remember_run(loc, search_cfg.name, tracking_uri, parent.info.run_id)
        with ray_setup.ray_session():
            # each trial's workers; the best config written for the user leaves them to the cluster
            _, trial_overrides = fit_to_cluster(cfg, overrides, per_trial=True)
            plan = SearchPlan(recipe=recipe, base_overrides=dict(trial_overrides), tracking_uri=tracking_uri,
                              experiment=cfg.tracking.experiment, parent_run_id=parent.info.run_id,
                              train_storage=loc.uri_of(search_cfg.name, "train"), dataset=dataset)
            tuner, restored = make_tuner(plan, space, search_cfg, cfg, loc)
            if restored:
                print(f"Resuming search {search_cfg.name!r} from {loc.uri_of(search_cfg.name)}", flush=True)
            started = time.perf_counter()
            grid = tuner.fit()
            search_seconds = time.perf_counter() - started
        trials = summarize(grid, cfg.training.epochs)
        if len(grid) < search_cfg.num_samples or grid.num_terminated + grid.num_errors < len(grid):
            mlflow.end_run("KILLED")
            raise SearchInterrupted(f"search {search_cfg.name!r} stopped with {grid.num_terminated} of "
                                    f"{search_cfg.num_samples} trials done; re-run the same command "
                                    f"(same --name {search_cfg.name} and storage path) to resume")
        close_child_runs(tracking_uri, cfg.tracking.experiment, parent.info.run_id, trials)
        best, row = best_trial_checkpoint(trials, loc)
        import ray.train

        with ray.train.Checkpoint(str(row["checkpoint_path"]), filesystem=loc.fs).as_directory() as directory:
            model = ckpt_io.load_model(directory)
        report = evaluate.final_report(model, dataset, cfg.evaluation, seed=cfg.training.seed)
        test = report.evaluation
        best_overrides = {**overrides, **best.params}
        best_cfg = job_config.build(recipe, overrides=best_overrides)
        keys = search_space.searched_keys(space)
        mlflow.log_params({f"best.{k}": str(best.params.get(k)) for k in keys})
        mlflow.set_tags({"best_trial_id": best.trial_id, "best_checkpoint": str(row["checkpoint_path"])})
        mlflow.log_metrics({"best_val_oneshot_accuracy": best.best_val, "best_epoch": best.best_epoch,
                            "trials": len(trials), "trials_stopped_early": sum(t.stopped_early for t in trials),
                            "trials_failed": sum(t.error is not None for t in trials),
                            "search_seconds": search_seconds})
        tracking.log_report(report, "test")
        tracking.describe_run(dataset, recipe, report)
        text = tracking.config_yaml(best_cfg)
        mlflow.log_text(text, "best_config.yaml")
        mlflow.log_text(trials_csv(trials, keys), "trials.csv")
        storage.write_bytes(loc.fs, loc.join(search_cfg.name, "best_config.yaml"), text.encode())
        out = Path(best_config_path or f"{search_cfg.name}-best.yaml")
        out.write_text(text)
        tracking.remember_run(loc, search_cfg.name, tracking_uri, parent.info.run_id, finished=True)
        return {"run_id": parent.info.run_id, "tracking_uri": tracking_uri, "best_trial": best.trial_id,
                "best_params": {k: best.params.get(k) for k in keys}, "best_val_oneshot_accuracy": best.best_val,
                "best_epoch": best.best_epoch, "test_accuracy": test.result.accuracy,
                "test_correct": test.result.correct, "test_trials": test.result.trials,
                "best_config": str(out.resolve()), "trials": trials, "search_seconds": search_seconds}


# --------------------------------------------------------------------------- command line

SHORTCUTS = {  # flag -> config key
    "data": "data.uri", "endpoint_url": "data.endpoint_url", "workers": "cluster.workers",
    "gpus_per_worker": "cluster.gpus_per_worker", "storage_path": "cluster.storage_path",
    "epochs": "training.epochs", "tracking_uri": "tracking.uri", "experiment": "tracking.experiment",
    "name": "search.name", "samples": "search.num_samples", "concurrent": "search.max_concurrent_trials",
    "seed": "search.seed", "space": "search.space",
}


def split_search(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(job overrides, ``search.*`` overrides without the prefix)."""
    job = {k: v for k, v in overrides.items() if not k.startswith("search.")}
    found = {k[len("search."):]: v for k, v in overrides.items() if k.startswith("search.")}
    return job, found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workflows.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    job_config.add_arguments(parser)
    parser.add_argument("--space", help="a named search space (default, mining) or a YAML file that replaces the "
                                        "default (see --print-space; default: the default space)")
    s = SearchSection()
    parser.add_argument("--name", help=f"search name under the storage path; re-use it to resume (default: {s.name})")
    parser.add_argument("--samples", type=int, help=f"trials in all, search.num_samples (default: {s.num_samples})")
    parser.add_argument("--concurrent", type=int,
                        help=f"trials at once, search.max_concurrent_trials (default: {s.max_concurrent_trials})")
    parser.add_argument("--seed", type=int, help=f"search seed: fixes the suggested configurations (default: {s.seed})")
    parser.add_argument("--data", help="shards from workflows.ingest, a folder or s3:// (default: ./data/omniglot-shards)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// URIs (default: AWS_ENDPOINT_URL)")
    parser.add_argument("--workers", type=int, help="Ray Train workers per trial (default: 1)")
    parser.add_argument("--gpus-per-worker", type=float, help="0 for CPU, >0 for GPU (default: 0)")
    parser.add_argument("--storage-path", help="search state and checkpoints: a local dir or s3://bucket/prefix "
                                               "(default: ./runs)")
    parser.add_argument("--epochs", type=int, help="most epochs per trial, ASHA's max_t (default: the recipe's)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                                               "sqlite:///./mlflow.db)")
    parser.add_argument("--experiment", help="MLflow experiment (default: siamese-oneshot)")
    parser.add_argument("--best-config", help="where to write the best trial's config (default NAME-best.yaml)")
    parser.add_argument("--print-space", action="store_true", help="print the search space as YAML and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    cli.add_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[JobConfig, SearchSection, str, dict[str, Any], argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    job_overrides, search_overrides = split_search(job_config.collect_overrides(args, SHORTCUTS))
    search_cfg = apply_overrides(SearchSection(), search_overrides, "search.")
    if search_cfg.space is not None and search_cfg.space not in search_space.SPACES:
        search_cfg = apply_overrides(search_cfg, {"space": str(Path(search_cfg.space).resolve())})
    cfg, job_overrides = job_config.resolve(args.recipe, job_overrides)
    return cfg, search_cfg, args.recipe, job_overrides, args


def main(argv: list[str] | None = None) -> int:
    return cli.run(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    cfg, search_cfg, recipe, overrides, args = parse_args(argv)
    cli.configure_console(args.verbose)
    if args.print_space:
        print(search_space.dump(search_space.load(search_cfg.space)), end="")
        return 0
    if args.print_config:
        import yaml

        print(yaml.safe_dump({**job_config.to_plain(cfg.to_dict()),
                              "search": job_config.to_plain(search_cfg.__dict__)}, sort_keys=True))
        return 0
    try:
        summary = search(cfg, search_cfg, recipe, overrides, args.best_config)
    except SearchInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return cli.INTERRUPTED
    trials = summary["trials"]
    print(f"{len(trials)} trials, {sum(t.stopped_early for t in trials)} stopped early by ASHA, "
          f"{sum(t.error is not None for t in trials)} failed, in {summary['search_seconds']:.0f}s")
    print(f"best trial {summary['best_trial']}: validation one-shot {summary['best_val_oneshot_accuracy']:.2%} "
          f"(epoch {summary['best_epoch']}); test one-shot {summary['test_accuracy']:.2%} "
          f"({summary['test_correct']}/{summary['test_trials']} trials, scored once)")
    for key, value in summary["best_params"].items():
        print(f"  {key} = {value}")
    print(f"best config: {summary['best_config']}  (python -m workflows.train --config {summary['best_config']} "
          "--name NEW_NAME)")
    from workflows import tracking

    print(f"MLflow parent run {summary['run_id']}; review it: {tracking.ui_hint(summary['tracking_uri'])}")
    return 0


if __name__ == "__main__":
    # through the package module, so the errors raised are the classes workflows.cli knows
    from workflows.tune import main as entry

    sys.exit(entry())
