"""Hard-pair mining: assignment rules, optimality, blocks, same partners, schedule, determinism."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from siamese_core.mining import (
    MinedPairs,
    NoiseSchedule,
    assign,
    hard_negatives,
    key_pairs,
    logit_scorer,
    mine_pairs,
    pair_keys,
    random_blocks,
    same_partners,
)

ROOT = Path(__file__).resolve().parents[1]


def labels_of(sizes: list[int], seed: int = 0) -> np.ndarray:
    """Class ids (not 0..C-1: 7, 10, 13, ...) with the given class sizes, in a shuffled order."""
    labels = np.repeat(7 + 3 * np.arange(len(sizes)), sizes)
    return np.random.default_rng(seed).permutation(labels)


def assert_valid_negatives(partner: np.ndarray, labels: np.ndarray) -> None:
    """Each partner is another image of another class; no image is anyone's partner twice."""
    assert partner.shape == labels.shape and partner.dtype == np.int64
    paired = np.flatnonzero(partner >= 0)
    assert (partner[paired] != paired).all()
    assert (labels[partner[paired]] != labels[paired]).all()
    assert np.unique(partner[paired]).size == paired.size
    assert (partner[partner < 0] == -1).all()


def fewest_unpaired(labels: np.ndarray) -> int:
    """Hall's theorem for 'any other class': a class of m > n/2 leaves 2m - n rows unmatched."""
    if labels.size == 0:
        return 0
    return max(0, 2 * int(np.unique(labels, return_counts=True)[1].max()) - labels.size)


# --- noise schedule ---------------------------------------------------------------------


def test_linear_schedule_anneals_from_start_to_end_then_stays():
    s = NoiseSchedule(start=10.0, end=1.0, epochs=9, shape="linear")
    assert s.scale(0) == 10.0
    assert s.scale(3) == pytest.approx(7.0)  # 10 - 9 * 3/9
    assert s.scale(9) == 1.0
    values = [s.scale(e) for e in range(30)]
    assert all(a > b for a, b in zip(values[:9], values[1:10]))  # strictly down while annealing
    assert values[9:] == [1.0] * 21


def test_exponential_schedule_is_geometric_and_respects_first_epoch():
    s = NoiseSchedule(start=100.0, end=1.0, epochs=4, shape="exponential", first_epoch=5)
    assert s.scale(0) == s.scale(5) == 100.0  # before and at the first mining epoch
    assert s.scale(7) == pytest.approx(10.0)  # halfway in log space: the geometric mean
    ratios = [s.scale(e + 1) / s.scale(e) for e in range(5, 9)]
    assert ratios == pytest.approx([10 ** -0.5] * 4)  # a constant factor per epoch
    assert [s.scale(e) for e in range(9, 20)] == [1.0] * 11
    # It spends its epochs lower than the linear schedule between the same end points.
    linear = NoiseSchedule(start=100.0, end=1.0, epochs=4, shape="linear", first_epoch=5)
    assert all(s.scale(e) < linear.scale(e) for e in range(6, 9))


@pytest.mark.parametrize("kwargs, match", [
    (dict(start=-1.0, end=0.0, epochs=3), "start must be >= 0"),
    (dict(start=1.0, end=math.nan, epochs=3), "end must be a finite number"),
    (dict(start=1.0, end=0.0, epochs=0), "epochs must be >= 1"),
    (dict(start=1.0, end=0.0, epochs=2.5), "epochs must be an int"),
    (dict(start=1.0, end=0.0, epochs=3, shape="cosine"), "shape must be 'linear' or 'exponential'"),
    (dict(start=1.0, end=0.0, epochs=3, shape="exponential"), "needs start > 0 and end > 0"),
    (dict(start=1.0, end=0.0, epochs=3, first_epoch=-1), "first_epoch must be >= 0"),
])
def test_schedule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule(**kwargs)


# --- hard negatives -----------------------------------------------------------------------


def test_negatives_never_pair_an_image_with_itself_or_its_class_even_when_those_score_highest():
    labels = labels_of([1, 1, 1, 2, 5, 8, 20, 13, 30])  # single-image classes too
    n = labels.size
    rng = np.random.default_rng(1)
    scores = rng.normal(0, 1, (n, n))
    same = labels[:, None] == labels[None, :]
    scores[same] = 1e9  # a model sure that same-class pairs are alike: the tempting wrong cells
    for noise in (0.0, 5.0):
        partner = hard_negatives(scores, labels, noise, np.random.default_rng(2))
        assert_valid_negatives(partner, labels)
        assert (partner >= 0).all()  # no class holds half the images: everyone has a partner


def test_a_dominant_class_leaves_the_fewest_images_unpaired_never_wrongly_paired():
    labels = np.array([3, 3, 3, 3, 3, 3, 3, 8, 9, 9])  # class 3 holds 7 of 10
    for seed in range(5):
        scores = np.random.default_rng(seed).normal(0, 1, (10, 10))
        partner = hard_negatives(scores, labels, 1.0, np.random.default_rng(seed))
        assert_valid_negatives(partner, labels)
        unpaired = np.flatnonzero(partner < 0)
        assert unpaired.size == 2 * 7 - 10  # 7 rows of class 3 can use only 3 other columns
        assert (labels[unpaired] == 3).all()


def test_blocks_with_a_dominant_class_keep_the_rules_and_the_fewest_unpaired_per_block():
    labels = labels_of([130, 20, 20, 15, 10, 1, 1, 1, 1, 1], seed=4)  # class 7 is 65% of 200
    rng_seed, block_size = 11, 64
    partner = hard_negatives(np.random.default_rng(0).normal(0, 1, (200, 200)), labels, 0.5,
                             np.random.default_rng(rng_seed), block_size=block_size)
    assert_valid_negatives(partner, labels)
    blocks = random_blocks(200, block_size, np.random.default_rng(rng_seed))  # drawn first, as documented
    assert len(blocks) == 4
    for block in blocks:
        paired = block[partner[block] >= 0]
        assert np.isin(partner[paired], block).all()
        assert (partner[block] < 0).sum() == fewest_unpaired(labels[block]) > 0


@pytest.mark.parametrize("labels", [[0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 2], [5, 9, 5, 9, 5, 9]])
def test_zero_noise_assignment_is_the_brute_force_optimum(labels):
    labels = np.array(labels)
    valid = [p for p in itertools.permutations(range(6)) if all(labels[i] != labels[p[i]] for i in range(6))]
    assert valid
    for seed in range(10):
        scores = np.random.default_rng(seed).normal(0, 2, (6, 6))
        best = max(valid, key=lambda p: sum(scores[i, p[i]] for i in range(6)))
        partner = hard_negatives(scores, labels, 0.0, np.random.default_rng(seed))
        assert partner.tolist() == list(best)


def test_zero_noise_optimum_with_exclusions_matches_brute_force():
    labels = np.array([0, 0, 1, 1, 2, 2])
    exclude = {(0, 2), (3, 1), (4, 0)}  # either orientation; unordered
    banned = {frozenset(p) for p in exclude}
    valid = [p for p in itertools.permutations(range(6))
             if all(labels[i] != labels[p[i]] and frozenset((i, p[i])) not in banned for i in range(6))]
    assert valid
    for seed in range(10):
        scores = np.random.default_rng(100 + seed).normal(0, 2, (6, 6))
        best = max(valid, key=lambda p: sum(scores[i, p[i]] for i in range(6)))
        assert hard_negatives(scores, labels, 0.0, np.random.default_rng(0), exclude=exclude).tolist() == list(best)


def test_excluded_pairs_are_not_chosen_again_while_alternatives_exist():
    labels = labels_of([6, 6, 6, 6])
    n = labels.size
    scores = np.random.default_rng(3).normal(0, 1, (n, n))
    first = hard_negatives(scores, labels, 0.0, np.random.default_rng(0))
    again = hard_negatives(scores, labels, 0.0, np.random.default_rng(1))
    assert again.tolist() == first.tolist()  # control: without exclusion, zero noise repeats itself
    used = {(j, i) for i, j in enumerate(first)}  # reversed orientation must exclude too
    second = hard_negatives(scores, labels, 0.0, np.random.default_rng(0), exclude=used)
    assert_valid_negatives(second, labels)
    assert (second >= 0).all()
    new = set(pair_keys(np.arange(n), second, n).tolist())
    assert not new & set(pair_keys(np.arange(n), first, n).tolist())


def test_every_pair_excluded_leaves_images_unpaired_rather_than_repeated():
    labels = np.array([0, 0, 1, 1])
    all_cross = np.array([[0, 2], [0, 3], [1, 2], [1, 3]])
    partner = hard_negatives(np.zeros((4, 4)), labels, 1.0, np.random.default_rng(0), exclude=all_cross)
    assert partner.tolist() == [-1, -1, -1, -1]
    partner = hard_negatives(np.zeros((4, 4)), labels, 1.0, np.random.default_rng(0), exclude=all_cross[:3])
    assert partner.tolist() == [-1, 3, -1, 1]  # only (1, 3) is left: 1 <-> 3, the rest unpaired


def test_blocked_solving_covers_every_image_once_and_never_scores_beyond_a_block():
    n, block_size = 1000, 256
    labels = np.random.default_rng(5).integers(0, 40, n)
    full = np.random.default_rng(6).normal(0, 1, (n, n))
    calls = []

    def score_block(rows, cols):
        calls.append((rows.size, cols.size))
        return full[np.ix_(rows, cols)]

    from_fn = hard_negatives(score_block, labels, 0.3, np.random.default_rng(7), block_size=block_size)
    from_full = hard_negatives(full, labels, 0.3, np.random.default_rng(7), block_size=block_size)
    assert from_fn.tolist() == from_full.tolist()
    assert len(calls) == 4 and all(r == c == 250 for r, c in calls)  # never N x N
    assert_valid_negatives(from_fn, labels)
    assert np.array_equal(np.sort(from_fn), np.arange(n))  # everyone is a partner exactly once
    for block in random_blocks(n, block_size, np.random.default_rng(7)):
        assert np.isin(from_fn[block], block).all()


def test_the_callers_scores_are_never_written():
    labels = np.array([0, 0, 1, 1])
    stored = np.arange(16, dtype=np.float64).reshape(4, 4)
    hard_negatives(lambda r, c: stored, labels, 0.0, np.random.default_rng(0))  # hands back its own array
    assert stored.tolist() == np.arange(16).reshape(4, 4).tolist()


def test_random_blocks_partition_into_near_equal_blocks():
    blocks = random_blocks(1001, 250, np.random.default_rng(0))
    assert sorted(b.size for b in blocks) == [200, 200, 200, 200, 201]
    assert np.array_equal(np.sort(np.concatenate(blocks)), np.arange(1001))
    assert [b.tolist() for b in random_blocks(10, 10, np.random.default_rng(0))] == [list(range(10))]
    # Seeded and random: another generator state gives another partition.
    again = random_blocks(1001, 250, np.random.default_rng(0))
    other = random_blocks(1001, 250, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(blocks, again))
    assert not all(np.array_equal(a, b) for a, b in zip(blocks, other))


def test_noise_changes_the_partners_and_zero_noise_does_not():
    labels = labels_of([10] * 6)
    scores = np.random.default_rng(8).normal(0, 1, (60, 60))
    noisy = {tuple(hard_negatives(scores, labels, 50.0, np.random.default_rng(s))) for s in range(4)}
    quiet = {tuple(hard_negatives(scores, labels, 0.0, np.random.default_rng(s))) for s in range(4)}
    assert len(noisy) == 4 and len(quiet) == 1


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(scores=np.zeros((4, 5))), ValueError, r"scores must be \[N, N\]"),
    (dict(scores=np.full((4, 4), np.nan)), ValueError, "NaN or infinite"),
    (dict(scores=lambda r, c: np.zeros((r.size, 1))), ValueError, "score_block returned shape"),
    (dict(noise_scale=-1.0), ValueError, "noise_scale must be"),
    (dict(block_size=1), ValueError, "block_size must be"),
    (dict(exclude=np.array([[0, 9]])), ValueError, "exclude pairs must index images"),
])
def test_hard_negatives_rejects_bad_arguments(kwargs, error, match):
    args = dict(scores=np.zeros((4, 4)), labels=np.array([0, 0, 1, 1]), noise_scale=0.0,
                rng=np.random.default_rng(0))
    with pytest.raises(error, match=match):
        hard_negatives(**{**args, **kwargs})


# --- same partners ------------------------------------------------------------------------


def test_same_partners_are_derangements_within_each_class_and_singles_get_minus_one():
    labels = labels_of([1, 2, 3, 20, 1, 7], seed=2)
    for seed in range(5):
        partner = same_partners(labels, np.random.default_rng(seed))
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            if members.size == 1:
                assert partner[members].tolist() == [-1]
                continue
            assert (partner[members] != members).all()
            assert sorted(partner[members].tolist()) == sorted(members.tolist())  # a permutation of the class


def test_same_partners_vary_with_the_generator():
    labels = labels_of([20, 20])
    image = int(np.flatnonzero(labels == labels[0])[0])
    seen = {int(same_partners(labels, np.random.default_rng(s))[image]) for s in range(60)}
    assert len(seen) >= 10  # of 19 possible partners


# --- one epoch's pairs ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def group():
    labels = labels_of([20] * 12 + [1, 1], seed=3)  # 242 images, two single-image classes
    scores = np.random.default_rng(10).normal(0, 2, (labels.size, labels.size))
    return labels, (scores + scores.T) / 2  # symmetric, as the weighted-L1 head's logits are


def test_mined_pairs_are_balanced_and_correctly_labelled(group):
    labels, scores = group
    p = mine_pairs(labels, scores, seed=1, epoch=0, n_pairs=201, noise_scale=1.0)
    assert (len(p), p.requested_same, p.requested_different) == (201, 100, 101)  # round(100.5) = 100
    assert (p.n_same, p.n_different, p.same_shortfall, p.different_shortfall) == (100, 101, 0, 0)
    assert np.array_equal(p.same == 1.0, labels[p.left] == labels[p.right])
    assert (p.left != p.right).all()
    keys = pair_keys(p.left, p.right, labels.size)
    assert np.unique(keys).size == len(p)  # without replacement
    assert np.array_equal(p.used, np.sort(keys[p.same == 0]))
    assert p.unpaired == 0
    q = mine_pairs(labels, scores, seed=1, epoch=0, n_pairs=200, same_fraction=0.25, noise_scale=1.0)
    assert (q.n_same, q.n_different) == (50, 150)


def test_fewer_available_pairs_than_asked_takes_all_and_says_so():
    labels = np.array([0, 0, 0, 1, 1, 2])  # same pairs: a 3-cycle (3) + a swap (1) = 4 distinct
    p = mine_pairs(labels, np.zeros((6, 6)), seed=0, epoch=0, n_pairs=40, noise_scale=1.0)
    assert (p.n_same, p.same_shortfall) == (4, 16)
    assert p.n_different <= 6 and p.different_shortfall == 20 - p.n_different


def test_a_two_cycle_is_one_pair_not_two():
    labels = np.array([4, 9])  # the only assignment: 0 -> 1 and 1 -> 0, the same unordered pair
    assert hard_negatives(np.zeros((2, 2)), labels, 0.0, np.random.default_rng(0)).tolist() == [1, 0]
    p = mine_pairs(labels, np.zeros((2, 2)), seed=0, epoch=0, n_pairs=2, same_fraction=0.0, noise_scale=0.0)
    assert (p.n_different, p.different_shortfall, p.used.tolist()) == (1, 1, [1])  # key 0 * 2 + 1


def test_same_inputs_give_the_same_pairs_and_another_epoch_or_seed_others(group):
    labels, scores = group
    kw = dict(n_pairs=100, noise_scale=2.0)
    a = mine_pairs(labels, scores, seed=5, epoch=3, **kw).to_arrays()
    b = mine_pairs(labels, scores.copy(), seed=5, epoch=3, **kw).to_arrays()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    for other in (dict(seed=5, epoch=4), dict(seed=6, epoch=3)):
        c = mine_pairs(labels, scores, **other, **kw).to_arrays()
        assert not np.array_equal(a["used"], c["used"])  # other different pairs
        assert not np.array_equal(a["left"], c["left"])


def test_used_pairs_are_never_served_again_across_epochs(group):
    labels, scores = group
    kw = dict(n_pairs=600, noise_scale=0.0)  # asks for more than one assignment holds: all are taken
    served, used = set(), None
    for epoch in range(6):
        p = mine_pairs(labels, scores, seed=0, epoch=epoch, used=used, **kw)
        diff = set(pair_keys(p.left, p.right, labels.size)[p.same == 0].tolist())
        assert len(diff) >= 100 and not diff & served  # symmetric scores: many 2-cycles, ~N/2 distinct
        served |= diff
        assert set(p.used.tolist()) == served
        used = p.used
    # Control: without the used state, zero noise serves the same different pairs again.
    first, again = (mine_pairs(labels, scores, seed=0, epoch=e, **kw) for e in (0, 1))
    assert np.array_equal(first.used, again.used)


def test_block_function_and_full_matrix_give_the_same_epoch(group):
    labels, scores = group
    kw = dict(seed=2, epoch=1, n_pairs=150, noise_scale=1.0, block_size=100)
    a = mine_pairs(labels, scores, **kw)
    b = mine_pairs(labels, lambda r, c: scores[np.ix_(r, c)], **kw)
    assert all(np.array_equal(x, y) for x, y in zip(a.to_arrays().values(), b.to_arrays().values()))


def test_pairs_round_trip_through_plain_arrays(group, tmp_path):
    labels, scores = group
    p = mine_pairs(labels, scores, seed=0, epoch=0, n_pairs=80, noise_scale=1.0)
    np.savez(tmp_path / "pairs.npz", **p.to_arrays())
    with np.load(tmp_path / "pairs.npz") as stored:
        q = MinedPairs.from_arrays(dict(stored))
    for field in ("left", "right", "same", "used"):
        assert np.array_equal(getattr(q, field), getattr(p, field)) and getattr(q, field).dtype == getattr(p, field).dtype
    assert (q.n_images, q.requested_same, q.requested_different, q.unpaired) == \
        (p.n_images, p.requested_same, p.requested_different, p.unpaired)
    bad = p.to_arrays()
    bad["used"] = bad["used"][::-1].copy()
    with pytest.raises(ValueError, match="sorted unique"):
        MinedPairs.from_arrays(bad)


def test_used_state_is_checked_against_the_group(group):
    labels, scores = group
    with pytest.raises(ValueError, match="exclude keys must lie in"):
        mine_pairs(labels, scores, seed=0, epoch=0, n_pairs=10, noise_scale=0.0,
                   used=np.array([labels.size ** 2 + 1]))
    with pytest.raises(ValueError, match="same_fraction"):
        mine_pairs(labels, scores, seed=0, epoch=0, n_pairs=10, noise_scale=0.0, same_fraction=1.5)


def test_pair_keys_are_unordered_and_invertible():
    i, j = np.array([3, 7, 0]), np.array([7, 3, 9])
    keys = pair_keys(i, j, 10)
    assert keys.tolist() == [37, 37, 9]
    assert [x.tolist() for x in key_pairs(keys, 10)] == [[3, 3, 0], [7, 7, 9]]


# --- model scoring, layering, benchmark -------------------------------------------------------


def test_logit_scorer_scores_blocks_with_the_models_head():
    import torch

    from siamese_core.model import build_model

    model = build_model("cpu-small", seed=0).eval()
    h = torch.rand(12, model.config.embedding_dim, generator=torch.Generator().manual_seed(0))
    block = logit_scorer(model, h)(np.array([2, 5]), np.array([0, 11, 5]))
    assert block.shape == (2, 3) and block.dtype == np.float64
    for a, r in enumerate((2, 5)):
        for b, c in enumerate((0, 11, 5)):
            expected = float(model.head(torch.abs(h[r] - h[c])).item())
            assert block[a, b] == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_mining_imports_no_ray_mlflow_pyarrow_or_workflows():
    code = ("import sys, siamese_core.mining; "
            "bad = [m for m in ('ray', 'mlflow', 'pyarrow', 'workflows') if m in sys.modules]; "
            "print(siamese_core.mining.__file__); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == str(ROOT / "siamese_core" / "mining.py")


def test_assignment_benchmark_prints_each_size_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_assignment.py"), "--sizes", "8", "16",
         "--repeats", "1", "--masked", "--json", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(r["kind"], r["size"]) for r in report["results"]] == [
        ("dense", 8), ("dense", 16), ("masked", 8), ("masked", 16)]
    assert len([line for line in proc.stdout.splitlines() if " x " in line]) == 4
    if report["lap"] is None:
        assert "lap.lapjv skipped" in proc.stdout
    else:
        assert all(r["same_total"] for r in report["results"])
