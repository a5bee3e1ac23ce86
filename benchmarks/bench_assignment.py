"""Dense linear assignment: scipy's ``linear_sum_assignment`` against ``lap.lapjv``.

Why: hard-pair mining (``siamese_core.mining``) solves one maximising
assignment per block of a group's training images every mining epoch (an
Omniglot alphabet has up to 55 characters x 20 drawers = 1,100 images). scipy
is the default solver; ``lap`` would be a new dependency, worth it only if it
is clearly faster at these sizes. Both solve the same matrices (scipy through
``siamese_core.mining.assign``, the path the mining code takes), and the
optimal totals are checked equal.

    .venv/bin/python benchmarks/bench_assignment.py --sizes 256 512 1024 2048 --repeats 3

``--masked`` also times matrices shaped like mining's (same-class cells set to
the forbidden penalty, 20 images per class). ``lap`` is skipped (and said so)
when it is not installed: ``pip install lap`` to measure it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import scipy

from siamese_core.mining import assign


def make_matrix(size: int, seed: int, masked: bool) -> np.ndarray:
    """Random logits-like scores (normal, std 3); ``masked``: same-class cells penalised as mining does."""
    rng = np.random.default_rng([seed, size])
    values = rng.normal(0.0, 3.0, (size, size))
    if masked:
        labels = rng.permutation(np.arange(size) % max(2, size // 20))  # ~20 images a class
        forbidden = labels[:, None] == labels[None, :]
        low, high = values[~forbidden].min(), values[~forbidden].max()
        values[forbidden] = low - (size + 1) * (high - low + 1.0)
    return values


def time_solver(values: np.ndarray, solver: str, repeats: int) -> tuple[list[float], float]:
    """Wall seconds of each of ``repeats`` solves, and the optimal total."""
    times, total = [], float("nan")
    for _ in range(repeats):
        start = time.perf_counter()
        if solver == "scipy":
            cols = assign(values)
        else:
            import lap

            cols = np.asarray(lap.lapjv(-values, extend_cost=False, return_cost=False)[0])  # lapjv minimises
        times.append(time.perf_counter() - start)
        total = float(values[np.arange(values.shape[0]), cols].sum())
    return times, total


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=3, help="solves per size and solver (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--masked", action="store_true", help="also time mining-shaped (penalised) matrices")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or any(s < 1 for s in args.sizes):
        parser.error("--repeats and --sizes must be >= 1")

    try:
        import lap

        lap_version = getattr(lap, "__version__", "unknown")
    except ImportError:
        lap_version = None
    print(f"scipy {scipy.__version__}, numpy {np.__version__}, python {platform.python_version()}; "
          + (f"lap {lap_version}" if lap_version else "lap not installed: lap.lapjv skipped (pip install lap)"))

    kinds = ["dense"] + (["masked"] if args.masked else [])
    results = []
    for kind in kinds:
        for size in args.sizes:
            values = make_matrix(size, args.seed, kind == "masked")
            row = {"kind": kind, "size": size, "repeats": args.repeats}
            times, total = time_solver(values, "scipy", args.repeats)
            row.update(scipy_s=statistics.median(times), scipy_times_s=times, scipy_total=total)
            line = f"{kind:6s} {size:5d} x {size:<5d} scipy {row['scipy_s'] * 1e3:9.2f} ms"
            if lap_version:
                times, lap_total = time_solver(values, "lap", args.repeats)
                row.update(lap_s=statistics.median(times), lap_times_s=times, lap_total=lap_total,
                           ratio_lap_over_scipy=statistics.median(times) / row["scipy_s"],
                           same_total=bool(np.isclose(lap_total, total, rtol=1e-9, atol=1e-6)))
                line += (f"   lap {row['lap_s'] * 1e3:9.2f} ms   lap/scipy {row['ratio_lap_over_scipy']:.3f}"
                         f"   optimum equal: {row['same_total']}")
            else:
                line += "   lap skipped"
            print(line, flush=True)
            results.append(row)

    report = {"scipy": scipy.__version__, "numpy": np.__version__, "lap": lap_version,
              "python": platform.python_version(), "seed": args.seed, "results": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
