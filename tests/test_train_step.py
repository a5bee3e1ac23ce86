"""Training and scoring steps on a tiny separable problem."""

from __future__ import annotations

import math

import pytest
import torch

from siamese_core.config import DistortionConfig, ModelConfig, OptimizerConfig
from siamese_core.model import build_model
from siamese_core.optim import build_optimizer
from siamese_core.train_step import (hardest_pairings, in_batch_negative_pairings, indexed_pair_logits, to_model_input,
                                     train_step, verification_accuracy)

TINY = ModelConfig(preset="tiny", input_size=28, channels=(4, 8, 8, 16), kernels=(3, 3, 2, 2), embedding_dim=32)


def separable_pairs(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two 'classes': a horizontal bar or a vertical bar at a random position.

    A pair is 'same' when both images show the same orientation.
    """
    g = torch.Generator().manual_seed(seed)

    def draw(kind: torch.Tensor) -> torch.Tensor:
        x = torch.zeros(n, 1, size, size)
        pos = torch.randint(4, size - 4, (n,), generator=g)
        for i in range(n):  # test data only; the library itself has no per-image loops
            p = int(pos[i])
            if kind[i]:
                x[i, 0, p - 1:p + 1, 3:size - 3] = 1.0
            else:
                x[i, 0, 3:size - 3, p - 1:p + 1] = 1.0
        return x

    a = torch.rand(n, generator=g) < 0.5
    same = torch.rand(n, generator=g) < 0.5
    b = torch.where(same, a, ~a)
    return draw(a), draw(b), same.float()


def indexed(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same pairs as one image tensor and row indices into it (``verification_accuracy``'s form)."""
    n = left.shape[0]
    return torch.cat([left, right]), torch.arange(n), torch.arange(n, 2 * n)


@torch.no_grad()
def pair_by_pair_logits(model, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """The reference: every pair through the whole siamese net, in eval mode."""
    model.eval()
    try:
        return model(left, right)
    finally:
        model.train()


@pytest.mark.parametrize("config,steps", [(TINY, 80), ("cpu-small", 40)], ids=["tiny", "cpu-small"])
def test_training_lowers_loss_and_learns(config, steps: int) -> None:
    model = build_model(config, seed=0)
    size = model.config.input_size
    left, right, same = separable_pairs(64, size, seed=1)
    vl, vr, vs = separable_pairs(128, size, seed=2)
    opt = build_optimizer(model, OptimizerConfig(lr=0.01, momentum_start=0.5, weight_decay=0.0))
    g = torch.Generator().manual_seed(3)
    first_loss = train_step(model, opt, left, right, same, None, None, g)
    losses = [train_step(model, opt, left, right, same, None, None, g) for _ in range(steps)]
    assert sum(losses[-5:]) / 5 < 0.8 * first_loss
    assert verification_accuracy(model, *indexed(vl, vr), vs) > 0.65  # held-out pairs; chance is 0.5


def test_distorted_training_step_runs_and_is_seeded() -> None:
    size = TINY.input_size
    left, right, same = separable_pairs(16, size, seed=4)
    mask = torch.arange(16) % 2 == 0
    losses = []
    for _ in range(2):
        model = build_model(TINY, seed=0)
        opt = build_optimizer(model, OptimizerConfig(lr=0.05))
        g = torch.Generator().manual_seed(5)
        losses.append([train_step(model, opt, left, right, same, mask, DistortionConfig(probability=1.0), g)
                       for _ in range(3)])
    assert losses[0] == losses[1]
    assert all(torch.isfinite(torch.tensor(losses[0])))


def test_step_changes_every_layer() -> None:
    model = build_model(TINY, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimizerConfig(lr=0.1))
    left, right, same = separable_pairs(16, TINY.input_size, seed=6)
    train_step(model, opt, left, right, same)
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), n


def test_bf16_autocast_step() -> None:
    model = build_model(TINY, seed=0)
    opt = build_optimizer(model, OptimizerConfig(lr=0.05))
    left, right, same = separable_pairs(16, TINY.input_size, seed=7)
    loss = train_step(model, opt, left, right, same, autocast_dtype=torch.bfloat16)
    assert 0.0 < loss < 10.0
    assert model.fc.weight.dtype == torch.float32  # autocast leaves master weights in fp32


def test_verification_accuracy_threshold_and_mode() -> None:
    model = build_model(TINY, seed=0)
    left, right, same = separable_pairs(10, TINY.input_size, seed=8)
    logits = pair_by_pair_logits(model, left, right)
    assert logits.shape == (10,)
    expected = ((logits > 0).float() == same).float().mean().item()
    assert verification_accuracy(model, *indexed(left, right), same, batch_size=4) == pytest.approx(expected)
    # forcing the head's bias flips every decision
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(5.0)
    assert verification_accuracy(model, *indexed(left, right), same) == pytest.approx(same.mean().item())


def test_indexed_pair_logits_embed_each_image_once() -> None:
    """Pairs that reuse images score as if each pair ran through the twin, with one embedding per image."""
    model = build_model(TINY, seed=0)
    images, _, _ = separable_pairs(12, TINY.input_size, seed=9)
    g = torch.Generator().manual_seed(10)
    left, right = torch.randint(0, 12, (40,), generator=g), torch.randint(0, 12, (40,), generator=g)
    rows_embedded: list[int] = []
    hook = model.fc.register_forward_hook(lambda _m, inputs, _o: rows_embedded.append(inputs[0].shape[0]))
    logits = indexed_pair_logits(model, images, left, right, batch_size=5)
    hook.remove()
    assert model.training  # the previous mode is restored
    assert sum(rows_embedded) == torch.unique(torch.cat([left, right])).numel()
    assert max(rows_embedded) <= 5
    reference = pair_by_pair_logits(model, images[left], images[right])
    assert torch.allclose(logits, reference, atol=1e-5)


def test_uint8_inputs_are_scaled() -> None:
    x = torch.tensor([[[0, 255], [255, 0]]], dtype=torch.uint8)
    out = to_model_input(x, torch.device("cpu"))
    assert out.shape == (1, 1, 2, 2) and out.dtype == torch.float32
    assert out.max().item() == 1.0 and out.min().item() == 0.0


def _distinct_images(n: int, size: int = 6) -> torch.Tensor:
    """``n`` different uint8 images (image k has pixel k set)."""
    x = torch.zeros(n, size, size, dtype=torch.uint8)
    x.view(n, -1)[torch.arange(n), torch.arange(n)] = 255
    return x


def _keys(left_class, right_class, left_image, right_image) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(k, dtype=torch.int64) for k in (left_class, right_class, left_image, right_image))


def _distinct_keys(b: int) -> tuple[torch.Tensor, ...]:
    """Keys of ``b`` pairs of 2b different images of 2b different classes."""
    return _keys(range(b), range(b, 2 * b), range(b), range(b, 2 * b))


def test_in_batch_pairings_skip_own_pair_copies_and_images_of_one_class() -> None:
    # rows: pairs of images (0,1), (2,3), (0,1) again (a distorted copy of row 0), (4,5), (6,2);
    # classes: images 2 and 3 are one class (a "same" pair), image 6 is of image 0's class
    image_class = {0: 10, 1: 11, 2: 12, 3: 12, 4: 14, 5: 15, 6: 10}
    left_image, right_image = [0, 2, 0, 4, 6], [1, 3, 1, 5, 2]
    keys = _keys([image_class[i] for i in left_image], [image_class[i] for i in right_image], left_image, right_image)
    b = 5
    ids = left_image + right_image  # image per position
    pair = [0, 1, 0, 3, 4]  # rows 0 and 2 hold the same pair
    expected = {(i, j) for i in range(2 * b) for j in range(i + 1, 2 * b)
                if pair[i % b] != pair[j % b] and image_class[ids[i]] != image_class[ids[j]]}
    i, j, keep = in_batch_negative_pairings(keys)
    assert len(i) == 2 * b * (2 * b - 1) // 2  # every pairing, the same for every batch of this size
    got = set(zip(i[keep].tolist(), j[keep].tolist()))
    assert got == expected
    assert (1, 9) not in got  # image 2 appears in rows 1 and 4: never "different" from itself
    assert (0, 4) not in got  # images 0 and 6: two images of one class, never "different"
    assert (0, 1) in got  # two images of different classes in different pairs


def test_forward_scores_extra_pairings_like_the_head() -> None:
    model = build_model(TINY, seed=0)
    left, right, _ = separable_pairs(6, TINY.input_size, seed=9)
    i, j, keep = in_batch_negative_pairings(_distinct_keys(6))
    i, j = i[keep], j[keep]
    logits, others = model(left, right, (i, j))
    h = model.embed(torch.cat([left, right]))
    assert torch.allclose(logits, model(left, right), atol=1e-6)
    reference = model.head_logits(h[i], h[j])
    assert torch.allclose(others, reference, atol=1e-6)
    # the same gradients as scoring the pairings by advanced indexing
    params = list(model.parameters())
    for g_got, g_want in zip(torch.autograd.grad(others.sum(), params), torch.autograd.grad(reference.sum(), params)):
        assert torch.allclose(g_got, g_want, atol=1e-6, rtol=1e-5)


def test_in_batch_negative_steps_are_bitwise_repeatable_on_two_threads() -> None:
    """A seed fixes the weights: steps with in-batch negatives repeat exactly with 2 torch threads.
    (Scoring the pairings by advanced indexing did not: its backward, index_put_ with accumulation,
    summed in a varying order, and two runs of these 8 steps differed by up to 1e-5.)"""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(11)
        batches = [(torch.randint(0, 255, (32, 1, 35, 35), generator=g, dtype=torch.uint8),
                    torch.randint(0, 255, (32, 1, 35, 35), generator=g, dtype=torch.uint8),
                    (torch.rand(32, generator=g) < 0.5).float()) for _ in range(8)]

        def weights(model) -> torch.Tensor:
            return torch.cat([p.detach().flatten() for p in model.parameters()])

        def trained() -> torch.Tensor:
            model = build_model("cpu-small", seed=0).to(memory_format=torch.channels_last)
            opt = build_optimizer(model, OptimizerConfig())
            for left, right, same in batches:
                train_step(model, opt, left, right, same, in_batch_negatives=1.0, keys=_distinct_keys(32))
            return weights(model)

        first, second = trained(), trained()
        assert not torch.equal(first, weights(build_model("cpu-small", seed=0)))
        assert torch.equal(first, second)
    finally:
        torch.set_num_threads(previous_threads)


def test_in_batch_negatives_zero_is_the_paper_step_and_positive_changes_it() -> None:
    left, right, same = separable_pairs(16, TINY.input_size, seed=10)
    after = {}
    for weight in (None, 0.0, 0.5):
        model = build_model(TINY, seed=0)
        opt = build_optimizer(model, OptimizerConfig(lr=0.05))
        with torch.no_grad():
            pair_loss = torch.nn.functional.binary_cross_entropy_with_logits(model(left, right), same).item()
        kwargs = {} if weight is None else {"in_batch_negatives": weight, "keys": _distinct_keys(16)}
        returned = train_step(model, opt, left, right, same, **kwargs)
        assert isinstance(returned, torch.Tensor) and not returned.requires_grad  # read once per epoch, not per step
        assert float(returned) == pytest.approx(pair_loss, rel=1e-5)  # the pairs' loss, whatever the weight
        after[weight] = model.head.weight.detach().clone()
    assert torch.equal(after[None], after[0.0])
    assert not torch.allclose(after[0.0], after[0.5])
    with pytest.raises(ValueError, match="in_batch_negatives"):
        train_step(build_model(TINY, seed=0), opt, left, right, same, in_batch_negatives=-1.0)
    with pytest.raises(ValueError, match="keys"):
        train_step(build_model(TINY, seed=0), opt, left, right, same, in_batch_negatives=1.0)


def test_hardest_pairings_keep_the_highest_trainable_losses() -> None:
    losses = torch.tensor([0.5, 2.0, 0.1, 3.0, 1.0, 0.0])
    may_train = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0])  # the highest loss (3.0) may not be trained
    ranked, weight = hardest_pairings(losses, may_train, 0.5)
    assert sorted(ranked.tolist()) == [0.5, 1.0, 2.0] and weight.tolist() == [1.0, 1.0, 1.0]
    ranked, weight = hardest_pairings(losses, torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0]), 0.3)
    # too few may be trained: the rest fill the share at weight 0
    assert sorted(zip(ranked.tolist(), weight.tolist())) == [(-1.0, 0.0), (pytest.approx(0.1), 1.0)]


def test_in_batch_hardest_trains_the_mean_of_the_hardest_pairings_only() -> None:
    """The step with a share s equals one whose in-batch term is the mean loss of the ceil(s * n)
    highest-loss trainable pairings, chosen here by a full sort; s = 1 is the plain mean."""
    left, right, same = separable_pairs(16, TINY.input_size, seed=12)
    keys = _distinct_keys(16)

    def stepped(share: float | None) -> torch.Tensor:
        model = build_model(TINY, seed=0)
        opt = build_optimizer(model, OptimizerConfig(lr=0.05))
        if share is None:  # the oracle: the same loss, written out
            i, j, keep = in_batch_negative_pairings(keys)
            x1, x2 = to_model_input(left, torch.device("cpu")), to_model_input(right, torch.device("cpu"))
            logits, others = model(x1, x2, (i, j))
            per = torch.nn.functional.binary_cross_entropy_with_logits(others, torch.zeros_like(others),
                                                                       reduction="none")
            k = math.ceil(0.25 * per.numel())
            hardest = per[keep].sort(descending=True).values[:k]
            total = torch.nn.functional.binary_cross_entropy_with_logits(logits, same) + hardest.mean()
            opt.zero_grad()
            total.backward()
            opt.step()
        else:
            train_step(model, opt, left, right, same, in_batch_negatives=1.0, keys=keys, in_batch_hardest=share)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.allclose(stepped(0.25), stepped(None), atol=1e-6)
    assert not torch.allclose(stepped(0.25), stepped(1.0), atol=1e-4)


def _which_turn(image: torch.Tensor, original: torch.Tensor) -> int:
    """Which of the 8 turns and mirrors of ``original`` ``image`` is (-1: none)."""
    from siamese_core.train_step import _dihedral
    return next((k for k in range(8) if torch.equal(_dihedral(original, k), image)), -1)


@pytest.mark.parametrize("name,kinds", [("rot90", 4), ("dihedral", 8)])
def test_new_class_views_turn_both_images_of_a_pair_alike_and_key_each_turn_as_a_class(name, kinds) -> None:
    from siamese_core.config import NEW_CLASSES
    from siamese_core.train_step import new_class_views
    assert NEW_CLASSES[name] == kinds
    g = torch.Generator().manual_seed(0)
    b = 400
    base = torch.rand(1, 1, 9, 9, generator=g)  # no symmetry: each turn is a different image
    left, right = base.expand(b, 1, 9, 9).clone(), (base * 0.5).expand(b, 1, 9, 9).clone()
    keys = _keys([7] * b, [8] * b, range(b), range(b, 2 * b))
    out_left, out_right, out_keys = new_class_views(left, right, kinds, torch.Generator().manual_seed(1), keys)
    turns = [_which_turn(out_left[i], base[0]) for i in range(b)]
    assert all(_which_turn(out_right[i], base[0] * 0.5) == turns[i] for i in range(b))  # both images alike
    assert set(turns) == set(range(kinds))  # every new class is drawn
    left_class = out_keys[0].tolist()
    for i in range(b):  # one class per (class, turn): equal keys exactly where the turns are equal
        for j in (0, 1, b - 1):
            assert (left_class[i] == left_class[j]) == (turns[i] == turns[j])
    # one shift for the whole pair: its two classes (7, 8) and images (i, b + i) stay apart, as they were
    assert bool(((out_keys[1] - out_keys[0]) == 1).all()) and bool(((out_keys[3] - out_keys[2]) == b).all())
    assert torch.equal(out_left[turns.index(0)], base[0])  # turn 0 is the image itself
    again = new_class_views(left, right, kinds, torch.Generator().manual_seed(1), keys)
    assert torch.equal(again[0], out_left) and torch.equal(again[1], out_right)  # the seed fixes the turns


def test_no_new_classes_leaves_the_step_as_it_was() -> None:
    from siamese_core.config import ConfigError, PairConfig
    from siamese_core.train_step import new_class_views
    left, right, same = separable_pairs(8, TINY.input_size, seed=3)
    keys = _distinct_keys(8)
    assert new_class_views(left, right, 1, torch.Generator().manual_seed(0), keys) == (left, right, keys)
    after = {}
    for kinds in (1, 4):
        model = build_model(TINY, seed=0)
        opt = build_optimizer(model, OptimizerConfig(lr=0.05))
        train_step(model, opt, left, right, same, generator=torch.Generator().manual_seed(0),
                   in_batch_negatives=1.0, keys=keys, new_classes=kinds)
        after[kinds] = model.head.weight.detach().clone()
    assert not torch.equal(after[1], after[4])
    with pytest.raises(ConfigError, match="pairs.new_classes"):
        PairConfig(new_classes="rot45")
