"""Lake's within-alphabet N-way one-shot protocol: trial construction and strict scoring."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from siamese_core.config import VALIDATION_ONESHOT, OneShotConfig
from siamese_core.oneshot import (
    OneShotRun,
    make_trials,
    oracle_score_fn,
    pixel_nearest_neighbour,
    random_score_fn,
    score_runs,
)


def synthetic_labels(n_alphabets: int = 10, chars: int = 25, drawers: int = 20, seed: int = 0):
    """Omniglot-like labels, rows shuffled: every character drawn once by each drawer."""
    a = np.repeat([f"alpha_{i}" for i in range(n_alphabets)], chars * drawers)
    c = np.repeat(np.arange(n_alphabets * chars) + 964, drawers)
    d = np.tile(np.arange(1, drawers + 1), n_alphabets * chars)
    perm = np.random.default_rng(seed).permutation(a.size)
    return a[perm], c[perm], d[perm]


@pytest.fixture(scope="module")
def labels():
    return synthetic_labels()


@pytest.fixture(scope="module")
def runs(labels):
    a, c, d = labels
    return make_trials(a, c, d, [f"alpha_{i}" for i in range(10)], OneShotConfig(), seed=0)


def test_lake_sizes(runs):
    assert len(runs) == 20
    assert sum(r.queries.size for r in runs) == 400
    assert all(r.n_way == 20 and r.queries.size == 20 for r in runs)
    assert [r.alphabet for r in runs] == [f"alpha_{i}" for i in range(10) for _ in range(2)]


def test_runs_stay_within_one_alphabet_and_use_two_drawers(labels, runs):
    a, c, d = labels
    for run in runs:
        assert set(a[run.support]) == {run.alphabet} and set(a[run.queries]) == {run.alphabet}
        assert len(set(c[run.support])) == run.n_way
        assert set(c[run.support]) == set(c[run.queries])
        assert (d[run.support] == run.support_drawer).all()
        assert (d[run.queries] == run.query_drawer).all()
        assert run.support_drawer != run.query_drawer
        # the answer points at the query's own character
        assert np.array_equal(c[run.support[run.answer]], c[run.queries])
    for i in range(0, len(runs), 2):
        first, second = runs[i], runs[i + 1]
        assert {first.support_drawer, first.query_drawer} != {second.support_drawer, second.query_drawer}


def test_true_class_position_is_spread(runs):
    answers = np.concatenate([r.answer for r in runs])
    counts = np.bincount(answers, minlength=20)
    assert counts.size == 20 and (counts > 0).all()  # every position holds some true class
    # each run's answers are a permutation of 0..N-1, and runs differ in order
    assert all(np.array_equal(np.sort(r.answer), np.arange(20)) for r in runs)
    assert len({tuple(r.answer) for r in runs}) == len(runs)
    assert np.mean([r.answer[0] == 0 for r in runs]) < 0.5
    # the support drawer is not always the smaller of the two
    assert len({r.support_drawer < r.query_drawer for r in runs}) == 2


def test_oracle_gives_100_percent(labels, runs):
    _, c, _ = labels
    result = score_runs(runs, oracle_score_fn(c))
    assert result.accuracy == 1.0 and result.correct == result.trials == 400
    assert set(result.per_alphabet.values()) == {1.0}
    assert np.array_equal(result.predicted, result.answer)


def test_all_ties_give_0_percent(runs):
    result = score_runs(runs, lambda q, s: np.zeros((len(q), len(s))))
    assert result.accuracy == 0.0 and result.correct == 0
    # a tie is recorded as a wrong prediction, never as the answer
    assert not np.any(result.predicted == result.answer)


def test_tie_between_true_class_and_one_other_is_not_credited(labels, runs):
    _, c, _ = labels
    oracle = oracle_score_fn(c)

    def one_tie(q, s):
        scores = oracle(q, s)
        scores[:, 0] = 1.0  # support position 0 looks like every query's class
        return scores

    result = score_runs(runs, one_tie)
    # only the query whose true class sits at position 0 has no tie
    expected = np.concatenate([r.answer for r in runs]) == 0
    assert np.array_equal(result.is_correct, expected) and result.correct == len(runs)
    assert not np.any(result.predicted[~expected] == result.answer[~expected])


def test_nan_scores_are_not_credited(labels, runs):
    _, c, _ = labels
    oracle = oracle_score_fn(c)

    def with_nan(q, s):
        scores = oracle(q, s)
        scores[0, :] = np.nan
        return scores

    result = score_runs(runs, with_nan)
    assert result.correct == 400 - len(runs)


def test_random_scores_give_chance(labels):
    a, c, d = labels
    cfg = OneShotConfig(n_way=20, runs_per_alphabet=20)
    runs = make_trials(a, c, d, [f"alpha_{i}" for i in range(10)], cfg, seed=1)
    result = score_runs(runs, random_score_fn(0))
    n, p = result.trials, 1 / 20
    assert n == 4000
    assert abs(result.accuracy - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_same_seed_same_trials(labels):
    a, c, d = labels
    alphabets = [f"alpha_{i}" for i in range(10)]
    x = make_trials(a, c, d, alphabets, OneShotConfig(), seed=5)
    y = make_trials(a, c, d, alphabets, OneShotConfig(), seed=5)
    z = make_trials(a, c, d, alphabets, OneShotConfig(), seed=6)
    assert all(np.array_equal(r.support, s.support) and np.array_equal(r.queries, s.queries)
               for r, s in zip(x, y))
    assert not all(np.array_equal(r.support, s.support) for r, s in zip(x, z))


def test_validation_size_and_small_n_way(labels):
    a, c, d = labels
    runs = make_trials(a, c, d, [f"alpha_{i}" for i in range(10)], VALIDATION_ONESHOT, seed=0)
    assert sum(r.queries.size for r in runs) == 320  # Koch's validation size, 10 alphabets
    assert all(r.n_way == 20 and r.queries.size == 16 for r in runs)
    for run in runs:  # each kept query still finds its own character in the support
        assert np.array_equal(c[run.support[run.answer]], c[run.queries])
    runs5 = make_trials(a, c, d, ["alpha_0"], OneShotConfig(n_way=5, runs_per_alphabet=3), seed=0)
    assert [r.n_way for r in runs5] == [5, 5, 5]


def test_errors(labels):
    a, c, d = labels
    with pytest.raises(ValueError, match="fewer than n_way"):
        make_trials(a, c, d, ["alpha_0"], OneShotConfig(n_way=26), seed=0)
    with pytest.raises(ValueError, match="no rows"):
        make_trials(a, c, d, ["nope"], OneShotConfig(), seed=0)
    two_drawers = np.isin(d, [1, 2])
    with pytest.raises(ValueError, match="drawers"):
        make_trials(a[two_drawers], c[two_drawers], d[two_drawers], ["alpha_0"],
                    OneShotConfig(runs_per_alphabet=2), seed=0)
    run = OneShotRun("x", np.arange(3), np.arange(3), np.arange(3), 1, 2)
    with pytest.raises(ValueError, match="shape"):
        score_runs([run], lambda q, s: np.zeros((3, 2)))


def test_pixel_nearest_neighbour_is_minus_squared_distance():
    rng = np.random.default_rng(0)
    images = (rng.random((6, 7, 7)) < 0.3).astype(np.uint8)
    score = pixel_nearest_neighbour(images)(np.array([0, 1]), np.array([2, 3, 4]))
    expected = -np.array([[np.sum((images[i].astype(int) - images[j]) ** 2) for j in (2, 3, 4)]
                          for i in (0, 1)])
    assert np.array_equal(score, expected)
    # a query identical to one support image picks it
    images[5] = images[3]
    run = OneShotRun("x", np.array([2, 3, 4]), np.array([5]), np.array([1]), 1, 2)
    assert score_runs([run], pixel_nearest_neighbour(images)).accuracy == 1.0


def test_pixel_baseline_on_real_test_alphabets(omniglot_dir: Path):
    from siamese_core.omniglot import LAKE_TEST_ALPHABETS, load_split

    data = load_split(omniglot_dir, "test")
    assert set(np.unique(data.alphabet)) == set(LAKE_TEST_ALPHABETS)
    runs = make_trials(data.alphabet, data.character, data.drawer, LAKE_TEST_ALPHABETS,
                       OneShotConfig(), seed=0)
    result = score_runs(runs, pixel_nearest_neighbour(data.images))
    assert result.trials == 400
    # Koch's table: 21.7% for pixel 1-NN; chance is 5% (binomial std 1.1%).
    assert 0.10 < result.accuracy < 0.40, result.accuracy
