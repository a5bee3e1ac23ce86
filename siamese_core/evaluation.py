"""A model scored on one-shot episodes and verification pairs, and the validator that selects epochs.

Design notes (why, not what):

* One-shot scoring embeds each needed image *once* per evaluation and scores
  query/support pairs with ``pairwise_logits`` on the cached embeddings: the
  twin is the expensive part, the weighted-L1 head is cheap.
* Validation is fixed once per run (pairs and episodes drawn with
  :data:`VALIDATION_SEED`), so epochs and configurations are compared on the
  same trials. Early stopping and model selection only ever look at the
  validation split; the test split is for the final report only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .config import EvaluationConfig, OneShotConfig, PairConfig
from .images import LabelledImages
from .model import SiameseNet, with_test_time_shift
from .oneshot import OneShotResult, OneShotRun, ScoreFn, make_episodes, max_n_way, score_runs
from .pairs import Negatives, PairSet, sample_pairs
from .train_step import to_model_input, verification_accuracy

VALIDATION_SEED = 2015
"""Seed of the fixed validation pairs and one-shot episodes (the same for every run)."""

VALIDATION_PAIRS = 2_000
"""Validation verification pairs (half same, half different within one group)."""

Images = torch.Tensor | np.ndarray


def _as_tensor(images: Images) -> torch.Tensor:
    return images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))


@torch.no_grad()
def embed_images(model: SiameseNet, images: Images, device: torch.device | str | None = None,
                 batch_size: int = 512) -> torch.Tensor:
    """Scoring embeddings ``[N, D]`` of uint8 or float images ``[N,C,S,S]`` (or ``[N,S,S]``), eval mode.

    ``model.scoring_embed``: with the model's test-time views, if it has any.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    images = _as_tensor(images)
    was_training = model.training
    model.eval()
    try:
        out = [model.scoring_embed(to_model_input(images[i:i + batch_size], device))
               for i in range(0, images.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, model.config.embedding_dim), device=device)


def embedding_score_fn(model: SiameseNet, images: Images, device: torch.device | str | None = None,
                       batch_size: int = 512, rows: Sequence[int] | np.ndarray | None = None) -> ScoreFn:
    """A :data:`~siamese_core.oneshot.ScoreFn` (logits, higher = more similar) for ``score_runs``.

    Embeds the images once, now: all rows, or only ``rows`` when given (the
    rows the episodes need); the returned function then only runs the head on
    cached embeddings. Take a new one after the weights change.
    """
    images = _as_tensor(images)
    if rows is None:
        index = None
        h = embed_images(model, images, device, batch_size)
    else:
        needed = np.unique(np.asarray(rows, dtype=np.int64))
        index = np.full(images.shape[0], -1, dtype=np.int64)
        index[needed] = np.arange(needed.size)
        h = embed_images(model, images[torch.from_numpy(needed).to(images.device)], device, batch_size)

    def lookup(r: np.ndarray) -> torch.Tensor:
        r = np.asarray(r, dtype=np.int64)
        if index is not None:
            r = index[r]
            if (r < 0).any():
                raise KeyError("score_fn asked for rows that were not embedded")
        return h[torch.from_numpy(r).to(h.device)]

    @torch.no_grad()
    def score(query_rows: np.ndarray, support_rows: np.ndarray) -> np.ndarray:
        logits = model.pairwise_logits(lookup(query_rows), lookup(support_rows))
        return logits.float().cpu().numpy().astype(np.float64)

    return score


def runs_rows(runs: Sequence[OneShotRun]) -> np.ndarray:
    """Every row index used by the runs (supports and queries), sorted, unique."""
    return np.unique(np.concatenate([np.concatenate([r.support, r.queries]) for r in runs]))


def evaluate_oneshot(model: SiameseNet, images: LabelledImages | Images, runs: Sequence[OneShotRun],
                     device: torch.device | str | None = None, batch_size: int = 512) -> OneShotResult:
    """Score one-shot ``runs`` (row indices into ``images``) with the model's similarity."""
    pixels = images.images if isinstance(images, LabelledImages) else images
    return score_runs(runs, embedding_score_fn(model, pixels, device, batch_size, rows=runs_rows(runs)))


def episodes(images: LabelledImages, evaluation: EvaluationConfig, seed: int, validation: bool) -> list[OneShotRun]:
    """The split's one-shot episodes as the recipe's evaluation section asks (within groups, across sources)."""
    cfg = episode_config(images, evaluation, validation)
    return make_episodes(images.label, cfg, seed, group=images.group, source=images.source)


def episode_config(images: LabelledImages, evaluation: EvaluationConfig, validation: bool) -> OneShotConfig:
    """``evaluation.episodes`` for this split: N as large as its groups allow, unless the config says."""
    return evaluation.episodes(images.group is not None,
                               max_n_way(images.label, evaluation.k_shot, images.group), validation)


def validation_model(model: SiameseNet, validation_views: str) -> SiameseNet:
    """The model as the per-epoch validation scores it: with its own views ("model") or one ("single").

    Why "single": selection only needs to rank epochs, and the final scores use the model's
    views anyway; each view costs one more embedding of every image.
    """
    if validation_views == "model" or not model.config.test_time_shift_px:
        return model
    if validation_views != "single":
        raise ValueError(f"validation_views must be 'model' or 'single', got {validation_views!r}")
    return with_test_time_shift(model, 0)


def fixed_validation_pairs(images: LabelledImages, n_pairs: int = VALIDATION_PAIRS, seed: int = VALIDATION_SEED,
                           negatives: Negatives = "same_group") -> PairSet:
    """Validation verification pairs, drawn once from every source of the split, undistorted."""
    cfg = PairConfig(pairs_per_epoch=n_pairs, distorted_copies=0)
    return sample_pairs(images.group, images.label, cfg, seed=seed, epoch=0, source=images.source,
                        negatives=negatives)


class Validator:
    """The validation split's fixed verification pairs and one-shot episodes, on the training device.

    Built once per run by the process that validates (rank 0 of a Ray Train job, or the
    plain loop), so every epoch and every configuration is scored on the same trials.
    """

    def __init__(self, images: LabelledImages, evaluation: EvaluationConfig, device: torch.device | str,
                 negatives: Negatives = "same_group", views: str = "model") -> None:
        self.device = torch.device(device)
        self.views = views
        self.images = torch.from_numpy(np.ascontiguousarray(images.images)).to(self.device)
        pairs = fixed_validation_pairs(images, negatives=negatives)
        self.left, self.right = torch.from_numpy(pairs.left), torch.from_numpy(pairs.right)
        self.same = torch.from_numpy(pairs.same)
        self.runs = episodes(images, evaluation, VALIDATION_SEED, validation=True)

    @property
    def trials(self) -> int:
        return int(sum(r.queries.size for r in self.runs))

    def evaluate(self, model: SiameseNet) -> dict[str, float]:
        """Verification accuracy, and one-shot accuracy scored with the validation views."""
        oneshot = evaluate_oneshot(validation_model(model, self.views), self.images, self.runs, self.device)
        verification = verification_accuracy(model, self.images, self.left, self.right, self.same)
        return {"val_verification_accuracy": verification, "val_oneshot_accuracy": oneshot.accuracy}
