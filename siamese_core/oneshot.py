"""Lake's N-way one-shot classification protocol, within one alphabet.

Koch et al. (2015) report 92.0% on Lake's 20-way task: in one alphabet pick 20
characters and two drawers; drawer A's 20 images are the support set, drawer
B's 20 images are the queries, each query is one trial; two runs per alphabet
x 10 test alphabets = 400 trials. This module builds those trials from row
labels (no images, no model) and scores any similarity function on them.

Faults it rules out by construction: the true class always at support index 0
(supports are in a random order), ties credited to the true class (a trial
counts only when the true class scores *strictly* above every other
candidate), trials across random alphabets (every run is inside one alphabet),
and support and query by the same drawer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from siamese_core.config import OneShotConfig

ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``score_fn(query_rows [Q], support_rows [S]) -> similarities [Q, S]``, higher = more similar."""


@dataclass(frozen=True)
class OneShotRun:
    """One run: ``n_way`` support images by one drawer, the same characters' queries by another."""

    alphabet: str
    support: np.ndarray  # int64 (n_way,) row indices, random character order
    queries: np.ndarray  # int64 (n_way,) row indices
    answer: np.ndarray  # int64 (n_way,) position in ``support`` of each query's character
    support_drawer: int
    query_drawer: int

    @property
    def n_way(self) -> int:
        return int(self.support.shape[0])


@dataclass(frozen=True)
class OneShotResult:
    """Accuracy over all trials, per alphabet, and each trial's outcome (for plots)."""

    accuracy: float
    correct: int
    trials: int
    per_alphabet: dict[str, float]
    run_index: np.ndarray = field(repr=False)  # int64 (T,) which run each trial belongs to
    query: np.ndarray = field(repr=False)  # int64 (T,) row index of each trial's query
    answer: np.ndarray = field(repr=False)  # int64 (T,) true position in the support
    predicted: np.ndarray = field(repr=False)  # int64 (T,) chosen position (ties go to a wrong one)
    is_correct: np.ndarray = field(repr=False)  # bool (T,)

    def summary(self) -> dict[str, float]:
        """Flat metrics for a tracker: accuracy, counts and ``acc/<alphabet>``."""
        out: dict[str, float] = {"accuracy": self.accuracy, "correct": float(self.correct),
                                 "trials": float(self.trials)}
        out.update({f"acc/{name}": acc for name, acc in self.per_alphabet.items()})
        return out


def make_trials(
    alphabet: np.ndarray,
    character: np.ndarray,
    drawer: np.ndarray,
    alphabets: Sequence[str],
    cfg: OneShotConfig,
    seed: int,
) -> list[OneShotRun]:
    """``cfg.runs_per_alphabet`` runs of ``cfg.n_way``-way trials for each of ``alphabets``.

    Each run draws ``n_way`` distinct characters of its alphabet and two
    distinct drawers that drew all of them; runs of one alphabet use different
    drawer pairs (disjoint drawers while enough remain). Row indices point into
    the given arrays. Deterministic in ``seed``; ValueError when an alphabet
    has too few characters or drawers.
    """
    alphabet = np.asarray(alphabet)
    character = np.asarray(character).astype(np.int64, copy=False)
    drawer = np.asarray(drawer).astype(np.int64, copy=False)
    if not (alphabet.shape == character.shape == drawer.shape) or alphabet.ndim != 1:
        raise ValueError("alphabet, character and drawer must be 1-d arrays of one length")
    rng = np.random.default_rng(int(seed))
    runs: list[OneShotRun] = []
    for name in alphabets:
        rows = np.flatnonzero(alphabet == name)
        if rows.size == 0:
            raise ValueError(f"alphabet {name!r} has no rows")
        # (character, drawer) -> first row, for this alphabet only.
        cell: dict[tuple[int, int], int] = {}
        for r in rows.tolist():
            cell.setdefault((int(character[r]), int(drawer[r])), r)
        chars = np.unique(character[rows])
        if chars.size < cfg.n_way:
            raise ValueError(f"alphabet {name!r} has {chars.size} characters, fewer than n_way={cfg.n_way}")
        used_drawers: set[int] = set()
        used_pairs: set[frozenset[int]] = set()
        for _ in range(cfg.runs_per_alphabet):
            picked = rng.choice(chars, size=cfg.n_way, replace=False)
            # Drawers that drew every picked character.
            common = set(np.unique(drawer[rows]).tolist())
            for c in picked.tolist():
                common &= {d for (cc, d) in cell if cc == c}
            fresh = sorted(common - used_drawers)
            pool = fresh if len(fresh) >= 2 else sorted(common)
            options = [(a, b) for i, a in enumerate(pool) for b in pool[i + 1:]
                       if frozenset((a, b)) not in used_pairs]
            if not options:
                raise ValueError(f"alphabet {name!r}: no unused pair of drawers drew all "
                                 f"{cfg.n_way} picked characters (drawers {sorted(common)})")
            a, b = options[int(rng.integers(len(options)))]
            if rng.random() < 0.5:
                a, b = b, a
            used_drawers |= {a, b}
            used_pairs.add(frozenset((a, b)))
            # Random support order, so the true class sits at a random position.
            order = rng.permutation(cfg.n_way)
            support = np.array([cell[(int(c), a)] for c in picked[order]], dtype=np.int64)
            queries = np.array([cell[(int(c), b)] for c in picked], dtype=np.int64)
            answer = np.argsort(order).astype(np.int64)  # picked[i] is at support position answer[i]
            n_queries = cfg.queries_per_run or cfg.n_way  # picked is random: a prefix is a random subset
            queries, answer = queries[:n_queries], answer[:n_queries]
            runs.append(OneShotRun(alphabet=str(name), support=support, queries=queries,
                                   answer=answer, support_drawer=int(a), query_drawer=int(b)))
    return runs


def score_runs(runs: Sequence[OneShotRun], score_fn: ScoreFn) -> OneShotResult:
    """Score every trial: correct only if the true class is STRICTLY the most similar.

    A tie with any other candidate, or a NaN score, is never credited. The
    recorded prediction is the argmax, except that a trial which is not
    correct records the best *other* candidate, so ties show as errors in plots.
    """
    if not runs:
        raise ValueError("no runs to score")
    run_index, query, answer, predicted, is_correct = [], [], [], [], []
    per_alpha_hits: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        scores = np.asarray(score_fn(run.queries, run.support), dtype=np.float64)
        q, s = run.queries.shape[0], run.support.shape[0]
        if scores.shape != (q, s):
            raise ValueError(f"score_fn returned shape {scores.shape}, expected {(q, s)}")
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
        hits = per_alpha_hits.setdefault(run.alphabet, [0, 0])
        hits[0] += int(ok.sum())
        hits[1] += q
    flags = np.concatenate(is_correct)
    correct = int(flags.sum())
    return OneShotResult(
        accuracy=correct / flags.size, correct=correct, trials=int(flags.size),
        per_alphabet={name: h / t for name, (h, t) in per_alpha_hits.items()},
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


def oracle_score_fn(character: np.ndarray) -> ScoreFn:
    """1 for the same character, else 0: a perfect model (100%), to check the harness."""
    character = np.asarray(character)

    def score(query_rows: np.ndarray, support_rows: np.ndarray) -> np.ndarray:
        return (character[np.asarray(query_rows)][:, None]
                == character[np.asarray(support_rows)][None, :]).astype(np.float64)

    return score
