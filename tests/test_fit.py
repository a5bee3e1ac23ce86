"""fit.py: scoring with cached embeddings, batches, early stopping, and a short real fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from siamese_core.config import DistortionConfig, ModelConfig, OneShotConfig, OptimizerConfig, PairConfig
from siamese_core.fit import (EarlyStopping, embedding_score_fn, epoch_generator, evaluate_oneshot, fit,
                              new_model, oneshot_trials, pair_batches)
from siamese_core.oneshot import oracle_score_fn, score_runs
from siamese_core.omniglot import OmniglotArrays, load_split
from siamese_core.pairs import sample_pairs

TINY = ModelConfig(preset="tiny", input_size=35, channels=(4, 8, 8, 16), kernels=(3, 3, 2, 2), embedding_dim=32)
SMALL_ONESHOT = OneShotConfig(n_way=5, runs_per_alphabet=2, queries_per_run=4)


@pytest.fixture(scope="module")
def real(omniglot_dir) -> tuple[OmniglotArrays, OmniglotArrays]:
    """3 background alphabets (train) and 2 validation alphabets, 35x35."""
    def subset(arrays: OmniglotArrays, names: list[str]) -> OmniglotArrays:
        keep = np.isin(arrays.alphabet, names)
        return OmniglotArrays(images=arrays.images[keep], alphabet=arrays.alphabet[keep],
                              character=arrays.character[keep], drawer=arrays.drawer[keep])
    train = load_split(omniglot_dir, "train", size=35)
    val = load_split(omniglot_dir, "validation", size=35)
    train_names = sorted(set(train.alphabet.tolist()))[:3]
    val_names = sorted(set(val.alphabet.tolist()))[:2]
    return subset(train, train_names), subset(val, val_names)


def _synthetic(n_alpha: int = 2, n_chars: int = 6, n_drawers: int = 6, size: int = 35,
               seed: int = 0) -> OmniglotArrays:
    """Characters are random blobs; each drawer's image is a slightly noisy copy."""
    rng = np.random.default_rng(seed)
    images, alphabet, character, drawer = [], [], [], []
    for a in range(n_alpha):
        for c in range(n_chars):
            proto = rng.random((size, size)) > 0.85
            for d in range(1, n_drawers + 1):
                img = proto ^ (rng.random((size, size)) > 0.97)
                images.append(img.astype(np.uint8) * 255)
                alphabet.append(f"alpha{a}")
                character.append(a * n_chars + c)
                drawer.append(d)
    return OmniglotArrays(images=np.stack(images), alphabet=np.array(alphabet),
                          character=np.array(character, np.int32), drawer=np.array(drawer, np.int8))


def _fit(train, val, **kw):
    args = dict(model_cfg=TINY, optim_cfg=OptimizerConfig(lr=0.05, momentum_ramp_epochs=2),
                distort_cfg=DistortionConfig(), pair_cfg=PairConfig(pairs_per_epoch=256, distorted_copies=1),
                train_arrays=train, val_arrays=val, epochs=3, patience=20, batch_size=64, seed=0,
                device="cpu", log=None, val_pairs=200, val_oneshot=SMALL_ONESHOT)
    args.update(kw)
    return fit(**args)


def test_embedding_score_fn_agrees_with_similarity() -> None:
    model = new_model(TINY, seed=0)
    data = _synthetic()
    images = data.as_float()
    q, s = np.array([0, 5, 7]), np.array([1, 2, 30, 40])
    scores = embedding_score_fn(model, images, "cpu", batch_size=7)(q, s)
    with torch.no_grad():
        x = torch.from_numpy(images)
        for i, qi in enumerate(q):
            p = model.similarity(x[[qi] * len(s)], x[s])
            assert np.allclose(1 / (1 + np.exp(-scores[i])), p.numpy(), atol=1e-5)
    # Only the needed rows embedded: the same scores from a uint8 input.
    only = embedding_score_fn(model, data.images, "cpu", rows=np.concatenate([q, s]))
    assert np.allclose(only(q, s), scores, atol=1e-5)
    with pytest.raises(KeyError):
        only(np.array([3]), s)


def test_evaluate_oneshot_matches_score_runs_and_embeds_once(monkeypatch) -> None:
    model = new_model(TINY, seed=0)
    data = _synthetic()
    runs = oneshot_trials(data, SMALL_ONESHOT, seed=1)
    calls = []
    original = model.embed
    monkeypatch.setattr(model, "embed", lambda x: (calls.append(x.shape[0]), original(x))[1])
    result = evaluate_oneshot(model, data, runs, "cpu")
    needed = np.unique(np.concatenate([np.concatenate([r.support, r.queries]) for r in runs]))
    assert sum(calls) == needed.size  # every needed image embedded exactly once
    expected = score_runs(runs, embedding_score_fn(model, data.as_float(), "cpu"))
    assert result.accuracy == expected.accuracy and result.trials == 2 * 2 * 4
    assert score_runs(runs, oracle_score_fn(data.character)).accuracy == 1.0


def test_pair_batches_cover_all_pairs_shuffled_by_seed_and_epoch() -> None:
    data = _synthetic()
    pairs = sample_pairs(data.alphabet, data.character, PairConfig(pairs_per_epoch=50, distorted_copies=2),
                         seed=0, drawer=data.drawer)
    images = torch.from_numpy(data.images)
    batches = list(pair_batches(pairs, images, 32, seed=0, epoch=0))
    assert [b[0].shape[0] for b in batches] == [32, 32, 32, 32, 22]
    left, right, same, mask = (torch.cat(x) for x in zip(*batches))
    assert left.dtype == torch.uint8 and same.dtype == torch.float32 and mask.dtype == torch.bool
    assert int(mask.sum()) == 100 and float(same.sum()) == float(pairs.same.sum())
    # Same multiset of (left image, right image) as the pair set.
    flat = lambda t: [bytes(x) for x in t.reshape(t.shape[0], -1).numpy()]  # noqa: E731
    got = sorted(zip(flat(left), flat(right)))
    want = sorted(zip(flat(images[pairs.left]), flat(images[pairs.right])))
    assert got == want
    again = torch.cat([b[0] for b in pair_batches(pairs, images, 32, seed=0, epoch=0)])
    other = torch.cat([b[0] for b in pair_batches(pairs, images, 32, seed=0, epoch=1)])
    assert torch.equal(again, left) and not torch.equal(other, left)
    assert len(list(pair_batches(pairs, images, 32, 0, 0, drop_last=True))) == 4


def test_epoch_generator_depends_on_seed_and_epoch() -> None:
    a, b = epoch_generator(0, 1), epoch_generator(0, 1)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    assert not torch.equal(torch.rand(4, generator=epoch_generator(0, 2)),
                           torch.rand(4, generator=epoch_generator(0, 1)))
    assert not torch.equal(torch.rand(4, generator=epoch_generator(1, 1)),
                           torch.rand(4, generator=epoch_generator(0, 1)))


def test_early_stopping_counts_epochs_without_strict_improvement() -> None:
    stop = EarlyStopping(patience=2)
    assert stop.update(0, 0.5) and not stop.should_stop
    assert stop.update(1, 0.6)
    assert not stop.update(2, 0.6) and not stop.should_stop  # a tie is no improvement
    assert not stop.update(3, 0.55) and stop.should_stop
    assert (stop.best_epoch, stop.best_value) == (1, 0.6)
    clone = EarlyStopping(patience=9)
    clone.load_state_dict(stop.state_dict())
    assert clone == stop
    with pytest.raises(ValueError):
        EarlyStopping(patience=0)


def test_fit_runs_and_records_metrics(real) -> None:
    train, val = real
    messages: list[str] = []
    result = _fit(train, val, epochs=3, log=messages.append, val_oneshot=OneShotConfig(n_way=20, queries_per_run=4))
    assert len(result.history) == 3 and result.stop_reason == "epochs"
    for row in result.history:
        for key in ("train_loss", "val_verification_accuracy", "val_oneshot_accuracy", "seconds"):
            assert np.isfinite(row[key])
        assert 0.0 <= row["val_oneshot_accuracy"] <= 1.0
    assert result.history[-1]["train_loss"] < np.log(2)  # learns something
    assert sum(m.startswith("epoch") for m in messages) == 3
    best = max(range(3), key=lambda e: (result.history[e]["val_oneshot_accuracy"], -e))
    assert result.best_epoch == best
    assert result.best_val_oneshot_accuracy == result.history[best]["val_oneshot_accuracy"]


def test_fit_is_deterministic_for_a_seed() -> None:
    train, val = _synthetic(seed=0), _synthetic(seed=1)
    runs = [_fit(train, val, epochs=2) for _ in range(2)]
    strip = lambda h: [{k: v for k, v in row.items() if "seconds" not in k} for row in h]  # noqa: E731
    assert strip(runs[0].history) == strip(runs[1].history)
    for k, v in runs[0].best_state_dict.items():
        assert torch.equal(v, runs[1].best_state_dict[k])
    other = _fit(train, val, epochs=2, seed=1)
    assert strip(other.history) != strip(runs[0].history)


def test_validation_views_single_scores_epochs_with_one_view() -> None:
    """Training never uses the test-time views, so a model with views trains the same weights;
    with validation_views="single" its per-epoch one-shot scores are those of the one-view model,
    with "model" they are scored with its views (and differ)."""
    import dataclasses

    train, val = _synthetic(seed=0), _synthetic(seed=1)
    viewed = dataclasses.replace(TINY, test_time_shift_px=1, test_time_views="square")
    one = [row["val_oneshot_accuracy"] for row in _fit(train, val, epochs=3).history]
    single = _fit(train, val, epochs=3, model_cfg=viewed, validation_views="single")
    with_views = _fit(train, val, epochs=3, model_cfg=viewed, validation_views="model")
    assert [row["val_oneshot_accuracy"] for row in single.history] == one
    assert [row["val_oneshot_accuracy"] for row in with_views.history] != one
    assert single.model.config.test_time_views == "square"  # the final model keeps its views
    losses = lambda r: [row["train_loss"] for row in r.history]  # noqa: E731
    assert losses(single) == losses(with_views)  # the same training, only the scoring differs


def test_early_stopping_stops_and_returns_the_best_epochs_weights() -> None:
    """A rate high enough to make validation accuracy wander: the run must stop `patience`
    epochs after its best, and the returned weights must re-score exactly that best."""
    train, val = _synthetic(seed=0), _synthetic(seed=1)
    patience = 2
    result = _fit(train, val, epochs=30, patience=patience, optim_cfg=OptimizerConfig(lr=0.5, momentum=0.5),
                  val_oneshot=OneShotConfig(n_way=6, runs_per_alphabet=2))
    accs = [row["val_oneshot_accuracy"] for row in result.history]
    assert result.stop_reason == "early_stopping", accs
    assert len(accs) == result.best_epoch + patience + 1
    assert max(accs) == accs[result.best_epoch] and max(accs[result.best_epoch + 1:]) <= accs[result.best_epoch]
    assert result.best_epoch < len(accs) - 1  # the last epoch's weights are not the best ones
    model = new_model(TINY, seed=123)
    model.load_state_dict(result.best_state_dict)
    runs = oneshot_trials(val, OneShotConfig(n_way=6, runs_per_alphabet=2))
    assert evaluate_oneshot(model, val, runs, "cpu").accuracy == accs[result.best_epoch]
    assert evaluate_oneshot(result.model, val, runs, "cpu").accuracy == accs[result.best_epoch]


def test_fit_respects_time_budget_and_checks_image_size() -> None:
    train, val = _synthetic(seed=0), _synthetic(seed=1)
    result = _fit(train, val, epochs=50, time_budget_s=1e-3)
    assert len(result.history) == 1 and result.stop_reason == "time_budget"
    with pytest.raises(ValueError, match="35x35"):
        _fit(_synthetic(size=30), val)
