"""Same/different pair sampling for the verification task (Koch et al. 2015, sec. 4).

The paper trains on random same/different pairs, an equal number per alphabet,
each repeated with affine distortions (30k pairs x (1 + 8 copies) = 270k). This
module turns labelled rows (any subset of a data set: a whole split or one
shard) into a :class:`PairSet` of row indices into the arrays it was given. It
is vectorised, so 150k pairs take milliseconds, and a pure function of
``(rows, cfg, seed, epoch)``, so every worker and every restart draws exactly
the same pairs for an epoch.

In the user's words: a *class* is what is recognised (a character, a whale);
a *group* holds classes that are compared with each other (an alphabet; a data
set without groups is one group); a *source* is what made an image (a drawer,
a camera). Rules, each guarding a known fault of public re-implementations:

* a "same" pair is two *different* images of one class (never an image with
  itself), from different sources whenever the class allows it; a class with
  a single usable image only ever appears in "different" pairs;
* "different" pairs are, by default, two classes of the *same* group (hard,
  paper-like negatives); ``negatives="any"`` draws the second class anywhere;
* every group gets the same number of pairs (+-1 when not divisible), and the
  same/different split is exact overall and +-1 per group;
* only rows from ``cfg.sources`` are used, when it names any.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

from siamese_core.config import PairConfig

Negatives = Literal["same_group", "any"]

_SOURCE_RETRIES = 8
"""Rounds of resampling a 'same' pair whose two images share a source."""


@dataclass(frozen=True)
class PairSet:
    """Pairs as parallel arrays of row indices into the arrays that were sampled.

    Layout: rows ``[0, n_pairs)`` are the original pairs; copy ``k`` (1-based)
    repeats them at rows ``[k * n_pairs, (k + 1) * n_pairs)`` with
    ``distort=True``. ``copy`` holds ``k`` (0 for originals) and ``pair`` the
    index of the original pair, so a distortion can be seeded per (pair, copy).
    Shuffle with :meth:`take` before batching if copies must not share batches.
    """

    left: np.ndarray  # int64 (M,)
    right: np.ndarray  # int64 (M,)
    same: np.ndarray  # float32 (M,), 1.0 = same class
    distort: np.ndarray  # bool (M,), False for the original pair
    copy: np.ndarray  # int16 (M,), 0 = original, 1..distorted_copies
    pair: np.ndarray  # int64 (M,), index of the original pair in [0, n_pairs)
    group: np.ndarray  # int64 (M,), index into ``groups``
    groups: tuple[str, ...]  # group names in sorted order

    def __len__(self) -> int:
        return int(self.left.shape[0])

    @property
    def n_pairs(self) -> int:
        """Number of original (undistorted) pairs."""
        return int((~self.distort).sum())

    def take(self, index: np.ndarray) -> "PairSet":
        """Rows ``index`` of every array (e.g. a permutation, or one worker's share)."""
        index = np.asarray(index)
        return PairSet(
            left=self.left[index], right=self.right[index], same=self.same[index],
            distort=self.distort[index], copy=self.copy[index], pair=self.pair[index],
            group=self.group[index], groups=self.groups,
        )

    def shuffled(self, seed: int) -> "PairSet":
        """All rows in a random order fixed by ``seed``."""
        return self.take(np.random.default_rng(seed).permutation(len(self)))


def unit_name(shard: int) -> str:
    """The pairing unit of a shard's rows where the data has no groups (its seed key)."""
    return f"shard {shard}"


def unit_seed(seed: int, unit: str) -> int:
    """A stable 63-bit seed per (run seed, pairing unit: a group, or a shard where there are none).

    Why per unit: the pair stage samples one shard at a time, so a unit's pairs must not depend
    on which other units share its block.
    """
    digest = hashlib.sha256(f"{seed}:{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def name_keys(names: np.ndarray) -> np.ndarray:
    """Stable int64 keys of class labels or image ids (the first 63 bits of their blake2b digest).

    Why: the pair stage ships these beside each image, so a trainer knows which images and
    classes are identical across shards and workers without comparing names or pixels.
    Distinct names collide with odds of about n^2 / 2^64.
    """
    return np.fromiter((int.from_bytes(hashlib.blake2b(str(n).encode(), digest_size=8).digest(), "little") >> 1
                        for n in np.asarray(names).tolist()), dtype=np.int64, count=len(names))


def pairs_per_unit(cfg: PairConfig, has_groups: bool, n_groups: int, unit_classes: int, total_classes: int) -> int:
    """Pairs one unit draws per epoch: an equal share per group, or per class where there are no groups."""
    if has_groups:
        return max(2, round(cfg.pairs_per_epoch / max(1, n_groups)))
    return max(2, round(cfg.pairs_per_epoch * unit_classes / max(1, total_classes)))


def unit_pairs(group: Optional[np.ndarray], label: np.ndarray, cfg: PairConfig, seed: int, epoch: int,
               unit: str, n_pairs: int, source: Optional[np.ndarray] = None,
               negatives: Negatives = "same_group") -> PairSet:
    """One unit's undistorted pairs for an epoch: the pair stage's work for a group or a shard."""
    unit_cfg = dataclasses.replace(cfg, pairs_per_epoch=max(2, int(n_pairs)), distorted_copies=0)
    return sample_pairs(group, label, unit_cfg, seed=unit_seed(seed, unit), epoch=epoch, source=source,
                        negatives=negatives)


def _split_evenly(total: int, parts: int, order: np.ndarray, offset: int = 0,
                  eligible: np.ndarray | None = None) -> np.ndarray:
    """``total`` split over the ``eligible`` of ``parts`` (all by default) as ``base`` or ``base + 1``.

    The extras go to the eligible parts in the order ``order`` gives, starting at ``offset``
    (cyclically), so two splits with consecutive offsets spread their extras over different parts.
    """
    counts = np.zeros(parts, dtype=np.int64)
    chosen = order if eligible is None else order[eligible[order]]
    if chosen.size == 0:
        return counts
    counts[chosen] = total // chosen.size
    extra = total % chosen.size
    positions = (offset + np.arange(extra)) % chosen.size
    counts[chosen[positions]] += 1
    return counts


def _pick(rng: np.random.Generator, start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """One uniform element of each range ``[start, start + count)``."""
    return start + np.floor(rng.random(start.shape[0]) * count).astype(np.int64)


def _pick_other(rng: np.random.Generator, start: np.ndarray, count: np.ndarray,
                taken: np.ndarray) -> np.ndarray:
    """One uniform element of each range ``[start, start + count)`` other than ``taken``."""
    other = start + np.floor(rng.random(start.shape[0]) * (count - 1)).astype(np.int64)
    return other + (other >= taken)


def sample_pairs(
    group: Optional[np.ndarray],
    label: np.ndarray,
    cfg: PairConfig,
    seed: int,
    epoch: int = 0,
    source: Optional[np.ndarray] = None,
    negatives: Negatives = "same_group",
) -> PairSet:
    """Sample ``cfg.pairs_per_epoch`` pairs (plus distorted copies) from labelled rows.

    ``group`` (names; None: one group), ``label`` (class codes) and ``source``
    (names, optional) are parallel arrays over the rows; returned indices point
    into them, so the caller can pass any subset of a data set and map back. The
    pairs are a pure function of ``(rows, cfg, seed, epoch)``.

    Raises ValueError when no class has 2 usable images, when no group has 2
    classes (for ``negatives="same_group"``), or when no rows are usable.
    """
    if negatives not in ("same_group", "any"):
        raise ValueError(f"negatives must be 'same_group' or 'any', got {negatives!r}")
    label = np.asarray(label).astype(np.int64, copy=False)
    group = np.zeros(label.shape, dtype=np.int8) if group is None else np.asarray(group)
    if group.shape != label.shape or label.ndim != 1:
        raise ValueError(f"group {group.shape} and label {label.shape} must be equal 1-d shapes")

    usable = np.ones(label.shape[0], dtype=bool)
    source_code = None
    if source is not None:
        source = np.asarray(source)
        if source.shape != label.shape:
            raise ValueError(f"source {source.shape} must have the shape of label {label.shape}")
        source_code = np.unique(source, return_inverse=True)[1]
        if cfg.sources:
            usable = np.isin(source.astype(str), np.asarray(cfg.sources, dtype=str))
    elif cfg.sources:
        raise ValueError(f"pairs.sources={list(cfg.sources)} names sources, but these rows have no source")
    rows = np.flatnonzero(usable)
    if rows.size == 0:
        raise ValueError(f"no usable rows (sources {list(cfg.sources)})")

    # Usable rows grouped by class: rows_by_class[class_start[c] : class_start[c] + class_count[c]].
    groups, group_of_row = np.unique(group[rows], return_inverse=True)
    # Sort by (group, class) so the classes of a group are contiguous.
    order = np.lexsort((label[rows], group_of_row))
    rows_by_class = rows[order]
    sorted_labels = label[rows_by_class]
    boundary = np.flatnonzero(np.diff(sorted_labels)) + 1
    class_start = np.concatenate(([0], boundary)).astype(np.int64)
    class_count = np.diff(np.concatenate((class_start, [rows_by_class.size]))).astype(np.int64)
    class_ids = sorted_labels[class_start]
    if np.unique(class_ids).size != class_ids.size:
        raise ValueError("a class appears under more than one group")
    group_of_class = group_of_row[order][class_start]
    n_groups = groups.size
    group_class_count = np.bincount(group_of_class, minlength=n_groups).astype(np.int64)
    group_class_start = np.concatenate(([0], np.cumsum(group_class_count)[:-1])).astype(np.int64)
    n_classes = class_ids.size
    # 'same' pairs come from the classes with two usable images, group by group.
    pairable = np.flatnonzero(class_count >= 2)
    if pairable.size == 0:
        raise ValueError(f"no class has 2 usable images (sources {list(cfg.sources) or 'all'}); "
                         "a 'same' pair needs two different images of one class")
    group_pairable_count = np.bincount(group_of_class[pairable], minlength=n_groups).astype(np.int64)
    group_pairable_start = np.concatenate(([0], np.cumsum(group_pairable_count)[:-1])).astype(np.int64)
    if negatives == "same_group":
        diff_eligible = group_class_count >= 2
        if not diff_eligible.any():
            raise ValueError("no group has 2 classes; 'different' pairs within a group need 2 "
                             "(or use negatives='any')")
    else:
        if n_classes < 2:
            raise ValueError("need at least 2 classes to form 'different' pairs")
        diff_eligible = np.ones(n_groups, dtype=bool)
    same_eligible = group_pairable_count > 0

    rng = np.random.default_rng([int(seed), int(epoch)])
    n = int(cfg.pairs_per_epoch)
    n_same = min(max(int(round(n * cfg.same_fraction)), 0), n)
    n_diff = n - n_same
    # Equal pairs per group; the leftover same and different pairs go to
    # consecutive groups in a random order, so no group gets 2 more.
    group_order = rng.permutation(n_groups)
    same_per_group = _split_evenly(n_same, n_groups, group_order, eligible=same_eligible)
    diff_per_group = _split_evenly(n_diff, n_groups, group_order, offset=n_same % int(same_eligible.sum()),
                                   eligible=diff_eligible)
    same_group = np.repeat(np.arange(n_groups), same_per_group)
    diff_group = np.repeat(np.arange(n_groups), diff_per_group)

    # Same pairs: a class of the group with two images, then two different images of it.
    same_class = pairable[_pick(rng, group_pairable_start[same_group], group_pairable_count[same_group])]
    start, count = class_start[same_class], class_count[same_class]
    first = _pick(rng, start, count)
    second = _pick_other(rng, start, count, first)
    if source_code is not None:
        # Prefer two sources: resample pairs whose images share one (only
        # possible when a source made several images of the class).
        for _ in range(_SOURCE_RETRIES):
            clash = np.flatnonzero(source_code[rows_by_class[first]] == source_code[rows_by_class[second]])
            if clash.size == 0:
                break
            first[clash] = _pick(rng, start[clash], count[clash])
            second[clash] = _pick_other(rng, start[clash], count[clash], first[clash])
    same_left, same_right = rows_by_class[first], rows_by_class[second]

    # Different pairs: two distinct classes (of the same group by default).
    diff_class = _pick(rng, group_class_start[diff_group], group_class_count[diff_group])
    if negatives == "same_group":
        other_class = _pick_other(rng, group_class_start[diff_group], group_class_count[diff_group], diff_class)
    else:
        other_class = _pick_other(rng, np.zeros_like(diff_class), np.full_like(diff_class, n_classes), diff_class)
    diff_left = rows_by_class[_pick(rng, class_start[diff_class], class_count[diff_class])]
    diff_right = rows_by_class[_pick(rng, class_start[other_class], class_count[other_class])]

    left = np.concatenate((same_left, diff_left))
    right = np.concatenate((same_right, diff_right))
    same = np.concatenate((np.ones(n_same, np.float32), np.zeros(n_diff, np.float32)))
    pair_group = np.concatenate((same_group, diff_group))
    # Random order of pairs, and a random side for each image.
    perm = rng.permutation(n)
    left, right, same, pair_group = left[perm], right[perm], same[perm], pair_group[perm]
    swap = rng.random(n) < 0.5
    left, right = np.where(swap, right, left), np.where(swap, left, right)

    reps = 1 + int(cfg.distorted_copies)
    copy = np.repeat(np.arange(reps, dtype=np.int16), n)
    return PairSet(
        left=np.tile(left, reps), right=np.tile(right, reps), same=np.tile(same, reps),
        distort=copy > 0, copy=copy, pair=np.tile(np.arange(n, dtype=np.int64), reps),
        group=np.tile(pair_group, reps), groups=tuple(str(g) for g in groups),
    )
