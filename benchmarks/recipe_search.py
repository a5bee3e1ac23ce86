"""Train a recipe on a data set in one process and report validation (and, once, test) one-shot accuracy.

Why: a recipe (preset, input size, colour, distortions, optimizer values, pairs) is chosen
on validation one-shot accuracy only, within a CPU budget like the demo's; ``--test`` scores
the chosen model on the test split once, for the report. It runs the project's one training
loop (``siamese_core.loop.fit``) without Ray, so it also runs on a bare GPU machine.

    .venv/bin/python benchmarks/recipe_search.py --data ./data/omniglot-shards --test
    .venv/bin/python benchmarks/recipe_search.py --data ./data/coil100-shards --recipe demo \\
        --set model.input_size=48 pairs.distorted_copies=1 --tag c48
    python benchmarks/recipe_search.py --source ../shared/data/omniglot --device cuda   # raw Omniglot, no ingest

``--set`` takes dotted keys of the recipe (``TrainingRecipe``). Each run appends one JSON line
to ``--results`` (default benchmarks/results/recipe_search.jsonl) with the whole recipe.

The budget is wall-clock (``training.time_budget_s``), so the number of epochs, and with it
the accuracy, depends on how busy the machine is; the JSON line records ``epochs_run`` and
``seconds_per_epoch``. ``--set training.time_budget_s=none training.epochs=N`` compares at a
fixed amount of training instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from siamese_core.config import RECIPES, EvaluationConfig, TrainingRecipe, apply_overrides  # noqa: E402
from siamese_core.evaluation import VALIDATION_SEED, episodes, evaluate_oneshot  # noqa: E402
from siamese_core.heap import keep_freed_memory  # noqa: E402
from siamese_core.images import LabelledImages  # noqa: E402
from siamese_core.loop import fit  # noqa: E402
from siamese_core.model import parameter_count, with_test_time_shift  # noqa: E402
from siamese_core.oneshot import pixel_nearest_neighbour, score_runs  # noqa: E402

DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "omniglot"

WIDE_RUNS = 4
"""The wide validation draws 4x the runs of the selection trials, all queries (1,600 on Omniglot):
a less noisy comparison of recipes (std ~1% instead of ~2.2%)."""


def wide_validation(evaluation: EvaluationConfig, has_groups: bool) -> EvaluationConfig:
    runs = WIDE_RUNS * (evaluation.runs_per_group or (2 if has_groups else 20))
    return dataclasses.replace(evaluation, runs_per_group=runs, validation_queries_per_run=None)


def load(data: str | None, source: Path | None, split: str, recipe: TrainingRecipe,
         cache_dir: Path | None) -> tuple[LabelledImages, TrainingRecipe]:
    """A split decoded as the recipe's model sees it, and the recipe with the data set's defaults filled in
    (its preprocessing and ``pairs.new_classes``, where the recipe leaves them open)."""
    if data is not None:
        from workflows.shards import DataSet  # the data set reader (pyarrow); no Ray is started

        dataset = DataSet.open(data)
        preprocess = recipe.model.preprocess.resolved(dataset.manifest.preprocessing)
        key, new_classes = dataset.manifest.content_checksum, dataset.manifest.new_classes
    else:
        from siamese_core import omniglot

        dataset, preprocess, key = None, recipe.model.preprocess.resolved(), f"omniglot:{source}"
        new_classes = omniglot.OMNIGLOT_NEW_CLASSES
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, preprocess=preprocess),
                                 pairs=recipe.pairs.resolved(new_classes))
    size = recipe.model.input_size
    tag = hashlib.sha256(f"{key}|{split}|{size}|{preprocess}".encode()).hexdigest()[:16]
    path = cache_dir / f"{split}_{size}_{tag}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        z = np.load(path, allow_pickle=False)
        images = LabelledImages(images=z["images"], label=z["label"], classes=tuple(z["classes"].tolist()),
                                image_id=z["image_id"], group=z["group"] if "group" in z else None,
                                source=z["source"] if "source" in z else None,
                                shard=z["shard"] if "shard" in z else None)
        return images, recipe
    images = (dataset.load_images(split, size, preprocess) if dataset is not None
              else omniglot.load_split(source, split, size, preprocess))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {k: v for k, v in (("group", images.group), ("source", images.source), ("shard", images.shard))
                 if v is not None}
        np.savez(path, images=images.images, label=images.label, classes=np.asarray(images.classes),
                 image_id=images.image_id, **extra)
    return images, recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--data", help="a data set written by workflows.ingest (dir or s3://)")
    where.add_argument("--source", type=Path, help=f"the raw Omniglot archives (default {DEFAULT_SOURCE})")
    parser.add_argument("--cache-dir", type=Path, default=None, help="keep decoded splits as .npz here")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="demo")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override the recipe, e.g. optim.lr=0.02 training.time_budget_s=240")
    parser.add_argument("--test", action="store_true", help="also score the test episodes once (the report)")
    parser.add_argument("--tag", default="")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (bf16 autocast)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "recipe_search.jsonl")
    args = parser.parse_args(argv)
    source = None if args.data else (args.source or DEFAULT_SOURCE)

    overrides = dict(item.split("=", 1) for item in args.set)
    recipe = apply_overrides(RECIPES[args.recipe], overrides)
    tr = recipe.training
    if tr.threads is not None:
        torch.set_num_threads(tr.threads)
    if tr.keep_freed_memory:
        keep_freed_memory()

    t0 = time.perf_counter()
    train, recipe = load(args.data, source, "train", recipe, args.cache_dir)
    val, _ = load(args.data, source, "validation", recipe, args.cache_dir)
    ingest_s = time.perf_counter() - t0
    print(f"recipe: {recipe}\nthreads {torch.get_num_threads()}, decode {ingest_s:.1f}s, "
          f"train {len(train)} images / {len(train.classes)} classes, validation {len(val)} / {len(val.classes)}",
          flush=True)
    autocast = torch.bfloat16 if args.device.startswith("cuda") else None
    result = fit(recipe, train, val, args.device, log=lambda m: print(m, flush=True), autocast_dtype=autocast)
    model = result.model
    t1 = time.perf_counter()
    wide = wide_validation(recipe.evaluation, val.group is not None)
    wide_runs = episodes(val, wide, VALIDATION_SEED, validation=False)
    # The same weights and trials scored with 0..3 px test-time shifts in the recipe's pattern, and its own.
    own_shift = recipe.model.test_time_shift_px
    by_shift = {n: evaluate_oneshot(with_test_time_shift(model, n), val, wide_runs).accuracy
                for n in sorted({0, 1, 2, 3, own_shift})}
    row = {
        "tag": args.tag, "data": args.data or str(source), "recipe_name": args.recipe, "device": args.device,
        "overrides": overrides, "params": parameter_count(model),
        "epochs_run": len(result.history), "best_epoch": result.best_epoch, "stop_reason": result.stop_reason,
        "train_minutes": result.seconds / 60,
        "seconds_per_epoch": float(np.mean([h["epoch_seconds"] for h in result.history])),
        "train_seconds_per_epoch": float(np.mean([h["train_seconds"] for h in result.history])),
        "val_oneshot": result.best_val_oneshot_accuracy,
        "val_oneshot_wide": by_shift[own_shift], "wide_trials": int(sum(r.queries.size for r in wide_runs)),
        "val_oneshot_wide_by_test_time_shift": by_shift,
        "val_pixel_nn_wide": score_runs(wide_runs, pixel_nearest_neighbour(val.as_float())).accuracy,
        "val_verification": result.history[result.best_epoch]["val_verification_accuracy"],
        "time_to_accuracy": [[h["elapsed_seconds"], h["val_oneshot_accuracy"]] for h in result.history],
    }
    if args.test:
        test, _ = load(args.data, source, "test", recipe, args.cache_dir)
        runs = episodes(test, recipe.evaluation, recipe.training.seed, validation=False)
        res = evaluate_oneshot(model, test, runs)
        row["test_oneshot"] = res.accuracy
        row["test_trials"] = res.trials
        row["test_n_way"] = runs[0].n_way
        row["test_oneshot_single_view"] = evaluate_oneshot(with_test_time_shift(model, 0), test, runs).accuracy
        row["test_pixel_nn"] = score_runs(runs, pixel_nearest_neighbour(test.as_float())).accuracy
        row["test_per_group"] = res.per_group
    row["eval_seconds"] = time.perf_counter() - t1
    row["total_minutes"] = (time.perf_counter() - t0) / 60
    print(json.dumps(row, indent=1), flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as fh:
        fh.write(json.dumps({**row, "recipe": dataclasses.asdict(recipe)}, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
