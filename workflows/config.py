"""The job configuration: the core's training recipe plus data, cluster and tracking.

One typed place for everything a run reads. Values come, in order, from a
named recipe (``demo`` for the CPU preset, ``paper`` for Koch's network), an
optional YAML/JSON file, and ``--set section.key=value`` flags; an unknown key
or a bad value fails before any cluster resource is requested.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from siamese_core.config import (LAYER_NAMES, RECIPES, ConfigError, DistortionConfig, EvaluationConfig,
                                 MiningConfig, ModelConfig, OptimizerConfig, PairConfig, TrainingConfig,
                                 TrainingRecipe, _require, apply_overrides)


@dataclass(frozen=True)
class DataSection:
    """Where the shards are and how the pair stage runs."""

    uri: str = "./data/omniglot-shards"
    """A data set written by ``workflows.ingest`` (a directory or s3:// prefix)."""
    endpoint_url: str | None = None
    pair_stage_cpus: float = 0.5
    """CPUs per pair-stage task: a fraction, so the stage always finds a slot beside the workers."""
    pair_stage_concurrency: int = 1
    read_cpus: float = 0.25
    """CPUs per Parquet read task (fractional for the same reason)."""
    decoded_cache_mb: float = 256.0
    """Decoded shards each pair-stage process keeps between epochs (0: decode every epoch).
    The whole Omniglot training split is ~24 MB at 35 px and ~220 MB at 105 px; a larger
    data set keeps what fits and re-decodes the rest, so memory stays bounded."""
    chunk_pairs: int = 2048
    """Pairs a Train worker takes from Ray Data at a time; it shuffles each chunk and cuts it
    into training batches itself (``data.iter_epoch_chunks``). A chunk spans several
    alphabets (each shard's pairs come in one block), so batches mix alphabets."""
    shards_per_task: int = 8
    """Shards one pair-stage task reads and pairs, one after the other. Each task and each
    block costs scheduling and coordination CPU beside the training steps (one task per
    shard made Ray Data's per-epoch pass cost more than the pairs); the stage still holds
    one shard being decoded at a time, plus the task's pairs."""
    prefetch_chunks: int = 8
    """Chunks a Train worker pulls ahead of training (``data.EpochStream``). Draining an
    epoch's pass quickly closes it early, so Ray Data's executor stops competing with the
    training steps for the rest of the epoch. 8 chunks hold the CPU demo's epoch (10,000
    pairs); the memory is up to two epochs' queues of 8 x chunk_pairs x 2 images
    (2.5 MB per 1,000 pairs at 35 px, 22 MB at 105 px)."""
    shuffle_buffer_pairs: int = 0
    """Ray Data's local shuffle buffer on each worker, in pairs, on top of the chunk shuffle
    (0: none). It mixes across more shards, at a cost per batch and a slower first batch."""

    def __post_init__(self) -> None:
        _require(bool(self.uri), "data.uri must name the shards written by workflows.ingest")
        _require(self.pair_stage_cpus > 0, f"data.pair_stage_cpus must be > 0, got {self.pair_stage_cpus}")
        _require(self.pair_stage_concurrency >= 1, "data.pair_stage_concurrency must be >= 1")
        _require(self.read_cpus > 0, f"data.read_cpus must be > 0, got {self.read_cpus}")
        _require(self.shuffle_buffer_pairs >= 0, "data.shuffle_buffer_pairs must be >= 0")
        _require(self.chunk_pairs >= 1, f"data.chunk_pairs must be >= 1, got {self.chunk_pairs}")
        _require(self.shards_per_task >= 1, f"data.shards_per_task must be >= 1, got {self.shards_per_task}")
        _require(self.prefetch_chunks >= 1, f"data.prefetch_chunks must be >= 1, got {self.prefetch_chunks}")
        _require(self.decoded_cache_mb >= 0, f"data.decoded_cache_mb must be >= 0, got {self.decoded_cache_mb}")


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class ClusterSection:
    """How many Train workers, on what, and where checkpoints live."""

    workers: int | None = None
    """None: fit the cluster (one worker per ``gpus_per_worker`` GPUs on GPU; one per 4 CPUs, at
    least 1, on CPU; one per trial in a search)."""
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 0.5
    """Fractional by default: on a 2-core machine two workers plus the data stage must all fit."""
    storage_path: str = "./runs"
    name: str = "siamese"
    placement_strategy: str = "PACK"
    """Ray's placement of the workers: PACK (fewest nodes), SPREAD, or STRICT_SPREAD (one per node)."""
    checkpoints_to_keep: int = 2
    max_failures: int = 2
    """Worker failures Ray Train recovers from (restarting from the last checkpoint)."""
    mixed_precision: bool = True
    """bf16 autocast on GPU (ignored on CPU): about twice the paper network's training step on
    an H200 (benchmarks/RESULTS.md)."""
    channels_last: bool | None = None
    """channels-last memory format: true, false, or none (default) to pick by device: on for
    CPU workers, where it speeds the step up, off for GPU workers, where it did not help
    (benchmarks/RESULTS.md). See ``siamese_core.model.place_model``."""

    def __post_init__(self) -> None:
        _require(self.workers is None or self.workers >= 1, f"cluster.workers must be >= 1 or none, got {self.workers}")
        _require(self.gpus_per_worker >= 0, f"cluster.gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        _require(self.cpus_per_worker > 0, f"cluster.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        _require(self.placement_strategy in PLACEMENT_STRATEGIES,
                 f"cluster.placement_strategy must be one of {PLACEMENT_STRATEGIES}, got {self.placement_strategy!r}")
        _require(self.checkpoints_to_keep >= 1, "cluster.checkpoints_to_keep must be >= 1")
        _require(self.max_failures >= -1, "cluster.max_failures must be >= -1 (-1: unlimited)")
        _require(bool(self.name) and "/" not in self.name, f"cluster.name must be a plain name, got {self.name!r}")

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


@dataclass(frozen=True)
class TrackingSection:
    """MLflow: store, experiment and the registry name of trained models."""

    uri: str | None = None
    """None: MLFLOW_TRACKING_URI, else ``sqlite:///<launch dir>/mlflow.db``."""
    experiment: str = "siamese-oneshot"
    registered_model: str | None = "siamese-oneshot"
    """Register the best model under this name (None: log it without registering)."""
    run_name: str | None = None


SEARCH_ALGORITHMS = ("tpe", "random")
SCHEDULERS = ("asha", "none")


@dataclass(frozen=True)
class SearchSection:
    """A Ray Tune search (``workflows.tune``): how many trials, how they are chosen and stopped.

    Set with ``--set search.num_samples=16``; every other key is the main job's
    and applies to each trial (a trial's workers: ``cluster.workers`` and
    ``cluster.gpus_per_worker``).
    """

    name: str = "siamese-search"
    """The search's folder under ``cluster.storage_path``; re-run with the same name to resume."""
    num_samples: int = 8
    max_concurrent_trials: int = 2
    seed: int = 0
    """Fixes the sequence of suggested configurations (given the same results)."""
    algorithm: str = "tpe"
    """'tpe': Optuna's Bayesian TPE sampler after ``startup_trials`` random ones; 'random': seeded random."""
    startup_trials: int = 3
    scheduler: str = "asha"
    """'asha': stop trials whose validation one-shot accuracy lags at a rung; 'none': run all to the end."""
    grace_period: int = 2
    """Epochs every trial gets before ASHA may stop it."""
    reduction_factor: float = 2.0
    trial_cpus: float = 0.05
    """Each trial's driver slot (its Train workers ask for ``cluster.cpus_per_worker`` each)."""
    space: str | None = None
    """YAML file with the search space (None: ``workflows.search_space.DEFAULT_SPACE``)."""

    def __post_init__(self) -> None:
        _require(bool(self.name) and "/" not in self.name, f"search.name must be a plain name, got {self.name!r}")
        _require(self.num_samples >= 1, f"search.num_samples must be >= 1, got {self.num_samples}")
        _require(self.max_concurrent_trials >= 1, "search.max_concurrent_trials must be >= 1")
        _require(self.algorithm in SEARCH_ALGORITHMS,
                 f"search.algorithm must be one of {SEARCH_ALGORITHMS}, got {self.algorithm!r}")
        _require(self.startup_trials >= 1, "search.startup_trials must be >= 1")
        _require(self.scheduler in SCHEDULERS, f"search.scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        _require(self.grace_period >= 1, "search.grace_period must be >= 1")
        _require(self.reduction_factor > 1, "search.reduction_factor must be > 1")
        _require(self.trial_cpus > 0, "search.trial_cpus must be > 0 (Ray refuses a trial with no CPU)")


@dataclass(frozen=True)
class JobConfig:
    """Everything one training job reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    distort: DistortionConfig = field(default_factory=DistortionConfig)
    pairs: PairConfig = field(default_factory=PairConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    data: DataSection = field(default_factory=DataSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    @property
    def recipe(self) -> TrainingRecipe:
        return TrainingRecipe(model=self.model, optim=self.optim, distort=self.distort,
                              pairs=self.pairs, training=self.training, evaluation=self.evaluation,
                              mining=self.mining)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)




def from_recipe(name: str) -> JobConfig:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    r = RECIPES[name]
    return JobConfig(model=r.model, optim=r.optim, distort=r.distort, pairs=r.pairs, training=r.training,
                     evaluation=r.evaluation, mining=r.mining)


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted keys.

    A per-layer dict (``optim.lr_multipliers``: keys are layer names) stays one value,
    so a file *replaces* the base recipe's dict instead of merging into it: a written
    resolved config then reads back identically onto any base (e.g. the demo's
    ``{"fc": 3, "head": 3}`` multipliers do not leak into a "paper" config).
    The command line (``optim.lr_multipliers.head=2``) still sets single layers.
    """
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping) and value and set(value) <= set(LAYER_NAMES):
            flat[f"{prefix}{key}"] = dict(value)
        elif isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file of (nested or dotted) config keys."""
    text = Path(path).read_text()
    if str(path).endswith(".json"):
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return flatten(data)


def parse_set(items: list[str]) -> dict[str, str]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def build(recipe: str = "demo", files: list[str] | None = None,
          overrides: Mapping[str, Any] | None = None) -> JobConfig:
    config = from_recipe(recipe)
    for path in files or []:
        config = apply_overrides(config, load_file(path))
    if overrides:
        config = apply_overrides(config, overrides)
    return config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The configuration flags every job shares."""
    parser.add_argument("--recipe", default="demo", choices=sorted(RECIPES),
                        help="starting point: 'demo' (the CPU recipe), 'paper' (Koch's network and schedule) or "
                             "'paper-gpu' (Koch's network for one GPU) (default: %(default)s)")
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML/JSON file of config keys (repeatable; later files win; default: none)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override one key, e.g. --set optim.lr=0.02 --set cluster.workers=4 (repeatable; default: none)")


def collect_overrides(args: argparse.Namespace, shortcuts: Mapping[str, str]) -> dict[str, Any]:
    """Overrides from a parsed command line: ``--config`` files, then shortcut flags, then ``--set``.

    ``shortcuts`` maps an argparse destination (``workers``) to its config key
    (``cluster.workers``); flags left unset are ignored.
    """
    extra = {key: getattr(args, flag) for flag, key in shortcuts.items() if getattr(args, flag) is not None}
    overrides: dict[str, Any] = {**extra, **parse_set(args.overrides)}
    for path in reversed(args.config):
        overrides = {**load_file(path), **overrides}
    return overrides


def resolve(recipe: str, overrides: Mapping[str, Any]) -> tuple[JobConfig, dict[str, Any]]:
    """The job config, and the overrides with local paths made absolute.

    Workers run elsewhere (another directory, another node), so they get absolute paths.
    """
    overrides = dict(overrides)
    overrides.update(absolute_paths(build(recipe, overrides=overrides)))
    return build(recipe, overrides=overrides), overrides


def absolute_paths(config: JobConfig) -> dict[str, str]:
    """Overrides that turn the config's relative local paths absolute (URIs stay as they are)."""
    out = {}
    for key, value in (("data.uri", config.data.uri), ("cluster.storage_path", config.cluster.storage_path)):
        if "://" not in value:
            out[key] = str(Path(value).expanduser().resolve())
    return out


def write(config: JobConfig, path: str | Path) -> None:
    """The resolved configuration as YAML, loadable with ``--config``."""
    import yaml

    Path(path).write_text(yaml.safe_dump(to_plain(config.to_dict()), sort_keys=True))


def to_plain(value: Any) -> Any:
    """Tuples -> lists and mappings -> dicts so YAML/JSON/MLflow read them back."""
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
