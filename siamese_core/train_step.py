"""Plain-PyTorch training and scoring steps, shared by Ray Train workers and benchmarks.

Distortions are applied here, on the batch's device, rather than in the data
stage: on a GPU they are almost free, and the data stage only has to ship
undistorted pairs plus a per-row flag saying which rows are distorted copies.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from .config import DistortionConfig
from .distortions import distort
from .model import SiameseNet


def to_model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Images as float ``(B,C,S,S)`` in [0, 1] on ``device`` (uint8 0..255 and bool accepted;
    ``(B,S,S)`` is one channel)."""
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


PairKeys = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""``(left_class, right_class, left_image, right_image)``: int64 keys of a batch's classes and images,
shipped by the pair stage beside the pixels (``siamese_core.pairs.name_keys``)."""


_PAIRINGS: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def in_batch_negative_pairings(keys: PairKeys) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every pairing ``(i, j)``, ``i < j``, of the batch's ``2B`` images (left then right), and which of
    them can be trained as "different" pairs (a bool mask).

    Why: one batched twin pass embeds ``2B`` images, but the paper's loss uses only ``B`` of
    their ``B(2B-1)`` pairings; the head is cheap, so scoring the others as negatives adds
    training signal at little cost. Kept are pairings of two different classes (the classes
    are known from the keys, so two images of one class in one batch are never trained as
    "different"), and not those within one pair or between two rows holding the same pair (a
    pair and its distorted copies). A mask rather than the kept pairings themselves: every
    batch has the same pairings, so nothing waits for the device to count them.
    """
    left_class, right_class, left_image, right_image = keys
    b = left_class.shape[0]
    key = (b, str(left_class.device))
    if key not in _PAIRINGS:
        _PAIRINGS[key] = tuple(torch.triu_indices(2 * b, 2 * b, offset=1, device=left_class.device))  # type: ignore[assignment]
    i, j = _PAIRINGS[key]
    image_class = torch.cat([left_class, right_class])
    pair_key = left_image * 1_000_003 + right_image  # may wrap around; still equal for equal pairs
    keep = (pair_key[i % b] != pair_key[j % b]) & (image_class[i] != image_class[j])
    return i, j, keep


_KEY_STEP = 0x9E3779B97F4A7C15 - (1 << 64)
"""An odd int64 step between the keys of a class's new classes (wraps around; equal keys stay equal)."""


def _dihedral(x: torch.Tensor, kind: int) -> torch.Tensor:
    """``x`` turned by ``kind % 4`` quarter turns, mirrored first when ``kind >= 4``."""
    if kind >= 4:
        x = x.flip(-1)
    return torch.rot90(x, kind % 4, dims=(-2, -1)) if kind % 4 else x


def new_class_views(left: torch.Tensor, right: torch.Tensor, kinds: int, generator: torch.Generator | None,
                    keys: PairKeys | None = None) -> tuple[torch.Tensor, torch.Tensor, PairKeys | None]:
    """Each pair turned (and mirrored, for ``kinds`` 8) as one of ``kinds`` new classes, both images alike.

    A pair's label holds under the turn: two images of one class stay one (new) class, two
    classes stay two. The keys follow, so a class turned two ways counts as two classes among
    the in-batch negatives. ``kinds`` 1 returns everything unchanged. Images must be square.
    """
    if kinds <= 1:
        return left, right, keys
    b = left.shape[0]
    device = left.device
    kind = torch.randint(0, kinds, (b,), generator=generator, device=generator.device if generator else device)
    kind = kind.to(device)
    out_left, out_right = left, right
    for k in range(1, kinds):
        rows = (kind == k).view(-1, 1, 1, 1)
        out_left = torch.where(rows, _dihedral(left, k), out_left)
        out_right = torch.where(rows, _dihedral(right, k), out_right)
    if keys is not None:
        shift = kind.to(keys[0].device) * _KEY_STEP
        keys = tuple(k + shift for k in keys)  # type: ignore[assignment]
    return out_left, out_right, keys


def hardest_pairings(losses: torch.Tensor, weight: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``ceil(share * n)`` highest of ``losses`` among those with ``weight`` 1, and their weights.

    Pairings that may not be trained (weight 0) rank below every loss (a loss is >= 0), so they
    are chosen only when fewer than that many may be trained, and then keep weight 0. One
    ``topk`` of a fixed size: nothing waits for the device to count the trainable pairings.
    """
    k = max(1, math.ceil(share * losses.numel()))
    ranked, index = torch.where(weight > 0, losses, -1.0).topk(k, sorted=False)
    return ranked, weight.index_select(0, index)


def train_step(model: SiameseNet, optimizer: torch.optim.Optimizer, left: torch.Tensor,
               right: torch.Tensor, same: torch.Tensor, distort_mask: torch.Tensor | None = None,
               distort_cfg: DistortionConfig | None = None, generator: torch.Generator | None = None,
               autocast_dtype: torch.dtype | None = None, in_batch_negatives: float = 0.0,
               keys: PairKeys | None = None, new_classes: int = 1, in_batch_hardest: float = 1.0) -> torch.Tensor:
    """One SGD step on a batch of pairs; returns the mean BCE loss of the pairs (before the step).

    The loss comes back as a detached tensor on the model's device, not a float: reading it
    would wait for the device every step, so callers add the losses up and read them once.
    ``same`` is 1.0 for same-class pairs, 0.0 otherwise. When ``distort_cfg`` is
    given, rows where ``distort_mask`` is True (all rows when it is None) get
    an independent random affine transform for the left and for the right image.
    ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the forward pass under
    autocast; the loss is always computed in float32. ``in_batch_negatives > 0``
    adds that weight times the mean BCE of the batch's other pairings
    (:func:`in_batch_negative_pairings`, which needs the pairs' ``keys``) labelled
    "different"; 0 is the paper's loss; ``in_batch_hardest`` < 1 trains only that share of
    them, the highest-loss ones (:func:`hardest_pairings`). ``new_classes`` > 1 trains each
    pair as one of that many turned or mirrored classes (:func:`new_class_views`; 1: as it is).
    """
    if in_batch_negatives < 0:
        raise ValueError(f"in_batch_negatives must be >= 0, got {in_batch_negatives}")
    if in_batch_negatives > 0 and keys is None:
        raise ValueError("in-batch negatives need the pairs' class and image keys (keys=...)")
    device = next(model.parameters()).device
    model.train()
    left, right = to_model_input(left, device), to_model_input(right, device)
    target = same.to(device, non_blocking=True).float().view(-1)
    left, right, keys = new_class_views(left, right, new_classes, generator, keys)
    pairings = keep = None
    if in_batch_negatives > 0:
        assert keys is not None
        i, j, keep = in_batch_negative_pairings(tuple(k.to(device, non_blocking=True) for k in keys))  # type: ignore[arg-type]
        pairings = (i, j)
    if distort_cfg is not None:
        left = distort(left, distort_cfg, generator, mask=distort_mask)
        right = distort(right, distort_cfg, generator, mask=distort_mask)
    with _autocast(device, autocast_dtype):
        if pairings is None:
            logits, others = model(left, right), None
        else:
            logits, others = model(left, right, pairings)
    loss = F.binary_cross_entropy_with_logits(logits.float(), target)
    total = loss
    if others is not None and keep is not None:
        weight = keep.float()
        per_pairing = F.binary_cross_entropy_with_logits(others.float(), torch.zeros_like(weight), reduction="none")
        if in_batch_hardest < 1.0:
            per_pairing, weight = hardest_pairings(per_pairing, weight, in_batch_hardest)
        total = loss + in_batch_negatives * (per_pairing * weight).sum() / weight.sum().clamp_min(1.0)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def indexed_pair_logits(model: SiameseNet, images: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                        batch_size: int = 1024) -> torch.Tensor:
    """Logits ``(N,)`` for pairs given as row indices into ``images``, each distinct image embedded once.

    Why: fixed validation pairs reuse images (Omniglot's 2,000 validation pairs name 2,811
    distinct images in their 4,000 slots), and the twin is the cost; the head is cheap.
    Eval mode, in chunks; restores the previous mode.
    """
    device = next(model.parameters()).device
    rows, slot = torch.unique(torch.cat([left.view(-1), right.view(-1)]).to(images.device), return_inverse=True)
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for i in range(0, rows.numel(), batch_size):
            chunks.append(model.embed(to_model_input(images[rows[i:i + batch_size]], device)))
        h = torch.cat(chunks) if chunks else torch.zeros(0, model.config.embedding_dim, device=device)
        slot = slot.to(device)
        n = left.numel()
        return model.head_logits(h[slot[:n]], h[slot[n:]])
    finally:
        model.train(was_training)


def verification_accuracy(model: SiameseNet, images: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                          same: torch.Tensor, batch_size: int = 1024) -> float:
    """Fraction of pairs (row indices into ``images``) classified right with threshold 0.5
    on p (i.e. logit > 0)."""
    logits = indexed_pair_logits(model, images, left, right, batch_size=batch_size)
    predicted = logits > 0
    return float((predicted == (same.to(logits.device).view(-1) > 0.5)).float().mean())
