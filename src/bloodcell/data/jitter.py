"""Colour/stain and scale jitter, and mixup/cutmix, on whole batches (no per-image Python loop).

Each option has a ``*_draws`` function that takes the random numbers for a whole global batch from the run's
seeded CPU ``torch.Generator`` (so every device, a resumed run and every rank of a multi-process run draw the same)
and an ``apply_*`` function that uses a rank's shard of them on the device. Jitter maps uint8 batches to uint8
batches (the training loop's ``Normalizer`` scales them afterwards); the mixes work on the normalised floats.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from scipy.special import betaincinv

# At colour-jitter strength 1: brightness, contrast and saturation factors in 1 +- 0.4 (torchvision's usual
# ColorJitter(0.4, 0.4, 0.4, ...)), and a hue rotation of up to +-0.1 of a turn (stain colour varies by lab).
COLOUR_SPAN = (0.4, 0.4, 0.4, 0.1)
_LUMA = (0.299, 0.587, 0.114)
# RGB -> YIQ: a hue change is a rotation of the (I, Q) chroma plane, one 3x3 matrix per image
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_RGB_FROM_YIQ = torch.linalg.inv(_YIQ)


def colour_draws(n: int, strength: float, generator: torch.Generator) -> torch.Tensor:
    """(n, 4) per image: brightness, contrast and saturation factors and a hue turn (fraction of a circle)."""
    u = torch.rand(n, 4, generator=generator) * 2 - 1
    f = u * torch.tensor(COLOUR_SPAN) * strength
    return f + torch.tensor([1.0, 1.0, 1.0, 0.0])


def _luma(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_LUMA, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _hue_matrices(turns: torch.Tensor) -> torch.Tensor:
    """(n, 3, 3) RGB -> RGB: to YIQ, rotate (I, Q) by ``turns`` of a circle, back to RGB."""
    angle = turns * 2 * math.pi
    cos, sin, one, zero = angle.cos(), angle.sin(), torch.ones_like(angle), torch.zeros_like(angle)
    rot = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], 1).view(-1, 3, 3)
    return _RGB_FROM_YIQ.to(turns.device) @ rot @ _YIQ.to(turns.device)


def apply_colour_jitter(x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW batch -> uint8: each image's brightness, contrast (about its mean grey), saturation (about its
    grey) and hue changed by its own factors from ``colour_draws``; clipped to [0, 255]."""
    f = draws.to(x.device, non_blocking=True).float()
    b, c, s = (f[:, k].view(-1, 1, 1, 1) for k in range(3))
    y = x.float() * b
    mean = _luma(y).mean(dim=(2, 3), keepdim=True)
    y = (y - mean) * c + mean
    grey = _luma(y)
    y = grey + (y - grey) * s
    y = torch.einsum("nij,njhw->nihw", _hue_matrices(f[:, 3]), y)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def zoom_draws(n: int, strength: float, generator: torch.Generator) -> torch.Tensor:
    """(n,) zoom factors uniform in [1 - strength, 1 + strength] (above 1 magnifies)."""
    return 1 + (torch.rand(n, generator=generator) * 2 - 1) * strength


def apply_scale_jitter(x: torch.Tensor, zoom: torch.Tensor, padding: str = "reflection") -> torch.Tensor:
    """uint8 NCHW batch -> uint8, each image zoomed about its centre by its factor: one batched ``affine_grid`` /
    ``grid_sample`` (bilinear); a zoomed-out image is padded by reflection (no black frame a cell never has)."""
    z = zoom.to(x.device, non_blocking=True).float()
    eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], device=x.device)
    theta = eye.unsqueeze(0) / z.view(-1, 1, 1)  # the translation column stays 0: zoom about the centre
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode=padding, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def mix_draws(n: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """(n, 2) for mixup, (n, 4) for cutmix, uniform in [0, 1): the mixing weight's quantile, the key that pairs
    images (sorted within each rank's shard, so a shard mixes only with itself), and cutmix's box centre."""
    return torch.rand(n, 4 if kind == "cutmix" else 2, generator=generator)


def beta_quantile(u: torch.Tensor, alpha: float) -> torch.Tensor:
    """Beta(alpha, alpha) samples from uniform ``u`` (inverse CDF): torch's Beta takes no generator."""
    return torch.from_numpy(betaincinv(alpha, alpha, u.double().numpy())).float()


def _box_masks(centres: torch.Tensor, lam: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(n, 1, h, w) boolean: a box of area about (1 - lam) h w around each centre (fractions of h and w),
    clipped at the border, so the area kept is what the returned lambda must be computed from."""
    side = (1 - lam).sqrt()
    cy, cx = centres[:, 0] * h, centres[:, 1] * w
    y0, y1 = (cy - side * h / 2).round().clamp(0, h), (cy + side * h / 2).round().clamp(0, h)
    x0, x1 = (cx - side * w / 2).round().clamp(0, w), (cx + side * w / 2).round().clamp(0, w)
    rows = torch.arange(h, device=centres.device).view(1, h, 1)
    cols = torch.arange(w, device=centres.device).view(1, 1, w)
    inside = ((rows >= y0.view(-1, 1, 1)) & (rows < y1.view(-1, 1, 1))
              & (cols >= x0.view(-1, 1, 1)) & (cols < x1.view(-1, 1, 1)))
    return inside.unsqueeze(1)


def apply_mix(x: torch.Tensor, y: torch.Tensor, draws: torch.Tensor, kind: str, alpha: float,
              num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (a convex blend) or cutmix (a box pasted from the partner) of each image with a partner from the
    same batch, per image weight lambda ~ Beta(alpha, alpha); returns the images and the soft targets
    lambda * onehot(y) + (1 - lambda) * onehot(y_partner), each row summing to 1 (cutmix's lambda is the box's
    true area fraction after clipping)."""
    lam = beta_quantile(draws[:, 0], alpha).to(x.device, non_blocking=True)
    partner = draws[:, 1].argsort().to(x.device, non_blocking=True)
    if kind == "mixup":
        weight = lam.view(-1, 1, 1, 1).to(x.dtype)
        mixed = x * weight + x[partner] * (1 - weight)
    else:
        h, w = x.shape[2], x.shape[3]
        box = _box_masks(draws[:, 2:].to(x.device, non_blocking=True), lam, h, w)
        mixed = torch.where(box, x[partner], x)
        lam = 1 - box.sum(dim=(1, 2, 3)).float() / (h * w)
    hot = F.one_hot(y.long(), num_classes).float()
    targets = hot * lam.view(-1, 1) + hot[partner] * (1 - lam).view(-1, 1)
    return mixed.contiguous(memory_format=torch.channels_last), targets
