"""Training throughput (pairs/s) of candidate small presets on this machine's CPU.

Why: the "cpu-small" preset must train in minutes on 2 cores while keeping the
paper's design (4 valid convs, 3 max-pools, sigmoid fc, weighted-L1 head).
This times full training steps (distortions on 8 of 9 rows, forward, backward,
layer-wise SGD) at batch 128 pairs, as the workers run them.

    .venv/bin/python benchmarks/bench_model_presets.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from siamese_core.config import DistortionConfig, ModelConfig, OptimizerConfig
from siamese_core.model import build_model, parameter_count
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


def bench(cfg: ModelConfig, batch: int, steps: int, channels_last: bool, distort: bool) -> float:
    """Pairs per second over ``steps`` timed steps (after 2 warm-up steps)."""
    model = build_model(cfg, seed=0)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3))
    g = torch.Generator().manual_seed(0)
    s = cfg.input_size
    left = (torch.rand(batch, 1, s, s, generator=g) > 0.8).float()
    right = (torch.rand(batch, 1, s, s, generator=g) > 0.8).float()
    same = (torch.rand(batch, generator=g) > 0.5).float()
    mask = torch.arange(batch) % 9 != 0  # 8 distorted copies per original pair
    dcfg = DistortionConfig() if distort else None
    for _ in range(2):
        train_step(model, opt, left, right, same, mask, dcfg, g)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, opt, left, right, same, mask, dcfg, g)
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-distort", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads={args.threads}, batch={args.batch} pairs, "
          f"distort={'off' if args.no_distort else 'on'}, channels_last={args.channels_last}")
    print(f"{'candidate':<10} {'input':>5} {'channels':<18} {'kernels':<13} {'emb':>4} {'feat':>5} "
          f"{'params':>10} {'pairs/s':>8}")
    for name in args.candidates.split(","):
        cfg = CANDIDATES[name]
        n = parameter_count(build_model(cfg))
        rate = bench(cfg, args.batch, args.steps, args.channels_last, not args.no_distort)
        feat = cfg.channels[3] * cfg.feature_map_size() ** 2
        print(f"{name:<10} {cfg.input_size:>5} {str(cfg.channels):<18} {str(cfg.kernels):<13} "
              f"{cfg.embedding_dim:>4} {feat:>5} {n:>10,} {rate:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
