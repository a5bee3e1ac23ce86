"""Pair sampling: balance, no self-pairs, correct labels, per-group counts, sources, single-image classes."""

from __future__ import annotations

import numpy as np
import pytest

from siamese_core.config import PairConfig
from siamese_core.pairs import PairSet, name_keys, pairs_per_unit, sample_pairs, unit_pairs, unit_seed


def synthetic_rows(n_alphabets: int = 5, chars_per_alphabet=(3, 4, 5, 6, 7), drawers: int = 20,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Omniglot-like labels (every class made once by each source), rows shuffled."""
    alphabet, character, drawer = [], [], []
    cid = 100  # global ids not starting at 0, not contiguous with row order
    for a in range(n_alphabets):
        for _ in range(chars_per_alphabet[a % len(chars_per_alphabet)]):
            for d in range(1, drawers + 1):
                alphabet.append(f"alpha_{a}")
                character.append(cid)
                drawer.append(f"{d:02d}")
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
    p = sample_pairs(alphabet, character, cfg, seed=1, source=drawer)
    assert len(p) == 10_001
    assert int(p.same.sum()) == round(10_001 * 0.5)
    same = p.same == 1
    assert np.array_equal(character[p.left] == character[p.right], same)
    # different pairs use the same alphabet by default; same pairs trivially do
    assert np.array_equal(alphabet[p.left], alphabet[p.right])
    # the recorded group index names the pair's group
    assert np.array_equal(np.array(p.groups)[p.group], alphabet[p.left])


def test_uneven_same_fraction():
    alphabet, character, drawer = synthetic_rows()
    cfg = PairConfig(pairs_per_epoch=1000, distorted_copies=0, same_fraction=0.3)
    p = sample_pairs(alphabet, character, cfg, seed=0, source=drawer)
    assert int(p.same.sum()) == 300


def test_no_self_pairs_and_same_pairs_use_two_sources(rows):
    alphabet, character, drawer = rows
    cfg = PairConfig(pairs_per_epoch=20_000, distorted_copies=0)
    p = sample_pairs(alphabet, character, cfg, seed=2, source=drawer)
    assert not np.any(p.left == p.right)
    same = p.same == 1
    assert not np.any(drawer[p.left[same]] == drawer[p.right[same]])
    # without sources (no resampling by source) an image is still never paired with itself
    q = sample_pairs(alphabet, character, cfg, seed=2)
    assert not np.any(q.left == q.right)


def test_same_pairs_prefer_two_sources_when_one_source_made_two():
    # Every class made twice by each of 3 sources: a random pair of images
    # would share a source 1/5 of the time; resampling must remove that.
    alphabet = np.repeat(["a", "a", "b", "b"], 6)
    character = np.repeat([0, 1, 2, 3], 6)
    drawer = np.tile(["1", "1", "2", "2", "3", "3"], 4)
    cfg = PairConfig(pairs_per_epoch=5000, distorted_copies=0, sources=("1", "2", "3"))
    p = sample_pairs(alphabet, character, cfg, seed=0, source=drawer)
    same = p.same == 1
    assert not np.any(p.left == p.right)
    assert not np.any(drawer[p.left[same]] == drawer[p.right[same]])


def test_every_image_of_the_allowed_sources_is_used(rows):
    alphabet, character, drawer = rows
    cfg = PairConfig(pairs_per_epoch=30_000, distorted_copies=0, sources=tuple(f"{d:02d}" for d in range(1, 13)))
    p = sample_pairs(alphabet, character, cfg, seed=3, source=drawer)
    used = np.unique(np.concatenate([p.left, p.right]))
    allowed = np.flatnonzero(np.isin(drawer, cfg.sources))
    assert np.array_equal(used, allowed)


@pytest.mark.parametrize("n_pairs", [1000, 1003, 9])
def test_equal_count_per_group(rows, n_pairs):
    alphabet, character, drawer = rows
    cfg = PairConfig(pairs_per_epoch=n_pairs, distorted_copies=0)
    p = sample_pairs(alphabet, character, cfg, seed=4, source=drawer)
    per_alpha = np.bincount(p.group, minlength=5)
    assert per_alpha.sum() == n_pairs
    assert per_alpha.max() - per_alpha.min() <= (0 if n_pairs % 5 == 0 else 1)
    same_per_alpha = np.bincount(p.group[p.same == 1], minlength=5)
    assert same_per_alpha.max() - same_per_alpha.min() <= 1
    # alphabets differ in size (3..7 characters) yet get equal counts
    by_name = np.unique(alphabet[p.left], return_counts=True)[1]
    assert by_name.max() - by_name.min() <= 1


def test_seed_and_epoch_determinism(rows):
    alphabet, character, drawer = rows
    cfg = PairConfig(pairs_per_epoch=2000, distorted_copies=2)
    a = sample_pairs(alphabet, character, cfg, seed=7, epoch=3, source=drawer)
    b = sample_pairs(alphabet, character, cfg, seed=7, epoch=3, source=drawer)
    c = sample_pairs(alphabet, character, cfg, seed=7, epoch=4, source=drawer)
    d = sample_pairs(alphabet, character, cfg, seed=8, epoch=3, source=drawer)
    for field in ("left", "right", "same", "distort", "copy", "pair", "group"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert np.mean(a.left != c.left) > 0.5
    assert np.mean(a.left != d.left) > 0.5


def test_source_restriction(rows):
    alphabet, character, drawer = rows
    cfg = PairConfig(pairs_per_epoch=5000, distorted_copies=0, sources=("02", "05", "11"))
    p = sample_pairs(alphabet, character, cfg, seed=5, source=drawer)
    assert set(np.unique(drawer[p.left])) | set(np.unique(drawer[p.right])) == {"02", "05", "11"}
    with pytest.raises(ValueError, match="no source"):
        sample_pairs(alphabet, character, cfg, seed=5)


def test_distorted_copy_layout(rows):
    alphabet, character, drawer = rows
    cfg = PairConfig(pairs_per_epoch=300, distorted_copies=8)
    p = sample_pairs(alphabet, character, cfg, seed=6, source=drawer)
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


def test_paper_sizes_without_source(rows):
    alphabet, character, _ = rows
    p = sample_pairs(alphabet, character, PairConfig(), seed=0)  # 30k x 9 = 270k
    assert len(p) == 270_000
    assert p.same.dtype == np.float32 and p.distort.dtype == bool


def test_any_negatives_cross_alphabets(rows):
    alphabet, character, drawer = rows
    cfg = PairConfig(pairs_per_epoch=5000, distorted_copies=0)
    p = sample_pairs(alphabet, character, cfg, seed=0, source=drawer, negatives="any")
    diff = p.same == 0
    assert np.all(character[p.left[diff]] != character[p.right[diff]])
    assert np.mean(alphabet[p.left[diff]] != alphabet[p.right[diff]]) > 0.5
    with pytest.raises(ValueError, match="negatives"):
        sample_pairs(alphabet, character, cfg, seed=0, negatives="hard")  # type: ignore[arg-type]


def test_subset_of_rows_gives_indices_into_the_subset(rows):
    alphabet, character, drawer = rows
    window = np.flatnonzero(np.isin(alphabet, ["alpha_1", "alpha_3"]))
    cfg = PairConfig(pairs_per_epoch=500, distorted_copies=0)
    p = sample_pairs(alphabet[window], character[window], cfg, seed=0, source=drawer[window])
    assert p.left.max() < window.size and p.groups == ("alpha_1", "alpha_3")
    assert np.array_equal(character[window][p.left] == character[window][p.right], p.same == 1)


def test_errors_name_the_problem():
    cfg = PairConfig(pairs_per_epoch=10, distorted_copies=0, sources=("1", "2"))
    alphabet = np.array(["a"] * 4 + ["b"] * 2)
    character = np.array([0, 0, 1, 1, 2, 2])
    drawer = np.array(["1", "2", "1", "2", "1", "2"])
    # group "b" has one class: it gets no "different" pairs, "a" gets them all
    p = sample_pairs(alphabet, character, cfg, seed=0, source=drawer)
    assert set(alphabet[p.left[p.same == 0]]) == {"a"}
    one_class_each = np.array(["a", "a", "b", "b", "c", "c"])
    with pytest.raises(ValueError, match="no group has 2 classes"):
        sample_pairs(one_class_each, character, cfg, seed=0, source=drawer)
    sample_pairs(one_class_each, character, cfg, seed=0, source=drawer, negatives="any")  # fine
    singles = np.arange(6)
    with pytest.raises(ValueError, match="no class has 2 usable images"):
        sample_pairs(None, singles, cfg, seed=0, source=drawer)
    with pytest.raises(ValueError, match="no usable rows"):
        sample_pairs(alphabet, character, PairConfig(sources=("7", "8")), seed=0, source=drawer)


def test_single_image_classes_serve_only_as_negatives():
    # no groups: classes 0..3 have 3 images each, classes 10..19 a single image
    label = np.concatenate([np.repeat(np.arange(4), 3), np.arange(10, 20)])
    cfg = PairConfig(pairs_per_epoch=4000, distorted_copies=0)
    p = sample_pairs(None, label, cfg, seed=0)
    same = p.same == 1
    assert not np.isin(label[p.left[same]], np.arange(10, 20)).any()
    assert np.array_equal(label[p.left] == label[p.right], same)
    negatives = np.concatenate([label[p.left[~same]], label[p.right[~same]]])
    assert np.isin(np.arange(10, 20), negatives).all()  # every single-image class served as a negative
    assert not np.any(p.left == p.right)


def test_units_draw_their_own_pairs_and_their_share():
    label = np.repeat(np.arange(6), 4)
    cfg = PairConfig(pairs_per_epoch=600, distorted_copies=0)
    a = unit_pairs(None, label, cfg, 0, 1, "shard 0", 100)
    b = unit_pairs(None, label, cfg, 0, 1, "shard 0", 100)
    c = unit_pairs(None, label, cfg, 0, 1, "shard 1", 100)
    assert len(a) == 100 and np.array_equal(a.left, b.left)
    assert np.mean(a.left != c.left) > 0.5  # another unit, another stream
    assert unit_seed(0, "Latin") != unit_seed(1, "Latin") and unit_seed(0, "Latin") == unit_seed(0, "Latin")
    # an equal share per group; per class where there are no groups
    assert pairs_per_unit(cfg, True, n_groups=3, unit_classes=1, total_classes=60) == 200
    assert pairs_per_unit(cfg, False, n_groups=3, unit_classes=15, total_classes=60) == 150


def test_name_keys_are_stable_and_distinct():
    names = np.array(["Latin.character01", "Latin.character02", "w_0013f2", "new_whale"])
    keys = name_keys(names)
    assert keys.dtype == np.int64 and (keys >= 0).all() and len(set(keys.tolist())) == 4
    assert np.array_equal(keys, name_keys(names.astype(object)))
    # blake2b of the UTF-8 name, first 8 bytes little-endian, shifted to 63 bits
    import hashlib
    assert keys[0] == int.from_bytes(hashlib.blake2b(b"Latin.character01", digest_size=8).digest(), "little") >> 1
