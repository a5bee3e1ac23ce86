"""The paper's layer-wise SGD: per-layer rate, L2, and a momentum ramp.

Koch et al. give every layer j its own learning rate eta_j (decayed 1% per
epoch), its own L2 weight decay lambda_j, and a momentum that starts at 0.5 and
rises linearly to mu_j. One SGD param group per layer expresses all of that
with the stock optimizer, so checkpoints, schedulers and AMP keep working.
Beyond the paper, :class:`WeightAverage` keeps a moving average of the weights.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

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


class WeightAverage:
    """A moving average of a network's weights (``optim.ema_decay``), kept by torch's ``AveragedModel``
    (buffers included, so batch-norm statistics follow the averaged weights).

    After t updates the decay is min(decay, (1 + t) / (10 + t)), TensorFlow's warm-up rule: a short
    run (a Tune trial of a thousand steps) averages over its recent steps instead of carrying its
    first weights, and a long one ends at ``decay``. The count stays on the host, so no step waits
    for the device.
    """

    def __init__(self, net: nn.Module, decay: float) -> None:
        self.decay, self.steps = decay, 0
        self.model = AveragedModel(net, multi_avg_fn=self._move, use_buffers=True)

    def _move(self, averaged: list[torch.Tensor], current: list[torch.Tensor], count: torch.Tensor) -> None:
        get_ema_multi_avg_fn(min(self.decay, (1 + self.steps) / (10 + self.steps)))(averaged, current, count)

    @property
    def module(self) -> nn.Module:
        return self.model.module

    def update(self, net: nn.Module) -> None:
        """Move the average towards ``net``'s weights (after each optimizer step)."""
        self.model.update_parameters(net)
        self.steps += 1

    def load(self, state_dict: dict[str, torch.Tensor], steps: int) -> None:
        self.model.module.load_state_dict(state_dict)
        self.model.n_averaged.fill_(int(steps))
        self.steps = int(steps)


def weight_average(net: nn.Module, cfg: OptimizerConfig) -> WeightAverage | None:
    """The moving average of ``net``'s weights that ``optim.ema_decay`` asks for, or None."""
    return None if cfg.ema_decay is None else WeightAverage(net, cfg.ema_decay)
