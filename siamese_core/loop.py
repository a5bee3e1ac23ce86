"""The one training loop: epochs of steps, validation, early stopping and the time budget.

A Ray Train worker (``workflows.train``) and a plain process (:func:`fit`, the GPU
benchmark) run the same :class:`TrainingLoop`; they differ only in where an epoch's
pairs come from (a Ray Data stream, or :class:`MemoryPairs` over decoded arrays)
and where an epoch's row goes (``ray.train.report`` with a checkpoint, or a list).
So figures measured without Ray describe what the Ray job runs.

Design notes (why, not what):

* Everything random is a pure function of the run's seed: the pairs (per unit
  and epoch, :func:`siamese_core.pairs.unit_pairs`), the order of each chunk's
  rows and the distortions (:func:`epoch_generator`, per epoch and rank), so a
  restarted or distributed run draws the same epoch, and on CPU the same seed
  gives the same history.
* The loop never reads a loss on the host during an epoch: each step's loss
  stays on the device and is read once at the epoch's end (a read per step
  would wait for the GPU every step).
* Pairs arrive as chunks of thousands; each chunk goes to the device once and
  is cut into batches there (:func:`iter_steps`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from .config import TrainingRecipe
from .evaluation import Validator
from .images import LabelledImages
from .mining import Assignment, epoch_pairs, mine_assignment
from .model import SiameseNet, init_weights, place_model
from .optim import apply_epoch_schedule, build_optimizer, weight_average
from .pairs import name_keys, pairs_per_unit, unit_name
from .train_step import to_model_input, train_step

Chunk = dict[str, torch.Tensor]
"""A block of pairs: ``left``/``right`` uint8 images ``[n,C,S,S]``, ``same`` float ``[n]``, the int64
keys ``left_class``, ``right_class``, ``left_image``, ``right_image`` and the ``epoch`` it was drawn for."""

KEY_COLUMNS = ("left_class", "right_class", "left_image", "right_image")


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The 63-bit seed of one rank's epoch: its chunks' shuffles and its distortions."""
    return int(np.random.SeedSequence([seed, epoch, rank, 0xD157]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def epoch_generator(seed: int, epoch: int, rank: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(epoch_seed(seed, epoch, rank))


def new_model(recipe_model: Any, seed: int, fan_in_scaled: bool = True) -> SiameseNet:
    """A model initialised as its config's ``init`` says (the paper's by default), seeded."""
    return init_weights(SiameseNet(recipe_model), torch.Generator().manual_seed(int(seed)),
                        fan_in_scaled=fan_in_scaled)


@dataclass
class EarlyStopping:
    """Stop after ``patience`` epochs without a strict improvement of the monitored value.

    The paper monitors validation one-shot accuracy (higher is better) with
    patience 20 and keeps the best epoch. ``update`` returns True when the
    value is a new best (the caller then snapshots the weights).
    """

    patience: int
    best_value: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")

    def update(self, epoch: int, value: float) -> bool:
        if value > self.best_value:
            self.best_value, self.best_epoch, self.bad_epochs = float(value), int(epoch), 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"patience": self.patience, "best_value": self.best_value,
                "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.patience = int(state["patience"])
        self.best_value = float(state["best_value"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])


@dataclass
class LoopState:
    """What a resumed run needs besides weights and optimizer: where it stands and how long it took."""

    next_epoch: int = 0
    stopper: EarlyStopping | None = None
    elapsed_s: float = 0.0
    epoch_seconds: list[float] = field(default_factory=list)
    mining: dict[str, Any] | None = None  # the assignment in force (Assignment.state_dict), with the checkpoint

    def state_dict(self) -> dict[str, Any]:
        assert self.stopper is not None
        return {"next_epoch": self.next_epoch, "early_stopping": self.stopper.state_dict(),
                "elapsed_s": self.elapsed_s, "epoch_seconds": list(self.epoch_seconds[-3:]), "mining": self.mining}

    @staticmethod
    def from_state_dict(state: dict[str, Any], patience: int) -> "LoopState":
        stopper = EarlyStopping(patience)
        stopper.load_state_dict(state["early_stopping"])
        return LoopState(next_epoch=int(state["next_epoch"]), stopper=stopper,
                         elapsed_s=float(state.get("elapsed_s", 0.0)),
                         epoch_seconds=[float(s) for s in state.get("epoch_seconds", [])],
                         mining=state.get("mining"))


def expand_copies(chunk: Chunk, copies: int) -> tuple[torch.Tensor, ...]:
    """Each pair once undistorted plus ``copies`` times flagged for distortion (paper: 8).

    Returns ``(left, right, same, distort_mask, *keys)`` on the chunk's device.
    """
    n = chunk["left"].shape[0]
    reps = copies + 1
    mask = torch.arange(n * reps, device=chunk["left"].device) >= n

    def tile(t: torch.Tensor) -> torch.Tensor:
        return t.repeat(reps, *([1] * (t.dim() - 1)))

    return (tile(chunk["left"]), tile(chunk["right"]), tile(chunk["same"]), mask,
            *(tile(chunk[k]) for k in KEY_COLUMNS))


def iter_steps(columns: tuple[torch.Tensor, ...], batch_size: int,
               generator: torch.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
    """Shuffle an expanded chunk and cut it into training batches of ``batch_size``
    (a last partial batch is dropped, as ``drop_last`` would)."""
    n = columns[0].shape[0]
    order = torch.randperm(n, generator=generator, device=generator.device).to(columns[0].device)
    for start in range(0, n - batch_size + 1, batch_size):
        idx = order[start:start + batch_size]
        yield tuple(c.index_select(0, idx) for c in columns)


def _to_device(chunk: Chunk, device: torch.device) -> Chunk:
    """The chunk on the training device, in one copy per column (pinned first when it goes to a GPU)."""
    if device.type == "cpu":
        return chunk
    return {k: (v.pin_memory() if v.device.type == "cpu" else v).to(device, non_blocking=True)
            for k, v in chunk.items()}


class TrainingLoop:
    """The epochs of one run: schedule, steps, validation (on rank 0), early stopping, time budget.

    ``mean_across_ranks`` and ``from_rank0`` are identities in one process; a Ray Train worker
    passes torch.distributed's all-reduce and broadcast, so every rank sees rank 0's decision.
    """

    def __init__(self, recipe: TrainingRecipe, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device | str, validator: Validator | None = None, *, rank: int = 0,
                 world: int = 1, autocast_dtype: torch.dtype | None = None,
                 mean_across_ranks: Callable[[float], float] = lambda x: x,
                 from_rank0: Callable[[dict[str, Any]], dict[str, Any]] = lambda x: x,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.recipe, self.optimizer = recipe, optimizer
        # The compiled module shares the network's parameters: the optimizer, checkpoints and the
        # validator keep using the network itself (``net``).
        self.model = torch.compile(model) if recipe.training.compile else model
        self.device = torch.device(device)
        self.validator, self.rank, self.world = validator, rank, world
        self.autocast_dtype = autocast_dtype
        self.mean_across_ranks, self.from_rank0, self.clock = mean_across_ranks, from_rank0, clock
        # Every rank keeps the average (the same weights on each), so any rank can resume it.
        self.average = weight_average(self.net, recipe.optim)

    @property
    def net(self) -> SiameseNet:
        """The network being trained."""
        model = getattr(self.model, "_orig_mod", self.model)  # the network inside torch.compile's wrapper
        return getattr(model, "module", model)  # ... and inside DistributedDataParallel

    @property
    def eval_net(self) -> SiameseNet:
        """The network validated, selected and shipped: the weights' moving average when
        ``optim.ema_decay`` asks for one, else the network being trained."""
        return self.net if self.average is None else self.average.module  # type: ignore[return-value]

    def resume_state(self) -> dict[str, Any]:
        """What a checkpoint holds besides :attr:`eval_net`'s weights (``checkpoint.save``'s
        ``state_dict``) so that :meth:`restore` goes on where this run is."""
        state: dict[str, Any] = {"optimizer": self.optimizer.state_dict()}
        if self.average is not None:
            state["training_state_dict"] = _cpu_state(self.net)
            state["average_steps"] = self.average.steps
        return state

    def restore(self, payload: dict[str, Any]) -> None:
        """Go on from a checkpoint this loop wrote: the trained weights, the optimizer and the average."""
        if self.average is not None and "training_state_dict" not in payload:
            raise ValueError("optim.ema_decay is set but the checkpoint holds no moving average of the "
                             "weights: resume a run with the config it was started with")
        self.net.load_state_dict(payload.get("training_state_dict", payload["state_dict"]))
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.average is not None:
            self.average.load(payload["state_dict"], payload["average_steps"])

    def train_epoch(self, epoch: int, chunks: Iterable[Chunk]) -> dict[str, Any]:
        """One epoch's steps over the chunks; the loss is read once, at the end."""
        cfg = self.recipe
        apply_epoch_schedule(self.optimizer, cfg.optim, epoch)
        generator = epoch_generator(cfg.training.seed, epoch, self.rank, self.device)
        distort = cfg.distort if cfg.pairs.distorted_copies > 0 else None
        hardest = cfg.training.in_batch_share(epoch)
        loss_sum = torch.zeros((), device=self.device)
        steps = pairs = 0
        pairs_epoch = -1
        for chunk in chunks:
            if pairs_epoch < 0 and len(chunk["epoch"]):
                pairs_epoch = int(chunk["epoch"][0])
            columns = expand_copies(_to_device(chunk, self.device), cfg.pairs.distorted_copies)
            for left, right, same, mask, *keys in iter_steps(columns, cfg.training.batch_size, generator):
                loss_sum += train_step(self.model, self.optimizer, left, right, same, mask, distort, generator,
                                       autocast_dtype=self.autocast_dtype,
                                       in_batch_negatives=cfg.training.in_batch_negatives,
                                       in_batch_hardest=hardest, keys=tuple(keys),
                                       new_classes=cfg.pairs.classes_per_class)
                if self.average is not None:
                    self.average.update(self.net)
                steps += 1
                pairs += left.shape[0]
        return {"loss": float(loss_sum) / max(1, steps), "steps": steps, "pairs": pairs, "pairs_epoch": pairs_epoch}

    def run(self, chunks_of_epoch: Callable[[int], Iterable[Chunk]], state: LoopState | None = None,
            on_epoch: Callable[[dict[str, Any], LoopState], None] | None = None,
            prepare: Callable[[int, LoopState], dict[str, Any]] | None = None) -> LoopState:
        """Train from ``state.next_epoch`` until ``training.epochs``, early stopping or the time budget.

        ``prepare(epoch, state)`` runs first in each epoch, inside its time (the :class:`Miner`);
        its figures join the epoch's row. After each epoch ``on_epoch(row, state)`` gets the
        epoch's metrics (rank 0's, on every rank) and the state to resume from. The budget
        counts the whole run, restarts included: no epoch starts that the last epochs' pace
        says would end past it.
        """
        cfg = self.recipe.training
        if self.rank == 0 and self.validator is None:
            raise ValueError("rank 0 validates every epoch: give the loop a Validator")
        state = state or LoopState()
        state.stopper = state.stopper or EarlyStopping(cfg.patience)
        resumed_at = state.elapsed_s
        started = self.clock()
        for epoch in range(state.next_epoch, cfg.epochs):
            t0 = self.clock()
            prepared = prepare(epoch, state) if prepare is not None else {}
            trained = self.train_epoch(epoch, chunks_of_epoch(epoch))
            train_seconds = self.clock() - t0
            loss = self.mean_across_ranks(trained["loss"])
            row: dict[str, Any] = {}
            if self.rank == 0:
                assert self.validator is not None
                row = self.validator.evaluate(self.eval_net)
                improved = state.stopper.update(epoch, row["val_oneshot_accuracy"])
                seconds = self.clock() - t0
                elapsed = resumed_at + self.clock() - started
                recent = (state.epoch_seconds + [seconds])[-3:]
                over_budget = cfg.time_budget_s is not None and elapsed + max(recent) > cfg.time_budget_s
                row.update({
                    "epoch": epoch, "epochs_completed": epoch + 1, "train_loss": loss, "improved": int(improved),
                    "best_val_oneshot_accuracy": state.stopper.best_value, "best_epoch": state.stopper.best_epoch,
                    "lr": float(self.optimizer.param_groups[0]["lr"]),
                    "momentum": float(self.optimizer.param_groups[0].get("momentum", 0.0)),
                    "train_seconds": train_seconds, "epoch_seconds": seconds, "elapsed_seconds": elapsed,
                    "train_pairs_per_second": trained["pairs"] * self.world / max(train_seconds, 1e-9),
                    "steps": trained["steps"], "workers": self.world,
                    "pairs_epoch": trained["pairs_epoch"],  # the epoch the pairs were drawn for
                    "stop": "early_stopping" if state.stopper.should_stop else "time_budget" if over_budget
                    else "epochs" if epoch + 1 >= cfg.epochs else "",
                    **prepared,
                })
            row = self.from_rank0(row)
            if self.rank != 0:  # follow rank 0's bookkeeping, so any rank's state resumes the run
                state.stopper.update(epoch, row["val_oneshot_accuracy"])
            state.next_epoch = epoch + 1
            state.elapsed_s = float(row["elapsed_seconds"])
            state.epoch_seconds = (state.epoch_seconds + [float(row["epoch_seconds"])])[-3:]
            if on_epoch is not None:
                on_epoch(row, state)
            if row["stop"]:
                break
        return state


EmbeddedShare = tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]
"""A worker's share of the training images, embedded: ``(embeddings [n, D], image keys, class keys, units)``."""


class Miner:
    """Before the epochs the mining config names, a new assignment of hard pairs from the current model.

    The Ray worker and the plain loop share it; they differ in ``embed_share`` (a rank's shards, or
    every image in memory), ``gather`` (torch.distributed, or nothing) and ``publish`` (the pair
    stage's epoch clock, or :class:`MemoryPairs`). Rank 0 solves the assignment and every rank
    receives it, so any rank's checkpoint state can resume the run with the same pairs.
    """

    def __init__(self, recipe: TrainingRecipe, net: Callable[[], SiameseNet], embed_share: Callable[[], EmbeddedShare],
                 publish: Callable[[Assignment | None], None], has_groups: bool, n_units: int, total_classes: int,
                 rank: int = 0, gather: Callable[[Any], list[Any]] = lambda x: [x],
                 from_rank0: Callable[[Any], Any] = lambda x: x, clock: Callable[[], float] = time.perf_counter) -> None:
        self.recipe, self.net, self.embed_share, self.publish = recipe, net, embed_share, publish
        self.has_groups, self.n_units, self.total_classes = has_groups, n_units, total_classes
        self.rank, self.gather, self.from_rank0, self.clock = rank, gather, from_rank0, clock

    def restore(self, state: LoopState) -> None:
        """Hand a resumed run's stored assignment to the pair source before its first epoch."""
        if state.mining is not None:
            self.publish(Assignment.from_state_dict(state.mining))

    def __call__(self, epoch: int, state: LoopState) -> dict[str, Any]:
        cfg = self.recipe
        if not cfg.mining.mines_at(epoch):
            return {}
        t0 = self.clock()
        share = self.embed_share()
        embed_s = self.clock() - t0
        parts = self.gather((share[0].float().cpu().numpy(), share[1], share[2], share[3]))
        payload = None
        if self.rank == 0:
            h = torch.from_numpy(np.concatenate([p[0] for p in parts]))
            image_keys, class_keys, units = (np.concatenate([p[i] for p in parts]) for i in (1, 2, 3))
            pairs_of_unit = {u: pairs_per_unit(cfg.pairs, self.has_groups, self.n_units,
                                               np.unique(class_keys[units == u]).size, self.total_classes)
                             for u in set(units.tolist())}
            previous = Assignment.from_state_dict(state.mining) if state.mining is not None else None
            net = self.net()
            h = h.to(next(net.parameters()).device)
            assignment = mine_assignment(net, h, image_keys, class_keys, units, pairs_of_unit, cfg.mining,
                                         cfg.training.seed, epoch, previous)
            payload = {"assignment": assignment.state_dict(), "images": int(image_keys.size)}
            # Published before the other ranks hear of it, so no rank can start the epoch's pass first.
            self.publish(assignment)
        payload = self.from_rank0(payload)
        state.mining = payload["assignment"]
        assignment = Assignment.from_state_dict(state.mining)
        if self.rank != 0:
            self.publish(assignment)
        return {"mining_seconds": self.clock() - t0, "mining_embed_seconds": embed_s, "mined_pairs": len(assignment),
                "mining_images": payload["images"]}


@torch.no_grad()
def embed_for_mining(net: SiameseNet, pixels: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The training view's embeddings (no test-time views), in eval mode, restoring the mode after."""
    was_training = net.training
    net.eval()
    try:
        device = next(net.parameters()).device
        out = [net.embed(to_model_input(pixels[i:i + batch_size], device)) for i in range(0, pixels.shape[0], batch_size)]
    finally:
        net.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, net.config.embedding_dim))


class MemoryPairs:
    """An epoch's pairs from decoded arrays in this process: the Ray pair stage's draw, without Ray.

    The same units (groups, or the shards rows came from where there are no groups) in the
    same order, the same per-unit pairs and the same chunking as ``workflows.data`` streams,
    so with one worker a plain run and a Ray Train run train on the same batches.
    Images stay where they are (a GPU, for the GPU benchmark) and are gathered there.
    """

    def __init__(self, images: LabelledImages, recipe: TrainingRecipe, chunk_pairs: int = 2048,
                 device: torch.device | str = "cpu") -> None:
        # As the Ray stream does (iter_torch_batches of at least one batch), so the two chunk alike.
        self.recipe, self.chunk_pairs = recipe, max(chunk_pairs, recipe.training.batch_size)
        pairs = recipe.pairs
        self.pixels = torch.from_numpy(np.ascontiguousarray(images.images)).to(device)
        self.class_keys = torch.from_numpy(name_keys(np.asarray(images.classes, dtype=object)[images.label]))
        self.image_keys = torch.from_numpy(name_keys(images.image_id))
        keep = np.ones(len(images), dtype=bool)
        if pairs.sources:
            if images.source is None:
                raise ValueError(f"pairs.sources={list(pairs.sources)} but these images have no source")
            keep = np.isin(images.source, np.asarray(pairs.sources, dtype=str))
        has_groups = images.group is not None
        if has_groups:
            unit_of = images.group.astype(object)
            units = sorted(set(unit_of.tolist()))
        else:
            shard = images.shard if images.shard is not None else np.zeros(len(images), np.int64)
            unit_of = np.asarray([unit_name(int(s)) for s in shard], dtype=object)
            units = [unit_name(s) for s in sorted(set(shard.tolist()))]
        total_classes = np.unique(images.label).size
        self.units = []
        for unit in units:
            rows = np.flatnonzero((unit_of == unit) & keep)
            if rows.size == 0:
                continue
            n = pairs_per_unit(pairs, has_groups, len(units), np.unique(images.label[rows]).size, total_classes)
            self.units.append((unit, rows, n))
        self.has_groups, self.n_units, self.total_classes = has_groups, len(units), total_classes
        self.assignment: Assignment | None = None  # mined pairs in force (Miner.publish)
        self.images = images

    def embed_all(self, net: SiameseNet) -> EmbeddedShare:
        """Every image the pairs can use, embedded for mining, with its keys and unit."""
        rows = np.concatenate([r for _, r, _ in self.units])
        units = np.concatenate([np.full(r.size, u, dtype=object) for u, r, _ in self.units])
        h = embed_for_mining(net, self.pixels[torch.from_numpy(rows).to(self.pixels.device)])
        return h, self.image_keys.numpy()[rows], self.class_keys.numpy()[rows], units

    def publish(self, assignment: Assignment | None) -> None:
        self.assignment = assignment

    def __call__(self, epoch: int) -> Iterator[Chunk]:
        """The epoch's chunks: each unit's pairs in order, cut into ``chunk_pairs``."""
        cfg, images = self.recipe, self.images
        left, right, same = [], [], []
        for unit, rows, n in self.units:
            source = None if images.source is None else images.source[rows]
            ul, ur, us = epoch_pairs(images.label[rows], self.image_keys.numpy()[rows], cfg.pairs, cfg.training.seed,
                                     epoch, unit, n, source, cfg.training.negatives, self.assignment)
            left.append(rows[ul])
            right.append(rows[ur])
            same.append(us)
        left_rows, right_rows = torch.from_numpy(np.concatenate(left)), torch.from_numpy(np.concatenate(right))
        same_all = torch.from_numpy(np.concatenate(same))
        device = self.pixels.device
        for start in range(0, left_rows.shape[0], self.chunk_pairs):
            lr, rr = left_rows[start:start + self.chunk_pairs], right_rows[start:start + self.chunk_pairs]
            yield {"left": self.pixels[lr.to(device)], "right": self.pixels[rr.to(device)],
                   "same": same_all[start:start + self.chunk_pairs].to(device),
                   "left_class": self.class_keys[lr].to(device), "right_class": self.class_keys[rr].to(device),
                   "left_image": self.image_keys[lr].to(device), "right_image": self.image_keys[rr].to(device),
                   "epoch": torch.full((lr.shape[0],), epoch, dtype=torch.int32)}


@dataclass
class FitResult:
    """Outcome of :func:`fit`: the best epoch's weights are loaded into ``model``."""

    model: SiameseNet
    best_epoch: int
    best_val_oneshot_accuracy: float
    history: list[dict[str, Any]]
    stop_reason: str  # "epochs", "early_stopping" or "time_budget"
    seconds: float


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def fit(recipe: TrainingRecipe, train: LabelledImages, validation: LabelledImages,
        device: torch.device | str = "cpu", log: Callable[[str], None] | None = print, *,
        chunk_pairs: int = 2048, channels_last: bool | None = None, autocast_dtype: torch.dtype | None = None,
        model: SiameseNet | None = None) -> FitResult:
    """Train one model in this process; early-stop and select on validation one-shot accuracy.

    The same loop as the Ray Train job, fed by :class:`MemoryPairs`. Images must be decoded at
    ``recipe.model.input_size`` with the model's preprocessing. Returns the best epoch's weights.
    """
    started = time.perf_counter()
    device = torch.device(device)
    size = recipe.model.input_size
    for name, images in (("train", train), ("validation", validation)):
        if images.images.shape[2:] != (size, size):
            raise ValueError(f"{name} images are {images.images.shape[2:]}, the model wants {size}x{size}")
    say = log or (lambda _msg: None)
    net = place_model(model if model is not None else new_model(recipe.model, recipe.training.seed,
                                                                 recipe.training.fan_in_scaled),
                      device, channels_last)
    optimizer = build_optimizer(net, recipe.optim)
    validator = Validator(validation, recipe.evaluation, device, recipe.training.negatives,  # type: ignore[arg-type]
                          recipe.training.validation_views)
    history: list[dict[str, Any]] = []
    best = {"state": _cpu_state(net)}

    def on_epoch(row: dict[str, Any], state: LoopState) -> None:
        history.append(row)
        if row["improved"]:
            best["state"] = _cpu_state(loop.eval_net)
        say(f"epoch {row['epoch']:3d}  loss {row['train_loss']:.4f}  val verif {row['val_verification_accuracy']:.4f}  "
            f"val 1-shot {row['val_oneshot_accuracy']:.4f}{' *' if row['improved'] else '  '}  "
            f"best {row['best_val_oneshot_accuracy']:.4f}@{row['best_epoch']}  {row['epoch_seconds']:.1f}s")

    loop = TrainingLoop(recipe, net, optimizer, device, validator, autocast_dtype=autocast_dtype)
    pairs = MemoryPairs(train, recipe, chunk_pairs, device)
    miner = Miner(recipe, lambda: loop.net, lambda: pairs.embed_all(loop.net), pairs.publish, pairs.has_groups,
                  pairs.n_units, pairs.total_classes)
    state = loop.run(pairs, on_epoch=on_epoch, prepare=miner)
    net.load_state_dict(best["state"])
    total = time.perf_counter() - started
    stop = history[-1]["stop"] if history else "epochs"
    assert state.stopper is not None
    say(f"stopped ({stop}) after {len(history)} epochs, {total:.0f}s; "
        f"best val 1-shot {state.stopper.best_value:.4f} at epoch {state.stopper.best_epoch}")
    return FitResult(model=net, best_epoch=state.stopper.best_epoch,
                     best_val_oneshot_accuracy=state.stopper.best_value, history=history,
                     stop_reason=stop, seconds=total)
