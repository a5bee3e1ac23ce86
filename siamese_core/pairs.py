"""Same/different pair sampling for the verification task (Koch et al. 2015, sec. 4).

The paper trains on random same/different pairs, an equal number per alphabet,
each repeated with affine distortions (30k pairs x (1 + 8 copies) = 270k). This
module turns class-labelled rows (any subset of the data: a whole split or a
window of shards) into a :class:`PairSet` of row indices into the arrays it
was given. It is fully vectorized so that 150k pairs take milliseconds, and it
is a pure function of ``(rows, cfg, seed, epoch)`` so every worker and every
restart draws exactly the same pairs for an epoch.

Rules, each guarding a known fault of public re-implementations:

* a "same" pair is two *different* images of one character (never an image
  with itself), by different drawers whenever the character allows it;
* "different" pairs are, by default, two characters of the *same* alphabet
  (hard, paper-like negatives); ``negatives="any"`` draws the second character
  from any alphabet;
* every alphabet gets the same number of pairs (+-1 when not divisible), and
  the same/different split is exact overall and +-1 per alphabet;
* only rows by drawers in ``cfg.drawers`` are used when ``drawer`` is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

from siamese_core.config import PairConfig

Negatives = Literal["same_alphabet", "any"]

_DRAWER_RETRIES = 8
"""Rounds of resampling a 'same' pair whose two images share a drawer."""


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
    same: np.ndarray  # float32 (M,), 1.0 = same character
    distort: np.ndarray  # bool (M,), False for the original pair
    copy: np.ndarray  # int16 (M,), 0 = original, 1..distorted_copies
    pair: np.ndarray  # int64 (M,), index of the original pair in [0, n_pairs)
    alphabet: np.ndarray  # int64 (M,), index into ``alphabets``
    alphabets: tuple[str, ...]  # alphabet names in sorted order

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
            alphabet=self.alphabet[index], alphabets=self.alphabets,
        )

    def shuffled(self, seed: int) -> "PairSet":
        """All rows in a random order fixed by ``seed``."""
        return self.take(np.random.default_rng(seed).permutation(len(self)))


def _split_evenly(total: int, parts: int, order: np.ndarray, offset: int = 0) -> np.ndarray:
    """``total`` split over ``parts`` as ``base`` or ``base + 1``.

    The extras go to ``order[offset], order[offset + 1], ...`` (cyclically), so
    two splits with consecutive offsets spread their extras over different parts.
    """
    counts = np.full(parts, total // parts, dtype=np.int64)
    extra = total % parts
    positions = (offset + np.arange(extra)) % parts
    counts[order[positions]] += 1
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
    alphabet: np.ndarray,
    character: np.ndarray,
    cfg: PairConfig,
    seed: int,
    epoch: int = 0,
    drawer: Optional[np.ndarray] = None,
    negatives: Negatives = "same_alphabet",
) -> PairSet:
    """Sample ``cfg.pairs_per_epoch`` pairs (plus distorted copies) from labelled rows.

    ``alphabet``, ``character`` (a global class id) and ``drawer`` are parallel
    arrays over the rows; returned indices point into them, so the caller can
    pass any subset of a data set and map back. The pairs are a pure function
    of ``(rows, cfg, seed, epoch)``.

    Raises ValueError when a character has fewer than 2 usable images, when an
    alphabet has fewer than 2 characters (for ``negatives="same_alphabet"``),
    or when no rows are usable.
    """
    if negatives not in ("same_alphabet", "any"):
        raise ValueError(f"negatives must be 'same_alphabet' or 'any', got {negatives!r}")
    alphabet = np.asarray(alphabet)
    character = np.asarray(character).astype(np.int64, copy=False)
    if alphabet.shape != character.shape or alphabet.ndim != 1:
        raise ValueError(f"alphabet {alphabet.shape} and character {character.shape} must be equal 1-d shapes")

    usable = np.ones(character.shape[0], dtype=bool)
    if drawer is not None:
        drawer = np.asarray(drawer).astype(np.int64, copy=False)
        if drawer.shape != character.shape:
            raise ValueError(f"drawer {drawer.shape} must have the shape of character {character.shape}")
        usable = np.isin(drawer, np.asarray(cfg.drawers, dtype=np.int64))
    rows = np.flatnonzero(usable)
    if rows.size == 0:
        raise ValueError(f"no usable rows (drawers {cfg.drawers})")

    # Group usable rows by character: rows_by_char[char_start[c] : char_start[c] + char_count[c]].
    alphabets, alpha_of_row = np.unique(alphabet[rows], return_inverse=True)
    # Sort by (alphabet, character) so the characters of an alphabet are contiguous.
    order = np.lexsort((character[rows], alpha_of_row))
    rows_by_char = rows[order]
    sorted_chars = character[rows_by_char]
    boundary = np.flatnonzero(np.diff(sorted_chars)) + 1
    char_start = np.concatenate(([0], boundary)).astype(np.int64)
    char_count = np.diff(np.concatenate((char_start, [rows_by_char.size]))).astype(np.int64)
    char_ids = sorted_chars[char_start]
    if np.unique(char_ids).size != char_ids.size:
        raise ValueError("a character id appears under more than one alphabet")
    if (char_count < 2).any():
        bad = char_ids[char_count < 2][:5]
        raise ValueError(f"characters {bad.tolist()} have fewer than 2 usable images "
                         f"(drawers {cfg.drawers}); a 'same' pair needs two different images")
    alpha_of_char = alpha_of_row[order][char_start]
    n_alpha = alphabets.size
    alpha_char_count = np.bincount(alpha_of_char, minlength=n_alpha).astype(np.int64)
    alpha_char_start = np.concatenate(([0], np.cumsum(alpha_char_count)[:-1])).astype(np.int64)
    n_chars = char_ids.size
    if negatives == "same_alphabet" and (alpha_char_count < 2).any():
        bad = alphabets[alpha_char_count < 2].tolist()
        raise ValueError(f"alphabets {bad} have fewer than 2 characters; same-alphabet negatives need 2")
    if negatives == "any" and n_chars < 2:
        raise ValueError("need at least 2 characters to form 'different' pairs")

    rng = np.random.default_rng([int(seed), int(epoch)])
    n = int(cfg.pairs_per_epoch)
    n_same = int(round(n * cfg.same_fraction))
    n_same = min(max(n_same, 0), n)
    n_diff = n - n_same
    # Equal pairs per alphabet; the leftover same and different pairs go to
    # consecutive alphabets in a random order, so no alphabet gets 2 more.
    alpha_order = rng.permutation(n_alpha)
    same_per_alpha = _split_evenly(n_same, n_alpha, alpha_order)
    diff_per_alpha = _split_evenly(n_diff, n_alpha, alpha_order, offset=n_same % n_alpha)
    same_alpha = np.repeat(np.arange(n_alpha), same_per_alpha)
    diff_alpha = np.repeat(np.arange(n_alpha), diff_per_alpha)

    # Same pairs: a character of the alphabet, then two different images of it.
    same_char = _pick(rng, alpha_char_start[same_alpha], alpha_char_count[same_alpha])
    start, count = char_start[same_char], char_count[same_char]
    first = _pick(rng, start, count)
    second = _pick_other(rng, start, count, first)
    if drawer is not None:
        # Prefer two drawers: resample pairs whose images share one (only
        # possible when a drawer drew a character twice).
        for _ in range(_DRAWER_RETRIES):
            clash = np.flatnonzero(drawer[rows_by_char[first]] == drawer[rows_by_char[second]])
            if clash.size == 0:
                break
            first[clash] = _pick(rng, start[clash], count[clash])
            second[clash] = _pick_other(rng, start[clash], count[clash], first[clash])
    same_left, same_right = rows_by_char[first], rows_by_char[second]

    # Different pairs: two distinct characters (of the same alphabet by default).
    diff_char = _pick(rng, alpha_char_start[diff_alpha], alpha_char_count[diff_alpha])
    if negatives == "same_alphabet":
        other_char = _pick_other(rng, alpha_char_start[diff_alpha], alpha_char_count[diff_alpha], diff_char)
    else:
        other_char = _pick_other(rng, np.zeros_like(diff_char), np.full_like(diff_char, n_chars), diff_char)
    diff_left = rows_by_char[_pick(rng, char_start[diff_char], char_count[diff_char])]
    diff_right = rows_by_char[_pick(rng, char_start[other_char], char_count[other_char])]

    left = np.concatenate((same_left, diff_left))
    right = np.concatenate((same_right, diff_right))
    same = np.concatenate((np.ones(n_same, np.float32), np.zeros(n_diff, np.float32)))
    pair_alpha = np.concatenate((same_alpha, diff_alpha))
    # Random order of pairs, and a random side for each image.
    perm = rng.permutation(n)
    left, right, same, pair_alpha = left[perm], right[perm], same[perm], pair_alpha[perm]
    swap = rng.random(n) < 0.5
    left, right = np.where(swap, right, left), np.where(swap, left, right)

    reps = 1 + int(cfg.distorted_copies)
    copy = np.repeat(np.arange(reps, dtype=np.int16), n)
    return PairSet(
        left=np.tile(left, reps), right=np.tile(right, reps), same=np.tile(same, reps),
        distort=copy > 0, copy=copy, pair=np.tile(np.arange(n, dtype=np.int64), reps),
        alphabet=np.tile(pair_alpha, reps), alphabets=tuple(str(a) for a in alphabets),
    )
