"""N-way K-shot one-shot episodes, within one group, and their strict scoring.

Koch et al. (2015) report 92.0% on Lake's 20-way task: in one alphabet pick 20
characters and two drawers; drawer A's 20 images are the support set, drawer
B's 20 images are the queries, each query is one trial; two runs per alphabet
x 10 test alphabets = 400 trials. :func:`make_episodes` builds those trials from
row labels (no images, no model) for any labelled data, and :func:`score_runs`
scores any similarity function on them:

* within one group when the data has groups (Omniglot's alphabets); a data set
  without groups is one group;
* support and query from different sources when the data has sources: Lake's
  way, one source for every support and another for every query, where two
  sources cover all the picked classes; otherwise per class, a support from
  another source than its query where the class has one;
* otherwise distinct images of each class;
* classes with too few images for a query (``k_shot`` or fewer) serve as
  distractors in the support set, never as a query's answer.

Faults it rules out by construction: the true class always at support position 0
(supports are in a random order), ties credited to the true class (a trial
counts only when the true class scores *strictly* above every other
candidate), trials across groups, and a query that is also its own support.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from siamese_core.config import ConfigError, OneShotConfig

ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``score_fn(query_rows [Q], support_rows [S]) -> similarities [Q, S]``, higher = more similar."""

WHOLE_SPLIT = "all"
"""The group name of a data set without groups: one group, every class of the split."""


@dataclass(frozen=True)
class OneShotRun:
    """One run: ``n_way`` classes with ``k_shot`` support images each, and queries of some of them."""

    group: str
    support: np.ndarray  # int64 (n_way * k_shot,) row indices
    support_class: np.ndarray  # int64 (n_way * k_shot,) each support image's class position, 0..n_way-1
    queries: np.ndarray  # int64 (Q,) row indices
    answer: np.ndarray  # int64 (Q,) class position of each query
    support_source: str | None = None  # Lake's way: the one source of every support image
    query_source: str | None = None  # ... and of every query

    @property
    def n_way(self) -> int:
        return int(self.support_class.max()) + 1 if self.support_class.size else 0


@dataclass(frozen=True)
class OneShotResult:
    """Accuracy over all trials, per group, and each trial's outcome (for plots)."""

    accuracy: float
    correct: int
    trials: int
    per_group: dict[str, float]
    run_index: np.ndarray = field(repr=False)  # int64 (T,) which run each trial belongs to
    query: np.ndarray = field(repr=False)  # int64 (T,) row index of each trial's query
    answer: np.ndarray = field(repr=False)  # int64 (T,) true class position
    predicted: np.ndarray = field(repr=False)  # int64 (T,) chosen class position (ties go to a wrong one)
    is_correct: np.ndarray = field(repr=False)  # bool (T,)

    def summary(self) -> dict[str, float]:
        """Flat metrics for a tracker: accuracy, counts and ``acc/<group>``."""
        out: dict[str, float] = {"accuracy": self.accuracy, "correct": float(self.correct),
                                 "trials": float(self.trials)}
        out.update({f"acc/{name}": acc for name, acc in self.per_group.items()})
        return out


def max_n_way(label: np.ndarray, cfg_k_shot: int = 1, group: np.ndarray | None = None) -> int:
    """The largest N every group of these rows allows: its classes with a support and a query."""
    label = np.asarray(label)
    group = np.full(label.shape, WHOLE_SPLIT) if group is None else np.asarray(group)
    best = None
    for name in np.unique(group):
        classes, counts = np.unique(label[group == name], return_counts=True)
        allowed = int((counts >= cfg_k_shot).sum()) if (counts > cfg_k_shot).any() else 0
        best = allowed if best is None else min(best, allowed)
    return best or 0


def make_episodes(
    label: np.ndarray,
    cfg: OneShotConfig,
    seed: int,
    group: np.ndarray | None = None,
    source: np.ndarray | None = None,
    groups: Sequence[str] | None = None,
) -> list[OneShotRun]:
    """``cfg.runs_per_group`` runs of ``cfg.n_way``-way ``cfg.k_shot``-shot trials for each group.

    ``label`` (class codes), ``group`` and ``source`` (names; None where the data
    has none) are parallel arrays over the rows; ``groups`` (default: every group,
    sorted) says which groups, in which order. Row indices point into the given
    arrays. Runs of one group use different source pairs (disjoint sources while
    enough remain). Deterministic in ``seed``; ConfigError when a group has too few
    classes.
    """
    label = np.asarray(label).astype(np.int64, copy=False)
    group = np.full(label.shape, WHOLE_SPLIT) if group is None else np.asarray(group)
    source = None if source is None else np.unique(np.asarray(source), return_inverse=True)
    source_names, source = (None, None) if source is None else (source[0], source[1].astype(np.int64))
    if group.shape != label.shape or label.ndim != 1 or (source is not None and source.shape != label.shape):
        raise ValueError("label, group and source must be 1-d arrays of one length")
    rng = np.random.default_rng(int(seed))
    runs: list[OneShotRun] = []
    for name in (sorted(set(group.tolist())) if groups is None else groups):
        rows = np.flatnonzero(group == name)
        if rows.size == 0:
            raise ValueError(f"group {name!r} has no rows")
        by_class: dict[int, np.ndarray] = {int(c): rows[label[rows] == c] for c in np.unique(label[rows])}
        classes = np.asarray([c for c, r in by_class.items() if r.size >= cfg.k_shot], dtype=np.int64)
        queryable = {c for c, r in by_class.items() if r.size > cfg.k_shot}
        if classes.size < cfg.n_way or not queryable:
            raise ConfigError(f"group {name!r} has {len(queryable)} classes with images enough for "
                              f"{cfg.k_shot} support(s) and a query (and {classes.size} in all), "
                              f"fewer than n_way={cfg.n_way}: ask for a smaller --n-way (evaluation.n_way) "
                              f"or --k-shot")
        cell: dict[tuple[int, int], int] = {}  # (class, source) -> first row, for Lake's way
        if source is not None:
            for r in rows.tolist():
                cell.setdefault((int(label[r]), int(source[r])), r)
        used_sources: set[int] = set()
        used_pairs: set[frozenset[int]] = set()
        for _ in range(cfg.runs_per_group):
            picked = rng.choice(classes, size=cfg.n_way, replace=False)
            run = None
            if source is not None and cfg.k_shot == 1:
                run = _lake_run(str(name), picked, rows, source, cell, queryable, cfg, rng, used_sources, used_pairs)
                if run is not None:
                    run = OneShotRun(**{**run.__dict__, "support_source": str(source_names[int(run.support_source)]),
                                        "query_source": str(source_names[int(run.query_source)])})
            if run is None:
                run = _per_class_run(str(name), picked, by_class, source, queryable, cfg, rng)
            runs.append(run)
    return runs


def _lake_run(name: str, picked: np.ndarray, rows: np.ndarray, source: np.ndarray,
              cell: dict[tuple[int, int], int], queryable: set[int], cfg: OneShotConfig,
              rng: np.random.Generator, used_sources: set[int], used_pairs: set[frozenset[int]]) -> OneShotRun | None:
    """Lake's run: every support from one source, every query from another; None if no two sources cover it."""
    common = set(np.unique(source[rows]).tolist())
    for c in picked.tolist():
        common &= {s for (cc, s) in cell if cc == c}
    fresh = sorted(common - used_sources)
    pool = fresh if len(fresh) >= 2 else sorted(common)
    options = [(a, b) for i, a in enumerate(pool) for b in pool[i + 1:] if frozenset((a, b)) not in used_pairs]
    if not options:
        return None
    a, b = options[int(rng.integers(len(options)))]
    if rng.random() < 0.5:
        a, b = b, a
    used_sources |= {a, b}
    used_pairs.add(frozenset((a, b)))
    # Random support order, so the true class sits at a random position.
    order = rng.permutation(cfg.n_way)
    support = np.array([cell[(int(c), a)] for c in picked[order]], dtype=np.int64)
    asked = [i for i, c in enumerate(picked.tolist()) if c in queryable]
    queries = np.array([cell[(int(picked[i]), b)] for i in asked], dtype=np.int64)
    answer = np.argsort(order).astype(np.int64)[asked]  # picked[i] is at support position answer[i]
    n_queries = cfg.queries_per_run or cfg.n_way  # picked is random: a prefix is a random subset
    return OneShotRun(group=name, support=support, support_class=np.arange(cfg.n_way, dtype=np.int64),
                      queries=queries[:n_queries], answer=answer[:n_queries], support_source=a, query_source=b)


def _per_class_run(name: str, picked: np.ndarray, by_class: dict[int, np.ndarray], source: np.ndarray | None,
                   queryable: set[int], cfg: OneShotConfig, rng: np.random.Generator) -> OneShotRun:
    """Each picked class's query drawn first, then its supports among its other images (other sources first)."""
    order = rng.permutation(cfg.n_way)
    position = np.argsort(order).astype(np.int64)  # picked[i] sits at support position position[i]
    support, support_class, queries, answer = [], [], [], []
    for i, c in enumerate(picked.tolist()):
        members = by_class[c]
        query = int(rng.choice(members)) if c in queryable else None
        others = members[members != query] if query is not None else members
        if source is not None and query is not None:
            elsewhere = others[source[others] != source[query]]
            others = elsewhere if elsewhere.size >= cfg.k_shot else others
        chosen = rng.choice(others, size=cfg.k_shot, replace=False)
        support.append(chosen)
        support_class.append(np.full(cfg.k_shot, position[i], dtype=np.int64))
        if query is not None:
            queries.append(query)
            answer.append(position[i])
    # Supports in class-position order, so the true class sits at a random position.
    by_position = np.argsort(np.concatenate(support_class), kind="stable")
    n_queries = cfg.queries_per_run or cfg.n_way
    return OneShotRun(group=name, support=np.concatenate(support).astype(np.int64)[by_position],
                      support_class=np.concatenate(support_class)[by_position],
                      queries=np.asarray(queries, dtype=np.int64)[:n_queries],
                      answer=np.asarray(answer, dtype=np.int64)[:n_queries])


def score_runs(runs: Sequence[OneShotRun], score_fn: ScoreFn) -> OneShotResult:
    """Score every trial: correct only if the true class is STRICTLY the most similar.

    A class scores as its best-matching support image. A tie with any other
    candidate, or a NaN score, is never credited. The recorded prediction is the
    argmax, except that a trial which is not correct records the best *other*
    candidate, so ties show as errors in plots.
    """
    if not runs:
        raise ValueError("no runs to score")
    run_index, query, answer, predicted, is_correct = [], [], [], [], []
    per_group_hits: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        image_scores = np.asarray(score_fn(run.queries, run.support), dtype=np.float64)
        q, s = run.queries.shape[0], run.support.shape[0]
        if image_scores.shape != (q, s):
            raise ValueError(f"score_fn returned shape {image_scores.shape}, expected {(q, s)}")
        scores = np.full((q, run.n_way), -np.inf)
        nan = np.zeros((q, run.n_way), dtype=bool)
        for position in range(run.n_way):
            columns = image_scores[:, run.support_class == position]
            nan[:, position] = np.isnan(columns).any(axis=1)
            scores[:, position] = np.nanmax(np.where(np.isnan(columns), -np.inf, columns), axis=1)
        scores[nan] = np.nan
        rows = np.arange(q)
        true = scores[rows, run.answer]
        others = scores.copy()
        others[rows, run.answer] = -np.inf
        best_other = others.max(axis=1)
        ok = true > best_other  # False for ties and for NaN anywhere in the row
        ok &= ~np.isnan(scores).any(axis=1)
        pred = np.where(ok, run.answer, np.argmax(np.where(np.isnan(others), -np.inf, others), axis=1))
        run_index.append(np.full(q, i, dtype=np.int64))
        query.append(run.queries)
        answer.append(run.answer)
        predicted.append(pred.astype(np.int64))
        is_correct.append(ok)
        hits = per_group_hits.setdefault(run.group, [0, 0])
        hits[0] += int(ok.sum())
        hits[1] += q
    flags = np.concatenate(is_correct)
    correct = int(flags.sum())
    return OneShotResult(
        accuracy=correct / flags.size, correct=correct, trials=int(flags.size),
        per_group={name: h / t for name, (h, t) in per_group_hits.items()},
        run_index=np.concatenate(run_index), query=np.concatenate(query),
        answer=np.concatenate(answer), predicted=np.concatenate(predicted), is_correct=flags,
    )


def pixel_nearest_neighbour(images: np.ndarray) -> ScoreFn:
    """The 1-nearest-neighbour pixel baseline: similarity = minus squared L2 distance.

    On binary images this is minus the Hamming distance (Lake's baseline,
    21.7% in Koch's table). Computed in float64, exact for 0/1 or uint8 pixels.
    """
    flat = np.asarray(images).reshape(len(images), -1)

    def score(query_rows: np.ndarray, support_rows: np.ndarray) -> np.ndarray:
        q = flat[np.asarray(query_rows)].astype(np.float64)
        s = flat[np.asarray(support_rows)].astype(np.float64)
        dist = (q * q).sum(1)[:, None] + (s * s).sum(1)[None, :] - 2.0 * (q @ s.T)
        return -dist

    return score


def random_score_fn(seed: int) -> ScoreFn:
    """Uniform random similarities (chance level, 1/N); for tests and sanity checks."""
    rng = np.random.default_rng(seed)

    def score(query_rows: np.ndarray, support_rows: np.ndarray) -> np.ndarray:
        return rng.random((len(query_rows), len(support_rows)))

    return score


def oracle_score_fn(label: np.ndarray) -> ScoreFn:
    """1 for the same class, else 0: a perfect model (100%), to check the harness."""
    label = np.asarray(label)

    def score(query_rows: np.ndarray, support_rows: np.ndarray) -> np.ndarray:
        return (label[np.asarray(query_rows)][:, None]
                == label[np.asarray(support_rows)][None, :]).astype(np.float64)

    return score
