"""Re-identification as retrieval: each query ranked against a gallery of known individuals, scored by MAP@5.

The humpback-whale task, and the lion set's: a query is an image of an individual; the
gallery holds every known individual's images; the answer is the top 5 distinct labels,
scored by MAP@5 (Kaggle's); an individual the gallery has not got must come back as
:data:`NEW`, inserted where the score falls below a threshold chosen on validation.

The protocol on a split (:func:`reid_trials`): a seeded share of its classes is held out
of the gallery, as new individuals; every image of a known class with at least one other
image is a query against the gallery of all the known classes' images but itself
(leave-one-out); every image of a held-out class, and of the data set's unknown label
(``new_whale``), is a query whose truth is :data:`NEW`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .evaluation import embed_images
from .images import LabelledImages
from .model import SiameseNet
from .retrieval import choose_threshold, head_parameters, insert_new, map_at_k, search_labels, threshold_curve, \
    top_k_accuracy

NEW = "new"
"""The label of an individual the gallery has not got."""


@dataclass(frozen=True)
class ReidTrials:
    """A split's gallery and queries: row indices into its images, and each query's true label."""

    gallery: np.ndarray  # int64 rows of the known classes' images
    queries: np.ndarray  # int64 rows
    truth: np.ndarray  # object: the query's class name, or NEW
    new_classes: tuple[str, ...]

    @property
    def new_queries(self) -> int:
        return int((self.truth == NEW).sum())


def reid_trials(images: LabelledImages, new_share: float, seed: int, unknown_label: str | None = None) -> ReidTrials:
    """The split's retrieval protocol (module docstring); deterministic in ``seed``."""
    names = images.label_names
    if NEW in set(names.tolist()) and unknown_label != NEW:
        raise ValueError(f"a class is named {NEW!r}, the label of new individuals; rename it")
    unknown = names == unknown_label if unknown_label is not None else np.zeros(len(images), bool)
    classes = np.asarray(sorted(set(names[~unknown].tolist())), dtype=object)
    n_new = int(round(new_share * classes.size))
    if new_share > 0 and classes.size >= 2:
        n_new = max(1, min(n_new, classes.size - 1))
    picked = np.random.default_rng(np.random.SeedSequence([int(seed), 0x4E45])).permutation(classes.size)[:n_new]
    new_classes = set(classes[picked].tolist())
    is_new = np.isin(names, list(new_classes)) | unknown
    gallery = np.flatnonzero(~is_new)
    counts = dict(zip(*np.unique(names[gallery], return_counts=True))) if gallery.size else {}
    known_queries = [r for r in gallery.tolist() if counts[names[r]] >= 2]
    queries = np.asarray(known_queries + np.flatnonzero(is_new).tolist(), dtype=np.int64)
    truth = np.where(is_new[queries], NEW, names[queries]).astype(object)
    return ReidTrials(gallery=gallery.astype(np.int64), queries=queries, truth=truth,
                      new_classes=tuple(sorted(new_classes)))


@dataclass
class Ranking:
    """Each query's top-k distinct labels and their scores (the head's logits), with the truth."""

    labels: np.ndarray  # object [Q, k]
    scores: np.ndarray  # float32 [Q, k]
    truth: np.ndarray  # object [Q]
    queries: np.ndarray  # int64 [Q] rows of the split
    threshold: float | None = None  # the logit threshold, when chosen
    curve: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def metrics(self, k: int = 5) -> dict[str, float]:
        """Top-1, top-5 and MAP@5 on the known individuals; MAP@5 of all queries with NEW at the threshold."""
        known = self.truth != NEW
        out: dict[str, float] = {"queries": float(len(self.truth)), "new_queries": float((~known).sum())}
        if known.any():
            labels = self.labels[known]
            out.update({"top1": top_k_accuracy(labels, self.truth[known], 1),
                        "top5": top_k_accuracy(labels, self.truth[known], min(k, labels.shape[1])),
                        "map5": map_at_k(labels, self.truth[known], k)})
        if self.threshold is not None:
            out["map5_new"] = map_at_k(insert_new(self.labels, self.scores, self.threshold, NEW, k), self.truth, k)
            out["threshold_p"] = float(1.0 / (1.0 + np.exp(-self.threshold)))
        return out

    def with_new(self, k: int = 5) -> list[list[Any]]:
        """The predictions with NEW inserted at the threshold."""
        assert self.threshold is not None
        return insert_new(self.labels, self.scores, self.threshold, NEW, k)


@torch.no_grad()
def rank(model: SiameseNet, images: LabelledImages, trials: ReidTrials, k: int = 5,
         device: torch.device | str | None = None, batch_size: int = 512) -> Ranking:
    """Embed each needed image once (the model's scoring embedding) and rank every query against the gallery."""
    needed = np.unique(np.concatenate([trials.gallery, trials.queries]))
    where = np.full(len(images), -1, dtype=np.int64)
    where[needed] = np.arange(needed.size)
    h = embed_images(model, images.images[needed], device, batch_size).float().cpu().numpy()
    gallery_h = h[where[trials.gallery]]
    query_h = h[where[trials.queries]]
    in_gallery = np.full(len(images), -1, dtype=np.int64)
    in_gallery[trials.gallery] = np.arange(trials.gallery.size)
    alpha, bias = head_parameters(model)
    labels, scores = search_labels(query_h, gallery_h, images.label_names[trials.gallery], alpha, bias, k,
                                   exclude=in_gallery[trials.queries])
    return Ranking(labels=labels.astype(object), scores=scores, truth=trials.truth, queries=trials.queries)


def choose_new_threshold(validation: Ranking, k: int = 5) -> Ranking:
    """The validation ranking with the threshold that maximises its MAP@5 (NEW inserted), and the curve."""
    if not (validation.truth == NEW).any():
        raise ValueError("the validation queries include no new individual, so no threshold can be chosen; "
                         "hold out a share of the validation classes (evaluation.reid_new_share > 0)")
    threshold, _ = choose_threshold(validation.labels, validation.scores, validation.truth, new_label=NEW, k=k)
    validation.threshold = threshold
    validation.curve = threshold_curve(validation.labels, validation.scores, validation.truth, new_label=NEW, k=k)
    return validation
