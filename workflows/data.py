"""Ray Data: training shards -> decoded images -> same/different pairs, streamed.

Each Parquet shard holds whole alphabets (see ``workflows.ingest``), so the
pair stage samples within one block at a time: its memory is bounded by a few
shards in flight, never by the size of the data set, and it needs no global
shuffle. Pairs are a pure function of ``(seed, epoch, alphabet)``:

* the epoch is the index of the dataset's execution (Ray re-executes the
  pipeline for every pass a Train worker makes) plus ``epoch_offset``, so each
  epoch draws new pairs and a re-run draws the same ones;
* every alphabet gets ``pairs_per_epoch / n_alphabets`` pairs, as in the paper.

The stage emits each pair once; the ``distorted_copies`` are expanded on the
training device (:func:`expand_copies`), where the affine distortions run, so
the stream carries no duplicated bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Iterator

import numpy as np

from siamese_core.config import PairConfig
from siamese_core.omniglot import decode_png
from siamese_core.pairs import sample_pairs

PAIR_COLUMNS = ("left", "right", "same", "epoch")
SOURCE_COLUMNS = ["image", "image_id", "alphabet", "character", "drawer"]


def alphabet_seed(seed: int, alphabet: str) -> int:
    """A stable 63-bit seed per (run seed, alphabet), independent of how blocks are cut."""
    digest = hashlib.sha256(f"{seed}:{alphabet}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def current_execution_index() -> int:
    """How many times Ray Data has executed this pipeline before (0 on the first pass).

    Ray Data itself seeds per-execution randomness (``RandomSeedConfig``) from
    this counter; there is no public accessor yet, so fall back to 0.
    """
    from ray.data import DataContext

    return int(getattr(DataContext.get_current(), "_execution_idx", 0))


class PairStage:
    """``map_batches`` callable: a block of image rows -> a block of pairs.

    Images are decoded and resized to the model's input size here, on Ray Data's
    CPUs, so trainers receive ready uint8 arrays.
    """

    def __init__(self, pair_cfg: PairConfig, image_size: int, seed: int, n_alphabets: int,
                 epoch_offset: int = 0, negatives: str = "same_alphabet") -> None:
        self.pair_cfg = pair_cfg
        self.image_size = image_size
        self.seed = seed
        self.pairs_per_alphabet = max(1, round(pair_cfg.pairs_per_epoch / max(1, n_alphabets)))
        self.epoch_offset = epoch_offset
        self.negatives = negatives

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        epoch = self.epoch_offset + current_execution_index()
        outputs = [self.pairs_for_alphabet(batch, name, epoch) for name in sorted(set(batch["alphabet"]))]
        return {key: np.concatenate([o[key] for o in outputs]) for key in PAIR_COLUMNS}

    def pairs_for_alphabet(self, batch: dict[str, np.ndarray], alphabet: str, epoch: int) -> dict[str, np.ndarray]:
        rows = np.flatnonzero((batch["alphabet"] == alphabet) & np.isin(batch["drawer"], self.pair_cfg.drawers))
        cfg = dataclasses.replace(self.pair_cfg, pairs_per_epoch=max(2, self.pairs_per_alphabet),
                                  distorted_copies=0)
        pairs = sample_pairs(batch["alphabet"][rows], batch["character"][rows], cfg,
                             seed=alphabet_seed(self.seed, alphabet), epoch=epoch,
                             drawer=batch["drawer"][rows], negatives=self.negatives)
        needed = np.unique(np.concatenate([pairs.left, pairs.right]))
        decoded = np.zeros((len(rows), self.image_size, self.image_size), dtype=np.uint8)
        for i in needed:
            row = rows[i]
            image = decode_png(batch["image"][row], path=str(batch["image_id"][row]), size=self.image_size)
            decoded[i] = np.rint(image * 255.0).astype(np.uint8)
        return {"left": decoded[pairs.left], "right": decoded[pairs.right],
                "same": pairs.same.astype(np.float32),
                "epoch": np.full(len(pairs), epoch, dtype=np.int32)}


class ShardPairs:
    """``map_batches`` callable: shard paths -> that shard's pairs (one shard in memory at a time).

    Ray Data's Parquet reader merges small files into one block, which would
    hand the pair stage the whole data set at once; reading each listed shard
    here keeps the stage's memory at one shard per task, whatever the data size.
    """

    def __init__(self, filesystem: Any, stage: PairStage) -> None:
        self.filesystem = filesystem
        self.stage = stage

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import pyarrow.parquet as pq

        outputs = []
        for path in batch["path"]:
            table = pq.read_table(str(path), columns=SOURCE_COLUMNS, filesystem=self.filesystem)
            rows = {name: table.column(name).to_numpy(zero_copy_only=False) for name in SOURCE_COLUMNS}
            outputs.append(self.stage(rows))
        return {key: np.concatenate([o[key] for o in outputs]) for key in PAIR_COLUMNS}


def training_pairs(uri: str, pair_cfg: PairConfig, image_size: int, seed: int,
                   endpoint_url: str | None = None, epoch_offset: int = 0,
                   negatives: str = "same_alphabet", num_cpus: float = 0.5, read_cpus: float = 0.25,
                   concurrency: int = 1) -> Any:
    """The streaming pair dataset over the training split (lazy; runs when iterated).

    * The manifest's shard list is the dataset; each task reads one shard and
      emits its pairs, so memory holds ``concurrency`` shards at a time,
      whatever the size of the data set.
    * Tasks, not actors: Ray re-executes the pipeline every epoch, and tasks
      reuse warm worker processes where an actor pool is created again.
    * CPU requests are fractional so the stage always finds a slot beside the
      Train workers on a small machine (whole-CPU requests hang there).
    """
    import ray.data

    from workflows import shards

    manifest = shards.read_manifest(uri, endpoint_url)
    n_alphabets = int(manifest.splits["train"]["alphabets"])
    loc, paths = shards.split_files(uri, "train", endpoint_url)
    stage = PairStage(pair_cfg=pair_cfg, image_size=image_size, seed=seed, n_alphabets=n_alphabets,
                      epoch_offset=epoch_offset, negatives=negatives)
    listing = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
    return listing.map_batches(ShardPairs(loc.fs, stage), batch_size=1, batch_format="numpy",
                               num_cpus=num_cpus + read_cpus, compute=ray.data.TaskPoolStrategy(size=concurrency))


def expand_copies(left: Any, right: Any, same: Any, copies: int) -> tuple[Any, Any, Any, Any]:
    """Each pair once undistorted plus ``copies`` times flagged for distortion (paper: 8).

    Works on torch tensors on any device; returns (left, right, same, distort_mask).
    """
    import torch

    n = left.shape[0]
    reps = copies + 1
    mask = torch.arange(n * reps, device=left.device) >= n
    return (left.repeat(reps, *([1] * (left.dim() - 1))), right.repeat(reps, *([1] * (right.dim() - 1))),
            same.repeat(reps), mask)


def iter_steps(left: Any, right: Any, same: Any, mask: Any, batch_size: int,
               generator: Any) -> Iterator[tuple[Any, Any, Any, Any]]:
    """Shuffle an expanded chunk and cut it into training batches of ``batch_size``."""
    import torch

    order = torch.randperm(left.shape[0], generator=generator, device=generator.device).to(left.device)
    for start in range(0, left.shape[0] - batch_size + 1, batch_size):
        idx = order[start:start + batch_size]
        yield left[idx], right[idx], same[idx], mask[idx]
