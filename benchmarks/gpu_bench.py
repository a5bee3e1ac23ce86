"""Training-step throughput of the paper's network on one GPU, and whether the CPU data stage keeps up.

Plain PyTorch only: imports ``siamese_core`` (and pyarrow, when reading shards),
never Ray, MLflow or ``workflows``, so it runs on a bare GPU machine with
Python + torch.

1. Training step (``siamese_core.train_step.train_step``, what Ray Train
   workers run): ``--batch`` pairs per step, the rows laid out as
   ``expand_copies`` does (1 original + ``--copies`` distorted copies, paper: 8),
   affine distortions on the device, layer-wise SGD; images live on the device
   as uint8. Variants: fp32 / bf16 autocast x contiguous / channels_last.
   Timed over ``--steps`` steps after ``--warmup`` steps, with a device sync
   at both ends (``train_step`` itself returns the loss as a float, a sync per
   step, as in training).
2. Data stage: the pair stage's CPU work (``workflows.data.PairStage``:
   per alphabet, ``sample_pairs`` then PNG decode + resize of the images the
   pairs need; the first epoch's work: later epochs take decoded rows from the
   stage's cache), in one process on one core, from the training shards (pyarrow)
   or the raw zips (``siamese_core.omniglot.iter_raw_images``), or synthetic
   PNGs when neither is there. Each produced pair becomes ``1 + copies``
   training rows on the device, so one core feeds ``rate x (1 + copies)``
   rows/s; the script prints how many cores the fastest GPU variant needs.

    python benchmarks/gpu_bench.py                         # koch preset on cuda
    python benchmarks/gpu_bench.py --device cpu --quick    # smoke run (CI)

Output lines (stable, for tests and logs)::

    step <fp32|bf16> <contiguous|channels_last>: <rate> pairs/s (<ms> ms/step)
    data: <rate> pairs/s per core (<rows> training pairs/s per core with <c> copies) from <source>
    feed: best step <variant> <rate> pairs/s needs <n> CPU cores of pair stage
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from siamese_core.config import MODEL_PRESETS, DistortionConfig, OptimizerConfig, PairConfig  # noqa: E402
from siamese_core.fit import new_model  # noqa: E402
from siamese_core.omniglot import decode_png  # noqa: E402
from siamese_core.optim import build_optimizer  # noqa: E402
from siamese_core.pairs import sample_pairs  # noqa: E402
from siamese_core.train_step import train_step  # noqa: E402

DEFAULT_SHARDS = ROOT / "data" / "omniglot-shards"
DEFAULT_RAW = ROOT.parent / "shared" / "data" / "omniglot"


# --------------------------------------------------------------------------- training step

def synthetic_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 ``[n, size, size]`` sparse 'ink' images (content does not change the step's cost)."""
    return ((torch.rand(n, size, size, generator=generator) > 0.85).to(torch.uint8) * 255)


def bench_step(preset: str, device: torch.device, batch: int, copies: int, steps: int, warmup: int,
               bf16: bool, channels_last: bool, seed: int = 0) -> dict[str, Any]:
    cfg = MODEL_PRESETS[preset]
    model = new_model(cfg, seed).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, OptimizerConfig())
    g_cpu = torch.Generator().manual_seed(seed)
    pool = synthetic_images(4096, cfg.input_size, g_cpu).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    n_pool = pool.shape[0]
    # Rows as expand_copies lays them out: one original and `copies` distorted copies per pair.
    mask = (torch.arange(batch, device=device) % (copies + 1)) != 0
    distort_cfg = DistortionConfig() if copies > 0 else None
    autocast = torch.bfloat16 if bf16 else None

    def one_step() -> None:
        idx = torch.randint(0, n_pool, (2, batch), device=device, generator=generator)
        same = (torch.rand(batch, device=device, generator=generator) > 0.5).float()
        train_step(model, optimizer, pool[idx[0]], pool[idx[1]], same, mask, distort_cfg, generator,
                   autocast_dtype=autocast)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        one_step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    sync()
    seconds = time.perf_counter() - t0
    return {"precision": "bf16" if bf16 else "fp32", "layout": "channels_last" if channels_last else "contiguous",
            "pairs_per_s": batch * steps / seconds, "ms_per_step": 1000 * seconds / steps}


# --------------------------------------------------------------------------- data stage

def _blocks_from_shards(path: Path, limit: int | None) -> Iterator[dict[str, np.ndarray]]:
    import pyarrow.parquet as pq

    manifest = json.loads((path / "manifest.json").read_text())
    for shard in [s for s in manifest["shards"] if s["split"] == "train"][:limit]:
        t = pq.read_table(path / shard["path"], columns=["image", "image_id", "alphabet", "character", "drawer"])
        yield {c: np.asarray(t.column(c).to_pylist(), dtype=object if c == "image" else None) for c in t.column_names}


def _blocks_from_raw(path: Path, limit: int | None) -> Iterator[dict[str, np.ndarray]]:
    from siamese_core.omniglot import iter_raw_images

    current: list = []
    seen = 0
    for raw in iter_raw_images(path):
        if raw.split != "train":
            continue
        if current and raw.alphabet != current[0].alphabet:
            yield _block(current)
            seen += 1
            if limit is not None and seen >= limit:
                return
            current = []
        current.append(raw)
    if current:
        yield _block(current)


def _block(rows: list) -> dict[str, np.ndarray]:
    return {"image": np.asarray([r.png for r in rows], dtype=object),
            "image_id": np.asarray([r.path for r in rows]), "alphabet": np.asarray([r.alphabet for r in rows]),
            "character": np.asarray([r.character for r in rows], dtype=np.int32),
            "drawer": np.asarray([r.drawer for r in rows], dtype=np.int8)}


def _blocks_synthetic(limit: int | None, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Alphabets of random-stroke 105x105 PNGs (40 characters x 20 drawers), when no data is at hand."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for a in range(limit or 30):
        pngs, chars, drawers = [], [], []
        for c in range(40):
            for d in range(1, 21):
                img = Image.new("L", (105, 105), 255)
                draw = ImageDraw.Draw(img)
                for _ in range(3):
                    draw.line([tuple(rng.integers(10, 95, 2)) for _ in range(4)], fill=0, width=3)
                buf = io.BytesIO()
                img.convert("1").save(buf, format="PNG")
                pngs.append(buf.getvalue())
                chars.append(a * 100 + c)
                drawers.append(d)
        yield {"image": np.asarray(pngs, dtype=object), "image_id": np.asarray([f"syn/{i}" for i in range(len(pngs))]),
               "alphabet": np.asarray([f"synthetic{a:02d}"] * len(pngs)),
               "character": np.asarray(chars, dtype=np.int32), "drawer": np.asarray(drawers, dtype=np.int8)}


def pair_stage_block(block: dict[str, np.ndarray], pairs_per_alphabet: int, size: int, seed: int,
                     epoch: int, drawers: tuple[int, ...]) -> int:
    """``PairStage.pairs_for_alphabet``'s work for one alphabet block; returns the pairs made."""
    cfg = PairConfig(pairs_per_epoch=max(2, pairs_per_alphabet), distorted_copies=0, drawers=drawers)
    rows = np.flatnonzero(np.isin(block["drawer"], drawers))
    pairs = sample_pairs(block["alphabet"][rows], block["character"][rows], cfg, seed=seed, epoch=epoch,
                         drawer=block["drawer"][rows])
    needed = np.unique(np.concatenate([pairs.left, pairs.right]))
    decoded = np.zeros((len(rows), size, size), dtype=np.uint8)
    for i in needed:
        row = rows[i]
        decoded[i] = np.rint(decode_png(block["image"][row], path=str(block["image_id"][row]), size=size)
                             * 255.0).astype(np.uint8)
    left, right = decoded[pairs.left], decoded[pairs.right]  # the stage's output arrays
    return int(min(left.shape[0], right.shape[0]))


def bench_data(source: str, size: int, pairs_per_alphabet: int, alphabets: int | None,
               seed: int = 0) -> dict[str, Any]:
    """Single-core pair-stage throughput (reading the blocks is not timed; the stage gets them as blocks)."""
    path = Path(source) if source not in ("auto", "synthetic") else None
    if source == "auto":
        if (DEFAULT_SHARDS / "manifest.json").is_file():
            path = DEFAULT_SHARDS
        elif (DEFAULT_RAW / "images_background.zip").is_file():
            path = DEFAULT_RAW
    blocks: Iterator[dict[str, np.ndarray]]
    if path is None:
        blocks, where = _blocks_synthetic(alphabets, seed), "synthetic PNGs"
    elif (path / "manifest.json").is_file():
        try:
            import pyarrow  # noqa: F401
            blocks, where = _blocks_from_shards(path, alphabets), f"shards {path}"
        except ImportError:
            if not (DEFAULT_RAW / "images_background.zip").is_file():
                raise SystemExit("pyarrow is not installed; pass --source with the raw Omniglot zips")
            blocks, where = _blocks_from_raw(DEFAULT_RAW, alphabets), f"raw zips {DEFAULT_RAW}"
    else:
        blocks, where = _blocks_from_raw(path, alphabets), f"raw zips {path}"
    loaded = list(blocks)
    drawers = PairConfig().drawers
    t0 = time.process_time()
    w0 = time.perf_counter()
    pairs = sum(pair_stage_block(b, pairs_per_alphabet, size, seed, 0, drawers) for b in loaded)
    cpu = time.process_time() - t0
    wall = time.perf_counter() - w0
    # CPU time, not wall time: on a shared machine wall time counts other processes' turns too.
    return {"pairs": pairs, "alphabets": len(loaded), "cpu_seconds": cpu, "wall_seconds": wall,
            "pairs_per_s_per_core": pairs / max(cpu, 1e-9), "source": where}


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a few steps, small preset, 2 alphabets (smoke test)")
    parser.add_argument("--preset", choices=sorted(MODEL_PRESETS), help="default: koch (cpu-small with --quick)")
    parser.add_argument("--batch", type=int, default=None, help="training rows per step (paper: 128; --quick: 36)")
    parser.add_argument("--copies", type=int, default=8, help="distorted copies per pair (paper: 8)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--source", default="auto",
                        help="data for the pair-stage probe: shard dir, raw Omniglot dir, 'synthetic' or 'auto'")
    parser.add_argument("--pairs-per-alphabet", type=int, default=1000,
                        help="pairs the stage draws per alphabet (paper: 30k/30 = 1000)")
    parser.add_argument("--alphabets", type=int, default=None, help="alphabets in the data probe (default all 30)")
    parser.add_argument("--variants", default="fp32,bf16", help="precisions to time (comma-separated)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    preset = args.preset or ("cpu-small" if args.quick else "koch")
    args.batch = args.batch or (36 if args.quick else 128)
    steps = args.steps or (2 if args.quick else 200)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 20)
    alphabets = args.alphabets or (1 if args.quick else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
        torch.backends.cudnn.allow_tf32 = False
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    cfg = MODEL_PRESETS[preset]
    print(f"device: {name}; torch {torch.__version__}; preset {preset} ({cfg.input_size}px); batch {args.batch} "
          f"rows/step, {args.copies} distorted copies per pair; {steps} steps after {warmup} warm-up", flush=True)

    results = []
    for precision in args.variants.split(","):
        for channels_last in (False, True):
            r = bench_step(preset, device, args.batch, args.copies, steps, warmup,
                           bf16=precision == "bf16", channels_last=channels_last)
            results.append(r)
            print(f"step {r['precision']} {r['layout']}: {r['pairs_per_s']:.0f} pairs/s "
                  f"({r['ms_per_step']:.2f} ms/step)", flush=True)
    best = max(results, key=lambda r: r["pairs_per_s"])

    data = bench_data(args.source, cfg.input_size, args.pairs_per_alphabet, alphabets)
    rows_per_core = data["pairs_per_s_per_core"] * (1 + args.copies)
    print(f"data: {data['pairs_per_s_per_core']:.0f} pairs/s per core ({rows_per_core:.0f} training pairs/s per "
          f"core with {args.copies} copies) from {data['source']} ({data['alphabets']} alphabets, "
          f"{data['pairs']} pairs, {data['cpu_seconds']:.2f} CPU s)", flush=True)
    cores = best["pairs_per_s"] / max(rows_per_core, 1e-9)
    print(f"feed: best step {best['precision']} {best['layout']} {best['pairs_per_s']:.0f} pairs/s needs "
          f"{cores:.2f} CPU cores of pair stage (ceil {math.ceil(cores)}); "
          f"this machine has {os.cpu_count()} cores", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "preset": preset, "steps": results, "data": data,
                                               "cores_needed": cores}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
