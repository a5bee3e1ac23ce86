"""Layer-wise SGD: one group per layer, lr decay and momentum ramp per epoch; the weights' moving average."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from siamese_core.config import LAYER_NAMES, OptimizerConfig
from siamese_core.model import build_model
from siamese_core.optim import apply_epoch_schedule, build_optimizer, weight_average


@pytest.fixture()
def model():
    return build_model("cpu-small", seed=0)


def groups(opt) -> dict:
    return {g["layer"]: g for g in opt.param_groups}


def test_one_group_per_layer_covering_all_parameters(model) -> None:
    opt = build_optimizer(model, OptimizerConfig())
    assert [g["layer"] for g in opt.param_groups] == list(LAYER_NAMES)
    in_groups = [p for g in opt.param_groups for p in g["params"]]
    assert len(in_groups) == len(list(model.parameters()))
    assert {id(p) for p in in_groups} == {id(p) for p in model.parameters()}
    assert [p is model.fc.weight for p in groups(opt)["fc"]["params"]].count(True) == 1


def test_epoch_zero_values_and_overrides(model) -> None:
    cfg = OptimizerConfig(lr=0.01, lr_multipliers={"fc": 0.5, "head": 3.0}, momentum_start=0.5,
                          momentum=0.9, momentum_per_layer={"conv1": 0.7},
                          weight_decay=1e-3, weight_decay_per_layer={"fc": 0.05})
    g = groups(build_optimizer(model, cfg))
    assert g["conv1"]["lr"] == pytest.approx(0.01)
    assert g["fc"]["lr"] == pytest.approx(0.005)
    assert g["head"]["lr"] == pytest.approx(0.03)
    assert g["fc"]["weight_decay"] == pytest.approx(0.05)
    assert g["conv3"]["weight_decay"] == pytest.approx(1e-3)
    assert all(gr["momentum"] == pytest.approx(0.5) for gr in g.values())
    apply_epoch_schedule(build_optimizer(model, cfg), cfg, 0)  # epoch 0 = as built


def test_schedule_mid_ramp_and_after_ramp(model) -> None:
    cfg = OptimizerConfig(lr=0.1, lr_multipliers={"head": 2.0}, momentum_start=0.5, momentum=0.9,
                          momentum_per_layer={"conv1": 0.7}, momentum_ramp_epochs=10, lr_decay=0.99)
    opt = build_optimizer(model, cfg)
    apply_epoch_schedule(opt, cfg, 5)
    g = groups(opt)
    assert g["conv2"]["momentum"] == pytest.approx(0.5 + 0.4 * 0.5)
    assert g["conv1"]["momentum"] == pytest.approx(0.5 + 0.2 * 0.5)
    assert g["conv2"]["lr"] == pytest.approx(0.1 * 0.99 ** 5)
    assert g["head"]["lr"] == pytest.approx(0.2 * 0.99 ** 5)
    for epoch in (10, 30):
        apply_epoch_schedule(opt, cfg, epoch)
        g = groups(opt)
        assert g["conv2"]["momentum"] == pytest.approx(0.9)
        assert g["conv1"]["momentum"] == pytest.approx(0.7)
        assert g["fc"]["lr"] == pytest.approx(0.1 * 0.99 ** epoch)
    # the schedule is a function of the epoch, not of how often it was applied
    apply_epoch_schedule(opt, cfg, 1)
    assert groups(opt)["conv3"]["lr"] == pytest.approx(0.099)
    assert groups(opt)["conv3"]["momentum"] == pytest.approx(0.54)


def test_lr_decays_one_percent_per_epoch(model) -> None:
    cfg = OptimizerConfig(lr=0.05)
    opt = build_optimizer(model, cfg)
    lrs = []
    for epoch in range(4):
        apply_epoch_schedule(opt, cfg, epoch)
        lrs.append(groups(opt)["conv4"]["lr"])
    for a, b in zip(lrs, lrs[1:]):
        assert b / a == pytest.approx(0.99)


def test_weight_decay_is_applied_per_layer(model) -> None:
    # With zero gradient, one SGD step moves weights only by lr * weight_decay * w.
    cfg = OptimizerConfig(lr=0.1, weight_decay=0.0, weight_decay_per_layer={"head": 0.5}, momentum_start=0.0)
    opt = build_optimizer(model, cfg)
    before_head, before_fc = model.head.weight.detach().clone(), model.fc.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(model.head.weight, before_head * (1 - 0.1 * 0.5))
    assert torch.equal(model.fc.weight, before_fc)


def test_negative_epoch_rejected(model) -> None:
    cfg = OptimizerConfig()
    with pytest.raises(ValueError):
        apply_epoch_schedule(build_optimizer(model, cfg), cfg, -1)


def test_adam_keeps_per_layer_rates_decay_and_l2(model) -> None:
    cfg = OptimizerConfig(algorithm="adam", lr=1e-3, lr_multipliers={"head": 4.0}, lr_decay=0.5,
                          weight_decay_per_layer={"fc": 0.0})
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.Adam)
    groups = {g["layer"]: g for g in opt.param_groups}
    assert "momentum" not in groups["conv1"]
    apply_epoch_schedule(opt, cfg, 2)
    assert groups["head"]["lr"] == pytest.approx(4e-3 * 0.25) and groups["conv1"]["lr"] == pytest.approx(1e-3 * 0.25)
    assert groups["fc"]["weight_decay"] == 0.0 and groups["conv1"]["weight_decay"] == cfg.weight_decay
    with pytest.raises(ValueError, match="optim.algorithm"):
        OptimizerConfig(algorithm="rmsprop")


def test_weight_average_warms_up_then_holds_its_decay() -> None:
    """A weight that is t after update t: the average follows min(decay, (1 + t) / (10 + t)) exactly,
    starts from the first weights, and can be loaded to go on where it was."""
    assert weight_average(nn.Linear(1, 1), OptimizerConfig()) is None  # off unless asked for
    net = nn.Linear(1, 1, bias=False).double()
    average = weight_average(net, OptimizerConfig(ema_decay=0.75))
    expected = 0.0
    for t in range(40):
        with torch.no_grad():
            net.weight.fill_(float(t))
        average.update(net)
        d = min(0.75, (1 + t) / (10 + t))  # 0.75 from t = 26 on
        expected = 0.0 if t == 0 else d * expected + (1 - d) * t
        assert average.module.weight.item() == pytest.approx(expected, rel=1e-12), t
        if t == 19:  # a copy loaded from this point goes on identically
            copy = weight_average(net, OptimizerConfig(ema_decay=0.75))
            copy.load(average.module.state_dict(), average.steps)
    for t in range(20, 40):
        with torch.no_grad():
            net.weight.fill_(float(t))
        copy.update(net)
    assert copy.steps == average.steps == 40
    assert copy.module.weight.item() == pytest.approx(average.module.weight.item(), rel=1e-12)
