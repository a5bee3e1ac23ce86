"""The paper's layer-wise SGD: per-layer rate, L2, and a momentum ramp.

Koch et al. give every layer j its own learning rate eta_j (decayed 1% per
epoch), its own L2 weight decay lambda_j, and a momentum that starts at 0.5 and
rises linearly to mu_j. One SGD param group per layer expresses all of that
with the stock optimizer, so checkpoints, schedulers and AMP keep working.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import LAYER_NAMES, OptimizerConfig


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """SGD with one param group per layer (key ``"layer"``), set for epoch 0.

    Each group records its base rate (``"base_lr"``) so the epoch schedule is a
    pure function of the epoch: resuming from a checkpoint cannot compound decay.
    """
    groups = []
    for name in LAYER_NAMES:
        params = (model.layer_parameters(name) if hasattr(model, "layer_parameters")
                  else list(getattr(model, name).parameters()))
        groups.append({
            "params": params,
            "layer": name,
            "base_lr": cfg.layer_lr(name),
            "lr": cfg.layer_lr(name),
            "weight_decay": cfg.layer_weight_decay(name),
            "momentum": cfg.momentum_start,
        })
    covered = {id(p) for g in groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    if missing:
        raise ValueError(f"parameters outside the layers {list(LAYER_NAMES)}: {missing}")
    if cfg.algorithm == "adam":
        for group in groups:
            del group["momentum"]
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum_start)


def layer_momentum_at(cfg: OptimizerConfig, layer: str, epoch: int) -> float:
    """Momentum for ``layer`` at 0-based ``epoch``: linear ramp from start to mu_j."""
    ramp = min(1.0, epoch / cfg.momentum_ramp_epochs)
    return cfg.momentum_start + (cfg.layer_momentum(layer) - cfg.momentum_start) * ramp


def layer_lr_at(cfg: OptimizerConfig, layer: str, epoch: int) -> float:
    """Learning rate for ``layer`` at 0-based ``epoch``: eta_j * decay**epoch."""
    return cfg.layer_lr(layer) * cfg.lr_decay ** epoch


def apply_epoch_schedule(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, epoch: int) -> None:
    """Set every group's lr and momentum for 0-based ``epoch`` (call at each epoch start)."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    for group in optimizer.param_groups:
        layer = group["layer"]
        group["lr"] = layer_lr_at(cfg, layer, epoch)
        if "momentum" in group:  # SGD's; Adam has its betas
            group["momentum"] = layer_momentum_at(cfg, layer, epoch)
