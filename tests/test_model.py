"""The twin network: exact paper shapes and size, heads, init, channels_last."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from siamese_core.config import LAYER_NAMES, ModelConfig
from siamese_core.model import (SiameseNet, build_model, place_model, init_kaiming_weights, init_paper_weights, init_weights,
                                 layer_shapes, parameter_count, shift_images, shift_offsets,
                                 with_test_time_shift)


@pytest.fixture(scope="module")
def koch() -> SiameseNet:
    return build_model("koch", seed=0)


@pytest.fixture()
def small() -> SiameseNet:
    return build_model("cpu-small", seed=0)


def test_koch_parameter_count_matches_paper(koch: SiameseNet) -> None:
    assert parameter_count(koch) == 38_951_745


def test_koch_layer_shapes_match_paper(koch: SiameseNet) -> None:
    shapes = layer_shapes(koch)
    assert shapes["conv1"] == (64, 48, 48)
    assert shapes["conv2"] == (128, 21, 21)
    assert shapes["conv3"] == (128, 9, 9)
    assert shapes["conv4"] == (256, 6, 6)
    assert koch.flat_dim == 9216
    assert koch.fc.weight.shape == (4096, 9216)
    assert koch.head.weight.shape == (1, 4096)


def test_default_is_koch() -> None:
    from siamese_core.config import PAPER_PREPROCESS

    # a network always carries its whole preprocessing: what was left open is the paper's
    assert SiameseNet().config == dataclasses.replace(ModelConfig.from_preset("koch"), preprocess=PAPER_PREPROCESS)
    assert build_model().config.preset == "koch"


def test_layer_names_match_config(small: SiameseNet) -> None:
    for name in LAYER_NAMES:
        assert isinstance(getattr(small, name), torch.nn.Module)
    top = {n.split(".")[0] for n, _ in small.named_parameters()}
    assert top == set(LAYER_NAMES)


def test_forward_shapes_and_similarity_range(small: SiameseNet) -> None:
    s = small.config.input_size
    x1, x2 = torch.rand(5, 1, s, s), torch.rand(5, 1, s, s)
    h = small.embed(x1)
    assert h.shape == (5, small.config.embedding_dim)
    assert ((h >= 0) & (h <= 1)).all()  # sigmoid embedding (float32 may round to 0 or 1)
    logits = small(x1, x2)
    assert logits.shape == (5,)
    p = small.similarity(x1, x2)
    assert torch.allclose(p, torch.sigmoid(logits))
    assert ((p >= 0) & (p <= 1)).all()


def test_forward_equals_embed_then_head_and_is_symmetric(small: SiameseNet) -> None:
    s = small.config.input_size
    x1, x2 = torch.rand(4, 1, s, s), torch.rand(4, 1, s, s)
    expected = small.head_logits(small.embed(x1), small.embed(x2))
    assert torch.allclose(small(x1, x2), expected, atol=1e-5)
    assert torch.allclose(small(x1, x2), small(x2, x1), atol=1e-5)
    # head is a weighted L1: alpha . |h1 - h2| + b
    h1, h2 = small.embed(x1), small.embed(x2)
    manual = (h1 - h2).abs() @ small.head.weight[0] + small.head.bias[0]
    assert torch.allclose(small.head_logits(h1, h2), manual, atol=1e-5)


def test_pairwise_logits_matches_pair_by_pair(small: SiameseNet) -> None:
    s = small.config.input_size
    g = torch.Generator().manual_seed(0)
    q, sup = torch.rand(3, 1, s, s, generator=g), torch.rand(5, 1, s, s, generator=g)
    hq, hs = small.embed(q), small.embed(sup)
    grid = small.pairwise_logits(hq, hs)
    assert grid.shape == (3, 5)
    for i in range(3):
        for j in range(5):
            assert torch.allclose(grid[i, j], small.head_logits(hq[i:i + 1], hs[j:j + 1])[0], atol=1e-5)
    # chunking must not change the answer (beyond float32 summation order: the
    # chunked rows reduce in another order, so near-zero logits need an atol)
    assert torch.allclose(small.pairwise_logits(hq, hs, max_elements=1), grid, atol=1e-6)


def test_paper_init_statistics(koch: SiameseNet) -> None:
    for name in ("conv1", "conv2", "conv3", "conv4"):
        w = getattr(koch, name).weight
        assert abs(w.mean().item()) < 2e-3
        assert w.std().item() == pytest.approx(1e-2, rel=0.1)
    assert koch.fc.weight.std().item() == pytest.approx(0.2, rel=0.02)
    assert koch.head.weight.std().item() == pytest.approx(0.2, rel=0.1)
    biases = torch.cat([getattr(koch, name).bias.detach().view(-1) for name in LAYER_NAMES])
    assert biases.mean().item() == pytest.approx(0.5, abs=1e-3)
    assert biases.std().item() == pytest.approx(1e-2, rel=0.1)
    assert (biases - 0.5).abs().max().item() < 0.1


def test_init_is_seeded() -> None:
    a, b, c = (build_model("cpu-small", seed=s) for s in (1, 1, 2))
    assert torch.equal(a.fc.weight, b.fc.weight)
    assert not torch.equal(a.fc.weight, c.fc.weight)
    g = torch.Generator().manual_seed(1)
    d = init_weights(SiameseNet(ModelConfig.from_preset("cpu-small")), g)
    assert torch.equal(d.conv1.weight, a.conv1.weight)


def test_channels_last_gives_same_outputs(small: SiameseNet) -> None:
    s = small.config.input_size
    x1, x2 = torch.rand(3, 1, s, s), torch.rand(3, 1, s, s)
    expected = small(x1, x2)
    cl = build_model("cpu-small", seed=0).to(memory_format=torch.channels_last)
    assert cl.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(cl.embed(x1), small.embed(x1), atol=1e-5)
    assert torch.allclose(cl(x1, x2), expected, atol=1e-4)


def paper_order_features(model: SiameseNet, x: torch.Tensor) -> torch.Tensor:
    """The trunk as the paper draws it: each conv's ReLU, then its max-pool."""
    for i in (1, 2, 3):
        x = model.pool(torch.relu(getattr(model, f"conv{i}_norm")(getattr(model, f"conv{i}")(x))))
    return torch.relu(model.conv4_norm(model.conv4(x)))


@pytest.mark.parametrize("preset,batch_norm,channels_last",
                         [("cpu-small", False, False), ("cpu-small", False, True), ("cpu-medium", True, True)])
def test_trunk_pools_before_relu_with_the_papers_values_and_gradients(preset: str, batch_norm: bool,
                                                                      channels_last: bool) -> None:
    """The model applies each ReLU after its max-pool (cheaper); the two orders must agree exactly."""
    model = place_model(build_model(ModelConfig.from_preset(preset, batch_norm=batch_norm), seed=0), "cpu",
                        channels_last)
    s = model.config.input_size
    x = torch.rand(6, 1, s, s) - 0.3  # negative values too, so whole pooling windows fall below zero
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    got, want = model.features(x), paper_order_features(model, x)
    assert torch.equal(got, want)
    trunk = [p for name, p in model.named_parameters() if name.startswith("conv")]
    grads = [torch.autograd.grad(f.square().sum(), trunk) for f in (got, want)]
    for g_got, g_want in zip(*grads):
        assert torch.allclose(g_got, g_want, atol=1e-6, rtol=1e-5)


def test_place_model_picks_channels_last_on_cpu_unless_told(small: SiameseNet) -> None:
    def layout(model: SiameseNet) -> bool:
        return model.conv2.weight.is_contiguous(memory_format=torch.channels_last)

    assert not layout(build_model("cpu-small", seed=0))  # built contiguous
    assert layout(place_model(build_model("cpu-small", seed=0), "cpu"))  # by device: CPU
    assert not layout(place_model(build_model("cpu-small", seed=0), "cpu", channels_last=False))
    placed = place_model(build_model("cpu-small", seed=0), torch.device("cpu"), channels_last=True)
    assert layout(placed) and placed.conv1.weight.device.type == "cpu"
    # the state dicts are interchangeable between layouts
    contiguous = build_model("cpu-small", seed=5)
    contiguous.load_state_dict(placed.state_dict())
    s = small.config.input_size
    x = torch.rand(4, 1, s, s)
    assert torch.allclose(contiguous.embed(x), placed.embed(x), atol=1e-5)


def test_custom_config_and_too_small_input() -> None:
    cfg = ModelConfig(preset="t", input_size=40, channels=(4, 8, 8, 16), kernels=(5, 3, 3, 2), embedding_dim=32)
    m = build_model(cfg)
    assert m(torch.rand(2, 1, 40, 40), torch.rand(2, 1, 40, 40)).shape == (2,)
    with pytest.raises(ValueError):
        ModelConfig(input_size=20)


def test_fan_in_scaled_init_is_the_paper_init_for_koch_and_keeps_gain_for_small() -> None:
    from siamese_core.model import _fan_ins
    koch_cfg, small_cfg = ModelConfig.from_preset("koch"), ModelConfig.from_preset("cpu-small", init="paper")
    assert _fan_ins(koch_cfg) == {"conv1": 100, "conv2": 3136, "conv3": 2048, "conv4": 2048,
                                  "fc": 9216, "head": 4096}
    small = build_model(small_cfg, seed=0)
    fans = _fan_ins(small_cfg)
    expected = 2e-1 * (9216 / fans["fc"]) ** 0.5
    assert small.fc.weight.std().item() == pytest.approx(expected, rel=0.05)
    literal = init_paper_weights(SiameseNet(small_cfg), torch.Generator().manual_seed(0), fan_in_scaled=False)
    assert literal.fc.weight.std().item() == pytest.approx(0.2, rel=0.05)


def test_init_option_koch_stays_paper_and_kaiming_does_not_saturate() -> None:
    assert ModelConfig.from_preset("koch").init == "paper"
    with pytest.raises(ValueError):
        ModelConfig(init="xavier")
    cfg = ModelConfig.from_preset("cpu-small", init="kaiming")
    m = build_model(cfg, seed=0)
    ref = init_kaiming_weights(SiameseNet(cfg), torch.Generator().manual_seed(0))
    assert torch.equal(m.fc.weight, ref.fc.weight)
    assert m.conv1.weight.std().item() == pytest.approx((2.0 / m.conv1.weight[0].numel()) ** 0.5, rel=0.15)
    assert m.fc.weight.std().item() == pytest.approx(m.flat_dim ** -0.5, rel=0.05)
    # a paper-init koch-shaped preset is unaffected by the option's existence
    assert torch.equal(build_model(ModelConfig.from_preset("cpu-small", init="paper"), seed=0).fc.weight,
                       init_paper_weights(SiameseNet(ModelConfig.from_preset("cpu-small", init="paper")),
                                          torch.Generator().manual_seed(0)).fc.weight)
    # embeddings of different images differ and few sigmoid units saturate
    torch.manual_seed(0)
    x = (torch.rand(16, 1, cfg.input_size, cfg.input_size) > 0.8).float()
    with torch.no_grad():
        h = m.embed(x)
    assert ((h < 0.02) | (h > 0.98)).float().mean().item() < 0.05
    assert h.std(dim=0).mean().item() > 1e-2


def test_batch_norm_option_adds_norms_that_train_with_their_conv() -> None:
    from siamese_core.optim import build_optimizer
    from siamese_core.config import OptimizerConfig

    plain, normed = build_model("cpu-small", seed=0), build_model(ModelConfig.from_preset("cpu-small", batch_norm=True), seed=0)
    assert not any("norm" in k for k in plain.state_dict())  # the paper's network is unchanged
    assert {f"conv{i}_norm.running_mean" for i in range(1, 5)} <= set(normed.state_dict())
    assert parameter_count(normed) == parameter_count(plain) + 2 * sum(normed.config.channels)
    groups = {g["layer"]: g for g in build_optimizer(normed, OptimizerConfig(lr_multipliers={"conv2": 2.0})).param_groups}
    assert any(p is normed.conv2_norm.weight for p in groups["conv2"]["params"])
    assert groups["conv2"]["lr"] == pytest.approx(2 * groups["conv1"]["lr"])
    x = torch.rand(6, 1, 35, 35, generator=torch.Generator().manual_seed(0))
    normed.train()
    normed(x[:3], x[3:]).sum().backward()
    assert normed.conv1_norm.weight.grad is not None and normed.conv1_norm.num_batches_tracked == 1
    normed.eval()  # eval uses the running statistics: a pair's score does not depend on its batch
    assert torch.allclose(normed(x[:1], x[3:4]), normed(x[:3], x[3:])[:1], atol=1e-6)
    assert layer_shapes(normed) == layer_shapes(plain)


def test_shift_images_moves_content_and_fills_background() -> None:
    x = torch.zeros(2, 1, 6, 6)
    x[0, 0, 2, 3] = 1.0  # row (y) 2, column (x) 3
    x[1, 0, 0, 0] = 0.5
    right_down = shift_images(x, 2, 1)
    assert right_down[0, 0, 3, 5] == 1.0 and right_down[0].sum() == 1.0
    assert right_down[1, 0, 1, 2] == 0.5 and right_down[1].sum() == 0.5
    left_up = shift_images(x, -1, -2)
    assert left_up[0, 0, 0, 2] == 1.0 and left_up[0].sum() == 1.0
    assert left_up[1].sum() == 0.0  # moved out of the frame, nothing wraps around
    assert torch.equal(shift_images(x, 0, 0), x)
    assert shift_offsets(0) == [(0, 0)]
    assert shift_offsets(2) == [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (2, 0), (-2, 0), (0, 2), (0, -2)]
    square = shift_offsets(2, "square")
    assert square[0] == (0, 0) and len(square) == 25
    assert set(square) == {(dx, dy) for dx in range(-2, 3) for dy in range(-2, 3)}
    assert set(square[1:9]) == {(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)} - {(0, 0)}  # nearest first
    with pytest.raises(ValueError, match="'cross' or 'square'"):
        shift_offsets(1, "diamond")


def test_scoring_embed_is_the_mean_over_test_time_views(small: SiameseNet) -> None:
    s = small.config.input_size
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.rand(4, 1, s, s, generator=g), torch.rand(4, 1, s, s, generator=g)
    with torch.no_grad():
        assert torch.equal(small.scoring_embed(x1), small.embed(x1))  # the preset: one view
        viewed = SiameseNet(ModelConfig.from_preset("cpu-small", test_time_shift_px=2))
        viewed.load_state_dict(small.state_dict())
        views = [viewed.embed(shift_images(x1, dx, dy)) for dx, dy in shift_offsets(2)]
        expected = torch.stack(views).mean(0)
        assert torch.allclose(viewed.scoring_embed(x1), expected, atol=1e-6)
        assert not torch.allclose(expected, viewed.embed(x1), atol=1e-4)  # the views matter
        # training's forward keeps one view; similarity (served, predict) compares scoring embeddings
        assert torch.allclose(viewed(x1, x2), small(x1, x2))
        p = viewed.similarity(x1, x2)
        assert torch.allclose(p, torch.sigmoid(viewed.head_logits(expected, viewed.scoring_embed(x2))), atol=1e-6)
        # the square pattern: every shift within 1 px, the same weights
        squared = with_test_time_shift(viewed, 1, "square")
        assert squared.config.test_time_views == "square" and viewed.config.test_time_views == "cross"
        corners = torch.stack([viewed.embed(shift_images(x1, dx, dy)) for dx in (-1, 0, 1) for dy in (-1, 0, 1)])
        assert torch.allclose(squared.scoring_embed(x1), corners.mean(0), atol=1e-6)
        assert with_test_time_shift(squared, 2).config.test_time_views == "square"  # kept unless given
