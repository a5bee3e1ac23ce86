"""``python -m workflows.evaluate``: one-shot accuracy of a model on ingested shards -> MLflow.

Reads one split (``test`` by default: Lake's 10 alphabets, 400 trials) from
the shards that ``workflows.ingest`` wrote, runs the seeded N-way within-
alphabet trials of :mod:`siamese_core.oneshot`, prints the accuracy and
records it in MLflow. ``--model pixel-nn`` is the 1-nearest-neighbour pixel
baseline (the paper reports 21.7% on Lake's protocol).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any

from siamese_core.config import TEST_TIME_VIEWS, OneShotConfig
from siamese_core.omniglot import OmniglotArrays, arrays_from_rows
from siamese_core.fit import oneshot_trials
from siamese_core.oneshot import OneShotResult, pixel_nearest_neighbour, score_runs

from workflows import shards, tracking

BASELINES = ("pixel-nn",)


@dataclass(frozen=True)
class EvaluationRequest:
    data: str
    split: str = "test"
    model: str = "pixel-nn"
    seed: int = 0
    n_way: int = 20
    runs_per_alphabet: int = 2
    endpoint_url: str | None = None
    tracking_uri: str | None = None  # MLflow store a models:/ or runs:/ model is loaded from
    test_time_shift_px: int | None = None  # None: the model's own test-time views
    test_time_views: str | None = None  # "cross" or "square"; None: the model's own


@dataclass(frozen=True)
class Evaluation:
    """A one-shot result with the images and runs it came from (for pictures)."""

    result: OneShotResult
    arrays: OmniglotArrays
    runs: list
    test_time_shift_px: int = 0  # the model's test-time views the result was scored with
    test_time_views: str = "cross"  # and their pattern (model.test_time_views)


def views_description(test_time_shift_px: int, test_time_views: str = "cross") -> str:
    """How a result was scored, for the printed protocol: "" for the paper's single view."""
    if not test_time_shift_px:
        return ""
    from siamese_core.model import shift_offsets

    count = len(shift_offsets(test_time_shift_px, test_time_views))
    return f", mean embedding over {count} views ({test_time_views} of shifts up to {test_time_shift_px} px)"


def load_split_arrays(data: str, split: str, endpoint_url: str | None = None,
                      size: int | None = None) -> OmniglotArrays:
    """Decode one split of the shards into arrays (plain pyarrow, no Ray), resized to ``size``."""
    table = shards.load_split_table(data, split, endpoint_url=endpoint_url,
                                    columns=["image", "alphabet", "character", "drawer", "image_id"])
    columns = table.to_pydict()
    return arrays_from_rows(columns["image"], columns["alphabet"], columns["character"],
                            columns["drawer"], paths=columns["image_id"], size=size)


def evaluate_model(model: Any, data: str, split: str = "test", seed: int = 0,
                   endpoint_url: str | None = None, cfg: OneShotConfig = OneShotConfig()) -> Evaluation:
    """Score a :class:`~siamese_core.model.SiameseNet` on a split's one-shot trials (its own input size)."""
    from siamese_core.checkpoint import unwrap
    from siamese_core.fit import evaluate_oneshot

    net = unwrap(model)
    arrays = load_split_arrays(data, split, endpoint_url, size=net.config.input_size)
    runs = oneshot_trials(arrays, cfg, seed)
    return Evaluation(evaluate_oneshot(net, arrays, runs), arrays, runs, net.config.test_time_shift_px,
                      net.config.test_time_views)


def evaluate(request: EvaluationRequest) -> Evaluation:
    """Score the requested model (a baseline, a checkpoint or a registered model)."""
    cfg = OneShotConfig(n_way=request.n_way, runs_per_alphabet=request.runs_per_alphabet)
    if request.model in BASELINES:
        arrays = load_split_arrays(request.data, request.split, request.endpoint_url)
        runs = oneshot_trials(arrays, cfg, request.seed)
        return Evaluation(score_runs(runs, pixel_nearest_neighbour(arrays.as_float())), arrays, runs)
    from workflows.models import load_any

    model = load_any(request.model, request.endpoint_url, tracking_uri=request.tracking_uri,
                     test_time_shift_px=request.test_time_shift_px, test_time_views=request.test_time_views)
    return evaluate_model(model, request.data, request.split, request.seed, request.endpoint_url, cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="shards written by workflows.ingest (dir or s3://)")
    parser.add_argument("--split", default="test", choices=["validation", "test"])
    parser.add_argument("--model", default="pixel-nn",
                        help="a baseline (pixel-nn), a checkpoint directory (local or s3://), "
                             "or an MLflow model URI (models:/NAME/VERSION, models:/NAME@ALIAS, runs:/...)")
    parser.add_argument("--seed", type=int, default=0, help="fixes the one-shot trials")
    parser.add_argument("--n-way", type=int, default=20)
    parser.add_argument("--runs-per-alphabet", type=int, default=2)
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// data")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI: where a models:/ or runs:/ --model is loaded from and "
                             "where the result is recorded (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    parser.add_argument("--test-time-shift-px", type=int, default=None, metavar="N",
                        help="score with the mean embedding over N-pixel shifts (0: one view, the paper's "
                             "protocol; default: what the model was trained with, model.test_time_shift_px)")
    parser.add_argument("--test-time-views", default=None, choices=TEST_TIME_VIEWS,
                        help="which shifts are views: cross (up, down, left, right: 4N + 1) or square "
                             "(every shift within N px: (2N + 1)^2); default: the model's, model.test_time_views")
    parser.add_argument("--experiment", default=tracking.DEFAULT_EXPERIMENT)
    parser.add_argument("--no-mlflow", action="store_true", help="print only; record nothing")
    args = parser.parse_args(argv)

    request = EvaluationRequest(data=args.data, split=args.split, model=args.model, seed=args.seed,
                                n_way=args.n_way, runs_per_alphabet=args.runs_per_alphabet,
                                endpoint_url=args.endpoint_url, tracking_uri=args.tracking_uri,
                                test_time_shift_px=args.test_time_shift_px, test_time_views=args.test_time_views)
    from workflows.models import ModelLoadError
    from workflows.storage import StorageError

    started = time.perf_counter()
    try:
        evaluation = evaluate(request)
    except (ModelLoadError, StorageError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = evaluation.result
    elapsed = time.perf_counter() - started
    protocol = (f"{request.n_way}-way within-alphabet, {request.runs_per_alphabet} runs/alphabet (Lake)"
                + views_description(evaluation.test_time_shift_px, evaluation.test_time_views))
    print(f"{request.model} on {request.split}: {result.accuracy:.2%} "
          f"({result.correct}/{result.trials} trials, {protocol}, seed {request.seed}) in {elapsed:.1f}s")
    for alphabet, accuracy in sorted(result.per_alphabet.items()):
        print(f"  {alphabet:<34s} {accuracy:.2%}")

    if not args.no_mlflow:
        uri = tracking.resolve_tracking_uri(args.tracking_uri)
        with tracking.mlflow_run(uri, args.experiment, run_name=f"evaluate-{request.model}-{request.split}",
                                 tags={"job": "evaluate", "model": request.model}) as run:
            import mlflow

            mlflow.log_params({"model": request.model, "split": request.split, "seed": request.seed,
                               "n_way": request.n_way, "runs_per_alphabet": request.runs_per_alphabet,
                               "protocol": protocol, "data": request.data,
                               "test_time_shift_px": evaluation.test_time_shift_px,
                               "test_time_views": evaluation.test_time_views})
            tracking.log_oneshot(result, request.split)
            tracking.log_oneshot_figures(evaluation, request.split)
        print(f"Recorded in MLflow run {run.info.run_id} at {uri}")
        print(f"Review it: {tracking.ui_hint(uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
