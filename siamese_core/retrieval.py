"""Ranked search of query embeddings against a gallery by the siamese head, and the
re-identification metrics (Kaggle humpback-whale MAP@5 with a "new individual" label).

Design notes (why, not what):

* The score of a pair is the head's logit ``sum_j alpha_j |q_j - g_j| + b``, the same as
  ``SiameseNet.head_logits`` on precomputed embeddings (``scoring_embed`` for a trained
  model). Logits, not probabilities: the sigmoid is monotone, so ranks are equal, and
  logits do not saturate to 1.0 where many top candidates would tie.
* Two exact paths, equal ranks. "index": when no ``alpha_j`` is positive the logit is
  ``b - sum_j |alpha_j| |q_j - g_j| = b - L1(|alpha| * q, |alpha| * g)``, so ranking by the
  logit is ranking by ascending L1 distance of the scaled embeddings, which faiss'
  exact ``IndexFlat(METRIC_L1)`` searches without ever forming a ``[Q, G, D]`` tensor.
  "brute": every pair scored by the head formula in torch, in blocks under an element
  budget; it is the only correct path when some ``alpha_j > 0`` (then the logit grows
  with those components' distance and is no longer monotone in any weighted L1).
* The gallery is consumed as a stream of chunks; only a running top-k per query is
  kept (one merge, :func:`merge_topk`, for both paths), so memory is bounded by one
  chunk's working set plus ``Q * k``, whatever the gallery's size.
* Ties are broken by ascending gallery id, in both paths, so results are deterministic
  and the two paths can be compared rank for rank. Neither faiss' nor ``torch.topk``'s
  own tie order is relied on: see :func:`_index_candidates` and :func:`_topk_first`.
* Nothing here knows about splits: the caller chooses a "new individual" threshold on
  validation with :func:`choose_threshold` and applies it to test with :func:`insert_new`.

faiss is optional: it is imported only by the "index" path (``method="auto"`` falls
back to "brute" without it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import nn

Array = Union[np.ndarray, torch.Tensor]
ChunkIds = Union[int, np.ndarray, torch.Tensor, Sequence[int]]
"""A chunk's gallery ids: its global offset (ids ``offset .. offset + g - 1``) or ``g`` ids."""
GalleryChunk = tuple[Array, ChunkIds]
Gallery = Union[Array, Iterable[GalleryChunk], Callable[[], Iterable[GalleryChunk]]]
"""An embedding matrix ``[G, D]``, an iterable of chunks ``(embeddings [g, D], ids)``, or a
callable returning such an iterable (a re-iterable stream, for searches that run twice)."""

METHODS = ("auto", "index", "brute")
DEFAULT_CHUNK_ROWS = 16384  # an array gallery is streamed in chunks of this many rows
DEFAULT_INDEX_ROWS = 4096  # faiss scans this many rows at a time (cache-sized: 6 MB at D=384)
DEFAULT_MAX_ELEMENTS = 1 << 20  # brute force: elements of one [q, g, D] difference block (4 MB)
NO_ID = np.iinfo(np.int64).max  # id of an empty slot in a running top-k: sorts after every real id


# --- head ----------------------------------------------------------------------------------

def head_parameters(model: nn.Module) -> tuple[np.ndarray, float]:
    """``(alpha [D] float32, b)`` of a model's weighted-L1 head (``model.head``, ``Linear(D, 1)``).

    Why: search works on embeddings and needs only these ``D + 1`` numbers, not the model,
    so it can run where the model is not (and on embeddings computed elsewhere).
    """
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear) or head.out_features != 1:
        raise TypeError(f"expected a model whose .head is nn.Linear(D, 1), got {head!r}")
    alpha = head.weight.detach()[0].to("cpu", torch.float32).numpy().copy()
    bias = float(head.bias.detach()[0]) if head.bias is not None else 0.0
    return alpha, bias


# --- chunks and the running top-k ----------------------------------------------------------

def iter_chunks(gallery: Gallery, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[tuple[Array, np.ndarray]]:
    """``(embeddings [g, D], ids int64 [g])`` chunks of a gallery, ids ascending within a chunk.

    An array is cut into views of ``chunk_rows`` rows (no copy); a chunk given with an
    offset gets ``offset + arange(g)``; a chunk with unsorted ids is reordered by id, because
    the brute-force path breaks ties by position and must mean "by id". Ids must be unique
    across the gallery (not checked: that would need memory proportional to the gallery).
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if isinstance(gallery, (np.ndarray, torch.Tensor)):
        if gallery.ndim != 2:
            raise ValueError(f"gallery must be [G, D], got shape {tuple(gallery.shape)}")
        for start in range(0, gallery.shape[0], chunk_rows):
            block = gallery[start:start + chunk_rows]
            yield block, np.arange(start, start + block.shape[0], dtype=np.int64)
        return
    if callable(gallery):
        gallery = gallery()
    for item in gallery:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError("a gallery chunk must be a pair (embeddings [g, D], offset or ids [g])")
        emb, ids = item
        if emb.ndim != 2:
            raise ValueError(f"a gallery chunk must be [g, D], got shape {tuple(emb.shape)}")
        g = emb.shape[0]
        if isinstance(ids, (int, np.integer)):
            ids = np.arange(int(ids), int(ids) + g, dtype=np.int64)
        else:
            ids = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
            ids = ids.astype(np.int64, copy=False).reshape(-1)
            if ids.shape[0] != g:
                raise ValueError(f"chunk has {g} embeddings but {ids.shape[0]} ids")
            if g > 1 and np.any(ids[1:] < ids[:-1]):
                order = np.argsort(ids, kind="stable")
                ids = ids[order]
                emb = emb[torch.from_numpy(order).to(emb.device)] if isinstance(emb, torch.Tensor) else emb[order]
        if g:
            yield emb, ids


def empty_topk(n_queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A running top-k with no candidates yet: keys ``-inf``, ids :data:`NO_ID`."""
    return (np.full((n_queries, k), -np.inf, dtype=np.float32),
            np.full((n_queries, k), NO_ID, dtype=np.int64))


def merge_topk(keys: np.ndarray, ids: np.ndarray, new_keys: np.ndarray, new_ids: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of a running top-k ``[Q, k]`` and new candidates ``[Q, c]``, per row.

    Order: key descending, then id ascending (the tie rule of the whole module). The one
    merge both search paths use: each feeds it an exact per-chunk candidate set, so the
    result is the exact top-k of everything seen, in memory ``Q * (k + c)``.
    """
    all_keys = np.concatenate([keys, new_keys.astype(keys.dtype, copy=False)], axis=1)
    all_ids = np.concatenate([ids, new_ids.astype(np.int64, copy=False)], axis=1)
    order = np.lexsort((all_ids, -all_keys), axis=1)[:, :k]  # last key is the primary one
    return np.take_along_axis(all_keys, order, axis=1), np.take_along_axis(all_ids, order, axis=1)


def _finish_topk(keys: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop the empty slots (a gallery smaller than k): every query saw the same rows."""
    filled = (ids != NO_ID).sum(axis=1)
    width = int(filled.min()) if filled.size else 0
    if filled.size and int(filled.max()) != width:
        raise RuntimeError("queries saw different numbers of gallery rows")  # a bug, not bad input
    return keys[:, :width], ids[:, :width]


# --- method choice -------------------------------------------------------------------------

def _import_faiss() -> Any:
    try:
        import faiss  # noqa: PLC0415  (optional dependency, imported on use)
    except ImportError as err:
        raise ImportError("method='index' needs faiss (pip install faiss-cpu); "
                          "method='brute' needs only torch") from err
    return faiss


def faiss_available() -> bool:
    """Whether the "index" path can run here (faiss imports)."""
    try:
        _import_faiss()
    except ImportError:
        return False
    return True


def choose_method(alpha: Array, method: str = "auto") -> str:
    """The search path that ``method`` resolves to for these head weights.

    "auto" is "index" when every ``alpha_j <= 0`` and faiss imports, else "brute": the
    logit is a decreasing function of the weighted L1 distance ``sum |alpha_j| |q_j - g_j|``
    only when no ``alpha_j`` is positive; a positive weight rewards distance in its
    component, and only scoring every pair ranks that exactly. Asking for "index" with a
    positive weight is an error, not a silent wrong ranking.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    alpha = _as_numpy(alpha).reshape(-1)
    signs_allow_index = bool(np.all(alpha <= 0))
    if method == "index" and not signs_allow_index:
        raise ValueError("method='index' needs every alpha_j <= 0 (the logit is then b minus a weighted "
                         f"L1 distance); {int(np.sum(alpha > 0))} weights are positive: use 'brute'")
    if method == "auto":
        return "index" if signs_allow_index and faiss_available() else "brute"
    return method


# --- search --------------------------------------------------------------------------------

def search_topk(queries: Array, gallery: Gallery, alpha: Array, bias: float, k: int, *,
                method: str = "auto", chunk_rows: int = DEFAULT_CHUNK_ROWS,
                index_rows: int = DEFAULT_INDEX_ROWS, max_elements: int = DEFAULT_MAX_ELEMENTS,
                device: torch.device | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k gallery images per query by the head's logit.

    Returns ``(scores [Q, k'] float32 logits, descending; indices [Q, k'] int64 gallery ids)``
    with ``k' = min(k, G)``; ties go to the smaller id. ``gallery`` is an array or a stream
    of chunks (see :data:`Gallery`): the search holds one chunk and the ``Q x k`` running
    best, never the whole gallery. ``method`` is "index" (faiss, needs ``alpha <= 0``),
    "brute" (torch on ``device``, default the queries' device) or "auto" (see
    :func:`choose_method`). ``index_rows`` is how many rows faiss scans at once;
    ``max_elements`` bounds brute force's ``[q, g, D]`` difference block.

    The two paths rank by the same quantity summed in different float32 orders, so scores
    agree to the rounding of a D-term sum and ranks agree except between candidates whose
    logits differ by less than that (exact duplicates tie exactly in both paths).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    alpha_np = _as_numpy(alpha).astype(np.float32, copy=False).reshape(-1)
    if queries.ndim != 2 or queries.shape[1] != alpha_np.shape[0]:
        raise ValueError(f"queries must be [Q, {alpha_np.shape[0]}], got shape {tuple(queries.shape)}")
    resolved = choose_method(alpha_np, method)
    chunks = iter_chunks(gallery, chunk_rows)
    if resolved == "index":
        return _search_index(queries, chunks, alpha_np, float(bias), k, index_rows)
    return _search_brute(queries, chunks, alpha, float(bias), k, max_elements, device)


def _as_numpy(x: Array) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _check_dim(chunk: Array, d: int) -> None:
    if chunk.shape[1] != d:
        raise ValueError(f"gallery chunk has {chunk.shape[1]} dimensions, the queries {d}")


def _search_index(queries: Array, chunks: Iterator[tuple[Array, np.ndarray]], alpha: np.ndarray,
                  bias: float, k: int, index_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The "index" path: faiss exact L1 on ``|alpha|``-scaled embeddings, keys ``-distance``."""
    faiss = _import_faiss()
    d = alpha.shape[0]
    keep = alpha != 0  # a zero weight adds nothing to any distance: drop the dimension
    scale = -alpha[keep]
    q = _as_numpy(queries).astype(np.float32, copy=False)
    q_scaled = np.ascontiguousarray(_scaled(q, keep, scale))
    keys, ids = empty_topk(q.shape[0], k)
    for chunk, chunk_ids in chunks:
        _check_dim(chunk, d)
        chunk = _as_numpy(chunk)
        for start in range(0, chunk.shape[0], index_rows):
            block = chunk[start:start + index_rows].astype(np.float32, copy=False)
            block_ids = chunk_ids[start:start + index_rows]
            keys, ids = _index_candidates(faiss, q_scaled, _scaled(block, keep, scale), block_ids, k, keys, ids)
    keys, ids = _finish_topk(keys, ids)
    return (np.float32(bias) + keys).astype(np.float32), ids  # logit = b - distance = b + key


def _scaled(x: np.ndarray, keep: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``|alpha| * x`` on the kept dimensions: one new array, C-contiguous float32 (faiss' input)."""
    out = x * scale if keep.all() else x[:, keep]
    if not keep.all():
        out *= scale
    return np.ascontiguousarray(out, dtype=np.float32)


def _index_candidates(faiss: Any, q_scaled: np.ndarray, block: np.ndarray, block_ids: np.ndarray,
                      k: int, keys: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge one block's exact top-k (distance, then id) into the running top-k.

    faiss returns the ``kk`` smallest distances but its order among equal distances is
    its own. So it is asked for more than ``k``: if a query's ``kk``-th distance is larger
    than its ``k``-th, every row at the ``k``-th distance was returned and the id rule can
    be applied; if not (a tie group runs past ``kk``), that query is searched again with
    ``kk`` doubled, up to the whole block. Distinct random embeddings resolve at once.
    """
    g = block.shape[0]
    kb = min(k, g)
    if block.shape[1] == 0:  # every alpha is 0: all distances are 0, the first ids win
        cand_keys = np.zeros((q_scaled.shape[0], kb), dtype=np.float32)
        cand_ids = np.broadcast_to(block_ids[:kb], cand_keys.shape)
        return merge_topk(keys, ids, cand_keys, cand_ids, k)
    index = faiss.IndexFlat(block.shape[1], faiss.METRIC_L1)
    index.add(block)
    rows = np.arange(q_scaled.shape[0])
    kk = min(g, 2 * kb + 8)
    while rows.size:
        dist, local = index.search(q_scaled[rows] if rows.size < q_scaled.shape[0] else q_scaled, kk)
        done = np.ones(rows.size, dtype=bool) if kk == g else dist[:, kk - 1] > dist[:, kb - 1]
        if done.any():
            r = rows[done]
            keys[r], ids[r] = merge_topk(keys[r], ids[r], -dist[done], block_ids[local[done]], k)
        rows = rows[~done]
        kk = min(g, 2 * kk)
    return keys, ids


def _search_brute(queries: Array, chunks: Iterator[tuple[Array, np.ndarray]], alpha: Array, bias: float,
                  k: int, max_elements: int, device: torch.device | str | None) -> tuple[np.ndarray, np.ndarray]:
    """The "brute" path: the head's formula on every pair, in blocks of at most ``max_elements``.

    Per gallery chunk, queries go in groups of ``qg`` rows whose logit strip ``[qg, g]``
    also fits the budget (at least one query row); each strip is filled block by block
    (``sub``, ``abs_``, ``@ alpha`` in one reused buffer), then its exact top-k joins the
    running best through :func:`merge_topk`.
    """
    if max_elements < 1:
        raise ValueError(f"max_elements must be >= 1, got {max_elements}")
    if device is None:
        device = queries.device if isinstance(queries, torch.Tensor) else "cpu"
    device = torch.device(device)
    q = torch.as_tensor(queries).to(device=device, dtype=torch.float32)
    a = torch.as_tensor(alpha).to(device=device, dtype=torch.float32).reshape(-1)
    n_q, d = q.shape
    keys, ids = empty_topk(n_q, k)
    buf = torch.empty(0, device=device)
    with torch.no_grad():
        for chunk, chunk_ids in chunks:
            _check_dim(chunk, d)
            gc = torch.as_tensor(chunk).to(device=device, dtype=torch.float32)
            g = gc.shape[0]
            qg = max(1, min(n_q, max_elements // g))  # queries per logit strip
            qb = max(1, min(qg, math.isqrt(max(1, max_elements // max(1, d)))))  # block rows of queries
            gb = max(1, min(g, max_elements // max(1, qb * d)))  # block rows of gallery
            if buf.numel() < qb * gb * d:
                buf = torch.empty(qb * gb * d, device=device)
            for q0 in range(0, n_q, qg):
                qs = q[q0:q0 + qg]
                strip = torch.empty(qs.shape[0], g, device=device)
                for a0 in range(0, qs.shape[0], qb):
                    qa = qs[a0:a0 + qb, None, :]
                    for b0 in range(0, g, gb):
                        gblock = gc[None, b0:b0 + gb, :]
                        diff = buf[:qa.shape[0] * gblock.shape[1] * d].view(qa.shape[0], gblock.shape[1], d)
                        torch.sub(qa, gblock, out=diff)
                        diff.abs_()
                        strip[a0:a0 + qa.shape[0], b0:b0 + gblock.shape[1]] = diff @ a
                strip += bias
                vals, pos = _topk_first(strip, min(k, g))
                r = slice(q0, q0 + qs.shape[0])
                keys[r], ids[r] = merge_topk(keys[r], ids[r], vals.cpu().numpy(), chunk_ids[pos.cpu().numpy()], k)
    return _finish_topk(keys, ids)


def _topk_first(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ``k`` largest values, ties going to the smallest position (unordered).

    ``torch.topk`` picks among equal values at the k-th place arbitrarily; here every value
    above the k-th is taken and the rest of the ``k`` are the first positions equal to it.
    Linear in the row length (a stable sort would cost a log factor).
    """
    kth = torch.topk(scores, k, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
    above = scores > kth
    tied = scores == kth
    need = k - above.sum(dim=1, keepdim=True)
    take = above | (tied & (tied.cumsum(dim=1) <= need))
    pos = take.nonzero()[:, 1].view(scores.shape[0], k)  # row-major: exactly k per row
    return scores.gather(1, pos), pos


# --- per-label ranking ---------------------------------------------------------------------

def search_labels(queries: Array, gallery: Gallery, gallery_labels: Sequence[Hashable] | np.ndarray,
                  alpha: Array, bias: float, k: int, *, first_n: int | None = None,
                  exclude: np.ndarray | None = None, **search_kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best distinct labels per query; a label's score is its best image's logit.

    ``gallery_labels[i]`` is the label of gallery id ``i``. Returns ``(labels [Q, k'],
    scores [Q, k'] float32, descending)``, ``k' = min(k, number of labels)``; equal scores
    go to the label whose best image has the smaller id. ``gallery`` must be re-iterable
    (an array, a list of chunks, or a callable returning a fresh stream): a query may be
    searched again. ``search_kwargs`` go to :func:`search_topk`.

    Exact: the top ``N`` images (``first_n``, default ``4 k``) are searched; a label's first
    appearance in that list is its best image. If ``k`` distinct labels appear, no other
    label can rank above them: every image of an unseen label is ranked after the N-th
    image, so scores at most the N-th score, which is at most the k-th label's score (and
    on equality its id is larger, so the tie rule ranks it after too). Queries that see
    fewer than ``k`` labels are searched again with ``N`` doubled, until they see ``k`` or
    the search returns the whole gallery. One label owning many top images costs only
    such repeats, never a wrong answer.

    ``exclude[q]`` is a gallery id that query ``q`` must not match (-1: none): the query's own
    image when a split is searched against itself, leave-one-out. It is dropped from the
    ranked images before labels are read off, so the argument above holds for the rest.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not isinstance(gallery, (np.ndarray, torch.Tensor)) and not callable(gallery) and iter(gallery) is gallery:
        raise TypeError("search_labels may search the gallery more than once: pass an array, a list of "
                        "chunks or a callable returning a fresh chunk iterator, not a one-pass iterator")
    labels = np.asarray(gallery_labels)
    n = max(k, first_n if first_n is not None else 4 * k)
    n_q = queries.shape[0]
    found: list[tuple[list[Any], list[float]] | None] = [None] * n_q
    pending = np.arange(n_q)
    while pending.size:
        sub = queries[torch.from_numpy(pending).to(queries.device)] if isinstance(queries, torch.Tensor) \
            else queries[pending]
        scores, idx = search_topk(sub, gallery, alpha, bias, n, **search_kwargs)
        whole = idx.shape[1] < n  # fewer than N images exist: this was the whole gallery
        for row, query in enumerate(pending):
            keep = slice(None) if exclude is None else idx[row] != exclude[query]
            best = _first_distinct(labels[idx[row][keep]], scores[row][keep], k)
            if len(best[0]) == k or whole:
                found[query] = best
        pending = np.array([query for query in pending if found[query] is None], dtype=np.int64)
        n *= 2
    width = min((len(f[0]) for f in found), default=min(k, len(np.unique(labels)) if labels.size else 0))
    out_labels = np.empty((n_q, width), dtype=labels.dtype)
    out_scores = np.empty((n_q, width), dtype=np.float32)
    for query, (labs, labscores) in enumerate(found):  # type: ignore[misc]
        out_labels[query], out_scores[query] = labs[:width], labscores[:width]
    return out_labels, out_scores


def _first_distinct(labels: np.ndarray, scores: np.ndarray, k: int) -> tuple[list[Any], list[float]]:
    """The first ``k`` distinct labels of a ranked list, with the score of each one's first image."""
    seen: set[Any] = set()
    labs: list[Any] = []
    labscores: list[float] = []
    for label, score in zip(labels.tolist(), scores.tolist()):
        if label not in seen:
            seen.add(label)
            labs.append(label)
            labscores.append(score)
            if len(labs) == k:
                break
    return labs, labscores


# --- metrics -------------------------------------------------------------------------------

def _ranks(predicted: Sequence[Sequence[Hashable]] | np.ndarray, truth: Sequence[Hashable] | np.ndarray,
           k: int) -> np.ndarray:
    """1-based rank of each query's true label within its first ``k`` predictions, 0 if absent."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} prediction rows for {len(truth)} true labels")
    if len(truth) == 0:
        raise ValueError("no queries: the metric of an empty set is undefined")
    ranks = np.zeros(len(truth), dtype=np.int64)
    for i, (row, true) in enumerate(zip(predicted, truth)):
        row = list(row)[:k]
        if len(set(row)) != len(row):
            raise ValueError(f"query {i}: predicted labels repeat within the top {k}: {row}")
        for rank, label in enumerate(row, start=1):
            if label == true:
                ranks[i] = rank
                break
    return ranks


def map_at_k(predicted: Sequence[Sequence[Hashable]] | np.ndarray, truth: Sequence[Hashable] | np.ndarray,
             k: int = 5) -> float:
    """Mean average precision at ``k`` as the Kaggle humpback-whale competition scores it.

    With one true label per query and distinct predictions, a query's average precision is
    ``1 / rank`` of its label within the first ``k`` predictions, 0 when absent.
    """
    ranks = _ranks(predicted, truth, k)
    return float(np.mean(np.where(ranks > 0, 1.0 / np.maximum(ranks, 1), 0.0)))


def top_k_accuracy(predicted: Sequence[Sequence[Hashable]] | np.ndarray, truth: Sequence[Hashable] | np.ndarray,
                   k: int) -> float:
    """Fraction of queries whose true label is among their first ``k`` predictions."""
    return float(np.mean(_ranks(predicted, truth, k) > 0))


def insert_new(labels: Sequence[Sequence[Hashable]] | np.ndarray, scores: Sequence[Sequence[float]] | np.ndarray,
               threshold: float, new_label: Hashable = "new", k: int = 5) -> list[list[Any]]:
    """Predictions with ``new_label`` inserted before the first score below ``threshold``.

    Why: a query whose best gallery match scores low is more likely an individual the
    gallery does not have, whose true label is ``new_label``. A score equal to the
    threshold stays ahead of it; when no score of a row is below it, ``new_label`` goes
    after the row (so within the top ``k`` only if the row is shorter). Rows are cut to ``k``.
    ``threshold`` is in the scores' units (logits from :func:`search_labels`).
    """
    out: list[list[Any]] = []
    for row, row_scores in zip(labels, scores):
        row = list(row)
        if new_label in row:
            raise ValueError(f"{new_label!r} is already a gallery label; choose another new_label")
        below = [j for j, s in enumerate(row_scores) if s < threshold]
        at = below[0] if below else len(row)
        out.append((row[:at] + [new_label] + row[at:])[:k])
    return out


def candidate_thresholds(scores: np.ndarray, k: int = 5, max_thresholds: int = 1001) -> np.ndarray:
    """Thresholds that reach every distinct outcome of :func:`insert_new`, ascending.

    The outcome only depends on which scores are below the threshold, so it is constant
    between consecutive score values: each distinct top-``k`` score ``s`` (the outcome of
    ``(s_prev, s]``) and ``+inf`` cover them all; ``-inf`` (never insert) is added for
    clarity. Past ``max_thresholds`` distinct values, quantiles of the scores stand in.
    """
    values = np.asarray(scores, dtype=np.float64)[:, :k].reshape(-1)
    values = np.unique(values[np.isfinite(values)])
    if values.size > max_thresholds - 2:
        probs = np.linspace(0.0, 1.0, max(1, max_thresholds - 2))
        values = np.unique(np.quantile(values, probs, method="inverted_cdf"))
    return np.concatenate([[-np.inf], values, [np.inf]])


def threshold_curve(labels: Sequence[Sequence[Hashable]] | np.ndarray, scores: Sequence[Sequence[float]] | np.ndarray,
                    truth: Sequence[Hashable] | np.ndarray, thresholds: Sequence[float] | np.ndarray | None = None,
                    *, new_label: Hashable = "new", k: int = 5,
                    max_thresholds: int = 1001) -> tuple[np.ndarray, np.ndarray]:
    """``(thresholds ascending, MAP@k of insert_new(..., threshold) for each)``.

    ``truth`` holds ``new_label`` for queries whose individual is not in the gallery.
    Default thresholds: :func:`candidate_thresholds`. Computed for all thresholds at once
    from each query's true position and the prefix minimum of its scores (the position
    where ``new_label`` lands), equal to calling :func:`insert_new` and :func:`map_at_k`
    per threshold.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or len(labels) != s.shape[0] or len(truth) != s.shape[0]:
        raise ValueError("labels, scores and truth must have one row per query")
    if s.shape[0] == 0:
        raise ValueError("no queries: the metric of an empty set is undefined")
    s = s[:, :k]
    rows = [list(row)[:k] for row in labels]
    if any(len(row) != s.shape[1] for row in rows):
        raise ValueError("each labels row needs one score per label")
    if any(new_label in row for row in rows):
        raise ValueError(f"{new_label!r} is already a gallery label; choose another new_label")
    t = candidate_thresholds(s, k, max_thresholds) if thresholds is None else np.unique(np.asarray(thresholds, float))
    truth_pos = np.array([row.index(true) if true in row else -1 for row, true in zip(rows, truth)])
    is_new = np.array([true == new_label for true in truth], dtype=bool)
    prefix_min = np.minimum.accumulate(s, axis=1) if s.shape[1] else s
    maps = np.empty(t.shape[0], dtype=np.float64)
    step = max(1, (1 << 22) // max(1, s.size))  # thresholds per pass: bounded [T, Q, k] booleans
    for t0 in range(0, t.shape[0], step):
        tt = t[t0:t0 + step]
        at = (prefix_min[None, :, :] >= tt[:, None, None]).sum(axis=2)  # [T, Q] where new_label goes
        rank = np.where(is_new, at + 1, np.where(truth_pos < 0, 0, np.where(truth_pos < at, truth_pos + 1,
                                                                               truth_pos + 2)))
        rank = np.where(rank > k, 0, rank)
        maps[t0:t0 + step] = np.where(rank > 0, 1.0 / np.maximum(rank, 1), 0.0).mean(axis=1)
    return t, maps


def choose_threshold(labels: Sequence[Sequence[Hashable]] | np.ndarray, scores: Sequence[Sequence[float]] | np.ndarray,
                     truth: Sequence[Hashable] | np.ndarray, thresholds: Sequence[float] | np.ndarray | None = None,
                     *, new_label: Hashable = "new", k: int = 5, max_thresholds: int = 1001,
                     tolerance: float = 1e-12) -> tuple[float, float]:
    """``(threshold, its MAP@k)``: the threshold of :func:`threshold_curve` with the best MAP.

    Tie rule: the candidates within ``tolerance`` of the best form runs of consecutive
    thresholds; the longest run wins (the first of equally long ones) and its middle
    candidate (the lower middle for an even count) is returned. Why the middle: every
    threshold of the run scores the same here, and the one farthest from both edges is
    the least likely to fall off the plateau on other data. The returned value is a
    candidate itself, never an interpolation, so its MAP is one that was evaluated.
    Run it on validation; apply the threshold to test with :func:`insert_new`.
    """
    t, maps = threshold_curve(labels, scores, truth, thresholds, new_label=new_label, k=k,
                              max_thresholds=max_thresholds)
    good = maps >= maps.max() - tolerance
    best_start, best_len, start = 0, 0, None
    for i, flag in enumerate(np.append(good, False)):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if i - start > best_len:
                best_start, best_len = start, i - start
            start = None
    pick = best_start + (best_len - 1) // 2
    return float(t[pick]), float(maps[pick])
