"""The paper's random affine distortions, batched, on the images' own device.

T = (theta, rho_x, rho_y, s_x, s_y, t_x, t_y); each of the seven components is
active independently with probability ``cfg.probability`` (0.5 in the paper);
an inactive component takes its identity value (0 or 1).

Why this shape:

* One ``affine_grid`` + ``grid_sample`` call for the whole batch: no Python
  loop per image, so it runs on the GPU inside the training step instead of
  in a CPU data stage that would starve the accelerator.
* Randomness comes only from a ``torch.Generator``: the same seed gives the
  same distortions, whatever the images' device (parameters are drawn on the
  generator's device, then moved).
* Each image of a pair gets its own transform: callers distort the left batch
  and the right batch in two separate calls (two independent draws).
* Background is 0 and ink is 1, so zero padding adds background, and bilinear
  interpolation of values in [0, 1] stays in [0, 1].

Conventions (pixel units, image coordinates: x to the right, y downwards):
the forward transform maps a point p of the input, relative to the image
centre, to ``A @ p + t`` in the output with ``A = R(theta) @ Shear @ Scale``,
``Shear = [[1, rho_x], [rho_y, 1]]``, ``Scale = diag(s_x, s_y)``. So a positive
``translate_x`` moves the content right, a positive ``translate_y`` moves it down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .config import DistortionConfig


@dataclass(frozen=True)
class AffineParams:
    """One affine transform per image; every field is a tensor of shape (B,)."""

    theta: torch.Tensor  # rotation, radians
    shear_x: torch.Tensor
    shear_y: torch.Tensor
    scale_x: torch.Tensor
    scale_y: torch.Tensor
    translate_x: torch.Tensor  # pixels
    translate_y: torch.Tensor  # pixels

    def to(self, device: torch.device | str) -> "AffineParams":
        return AffineParams(**{f.name: getattr(self, f.name).to(device, non_blocking=True)
                               for f in fields(self)})


def sample_affine(batch_size: int, cfg: DistortionConfig, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> AffineParams:
    """Draw ``batch_size`` transforms; each component active with ``cfg.probability``.

    Draws happen on the generator's device (CPU by default) so results do not
    depend on where the images live; the tensors are returned on ``device``.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(batch_size, 7, generator=generator, device=gen_device, dtype=torch.float32)
    active = torch.rand(batch_size, 7, generator=generator, device=gen_device) < cfg.probability

    def component(i: int, low: float, high: float, identity: float) -> torch.Tensor:
        value = low + (high - low) * u[:, i]
        return torch.where(active[:, i], value, torch.full_like(value, identity))

    rot = math.radians(cfg.rotation_deg)
    params = AffineParams(
        theta=component(0, -rot, rot, 0.0),
        shear_x=component(1, -cfg.shear, cfg.shear, 0.0),
        shear_y=component(2, -cfg.shear, cfg.shear, 0.0),
        scale_x=component(3, cfg.scale_min, cfg.scale_max, 1.0),
        scale_y=component(4, cfg.scale_min, cfg.scale_max, 1.0),
        translate_x=component(5, -cfg.translate_px, cfg.translate_px, 0.0),
        translate_y=component(6, -cfg.translate_px, cfg.translate_px, 0.0),
    )
    return params.to(device) if device is not None else params


def affine_matrices(params: AffineParams, image_size: int) -> torch.Tensor:
    """``(B, 2, 3)`` matrices for ``F.affine_grid`` (``align_corners=False``).

    ``affine_grid`` wants the *inverse* map (output location -> where to sample
    in the input), in normalised coordinates where one pixel is ``2 / size``.
    For square images rotation and shear are the same in pixel and normalised
    units, so only the translation needs converting (``2 * t / size``). The
    2x2 inverse is written out (no ``linalg.inv``): cheap and exact on any device.
    """
    cos, sin = torch.cos(params.theta), torch.sin(params.theta)
    sx, sy, hx, hy = params.scale_x, params.scale_y, params.shear_x, params.shear_y
    # A = R @ Shear @ Scale
    a = (cos - sin * hy) * sx
    b = (cos * hx - sin) * sy
    c = (sin + cos * hy) * sx
    d = (sin * hx + cos) * sy
    tx = 2.0 * params.translate_x / image_size
    ty = 2.0 * params.translate_y / image_size
    det = a * d - b * c  # = sx * sy * (1 - hx * hy) > 0 because |shear| < 1
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    row0 = torch.stack([ia, ib, -(ia * tx + ib * ty)], dim=-1)
    row1 = torch.stack([ic, id_, -(ic * tx + id_ * ty)], dim=-1)
    return torch.stack([row0, row1], dim=1)


def apply_affine(images: torch.Tensor, params: AffineParams) -> torch.Tensor:
    """Warp ``(B, C, S, S)`` images with given transforms (bilinear, zero = background)."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"distortions expect square images, got {tuple(images.shape[-2:])}")
    theta = affine_matrices(params, images.shape[-1]).to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.clamp_(0.0, 1.0)


def distort(images: torch.Tensor, cfg: DistortionConfig, generator: torch.Generator | None = None,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Randomly distort a batch ``(B, 1, S, S)`` float in [0, 1]; returns a new tensor.

    ``mask`` (B,) bool selects the rows to distort (e.g. the distorted copies of
    a pair); other rows are returned unchanged, bit for bit. Transforms are drawn
    for all B rows whatever the mask, so a row's transform depends only on the
    generator state and its position. Call once per side of a pair, so each
    image of a pair gets its own transform.
    """
    params = sample_affine(images.shape[0], cfg, generator, device=images.device)
    if mask is None:
        return apply_affine(images, params)
    mask = mask.to(device=images.device, dtype=torch.bool).view(-1)
    if images.device.type == "cpu":
        # On CPU warping is the expensive part: only warp the masked rows (same
        # per-row transforms as warping all rows, so the output does not change).
        out = images.clone()
        rows = mask.nonzero().view(-1)
        if rows.numel():
            picked = AffineParams(**{f.name: getattr(params, f.name)[rows] for f in fields(params)})
            out[rows] = apply_affine(images[rows], picked)
        return out
    # On an accelerator one whole-batch warp and a select avoid a host sync.
    out = apply_affine(images, params)
    return torch.where(mask.view(-1, *([1] * (images.dim() - 1))), out, images)
