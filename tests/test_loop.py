"""The one training loop (siamese_core.loop) and the validator: steps, early stopping, budget, resume."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from siamese_core.config import (DistortionConfig, EvaluationConfig, ModelConfig, OneShotConfig, OptimizerConfig,
                                 PairConfig, TrainingConfig, TrainingRecipe)
from siamese_core.evaluation import Validator, embedding_score_fn, evaluate_oneshot, episodes
from siamese_core.images import LabelledImages, class_codes
from siamese_core.loop import (LoopState, MemoryPairs, EarlyStopping, TrainingLoop, epoch_generator, expand_copies,
                               fit, iter_steps, new_model)
from siamese_core.oneshot import make_episodes, oracle_score_fn, score_runs
from siamese_core.optim import build_optimizer

TINY = ModelConfig(preset="tiny", input_size=35, channels=(4, 8, 8, 16), kernels=(3, 3, 2, 2), embedding_dim=32)
SMALL_EVALUATION = EvaluationConfig(n_way=5, runs_per_group=2, validation_queries_per_run=4)


def _synthetic(n_groups: int = 2, n_classes: int = 6, n_sources: int = 6, size: int = 35, seed: int = 0,
               channels: int = 1) -> LabelledImages:
    """Classes are random blobs; each source's image is a slightly noisy copy."""
    rng = np.random.default_rng(seed)
    images, labels, groups, sources = [], [], [], []
    for g in range(n_groups):
        for c in range(n_classes):
            proto = rng.random((channels, size, size)) > 0.85
            for s in range(1, n_sources + 1):
                img = proto ^ (rng.random((channels, size, size)) > 0.97)
                images.append(img.astype(np.uint8) * 255)
                labels.append(f"g{g}.c{c}")
                groups.append(f"g{g}")
                sources.append(f"{s:02d}")
    label, classes = class_codes(labels)
    return LabelledImages(images=np.stack(images), label=label, classes=classes,
                          image_id=np.array([f"img{i}" for i in range(len(labels))]), group=np.array(groups),
                          source=np.array(sources))


def _recipe(**training: object) -> TrainingRecipe:
    values = dict(epochs=3, patience=20, batch_size=64, seed=0, threads=None)
    values.update(training)
    return TrainingRecipe(model=TINY, optim=OptimizerConfig(lr=0.05, momentum_ramp_epochs=2),
                          distort=DistortionConfig(), pairs=PairConfig(pairs_per_epoch=256, distorted_copies=1),
                          training=TrainingConfig(**values), evaluation=SMALL_EVALUATION)  # type: ignore[arg-type]


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
    runs = make_episodes(data.label, OneShotConfig(n_way=5, queries_per_run=4), 1, group=data.group,
                         source=data.source)
    calls = []
    original = model.embed
    monkeypatch.setattr(model, "embed", lambda x: (calls.append(x.shape[0]), original(x))[1])
    result = evaluate_oneshot(model, data, runs, "cpu")
    needed = np.unique(np.concatenate([np.concatenate([r.support, r.queries]) for r in runs]))
    assert sum(calls) == needed.size  # every needed image embedded exactly once
    expected = score_runs(runs, embedding_score_fn(model, data.as_float(), "cpu"))
    assert result.accuracy == expected.accuracy and result.trials == 2 * 2 * 4
    assert score_runs(runs, oracle_score_fn(data.label)).accuracy == 1.0


def test_expand_copies_and_steps() -> None:
    n, size = 6, 4
    chunk = {"left": torch.arange(n * size * size, dtype=torch.uint8).view(n, 1, size, size),
             "right": torch.zeros(n, 1, size, size, dtype=torch.uint8), "same": torch.tensor([1., 0.] * 3),
             "left_class": torch.arange(n), "right_class": torch.arange(n) + 10, "left_image": torch.arange(n),
             "right_image": torch.arange(n) + 100, "epoch": torch.zeros(n, dtype=torch.int32)}
    columns = expand_copies(chunk, 2)
    left, right, same, mask, left_class = columns[:5]
    assert left.shape == (18, 1, size, size) and mask.tolist() == [False] * 6 + [True] * 12
    assert torch.equal(left[6:12], left[:6]) and torch.equal(left_class[12:], left_class[:6])
    batches = list(iter_steps(columns, 4, torch.Generator().manual_seed(0)))
    assert len(batches) == 4  # 18 rows -> 4 full batches of 4, the last 2 dropped
    rows = torch.cat([b[4] for b in batches])
    assert rows.unique().numel() <= 6 and len(batches[0]) == 8  # every column comes along, keys included
    again = list(iter_steps(columns, 4, torch.Generator().manual_seed(0)))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_epoch_generator_depends_on_seed_epoch_and_rank() -> None:
    a, b = epoch_generator(0, 1), epoch_generator(0, 1)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    reference = torch.rand(4, generator=epoch_generator(0, 1))
    for other in (epoch_generator(0, 2), epoch_generator(1, 1), epoch_generator(0, 1, rank=1)):
        assert not torch.equal(torch.rand(4, generator=other), reference)


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


def test_memory_pairs_chunk_each_units_pairs_in_order_with_their_keys() -> None:
    data = _synthetic()
    source = MemoryPairs(data, _recipe(), chunk_pairs=100)
    chunks = list(source(0))
    assert [c["left"].shape[0] for c in chunks] == [100, 100, 56]  # 2 groups x 128 pairs
    assert chunks[0]["left"].dtype == torch.uint8 and chunks[0]["left"].shape[1:] == (1, 35, 35)
    same = torch.cat([c["same"] for c in chunks]).bool()
    classes = torch.cat([c["left_class"] for c in chunks]), torch.cat([c["right_class"] for c in chunks])
    assert torch.equal(classes[0] == classes[1], same)  # the keys say which pairs are "same"
    assert float(same.float().mean()) == 0.5
    again = list(source(0))
    assert all(torch.equal(a["left"], b["left"]) for a, b in zip(chunks, again))
    assert not torch.equal(next(iter(source(1)))["left"], chunks[0]["left"])  # a new epoch, new pairs


def test_fit_runs_records_metrics_and_returns_the_best_epoch() -> None:
    train, val = _synthetic(seed=0), _synthetic(seed=1)
    messages: list[str] = []
    result = fit(_recipe(epochs=3), train, val, log=messages.append)
    assert len(result.history) == 3 and result.stop_reason == "epochs"
    for row in result.history:
        for key in ("train_loss", "val_verification_accuracy", "val_oneshot_accuracy", "epoch_seconds",
                    "elapsed_seconds"):
            assert np.isfinite(row[key])
        assert 0.0 <= row["val_oneshot_accuracy"] <= 1.0
    # learns something: the loss falls (it ends within 1e-4 of log 2 after 3 epochs of this tiny task,
    # on one side or the other as the thread count changes the sums' order)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] - 0.02
    assert sum(m.startswith("epoch") for m in messages) == 3
    best = max(range(3), key=lambda e: (result.history[e]["val_oneshot_accuracy"], -e))
    assert result.best_epoch == best
    assert result.best_val_oneshot_accuracy == result.history[best]["val_oneshot_accuracy"]


def test_fit_is_deterministic_for_a_seed() -> None:
    train, val = _synthetic(seed=0), _synthetic(seed=1)
    runs = [fit(_recipe(epochs=2), train, val, log=None) for _ in range(2)]
    strip = lambda h: [{k: v for k, v in row.items() if "seconds" not in k and "per_second" not in k}  # noqa: E731
                       for row in h]
    assert strip(runs[0].history) == strip(runs[1].history)
    for k, v in runs[0].model.state_dict().items():
        assert torch.equal(v, runs[1].model.state_dict()[k])
    other = fit(_recipe(epochs=2, seed=1), train, val, log=None)
    assert strip(other.history) != strip(runs[0].history)


def test_validation_views_single_scores_epochs_with_one_view() -> None:
    """Training never uses the test-time views, so a model with views trains the same weights;
    with validation_views="single" its per-epoch one-shot scores are those of the one-view model,
    with "model" they are scored with its views (and differ)."""
    train, val = _synthetic(seed=0), _synthetic(seed=1)
    viewed = dataclasses.replace(TINY, test_time_shift_px=1, test_time_views="square")
    one = [row["val_oneshot_accuracy"] for row in fit(_recipe(epochs=3), train, val, log=None).history]
    single = fit(dataclasses.replace(_recipe(epochs=3, validation_views="single"), model=viewed), train, val, log=None)
    with_views = fit(dataclasses.replace(_recipe(epochs=3, validation_views="model"), model=viewed), train, val,
                     log=None)
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
    recipe = dataclasses.replace(_recipe(epochs=30, patience=patience), optim=OptimizerConfig(lr=0.5, momentum=0.5),
                                 evaluation=EvaluationConfig(n_way=6, runs_per_group=2))
    result = fit(recipe, train, val, log=None)
    accs = [row["val_oneshot_accuracy"] for row in result.history]
    assert result.stop_reason == "early_stopping", accs
    assert len(accs) == result.best_epoch + patience + 1
    assert max(accs) == accs[result.best_epoch] and max(accs[result.best_epoch + 1:]) <= accs[result.best_epoch]
    assert result.best_epoch < len(accs) - 1  # the last epoch's weights are not the best ones
    runs = episodes(val, recipe.evaluation, seed=2015, validation=True)
    assert evaluate_oneshot(result.model, val, runs, "cpu").accuracy == accs[result.best_epoch]


def test_time_budget_and_image_size() -> None:
    train, val = _synthetic(seed=0), _synthetic(seed=1)
    result = fit(_recipe(epochs=50, time_budget_s=1e-3), train, val, log=None)
    assert len(result.history) == 1 and result.stop_reason == "time_budget"
    with pytest.raises(ValueError, match="35x35"):
        fit(_recipe(), _synthetic(size=30), val, log=None)


def _loop(recipe: TrainingRecipe, val: LabelledImages) -> tuple[TrainingLoop, torch.nn.Module]:
    model = new_model(recipe.model, recipe.training.seed)
    optimizer = build_optimizer(model, recipe.optim)
    validator = Validator(val, recipe.evaluation, "cpu", views=recipe.training.validation_views)
    return TrainingLoop(recipe, model, optimizer, "cpu", validator), model


def _with_average(recipe: TrainingRecipe, decay: float | None) -> TrainingRecipe:
    return dataclasses.replace(recipe, optim=dataclasses.replace(recipe.optim, ema_decay=decay))


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_a_resumed_run_trains_the_same_epochs_and_counts_its_time_budget(tmp_path, ema_decay: float | None) -> None:
    """Stopped after epoch 1 and resumed from its checkpoint file (what the Ray job writes and
    reads), a run ends with the weights, moving average and metrics of one uninterrupted run."""
    from siamese_core import checkpoint as ckpt_io

    train, val = _synthetic(seed=0), _synthetic(seed=1)
    recipe = _with_average(_recipe(epochs=3), ema_decay)
    pairs = MemoryPairs(train, recipe)
    whole, whole_model = _loop(recipe, val)
    rows: list[dict] = []
    whole.run(pairs, on_epoch=lambda row, state: rows.append(row))

    first, _ = _loop(dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, epochs=2)), val)
    state = first.run(pairs)
    ckpt_io.save(tmp_path, first.eval_net, loop=state.state_dict(), **first.resume_state())
    payload = ckpt_io.load_payload(tmp_path)
    resumed, resumed_model = _loop(recipe, val)
    resumed.restore(payload)
    later: list[dict] = []
    resumed.run(pairs, LoopState.from_state_dict(payload["loop"], recipe.training.patience),
                on_epoch=lambda row, state: later.append(row))
    assert [r["epoch"] for r in later] == [2]
    assert later[0]["train_loss"] == rows[2]["train_loss"]
    assert later[0]["val_oneshot_accuracy"] == rows[2]["val_oneshot_accuracy"]
    assert later[0]["best_epoch"] == rows[2]["best_epoch"]
    for key, value in whole_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key])
    for key, value in whole.eval_net.state_dict().items():
        assert torch.equal(value, resumed.eval_net.state_dict()[key])
    if ema_decay is not None:
        assert not torch.equal(whole.eval_net.fc.weight, whole_model.fc.weight)  # the average is its own
        assert resumed.average.steps == whole.average.steps == sum(r["steps"] for r in rows)
        with pytest.raises(ValueError, match="no moving average"):  # a checkpoint of a run without one
            resumed.restore({k: v for k, v in payload.items() if k != "training_state_dict"})
    # the budget counts the time before the restart: a run resumed at its budget trains one more epoch
    budget = dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, epochs=50, time_budget_s=60.0))
    late, _ = _loop(budget, val)
    stopped: list[dict] = []
    late.run(pairs, LoopState(next_epoch=5, elapsed_s=59.99), on_epoch=lambda row, state: stopped.append(row))
    assert [r["epoch"] for r in stopped] == [5] and stopped[0]["stop"] == "time_budget"
    assert stopped[0]["elapsed_seconds"] > 59.99


def test_the_moving_average_follows_every_step_and_is_what_is_validated_and_kept() -> None:
    """``optim.ema_decay``: after each optimizer step the average moves towards the weights, with the
    decay warming up as min(decay, (1 + t) / (10 + t)); validation scores the average, and ``fit``
    returns the best epoch's average."""
    train, val = _synthetic(seed=0), _synthetic(seed=1)
    decay = 0.5  # reached after 8 of the run's 16 steps
    recipe = _with_average(_recipe(epochs=2), decay)
    loop, model = _loop(recipe, val)
    after_steps: list[dict[str, torch.Tensor]] = []
    loop.optimizer.register_step_post_hook(
        lambda *_: after_steps.append({k: v.detach().clone() for k, v in model.state_dict().items()}))
    validated: list[torch.nn.Module] = []
    evaluate = loop.validator.evaluate
    loop.validator.evaluate = lambda net: validated.append(net) or evaluate(net)  # type: ignore[method-assign]
    loop.run(MemoryPairs(train, recipe))
    expected = after_steps[0]
    for t, weights in enumerate(after_steps[1:], start=1):
        d = min(decay, (1 + t) / (10 + t))
        expected = {k: d * expected[k] + (1 - d) * weights[k] for k in expected}
    assert len(after_steps) == loop.average.steps == 16
    for key, value in loop.eval_net.state_dict().items():  # to rounding; a constant decay fails it
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-9)
    assert not torch.equal(loop.eval_net.conv1.weight, model.conv1.weight)
    assert len(validated) == 2 and all(net is loop.eval_net for net in validated)

    fine = EvaluationConfig(n_way=6, runs_per_group=10, validation_queries_per_run=20)
    recipe = dataclasses.replace(_with_average(_recipe(epochs=4), 0.9), evaluation=fine)
    result = fit(recipe, train, val, log=None)
    accs = [row["val_oneshot_accuracy"] for row in result.history]
    runs = episodes(val, fine, seed=2015, validation=True)
    assert evaluate_oneshot(result.model, val, runs, "cpu").accuracy == accs[result.best_epoch]


def test_more_validation_runs_select_on_more_trials_and_leave_the_test_trials_alone() -> None:
    val = _synthetic(seed=1)  # 2 groups
    wide = dataclasses.replace(SMALL_EVALUATION, validation_runs_multiplier=3)
    assert Validator(val, SMALL_EVALUATION, "cpu").trials == 2 * 2 * 4  # groups x runs x queries
    validator = Validator(val, wide, "cpu")
    assert validator.trials == 2 * (3 * 2) * 4
    assert [r.queries.tolist() for r in validator.runs] == [r.queries.tolist() for r in episodes(val, wide, 2015, True)]
    test, test_before = episodes(val, wide, 0, validation=False), episodes(val, SMALL_EVALUATION, 0, validation=False)
    assert [(r.support.tolist(), r.queries.tolist()) for r in test] == \
        [(r.support.tolist(), r.queries.tolist()) for r in test_before]


def test_the_share_of_hardest_in_batch_pairings_falls_over_its_epochs(monkeypatch) -> None:
    from siamese_core import loop as loop_module

    shares: list[float] = []
    real_step = loop_module.train_step

    def recording_step(*args, **kwargs):
        shares.append(kwargs["in_batch_hardest"])
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop_module, "train_step", recording_step)
    train, val = _synthetic(seed=0), _synthetic(seed=1)
    recipe = _recipe(epochs=4, in_batch_negatives=1.0, in_batch_hardest=0.5, in_batch_hardest_epochs=2)
    fit(recipe, train, val, log=None)
    assert sorted(set(shares), reverse=True) == [1.0, 0.75, 0.5]  # epochs 0, 1, then 2 and 3
    assert shares == sorted(shares, reverse=True) and shares.count(0.5) == len(shares) // 2


def test_colour_images_train_through_the_same_loop() -> None:
    train, val = _synthetic(seed=0, channels=3), _synthetic(seed=1, channels=3)
    from siamese_core.config import PreprocessConfig

    rgb = dataclasses.replace(TINY, preprocess=PreprocessConfig(color="rgb", mean=(0.2, 0.2, 0.2),
                                                                std=(0.4, 0.4, 0.4)))
    result = fit(dataclasses.replace(_recipe(epochs=2), model=rgb), train, val, log=None)
    assert result.model.conv1.in_channels == 3 and result.model.config.preprocess.color == "rgb"
    assert result.history[-1]["train_loss"] < np.log(2)


def _mined(recipe: TrainingRecipe, **mining: object) -> TrainingRecipe:
    from siamese_core.config import MiningConfig

    return dataclasses.replace(recipe, mining=MiningConfig(policy="mined", **mining))  # type: ignore[arg-type]


def test_mined_pairs_come_from_the_assignment_and_follow_it_epoch_by_epoch() -> None:
    from siamese_core.mining import mine_assignment

    train = _synthetic(seed=0)
    recipe = _mined(_recipe(), every=2, first_epoch=1, share=0.5, noise_start=0.0, noise_end=0.0)
    # few pairs an epoch: a group of 36 images yields ~36 "same" and ~18 distinct "different" pairs
    recipe = dataclasses.replace(recipe, pairs=dataclasses.replace(recipe.pairs, pairs_per_epoch=64))
    pairs = MemoryPairs(train, recipe)
    net = new_model(recipe.model, 0)
    h, image_keys, class_keys, units = pairs.embed_all(net)
    assert np.unique(image_keys).size == len(train)  # every image once
    per_unit = {u: n for u, _, n in pairs.units}
    assignment = mine_assignment(net, h, image_keys, class_keys, units, per_unit, recipe.mining, 0, epoch=1)
    again = mine_assignment(net, h, image_keys, class_keys, units,
                            per_unit, recipe.mining, 0, epoch=1)
    assert np.array_equal(assignment.left_key, again.left_key)  # the same model and seed: the same pairs
    # the assignment's "different" pairs are two classes, its "same" pairs one, and never an image with itself
    cls = dict(zip(image_keys.tolist(), class_keys.tolist()))
    left_cls = np.array([cls[k] for k in assignment.left_key.tolist()])
    right_cls = np.array([cls[k] for k in assignment.right_key.tolist()])
    assert np.array_equal(left_cls == right_cls, assignment.same == 1.0)
    assert not (assignment.left_key == assignment.right_key).any()
    assert len(assignment) == sum(round(0.5 * n) * 2 for n in per_unit.values())
    pairs.publish(assignment)
    chunks = {e: list(pairs(e)) for e in (1, 2)}
    keys = {e: set(zip(torch.cat([c["left_image"] for c in chunks[e]]).tolist(),
                       torch.cat([c["right_image"] for c in chunks[e]]).tolist())) for e in (1, 2)}
    mined = set(zip(assignment.left_key.tolist(), assignment.right_key.tolist()))
    k = sum(round(0.5 * n) for n in per_unit.values())
    assert len(keys[1] & mined) >= 0.9 * k and len(keys[2] & mined) >= 0.9 * k  # half of each epoch is mined
    assert keys[1] & mined != keys[2] & mined  # epoch 2 takes the assignment's next slice
    assert all(torch.equal(a["left"], b["left"]) for a, b in zip(chunks[1], list(pairs(1))))  # pure in (epoch, it)


def test_mining_runs_on_its_epochs_and_a_resumed_run_uses_the_stored_assignment() -> None:
    train, val = _synthetic(seed=0), _synthetic(seed=1)
    recipe = _mined(_recipe(epochs=4), every=2, first_epoch=1, share=0.5)
    result = fit(recipe, train, val, log=None)
    mined_at = [row["epoch"] for row in result.history if "mining_seconds" in row]
    assert mined_at == [1, 3]
    for row in result.history:
        if "mining_seconds" in row:
            assert row["mining_images"] == len(train) and row["mined_pairs"] > 0 and row["mining_seconds"] > 0
            assert row["epoch_seconds"] >= row["mining_seconds"]  # mining counts against the budget
    # stopped after epoch 1 (its assignment made) and resumed: the same weights as one run
    whole, whole_model = _loop(recipe, val)
    pairs = MemoryPairs(train, recipe)
    from siamese_core.loop import Miner

    def miner_for(loop: TrainingLoop, source: MemoryPairs) -> Miner:
        return Miner(recipe, lambda: loop.net, lambda: source.embed_all(loop.net), source.publish, source.has_groups,
                     source.n_units, source.total_classes)

    whole.run(pairs, prepare=miner_for(whole, pairs))
    first, first_model = _loop(dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, epochs=2)),
                               val)
    first_pairs = MemoryPairs(train, recipe)
    state = first.run(first_pairs, prepare=miner_for(first, first_pairs))
    assert state.mining is not None and state.mining["epoch"] == 1
    from siamese_core.checkpoint import plain

    saved = (first_model.state_dict(), first.optimizer.state_dict(), plain(state.state_dict()))
    resumed, resumed_model = _loop(recipe, val)
    resumed_model.load_state_dict(saved[0])
    resumed.optimizer.load_state_dict(saved[1])
    fresh_pairs = MemoryPairs(train, recipe)
    restored = LoopState.from_state_dict(saved[2], recipe.training.patience)
    miner = miner_for(resumed, fresh_pairs)
    miner.restore(restored)  # epoch 2 has no mining of its own: it needs epoch 1's assignment
    assert fresh_pairs.assignment is not None and fresh_pairs.assignment.epoch == 1
    resumed.run(fresh_pairs, restored, prepare=miner)
    for key, value in whole_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
