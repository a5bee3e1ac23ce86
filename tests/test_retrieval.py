"""Ranked search by the siamese head, per-label ranking and the re-identification metrics.

Expected values are computed by hand (metrics) or by a naive reference written here
(a full score matrix in numpy, or ``SiameseNet.pairwise_logits``), never by the code
under test.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from siamese_core import retrieval
from siamese_core.model import build_model
from siamese_core.retrieval import (
    choose_method,
    choose_threshold,
    head_parameters,
    insert_new,
    map_at_k,
    search_labels,
    search_topk,
    threshold_curve,
    top_k_accuracy,
)

ROOT = Path(__file__).resolve().parents[1]
needs_faiss = pytest.mark.skipif(not retrieval.faiss_available(), reason="faiss is not installed")
BOTH = [pytest.param("index", marks=needs_faiss), "brute"]


# --- naive references --------------------------------------------------------------------

def reference_logits(q: np.ndarray, g: np.ndarray, alpha: np.ndarray, bias: float) -> np.ndarray:
    """Every pair's logit in float64: ``sum_j alpha_j |q_j - g_j| + b``."""
    q, g, alpha = (np.asarray(x, dtype=np.float64) for x in (q, g, alpha))
    return (np.abs(q[:, None, :] - g[None, :, :]) * alpha).sum(-1) + bias


def reference_topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of a full score matrix by score descending, then gallery index ascending."""
    ids = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def reference_labels(scores: np.ndarray, labels: np.ndarray, k: int) -> tuple[list[list], np.ndarray]:
    """Per query, labels by (best image's score desc, that image's index asc): naive loops."""
    out_labels, out_scores = [], []
    for row in scores:
        best: dict = {}
        for i, (s, lab) in enumerate(zip(row, labels)):
            if lab not in best or s > best[lab][0]:
                best[lab] = (s, i)
        ranked = sorted(best.items(), key=lambda item: (-item[1][0], item[1][1]))[:k]
        out_labels.append([lab for lab, _ in ranked])
        out_scores.append([s for _, (s, _) in ranked])
    return out_labels, np.array(out_scores)


def dyadic_problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Embeddings on a coarse grid and weights that are multiples of 1/4: every logit is exact
    in float32 in both paths, so equal logits are real ties, and there are many of them."""
    rng = np.random.default_rng(seed)
    d = 8
    grid = lambda n: ((rng.integers(0, 8, (n, d)) * 2 + 1) / 16).astype(np.float32)  # noqa: E731
    q, g = grid(24), grid(300)
    g[50] = g[5]  # duplicate gallery rows
    g[250] = g[5]
    g[251] = g[5]
    alpha = (-rng.integers(1, 5, d) / 4).astype(np.float32)
    return q, g, alpha, 0.25


# --- metrics -----------------------------------------------------------------------------

def test_map_at_5_hand_cases() -> None:
    predicted = [["a", "b", "c", "d", "e"],  # true label first: 1
                 ["x", "a", "c", "d", "e"],  # second: 1/2
                 ["x", "y", "z", "w", "v"]]  # absent: 0
    assert map_at_k(predicted, ["a", "a", "a"]) == pytest.approx((1 + 1 / 2 + 0) / 3)
    # Fifth place counts 1/5; sixth is outside the top 5 and counts 0.
    assert map_at_k([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]], [5, 6]) == pytest.approx((1 / 5 + 0) / 2)
    assert map_at_k([[1, 2, 3]], [3], k=2) == 0.0
    assert map_at_k([[1, 2, 3]], [3], k=3) == pytest.approx(1 / 3)


def test_top_k_accuracy_hand_cases() -> None:
    predicted = [["a", "b", "c"], ["x", "a", "c"], ["x", "y", "a"], ["x", "y", "z"]]
    truth = ["a", "a", "a", "a"]
    assert top_k_accuracy(predicted, truth, 1) == pytest.approx(1 / 4)
    assert top_k_accuracy(predicted, truth, 2) == pytest.approx(2 / 4)
    assert top_k_accuracy(predicted, truth, 3) == pytest.approx(3 / 4)


def test_metrics_reject_repeated_predictions_and_empty_input() -> None:
    with pytest.raises(ValueError, match="repeat"):
        map_at_k([["a", "a", "b"]], ["b"])
    with pytest.raises(ValueError):
        map_at_k([], [])
    with pytest.raises(ValueError):
        top_k_accuracy([["a"]], ["a", "b"], 1)


def test_insert_new_hand_cases() -> None:
    labels, scores = [["a", "b", "c", "d", "e"]], [[5.0, 4.0, 3.0, 2.0, 1.0]]
    assert insert_new(labels, scores, 10.0) == [["new", "a", "b", "c", "d"]]  # above every score
    assert insert_new(labels, scores, 0.0) == [["a", "b", "c", "d", "e"]]  # below every score
    assert insert_new(labels, scores, 3.5) == [["a", "b", "new", "c", "d"]]  # in the middle
    assert insert_new(labels, scores, 3.0) == [["a", "b", "c", "new", "d"]]  # equal score stays ahead
    assert insert_new(labels, scores, 1.5, new_label="NEW") == [["a", "b", "c", "d", "NEW"]]
    # A row shorter than k (a gallery with two labels): new goes after it, inside the top k.
    assert insert_new([["a", "b"]], [[5.0, 4.0]], 0.0) == [["a", "b", "new"]]
    assert insert_new([["a", "b", "c"]], [[3.0, 2.0, 1.0]], 2.5, k=2) == [["a", "new"]]
    with pytest.raises(ValueError, match="already a gallery label"):
        insert_new([["new", "b"]], [[2.0, 1.0]], 1.5)


def hand_threshold_case() -> tuple[list[list[str]], list[list[float]], list[str]]:
    """Two known individuals with confident top matches, two new ones with weak matches.

    MAP@5 is 1 exactly when both new queries get "new" first (threshold > 1.0, their best
    score) and neither known query does (threshold <= 4.0): the candidates 1.5, 2.0, 4.0.
    """
    labels = [["A", "B", "C"], ["B", "A", "C"], ["C", "A", "B"], ["A", "C", "B"]]
    scores = [[5.0, 2.0, 1.0], [4.0, 1.5, 0.5], [1.0, 0.8, 0.2], [0.9, 0.3, 0.1]]
    truth = ["A", "B", "new", "new"]
    return labels, scores, truth


def test_choose_threshold_hand_case() -> None:
    labels, scores, truth = hand_threshold_case()
    threshold, best = choose_threshold(labels, scores, truth)
    assert best == 1.0
    assert threshold == 2.0  # the middle of the plateau 1.5, 2.0, 4.0
    assert map_at_k(insert_new(labels, scores, threshold), truth) == 1.0
    t, maps = threshold_curve(labels, scores, truth)
    by_t = dict(zip(t.tolist(), maps.tolist()))
    # 1.0: query 3's first score below it is its second (new second), query 4's its first.
    assert by_t[1.0] == pytest.approx((1 + 1 + 1 / 2 + 1) / 4)
    assert by_t[5.0] == pytest.approx((1 + 1 / 2 + 1 + 1) / 4)  # 4.0 < 5.0: new first for query 2
    assert by_t[np.inf] == pytest.approx((1 / 2 + 1 / 2 + 1 + 1) / 4)
    # No score is below -inf: "new" goes after each row's three labels, 4th (rows are short of k = 5).
    assert by_t[-np.inf] == pytest.approx((1 + 1 + 1 / 4 + 1 / 4) / 4)
    assert threshold_curve(labels, scores, truth, [-np.inf], k=3)[1][0] == 0.5  # k = 3: "new" falls off
    # Given thresholds: the plateau is 1.2 and 3.0 (both MAP 1); the lower middle is 1.2.
    assert choose_threshold(labels, scores, truth, thresholds=[0.5, 1.2, 3.0, 4.5]) == (1.2, 1.0)


def test_threshold_curve_equals_insert_new_then_map() -> None:
    rng = np.random.default_rng(3)
    pool = np.array([f"w{i}" for i in range(12)])
    labels = [list(rng.choice(pool, 5, replace=False)) for _ in range(40)]
    scores = -np.sort(-np.round(rng.normal(0, 1, (40, 5)), 1), axis=1)  # rounded: ties within and across rows
    truth = [rng.choice(list(row) + ["new", "w99"]) for row in labels]
    grid = np.concatenate([np.linspace(-3.5, 3.5, 141), [-np.inf, np.inf]])
    for thresholds in (None, grid):
        t, maps = threshold_curve(labels, scores, truth, thresholds)
        for threshold, value in zip(t, maps):
            assert value == pytest.approx(map_at_k(insert_new(labels, scores, threshold), truth)), threshold
    # The default candidates reach the best of any threshold (here: of a fine grid).
    _, best = choose_threshold(labels, scores, truth)
    assert best >= threshold_curve(labels, scores, truth, np.linspace(-4, 4, 4001))[1].max() - 1e-12


# --- search ------------------------------------------------------------------------------

def test_head_parameters_reads_the_model_head() -> None:
    model = build_model("cpu-small", seed=0)
    alpha, bias = head_parameters(model)
    assert alpha.dtype == np.float32 and alpha.shape == (model.config.embedding_dim,)
    np.testing.assert_array_equal(alpha, model.head.weight.detach().numpy()[0])
    assert bias == float(model.head.bias.detach()[0])
    with pytest.raises(TypeError):
        head_parameters(torch.nn.Linear(3, 1))


@pytest.mark.parametrize("method", BOTH)
def test_exact_ties_broken_by_gallery_index(method: str) -> None:
    q, g, alpha, bias = dyadic_problem()
    ref_scores, ref_ids = reference_topk(reference_logits(q, g, alpha, bias), 10)
    full = np.sort(reference_logits(q, g, alpha, bias), axis=1)[:, ::-1]
    assert np.sum(full[:, 9] == full[:, 10]) >= 5, "the case must have ties across the k-th place"
    scores, ids = search_topk(q, g, alpha, bias, 10, method=method, chunk_rows=70, index_rows=32,
                              max_elements=500)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))  # exact arithmetic here


class ReversedTiesFaiss:
    """A stand-in for faiss whose exact L1 search orders equal distances by *descending* id
    (real faiss happens to keep the smaller ids; the search must not depend on that)."""

    METRIC_L1 = "L1"
    searched_k: list[int] = []

    class IndexFlat:
        def __init__(self, d: int, metric: str) -> None:
            assert metric == "L1"
            self.x = np.empty((0, d), dtype=np.float32)

        def add(self, x: np.ndarray) -> None:
            self.x = np.concatenate([self.x, x])

        def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            ReversedTiesFaiss.searched_k.append(k)
            dist = np.abs(q[:, None, :] - self.x[None, :, :]).sum(-1, dtype=np.float32)
            desc_ids = np.broadcast_to(-np.arange(self.x.shape[0]), dist.shape)
            order = np.lexsort((desc_ids, dist), axis=1)[:, :k]
            return np.take_along_axis(dist, order, axis=1), order


@pytest.mark.parametrize("method", BOTH + ["index-reversed-ties"])
def test_large_tie_groups_keep_the_smallest_ids(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    q, g, alpha, bias = dyadic_problem(seed=9)
    g[20:120] = q[0]  # 100 rows tie at query 0's best logit (distance 0), across faiss blocks
    g[150:190] = g[3]  # and a tie group of 41 elsewhere
    if method == "index-reversed-ties":
        ReversedTiesFaiss.searched_k.clear()
        monkeypatch.setattr(retrieval, "_import_faiss", lambda: ReversedTiesFaiss)
        method = "index"
    ref_scores, ref_ids = reference_topk(reference_logits(q, g, alpha, bias), 12)
    scores, ids = search_topk(q, g, alpha, bias, 12, method=method, chunk_rows=100, index_rows=64)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))
    assert list(ids[0]) == list(range(20, 32))
    # Streamed in shuffled chunks with explicit ids: the ties still go to the smallest ids.
    perm = np.random.default_rng(10).permutation(g.shape[0])
    chunks = [(g[perm[a:a + 70]], perm[a:a + 70]) for a in range(0, g.shape[0], 70)]
    streamed = search_topk(q, chunks, alpha, bias, 12, method=method, index_rows=64)
    np.testing.assert_array_equal(streamed[1], ref_ids)
    if ReversedTiesFaiss.searched_k:  # the tie group ran past the first kk: searched again, deeper
        assert max(ReversedTiesFaiss.searched_k) > min(ReversedTiesFaiss.searched_k)


def test_index_and_brute_give_equal_ranks() -> None:
    if not retrieval.faiss_available():
        pytest.skip("faiss is not installed")
    rng = np.random.default_rng(1)
    q = rng.random((40, 48), dtype=np.float32)
    g = rng.random((2000, 48), dtype=np.float32)
    g[[10, 900, 1999]] = g[3]  # duplicates: equal logits, ranked by index in both paths
    g[[11, 12]] = q[0]  # query 0 finds two exact copies of itself, then g[3]'s copies elsewhere
    alpha = -rng.random(48).astype(np.float32)
    alpha[[0, 7]] = 0.0  # dropped by the index path
    results = {m: search_topk(q, g, alpha, 0.1, 12, method=m, chunk_rows=512, max_elements=4096)
               for m in ("index", "brute")}
    (s_i, i_i), (s_b, i_b) = results["index"], results["brute"]
    np.testing.assert_array_equal(i_i, i_b)
    np.testing.assert_allclose(s_i, s_b, rtol=0, atol=1e-5)
    ref_scores, ref_ids = reference_topk(reference_logits(q, g, alpha, 0.1), 12)
    np.testing.assert_array_equal(i_i, ref_ids)
    np.testing.assert_allclose(s_i, ref_scores, rtol=0, atol=1e-5)
    assert list(i_i[0, :2]) == [11, 12]
    assert choose_method(alpha) == "index"


def test_positive_alpha_uses_brute_force_and_matches_pairwise_logits() -> None:
    model = build_model("cpu-small", seed=0)  # kaiming init: alpha ~ N(0, 0.2), both signs
    with torch.no_grad():
        model.head.bias.fill_(0.7)
    alpha, bias = head_parameters(model)
    assert (alpha > 0).any() and (alpha < 0).any()
    assert choose_method(alpha) == "brute"
    with pytest.raises(ValueError, match="alpha"):
        choose_method(alpha, "index")
    gen = torch.Generator().manual_seed(0)
    h_q, h_g = torch.rand(20, 256, generator=gen), torch.rand(700, 256, generator=gen)
    with torch.no_grad():
        ref = model.pairwise_logits(h_q, h_g).numpy()
    ref_scores, ref_ids = reference_topk(ref, 7)
    scores, ids = search_topk(h_q, h_g, alpha, bias, 7, method="auto", chunk_rows=128, max_elements=10_000)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-5)
    # The index path's assumption would rank these wrongly: by -weighted L1 with |alpha|.
    l1 = reference_logits(h_q.numpy(), h_g.numpy(), -np.abs(alpha), bias)
    assert (reference_topk(l1, 7)[1] != ref_ids).any()


def test_gallery_smaller_than_k() -> None:
    rng = np.random.default_rng(2)
    q, g = rng.random((5, 6), dtype=np.float32), rng.random((3, 6), dtype=np.float32)
    alpha = -rng.random(6).astype(np.float32)
    ref_scores, ref_ids = reference_topk(reference_logits(q, g, alpha, 0.0), 3)
    for method in ["brute"] + (["index"] if retrieval.faiss_available() else []):
        scores, ids = search_topk(q, g, alpha, 0.0, 5, method=method)
        assert ids.shape == (5, 3)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-6)


# --- streaming ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", BOTH)
def test_streamed_chunks_equal_one_shot_search(method: str) -> None:
    rng = np.random.default_rng(4)
    q = rng.random((30, 16), dtype=np.float32)
    g = rng.random((1500, 16), dtype=np.float32)
    g[1400] = g[2]
    alpha = -rng.random(16).astype(np.float32)
    kw = dict(method=method, max_elements=2048)
    one_scores, one_ids = search_topk(q, g, alpha, 0.3, 8, chunk_rows=100_000, **kw)
    cuts = [0, 1, 4, 504, 1000, 1500]  # a chunk of 1 row and one of 3, smaller than k
    by_offset = [(g[a:b], a) for a, b in zip(cuts, cuts[1:])]
    perm = rng.permutation(1500)  # chunks in shuffled order with explicit, unsorted ids
    by_ids = [(torch.from_numpy(g[perm[a:b]]), perm[a:b]) for a, b in zip(cuts, cuts[1:])]
    for chunks in (by_offset, iter(by_offset), by_ids, lambda: iter(by_ids)):
        scores, ids = search_topk(q, chunks, alpha, 0.3, 8, **kw)
        np.testing.assert_array_equal(ids, one_ids)
        np.testing.assert_allclose(scores, one_scores, rtol=0, atol=1e-6)


CHUNK_ROWS, CHUNK_DIM = 16384, 64
CHUNK_BYTES = CHUNK_ROWS * CHUNK_DIM * 4  # 4 MiB


def generated_chunks(n_chunks: int) -> Iterator[tuple[np.ndarray, int]]:
    """A gallery made chunk by chunk while it is consumed (numpy buffers: tracemalloc sees them)."""
    for i in range(n_chunks):
        yield np.random.default_rng([5, i]).random((CHUNK_ROWS, CHUNK_DIM), dtype=np.float32), i * CHUNK_ROWS


def rss_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def peak_memory(fn: Callable[[], object]) -> tuple[int, int | None]:
    """``(tracemalloc peak, peak RSS growth or None)`` while ``fn`` runs.

    tracemalloc counts numpy's buffers exactly; the RSS high-water mark (reset first,
    Linux only) also counts torch's and faiss' own allocations.
    """
    gc.collect()
    rss = rss_peak_supported()  # resets the high-water mark to the current RSS
    before = _status_bytes("VmRSS") if rss else 0
    tracemalloc.start()
    try:
        fn()
        traced = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return traced, (_status_bytes("VmHWM") - before if rss else None)


def streamed_search(method: str, n_chunks: int) -> Callable[[], object]:
    q = np.random.default_rng(6).random((4, CHUNK_DIM), dtype=np.float32)
    alpha = -np.linspace(0.1, 1.0, CHUNK_DIM, dtype=np.float32)
    return lambda: search_topk(q, generated_chunks(n_chunks), alpha, 0.0, 5, method=method)


def test_memory_probe_detects_a_search_that_holds_the_gallery() -> None:
    """The probe of the next test can fail: concatenating the stream shows up in both figures."""
    def concatenating(n_chunks: int) -> Callable[[], object]:
        return lambda: np.concatenate([c for c, _ in generated_chunks(n_chunks)]).sum()

    concatenating(2)()
    small, big = peak_memory(concatenating(4)), peak_memory(concatenating(16))
    assert big[0] > 3 * small[0]
    if big[1] is not None:
        assert big[1] - small[1] > 0.75 * 12 * CHUNK_BYTES


@pytest.mark.parametrize("method", BOTH)
def test_streamed_search_memory_does_not_grow_with_the_gallery(method: str) -> None:
    streamed_search(method, 2)()  # warm-up: first-call allocations stay out of the figures
    small, big = peak_memory(streamed_search(method, 4)), peak_memory(streamed_search(method, 16))
    assert small[0] >= CHUNK_BYTES  # the probe sees the chunks themselves
    assert big[0] < 1.5 * small[0], (small, big)  # 4x the gallery, not 4x the peak
    if big[1] is not None:  # the gallery grew by 12 chunks (48 MiB); RSS, noisier, by under half that
        assert big[1] - small[1] < 6 * CHUNK_BYTES, (small, big)


# --- per-label ranking -------------------------------------------------------------------

@pytest.mark.parametrize("method", BOTH)
def test_label_ranking_exact_when_one_label_owns_the_top_images(method: str) -> None:
    rng = np.random.default_rng(7)
    d = 16
    q = (0.3 + 0.4 * rng.random((10, d))).astype(np.float32)
    # Label "w0": 30 near-copies of every query, so each query's top 30+ images are all "w0";
    # 60 other labels with 10 random images each, in a shuffled gallery.
    near = np.repeat(q, 30, axis=0) + rng.normal(0, 0.005, (300, d)).astype(np.float32)
    spread = rng.random((600, d)).astype(np.float32)
    g = np.concatenate([near, spread])
    labels = np.array(["w0"] * 300 + [f"w{1 + i // 10}" for i in range(600)])
    perm = rng.permutation(g.shape[0])
    g, labels = g[perm], labels[perm]
    alpha = -rng.random(d).astype(np.float32)
    calls = []

    def gallery() -> Iterator[tuple[np.ndarray, int]]:
        calls.append(1)
        return iter([(g[a:a + 128], a) for a in range(0, g.shape[0], 128)])

    out_labels, out_scores = search_labels(q, gallery, labels, alpha, -1.0, 5, method=method)
    ref_labels, ref_scores = reference_labels(reference_logits(q, g, alpha, -1.0), labels, 5)
    assert out_labels.tolist() == ref_labels
    np.testing.assert_allclose(out_scores, ref_scores, rtol=0, atol=1e-5)
    assert all(row[0] == "w0" for row in ref_labels)
    assert len(calls) > 1  # the first N = 20 images showed only "w0": it had to search again
    # Fewer labels than k: every label, for every query.
    two = np.where(labels == "w0", "w0", "other")
    out2, _ = search_labels(q, g, two, alpha, -1.0, 5, method=method)
    assert out2.shape == (10, 2) and set(map(tuple, out2.tolist())) == {("w0", "other")}


@pytest.mark.parametrize("method", BOTH)
def test_leave_one_out_excludes_the_querys_own_image(method: str) -> None:
    """A split searched against itself: each query's own image is not a match, the rest of its class is."""
    rng = np.random.default_rng(9)
    d = 12
    g = rng.random((80, d)).astype(np.float32)
    labels = np.repeat([f"c{i}" for i in range(20)], 4)
    alpha = -rng.random(d).astype(np.float32)
    q = g[::4]  # the first image of each class is a query, and in the gallery
    exclude = np.arange(0, 80, 4)
    out_labels, out_scores = search_labels(q, g, labels, alpha, 0.5, 5, method=method, exclude=exclude)
    logits = reference_logits(q, g, alpha, 0.5)
    logits[np.arange(20), exclude] = -np.inf  # the naive reference: its own image scored out
    ref_labels, ref_scores = reference_labels(logits, labels, 5)
    assert out_labels.tolist() == ref_labels
    np.testing.assert_allclose(out_scores, ref_scores, rtol=0, atol=1e-5)
    # without the exclusion each query finds itself first, at the head's bias (|h - h| = 0)
    selfish, scores = search_labels(q, g, labels, alpha, 0.5, 5, method=method)
    assert (selfish[:, 0] == labels[exclude]).all() and np.allclose(scores[:, 0], 0.5)


def test_label_ranking_needs_a_reiterable_gallery() -> None:
    g = np.random.default_rng(8).random((20, 4), dtype=np.float32)
    with pytest.raises(TypeError, match="more than once"):
        search_labels(g[:2], iter([(g, 0)]), np.arange(20), -np.ones(4, np.float32), 0.0, 3)


# --- layering and the benchmark ----------------------------------------------------------

def test_core_imports_neither_services_nor_faiss() -> None:
    """siamese_core stays plain PyTorch/numpy; faiss loads only when the index path runs,
    and without it "auto" falls back to brute force and "index" says what is missing."""
    code = ("import sys; sys.modules['faiss'] = None\n"
            "import numpy as np, siamese_core.retrieval as r\n"
            "bad = [m for m in ('ray', 'mlflow', 'pyarrow', 'workflows') if m in sys.modules]\n"
            "assert not bad, bad\n"
            "assert r.choose_method(-np.ones(3)) == 'brute'\n"
            "try:\n    r.search_topk(np.ones((1, 3), np.float32), np.ones((2, 3), np.float32), -np.ones(3), 0, 1,"
            " method='index')\n"
            "except ImportError as e:\n    assert 'faiss' in str(e); print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_benchmark_quick_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_search.py"), "--quick", "--threads", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=240, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    methods = ["index", "brute"] if retrieval.faiss_available() else ["brute"]
    for method in methods:
        for size in ("2k", "8k"):
            assert any(re.fullmatch(rf"\s*{size}\s+{method}\s+[\d.]+\s+[\d.]+\s+[\d.]+", l) for l in lines), lines
        assert any(re.fullmatch(rf"\s*{method} 8k/2k: [\d.]+x time for 4x the gallery", l) for l in lines), lines
    assert any(l.startswith("memory: peak RSS delta") or l.startswith("memory: tracemalloc") for l in lines)
    figures = json.loads(out.read_text())
    assert len(figures["results"]) == 2 * len(methods) and len(figures["ratios"]) == len(methods)
    if len(methods) == 2:
        assert all(a["same_ranks"] == 1.0 for a in figures["agreement"])
