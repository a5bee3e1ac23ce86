"""Hard-pair mining by linear assignment (the humpback-whale Kaggle siamese kernel's scheme).

Random "different" pairs soon become easy: most characters look nothing alike,
the loss on them is ~0 and they teach nothing. Every few epochs the kernel
scored all training pairs with the current model and solved a linear
assignment problem on that score matrix plus uniform noise, so each image got
the one "different" partner that, *jointly over all images*, is most similar
(the assignment stops a single look-alike from becoming everybody's partner).
The noise is annealed from large (nearly random pairs, while the model is
poor) to small (truly hard pairs); pairs already served are excluded so later
epochs get other ones; "same" partners are a random derangement of each
class's own images; an epoch is half same, half different pairs.

Everything here is numpy/scipy (plus torch only in :func:`logit_scorer`) and a
pure function of its inputs: :func:`mine_pairs` draws all randomness from
``(seed, epoch)``, so every worker and every restart mines the same pairs.

Conventions:

* ``scores`` are *logits*, higher = more similar (``SiameseNet.pairwise_logits``).
  They are given either as a full ``[N, N]`` matrix or as a function
  ``score_block(rows, cols) -> [len(rows), len(cols)]``, so a large group can
  be scored block by block and no ``N x N`` matrix is ever built.
* A pair is unordered (the weighted-L1 head is symmetric): excluding ``(i, j)``
  also excludes ``(j, i)``. Its compact key is ``i * N + j`` with ``i < j``.
* Partner ``-1`` means "no partner": an image the rules leave unpaired.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Optional, Union

import numpy as np
from scipy.optimize import linear_sum_assignment

Shape = Literal["linear", "exponential"]
ScoreBlock = Callable[[np.ndarray, np.ndarray], Any]
"""``score_block(rows, cols)``: logits ``[len(rows), len(cols)]`` (array-like) for those images."""
Scores = Union[np.ndarray, ScoreBlock]
Exclude = Union[None, np.ndarray, Iterable[tuple[int, int]]]

_MINING_STREAM = 0x6D696E65  # "mine": keeps these draws apart from pairs.py's (seed, epoch) stream


# --- noise schedule ------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseSchedule:
    """Scale of the uniform noise added to the scores, annealed over the mining epochs.

    Why: with a poor early model the scores are mostly noise themselves, and pure
    argmax pairs would be arbitrary yet always the same; a large noise first gives
    varied, nearly random pairs, a small noise later the model's hardest ones.

    ``scale(first_epoch) == start``; the scale moves to ``end`` over ``epochs``
    epochs and stays there (``scale(first_epoch + epochs) == end``). "linear"
    interpolates the value, "exponential" its logarithm (a constant factor per
    epoch: it spends more epochs at small scales; needs ``start, end > 0``).
    Epochs before ``first_epoch`` get ``start``. ``start < end`` is allowed
    (the scale then grows) but is not the usual use.
    """

    start: float
    end: float
    epochs: int
    shape: Shape = "linear"
    first_epoch: int = 0

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"NoiseSchedule.{name} must be a finite number, got {value!r}")
            if value < 0:
                raise ValueError(f"NoiseSchedule.{name} must be >= 0 (a noise scale), got {value!r}")
        for name in ("epochs", "first_epoch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"NoiseSchedule.{name} must be an int, got {value!r}")
        if self.epochs < 1:
            raise ValueError(f"NoiseSchedule.epochs must be >= 1 (epochs to go from start to end), got {self.epochs}")
        if self.first_epoch < 0:
            raise ValueError(f"NoiseSchedule.first_epoch must be >= 0, got {self.first_epoch}")
        if self.shape not in ("linear", "exponential"):
            raise ValueError(f"NoiseSchedule.shape must be 'linear' or 'exponential', got {self.shape!r}")
        if self.shape == "exponential" and (self.start <= 0 or self.end <= 0):
            raise ValueError("an exponential NoiseSchedule needs start > 0 and end > 0 "
                             f"(it interpolates their logarithms), got start={self.start}, end={self.end}")

    def scale(self, epoch: int) -> float:
        """Noise scale for ``epoch`` (an absolute epoch number, like the trainer's)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)):
            raise ValueError(f"epoch must be an int, got {epoch!r}")
        t = min(max((int(epoch) - self.first_epoch) / self.epochs, 0.0), 1.0)
        if t <= 0.0:
            return float(self.start)  # exactly the end points, without exp/log rounding
        if t >= 1.0:
            return float(self.end)
        if self.shape == "linear":
            return float(self.start + (self.end - self.start) * t)
        return float(math.exp(math.log(self.start) + (math.log(self.end) - math.log(self.start)) * t))


# --- pair keys ------------------------------------------------------------------------


def pair_keys(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    """Unordered pair keys ``min(i,j) * n + max(i,j)`` (int64) of images in ``[0, n)``."""
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    return np.minimum(i, j) * np.int64(n) + np.maximum(i, j)


def key_pairs(keys: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pair_keys`: ``(i, j)`` with ``i < j``."""
    keys = np.asarray(keys, dtype=np.int64)
    return keys // n, keys % n


def _exclude_keys(exclude: Exclude, n: int) -> np.ndarray:
    """``exclude`` as sorted unique unordered keys.

    Accepted: None; a 1-d int array of keys (``MinedPairs.used``); a ``(K, 2)``
    array or an iterable (e.g. a set) of ``(i, j)`` pairs in either orientation.
    """
    if exclude is None:
        return np.zeros(0, np.int64)
    if isinstance(exclude, np.ndarray) and exclude.ndim == 1:
        keys = exclude.astype(np.int64, copy=False)
        if keys.size and (keys.min() < 0 or keys.max() >= n * n):
            raise ValueError(f"exclude keys must lie in [0, {n * n}) for {n} images")
        i, j = key_pairs(keys, n)
        if (i >= j).any():
            raise ValueError("exclude keys must encode pairs i * N + j with i < j")
        return np.unique(keys)
    pairs = np.asarray(exclude if isinstance(exclude, np.ndarray) else list(exclude), dtype=np.int64)
    if pairs.size == 0:
        return np.zeros(0, np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"exclude must be keys (1-d) or (i, j) pairs of shape (K, 2), got shape {pairs.shape}")
    if pairs.min() < 0 or pairs.max() >= n:
        raise ValueError(f"exclude pairs must index images in [0, {n})")
    return np.unique(pair_keys(pairs[:, 0], pairs[:, 1], n))


# --- assignment -----------------------------------------------------------------------


def assign(values: np.ndarray) -> np.ndarray:
    """Column of each row in the assignment of a square matrix that maximises the total.

    scipy's ``linear_sum_assignment``: ``lap.lapjv`` is not faster at mining's block
    sizes (benchmarks/bench_assignment.py), so no second solver.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"assign needs a square matrix, got shape {values.shape}")
    rows, cols = linear_sum_assignment(values, maximize=True)
    out = np.empty(values.shape[0], np.int64)
    out[rows] = cols
    return out


def random_blocks(n: int, block_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Images ``0..n-1`` in random blocks of at most ``block_size`` (sizes differ by at most 1).

    Equal sizes, not ``block_size`` blocks plus a small remainder: a tiny last
    block would leave its images few candidates. One block, in order, when
    ``n <= block_size`` (no draw from ``rng`` then).
    """
    if n <= block_size:
        return [np.arange(n, dtype=np.int64)]
    count = -(-n // block_size)
    return [np.sort(b) for b in np.array_split(rng.permutation(n).astype(np.int64), count)]


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-d, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers (class ids), got dtype {labels.dtype}")
    return labels


def _check_noise(noise_scale: float) -> float:
    if isinstance(noise_scale, bool) or not isinstance(noise_scale, (int, float, np.floating, np.integer)) \
            or not math.isfinite(noise_scale) or noise_scale < 0:
        raise ValueError(f"noise_scale must be a finite number >= 0, got {noise_scale!r}")
    return float(noise_scale)


def _block_scorer(scores: Scores, n: int) -> ScoreBlock:
    """A ``score_block`` for a full matrix or a function, with its output checked."""
    if callable(scores):
        fn = scores
    else:
        full = np.asarray(scores)
        if full.shape != (n, n):
            raise ValueError(f"scores must be [N, N] = [{n}, {n}] for {n} labels, got shape {full.shape}")

        def fn(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
            return full[np.ix_(rows, cols)]

    def checked(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        block = np.array(fn(rows, cols), dtype=np.float64)  # a copy: the caller's array is never written
        if block.shape != (rows.size, cols.size):
            raise ValueError(f"score_block returned shape {block.shape} for {rows.size} rows "
                             f"and {cols.size} cols")
        if not np.isfinite(block).all():
            raise ValueError("scores contain NaN or infinite values (has the model diverged?)")
        return block

    return checked


def hard_negatives(
    scores: Scores,
    labels: np.ndarray,
    noise_scale: float,
    rng: np.random.Generator,
    exclude: Exclude = None,
    block_size: int = 1024,
) -> np.ndarray:
    """One hard "different" partner per image: ``partner[i]`` (int64), or -1 for none.

    Solves the assignment maximising ``sum_i score[i, partner[i]] + noise``, the
    noise uniform in ``[0, noise_scale)``, drawn anew for each cell. A pair is
    never of one class (so never an image with itself) nor in ``exclude``:
    unordered pairs given as a 1-d int64 numpy array of keys (``MinedPairs.used``),
    a ``(K, 2)`` array, or an iterable such as a set of ``(i, j)`` tuples.

    Forbidden cells get a finite penalty so large that the solver uses one only
    when no assignment avoids them (the penalty exceeds ``(n + 1)`` times the
    allowed values' range, so fewer forbidden cells always win): the number of
    unpaired images is then the fewest possible. Every chosen cell is checked
    after solving and an image on a forbidden cell gets -1, never a wrong
    partner. Example: in a block of ``n`` images where one class holds
    ``m > n / 2``, ``2m - n`` of that class's images get -1.

    With ``N > block_size`` the images are split by :func:`random_blocks`
    (drawn first from ``rng``) and each block is solved on its own, so partners
    lie in the same block, the time is bounded by the blocks' (dense LAP is
    ~cubic) and ``score_block`` is only ever asked for one block's rows x cols.
    A full ``scores`` matrix and a ``score_block`` function with the same
    values give the same partners for the same ``rng`` state.
    """
    labels = _check_labels(labels)
    n = labels.shape[0]
    noise_scale = _check_noise(noise_scale)
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 2:
        raise ValueError(f"block_size must be an int >= 2, got {block_size!r}")
    score_block = _block_scorer(scores, n)
    excluded = _exclude_keys(exclude, n)
    ex_i, ex_j = key_pairs(excluded, n)

    partner = np.full(n, -1, dtype=np.int64)
    position = np.full(n, -1, dtype=np.int64)  # index of an image within its block
    for block in random_blocks(n, int(block_size), rng):
        size = block.size
        position[block] = np.arange(size)
        forbidden = labels[block][:, None] == labels[block][None, :]  # same class, diagonal included
        inside = (position[ex_i] >= 0) & (position[ex_j] >= 0)
        pi, pj = position[ex_i[inside]], position[ex_j[inside]]
        forbidden[pi, pj] = True
        forbidden[pj, pi] = True
        values = score_block(block, block)
        if noise_scale > 0:
            values = values + noise_scale * rng.random(values.shape)
        if forbidden.all():
            position[block] = -1
            continue
        allowed = values[~forbidden]
        low, high = float(allowed.min()), float(allowed.max())
        values[forbidden] = low - (size + 1) * (high - low + 1.0)
        cols = assign(values)
        ok = ~forbidden[np.arange(size), cols]
        partner[block[ok]] = block[cols[ok]]
        position[block] = -1
    return partner


def same_partners(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random derangement within each class: ``partner[i]`` of i's class, never i; -1 if alone.

    Each class's images are put in a random cycle and each points to the next,
    so ``partner[i]`` is uniform over the other images of its class (a random
    cyclic permutation, not a uniform draw over all derangements). A class of
    one image gets -1: it can only serve as a negative.
    """
    labels = _check_labels(labels)
    n = labels.shape[0]
    partner = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return partner
    order = np.lexsort((rng.random(n), labels))
    sorted_labels = labels[order]
    start = np.concatenate(([0], np.flatnonzero(sorted_labels[1:] != sorted_labels[:-1]) + 1))
    count = np.diff(np.concatenate((start, [n])))
    group_start = np.repeat(start, count)
    group_count = np.repeat(count, count)
    k = np.arange(n)
    nxt = group_start + (k - group_start + 1) % group_count
    multi = group_count > 1
    partner[order[multi]] = order[nxt[multi]]
    return partner


# --- one epoch's pairs ------------------------------------------------------------------


@dataclass(frozen=True)
class MinedPairs:
    """One epoch's mined pairs: row indices into the labels given, and the used-pairs state.

    ``used`` is the sorted unique int64 keys (``i * n_images + j``, ``i < j``) of
    every "different" pair served so far, this epoch's included: pass it to the
    next :func:`mine_pairs` and store it with the checkpoint. "Same" pairs are
    not recorded: a class has few of them and the kernel repeated them too.
    ``*_shortfall`` counts pairs asked for but not available (all available
    ones were taken); ``unpaired`` is the images that got no "different" partner
    (0 when no "different" pairs were asked for, as none are mined then).
    """

    left: np.ndarray  # int64 (M,)
    right: np.ndarray  # int64 (M,)
    same: np.ndarray  # float32 (M,), 1.0 = same class
    used: np.ndarray  # int64 (K,), sorted unique pair keys
    n_images: int
    requested_same: int
    requested_different: int
    unpaired: int = 0

    def __len__(self) -> int:
        return int(self.left.shape[0])

    @property
    def n_same(self) -> int:
        return int((self.same == 1.0).sum())

    @property
    def n_different(self) -> int:
        return len(self) - self.n_same

    @property
    def same_shortfall(self) -> int:
        return self.requested_same - self.n_same

    @property
    def different_shortfall(self) -> int:
        return self.requested_different - self.n_different

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays: ``left``/``right``/``same`` (one row per pair, a Parquet
        table), ``used`` (its own column), and the counts as 0-d int64 arrays."""
        return {
            "left": self.left.copy(), "right": self.right.copy(), "same": self.same.copy(),
            "used": self.used.copy(),
            "n_images": np.asarray(self.n_images, np.int64),
            "requested_same": np.asarray(self.requested_same, np.int64),
            "requested_different": np.asarray(self.requested_different, np.int64),
            "unpaired": np.asarray(self.unpaired, np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any]) -> "MinedPairs":
        """Inverse of :meth:`to_arrays` (validates shapes and ranges)."""
        missing = {"left", "right", "same", "used", "n_images", "requested_same", "requested_different"} - set(arrays)
        if missing:
            raise ValueError(f"MinedPairs arrays lack {sorted(missing)}")
        left = np.asarray(arrays["left"], dtype=np.int64).reshape(-1)
        right = np.asarray(arrays["right"], dtype=np.int64).reshape(-1)
        same = np.asarray(arrays["same"], dtype=np.float32).reshape(-1)
        used = np.asarray(arrays["used"], dtype=np.int64).reshape(-1)
        n = int(np.asarray(arrays["n_images"]).reshape(()))
        if not left.shape == right.shape == same.shape:
            raise ValueError(f"left {left.shape}, right {right.shape} and same {same.shape} differ in length")
        if left.size and (min(left.min(), right.min()) < 0 or max(left.max(), right.max()) >= n):
            raise ValueError(f"pair indices must lie in [0, {n})")
        if used.size and (used.min() < 0 or used.max() >= n * n or (np.diff(used) <= 0).any()):
            raise ValueError("used must be sorted unique keys in [0, n_images**2)")
        return cls(left=left, right=right, same=same, used=used, n_images=n,
                   requested_same=int(np.asarray(arrays["requested_same"]).reshape(())),
                   requested_different=int(np.asarray(arrays["requested_different"]).reshape(())),
                   unpaired=int(np.asarray(arrays.get("unpaired", 0)).reshape(())))


def _unique_unordered(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    """Keys of the pairs ``(i, j)``, each unordered pair once (a 2-cycle gives one pair)."""
    return np.unique(pair_keys(i, j, n))


def _take(rng: np.random.Generator, keys: np.ndarray, count: int) -> np.ndarray:
    """``count`` keys without replacement (all of them, shuffled, if fewer)."""
    count = min(count, keys.size)
    return keys[rng.choice(keys.size, size=count, replace=False)] if count else keys[:0]


def mine_pairs(
    labels: np.ndarray,
    scores: Scores,
    *,
    seed: int,
    epoch: int,
    n_pairs: int,
    noise_scale: float,
    same_fraction: float = 0.5,
    used: Optional[np.ndarray] = None,
    block_size: int = 1024,
) -> MinedPairs:
    """One epoch's pairs of one group (e.g. an alphabet): hard "different", random "same".

    ``round(n_pairs * same_fraction)`` "same" pairs come from :func:`same_partners`,
    the rest from :func:`hard_negatives` (with ``used`` excluded), each drawn
    without replacement from the distinct unordered partner pairs; when fewer
    are available all are taken and ``MinedPairs.*_shortfall`` says how many
    are missing (the other kind does not make up for them). Pairs come in a
    random order, each with a random side. A pure function of its arguments:
    all randomness comes from ``np.random.default_rng([seed, epoch, const])``
    (its spawned streams). When the shortfall grows because ``used`` has
    exhausted the group's pairs, pass ``used=None`` to start over.

    Mind the 2-cycles: the head's logits are symmetric, and on a symmetric
    score matrix the optimal assignment is mostly ``i <-> j`` swaps, each one
    unordered pair. At low noise a group of N images then yields only about N/2
    distinct "different" pairs an epoch (tests/test_mining.py), so ``n_pairs * (1 - same_fraction)``
    beyond that shows up as ``different_shortfall``.
    """
    labels = _check_labels(labels)
    n = labels.shape[0]
    for name, value in (("seed", seed), ("epoch", epoch), ("n_pairs", n_pairs)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if isinstance(same_fraction, bool) or not isinstance(same_fraction, (int, float, np.floating)) \
            or not 0.0 <= same_fraction <= 1.0:
        raise ValueError(f"same_fraction must be a number in [0, 1], got {same_fraction!r}")
    used_keys = np.zeros(0, np.int64) if used is None else np.asarray(used, dtype=np.int64)
    if used_keys.ndim != 1:
        raise ValueError(f"used must be the 1-d key array of MinedPairs.used, got shape {used_keys.shape}")
    used_keys = _exclude_keys(used_keys, n)  # validates keys against n

    same_seq, neg_seq, pick_seq = np.random.SeedSequence([int(seed), int(epoch), _MINING_STREAM]).spawn(3)
    n_same = min(max(int(round(n_pairs * same_fraction)), 0), int(n_pairs))
    n_diff = int(n_pairs) - n_same

    rng_same = np.random.default_rng(same_seq)
    sp = same_partners(labels, rng_same)
    if n_diff > 0:
        neg = hard_negatives(scores, labels, noise_scale, np.random.default_rng(neg_seq),
                             exclude=used_keys, block_size=block_size)
        unpaired = int((neg < 0).sum())
    else:  # nothing to mine: skip the scoring and the solve
        _check_noise(noise_scale)
        neg, unpaired = np.full(n, -1, dtype=np.int64), 0
    has_same, has_neg = sp >= 0, neg >= 0
    same_keys = _unique_unordered(np.flatnonzero(has_same), sp[has_same], n)
    diff_keys = _unique_unordered(np.flatnonzero(has_neg), neg[has_neg], n)

    rng = np.random.default_rng(pick_seq)
    chosen_same = _take(rng, same_keys, n_same)
    chosen_diff = _take(rng, diff_keys, n_diff)
    keys = np.concatenate((chosen_same, chosen_diff))
    same = np.concatenate((np.ones(chosen_same.size, np.float32), np.zeros(chosen_diff.size, np.float32)))
    perm = rng.permutation(keys.size)
    keys, same = keys[perm], same[perm]
    left, right = key_pairs(keys, n)
    swap = rng.random(keys.size) < 0.5
    left, right = np.where(swap, right, left), np.where(swap, left, right)
    return MinedPairs(
        left=left.astype(np.int64), right=right.astype(np.int64), same=same,
        used=np.union1d(used_keys, chosen_diff).astype(np.int64), n_images=n,
        requested_same=n_same, requested_different=n_diff, unpaired=unpaired,
    )


def logit_scorer(model: Any, embeddings: Any) -> ScoreBlock:
    """A ``score_block`` from a ``SiameseNet`` and the group's embeddings ``h`` ``[N, D]``.

    Why: embedding each image once and scoring blocks of pairs with the weighted-L1 head
    is the cheap way to score a group. The head's logit ``sum_k w_k |a_k - b_k| + bias``
    is computed as two L1 distances (``torch.cdist``) on embeddings scaled by the positive
    and the negated negative weights: much faster than materialising ``|a - b|`` for
    every pair, equal up to float rounding (mining adds noise to it anyway), and only one
    block's logits exist at a time. Runs under ``torch.no_grad``; returns float64 numpy.
    """
    import torch  # siamese_core depends on torch anyway; kept local so the rest is numpy-only

    with torch.no_grad():
        weight = model.head.weight.detach().reshape(-1).to(embeddings.device, embeddings.dtype)
        bias = float(model.head.bias.detach().reshape(-1)[0]) if model.head.bias is not None else 0.0
        positive = weight > 0
        h_pos = embeddings[:, positive] * weight[positive]
        h_neg = embeddings[:, ~positive] * (-weight[~positive])

    def score_block(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            r = torch.as_tensor(np.asarray(rows), dtype=torch.long, device=embeddings.device)
            c = torch.as_tensor(np.asarray(cols), dtype=torch.long, device=embeddings.device)
            logits = torch.cdist(h_pos.index_select(0, r), h_pos.index_select(0, c), p=1) if h_pos.shape[1] \
                else torch.zeros((r.numel(), c.numel()), dtype=embeddings.dtype, device=embeddings.device)
            if h_neg.shape[1]:
                logits = logits - torch.cdist(h_neg.index_select(0, r), h_neg.index_select(0, c), p=1)
        return (logits.detach().to("cpu", torch.float64) + bias).numpy()

    return score_block


# --- an assignment for a whole training split, and the pairs an epoch draws from it -----------


@dataclass(frozen=True)
class Assignment:
    """The mined pairs of every pairing unit (a group, or a shard where there are no groups), as image keys.

    Made at epoch ``epoch`` and served until the next mining epoch: epoch ``e`` takes the slice
    ``(e - epoch) * k .. + k`` of each unit's pairs (cycling), so the pairs an epoch trains on
    are a pure function of ``(assignment, epoch)``. ``used`` (per unit, the pair keys over the
    unit's images sorted by image key) is what the next mining excludes. Small: it travels
    through Ray's object store to the pair stage and is stored with each checkpoint.
    """

    epoch: int
    unit: np.ndarray  # str (M,)
    left_key: np.ndarray  # int64 (M,) image keys (siamese_core.pairs.name_keys of the image ids)
    right_key: np.ndarray  # int64 (M,)
    same: np.ndarray  # float32 (M,)
    used: dict[str, np.ndarray]
    share: float

    def __len__(self) -> int:
        return int(self.unit.shape[0])

    def take(self, unit: str, epoch: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``count`` of the unit's pairs for ``epoch`` (fewer only when the unit has no mined pair)."""
        rows = np.flatnonzero(self.unit == unit)
        if rows.size == 0 or count <= 0:
            empty = np.zeros(0, np.int64)
            return empty, empty, np.zeros(0, np.float32)
        start = (epoch - self.epoch) * count
        pick = rows[(start + np.arange(count)) % rows.size]
        return self.left_key[pick], self.right_key[pick], self.same[pick]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "unit": self.unit.astype(str).tolist(), "left_key": self.left_key,
                "right_key": self.right_key, "same": self.same, "used": dict(self.used), "share": self.share}

    @staticmethod
    def from_state_dict(state: dict[str, Any]) -> "Assignment":
        as_np = (lambda a: a.numpy() if hasattr(a, "numpy") else np.asarray(a))
        return Assignment(epoch=int(state["epoch"]), unit=np.asarray(state["unit"], dtype=object),
                          left_key=as_np(state["left_key"]).astype(np.int64),
                          right_key=as_np(state["right_key"]).astype(np.int64),
                          same=as_np(state["same"]).astype(np.float32),
                          used={u: as_np(v).astype(np.int64) for u, v in state["used"].items()},
                          share=float(state["share"]))


def mine_assignment(model: Any, embeddings: Any, image_keys: np.ndarray, class_keys: np.ndarray,
                    units: np.ndarray, pairs_of_unit: dict[str, int], cfg: Any, seed: int, epoch: int,
                    previous: "Assignment | None" = None) -> Assignment:
    """Mine every unit's pairs for the ``cfg.every`` epochs from ``epoch`` (``cfg``: a MiningConfig).

    ``embeddings`` ``[N, D]`` (torch, any device) are the training images' embeddings by the current
    model, ``image_keys``/``class_keys``/``units`` their keys and pairing units, in any order: within a
    unit the images are put in image-key order, so the result does not depend on which worker embedded
    what. A unit with ``n`` pairs per epoch gets ``round(share * n) * every`` mined pairs, or fewer where
    its images do not have that many distinct ones (:func:`mine_pairs`); epochs then cycle through them.
    """
    import torch

    from .pairs import unit_seed

    image_keys, class_keys = np.asarray(image_keys, np.int64), np.asarray(class_keys, np.int64)
    units = np.asarray(units, dtype=object)
    if np.unique(image_keys).size != image_keys.size:
        raise ValueError("an image was embedded twice: each training image must be mined exactly once")
    schedule = NoiseSchedule(cfg.noise_start, cfg.noise_end, cfg.noise_epochs, cfg.noise_shape, cfg.first_epoch)
    out_unit, out_left, out_right, out_same, used = [], [], [], [], {}
    for unit in sorted(set(units.tolist())):
        rows = np.flatnonzero(units == unit)
        rows = rows[np.argsort(image_keys[rows], kind="stable")]
        labels = np.unique(class_keys[rows], return_inverse=True)[1]
        if np.unique(labels).size < 2:
            continue
        per_epoch = int(round(cfg.share * pairs_of_unit.get(unit, 0)))
        h = embeddings.index_select(0, torch.as_tensor(rows, device=embeddings.device))
        mined = mine_pairs(labels, logit_scorer(model, h), seed=unit_seed(seed, unit), epoch=epoch,
                           n_pairs=per_epoch * cfg.every, noise_scale=schedule.scale(epoch),
                           used=previous.used.get(unit) if (previous is not None and cfg.exclude_used) else None,
                           block_size=cfg.block_size)
        if len(mined) == 0:
            continue
        out_unit += [unit] * len(mined)
        out_left.append(image_keys[rows][mined.left])
        out_right.append(image_keys[rows][mined.right])
        out_same.append(mined.same)
        used[unit] = mined.used
    cat = (lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype))
    return Assignment(epoch=epoch, unit=np.asarray(out_unit, dtype=object), left_key=cat(out_left, np.int64),
                      right_key=cat(out_right, np.int64), same=cat(out_same, np.float32), used=used,
                      share=float(cfg.share))


def epoch_pairs(label: np.ndarray, image_keys: np.ndarray, cfg_pairs: Any, seed: int, epoch: int, unit: str,
                n: int, source: Optional[np.ndarray], negatives: str,
                assignment: "Assignment | None") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One unit's pairs for an epoch as row indices into its rows: random ones, and the assignment's share.

    The one place that makes an epoch's pairs, for the Ray pair stage and the plain loop alike.
    """
    from .pairs import unit_pairs

    k = int(round(assignment.share * n)) if assignment is not None else 0
    left_key, right_key, same = assignment.take(unit, epoch, k) if assignment is not None else \
        (np.zeros(0, np.int64),) * 2 + (np.zeros(0, np.float32),)
    n_random = n - left_key.size
    parts_left, parts_right, parts_same = [], [], []
    if n_random >= 2:
        p = unit_pairs(None, label, cfg_pairs, seed, epoch, unit, n_random, source=source,
                       negatives=negatives)  # type: ignore[arg-type]
        parts_left.append(p.left)
        parts_right.append(p.right)
        parts_same.append(p.same)
    if left_key.size:
        row_of = {int(k_): i for i, k_ in enumerate(np.asarray(image_keys).tolist())}
        parts_left.append(np.asarray([row_of[int(k_)] for k_ in left_key], np.int64))
        parts_right.append(np.asarray([row_of[int(k_)] for k_ in right_key], np.int64))
        parts_same.append(same)
    return (np.concatenate(parts_left), np.concatenate(parts_right), np.concatenate(parts_same).astype(np.float32))
