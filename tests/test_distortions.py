"""Affine distortions: ranges, identity, reproducibility, geometry, masking."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from siamese_core.config import DistortionConfig
from siamese_core.distortions import AffineParams, affine_matrices, apply_affine, distort, sample_affine


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def identity_params(n: int, **changes: float) -> AffineParams:
    values = dict(theta=0.0, shear_x=0.0, shear_y=0.0, scale_x=1.0, scale_y=1.0,
                  translate_x=0.0, translate_y=0.0)
    values.update(changes)
    return AffineParams(**{k: torch.full((n,), float(v)) for k, v in values.items()})


def glyphs(n: int = 16, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Binary stroke-like images (ink 1, background 0)."""
    g = gen(seed)
    x = (torch.rand(n, 1, size // 4, size // 4, generator=g) > 0.6).float()
    return (F.interpolate(x, size=(size, size), mode="nearest"))


def test_sampled_parameters_stay_in_range() -> None:
    cfg = DistortionConfig(rotation_deg=10, shear=0.3, scale_min=0.8, scale_max=1.2, translate_px=2, probability=0.5)
    p = sample_affine(4000, cfg, gen(1))
    rot = math.radians(10)
    assert p.theta.abs().max() <= rot + 1e-7
    for s in (p.shear_x, p.shear_y):
        assert s.abs().max() <= 0.3 + 1e-7
    for s in (p.scale_x, p.scale_y):
        assert s.min() >= 0.8 - 1e-7 and s.max() <= 1.2 + 1e-7
    for t in (p.translate_x, p.translate_y):
        assert t.abs().max() <= 2.0 + 1e-7
    # about half of each component is active, the rest at its identity value
    for value, identity in ((p.theta, 0.0), (p.shear_y, 0.0), (p.scale_x, 1.0), (p.translate_y, 0.0)):
        active = (value != identity).float().mean().item()
        assert 0.45 < active < 0.55
    # components are drawn independently (not all on or off together)
    both = ((p.theta != 0) & (p.translate_x != 0)).float().mean().item()
    assert 0.2 < both < 0.3


def test_probability_one_activates_every_component_and_spans_range() -> None:
    cfg = DistortionConfig(probability=1.0)
    p = sample_affine(2000, cfg, gen(2))
    for value, identity in ((p.theta, 0.0), (p.shear_x, 0.0), (p.shear_y, 0.0), (p.scale_x, 1.0),
                            (p.scale_y, 1.0), (p.translate_x, 0.0), (p.translate_y, 0.0)):
        assert (value != identity).all()
    assert p.theta.max() > math.radians(9) and p.theta.min() < -math.radians(9)
    assert p.scale_y.max() > 1.18 and p.scale_y.min() < 0.82


def test_probability_zero_leaves_images_unchanged() -> None:
    x = glyphs()
    p = sample_affine(x.shape[0], DistortionConfig(probability=0.0), gen(3))
    assert torch.allclose(affine_matrices(p, 32), torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(16, 2, 3))
    out = distort(x, DistortionConfig(probability=0.0), gen(3))
    assert torch.allclose(out, x, atol=1e-6)


def test_distortion_changes_images_and_stays_in_unit_range() -> None:
    x = glyphs()
    out = distort(x, DistortionConfig(probability=1.0), gen(4))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0
    changed = (out - x).abs().flatten(1).amax(dim=1) > 0.1
    assert changed.all()


def test_same_seed_same_output_different_seed_different_output() -> None:
    x = glyphs()
    cfg = DistortionConfig()
    a, b, c = distort(x, cfg, gen(5)), distort(x, cfg, gen(5)), distort(x, cfg, gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_successive_calls_give_independent_transforms() -> None:
    # left and right of a pair are two calls: they must not get the same transform
    g = gen(7)
    p1, p2 = sample_affine(64, DistortionConfig(probability=1.0), g), sample_affine(64, DistortionConfig(probability=1.0), g)
    assert not torch.equal(p1.theta, p2.theta)


@pytest.mark.parametrize("dx,dy", [(2, 0), (0, 2), (-2, 1)])
def test_translation_moves_a_dot_by_the_given_pixels(dx: int, dy: int) -> None:
    x = torch.zeros(1, 1, 21, 21)
    x[0, 0, 10, 10] = 1.0  # row (y) 10, column (x) 10
    out = apply_affine(x, identity_params(1, translate_x=dx, translate_y=dy))
    assert out[0, 0, 10 + dy, 10 + dx].item() == pytest.approx(1.0, abs=1e-5)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_rotation_by_90_degrees_is_exact_on_the_pixel_grid() -> None:
    x = glyphs(4, 20)
    out = apply_affine(x, identity_params(4, theta=math.pi / 2))
    # positive theta: (x, y) -> (-y, x) in y-down image coordinates = torch.rot90 with k=-1
    assert torch.allclose(out, torch.rot90(x, k=-1, dims=(2, 3)), atol=1e-5)


def test_scale_enlarges_about_the_centre() -> None:
    x = torch.zeros(1, 1, 32, 32)
    x[0, 0, 12:20, 12:20] = 1.0
    out = apply_affine(x, identity_params(1, scale_x=1.5, scale_y=1.5))
    assert out.sum().item() == pytest.approx(64 * 1.5 ** 2, rel=0.05)
    assert torch.allclose(out, out.flip(2).flip(3), atol=1e-5)  # still centred


def test_mask_leaves_unmasked_rows_bit_identical() -> None:
    x = glyphs(8)
    mask = torch.tensor([True, False, True, False, False, True, True, False])
    out = distort(x, DistortionConfig(probability=1.0), gen(8), mask=mask)
    assert torch.equal(out[~mask], x[~mask])
    full = distort(x, DistortionConfig(probability=1.0), gen(8))
    assert torch.equal(out[mask], full[mask])  # a row's transform does not depend on the mask
    assert not torch.allclose(out[mask], x[mask])


def test_no_python_loop_per_image_large_batch_is_fast() -> None:
    import time
    x = torch.rand(512, 1, 52, 52)
    start = time.perf_counter()
    distort(x, DistortionConfig(), gen(9))
    assert time.perf_counter() - start < 2.0
