"""``python -m workflows.evaluate``: one-shot accuracy of a model on an ingested data set -> MLflow.

Reads one split (``test`` by default) of the shards that ``workflows.ingest``
wrote, runs the seeded N-way K-shot episodes of :mod:`siamese_core.oneshot`
(within each group, support and query from different sources where the data
has them; Lake's 400 trials on Omniglot), prints the accuracy beside the pixel
nearest-neighbour baseline on the same episodes, and records both in MLflow.
``--model pixel-nn`` scores the baseline alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from siamese_core.config import TEST_TIME_VIEWS, EvaluationConfig
from siamese_core.images import LabelledImages
from siamese_core.oneshot import OneShotResult, OneShotRun, pixel_nearest_neighbour, score_runs

from workflows import cli, tracking

BASELINES = ("pixel-nn",)


@dataclass(frozen=True)
class Evaluation:
    """A one-shot result with the images and runs it came from (for pictures), and how it was scored."""

    result: OneShotResult
    images: LabelledImages
    runs: list[OneShotRun]
    protocol: str
    invert: bool = True  # how the images were preprocessed (pictures show ink dark)


@dataclass(frozen=True)
class Reid:
    """Re-identification of one model: the validation ranking (with its chosen threshold) and the test's."""

    validation: Any  # siamese_core.reid.Ranking, threshold chosen here
    test: Any  # siamese_core.reid.Ranking, the same threshold
    images: LabelledImages  # the test split (pictures)
    baseline: dict[str, float]  # pixel embeddings, ranked the same way, the same threshold rule
    invert: bool = False  # how the images were preprocessed (pictures show ink dark)

    @property
    def threshold_p(self) -> float:
        return float(1.0 / (1.0 + np.exp(-self.validation.threshold)))


@dataclass(frozen=True)
class Report:
    """What a finished model reports: its test episodes, the pixel baseline on them, one view; re-identification."""

    evaluation: Evaluation
    baseline: OneShotResult
    single_view_accuracy: float | None
    reid: Reid | None = None

    @property
    def protocol(self) -> str:
        return self.evaluation.protocol


def views_description(test_time_shift_px: int, test_time_views: str = "cross") -> str:
    """How a result was scored, for the printed protocol: "" for the paper's single view."""
    if not test_time_shift_px:
        return ""
    from siamese_core.model import shift_offsets

    count = len(shift_offsets(test_time_shift_px, test_time_views))
    return f", mean embedding over {count} views ({test_time_views} of shifts up to {test_time_shift_px} px)"


def protocol_of(runs: list[OneShotRun], images: LabelledImages, split: str, seed: int, views: str = "") -> str:
    """The episodes in words, for the printout and MLflow."""
    n_way = runs[0].n_way
    k_shot = runs[0].support.size // max(1, n_way)
    groups = sorted({r.group for r in runs})
    where = (f"within each of {len(groups)} {split} groups" if images.group is not None
             else f"over the {split} split's {len(images.classes)} classes")
    sources = ", support and query from different sources" if images.source is not None else ""
    return (f"{n_way}-way {k_shot}-shot {where}, {len(runs)} runs{sources}, seed {seed}{views}")


def evaluate_model(model: Any, dataset: Any, split: str = "test", seed: int = 0,
                   evaluation: EvaluationConfig = EvaluationConfig(), images: LabelledImages | None = None) -> Evaluation:
    """Score a :class:`~siamese_core.model.SiameseNet` on a split's one-shot episodes (its own preprocessing)."""
    from siamese_core.checkpoint import unwrap
    from siamese_core.evaluation import episodes, evaluate_oneshot

    net = unwrap(model)
    images = images if images is not None else dataset.load_images(split, net.config.input_size,
                                                                      net.config.preprocess)
    runs = episodes(images, evaluation, seed, validation=split == "validation")
    views = views_description(net.config.test_time_shift_px, net.config.test_time_views)
    return Evaluation(evaluate_oneshot(net, images, runs), images, runs, protocol_of(runs, images, split, seed, views),
                      invert=bool(net.config.preprocess.invert))


def final_report(model: Any, dataset: Any, evaluation: EvaluationConfig, seed: int, split: str = "test") -> Report:
    """A finished model's test episodes, scored once, beside the pixel baseline and the single view;
    and re-identification, its threshold chosen on validation, where the evaluation asks for it."""
    from siamese_core.evaluation import evaluate_oneshot
    from siamese_core.model import with_test_time_shift

    scored = evaluate_model(model, dataset, split, seed, evaluation)
    baseline = score_runs(scored.runs, pixel_nearest_neighbour(scored.images.as_float()))
    single = None
    if model.config.test_time_shift_px:  # also the paper's protocol: one view per image
        single = evaluate_oneshot(with_test_time_shift(model, 0), scored.images, scored.runs).accuracy
    reid = evaluate_reid(model, dataset, evaluation, seed, split) \
        if evaluation.reid_enabled(dataset.manifest.has_group) else None
    return Report(scored, baseline, single, reid)


def evaluate_reid(model: Any, dataset: Any, evaluation: EvaluationConfig, seed: int, split: str = "test") -> Reid:
    """Rank ``split`` and validation as re-identification; the "new" threshold is chosen on validation only."""
    from siamese_core.checkpoint import unwrap
    from siamese_core.reid import choose_new_threshold, rank, reid_trials

    net = unwrap(model)
    unknown = dataset.manifest.unknown_label
    rankings, splits = {}, {}
    for name in ("validation", split):
        images = dataset.load_images(name, net.config.input_size, net.config.preprocess, include_unknown=True)
        trials = reid_trials(images, evaluation.reid_new_share, seed, unknown)
        rankings[name], splits[name] = rank(net, images, trials), (images, trials)
    validation = choose_new_threshold(rankings["validation"])
    test = rankings[split]
    test.threshold = validation.threshold
    baseline = pixel_reid(splits["validation"], splits[split])
    return Reid(validation=validation, test=test, images=splits[split][0], baseline=baseline,
                invert=bool(net.config.preprocess.invert))


def pixel_reid(validation: tuple[LabelledImages, Any], test: tuple[LabelledImages, Any]) -> dict[str, float]:
    """The same ranking and threshold rule with pixels as the embedding (minus the L1 distance as the score)."""
    from siamese_core.reid import Ranking, choose_new_threshold
    from siamese_core.retrieval import search_labels

    out: dict[str, Ranking] = {}
    for name, (images, trials) in (("validation", validation), ("test", test)):
        flat = images.as_float().reshape(len(images), -1)
        in_gallery = np.full(len(images), -1, dtype=np.int64)
        in_gallery[trials.gallery] = np.arange(trials.gallery.size)
        labels, scores = search_labels(flat[trials.queries], flat[trials.gallery],
                                       images.label_names[trials.gallery], -np.ones(flat.shape[1], np.float32), 0.0,
                                       5, exclude=in_gallery[trials.queries])
        out[name] = Ranking(labels=labels.astype(object), scores=scores, truth=trials.truth, queries=trials.queries)
    out["test"].threshold = choose_new_threshold(out["validation"]).threshold
    return out["test"].metrics()


def baseline_size(dataset: Any, size: int | None) -> int:
    """The size the pixel baseline compares at: ``size``, else the images' own when they share one, else 64."""
    if size is not None:
        return size
    sizes = dataset.manifest.image_sizes
    low, high = sizes.get("min"), sizes.get("max")
    return int(low[0]) if low and low == high and low[0] == low[1] else 64


def evaluate_baseline(dataset: Any, split: str, seed: int, evaluation: EvaluationConfig,
                      size: int | None = None) -> Evaluation:
    """The pixel nearest-neighbour baseline on a split's episodes, with the data set's preprocessing."""
    from siamese_core.config import PreprocessConfig
    from siamese_core.evaluation import episodes

    size = baseline_size(dataset, size)
    preprocess = PreprocessConfig().resolved(dataset.manifest.preprocessing)
    images = dataset.load_images(split, size, preprocess)
    runs = episodes(images, evaluation, seed, validation=split == "validation")
    return Evaluation(score_runs(runs, pixel_nearest_neighbour(images.as_float())), images, runs,
                      protocol_of(runs, images, split, seed, f", pixels at {size} px"), invert=bool(preprocess.invert))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workflows.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a data set written by workflows.ingest (dir or s3://)")
    parser.add_argument("--split", default="test", choices=["validation", "test"],
                        help="the split whose episodes are scored (default: %(default)s)")
    parser.add_argument("--model", default="pixel-nn",
                        help="a baseline (pixel-nn), a checkpoint directory (local or s3://), "
                             "or an MLflow model URI (models:/NAME/VERSION, models:/NAME@ALIAS, runs:/...) "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="fixes the episodes (default: %(default)s)")
    parser.add_argument("--n-way", type=int, default=None,
                        help="classes per episode (default: 20, or fewer when the split's groups have fewer)")
    parser.add_argument("--k-shot", type=int, default=1, help="support images per class (default: %(default)s)")
    parser.add_argument("--runs-per-group", type=int, default=None,
                        help="runs per group (default: 2 with groups, as Lake's; 20 over a split without groups)")
    parser.add_argument("--size", type=int, default=None,
                        help="pixel-nn: compare pixels at this size (default: the images' own when they share one, "
                             "else 64)")
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// data (default: AWS_ENDPOINT_URL)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI: where a models:/ or runs:/ --model is loaded from and "
                             "where the result is recorded (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    parser.add_argument("--test-time-shift-px", type=int, default=None, metavar="N",
                        help="score with the mean embedding over N-pixel shifts (0: one view, the paper's "
                             "protocol; default: what the model was trained with, model.test_time_shift_px)")
    parser.add_argument("--test-time-views", default=None, choices=TEST_TIME_VIEWS,
                        help="which shifts are views: cross (up, down, left, right: 4N + 1) or square "
                             "(every shift within N px: (2N + 1)^2); default: the model's, model.test_time_views")
    parser.add_argument("--reid", action=argparse.BooleanOptionalAction, default=None,
                        help="also score re-identification (top-1, top-5, MAP@5; the 'new' threshold chosen on "
                             "validation); default: where the data set has no groups")
    parser.add_argument("--reid-new-share", type=float, default=0.2,
                        help="share of a split's classes held out of the gallery as new (default: %(default)s)")
    parser.add_argument("--experiment", default=tracking.DEFAULT_EXPERIMENT,
                        help="the MLflow experiment the result goes to (default: %(default)s)")
    parser.add_argument("--no-mlflow", action="store_true", help="print only; record nothing")
    parser.add_argument("--figure", default=None, metavar="PNG",
                        help="also write a picture of a few trials (query, support set, choice) to this file (default: none)")
    cli.add_arguments(parser)
    return parser


CONFIG_FLAGS = {"evaluation.n_way": "--n-way", "evaluation.k_shot": "--k-shot",
                "evaluation.runs_per_group": "--runs-per-group", "evaluation.reid_new_share": "--reid-new-share"}
"""The configuration keys this command sets from its flags: its errors name the flag the user typed."""


def main(argv: list[str] | None = None) -> int:
    from siamese_core.config import ConfigError

    def body() -> int:
        try:
            return _main(argv)
        except ConfigError as exc:
            named = [f"{flag} sets {key}" for key, flag in CONFIG_FLAGS.items() if key in str(exc)]
            if not named:
                raise
            raise ConfigError(f"{exc} ({'; '.join(named)})") from exc

    return cli.run(body)


def _main(argv: list[str] | None) -> int:
    from siamese_core.config import ConfigError
    from workflows.models import load_any
    from workflows.shards import DataSet

    args = build_parser().parse_args(argv)
    cli.configure_console(args.verbose)
    started = time.perf_counter()
    evaluation_cfg = EvaluationConfig(n_way=args.n_way, k_shot=args.k_shot, runs_per_group=args.runs_per_group,
                                      reid=args.reid, reid_new_share=args.reid_new_share)
    dataset = DataSet.open(args.data, args.endpoint_url)
    if args.reid and args.split == "validation":
        raise ConfigError("--reid chooses its threshold on validation and reports --split test")
    reid = None
    if args.model in BASELINES:
        scored = evaluate_baseline(dataset, args.split, args.seed, evaluation_cfg, args.size)
        baseline = None
    else:
        model = load_any(args.model, args.endpoint_url, tracking_uri=args.tracking_uri,
                         test_time_shift_px=args.test_time_shift_px, test_time_views=args.test_time_views)
        scored = evaluate_model(model, dataset, args.split, args.seed, evaluation_cfg)
        baseline = score_runs(scored.runs, pixel_nearest_neighbour(scored.images.as_float()))
        if evaluation_cfg.reid_enabled(dataset.manifest.has_group) and args.split == "test":
            reid = evaluate_reid(model, dataset, evaluation_cfg, args.seed, args.split)
    cli.started_work()
    result = scored.result
    elapsed = time.perf_counter() - started
    print(f"{args.model} on {dataset.name} {args.split}: {result.accuracy:.2%} ({result.correct}/{result.trials} "
          f"trials, {scored.protocol}) in {elapsed:.1f}s")
    if baseline is not None:
        print(f"pixel nearest neighbour on the same trials: {baseline.accuracy:.2%}")
    if len(result.per_group) > 1:
        for group, accuracy in sorted(result.per_group.items()):
            print(f"  {group:<34s} {accuracy:.2%}")
    if reid is not None:
        m, b = reid.test.metrics(), reid.baseline
        print(f"re-identification on {args.split} ({int(m['queries'])} queries, {int(m['new_queries'])} of new "
              f"individuals): top-1 {m['top1']:.2%}, top-5 {m['top5']:.2%}, MAP@5 {m['map5']:.3f} (pixels "
              f"{b['map5']:.3f}); with 'new' at p = {reid.threshold_p:.3f} (chosen on validation): MAP@5 "
              f"{m['map5_new']:.3f} (pixels {b['map5_new']:.3f})")

    if args.figure:
        import matplotlib.pyplot as plt

        fig = tracking.oneshot_trials_figure(scored, args.split)
        fig.savefig(args.figure, dpi=80)
        plt.close(fig)
        print(f"trials picture: {args.figure}")
    if not args.no_mlflow:
        uri = tracking.resolve_tracking_uri(args.tracking_uri)
        with tracking.mlflow_run(uri, args.experiment, run_name=f"evaluate-{dataset.name}-{args.model}-{args.split}",
                                 tags={"job": "evaluate", "model": args.model, "data": dataset.name}) as run:
            import mlflow

            mlflow.log_params({"model": args.model, "split": args.split, "seed": args.seed, "protocol": scored.protocol,
                               "data": args.data, "n_way": scored.runs[0].n_way, "k_shot": args.k_shot})
            tracking.log_dataset(dataset, context="evaluation")
            tracking.log_oneshot(result, args.split)
            if baseline is not None:
                mlflow.log_metric(f"{args.split}_pixel_nn_accuracy", baseline.accuracy)
            tracking.log_oneshot_figures(scored, args.split)
            if reid is not None:
                tracking.log_reid(reid, args.split)
        print(f"Recorded in MLflow run {run.info.run_id} at {uri}")
        print(f"Review it: {tracking.ui_hint(uri)}")
    return 0


if __name__ == "__main__":
    # through the package module, so the errors raised are the classes workflows.cli knows
    from workflows.evaluate import main as entry

    sys.exit(entry())
