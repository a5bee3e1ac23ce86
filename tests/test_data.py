"""The pair stage that Ray Data runs: pairs per alphabet, per epoch, decoded and labelled right."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from siamese_core.config import PairConfig
from workflows import data


def _png(value: int) -> bytes:
    """A 16x16 image whose ink pixel count encodes ``value`` (so decoded rows are traceable)."""
    pixels = np.full((16, 16), 255, dtype=np.uint8)
    pixels.flat[:value] = 0
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def block() -> dict[str, np.ndarray]:
    """Two alphabets x 4 characters x 20 drawers; each image's ink count = its character id."""
    rows = [(a, 10 * i + c, d) for i, a in enumerate(["alpha", "beta"]) for c in range(1, 5)
            for d in range(1, 21)]
    return {
        "alphabet": np.array([r[0] for r in rows]),
        "character": np.array([r[1] for r in rows], dtype=np.int32),
        "drawer": np.array([r[2] for r in rows], dtype=np.int8),
        "image": np.array([_png(r[1]) for r in rows], dtype=object),
        "image_id": np.array([f"{r[0]}/{r[1]}/{r[2]}" for r in rows]),
    }


def _stage(epoch_index: int, monkeypatch, seed: int = 0) -> data.PairStage:
    monkeypatch.setattr(data, "current_execution_index", lambda: epoch_index)
    return data.PairStage(PairConfig(pairs_per_epoch=300, distorted_copies=8), image_size=16, seed=seed,
                          n_alphabets=3)


def test_pairs_are_labelled_by_their_images(block, monkeypatch) -> None:
    out = _stage(0, monkeypatch)(block)
    ink_left = (out["left"] > 127).reshape(len(out["left"]), -1).sum(1)
    ink_right = (out["right"] > 127).reshape(len(out["right"]), -1).sum(1)
    assert np.array_equal(out["same"] == 1.0, ink_left == ink_right)
    assert out["left"].dtype == np.uint8 and out["left"].shape[1:] == (16, 16)
    # 300 pairs over 3 alphabets in the data set: 100 per alphabet here, half of them "same".
    assert len(out["same"]) == 200 and out["same"].sum() == 100
    # Negatives stay inside one alphabet (ink counts 1..4 vs 11..14).
    assert np.array_equal(ink_left // 10, ink_right // 10)
    assert set(out["epoch"]) == {0}


def test_new_pairs_each_epoch_same_pairs_from_same_seed(block, monkeypatch) -> None:
    first = _stage(0, monkeypatch)(block)
    again = _stage(0, monkeypatch)(block)
    second = _stage(1, monkeypatch)(block)
    other_seed = _stage(0, monkeypatch, seed=1)(block)
    assert np.array_equal(first["left"], again["left"]) and np.array_equal(first["right"], again["right"])
    assert not np.array_equal(first["left"], second["left"])
    assert not np.array_equal(first["left"], other_seed["left"])
    assert set(second["epoch"]) == {1}


def test_pairs_do_not_depend_on_how_blocks_are_cut(block, monkeypatch) -> None:
    whole = _stage(0, monkeypatch)(block)
    only_beta = {k: v[block["alphabet"] == "beta"] for k, v in block.items()}
    part = _stage(0, monkeypatch)(only_beta)
    beta_rows = (whole["left"] > 127).reshape(len(whole["left"]), -1).sum(1) >= 10  # beta: ids 11..14
    assert np.array_equal(whole["left"][beta_rows], part["left"])


def test_only_training_drawers_are_used(block, monkeypatch) -> None:
    monkeypatch.setattr(data, "current_execution_index", lambda: 0)
    stage = data.PairStage(PairConfig(pairs_per_epoch=200, drawers=(1, 2)), image_size=16, seed=0, n_alphabets=2)
    marked = dict(block)
    # Images by drawers other than 1 and 2 are corrupt: touching one would raise.
    marked["image"] = np.array([png if d in (1, 2) else b"not a png" for png, d in
                                zip(block["image"], block["drawer"])], dtype=object)
    out = stage(marked)
    assert len(out["same"]) == 200


def test_corrupt_image_is_named(block, monkeypatch) -> None:
    broken = dict(block)
    broken["image"] = np.array([b"garbage"] * len(block["image"]), dtype=object)
    with pytest.raises(Exception, match="alpha/"):
        _stage(0, monkeypatch)(broken)


def test_expand_copies_and_steps() -> None:
    left = torch.arange(4).view(4, 1, 1).float()
    right, same = left + 10, torch.tensor([1.0, 0.0, 1.0, 0.0])
    l2, r2, s2, mask = data.expand_copies(left, right, same, copies=2)
    assert l2.shape[0] == 12 and mask.sum() == 8 and not mask[:4].any()
    assert torch.equal(l2[4:8], left) and torch.equal(s2[8:], same)
    steps = list(data.iter_steps(l2, r2, s2, mask, batch_size=5, generator=torch.Generator().manual_seed(0)))
    assert len(steps) == 2 and all(s[0].shape[0] == 5 for s in steps)
    seen = torch.cat([s[0] for s in steps]).flatten()
    assert len(set(seen.tolist())) <= 4 and torch.equal(torch.cat([s[1] for s in steps]), torch.cat(
        [s[0] for s in steps]) + 10)


def _write_shard(block: dict[str, np.ndarray], path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({k: list(v) if k == "image" else v for k, v in block.items()}), str(path))
    return str(path)


def _shard_pairs(cache_mb: float) -> data.ShardPairs:
    import pyarrow.fs

    stage = data.PairStage(PairConfig(pairs_per_epoch=300), image_size=16, seed=0, n_alphabets=3)
    return data.ShardPairs(pyarrow.fs.LocalFileSystem(), stage, cache_bytes=int(cache_mb * 2**20),
                           dataset_key="test")


def test_decoded_shards_are_kept_between_epochs(block, tmp_path, monkeypatch) -> None:
    """Epoch 1 from the cache (the file is gone) equals epoch 1 read and decoded afresh."""
    monkeypatch.setattr(data, "_PROCESS_CACHE", None)
    path = _write_shard(block, tmp_path / "shard.parquet")
    batch = {"path": np.array([path])}
    monkeypatch.setattr(data, "current_execution_index", lambda: 1)
    fresh = _shard_pairs(0)(batch)
    monkeypatch.setattr(data, "_PROCESS_CACHE", None)
    monkeypatch.setattr(data, "current_execution_index", lambda: 0)
    cached = _shard_pairs(64)
    first = cached(batch)
    assert data.process_cache(cached.cache_bytes).misses == 1
    (tmp_path / "shard.parquet").unlink()
    monkeypatch.setattr(data, "current_execution_index", lambda: 1)
    second = cached(batch)
    assert data.process_cache(cached.cache_bytes).hits == 1
    assert set(second["epoch"]) == {1} and not np.array_equal(first["left"], second["left"])
    for key in data.PAIR_COLUMNS:
        assert np.array_equal(second[key], fresh[key]), key
    # Without a cache every epoch reads the shard again, and the file is gone.
    monkeypatch.setattr(data, "_PROCESS_CACHE", None)
    with pytest.raises(FileNotFoundError):
        _shard_pairs(0)(batch)


def test_shard_cache_stays_within_its_cap(block) -> None:
    stage = data.PairStage(PairConfig(pairs_per_epoch=300), image_size=16, seed=0, n_alphabets=3)
    shards = [stage.decoded_shard(block) for _ in range(3)]
    for s in shards:
        s.ensure_decoded(np.arange(len(s.drawer)))
    assert all(s.pngs is None for s in shards)  # PNG bytes are dropped once every row is decoded
    one = shards[0].nbytes
    cache = data.ShardCache(max_bytes=2 * one + one // 2)
    for i, s in enumerate(shards):
        cache.put(("k", i), s)
        assert cache.nbytes <= cache.max_bytes
    assert cache.get(("k", 0)) is None and cache.get(("k", 2)) is shards[2]  # least recently used left first
    cache.max_bytes = one // 2
    cache.evict()
    assert cache.nbytes == 0
    cache.put(("k", 9), shards[0])  # larger than the whole cap: not kept
    assert cache.get(("k", 9)) is None


def test_rows_are_decoded_only_when_a_pair_needs_them(block, monkeypatch) -> None:
    monkeypatch.setattr(data, "current_execution_index", lambda: 0)
    stage = data.PairStage(PairConfig(pairs_per_epoch=20), image_size=16, seed=0, n_alphabets=2)
    shard = stage.decoded_shard(block)
    out = stage.pairs_for_shard(shard, 0)
    assert 0 < shard.decoded.sum() < len(shard.decoded) and shard.pngs is not None
    assert (shard.images[~shard.decoded] == 0).all()
    assert len(out["same"]) == 20


class _FakeShard:
    """Stands in for a Train worker's dataset shard: 3 chunks per pass, every event recorded."""

    def __init__(self, events: list, fail_at: int | None = None) -> None:
        self.events, self.fail_at = events, fail_at

    def iter_torch_batches(self, *, batch_size, drop_last, local_shuffle_buffer_size, local_shuffle_seed):
        epoch = local_shuffle_seed - 100  # the stream passes seed + epoch
        self.events.append(("pass", epoch))
        for i in range(3):
            if i == self.fail_at:
                raise ValueError("shard unreadable")
            yield {"epoch": epoch, "chunk": i}


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_epoch_stream_starts_the_next_pass_while_the_last_chunks_train() -> None:
    events: list = []
    stream = data.EpochStream(_FakeShard(events), chunk_pairs=64, batch_size=8,
                              announce=lambda e: events.append(("announce", e)), seed=100, end_epoch=2,
                              queue_chunks=1)
    got = []
    for chunk in stream.epoch(0):
        got.append((chunk["epoch"], chunk["chunk"]))
        if chunk["chunk"] == 2:  # the worker holds epoch 0's last chunk: epoch 1's pass is under way
            assert _wait_for(lambda: ("pass", 1) in events), events
    assert got == [(0, 0), (0, 1), (0, 2)]
    assert [(c["epoch"], c["chunk"]) for c in stream.epoch(1)] == [(1, 0), (1, 1), (1, 2)]
    # Each epoch announced before its pass; no pass beyond end_epoch.
    assert [e for e in events if e[0] in ("announce", "pass")] == [
        ("announce", 0), ("pass", 0), ("announce", 1), ("pass", 1)]
    stream.close()


def test_epoch_stream_runs_one_pass_ahead_at_most() -> None:
    """A pass drained into its queue must not start the one after: memory would grow with epochs."""
    import time

    events: list = []
    stream = data.EpochStream(_FakeShard(events), chunk_pairs=64, batch_size=8, seed=100)
    assert [c["epoch"] for c in stream.epoch(0)] == [0, 0, 0]
    assert _wait_for(lambda: ("pass", 1) in events)
    time.sleep(0.5)  # epoch 1's pass is drained by now; nobody trains on it yet
    assert ("pass", 2) not in events
    chunks = stream.epoch(1)
    assert next(chunks)["epoch"] == 1
    assert _wait_for(lambda: ("pass", 2) in events)
    stream.close()


def test_epoch_stream_wait_prepared_returns_once_the_next_pass_is_queued() -> None:
    """What the benchmark's look-ahead mode relies on: after it, no pass work is in flight."""
    import threading

    release = threading.Event()

    class _SlowShard(_FakeShard):
        def iter_torch_batches(self, **kwargs):
            for chunk in super().iter_torch_batches(**kwargs):
                if chunk["epoch"] == 1 and chunk["chunk"] == 2:
                    release.wait(10)  # epoch 1's last chunk is held back until the test says so
                yield chunk

    events: list = []
    stream = data.EpochStream(_SlowShard(events), chunk_pairs=64, batch_size=8, seed=100, end_epoch=2)
    assert [c["chunk"] for c in stream.epoch(0)] == [0, 1, 2]
    assert not stream.wait_prepared(timeout_s=0.3)  # epoch 1's pass still holds its last chunk
    release.set()
    assert stream.wait_prepared(timeout_s=10)
    assert [c["chunk"] for c in stream.epoch(1)] == [0, 1, 2]
    assert stream.wait_prepared(timeout_s=0)  # end_epoch reached: nothing is prepared
    stream.close()


def test_epoch_stream_asked_for_another_epoch_starts_that_one() -> None:
    """After a restart from a checkpoint the worker asks for its epoch, not the prepared one."""
    events: list = []
    stream = data.EpochStream(_FakeShard(events), chunk_pairs=64, batch_size=8,
                              announce=lambda e: events.append(("announce", e)), seed=100)
    assert [c["epoch"] for c in stream.epoch(0)] == [0, 0, 0]
    assert [c["epoch"] for c in stream.epoch(5)] == [5, 5, 5]
    assert ("announce", 5) in events
    # Leaving an epoch part-way drops the rest of it: asking again starts it afresh.
    part = stream.epoch(6)
    assert next(part)["chunk"] == 0
    part.close()
    assert [c["chunk"] for c in stream.epoch(6)] == [0, 1, 2]
    stream.close()


def test_epoch_stream_hands_a_pass_error_to_the_worker() -> None:
    stream = data.EpochStream(_FakeShard([], fail_at=1), chunk_pairs=64, batch_size=8, seed=100)
    chunks = stream.epoch(0)
    assert next(chunks)["chunk"] == 0
    with pytest.raises(ValueError, match="shard unreadable"):
        next(chunks)


@pytest.mark.integration
def test_stream_over_real_shards_new_pairs_per_execution_one_block_per_shard(small_shards: str) -> None:
    """Through Ray Data itself: each pass (epoch) draws new pairs; a block is one shard."""
    dataset = data.training_pairs(small_shards, PairConfig(pairs_per_epoch=90), image_size=20, seed=3)
    epochs = []
    for _ in range(2):
        blocks = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
        # 3 training alphabets, one shard each, 90 / 3 = 30 pairs per shard.
        assert sorted(len(b["same"]) for b in blocks) == [30, 30, 30]
        epochs.append(blocks)
    assert {int(e) for b in epochs[0] for e in b["epoch"]} == {0}
    assert {int(e) for b in epochs[1] for e in b["epoch"]} == {1}
    first = np.sort(np.concatenate([b["left"].reshape(len(b["left"]), -1).sum(1) for b in epochs[0]]))
    second = np.sort(np.concatenate([b["left"].reshape(len(b["left"]), -1).sum(1) for b in epochs[1]]))
    assert not np.array_equal(first, second)

    # With decoded shards kept between epochs, each epoch's pairs are the same as without.
    cached = data.training_pairs(small_shards, PairConfig(pairs_per_epoch=90), image_size=20, seed=3,
                                 cache_mb=64)
    for epoch in range(2):
        blocks = list(cached.iter_batches(batch_size=None, batch_format="numpy"))
        key = lambda b: (b["left"].sum(), b["right"].sum())  # noqa: E731  (blocks may come in any order)
        assert [key(b) for b in sorted(blocks, key=key)] == [key(b) for b in sorted(epochs[epoch], key=key)]

    # With an epoch clock (what Train workers set), the clock's epoch decides, however many passes ran before.
    import ray

    clock = data.start_epoch_clock()
    clocked = data.training_pairs(small_shards, PairConfig(pairs_per_epoch=90), image_size=20, seed=3, clock=clock)
    ray.get(clock.set.remote(1))
    for _ in range(2):
        blocks = list(clocked.iter_batches(batch_size=None, batch_format="numpy"))
        assert {int(e) for b in blocks for e in b["epoch"]} == {1}
        assert [key(b) for b in sorted(blocks, key=key)] == [key(b) for b in sorted(epochs[1], key=key)]
