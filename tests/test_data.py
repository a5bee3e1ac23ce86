"""The pair stage that Ray Data runs: pairs per group (or shard), per epoch, decoded and labelled right."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siamese_core.config import ModelConfig, PairConfig, PreprocessConfig
from siamese_core.pairs import name_keys
from workflows import data

MODEL16 = ModelConfig(input_size=16, kernels=(3, 2, 1, 1))  # the stage only reads the input size and preprocessing


def _png(value: int) -> bytes:
    """A 16x16 image whose ink pixel count encodes ``value`` (so decoded rows are traceable)."""
    pixels = np.full((16, 16), 255, dtype=np.uint8)
    pixels.flat[:value] = 0
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def block() -> dict[str, np.ndarray]:
    """Two groups x 4 classes x 20 sources; each image's ink count = its class number."""
    rows = [(a, 10 * i + c, d) for i, a in enumerate(["alpha", "beta"]) for c in range(1, 5)
            for d in range(1, 21)]
    return {
        "group": np.array([r[0] for r in rows], dtype=object),
        "label": np.array([f"{r[0]}.{r[1]}" for r in rows], dtype=object),
        "source": np.array([f"{r[2]:02d}" for r in rows], dtype=object),
        "image": np.array([_png(r[1]) for r in rows], dtype=object),
        "image_id": np.array([f"{r[0]}/{r[1]}/{r[2]}" for r in rows], dtype=object),
    }


def _stage(seed: int = 0, pair_cfg: PairConfig | None = None, n_units: int = 3) -> data.PairStage:
    return data.PairStage(pair_cfg or PairConfig(pairs_per_epoch=300, distorted_copies=8), MODEL16, seed=seed,
                          has_groups=True, n_units=n_units, total_classes=12)


def _pairs(stage: data.PairStage, block: dict[str, np.ndarray], epoch: int = 0) -> dict[str, np.ndarray]:
    return stage.pairs_for_shard(stage.decoded_shard(block, 0), epoch)


def _ink(images: np.ndarray) -> np.ndarray:
    return (images > 127).reshape(len(images), -1).sum(1)


def test_pairs_are_labelled_by_their_images_and_carry_their_keys(block) -> None:
    out = _pairs(_stage(), block)
    ink_left, ink_right = _ink(out["left"]), _ink(out["right"])
    assert np.array_equal(out["same"] == 1.0, ink_left == ink_right)
    assert out["left"].dtype == np.uint8 and out["left"].shape[1:] == (1, 16, 16)
    # 300 pairs over 3 groups in the data set: 100 per group here, half of them "same".
    assert len(out["same"]) == 200 and out["same"].sum() == 100
    # Negatives stay inside one group (ink counts 1..4 vs 11..14).
    assert np.array_equal(ink_left // 10, ink_right // 10)
    assert set(out["epoch"]) == {0}
    # the keys name each image's class and id: the trainer knows the classes without the pixels
    group = np.where(ink_left >= 10, "beta", "alpha")
    assert np.array_equal(out["left_class"], name_keys(np.char.add(np.char.add(group, "."), ink_left.astype(str))))
    assert np.array_equal(out["left_class"] == out["right_class"], out["same"] == 1.0)
    assert len(set(out["left_image"].tolist()) | set(out["right_image"].tolist())) > 100


def test_new_pairs_each_epoch_same_pairs_from_same_seed(block) -> None:
    first = _pairs(_stage(), block, 0)
    again = _pairs(_stage(), block, 0)
    second = _pairs(_stage(), block, 1)
    other_seed = _pairs(_stage(seed=1), block, 0)
    assert np.array_equal(first["left"], again["left"]) and np.array_equal(first["right"], again["right"])
    assert not np.array_equal(first["left"], second["left"])
    assert not np.array_equal(first["left"], other_seed["left"])
    assert set(second["epoch"]) == {1}


def test_pairs_do_not_depend_on_how_blocks_are_cut(block) -> None:
    whole = _pairs(_stage(), block)
    only_beta = {k: v[block["group"] == "beta"] for k, v in block.items()}
    part = _pairs(_stage(), only_beta)
    beta_rows = _ink(whole["left"]) >= 10  # beta: ids 11..14
    assert np.array_equal(whole["left"][beta_rows], part["left"])


def test_without_groups_a_shard_is_one_unit_with_its_share_of_pairs(block) -> None:
    rows = {k: v for k, v in block.items() if k != "group"}
    stage = data.PairStage(PairConfig(pairs_per_epoch=300), MODEL16, seed=0, has_groups=False, n_units=4,
                           total_classes=24)
    out = stage.pairs_for_shard(stage.decoded_shard(rows, 3), 0)
    assert len(out["same"]) == 100  # 8 of the data set's 24 classes: a third of the pairs
    mixed = (_ink(out["left"]) // 10 != _ink(out["right"]) // 10) & (out["same"] == 0)
    assert mixed.any()  # "different" partners come from anywhere in the shard
    again = stage.pairs_for_shard(stage.decoded_shard(rows, 2), 0)
    assert not np.array_equal(out["left"], again["left"])  # another shard, another seed


def test_only_training_sources_are_used_and_unknown_labels_never(block) -> None:
    stage = _stage(pair_cfg=PairConfig(pairs_per_epoch=200, sources=("01", "02")), n_units=2)
    marked = dict(block)
    # Images from other sources are corrupt: touching one would raise.
    marked["image"] = np.array([png if d in ("01", "02") else b"not a png" for png, d in
                                zip(block["image"], block["source"])], dtype=object)
    out = _pairs(stage, marked)
    assert len(out["same"]) == 200
    unknown = dict(block)
    unknown["label"] = np.where(block["label"] == "alpha.1", "new_whale", block["label"]).astype(object)
    unknown["image"] = np.array([b"bad" if label == "new_whale" else png for png, label in
                                 zip(block["image"], unknown["label"])], dtype=object)
    stage = data.PairStage(PairConfig(pairs_per_epoch=200), MODEL16, 0, True, 2, 8, unknown_label="new_whale")
    out = stage.pairs_for_shard(stage.decoded_shard(unknown, 0), 0)
    assert not np.isin(1, _ink(out["left"])) and not np.isin(1, _ink(out["right"]))


def test_colour_and_preprocessing_follow_the_model(block) -> None:
    rgb = ModelConfig(input_size=12, kernels=(3, 2, 1, 1), preprocess=PreprocessConfig(color="rgb", invert=False))
    stage = data.PairStage(PairConfig(pairs_per_epoch=20), rgb, 0, True, 2, 8)
    out = stage.pairs_for_shard(stage.decoded_shard(block, 0), 0)
    assert out["left"].shape[1:] == (3, 12, 12)
    assert out["left"].max() == 255  # not inverted: white paper stays 255


def test_corrupt_image_is_named(block) -> None:
    broken = dict(block)
    broken["image"] = np.array([b"garbage"] * len(block["image"]), dtype=object)
    with pytest.raises(Exception, match="alpha/"):
        _pairs(_stage(), broken)


class _OneShardDataSet:
    """What ShardPairs asks of a ``shards.DataSet``: its columns, a shard read, the manifest's checksum."""

    class manifest:  # noqa: N801
        content_checksum = "sha256:test"

    def columns(self) -> list[str]:
        return ["image_id", "image", "label", "split", "group", "source"]

    def read_shard(self, path: str, columns):
        import pyarrow.parquet as pq

        return pq.read_table(path, columns=columns)


def _write_shard(block: dict[str, np.ndarray], path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({k: list(v) for k, v in block.items()}), str(path))
    return str(path)


def _shard_pairs(cache_mb: float) -> data.ShardPairs:
    return data.ShardPairs(_OneShardDataSet(), _stage(pair_cfg=PairConfig(pairs_per_epoch=300)),
                           cache_bytes=int(cache_mb * 2**20))


def test_decoded_shards_are_kept_between_epochs(block, tmp_path, monkeypatch) -> None:
    """Epoch 1 from the cache (the file is gone) equals epoch 1 read and decoded afresh."""
    monkeypatch.setattr(data, "_PROCESS_CACHE", None)
    path = _write_shard(block, tmp_path / "shard.parquet")
    batch = {"path": np.array([path]), "index": np.array([0])}
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
    stage = _stage()
    shards = [stage.decoded_shard(block, 0) for _ in range(3)]
    for s in shards:
        s.ensure_decoded(np.arange(len(s.label)), MODEL16)
    assert all(s.encoded is None for s in shards)  # encoded bytes are dropped once every row is decoded
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


def test_rows_are_decoded_only_when_a_pair_needs_them(block) -> None:
    stage = _stage(pair_cfg=PairConfig(pairs_per_epoch=20), n_units=2)
    shard = stage.decoded_shard(block, 0)
    out = stage.pairs_for_shard(shard, 0)
    assert 0 < shard.decoded.sum() < len(shard.decoded) and shard.encoded is not None
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
    from workflows.shards import DataSet

    dataset = DataSet.open(small_shards)
    model = ModelConfig(input_size=20, kernels=(3, 2, 1, 1))
    stream = data.training_pairs(dataset, PairConfig(pairs_per_epoch=90), model, seed=3)
    epochs = []
    for _ in range(2):
        blocks = list(stream.iter_batches(batch_size=None, batch_format="numpy"))
        # 3 training alphabets, one shard each, 90 / 3 = 30 pairs per shard.
        assert sorted(len(b["same"]) for b in blocks) == [30, 30, 30]
        epochs.append(blocks)
    assert {int(e) for b in epochs[0] for e in b["epoch"]} == {0}
    assert {int(e) for b in epochs[1] for e in b["epoch"]} == {1}
    first = np.sort(np.concatenate([b["left"].reshape(len(b["left"]), -1).sum(1) for b in epochs[0]]))
    second = np.sort(np.concatenate([b["left"].reshape(len(b["left"]), -1).sum(1) for b in epochs[1]]))
    assert not np.array_equal(first, second)

    # With decoded shards kept between epochs, each epoch's pairs are the same as without.
    cached = data.training_pairs(dataset, PairConfig(pairs_per_epoch=90), model, seed=3, cache_mb=64)
    for epoch in range(2):
        blocks = list(cached.iter_batches(batch_size=None, batch_format="numpy"))
        key = lambda b: (b["left"].sum(), b["right"].sum())  # noqa: E731  (blocks may come in any order)
        assert [key(b) for b in sorted(blocks, key=key)] == [key(b) for b in sorted(epochs[epoch], key=key)]

    # With an epoch clock (what Train workers set), the clock's epoch decides, however many passes ran before.
    import ray

    clock = data.start_epoch_clock()
    clocked = data.training_pairs(dataset, PairConfig(pairs_per_epoch=90), model, seed=3, clock=clock)
    ray.get(clock.set.remote(1))
    for _ in range(2):
        blocks = list(clocked.iter_batches(batch_size=None, batch_format="numpy"))
        assert {int(e) for b in blocks for e in b["epoch"]} == {1}
        assert [key(b) for b in sorted(blocks, key=key)] == [key(b) for b in sorted(epochs[1], key=key)]


def test_the_pair_stage_does_not_import_torch() -> None:
    """The pair stage runs in Ray Data's worker processes: numpy and Pillow only. Importing torch
    there would add several hundred MB to every pair-stage process (bench_pipeline.py --memory)."""
    import subprocess
    import sys

    code = "import sys, workflows.data; sys.exit(2 if 'torch' in sys.modules else 0)"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:] or "workflows.data imported torch"
