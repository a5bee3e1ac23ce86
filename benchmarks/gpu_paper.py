"""The paper's network on one GPU: the step, the loop, training to Koch's 92% with a time-to-accuracy log, test once.

Plain PyTorch (``siamese_core`` only, no Ray, MLflow or ``workflows``), so it runs on a bare GPU
machine, and the loop it times is the Ray job's own (``siamese_core.loop``). In order:

1. **step**: the training step alone (``train_step``) on synthetic images already on the device,
   rows laid out as the loop lays them out (1 original + ``copies`` distorted copies per pair),
   distortions on the device; variants of precision, layout, ``torch.compile`` and batch size.
   Rows/s, ms/step and MFU: the model's FLOPs per training row, counted from its layers
   (``model.training_flops_per_pair``), times rows/s over the device's dense peak.
2. **loop**: one epoch of ``TrainingLoop.train_epoch`` over ``MemoryPairs`` on the device (the
   pairs drawn as the pair stage draws them, gathered on the GPU), against the step rate.
3. **feed**: the pair stage's CPU work per pair (decode on first use, then sampling), and the
   CPU cores it needs to keep the fastest step busy.
4. **train**: the recipe (``--recipe paper-gpu``) under its time budget, selected on the
   validation alphabets, validation accuracy logged against wall-clock time;
5. **test**: the best epoch scored once on the 400 test trials (Lake's protocol, seed 0).

Writes ``--json`` (default ``benchmarks/results/gpu_paper_<date>.json``) with at least ``device``,
``torch``, ``step_rows_per_s``, ``loop_rows_per_s``, ``mfu``, ``train_seconds``,
``val_oneshot_accuracy``, ``test_oneshot_accuracy`` and ``recipe``. ``step_rows_per_s`` and ``mfu``
are the step the loop runs (the recipe's batch, eager, bf16 on a GPU), so ``loop_over_step``
compares like with like; ``best_step`` and ``best_step_mfu`` are the fastest variant's.

    python benchmarks/gpu_paper.py --source OMNIGLOT_DIR                 # on the GPU machine (<= 9 min)
    python benchmarks/gpu_paper.py --source OMNIGLOT_DIR --dry-run       # every part, scaled down, on CPU

The whole script keeps to ``--deadline-s`` (default 540 s, so it fits a 10-minute device call
with start-up to spare): the step variants stop starting after ``--bench-s``, and training gets
the recipe's budget or what the deadline leaves after the test trials' reserve, whichever is less.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from siamese_core import omniglot  # noqa: E402
from siamese_core.config import RECIPES, DistortionConfig, TrainingRecipe, apply_overrides  # noqa: E402
from siamese_core.evaluation import episodes, evaluate_oneshot  # noqa: E402
from siamese_core.images import decode_image  # noqa: E402
from siamese_core.loop import MemoryPairs, TrainingLoop, fit, new_model  # noqa: E402
from siamese_core.model import place_model, training_flops_per_pair  # noqa: E402
from siamese_core.optim import build_optimizer  # noqa: E402
from siamese_core.pairs import unit_pairs  # noqa: E402
from siamese_core.train_step import train_step  # noqa: E402

PEAK_TFLOPS = {  # dense, per precision, from the vendors' data sheets (SXM parts)
    "H200": {"bf16": 989.4, "fp32": 67.0},
    "H100": {"bf16": 989.4, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
}
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "omniglot"


def peak_tflops(device_name: str, precision: str) -> float | None:
    for part, peaks in PEAK_TFLOPS.items():
        if part in device_name:
            return peaks[precision]
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_step(recipe: TrainingRecipe, device: torch.device, rows: int, copies: int, steps: int, warmup: int,
               bf16: bool, channels_last: bool, compile_mode: str | None) -> dict[str, Any]:
    """The training step alone, on ``rows`` rows per step (``rows / (1 + copies)`` pairs, each copied)."""
    cfg = recipe.model
    model = place_model(new_model(cfg, 0), device, channels_last)
    optimizer = build_optimizer(model, recipe.optim)
    step_model = torch.compile(model, mode=compile_mode) if compile_mode else model
    g = torch.Generator(device=device).manual_seed(0)
    size, channels = cfg.input_size, cfg.in_channels
    pool = (torch.rand(4096, channels, size, size, generator=g, device=device) > 0.85).to(torch.uint8) * 255
    mask = (torch.arange(rows, device=device) % (copies + 1)) != 0
    keys = tuple(torch.arange(rows, device=device) + k * rows for k in range(4))
    distort = DistortionConfig() if copies > 0 else None
    autocast = torch.bfloat16 if bf16 else None

    def one_step() -> torch.Tensor:
        idx = torch.randint(0, pool.shape[0], (2, rows), device=device, generator=g)
        same = (torch.rand(rows, device=device, generator=g) > 0.5).float()
        return train_step(step_model, optimizer, pool[idx[0]], pool[idx[1]], same, mask, distort, g,
                          autocast_dtype=autocast, in_batch_negatives=recipe.training.in_batch_negatives,
                          in_batch_hardest=recipe.training.in_batch_hardest,
                          keys=keys)

    for _ in range(warmup):
        one_step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    sync(device)
    seconds = time.perf_counter() - t0
    return {"precision": "bf16" if bf16 else "fp32", "layout": "channels_last" if channels_last else "contiguous",
            "compile": compile_mode or "eager", "rows": rows, "rows_per_s": rows * steps / seconds,
            "ms_per_step": 1000 * seconds / steps}


def bench_loop(recipe: TrainingRecipe, train: Any, device: torch.device, bf16: bool) -> dict[str, Any]:
    """One epoch of the one training loop over pairs drawn and gathered on the device."""
    model = place_model(new_model(recipe.model, 0), device)
    loop = TrainingLoop(recipe, model, build_optimizer(model, recipe.optim), device,
                        autocast_dtype=torch.bfloat16 if bf16 else None)
    pairs = MemoryPairs(train, recipe, device=device)
    loop.train_epoch(0, pairs(0))  # warm-up: kernels chosen, memory pools filled
    sync(device)
    t0 = time.perf_counter()
    trained = loop.train_epoch(1, pairs(1))
    sync(device)
    seconds = time.perf_counter() - t0
    return {"rows": trained["pairs"], "seconds": seconds, "rows_per_s": trained["pairs"] / seconds}


def bench_feed(source: Path, recipe: TrainingRecipe, groups: int) -> dict[str, Any]:
    """The pair stage's CPU work per pair on one core: decoding (first epoch) and sampling (later ones)."""
    raws = [r for r in omniglot.iter_raw_images(source) if r.split == "train"]
    names = sorted({r.alphabet for r in raws})[:groups]
    rows = [r for r in raws if r.alphabet in names]
    cfg = recipe.model
    t0 = time.process_time()
    for r in rows:
        decode_image(r.png, cfg.preprocess, cfg.input_size, path=r.path)
    decode_s = time.process_time() - t0
    label = np.unique([r.character for r in rows], return_inverse=True)[1]
    group = np.asarray([r.alphabet for r in rows])
    source_names = np.asarray([f"{r.drawer:02d}" for r in rows])
    per_group = max(2, recipe.pairs.pairs_per_epoch // 30)
    t0 = time.process_time()
    made = 0
    for name in names:
        keep = np.flatnonzero(group == name)
        made += len(unit_pairs(None, label[keep], recipe.pairs, 0, 0, name, per_group, source=source_names[keep]))
    sample_s = time.process_time() - t0
    return {"images": len(rows), "decode_cpu_s_per_image": decode_s / max(1, len(rows)),
            "pairs": made, "sample_cpu_s_per_pair": sample_s / max(1, made)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the raw Omniglot archives")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="paper-gpu")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override the recipe")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dry-run", action="store_true",
                        help="every part scaled down for a CPU: a small net, a few steps, a short budget")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd steps (default on GPU)")
    parser.add_argument("--json", type=Path, default=None,
                        help="where the figures go (default: benchmarks/results/gpu_paper_<date>.json)")
    parser.add_argument("--deadline-s", type=float, default=540.0,
                        help="the whole script's wall-clock limit; training's budget shrinks to fit (default: %(default)s)")
    parser.add_argument("--bench-s", type=float, default=100.0,
                        help="no step variant starts after this many seconds (default: %(default)s)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    recipe = apply_overrides(RECIPES[args.recipe], dict(item.split("=", 1) for item in args.set))
    # the data's word where the recipe leaves it open, as training takes it from the manifest
    recipe = dataclasses.replace(recipe, pairs=recipe.pairs.resolved(omniglot.OMNIGLOT_NEW_CLASSES))
    if args.dry_run:
        recipe = apply_overrides(recipe, {"model.input_size": 35, "model.channels": "8,16,16,32",
                                          "model.kernels": "3,3,2,2", "model.embedding_dim": 64,
                                          "model.init": "kaiming", "pairs.pairs_per_epoch": 600,
                                          "training.batch_size": 32, "training.time_budget_s": 20,
                                          "training.epochs": 3})
    started = time.perf_counter()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    flops = training_flops_per_pair(recipe.model)
    print(f"device: {name}; torch {torch.__version__}; recipe {args.recipe}: {recipe.model.preset} at "
          f"{recipe.model.input_size} px, {flops:.4g} FLOP per training row (forward + backward)", flush=True)

    # 1. the step: every variant at the recipe's batch first (the loop's reference among them), then
    # the larger batches, until --bench-s is spent
    copies = recipe.pairs.distorted_copies
    steps, warmup = (2, 1) if args.dry_run else (60, 15)
    variants = [(True, False, None), (False, False, None), (True, True, None)]
    if args.compile or (device.type == "cuda" and not args.dry_run):
        variants += [(True, False, "default"), (True, False, "reduce-overhead")]  # reduce-overhead: CUDA graphs
    plan = [(recipe.training.batch_size, v) for v in variants]
    if not args.dry_run:
        plan += [(rows, v) for rows in (512, 1024) if rows > recipe.training.batch_size
                 for v in variants if v[0] and not v[1]]
    step_results = []
    for done, (rows, (bf16, channels_last, compile_mode)) in enumerate(plan):
        if step_results and time.perf_counter() - started > args.bench_s:
            print(f"step: --bench-s {args.bench_s:.0f}s spent; {len(plan) - done} variant(s) not run", flush=True)
            break
        try:
            r = bench_step(recipe, device, rows, copies, steps, warmup, bf16, channels_last, compile_mode)
        except Exception as exc:  # a variant this torch or device cannot run: say so, go on
            print(f"step {rows} rows bf16={bf16} channels_last={channels_last} compile={compile_mode}: "
                  f"failed ({type(exc).__name__}: {str(exc)[:200]})", flush=True)
            continue
        peak = peak_tflops(name, r["precision"])
        r["tflops"] = r["rows_per_s"] * flops / 1e12
        r["mfu"] = r["tflops"] / peak if peak else None
        step_results.append(r)
        print(f"step {r['rows']} rows {r['precision']} {r['layout']} {r['compile']}: {r['rows_per_s']:.0f} rows/s, "
              f"{r['ms_per_step']:.2f} ms/step, {r['tflops']:.1f} TFLOP/s"
              + (f", MFU {r['mfu']:.1%} of {peak:.0f} TFLOP/s" if r["mfu"] is not None else ", peak unknown"),
              flush=True)
    at_batch = [r for r in step_results if r["rows"] == recipe.training.batch_size and r["compile"] == "eager"
                and r["layout"] == "contiguous" and r["precision"] == ("bf16" if device.type == "cuda" else "fp32")]
    best = max(step_results, key=lambda r: r["rows_per_s"])

    # 2. the loop, on the recipe's own batch
    train = omniglot.load_split(args.source, "train", recipe.model.input_size, recipe.model.preprocess.resolved())
    if args.dry_run:
        train = train.take(np.flatnonzero(np.isin(train.group, sorted(set(train.group.tolist()))[:3])))
    loop = bench_loop(recipe, train, device, bf16=device.type == "cuda")
    reference = at_batch[0]["rows_per_s"] if at_batch else best["rows_per_s"]
    print(f"loop: {loop['rows']} rows in {loop['seconds']:.2f}s = {loop['rows_per_s']:.0f} rows/s, "
          f"{loop['rows_per_s'] / reference:.3f} of its own step ({reference:.0f} rows/s)", flush=True)

    # 3. the feed (per-image and per-pair costs: a few alphabets measure them)
    feed = bench_feed(args.source, recipe, groups=2 if args.dry_run else 4)
    pairs_per_core = 1.0 / max(feed["sample_cpu_s_per_pair"], 1e-12)
    cores = best["rows_per_s"] / (1 + copies) / pairs_per_core
    print(f"feed: decoding {feed['decode_cpu_s_per_image'] * 1e3:.2f} ms per image (once), sampling "
          f"{pairs_per_core:.0f} pairs/s per core: the fastest step ({best['rows_per_s']:.0f} rows/s = "
          f"{best['rows_per_s'] / (1 + copies):.0f} pairs/s) needs {cores:.3f} cores of pair stage", flush=True)

    # 4. train under the budget, selected on validation; 5. test once
    val = omniglot.load_split(args.source, "validation", recipe.model.input_size, recipe.model.preprocess.resolved())
    test = omniglot.load_split(args.source, "test", recipe.model.input_size, recipe.model.preprocess.resolved())
    if args.dry_run:
        val = val.take(np.flatnonzero(np.isin(val.group, sorted(set(val.group.tolist()))[:2])))
        test = test.take(np.flatnonzero(np.isin(test.group, sorted(set(test.group.tolist()))[:2])))
    # the test trials and the JSON after training, and the epoch that may end past the budget
    reserve_s = 5.0 if args.dry_run else 45.0
    left_s = args.deadline_s - (time.perf_counter() - started) - reserve_s
    recipe_budget = recipe.training.time_budget_s if recipe.training.time_budget_s is not None else float("inf")
    budget_s = min(recipe_budget, left_s)
    figures = {
        "device": name, "torch": torch.__version__, "recipe": args.recipe, "dry_run": args.dry_run,
        "flops_per_row": flops, "deadline_s": args.deadline_s, "train_budget_s": budget_s,
        "step_rows_per_s": reference, "best_step": best, "steps": step_results,
        "loop_rows_per_s": loop["rows_per_s"], "loop_over_step": loop["rows_per_s"] / reference,
        # MFU of the step the loop runs (the recipe's batch, eager); the best variant's beside it
        "mfu": (at_batch[0] if at_batch else best)["mfu"], "best_step_mfu": best["mfu"],
        "feed": feed, "pair_stage_cores_needed": cores,
    }
    out = args.json or ROOT / "benchmarks" / "results" / f"gpu_paper_{time.strftime('%Y%m%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if budget_s < 1.0:
        out.write_text(json.dumps(figures, indent=1, default=str) + "\n")
        print(f"error: --deadline-s {args.deadline_s:.0f} leaves no time to train (the step, loop and feed "
              f"figures are in {out}); raise it or lower --bench-s", file=sys.stderr)
        return 1
    recipe = dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, time_budget_s=budget_s))
    print(f"train: budget {budget_s:.0f}s ({left_s:.0f}s left of the {args.deadline_s:.0f}s deadline)", flush=True)
    result = fit(recipe, train, val, device, log=lambda m: print(m, flush=True),
                 autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    runs = episodes(test, recipe.evaluation, recipe.training.seed, validation=False)
    scored = evaluate_oneshot(result.model, test, runs)
    print(f"test: {scored.accuracy:.2%} ({scored.correct}/{scored.trials} trials, {runs[0].n_way}-way within "
          f"{len(set(r.group for r in runs))} test alphabets), best epoch {result.best_epoch} of "
          f"{len(result.history)}, validation {result.best_val_oneshot_accuracy:.2%}, trained {result.seconds:.0f}s",
          flush=True)

    figures.update({
        "recipe_values": dataclasses.asdict(recipe),
        "train_seconds": result.seconds, "epochs": len(result.history), "best_epoch": result.best_epoch,
        "val_oneshot_accuracy": result.best_val_oneshot_accuracy, "test_oneshot_accuracy": scored.accuracy,
        "test_trials": scored.trials,
        "time_to_accuracy": [[h["elapsed_seconds"], h["val_oneshot_accuracy"]] for h in result.history],
        "script_seconds": time.perf_counter() - started,
    })
    out.write_text(json.dumps(figures, indent=1, default=str) + "\n")
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
