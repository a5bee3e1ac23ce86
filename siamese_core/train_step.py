"""Plain-PyTorch training and scoring steps, shared by Ray Train workers and benchmarks.

Distortions are applied here, on the batch's device, rather than in the data
stage: on a GPU they are almost free, and the data stage only has to ship
undistorted pairs plus a per-row flag saying which rows are distorted copies.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .config import DistortionConfig
from .distortions import distort
from .model import SiameseNet


def to_model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Images as float ``(B,1,S,S)`` in [0, 1] on ``device`` (uint8 0..255 and bool accepted)."""
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = images.float().div_(255.0)
    elif not images.is_floating_point():
        images = images.float()
    if images.dim() == 3:
        images = images.unsqueeze(1)
    return images


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(model: SiameseNet, optimizer: torch.optim.Optimizer, left: torch.Tensor,
               right: torch.Tensor, same: torch.Tensor, distort_mask: torch.Tensor | None = None,
               distort_cfg: DistortionConfig | None = None, generator: torch.Generator | None = None,
               autocast_dtype: torch.dtype | None = None) -> float:
    """One SGD step on a batch of pairs; returns the mean BCE loss (before the step).

    ``same`` is 1.0 for same-class pairs, 0.0 otherwise. When ``distort_cfg`` is
    given, rows where ``distort_mask`` is True (all rows when it is None) get
    an independent random affine transform for the left and for the right image.
    ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the forward pass under
    autocast; the loss is always computed in float32.
    """
    device = next(model.parameters()).device
    model.train()
    left, right = to_model_input(left, device), to_model_input(right, device)
    target = same.to(device, non_blocking=True).float().view(-1)
    if distort_cfg is not None:
        left = distort(left, distort_cfg, generator, mask=distort_mask)
        right = distort(right, distort_cfg, generator, mask=distort_mask)
    with _autocast(device, autocast_dtype):
        logits = model(left, right)
    loss = F.binary_cross_entropy_with_logits(logits.float(), target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def predict_logits(model: SiameseNet, left: torch.Tensor, right: torch.Tensor,
                   batch_size: int = 1024, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logits ``(N,)`` for N pairs, in eval mode and in chunks (restores the previous mode)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(0, left.shape[0], batch_size):
            l = to_model_input(left[i:i + batch_size], device)
            r = to_model_input(right[i:i + batch_size], device)
            with _autocast(device, autocast_dtype):
                out.append(model(l, r).float())
        return torch.cat(out) if out else torch.zeros(0, device=device)
    finally:
        model.train(was_training)


def verification_accuracy(model: SiameseNet, left: torch.Tensor, right: torch.Tensor,
                          same: torch.Tensor, batch_size: int = 1024) -> float:
    """Fraction of pairs classified right with threshold 0.5 on p (i.e. logit > 0)."""
    logits = predict_logits(model, left, right, batch_size=batch_size)
    predicted = logits > 0
    return float((predicted == (same.to(logits.device).view(-1) > 0.5)).float().mean())
