"""The reusable pieces of one training run, in plain PyTorch, and a single-process ``fit``.

The Ray Train worker loop and the GPU benchmark call the pieces
(:func:`pair_batches`, :func:`evaluate_oneshot`, :class:`EarlyStopping`, ...);
:func:`fit` strings them together for a notebook, a test or the CPU demo.

Design notes (why, not what):

* One-shot scoring embeds each needed image *once* per evaluation and scores
  query/support pairs with ``pairwise_logits`` on the cached embeddings: the
  twin is the expensive part, the weighted-L1 head is cheap.
* Everything random is a pure function of ``(seed, epoch)``: the pairs
  (``sample_pairs``), their order (:func:`pair_batches`) and the distortions
  (:func:`epoch_generator`), so a restarted or distributed run draws the same
  epoch, and on CPU the same seed gives the same history.
* Validation is fixed once per run (pairs and trials drawn with
  :data:`VALIDATION_SEED`), so epochs and configurations are compared on the
  same trials. Early stopping and model selection only ever look at the
  validation split; the test alphabets are for the final report only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .config import (VALIDATION_ONESHOT, DistortionConfig, ModelConfig, OneShotConfig,
                     OptimizerConfig, PairConfig)
from .model import SiameseNet, init_weights, place_model, with_test_time_shift
from .omniglot import OmniglotArrays
from .oneshot import OneShotResult, OneShotRun, ScoreFn, make_trials, score_runs
from .optim import apply_epoch_schedule, build_optimizer
from .pairs import Negatives, PairSet, sample_pairs
from .train_step import to_model_input, train_step, verification_accuracy

VALIDATION_SEED = 2015
"""Seed of the fixed validation pairs and one-shot trials (the same for every run)."""

VALIDATION_PAIRS = 2_000
"""Validation verification pairs (half same, half different within one alphabet)."""

Images = torch.Tensor | np.ndarray


def _as_tensor(images: Images) -> torch.Tensor:
    return images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))


def _rng_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed derived from ``(seed, epoch)`` (distinct streams for distinct epochs)."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def epoch_generator(seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The ``torch.Generator`` for one epoch's distortions, seeded from ``(seed, epoch)``."""
    return torch.Generator(device=device).manual_seed(_rng_seed(seed, epoch))


# --------------------------------------------------------------------------- scoring

@torch.no_grad()
def embed_images(model: SiameseNet, images: Images, device: torch.device | str | None = None,
                 batch_size: int = 512) -> torch.Tensor:
    """Scoring embeddings ``[N, D]`` of images (uint8 or float, ``[N,S,S]`` or ``[N,1,S,S]``), eval mode.

    ``model.scoring_embed``: with the model's test-time views, if it has any.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    images = _as_tensor(images)
    was_training = model.training
    model.eval()
    try:
        out = [model.scoring_embed(to_model_input(images[i:i + batch_size], device))
               for i in range(0, images.shape[0], batch_size)]
    finally:
        model.train(was_training)
    dim = model.config.embedding_dim
    return torch.cat(out) if out else torch.zeros((0, dim), device=device)


def embedding_score_fn(model: SiameseNet, images_float: Images, device: torch.device | str | None = None,
                       batch_size: int = 512, rows: Sequence[int] | np.ndarray | None = None) -> ScoreFn:
    """A :data:`~siamese_core.oneshot.ScoreFn` (logits, higher = more similar) for ``score_runs``.

    Embeds the images once, now: all rows, or only ``rows`` when given (the
    rows the trials need); the returned function then only runs the head on
    cached embeddings. Take a new one after the weights change.
    """
    images = _as_tensor(images_float)
    if rows is None:
        index = None
        h = embed_images(model, images, device, batch_size)
    else:
        needed = np.unique(np.asarray(rows, dtype=np.int64))
        index = np.full(images.shape[0], -1, dtype=np.int64)
        index[needed] = np.arange(needed.size)
        h = embed_images(model, images[torch.from_numpy(needed)], device, batch_size)

    def lookup(r: np.ndarray) -> torch.Tensor:
        r = np.asarray(r, dtype=np.int64)
        if index is not None:
            r = index[r]
            if (r < 0).any():
                raise KeyError("score_fn asked for rows that were not embedded")
        return h[torch.from_numpy(r).to(h.device)]

    @torch.no_grad()
    def score(query_rows: np.ndarray, support_rows: np.ndarray) -> np.ndarray:
        logits = model.pairwise_logits(lookup(query_rows), lookup(support_rows))
        return logits.float().cpu().numpy().astype(np.float64)

    return score


def runs_rows(runs: Sequence[OneShotRun]) -> np.ndarray:
    """Every row index used by the runs (supports and queries), sorted, unique."""
    return np.unique(np.concatenate([np.concatenate([r.support, r.queries]) for r in runs]))


def evaluate_oneshot(model: SiameseNet, arrays: OmniglotArrays | Images, runs: Sequence[OneShotRun],
                     device: torch.device | str | None = None, batch_size: int = 512) -> OneShotResult:
    """Score one-shot ``runs`` (row indices into ``arrays``) with the model's similarity."""
    images = arrays.images if isinstance(arrays, OmniglotArrays) else arrays
    return score_runs(runs, embedding_score_fn(model, images, device, batch_size, rows=runs_rows(runs)))


def validation_model(model: SiameseNet, validation_views: str) -> SiameseNet:
    """The model as the per-epoch validation scores it: with its own views ("model") or one ("single").

    Why "single": selection only needs to rank epochs, and the final scores use the model's
    views anyway; with the demo's 13 views, validation took 2.1 s of each 9.0 s epoch on 2 cores.
    """
    if validation_views == "model" or not model.config.test_time_shift_px:
        return model
    if validation_views != "single":
        raise ValueError(f"validation_views must be 'model' or 'single', got {validation_views!r}")
    return with_test_time_shift(model, 0)


def oneshot_trials(arrays: OmniglotArrays, cfg: OneShotConfig = VALIDATION_ONESHOT,
                   seed: int = VALIDATION_SEED) -> list[OneShotRun]:
    """Lake-style within-alphabet runs over every alphabet of ``arrays`` (sorted by name)."""
    alphabets = sorted(set(arrays.alphabet.tolist()))
    return make_trials(arrays.alphabet, arrays.character, arrays.drawer, alphabets, cfg, seed)


# --------------------------------------------------------------------------- batches

def pair_batches(pairs: PairSet, images: Images, batch_size: int, seed: int, epoch: int,
                 drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Shuffled minibatches ``(left, right, same, distort_mask)`` of a pair set.

    ``images`` is uint8 ``[N,S,S]`` (or anything ``to_model_input`` reads),
    indexed by the pair rows. The order is a pure function of ``(seed, epoch)``,
    so distorted copies of one pair land in different batches. Yields
    ``left``/``right`` in the images' dtype, ``same`` float32 and
    ``distort_mask`` bool, all on the images' device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = _as_tensor(images)
    order = np.random.default_rng([int(seed), int(epoch), 0x5EED]).permutation(len(pairs))
    left = torch.from_numpy(pairs.left[order])
    right = torch.from_numpy(pairs.right[order])
    same = torch.from_numpy(pairs.same[order].astype(np.float32))
    mask = torch.from_numpy(pairs.distort[order])
    n = len(pairs)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        j = min(i + batch_size, n)
        l, r = left[i:j].to(images.device), right[i:j].to(images.device)
        yield images[l], images[r], same[i:j].to(images.device), mask[i:j].to(images.device)


def fixed_validation_pairs(arrays: OmniglotArrays, n_pairs: int = VALIDATION_PAIRS,
                           seed: int = VALIDATION_SEED,
                           negatives: Negatives = "same_alphabet") -> PairSet:
    """Validation verification pairs, drawn once from all the split's drawers, undistorted."""
    drawers = tuple(sorted(set(int(d) for d in arrays.drawer.tolist())))
    cfg = PairConfig(pairs_per_epoch=n_pairs, distorted_copies=0, drawers=drawers)
    return sample_pairs(arrays.alphabet, arrays.character, cfg, seed=seed, epoch=0,
                        drawer=arrays.drawer, negatives=negatives)


# --------------------------------------------------------------------------- early stopping

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


# --------------------------------------------------------------------------- fit

@dataclass
class FitResult:
    """Outcome of :func:`fit`. ``model`` holds the best epoch's weights (= ``best_state_dict``)."""

    best_state_dict: dict[str, torch.Tensor]
    best_epoch: int
    best_val_oneshot_accuracy: float
    history: list[dict[str, float]]
    stop_reason: str  # "epochs", "early_stopping" or "time_budget"
    seconds: float
    model: SiameseNet | None = field(default=None, repr=False)


def new_model(model_cfg: ModelConfig, seed: int, fan_in_scaled: bool = True) -> SiameseNet:
    """A model initialised as ``model_cfg.init`` says (the paper's by default), seeded."""
    return init_weights(SiameseNet(model_cfg), torch.Generator().manual_seed(int(seed)),
                        fan_in_scaled=fan_in_scaled)


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def fit(model_cfg: ModelConfig, optim_cfg: OptimizerConfig, distort_cfg: DistortionConfig | None,
        pair_cfg: PairConfig, train_arrays: OmniglotArrays, val_arrays: OmniglotArrays,
        epochs: int, patience: int, batch_size: int, seed: int,
        device: torch.device | str = "cpu", log: Callable[[str], None] | None = print,
        time_budget_s: float | None = None, *, negatives: Negatives = "same_alphabet",
        fan_in_scaled: bool = True, val_pairs: int = VALIDATION_PAIRS,
        val_oneshot: OneShotConfig = VALIDATION_ONESHOT, model: SiameseNet | None = None,
        in_batch_negatives: float = 0.0, channels_last: bool | None = None,
        validation_views: str = "model") -> FitResult:
    """Train one model on ``train_arrays``; early-stop and select on validation one-shot accuracy.

    Per epoch ``e`` (0-based): the paper's schedule (``apply_epoch_schedule``),
    fresh pairs ``sample_pairs(seed, e)`` from the drawers in ``pair_cfg``,
    shuffled batches, distortions on the copies (``distort_cfg=None`` turns
    them off) drawn from :func:`epoch_generator`; then validation verification
    accuracy on fixed pairs and 20-way within-alphabet one-shot accuracy on
    fixed trials (``val_oneshot``, Koch's 320 by default). Stops after
    ``epochs``, after ``patience`` epochs without a better one-shot accuracy,
    or before an epoch that would overrun ``time_budget_s`` (at least one
    epoch always runs). ``in_batch_negatives`` weighs the extra in-batch loss term
    (``train_step``); ``channels_last`` is the memory layout (:func:`place_model`;
    None: by device). ``validation_views`` "single" scores the per-epoch one-shot trials
    with one view instead of the model's test-time views (:func:`validation_model`).
    Returns the best epoch's weights.

    Images must already be ``model_cfg.input_size`` square (``load_split(size=...)``).
    """
    started = time.perf_counter()
    device = torch.device(device)
    size = model_cfg.input_size
    for name, arr in (("train", train_arrays), ("validation", val_arrays)):
        if arr.images.shape[1:] != (size, size):
            raise ValueError(f"{name} images are {arr.images.shape[1:]}, the model wants {size}x{size}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    say = log or (lambda _msg: None)

    if model is None:
        model = new_model(model_cfg, seed, fan_in_scaled)
    model = place_model(model, device, channels_last)
    optimizer = build_optimizer(model, optim_cfg)
    train_images = torch.from_numpy(np.ascontiguousarray(train_arrays.images)).to(device)
    val_images = torch.from_numpy(np.ascontiguousarray(val_arrays.images)).to(device)
    vpairs = fixed_validation_pairs(val_arrays, val_pairs, negatives=negatives)
    v_left, v_right, v_same = (torch.from_numpy(a) for a in (vpairs.left, vpairs.right, vpairs.same))
    runs = oneshot_trials(val_arrays, val_oneshot)
    use_distortions = distort_cfg is not None and pair_cfg.distorted_copies > 0

    stopper = EarlyStopping(patience)
    best_state = _cpu_state(model)
    history: list[dict[str, float]] = []
    stop_reason = "epochs"
    epoch_times: list[float] = []
    for epoch in range(epochs):
        if time_budget_s is not None and epoch_times:
            elapsed = time.perf_counter() - started
            if elapsed + max(epoch_times[-3:]) > time_budget_s:
                stop_reason = "time_budget"
                break
        t0 = time.perf_counter()
        apply_epoch_schedule(optimizer, optim_cfg, epoch)
        pairs = sample_pairs(train_arrays.alphabet, train_arrays.character, pair_cfg, seed, epoch,
                             drawer=train_arrays.drawer, negatives=negatives)
        generator = epoch_generator(seed, epoch)
        loss_sum, n_seen = 0.0, 0
        for left, right, same, mask in pair_batches(pairs, train_images, batch_size, seed, epoch):
            loss = train_step(model, optimizer, left, right, same, mask,
                              distort_cfg if use_distortions else None, generator,
                              in_batch_negatives=in_batch_negatives)
            loss_sum += loss * left.shape[0]
            n_seen += left.shape[0]
        train_seconds = time.perf_counter() - t0
        ver = verification_accuracy(model, val_images, v_left, v_right, v_same)
        one = evaluate_oneshot(validation_model(model, validation_views), val_images, runs, device)
        seconds = time.perf_counter() - t0
        epoch_times.append(seconds)
        improved = stopper.update(epoch, one.accuracy)
        if improved:
            best_state = _cpu_state(model)
        row = {"epoch": float(epoch), "train_loss": loss_sum / max(1, n_seen),
               "val_verification_accuracy": ver, "val_oneshot_accuracy": one.accuracy,
               "lr": float(optimizer.param_groups[0]["lr"]),
               "momentum": float(optimizer.param_groups[0].get("momentum", 0.0)),
               "train_seconds": train_seconds, "seconds": seconds}
        history.append(row)
        say(f"epoch {epoch:3d}  loss {row['train_loss']:.4f}  val verif {ver:.4f}  "
            f"val 1-shot {one.accuracy:.4f}{' *' if improved else '  '}  "
            f"best {stopper.best_value:.4f}@{stopper.best_epoch}  {seconds:.1f}s")
        if stopper.should_stop:
            stop_reason = "early_stopping"
            break

    model.load_state_dict(best_state)
    total = time.perf_counter() - started
    say(f"stopped ({stop_reason}) after {len(history)} epochs, {total:.0f}s; "
        f"best val 1-shot {stopper.best_value:.4f} at epoch {stopper.best_epoch}")
    return FitResult(best_state_dict=best_state, best_epoch=stopper.best_epoch,
                     best_val_oneshot_accuracy=stopper.best_value, history=history,
                     stop_reason=stop_reason, seconds=total, model=model)
