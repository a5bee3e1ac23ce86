"""MLflow: where runs go, and how a one-shot result is recorded.

The default store is a SQLite file in the directory the user launches from,
resolved to an absolute URI: Ray jobs run in a temporary copy of the working
directory, where a relative ``sqlite:///mlflow.db`` would silently start a new,
empty store.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

DEFAULT_EXPERIMENT = "siamese-oneshot"


def resolve_tracking_uri(uri: str | None = None, base_dir: Path | None = None) -> str:
    """An absolute tracking URI: the argument, else MLFLOW_TRACKING_URI, else ./mlflow.db."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        relative = uri[len("sqlite:///"):]
        return "sqlite:///" + str((base / relative).resolve())
    if "://" not in uri:
        raise ValueError(
            f"tracking URI {uri!r} is a plain folder; MLflow 3 refuses folder stores. "
            "Use sqlite:///PATH/mlflow.db or http://HOST:PORT"
        )
    return uri


@contextmanager
def mlflow_run(tracking_uri: str, experiment: str, run_name: str,
               tags: Mapping[str, str] | None = None, run_id: str | None = None) -> Iterator[Any]:
    """Start (and always end) one MLflow run in ``experiment``, creating it if needed.

    With ``run_id``, continue that run instead (a resumed training job stays one run).
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    ensure_experiment(tracking_uri, experiment)
    mlflow.set_experiment(experiment)
    if run_id is not None:
        with mlflow.start_run(run_id=run_id) as run:
            yield run
        return
    with mlflow.start_run(run_name=run_name, tags=dict(tags or {})) as run:
        yield run


RUN_MARKER = "mlflow_run.json"
"""Beside a job's checkpoints: its MLflow run, so a re-submitted job continues that run."""


def previous_run(storage_loc: Any, name: str, tracking_uri: str, what: str = "run") -> str | None:
    """The MLflow run of an earlier, unfinished attempt of job ``name`` under ``storage_loc``.

    A finished one is refused: re-using its name would mix two jobs in one run.
    """
    from workflows import storage

    marker = storage_loc.join(name, RUN_MARKER)
    if not storage.exists(storage_loc.fs, marker):
        return None
    previous = storage.read_json(storage_loc.fs, marker)
    if previous.get("finished"):
        from siamese_core.config import ConfigError

        raise ConfigError(f"{what} {name!r} in {storage_loc.uri} already finished "
                          f"(MLflow run {previous.get('run_id')}); pick another --name to start a new one")
    if previous.get("tracking_uri") != tracking_uri:
        return None
    return str(previous["run_id"])


def remember_run(storage_loc: Any, name: str, tracking_uri: str, run_id: str, finished: bool = False) -> None:
    from workflows import storage

    storage.write_json(storage_loc.fs, storage_loc.join(name, RUN_MARKER),
                       {"run_id": run_id, "tracking_uri": tracking_uri, "finished": finished})


def ui_hint(tracking_uri: str) -> str:
    """What a user types (or opens) to review runs in this store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def default_artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a SQLite store go beside the database, by absolute path.

    MLflow's own default is ``./mlruns`` relative to the *current* directory,
    which inside a Ray job is a temporary copy that disappears.
    """
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def ensure_experiment(tracking_uri: str, experiment: str) -> str:
    """The experiment's id, creating it (with a stable artifact location) if needed."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(experiment, artifact_location=default_artifact_location(tracking_uri))


def flatten_params(config: Any, prefix: str = "") -> dict[str, str]:
    """Dataclasses and mappings -> flat ``{"optim.lr": "0.01"}`` for ``mlflow.log_params``."""
    import dataclasses

    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        items = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    elif isinstance(config, Mapping):
        items = dict(config)
    else:
        return {prefix.rstrip("."): str(config)}
    flat: dict[str, str] = {}
    for key, value in items.items():
        if (dataclasses.is_dataclass(value) and not isinstance(value, type)) or (
                isinstance(value, Mapping) and value):
            flat.update(flatten_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def log_oneshot(result: Any, split: str, step: int | None = None) -> None:
    """Record a :class:`siamese_core.oneshot.OneShotResult` as ``{split}_oneshot_*`` metrics."""
    import mlflow

    metrics = {f"{split}_oneshot_accuracy": float(result.accuracy),
               f"{split}_oneshot_trials": float(result.trials)}
    if len(result.per_group) > 1:
        for group, accuracy in sorted(result.per_group.items()):
            metrics[f"{split}_oneshot_accuracy.{_metric_safe(group)}"] = float(accuracy)
    mlflow.log_metrics(metrics, step=step)
    mlflow.log_text(json.dumps({"accuracy": result.accuracy, "correct": result.correct,
                                "trials": result.trials, "per_group": result.per_group},
                               indent=2, sort_keys=True),
                    f"oneshot/{split}.json")


def log_dataset(dataset: Any, context: str) -> None:
    """The data set as an input of the active run (MLflow's Datasets panel): name, URI, manifest checksum."""
    import mlflow
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    manifest = dataset.manifest
    uri = dataset.uri if "://" in dataset.uri else Path(dataset.uri).resolve().as_uri()
    try:
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both candidates are local files
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            source = resolve_dataset_source(uri)
    except Exception:  # no registered source type for this scheme: record the URI as such
        source = HTTPDatasetSource(url=uri)
    digest = manifest.content_checksum.split(":", 1)[-1][:16]
    mlflow.log_input(MetaDataset(source=source, name=manifest.name, digest=digest), context=context)
    mlflow.set_tags({"data.uri": dataset.uri, "data.name": manifest.name,
                     "data.content_checksum": manifest.content_checksum})
    mlflow.log_params({"data.images": manifest.counts["images"], "data.classes": manifest.counts["classes"],
                       "data.groups": manifest.counts.get("groups", 0)})


def log_report(report: Any, split: str) -> None:
    """A finished model's test episodes, the pixel baseline on them, the single view, and their pictures."""
    import mlflow

    log_oneshot(report.evaluation.result, split)
    metrics = {f"{split}_pixel_nn_accuracy": float(report.baseline.accuracy)}
    if report.single_view_accuracy is not None:
        metrics[f"{split}_oneshot_accuracy_single_view"] = float(report.single_view_accuracy)
    mlflow.log_metrics(metrics)
    mlflow.set_tag(f"{split}_protocol", report.protocol)
    log_oneshot_figures(report.evaluation, split)
    if report.reid is not None:
        log_reid(report.reid, split)


def log_reid(reid: Any, split: str) -> None:
    """Re-identification metrics (top-1, top-5, MAP@5; with new individuals at the validation threshold),
    the pixel baseline's, the validation curve of MAP@5 against the threshold, and a picture of queries."""
    import mlflow

    metrics = {f"{split}_reid_{k}": v for k, v in reid.test.metrics().items()}
    metrics.update({f"validation_reid_{k}": v for k, v in reid.validation.metrics().items()})
    metrics.update({f"{split}_reid_pixel_{k}": v for k, v in reid.baseline.items()})
    metrics["new_threshold"] = reid.threshold_p
    mlflow.log_metrics(metrics)
    log_reid_figures(reid, split)


def log_reid_figures(reid: Any, split: str, n_queries: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    import numpy as np

    from siamese_core.reid import NEW

    thresholds, maps = reid.validation.curve
    finite = np.isfinite(thresholds)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(1.0 / (1.0 + np.exp(-thresholds[finite])), maps[finite], color="steelblue")
    ax.axvline(reid.threshold_p, color="black", linestyle="--", label=f"chosen: p = {reid.threshold_p:.3f}")
    ax.set_xlabel("threshold on the best match's probability p")
    ax.set_ylabel("validation MAP@5 with 'new'")
    ax.legend(fontsize=8)
    fig.tight_layout()
    mlflow.log_figure(fig, "reid/validation_map5_by_threshold.png")
    plt.close(fig)

    test, images = reid.test, reid.images
    predictions = test.with_new()
    rng = np.random.default_rng(0)
    picked = sorted(rng.choice(len(test.truth), size=min(n_queries, len(test.truth)), replace=False))
    first_image = {}
    for row, name in enumerate(images.label_names.tolist()):
        first_image.setdefault(name, row)
    fig, axes = plt.subplots(len(picked), 6, figsize=(7.5, 1.3 * len(picked)), squeeze=False)
    for r, q in enumerate(picked):
        pixels, cmap = _picture(images.images, int(test.queries[q]), reid.invert)
        axes[r, 0].imshow(pixels, cmap=cmap)
        axes[r, 0].set_title(f"query: {str(test.truth[q])[:12]}", fontsize=6)
        for c, label in enumerate(predictions[q][:5]):
            ax = axes[r, c + 1]
            if label != NEW and label in first_image:
                pixels, cmap = _picture(images.images, first_image[label], reid.invert)
                ax.imshow(pixels, cmap=cmap)
            right = label == test.truth[q]
            ax.set_title(f"{c + 1}: {str(label)[:12]}", fontsize=6, color="green" if right else "red")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{split}: queries and their top 5 (green: the true individual)", fontsize=8)
    fig.tight_layout()
    mlflow.log_figure(fig, f"reid/{split}_top5.png")
    plt.close(fig)


def describe_run(dataset: Any, recipe: str, report: Any) -> None:
    """The run's description (MLflow's ``mlflow.note.content``): data, recipe, headline figure and baseline."""
    import mlflow

    result = report.evaluation.result
    text = (f"**{dataset.name}** ({dataset.uri}), recipe `{recipe}`: test one-shot accuracy "
            f"**{result.accuracy:.2%}** ({result.correct}/{result.trials} trials, {report.protocol}); "
            f"pixel nearest neighbour on the same trials {report.baseline.accuracy:.2%}.")
    if report.reid is not None:
        m, b = report.reid.test.metrics(), report.reid.baseline
        text += (f" Re-identification on test: MAP@5 **{m.get('map5', float('nan')):.3f}** (pixels "
                 f"{b.get('map5', float('nan')):.3f}), with new individuals {m['map5_new']:.3f} at p = "
                 f"{report.reid.threshold_p:.3f} chosen on validation.")
    mlflow.set_tag("mlflow.note.content", text)


def _metric_safe(name: str) -> str:
    """MLflow metric names allow letters, digits, _ - . / and space."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def check_reachable(tracking_uri: str) -> None:
    """Fail early, with the URI in the message, when the tracking store cannot be used."""
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri).search_experiments(max_results=1)
    except Exception as exc:  # MLflow raises many types for an unreachable store
        raise ConnectionError(f"MLflow tracking store {tracking_uri} is not reachable ({exc}). "
                              "Start the server or fix --tracking-uri / MLFLOW_TRACKING_URI") from exc


SECRET_MARKERS = ("secret", "password", "token", "credential", "access_key")


def config_params(config: Any) -> dict[str, str]:
    """All configuration as flat params, leaving out anything that looks like a secret."""
    return {k: v for k, v in flatten_params(config).items()
            if not any(m in k.lower() for m in SECRET_MARKERS)}


def config_yaml(config: Any) -> str:
    import dataclasses

    import yaml

    return yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(config), default=list)), sort_keys=True)


def log_config(config: Any, client: Any = None, run_id: str | None = None) -> None:
    """All configuration as params plus ``config.yaml``: on the active run, or on ``run_id`` via ``client``."""
    if client is None:
        import mlflow

        mlflow.log_params(config_params(config))
        mlflow.log_text(config_yaml(config), "config.yaml")
        return
    from mlflow.entities import Param

    params = [Param(k, v) for k, v in config_params(config).items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[i:i + 100])
    client.log_text(run_id, config_yaml(config), "config.yaml")


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


try:  # Ray is optional for this module: the callback exists only where Ray does.
    from ray.train import UserCallback as _UserCallback
except ImportError:  # pragma: no cover - siamese_core users without Ray
    _UserCallback = object  # type: ignore[assignment,misc]


class EpochMetricsCallback(_UserCallback):  # type: ignore[misc,valid-type]
    """Ray Train callback: every epoch's metrics (rank 0's report) into one MLflow run.

    It runs in Ray Train's controller, so however many workers there are, the
    job is one MLflow run; after a worker restart the repeated epochs are
    logged again at the same step, so the history has no gap.
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not metrics:
            return
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        values = _numeric(metrics[0])
        step = int(values.get("epoch", 0))
        now = int(time.time() * 1000)
        MlflowClient(self.tracking_uri).log_batch(
            self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])


def _picture(images: Any, row: int, invert: bool) -> tuple[Any, str]:
    """An image row ``[C, S, S]`` as matplotlib wants it, and its colour map (ink dark when inverted)."""
    pixels = images[row]
    if pixels.shape[0] == 1:
        return pixels[0], ("gray_r" if invert else "gray")
    return pixels.transpose(1, 2, 0), "viridis"


def oneshot_trials_figure(evaluation: Any, split: str, n_trials: int = 6) -> Any:
    """A matplotlib figure of a few trials: the query, its support set, the chosen and the true class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    result, images, runs = evaluation.result, evaluation.images.images, evaluation.runs
    rng = np.random.default_rng(0)
    picked = rng.choice(result.trials, size=min(n_trials, result.trials), replace=False)
    n_way = runs[0].n_way
    fig, axes = plt.subplots(len(picked), n_way + 1, figsize=(1.0 * (n_way + 1), 1.15 * len(picked)),
                             squeeze=False)
    for row, t in enumerate(sorted(picked)):
        run = runs[int(result.run_index[t])]
        pixels, cmap = _picture(images, int(result.query[t]), evaluation.invert)
        axes[row, 0].imshow(pixels, cmap=cmap)
        axes[row, 0].set_title("query", fontsize=7)
        for pos in range(n_way):
            ax = axes[row, pos + 1]
            first = int(run.support[np.flatnonzero(run.support_class == pos)[0]])
            pixels, cmap = _picture(images, first, evaluation.invert)
            ax.imshow(pixels, cmap=cmap)
            if pos == int(result.answer[t]):
                ax.set_title("true", fontsize=7, color="green")
            if pos == int(result.predicted[t]):
                color = "green" if result.is_correct[t] else "red"
                for spine in ax.spines.values():
                    spine.set_edgecolor(color)
                    spine.set_linewidth(3)
                if not result.is_correct[t]:
                    ax.set_title("chosen", fontsize=7, color="red")
        axes[row, 0].set_ylabel(run.group[:14], fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{split}: {n_way}-way one-shot trials (frame: chosen; green = right)", fontsize=9)
    fig.tight_layout()
    return fig


def log_oneshot_figures(evaluation: Any, split: str, n_trials: int = 6) -> None:
    """A picture of a few trials (:func:`oneshot_trials_figure`) and a per-group chart."""
    import matplotlib.pyplot as plt
    import mlflow

    result = evaluation.result
    fig = oneshot_trials_figure(evaluation, split, n_trials)
    mlflow.log_figure(fig, f"oneshot/{split}_trials.png")
    plt.close(fig)

    names = sorted(result.per_group)
    if len(names) < 2:
        return
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(names) + 1.2))
    ax.barh(names, [result.per_group[n] for n in names], color="steelblue")
    ax.axvline(result.accuracy, color="black", linestyle="--", label=f"all: {result.accuracy:.1%}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("one-shot accuracy")
    ax.legend(loc="lower right", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    mlflow.log_figure(fig, f"oneshot/{split}_per_group.png")
    plt.close(fig)


def log_model(model: Any, registered_model: str | None, new_threshold: float | None = None) -> str:
    """Log the network as an MLflow pyfunc model (pairs of encoded images in, similarity out), maybe registered.

    The model's files are its ``model.pt`` (weights and config, loaded with ``weights_only``)
    and the package's source: ``siamese_core.serving`` rebuilds the network, so loading it
    unpickles nothing. Its input is a table with ``left`` and ``right`` columns of image bytes
    in any format (or one ``image`` column, for embeddings); the model's own preprocessing applies.
    ``new_threshold`` (a probability: the "new individual" threshold chosen on validation) is stored
    in the model file, for ``predict --new-threshold auto``.
    """
    import tempfile

    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec

    import siamese_core
    from siamese_core import checkpoint as ckpt_io

    signature = ModelSignature(inputs=Schema([ColSpec(DataType.binary, "left"), ColSpec(DataType.binary, "right")]),
                               outputs=Schema([TensorSpec(np.dtype("float32"), (-1,))]))
    from workflows import cli

    # MLflow prints the registration on stderr; the job's summary names the registered version
    quiet = contextlib.nullcontext() if cli.verbose() else contextlib.redirect_stderr(io.StringIO())
    with tempfile.TemporaryDirectory() as directory, warnings.catch_warnings(), quiet:
        # the signature says what goes in; an example (two encoded images) would only be run at logging time
        warnings.filterwarnings("ignore", message=".*An input example was not provided")  # MLflow colours it
        path = ckpt_io.save(directory, model, **({} if new_threshold is None else {"new_threshold": new_threshold}))
        info = mlflow.pyfunc.log_model(
            name="model", loader_module="siamese_core.serving", data_path=str(path),
            code_paths=[str(Path(siamese_core.__file__).parent)], signature=signature,
            registered_model_name=registered_model,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "pillow", "pandas"],
        )
    version = getattr(info, "registered_model_version", None)
    return f"models:/{registered_model}/{version}" if registered_model and version else info.model_uri


@contextmanager
def following_epochs(tracking_uri: str, run_id: str, show: Any, every_s: float = 2.0) -> Iterator[None]:
    """Call ``show(latest metrics)`` as a running job logs its epochs to MLflow (a background thread).

    The driver's progress display reads what the job records, so it shows exactly what
    the MLflow run will hold, whichever process trained the epoch.
    """
    import threading

    from mlflow.tracking import MlflowClient

    stop = threading.Event()
    client = MlflowClient(tracking_uri)

    def once() -> None:
        try:
            show(dict(client.get_run(run_id).data.metrics))
        except Exception:  # noqa: BLE001 - a display must never fail the job; the next poll retries
            pass

    def poll() -> None:
        while not stop.wait(every_s):
            once()

    thread = threading.Thread(target=poll, name="epoch-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=every_s + 5)
        once()  # the last epoch, logged since the previous poll
