"""Ray Data: training shards -> decoded images -> same/different pairs, streamed.

Each Parquet shard holds whole groups, or whole classes where the data has no
groups (see ``workflows.ingest``), so the pair stage samples within one shard at
a time: its memory is bounded by a few shards in flight, never by the size of
the data set, and it needs no global shuffle. Pairs are a pure function of
``(seed, epoch, unit)`` (:func:`siamese_core.pairs.unit_pairs`; a unit is a group,
or a shard where there are no groups):

* the epoch is the one the Train workers are on: they set it on an
  :class:`EpochClock` actor before each pass, and each stage task reads it, so
  each epoch draws new pairs, a re-run draws the same ones, and a run resumed
  from a checkpoint (new workers, or a new driver) draws the pairs of the epoch
  it trains, not epoch 0's again. Without a clock (a dataset iterated
  directly), the epoch is the index of the dataset's execution;
* every group gets an equal share of ``pairs_per_epoch``, as in the paper, or
  every class where there are no groups.

Each image travels with int64 keys of its class and its id, so a trainer knows
which images and classes are the same without looking at pixels. The stage
emits each pair once; the ``distorted_copies`` are expanded on the training
device (``siamese_core.loop.expand_copies``), where the affine distortions run,
so the stream carries no duplicated bytes.

On the worker, :class:`EpochStream` pulls each epoch's pass ahead into a queue
and starts the next pass before the worker asks for it (the announcing of the
epoch to the clock moves with it).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from siamese_core.config import ModelConfig, PairConfig
from siamese_core.images import decode_image
from siamese_core.mining import Assignment, epoch_pairs
from siamese_core.pairs import name_keys, pairs_per_unit, unit_name

PAIR_COLUMNS = ("left", "right", "same", "left_class", "right_class", "left_image", "right_image", "epoch")


def current_execution_index() -> int:
    """How many times Ray Data has executed this pipeline before (0 on the first pass).

    Ray Data itself seeds per-execution randomness (``RandomSeedConfig``) from
    this counter; there is no public accessor yet, so fall back to 0.
    """
    from ray.data import DataContext

    return int(getattr(DataContext.get_current(), "_execution_idx", 0))


@dataclass
class DecodedShard:
    """One shard's training rows (its pairing sources, known classes only), decoded on first use and kept.

    Why: decoding is most of the pair stage's work, and every epoch samples from the
    same rows. Keeping the decoded rows (in :class:`ShardCache`) leaves later epochs
    only the sampling and a gather.
    """

    label: np.ndarray  # int64 class codes, local to the shard
    unit: np.ndarray  # str: the pairing unit of each row (its group, or the shard)
    source: np.ndarray | None
    image_id: np.ndarray
    class_key: np.ndarray  # int64 (siamese_core.pairs.name_keys of the label)
    image_key: np.ndarray  # int64 (of the image id)
    images: np.ndarray  # uint8 [n, C, S, S]
    decoded: np.ndarray  # bool [n]
    encoded: np.ndarray | None
    encoded_bytes: int = 0

    @classmethod
    def from_rows(cls, rows: dict[str, np.ndarray], pair_cfg: PairConfig, model: ModelConfig, shard_index: int,
                  unknown_label: str | None = None) -> "DecodedShard":
        labels = np.asarray(rows["label"], dtype=object)
        keep = labels != unknown_label if unknown_label is not None else np.ones(len(labels), bool)
        source = None if rows.get("source") is None else np.asarray(rows["source"], dtype=str)
        if pair_cfg.sources:
            if source is None:
                raise ValueError(f"pairs.sources={list(pair_cfg.sources)}, but the data set has no source column")
            keep &= np.isin(source, np.asarray(pair_cfg.sources, dtype=str))
        keep = np.flatnonzero(keep)
        names = labels[keep].astype(str)
        codes = np.unique(names, return_inverse=True)[1].astype(np.int64)
        unit = (np.asarray(rows["group"], dtype=str)[keep] if rows.get("group") is not None
                else np.full(keep.size, unit_name(shard_index)))
        encoded = np.asarray(rows["image"], dtype=object)[keep]
        preprocess = model.preprocess.resolved()
        image_id = np.asarray(rows["image_id"], dtype=str)[keep]
        return cls(label=codes, unit=unit, source=None if source is None else source[keep], image_id=image_id,
                   class_key=name_keys(names), image_key=name_keys(image_id),
                   images=np.zeros((keep.size, preprocess.channels, model.input_size, model.input_size), np.uint8),
                   decoded=np.zeros(keep.size, dtype=bool), encoded=encoded,
                   encoded_bytes=sum(len(p) for p in encoded))

    def ensure_decoded(self, rows: np.ndarray, model: ModelConfig) -> None:
        """Decode the given rows that are not decoded yet; drop the encoded bytes once all are."""
        preprocess = model.preprocess.resolved()
        for i in rows[~self.decoded[rows]]:
            assert self.encoded is not None
            self.images[i] = decode_image(self.encoded[i], preprocess, model.input_size, path=str(self.image_id[i]))
            self.decoded[i] = True
        if self.encoded is not None and self.decoded.all():
            self.encoded, self.encoded_bytes = None, 0

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes + self.encoded_bytes + self.image_id.nbytes + self.unit.nbytes
                   + 24 * len(self.label))


class ShardCache:
    """Decoded shards, least recently used first out, within ``max_bytes`` (0 keeps nothing).

    One per pair-stage worker process (:func:`process_cache`): Ray Data runs each
    epoch as new tasks, but reuses warm worker processes, so the cache survives
    from one epoch to the next. Memory stays bounded by ``max_bytes`` plus the
    shard in hand, whatever the size of the data set; a data set larger than the
    cap re-decodes the shards that fell out.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, DecodedShard] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> DecodedShard | None:
        shard = self.entries.get(key)
        if shard is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return shard

    def put(self, key: tuple, shard: DecodedShard) -> None:
        self.entries.pop(key, None)
        if shard.nbytes > self.max_bytes:
            return
        self.entries[key] = shard
        self.evict()

    def evict(self) -> None:
        """Drop the least recently used shards until the cache fits ``max_bytes``."""
        while self.entries and self.nbytes > self.max_bytes:
            self.entries.popitem(last=False)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.entries.values())


_PROCESS_CACHE: ShardCache | None = None


def process_cache(max_bytes: int) -> ShardCache:
    """This worker process's shard cache (created on first use, resized if the cap changes)."""
    global _PROCESS_CACHE
    if _PROCESS_CACHE is None:
        _PROCESS_CACHE = ShardCache(max_bytes)
    elif _PROCESS_CACHE.max_bytes != max_bytes:
        _PROCESS_CACHE.max_bytes = max_bytes
        _PROCESS_CACHE.evict()
    return _PROCESS_CACHE


def cached_shard(cache: ShardCache, dataset: Any, path: str, index: int, pair_cfg: PairConfig, model: ModelConfig,
                 unknown_label: str | None) -> DecodedShard:
    """A training shard from this process's ``cache``, read and kept there on a miss.

    The pair stage and the Train worker's mining embeddings both take their shards here, so a
    shard is read and decoded once per process whichever asks first.
    """
    key = (dataset.manifest.content_checksum, path, model.input_size, model.preprocess, pair_cfg.sources)
    shard = cache.get(key)  # a hit also marks it most recently used
    if shard is None:
        columns = [c for c in ("image", "image_id", "label", "group", "source") if c in dataset.columns()]
        table = dataset.read_shard(path, columns)
        rows = {name: table.column(name).to_numpy(zero_copy_only=False) for name in columns}
        shard = DecodedShard.from_rows(rows, pair_cfg, model, index, unknown_label)
        cache.put(key, shard)
    return shard


class EpochClock:
    """The epoch the Train workers are on, and the mined assignment in force, for the pair stage's tasks.

    Why an actor: Ray Data runs the stage in its own tasks, and its execution
    counter starts again at 0 whenever Ray Train restarts the workers, so only
    the workers know which epoch they are about to train. Workers call
    ``set`` before iterating an epoch (and ``set_assignment`` after mining); the
    stage calls ``get`` once per task. The assignment stays in the object store:
    the clock holds its reference, boxed in a list so Ray passes the reference itself.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.assignment: list | None = None

    def set(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_assignment(self, boxed: list | None) -> None:
        self.assignment = boxed

    def get(self) -> tuple[int, list | None]:
        return self.epoch, self.assignment


_ASSIGNMENTS: dict[str, Assignment] = {}


def assignment_of(ref: Any) -> Assignment:
    """The mined assignment behind an object reference, fetched once per process."""
    import ray

    key = ref.hex()
    if key not in _ASSIGNMENTS:
        _ASSIGNMENTS.clear()  # one assignment is in force at a time
        _ASSIGNMENTS[key] = Assignment.from_state_dict(ray.get(ref))
    return _ASSIGNMENTS[key]


def clock_setter(clock: Any) -> Callable[[int], None]:
    """``announce`` for :class:`EpochStream`: set the :class:`EpochClock` (waits until it is set)."""
    import ray

    return lambda epoch: ray.get(clock.set.remote(epoch))


def start_epoch_clock() -> Any:
    """A new :class:`EpochClock` actor (no CPU; restarted if its process dies, and set again next epoch)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=-1)(EpochClock).remote()


class PairStage:
    """Pairs from one shard's decoded rows, a pure function of ``(seed, epoch, unit)``.

    Images are decoded with the model's preprocessing and resized to its input here, on
    Ray Data's CPUs, so trainers receive ready uint8 arrays.
    """

    def __init__(self, pair_cfg: PairConfig, model: ModelConfig, seed: int, has_groups: bool, n_units: int,
                 total_classes: int, negatives: str = "same_group", clock: Any = None,
                 unknown_label: str | None = None) -> None:
        self.pair_cfg, self.model, self.seed = pair_cfg, model, seed
        self.has_groups, self.n_units, self.total_classes = has_groups, n_units, total_classes
        self.negatives, self.clock, self.unknown_label = negatives, clock, unknown_label

    def current(self) -> tuple[int, Assignment | None]:
        """The workers' epoch and mined assignment from the clock; without one, the execution index."""
        if self.clock is None:
            return current_execution_index(), None
        import ray

        epoch, boxed = ray.get(self.clock.get.remote())
        return int(epoch), (None if boxed is None else assignment_of(boxed[0]))

    def decoded_shard(self, rows: dict[str, np.ndarray], shard_index: int) -> DecodedShard:
        return DecodedShard.from_rows(rows, self.pair_cfg, self.model, shard_index, self.unknown_label)

    def pairs_for_shard(self, shard: DecodedShard, epoch: int,
                        assignment: Assignment | None = None) -> dict[str, np.ndarray]:
        outputs = [self.pairs_for_unit(shard, name, epoch, assignment) for name in sorted(set(shard.unit.tolist()))]
        if not outputs:
            size, channels = self.model.input_size, self.model.preprocess.resolved().channels
            empty = np.zeros((0, channels, size, size), dtype=np.uint8)
            keys = np.zeros(0, np.int64)
            return {"left": empty, "right": empty, "same": np.zeros(0, np.float32), "left_class": keys,
                    "right_class": keys, "left_image": keys, "right_image": keys, "epoch": np.zeros(0, np.int32)}
        return {key: np.concatenate([o[key] for o in outputs]) for key in PAIR_COLUMNS}

    def pairs_for_unit(self, shard: DecodedShard, unit: str, epoch: int,
                       assignment: Assignment | None = None) -> dict[str, np.ndarray]:
        rows = np.flatnonzero(shard.unit == unit)
        n = pairs_per_unit(self.pair_cfg, self.has_groups, self.n_units, np.unique(shard.label[rows]).size,
                           self.total_classes)
        left, right, same = epoch_pairs(shard.label[rows], shard.image_key[rows], self.pair_cfg, self.seed, epoch,
                                        unit, n, None if shard.source is None else shard.source[rows],
                                        self.negatives, assignment)
        left, right = rows[left], rows[right]
        shard.ensure_decoded(np.unique(np.concatenate([left, right])), self.model)
        return {"left": shard.images[left], "right": shard.images[right], "same": same,
                "left_class": shard.class_key[left], "right_class": shard.class_key[right],
                "left_image": shard.image_key[left], "right_image": shard.image_key[right],
                "epoch": np.full(len(same), epoch, dtype=np.int32)}


class ShardPairs:
    """``map_batches`` callable: shard paths -> those shards' pairs (one shard read at a time).

    Ray Data's Parquet reader merges small files into one block, which would
    hand the pair stage the whole data set at once; reading each listed shard
    here keeps the stage's memory at one shard per task, whatever the data size.
    Decoded shards are kept in the process's :class:`ShardCache` (``cache_bytes``
    at most), so later epochs neither read nor decode them again.
    """

    def __init__(self, dataset: Any, stage: PairStage, cache_bytes: int = 0) -> None:
        self.dataset = dataset
        self.stage = stage
        self.cache_bytes = cache_bytes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cache = process_cache(self.cache_bytes)
        epoch, assignment = self.stage.current()
        outputs = []
        for path, index in zip(batch["path"], batch["index"]):
            shard = cached_shard(cache, self.dataset, str(path), int(index), self.stage.pair_cfg, self.stage.model,
                                 self.stage.unknown_label)
            outputs.append(self.stage.pairs_for_shard(shard, epoch, assignment))
        return {key: np.concatenate([o[key] for o in outputs]) for key in PAIR_COLUMNS}


def training_pairs(dataset: Any, pair_cfg: PairConfig, model: ModelConfig, seed: int, clock: Any = None,
                   negatives: str = "same_group", num_cpus: float = 0.5, read_cpus: float = 0.25,
                   concurrency: int = 1, cache_mb: float = 0.0, shards_per_task: int = 1) -> Any:
    """The streaming pair dataset over the training split of ``dataset`` (a ``shards.DataSet``; lazy).

    * The manifest's shard list is the dataset; each task reads its shards one
      at a time and emits their pairs, so memory holds ``concurrency`` tasks'
      shards at a time, whatever the size of the data set.
    * Tasks, not actors: Ray re-executes the pipeline every epoch, and tasks
      reuse warm worker processes where an actor pool is created again.
    * CPU requests are fractional so the stage always finds a slot beside the
      Train workers on a small machine (whole-CPU requests hang there).
    * ``clock`` (an :class:`EpochClock` handle the Train workers set) says which
      epoch's pairs to draw; without it, each execution is the next epoch.
    * ``cache_mb`` > 0 keeps up to that many MB of decoded shards per stage
      process (:class:`ShardCache`), so epochs after the first skip reading
      and decoding.
    * ``shards_per_task`` shards go to one task (read and paired one after the
      other, their pairs emitted as one block): every task and every block costs
      Ray's scheduler, the split coordinator and a worker process CPU beside the
      training steps, while the pairs themselves take milliseconds per shard.
    """
    import ray.data

    manifest = dataset.manifest
    paths = dataset.shard_paths("train")
    stage = PairStage(pair_cfg, model, seed, has_groups=manifest.has_group,
                      n_units=dataset.group_count("train") if manifest.has_group else len(paths),
                      total_classes=dataset.class_count("train"), negatives=negatives, clock=clock,
                      unknown_label=manifest.unknown_label)
    per_task = max(1, int(shards_per_task))
    listing = ray.data.from_items([{"path": p, "index": i} for i, p in enumerate(paths)],
                                  override_num_blocks=-(-len(paths) // per_task))
    pairs = ShardPairs(dataset, stage, cache_bytes=int(cache_mb * 2**20))
    return listing.map_batches(pairs, batch_size=per_task, batch_format="numpy",
                               num_cpus=num_cpus + read_cpus, compute=ray.data.TaskPoolStrategy(size=concurrency))


def iter_epoch_chunks(shard: Any, chunk_pairs: int, batch_size: int, shuffle_buffer: int = 0,
                      shuffle_seed: int | None = None) -> Iterator[dict[str, Any]]:
    """One epoch of pairs from a Train worker's dataset shard, in chunks of ``chunk_pairs``.

    Why chunks: Ray Data's per-batch work (collation, a thread hand-off, the optional
    local shuffle buffer) costs about as much as a small CPU training step. Fetching
    big chunks and cutting them into training batches locally (:func:`iter_steps`,
    which also shuffles each chunk, mixing the alphabets it spans) makes it negligible.
    """
    return shard.iter_torch_batches(batch_size=max(chunk_pairs, batch_size), drop_last=False,
                                    local_shuffle_buffer_size=shuffle_buffer or None,
                                    local_shuffle_seed=shuffle_seed)


class EpochStream:
    """A Train worker's pairs, epoch after epoch, each pass started before the worker asks for it.

    Why, twice over:

    * Ray Data executes the pipeline again for every epoch, and starting a pass
      (the split coordinator's barrier, a new executor, the first shard's pairs)
      takes about a second, which a worker would otherwise sit out after its last
      chunk, on top of validation and the checkpoint;
    * while a pass is open, Ray Data's executor and the stage's tasks take CPU
      from the training steps beside them; pulling the pass quickly into a queue
      (``data.prefetch_chunks``) closes it early.

    A background thread pulls an epoch's chunks (:func:`iter_epoch_chunks`) into a
    queue of ``queue_chunks``; once that pass is exhausted (every task of it has
    finished) and the worker trains on it, the thread announces the next epoch
    (``announce``: :func:`clock_setter`) and starts that pass, so at most two
    epochs' queues are held. Asking for another epoch than the one prepared (a restart)
    drops the prepared pass and starts the asked one.
    """

    def __init__(self, shard: Any, chunk_pairs: int, batch_size: int, *,
                 announce: Callable[[int], None] | None = None, shuffle_buffer: int = 0, seed: int = 0,
                 end_epoch: int | None = None, queue_chunks: int = 8,
                 fresh: Callable[[int], bool] | None = None) -> None:
        self.shard, self.announce = shard, announce
        self.fresh = fresh  # epochs whose pass must not start early: mining changes their pairs first
        self.chunk_pairs, self.batch_size = chunk_pairs, batch_size
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.end_epoch = end_epoch
        self.queue_chunks = queue_chunks
        self._pass: _Pass | None = None

    def epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        """This epoch's chunks; the prepared pass if it is this epoch's, else a new one."""
        current, self._pass = self._pass, None
        if current is None or current.epoch != epoch:
            if current is not None:
                current.abandon()
            current = self._start(epoch)
        finished = False
        try:
            yield from current.items()
            finished = True
        finally:
            if finished:
                self._pass = current.successor
            else:  # left part-way (an error, a break): its remaining chunks are of no use
                current.abandon()

    def wait_prepared(self, timeout_s: float | None = None) -> bool:
        """Block until the pass prepared for the next epoch has queued all its chunks (or
        failed); True at once if none is prepared. Why: a caller that must know no pair-stage
        work is left in flight, such as the benchmark that hands the cores to another loop.
        A pass of more than ``queue_chunks`` chunks fills only as the worker drains it."""
        return self._pass is None or self._pass.filled.wait(timeout_s)

    def close(self) -> None:
        """Stop the prepared pass, if any (the worker is done)."""
        if self._pass is not None:
            self._pass.abandon()
            self._pass = None

    def _start(self, epoch: int) -> "_Pass":
        last = (self.end_epoch is not None and epoch + 1 >= self.end_epoch) or \
            (self.fresh is not None and self.fresh(epoch + 1))
        return _Pass(epoch, self.queue_chunks, lambda: self._chunks(epoch), None if last else self._start)

    def _chunks(self, epoch: int) -> Iterator[dict[str, Any]]:
        if self.announce is not None:
            self.announce(epoch)  # before iterating: the pair stage draws this epoch's pairs
        return iter(iter_epoch_chunks(self.shard, self.chunk_pairs, self.batch_size, self.shuffle_buffer,
                                      self.seed + epoch))


def worker_stream(shard: Any, cfg: Any, clock: Any, end_epoch: int | None = None) -> EpochStream:
    """The :class:`EpochStream` a Train worker reads, from the job's configuration (``JobConfig``);
    ``end_epoch`` (default: ``training.epochs``) is where it stops starting passes ahead."""
    return EpochStream(shard, cfg.data.chunk_pairs, cfg.training.batch_size, announce=clock_setter(clock),
                       shuffle_buffer=cfg.data.shuffle_buffer_pairs, seed=cfg.training.seed,
                       end_epoch=cfg.training.epochs if end_epoch is None else end_epoch,
                       queue_chunks=cfg.data.prefetch_chunks, fresh=cfg.mining.mines_at)


_END = object()


class _Pass:
    """One epoch's pass over the dataset shard, pulled by a daemon thread into a bounded queue."""

    def __init__(self, epoch: int, queue_chunks: int, chunks: Any, follow: Any) -> None:
        import queue
        import threading

        self.epoch = epoch
        self.queue: "queue.Queue[Any]" = queue.Queue(maxsize=max(1, queue_chunks))
        self.stopped = threading.Event()
        self.consumed = threading.Event()  # the worker has begun this pass
        self.filled = threading.Event()  # every chunk is queued (or the pass failed or stopped)
        self.successor: _Pass | None = None
        self._follow = follow
        self._thread = threading.Thread(target=self._run, args=(chunks,), name=f"pairs-epoch-{epoch}", daemon=True)
        self._thread.start()

    def _run(self, chunks: Any) -> None:
        try:
            for chunk in chunks():
                if not self._put(chunk):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)
            return
        finally:
            self.filled.set()
        # One pass ahead at most: the next starts once this one is exhausted (all its tasks have
        # finished) and the worker is training on it.
        while not self.consumed.wait(0.2):
            if self.stopped.is_set():
                return
        if self._follow is not None and not self.stopped.is_set():
            self.successor = self._follow(self.epoch + 1)
            if self.stopped.is_set():  # abandoned meanwhile
                self.successor.abandon()
        self._put(_END)

    def _put(self, item: Any) -> bool:
        import queue

        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def items(self) -> Iterator[Any]:
        self.consumed.set()
        while True:
            item = self.queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def abandon(self) -> None:
        self.stopped.set()
        if self.successor is not None:
            self.successor.abandon()
