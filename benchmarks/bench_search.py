"""Exact top-k search by the siamese head: the faiss L1 index path against brute-force head scoring.

Why: re-identification ranks every query against the whole gallery, so how the two
exact paths of ``siamese_core.retrieval.search_topk`` grow with the gallery decides
which one a job can afford. 1,000 queries against synthetic galleries (embeddings
uniform in (0, 1) like sigmoid outputs, every alpha negative so both paths apply) of
10k, 100k and 1M embeddings; each gallery is generated chunk by chunk and streamed to
the search, so neither the generator nor the search ever holds it whole.

Figures per gallery size and method: search wall time (the time spent generating
chunks is measured apart and left out), generation time, and peak memory as the peak
RSS delta (the kernel's high-water mark, reset before each run, minus the RSS before
it, each run in a fresh process; it counts faiss' and torch's buffers, which
tracemalloc would not see). Then how
time grows with the gallery, as ratios of consecutive sizes, and whether the two paths
returned the same ranks.

    .venv/bin/python benchmarks/bench_search.py --json benchmarks/results/bench_search.json
    .venv/bin/python benchmarks/bench_search.py --quick          # tiny sizes, a smoke run

Brute force costs ``Q * G * D`` element operations (about 0.25 ns each on 2 cores), so
``--brute-max`` caps the gallery sizes it runs at; larger sizes are reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from siamese_core import retrieval  # noqa: E402

QUICK = {"sizes": [2000, 8000], "queries": 64, "dim": 32, "chunk": 2048}


def human(n: int) -> str:
    """10000 -> '10k', 1000000 -> '1M' (exact multiples only; otherwise the number)."""
    for unit, value in (("M", 1_000_000), ("k", 1_000)):
        if n >= value and n % value == 0:
            return f"{n // value}{unit}"
    return str(n)


def synthetic_chunks(n: int, dim: int, chunk: int, seed: int) -> Iterator[tuple[np.ndarray, int]]:
    """``(embeddings [<=chunk, dim] float32 in (0, 1), offset)``; chunk i from its own seed,
    so every run sees the same gallery and the generator holds one chunk at a time."""
    tiny = np.float32(2.0 ** -25)  # rng.random can return 0.0; sigmoid outputs never do
    for i, start in enumerate(range(0, n, chunk)):
        rows = min(chunk, n - start)
        block = np.random.default_rng([seed, 1, i]).random((rows, dim), dtype=np.float32)
        np.maximum(block, tiny, out=block)
        yield block, start


class TimedChunks:
    """Iterates a chunk stream and adds up the time spent producing chunks."""

    def __init__(self, chunks: Iterator[tuple[np.ndarray, int]]) -> None:
        self.chunks, self.seconds = chunks, 0.0

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        while True:
            start = time.perf_counter()
            try:
                item = next(self.chunks)
            except StopIteration:
                self.seconds += time.perf_counter() - start
                return
            self.seconds += time.perf_counter() - start
            yield item


class PeakMemory:
    """Peak memory of one run: RSS high-water mark delta on Linux, else tracemalloc's peak."""

    def __init__(self) -> None:
        self.kind = "peak RSS delta" if self._reset_hwm() else "tracemalloc peak (numpy/Python only)"

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(field)

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            PeakMemory._status("VmHWM")
        except OSError:
            return False
        return True

    def __enter__(self) -> PeakMemory:
        if self.kind.startswith("peak RSS"):
            self._reset_hwm()
            self.before = self._status("VmRSS")
        else:
            tracemalloc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind.startswith("peak RSS"):
            self.peak = self._status("VmHWM") - self.before
        else:
            self.peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()


def run_one(method: str, size: int, args: argparse.Namespace) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """One search in a fresh process, so its peak memory is its own, not memory that an
    earlier run left with the allocator; the child prints its figures as one JSON line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, str(size),
           "--queries", str(args.queries), "--dim", str(args.dim), "--k", str(args.k),
           "--threads", str(args.threads), "--chunk", str(args.chunk),
           "--max-elements", str(args.max_elements), "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} at {size} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["row"], np.asarray(out["scores"], dtype=np.float32), np.asarray(out["indices"], dtype=np.int64)


def child(method: str, size: int, args: argparse.Namespace) -> None:
    """The measured run: set-up, a tiny warm-up (first-call costs), then the search itself."""
    set_threads(args.threads)
    queries, alpha, bias = problem(args)
    retrieval.search_topk(queries[:8], synthetic_chunks(64, args.dim, 64, args.seed + 1), alpha, bias, args.k,
                          method=method, max_elements=args.max_elements)
    stream = TimedChunks(synthetic_chunks(size, args.dim, args.chunk, args.seed))
    with PeakMemory() as mem:
        start = time.perf_counter()
        scores, indices = retrieval.search_topk(queries, stream, alpha, bias, args.k, method=method,
                                                max_elements=args.max_elements)
        total = time.perf_counter() - start
    row = {"gallery": size, "method": method, "search_s": total - stream.seconds,
           "generate_s": stream.seconds, "peak_mb": mem.peak / 2**20, "memory": mem.kind}
    print(json.dumps({"row": row, "scores": scores.tolist(), "indices": indices.tolist()}))


def problem(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, float]:
    """The queries, and head weights with every alpha negative (both paths apply)."""
    rng = np.random.default_rng([args.seed, 0])
    queries = np.maximum(rng.random((args.queries, args.dim), dtype=np.float32), np.float32(2.0 ** -25))
    alpha = -np.abs(rng.normal(0.0, 0.2, args.dim)).astype(np.float32)
    return queries, alpha, 0.5


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    if retrieval.faiss_available():
        import faiss  # noqa: PLC0415

        faiss.omp_set_num_threads(threads)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=lambda s: [int(float(x)) for x in s.split(",")],
                        default=[10_000, 100_000, 1_000_000], help="gallery sizes, comma-separated")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--chunk", type=int, default=16384, help="rows per streamed gallery chunk")
    parser.add_argument("--max-elements", type=int, default=retrieval.DEFAULT_MAX_ELEMENTS,
                        help="brute force's [q, g, D] block budget")
    parser.add_argument("--brute-max", type=int, default=1_000_000,
                        help="largest gallery brute force runs at (it costs Q*G*D operations)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.queries, args.dim, args.chunk = (QUICK["sizes"], QUICK["queries"], QUICK["dim"],
                                                          QUICK["chunk"])
    if args.child:
        child(args.child[0], int(args.child[1]), args)
        return {}
    methods = ["index", "brute"] if retrieval.faiss_available() else ["brute"]

    load_before = os.getloadavg()
    print(f"bench_search: {args.queries} queries, D={args.dim}, k={args.k}, threads={args.threads}, "
          f"chunk={args.chunk} rows, brute block={args.max_elements} elements; "
          f"python {platform.python_version()}, torch {torch.__version__}")
    print(f"load average before (1, 5, 15 min): {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} "
          f"on {os.cpu_count()} CPUs (other work on the machine slows both paths, brute force most)")
    rows: list[dict[str, Any]] = []
    skipped: list[int] = []
    agreement: list[dict[str, Any]] = []
    memory_kind = ""
    print(f"{'gallery':>8} {'method':>6} {'search s':>9} {'generate s':>10} {'peak MB':>8}")
    for size in args.sizes:
        results = {}
        for method in methods:
            if method == "brute" and size > args.brute_max:
                skipped.append(size)
                print(f"{human(size):>8} {method:>6}   skipped (gallery > --brute-max {human(args.brute_max)})")
                continue
            row, scores, indices = run_one(method, size, args)
            memory_kind = row["memory"]
            rows.append(row)
            results[method] = (scores, indices)
            print(f"{human(size):>8} {method:>6} {row['search_s']:9.3f} {row['generate_s']:10.3f} "
                  f"{row['peak_mb']:8.1f}", flush=True)
        if len(results) == 2:
            (s_i, i_i), (s_b, i_b) = results["index"], results["brute"]
            agreement.append({"gallery": size, "same_ranks": float(np.mean(np.all(i_i == i_b, axis=1))),
                              "max_score_diff": float(np.max(np.abs(s_i - s_b)))})
    print(f"memory: {memory_kind} in MB, each run in a fresh process; "
          "search s excludes the generate s spent making chunks")

    ratios: list[dict[str, Any]] = []
    print("time growth (search s of the larger gallery / the smaller):")
    for method in methods:
        timed = [r for r in rows if r["method"] == method]
        for small, large in zip(timed, timed[1:]):
            ratio = large["search_s"] / small["search_s"] if small["search_s"] > 0 else float("inf")
            ratios.append({"method": method, "from": small["gallery"], "to": large["gallery"], "time_ratio": ratio,
                           "size_ratio": large["gallery"] / small["gallery"]})
            print(f"  {method} {human(large['gallery'])}/{human(small['gallery'])}: {ratio:.2f}x time "
                  f"for {large['gallery'] / small['gallery']:.0f}x the gallery")
    pairs = [[r for r in rows if r["gallery"] == size] for size in args.sizes]
    if any(len(both) == 2 for both in pairs):
        print("brute force against the index (search s of brute / of index):")
    for both in pairs:
        if len(both) == 2:
            t = {r["method"]: r["search_s"] for r in both}
            print(f"  brute/index at {human(both[0]['gallery'])}: {t['brute'] / t['index']:.1f}x time")
    for a in agreement:
        print(f"same ranks at {human(a['gallery'])}: {a['same_ranks']:.4f} of queries, "
              f"max |score difference| {a['max_score_diff']:.2e}")
    if skipped:
        print(f"brute skipped above {human(args.brute_max)} (--brute-max): {', '.join(human(s) for s in skipped)}")
    load_after = os.getloadavg()
    print(f"load average after (1, 5, 15 min): {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    figures = {"queries": args.queries, "dim": args.dim, "k": args.k, "threads": args.threads, "chunk": args.chunk,
               "max_elements": args.max_elements, "brute_max": args.brute_max, "memory": memory_kind,
               "results": rows, "ratios": ratios, "agreement": agreement, "brute_skipped": skipped,
               "torch": torch.__version__, "python": platform.python_version(),
               "loadavg_before": list(load_before), "loadavg_after": list(load_after)}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
