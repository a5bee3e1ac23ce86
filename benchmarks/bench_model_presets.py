"""Training throughput (pairs/s) of candidate small presets on this machine's CPU.

Why: the "cpu-small" preset must train in minutes on 2 cores while keeping the
paper's design (4 valid convs, 3 max-pools, sigmoid fc, weighted-L1 head).
This times full training steps (distortions on 8 of 9 rows, forward, backward,
layer-wise SGD) at batch 128 pairs, as the workers run them.

    .venv/bin/python benchmarks/bench_model_presets.py --threads 2

``--compare-layouts`` times the contiguous and the channels-last layout of each
candidate side by side (alternating rounds, so the machine's drift hits both) and
prints their ratio; the demo's own step is

    .venv/bin/python benchmarks/bench_model_presets.py --compare-layouts --candidates cpu-small \
        --batch 32 --no-distort --in-batch-negatives 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from siamese_core.config import DistortionConfig, ModelConfig, OptimizerConfig
from siamese_core.model import build_model, parameter_count, place_model
from siamese_core.optim import build_optimizer
from siamese_core.train_step import train_step

CANDIDATES: dict[str, ModelConfig] = {
    "cpu-small": ModelConfig.from_preset("cpu-small"),
    "s52-c16": ModelConfig(preset="s52-c16", input_size=52, channels=(16, 32, 32, 64),
                           kernels=(5, 4, 3, 2), embedding_dim=256),
    "s52-c8": ModelConfig(preset="s52-c8", input_size=52, channels=(8, 16, 16, 32),
                          kernels=(5, 4, 3, 2), embedding_dim=256),
    "s35-c16k4": ModelConfig(preset="s35-c16k4", input_size=35, channels=(16, 32, 32, 64),
                             kernels=(4, 3, 3, 2), embedding_dim=256),
    "s35-c16": ModelConfig(preset="s35-c16", input_size=35, channels=(16, 32, 32, 64),
                           kernels=(3, 3, 2, 2), embedding_dim=256),
    "s35-c24": ModelConfig(preset="s35-c24", input_size=35, channels=(24, 48, 48, 96),
                           kernels=(3, 3, 2, 2), embedding_dim=384),
    "s35-c32": ModelConfig(preset="s35-c32", input_size=35, channels=(32, 64, 64, 128),
                           kernels=(3, 3, 2, 2), embedding_dim=512),
    "cpu-small-bn": ModelConfig.from_preset("cpu-small", batch_norm=True),
    "s35-c24-bn": ModelConfig(preset="s35-c24-bn", input_size=35, channels=(24, 48, 48, 96),
                              kernels=(3, 3, 2, 2), embedding_dim=384, init="kaiming", batch_norm=True),
    "s35-c32-bn": ModelConfig(preset="s35-c32-bn", input_size=35, channels=(32, 64, 64, 128),
                              kernels=(3, 3, 2, 2), embedding_dim=512, init="kaiming", batch_norm=True),
    "s48-c16-bn": ModelConfig(preset="s48-c16-bn", input_size=48, channels=(16, 32, 32, 64),
                              kernels=(5, 4, 3, 2), embedding_dim=256, init="kaiming", batch_norm=True),
}


class StepTimer:
    """Full training steps of one model on fixed random batches, timed in rounds."""

    def __init__(self, cfg: ModelConfig, batch: int, channels_last: bool, distort: bool,
                 in_batch_negatives: float = 0.0) -> None:
        self.model = place_model(build_model(cfg, seed=0), "cpu", channels_last)
        self.opt = build_optimizer(self.model, OptimizerConfig(lr=1e-3))
        self.g = torch.Generator().manual_seed(0)
        s = cfg.input_size
        self.batch, self.weight = batch, in_batch_negatives
        self.left = (torch.rand(batch, 1, s, s, generator=self.g) > 0.8).float()
        self.right = (torch.rand(batch, 1, s, s, generator=self.g) > 0.8).float()
        self.same = (torch.rand(batch, generator=self.g) > 0.5).float()
        self.mask = torch.arange(batch) % 9 != 0  # 8 distorted copies per original pair
        self.keys = (torch.arange(batch), torch.arange(batch, 2 * batch), torch.arange(batch),
                     torch.arange(batch, 2 * batch))  # every image its own class
        self.dcfg = DistortionConfig() if distort else None
        self.run(2)  # warm-up

    def run(self, steps: int) -> float:
        """Pairs per second over ``steps`` steps."""
        start = time.perf_counter()
        for _ in range(steps):
            train_step(self.model, self.opt, self.left, self.right, self.same, self.mask, self.dcfg, self.g,
                       in_batch_negatives=self.weight, keys=self.keys)
        return self.batch * steps / (time.perf_counter() - start)


def bench(cfg: ModelConfig, batch: int, steps: int, channels_last: bool, distort: bool,
          in_batch_negatives: float = 0.0) -> float:
    """Pairs per second over ``steps`` timed steps (after 2 warm-up steps)."""
    return StepTimer(cfg, batch, channels_last, distort, in_batch_negatives).run(steps)


def compare_layouts(cfg: ModelConfig, batch: int, steps: int, rounds: int, distort: bool,
                    in_batch_negatives: float) -> tuple[float, float]:
    """Median pairs/s of (contiguous, channels-last), ``rounds`` alternating rounds of ``steps`` each."""
    timers = [StepTimer(cfg, batch, layout, distort, in_batch_negatives) for layout in (False, True)]
    rates: list[list[float]] = [[], []]
    for _ in range(rounds):
        for i, timer in enumerate(timers):
            rates[i].append(timer.run(steps))
    return statistics.median(rates[0]), statistics.median(rates[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-distort", action="store_true")
    parser.add_argument("--in-batch-negatives", type=float, default=0.0,
                        help="weight of the in-batch negatives term (the demo recipe: 1)")
    parser.add_argument("--compare-layouts", action="store_true",
                        help="contiguous vs channels-last side by side, alternating rounds")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of --steps per layout (--compare-layouts)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.compare_layouts:
        print(f"torch {torch.__version__}, threads={args.threads}, batch={args.batch} pairs, "
              f"distort={'off' if args.no_distort else 'on'}, in-batch negatives {args.in_batch_negatives}, "
              f"{args.rounds} alternating rounds of {args.steps} steps, medians")
        for name in args.candidates.split(","):
            plain, last = compare_layouts(CANDIDATES[name], args.batch, args.steps, args.rounds,
                                          not args.no_distort, args.in_batch_negatives)
            print(f"{name}: contiguous {plain:.0f} pairs/s, channels_last {last:.0f} pairs/s, "
                  f"ratio {last / plain:.2f}", flush=True)
        return
    print(f"torch {torch.__version__}, threads={args.threads}, batch={args.batch} pairs, "
          f"distort={'off' if args.no_distort else 'on'}, channels_last={args.channels_last}")
    print(f"{'candidate':<10} {'input':>5} {'channels':<18} {'kernels':<13} {'emb':>4} {'feat':>5} "
          f"{'params':>10} {'pairs/s':>8}")
    for name in args.candidates.split(","):
        cfg = CANDIDATES[name]
        n = parameter_count(build_model(cfg))
        rate = bench(cfg, args.batch, args.steps, args.channels_last, not args.no_distort, args.in_batch_negatives)
        feat = cfg.channels[3] * cfg.feature_map_size() ** 2
        print(f"{name:<10} {cfg.input_size:>5} {str(cfg.channels):<18} {str(cfg.kernels):<13} "
              f"{cfg.embedding_dim:>4} {feat:>5} {n:>10,} {rate:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
