"""Pair sampling: balance, no self-pairs, correct labels, per-alphabet counts, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from siamese_core.config import PairConfig
from siamese_core.pairs import PairSet, sample_pairs


def synthetic_rows(n_alphabets: int = 5, chars_per_alphabet=(3, 4, 5, 6, 7), drawers: int = 20,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Omniglot-like labels (every character drawn once by each drawer), rows shuffled."""
    alphabet, character, drawer = [], [], []
    cid = 100  # global ids not starting at 0, not contiguous with row order
    for a in range(n_alphabets):
        for _ in range(chars_per_alphabet[a % len(chars_per_alphabet)]):
            for d in range(1, drawers + 1):
                alphabet.append(f"alpha_{a}")
                character.append(cid)
                drawer.append(d)
            cid += 3
    perm = np.random.default_rng(seed).permutation(len(alphabet))
    return (np.array(alphabet)[perm], np.array(character)[perm], np.array(drawer)[perm])


def _originals(p: PairSet) -> PairSet:
    return p.take(np.flatnonzero(~p.distort))


@pytest.fixture(scope="module")
def rows():
    return synthetic_rows()


def test_exact_balance_and_labels_are_true(rows):
    alphabet, character, drawer = rows
    cfg = PairConfig(pairs_per_epoch=10_001, distorted_copies=0, same_fraction=0.5)
    p = sample_pairs(alphabet, character, cfg, seed=1, drawer=drawer)
    assert len(p) == 10_001
    assert int(p.same.sum()) == round(10_001 * 0.5)
    same = p.same == 1
    assert np.array_equal(character[p.left] == character[p.right], same)
    # different pairs use the same alphabet by default; same pairs trivially do
    assert np.array_equal(alphabet[p.left], alphabet[p.right])
    # the recorded alphabet index names the pair's alphabet
    assert np.array_equal(np.array(p.alphabets)[p.alphabet], alphabet[p.left])


def test_uneven_same_fraction():
    alphabet, character, drawer = synthetic_rows()
    cfg = PairConfig(pairs_per_epoch=1000, distorted_copies=0, same_fraction=0.3)
    p = sample_pairs(alphabet, character, cfg, seed=0, drawer=drawer)
    assert int(p.same.sum()) == 300


def test_no_self_pairs_and_same_pairs_use_two_drawers(rows):
    alphabet, character, drawer = rows
    cfg = PairConfig(pairs_per_epoch=20_000, distorted_copies=0)
    p = sample_pairs(alphabet, character, cfg, seed=2, drawer=drawer)
    assert not np.any(p.left == p.right)
    same = p.same == 1
    assert not np.any(drawer[p.left[same]] == drawer[p.right[same]])
    # without drawers (no resampling by drawer) an image is still never paired with itself
    q = sample_pairs(alphabet, character, cfg, seed=2)
    assert not np.any(q.left == q.right)


def test_same_pairs_prefer_two_drawers_when_one_drawer_drew_twice():
    # Every character drawn twice by each of 3 drawers: a random pair of images
    # would share a drawer 1/5 of the time; resampling must remove that.
    alphabet = np.repeat(["a", "a", "b", "b"], 6)
    character = np.repeat([0, 1, 2, 3], 6)
    drawer = np.tile([1, 1, 2, 2, 3, 3], 4)
    cfg = PairConfig(pairs_per_epoch=5000, distorted_copies=0, drawers=(1, 2, 3))
    p = sample_pairs(alphabet, character, cfg, seed=0, drawer=drawer)
    same = p.same == 1
    assert not np.any(p.left == p.right)
    assert not np.any(drawer[p.left[same]] == drawer[p.right[same]])


def test_every_image_of_a_character_is_used(rows):
    alphabet, character, drawer = rows
    cfg = PairConfig(pairs_per_epoch=30_000, distorted_copies=0)
    p = sample_pairs(alphabet, character, cfg, seed=3, drawer=drawer)
    used = np.unique(np.concatenate([p.left, p.right]))
    allowed = np.flatnonzero(np.isin(drawer, cfg.drawers))
    assert np.array_equal(used, allowed)


@pytest.mark.parametrize("n_pairs", [1000, 1003, 9])
def test_equal_count_per_alphabet(rows, n_pairs):
    alphabet, character, drawer = rows
    cfg = PairConfig(pairs_per_epoch=n_pairs, distorted_copies=0)
    p = sample_pairs(alphabet, character, cfg, seed=4, drawer=drawer)
    per_alpha = np.bincount(p.alphabet, minlength=5)
    assert per_alpha.sum() == n_pairs
    assert per_alpha.max() - per_alpha.min() <= (0 if n_pairs % 5 == 0 else 1)
    same_per_alpha = np.bincount(p.alphabet[p.same == 1], minlength=5)
    assert same_per_alpha.max() - same_per_alpha.min() <= 1
    # alphabets differ in size (3..7 characters) yet get equal counts
    by_name = np.unique(alphabet[p.left], return_counts=True)[1]
    assert by_name.max() - by_name.min() <= 1


def test_seed_and_epoch_determinism(rows):
    alphabet, character, drawer = rows
    cfg = PairConfig(pairs_per_epoch=2000, distorted_copies=2)
    a = sample_pairs(alphabet, character, cfg, seed=7, epoch=3, drawer=drawer)
    b = sample_pairs(alphabet, character, cfg, seed=7, epoch=3, drawer=drawer)
    c = sample_pairs(alphabet, character, cfg, seed=7, epoch=4, drawer=drawer)
    d = sample_pairs(alphabet, character, cfg, seed=8, epoch=3, drawer=drawer)
    for field in ("left", "right", "same", "distort", "copy", "pair", "alphabet"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert np.mean(a.left != c.left) > 0.5
    assert np.mean(a.left != d.left) > 0.5


def test_drawer_restriction(rows):
    alphabet, character, drawer = rows
    cfg = PairConfig(pairs_per_epoch=5000, distorted_copies=0, drawers=(2, 5, 11))
    p = sample_pairs(alphabet, character, cfg, seed=5, drawer=drawer)
    assert set(np.unique(drawer[p.left])) | set(np.unique(drawer[p.right])) == {2, 5, 11}


def test_distorted_copy_layout(rows):
    alphabet, character, drawer = rows
    cfg = PairConfig(pairs_per_epoch=300, distorted_copies=8)
    p = sample_pairs(alphabet, character, cfg, seed=6, drawer=drawer)
    assert len(p) == 300 * 9 and p.n_pairs == 300
    assert not p.distort[:300].any() and p.distort[300:].all()
    for k in range(9):
        block = slice(k * 300, (k + 1) * 300)
        assert np.array_equal(p.left[block], p.left[:300])
        assert np.array_equal(p.right[block], p.right[:300])
        assert np.array_equal(p.same[block], p.same[:300])
        assert (p.copy[block] == k).all()
        assert np.array_equal(p.pair[block], np.arange(300))
    s = p.shuffled(0)
    assert len(s) == len(p) and np.array_equal(np.sort(s.pair), np.sort(p.pair))
    # a pair id always maps to the same images, wherever it was shuffled to
    assert np.array_equal(s.left, p.left[:300][s.pair])


def test_paper_sizes_without_drawer(rows):
    alphabet, character, _ = rows
    p = sample_pairs(alphabet, character, PairConfig(), seed=0)  # 30k x 9 = 270k
    assert len(p) == 270_000
    assert p.same.dtype == np.float32 and p.distort.dtype == bool


def test_any_negatives_cross_alphabets(rows):
    alphabet, character, drawer = rows
    cfg = PairConfig(pairs_per_epoch=5000, distorted_copies=0)
    p = sample_pairs(alphabet, character, cfg, seed=0, drawer=drawer, negatives="any")
    diff = p.same == 0
    assert np.all(character[p.left[diff]] != character[p.right[diff]])
    assert np.mean(alphabet[p.left[diff]] != alphabet[p.right[diff]]) > 0.5
    with pytest.raises(ValueError, match="negatives"):
        sample_pairs(alphabet, character, cfg, seed=0, negatives="hard")  # type: ignore[arg-type]


def test_subset_of_rows_gives_indices_into_the_subset(rows):
    alphabet, character, drawer = rows
    window = np.flatnonzero(np.isin(alphabet, ["alpha_1", "alpha_3"]))
    cfg = PairConfig(pairs_per_epoch=500, distorted_copies=0)
    p = sample_pairs(alphabet[window], character[window], cfg, seed=0, drawer=drawer[window])
    assert p.left.max() < window.size and p.alphabets == ("alpha_1", "alpha_3")
    assert np.array_equal(character[window][p.left] == character[window][p.right], p.same == 1)


def test_errors_name_the_problem():
    cfg = PairConfig(pairs_per_epoch=10, distorted_copies=0, drawers=(1, 2))
    # alphabet "b" has one character
    alphabet = np.array(["a"] * 4 + ["b"] * 2)
    character = np.array([0, 0, 1, 1, 2, 2])
    drawer = np.array([1, 2, 1, 2, 1, 2])
    with pytest.raises(ValueError, match="fewer than 2 characters"):
        sample_pairs(alphabet, character, cfg, seed=0, drawer=drawer)
    sample_pairs(alphabet, character, cfg, seed=0, drawer=drawer, negatives="any")  # fine
    # character 1 keeps only one usable image once drawer 3 is excluded
    drawer_bad = np.array([1, 2, 1, 3, 1, 2])
    with pytest.raises(ValueError, match="fewer than 2 usable images"):
        sample_pairs(alphabet, character, cfg, seed=0, drawer=drawer_bad, negatives="any")
    with pytest.raises(ValueError, match="no usable rows"):
        sample_pairs(alphabet, character, PairConfig(drawers=(7, 8)), seed=0, drawer=drawer)
