"""Score trained checkpoints with several test-time view sets on the same wide validation trials.

Why: test-time views cost nothing in training, so the way to choose them is to
score the same weights on the same trials with each candidate and compare the
figures pairwise (a checkpoint's own noise cancels). The trials are
``recipe_search.py``'s wide validation (1,600 on Omniglot, seed ``VALIDATION_SEED``),
so the figures line up with its ``val_oneshot_wide``.

    .venv/bin/python benchmarks/compare_views.py runs/demo-*/      # the best checkpoint of each run
    .venv/bin/python benchmarks/compare_views.py runs/demo-X/checkpoint_... --views cross:3 square:2

A run folder (Ray Train's storage folder of one run) stands for its best
checkpoint: the one whose epoch is the run's final ``best_epoch``. Prints one
line per checkpoint, then the mean of each view set and its mean paired
difference from the first; ``--json`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_search import DEFAULT_SOURCE, load, wide_validation  # noqa: E402

from siamese_core.checkpoint import load_model  # noqa: E402
from siamese_core.config import TEST_TIME_VIEWS, TrainingRecipe  # noqa: E402
from siamese_core.evaluation import VALIDATION_SEED, episodes, evaluate_oneshot  # noqa: E402
from siamese_core.model import shift_offsets, with_test_time_shift  # noqa: E402

DEFAULT_VIEWS = ("cross:0", "cross:3", "square:2", "square:3")


def best_checkpoint_dir(path: Path) -> Path:
    """``path`` itself if it holds ``model.pt``; else the best checkpoint of the run folder ``path``."""
    if (path / "model.pt").is_file():
        return path
    snapshot = path / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        raise SystemExit(f"error: {path} holds neither model.pt nor a Ray Train checkpoint_manager_snapshot.json")
    results = json.loads(snapshot.read_text())["checkpoint_results"]
    best = [r["checkpoint_dir_name"] for r in results if r["metrics"]["epoch"] == r["metrics"]["best_epoch"]]
    if not best:
        raise SystemExit(f"error: {path}: no kept checkpoint is the run's best epoch")
    return path / best[-1]


def parse_views(spec: str) -> tuple[str, int]:
    """``"square:3"`` -> ``("square", 3)``."""
    pattern, _, shift = spec.partition(":")
    if pattern not in TEST_TIME_VIEWS or not shift.isdigit():
        raise argparse.ArgumentTypeError(f"a view set is cross:N or square:N, got {spec!r}")
    return pattern, int(shift)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="checkpoint folders, or run folders (their best)")
    parser.add_argument("--views", nargs="+", type=parse_views, default=[parse_views(v) for v in DEFAULT_VIEWS],
                        metavar="PATTERN:N", help=f"view sets to compare (default: {' '.join(DEFAULT_VIEWS)})")
    parser.add_argument("--data", default=None, help="a data set written by workflows.ingest (default: --source)")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder with the Omniglot zips")
    parser.add_argument("--cache-dir", type=Path, default=None, help="decoded splits as .npz (as recipe_search)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    names = [f"{pattern}:{shift}" for pattern, shift in args.views]
    checkpoints = [best_checkpoint_dir(p) for p in args.paths]
    models = [load_model(c) for c in checkpoints]
    configs = {(m.config.input_size, m.config.preprocess) for m in models}
    if len(configs) != 1:
        raise SystemExit("error: the checkpoints want different input sizes or preprocessing; compare one at a time")
    recipe = TrainingRecipe(model=models[0].config)
    val, _ = load(args.data, None if args.data else args.source, "validation", recipe, args.cache_dir)
    trials = episodes(val, wide_validation(recipe.evaluation, val.group is not None), VALIDATION_SEED,
                      validation=False)
    print(f"{len(checkpoints)} checkpoint(s), {sum(len(r.queries) for r in trials)} validation trials; "
          + ", ".join(f"{n} = {len(shift_offsets(s, p))} views" for n, (p, s) in zip(names, args.views)), flush=True)

    table: dict[str, dict[str, float]] = {}
    for path, model in zip(checkpoints, models):
        started = time.perf_counter()
        table[str(path)] = {n: evaluate_oneshot(with_test_time_shift(model, s, p), val, trials).accuracy
                            for n, (p, s) in zip(names, args.views)}
        print(f"{path}: " + "  ".join(f"{n} {a:.2%}" for n, a in table[str(path)].items())
              + f"  ({time.perf_counter() - started:.0f}s)", flush=True)
    means = {n: float(np.mean([row[n] for row in table.values()])) for n in names}
    diffs = {n: [row[n] - row[names[0]] for row in table.values()] for n in names[1:]}
    print("mean: " + "  ".join(f"{n} {a:.2%}" for n, a in means.items()))
    for n, d in diffs.items():
        print(f"{n} - {names[0]}: mean {np.mean(d):+.2%}, per checkpoint " + " ".join(f"{x:+.2%}" for x in d))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"trials": f"wide validation ({sum(len(r.queries) for r in trials)})",
                                         "views": names,
                                         "checkpoints": table, "mean": means}, indent=1) + "\n")


if __name__ == "__main__":
    main()
