"""N-way K-shot episodes within groups (Lake's protocol on Omniglot-like labels), and strict scoring."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from siamese_core.config import VALIDATION_ONESHOT, OneShotConfig
from siamese_core.oneshot import (
    OneShotRun,
    make_episodes,
    max_n_way,
    oracle_score_fn,
    pixel_nearest_neighbour,
    random_score_fn,
    score_runs,
)


def synthetic_labels(n_alphabets: int = 10, chars: int = 25, drawers: int = 20, seed: int = 0):
    """Omniglot-like labels, rows shuffled: every class made once by each source."""
    a = np.repeat([f"alpha_{i}" for i in range(n_alphabets)], chars * drawers)
    c = np.repeat(np.arange(n_alphabets * chars) + 964, drawers)
    d = np.tile([f"{k:02d}" for k in range(1, drawers + 1)], n_alphabets * chars)
    perm = np.random.default_rng(seed).permutation(a.size)
    return a[perm], c[perm], d[perm]


@pytest.fixture(scope="module")
def labels():
    return synthetic_labels()


@pytest.fixture(scope="module")
def runs(labels):
    a, c, d = labels
    return make_episodes(c, OneShotConfig(), seed=0, group=a, source=d, groups=[f"alpha_{i}" for i in range(10)])


def test_lake_sizes(runs):
    assert len(runs) == 20
    assert sum(r.queries.size for r in runs) == 400
    assert all(r.n_way == 20 and r.queries.size == 20 for r in runs)
    assert [r.group for r in runs] == [f"alpha_{i}" for i in range(10) for _ in range(2)]


def test_runs_stay_within_one_group_and_use_two_sources(labels, runs):
    a, c, d = labels
    for run in runs:
        assert set(a[run.support]) == {run.group} and set(a[run.queries]) == {run.group}
        assert len(set(c[run.support])) == run.n_way
        assert set(c[run.support]) == set(c[run.queries])
        assert (d[run.support] == run.support_source).all()
        assert (d[run.queries] == run.query_source).all()
        assert run.support_source != run.query_source
        # the answer points at the query's own class
        assert np.array_equal(c[run.support[run.answer]], c[run.queries])
    for i in range(0, len(runs), 2):
        first, second = runs[i], runs[i + 1]
        assert {first.support_source, first.query_source} != {second.support_source, second.query_source}


def test_true_class_position_is_spread(runs):
    answers = np.concatenate([r.answer for r in runs])
    counts = np.bincount(answers, minlength=20)
    assert counts.size == 20 and (counts > 0).all()  # every position holds some true class
    # each run's answers are a permutation of 0..N-1, and runs differ in order
    assert all(np.array_equal(np.sort(r.answer), np.arange(20)) for r in runs)
    assert len({tuple(r.answer) for r in runs}) == len(runs)
    assert np.mean([r.answer[0] == 0 for r in runs]) < 0.5
    # the support source is not always the smaller of the two
    assert len({r.support_source < r.query_source for r in runs}) == 2


def test_oracle_gives_100_percent(labels, runs):
    _, c, _ = labels
    result = score_runs(runs, oracle_score_fn(c))
    assert result.accuracy == 1.0 and result.correct == result.trials == 400
    assert set(result.per_group.values()) == {1.0}
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
    cfg = OneShotConfig(n_way=20, runs_per_group=20)
    runs = make_episodes(c, cfg, 1, group=a, source=d)
    result = score_runs(runs, random_score_fn(0))
    n, p = result.trials, 1 / 20
    assert n == 4000
    assert abs(result.accuracy - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_same_seed_same_trials(labels):
    a, c, d = labels
    alphabets = [f"alpha_{i}" for i in range(10)]
    x = make_episodes(c, OneShotConfig(), 5, group=a, source=d, groups=alphabets)
    y = make_episodes(c, OneShotConfig(), 5, group=a, source=d, groups=alphabets)
    z = make_episodes(c, OneShotConfig(), 6, group=a, source=d, groups=alphabets)
    assert all(np.array_equal(r.support, s.support) and np.array_equal(r.queries, s.queries)
               for r, s in zip(x, y))
    assert not all(np.array_equal(r.support, s.support) for r, s in zip(x, z))


def test_validation_size_and_small_n_way(labels):
    a, c, d = labels
    runs = make_episodes(c, VALIDATION_ONESHOT, 0, group=a, source=d)
    assert sum(r.queries.size for r in runs) == 320  # Koch's validation size, 10 alphabets
    assert all(r.n_way == 20 and r.queries.size == 16 for r in runs)
    for run in runs:  # each kept query still finds its own character in the support
        assert np.array_equal(c[run.support[run.answer]], c[run.queries])
    runs5 = make_episodes(c, OneShotConfig(n_way=5, runs_per_group=3), 0, group=a, source=d, groups=["alpha_0"])
    assert [r.n_way for r in runs5] == [5, 5, 5]


def test_errors(labels):
    a, c, d = labels
    with pytest.raises(ValueError, match="fewer than n_way"):
        make_episodes(c, OneShotConfig(n_way=26), 0, group=a, source=d, groups=["alpha_0"])
    with pytest.raises(ValueError, match="no rows"):
        make_episodes(c, OneShotConfig(), 0, group=a, source=d, groups=["nope"])
    run = OneShotRun("x", np.arange(3), np.arange(3), np.arange(3), np.arange(3))
    with pytest.raises(ValueError, match="shape"):
        score_runs([run], lambda q, s: np.zeros((3, 2)))


def test_two_sources_used_up_fall_back_to_per_class_supports_from_another_source(labels):
    a, c, d = labels
    two = np.isin(d, ["01", "02"])
    runs = make_episodes(c[two], OneShotConfig(runs_per_group=2), 0, group=a[two], source=d[two],
                         groups=["alpha_0"])
    first, second = runs
    assert {first.support_source, first.query_source} == {"01", "02"}
    # the only pair of sources is used: the second run still keeps each support and its query apart
    assert second.support_source is None
    for q, answer in zip(second.queries, second.answer):
        support = second.support[second.support_class == answer]
        assert c[two][support][0] == c[two][q] and d[two][support][0] != d[two][q]


def test_k_shot_and_data_without_groups_or_sources():
    # 30 classes of 5 images each, no groups, no sources
    label = np.repeat(np.arange(30), 5)
    runs = make_episodes(label, OneShotConfig(n_way=10, k_shot=3, runs_per_group=4), seed=1)
    assert len(runs) == 4 and all(r.group == "all" for r in runs)
    for run in runs:
        assert run.support.size == 30 and run.n_way == 10
        assert np.array_equal(np.bincount(run.support_class), np.full(10, 3))
        assert not np.isin(run.queries, run.support).any()  # a query is never its own support
        # each support group of 3 images is one class, and the answer's class is the query's
        for position in range(10):
            assert len(set(label[run.support[run.support_class == position]])) == 1
        assert all(label[run.support[run.support_class == k][0]] == label[q] for q, k in zip(run.queries, run.answer))
    assert score_runs(runs, oracle_score_fn(label)).accuracy == 1.0


def test_single_image_classes_are_distractors_never_answers():
    # 6 classes of 3 images, 14 classes of 1 image: 20-way needs the distractors
    label = np.concatenate([np.repeat(np.arange(6), 3), np.arange(100, 114)])
    assert max_n_way(label) == 20
    runs = make_episodes(label, OneShotConfig(n_way=20, runs_per_group=5), seed=0)
    for run in runs:
        assert run.n_way == 20
        assert np.isin(label[run.queries], np.arange(6)).all()
        assert run.queries.size == 6
    result = score_runs(runs, oracle_score_fn(label))
    assert result.accuracy == 1.0 and result.trials == 30
    with pytest.raises(ValueError, match="fewer than n_way"):
        make_episodes(label, OneShotConfig(n_way=21), seed=0)


def test_max_n_way_is_the_smallest_groups_classes_with_a_query():
    label = np.array([0, 0, 1, 1, 2, 3, 3, 4, 4, 5])
    group = np.array(["a"] * 5 + ["b"] * 5)
    assert max_n_way(label, group=group) == 3  # group a: classes 0, 1 and 2 (a distractor); b: 3, 4, 5
    assert max_n_way(label, cfg_k_shot=2, group=group) == 0  # no class has a support pair and a query


def test_pixel_nearest_neighbour_is_minus_squared_distance():
    rng = np.random.default_rng(0)
    images = (rng.random((6, 7, 7)) < 0.3).astype(np.uint8)
    score = pixel_nearest_neighbour(images)(np.array([0, 1]), np.array([2, 3, 4]))
    expected = -np.array([[np.sum((images[i].astype(int) - images[j]) ** 2) for j in (2, 3, 4)]
                          for i in (0, 1)])
    assert np.array_equal(score, expected)
    # a query identical to one support image picks it
    images[5] = images[3]
    run = OneShotRun("x", np.array([2, 3, 4]), np.arange(3), np.array([5]), np.array([1]))
    assert score_runs([run], pixel_nearest_neighbour(images)).accuracy == 1.0


def test_pixel_baseline_on_real_test_alphabets(omniglot_dir: Path):
    from siamese_core.omniglot import LAKE_TEST_ALPHABETS, load_split

    data = load_split(omniglot_dir, "test")
    assert set(np.unique(data.group)) == set(LAKE_TEST_ALPHABETS)
    runs = make_episodes(data.label, OneShotConfig(), 0, group=data.group, source=data.source,
                         groups=LAKE_TEST_ALPHABETS)
    result = score_runs(runs, pixel_nearest_neighbour(data.images))
    assert result.trials == 400
    # Koch's table: 21.7% for pixel 1-NN; chance is 5% (binomial std 1.1%).
    assert 0.10 < result.accuracy < 0.40, result.accuracy
