"""Image corruptions that microscope images really suffer, at five severities, on whole uint8 NCHW batches.

Why our own: imagecorruptions 1.1.2 (last released 2020) calls scikit-image's ``gaussian(..., multichannel=True)``,
which the scikit-image installed here (0.26) no longer accepts, and MedMNIST-C (``medmnistc`` 0.1.0) needs Wand and
ImageMagick and would downgrade medmnist and scikit-image; both also work one image at a time. These follow
ImageNet-C's and MedMNIST-C's kinds with parameters for blood-smear crops (spatial ones given for 64 px and
scaled with the image size), built from torchvision's batched functional transforms and ``grid_sample``.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from bloodcell.choices import CORRUPTIONS
from bloodcell.errors import BloodcellError

SEVERITIES = (1, 2, 3, 4, 5)
# severity 1..5 parameters; spatial ones in pixels at 64 px
PARAMS: dict[str, tuple] = {
    "gaussian_blur": (0.5, 0.75, 1.0, 1.5, 2.0),  # sigma
    "defocus_blur": (1.0, 1.5, 2.0, 2.5, 3.0),  # disk radius
    "gaussian_noise": (0.02, 0.04, 0.06, 0.09, 0.12),  # std, in [0, 1] units
    "brightness_up": (1.1, 1.2, 1.3, 1.45, 1.6),  # factor
    "brightness_down": (0.9, 0.8, 0.7, 0.6, 0.5),
    "contrast_up": (1.2, 1.4, 1.6, 1.8, 2.0),
    "contrast_down": (0.8, 0.65, 0.5, 0.4, 0.3),
    "hue": (0.02, 0.04, 0.06, 0.08, 0.1),  # shift as a fraction of the hue circle (0.1 = 36 degrees)
    "saturation": (0.8, 0.65, 0.5, 0.35, 0.2),  # factor (paler stain)
    "jpeg": (75, 50, 30, 20, 10),  # quality
    "rotation": (5, 10, 15, 20, 30),  # degrees, alternating sign per image
    "zoom_in": (1.05, 1.1, 1.15, 1.2, 1.3),  # magnification
    "zoom_out": (0.95, 0.9, 0.85, 0.8, 0.7),
}
assert tuple(PARAMS) == CORRUPTIONS


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255)


def _uint8(x: torch.Tensor) -> torch.Tensor:
    return x.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def _disk_blur(x: torch.Tensor, radius: float) -> torch.Tensor:
    r = math.ceil(radius)
    yy, xx = torch.meshgrid(torch.arange(-r, r + 1.0), torch.arange(-r, r + 1.0), indexing="ij")
    # soft edge over one pixel, so radius 1.5 differs from 1 and 2
    k = (radius + 0.5 - (yy**2 + xx**2).sqrt()).clamp(0, 1)
    k = (k / k.sum()).to(x.device, x.dtype)
    c = x.shape[1]
    return F.conv2d(F.pad(x, (r, r, r, r), mode="reflect"), k.expand(c, 1, -1, -1), groups=c)


def _affine(x: torch.Tensor, angle_deg: torch.Tensor, scale: float) -> torch.Tensor:
    """Rotate each image by its angle and magnify by ``scale`` about the centre; borders reflect."""
    a = angle_deg.to(x.device, x.dtype) * math.pi / 180
    cos, sin = torch.cos(a) / scale, torch.sin(a) / scale
    zero = torch.zeros_like(a)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """``images`` (uint8 NCHW) with corruption ``name`` at ``severity`` 1-5, as uint8 NCHW."""
    if name not in PARAMS:
        raise BloodcellError(f"unknown corruption '{name}' ({', '.join(CORRUPTIONS)})")
    if severity not in SEVERITIES:
        raise BloodcellError(f"corruption severity must be 1-5, got {severity}")
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise BloodcellError(f"corruptions take uint8 NCHW batches, got {images.dtype} of shape {tuple(images.shape)}")
    p = PARAMS[name][severity - 1]
    scale = images.shape[-1] / 64
    if name == "jpeg":
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its JPEG codec in favour of TorchCodec
            warnings.simplefilter("ignore", DeprecationWarning)
            return TF.jpeg(images.contiguous(), int(p))
    x = _float(images)
    if name == "gaussian_blur":
        s = p * scale
        k = 2 * math.ceil(3 * s) + 1
        x = TF.gaussian_blur(x, [k, k], [s, s])
    elif name == "defocus_blur":
        x = _disk_blur(x, p * scale)
    elif name == "gaussian_noise":
        g = torch.Generator().manual_seed(seed)
        x = x + p * torch.randn(x.shape, generator=g).to(x.device)
    elif name.startswith("brightness"):
        x = TF.adjust_brightness(x, p)
    elif name.startswith("contrast"):
        x = TF.adjust_contrast(x, p)
    elif name == "hue":
        x = TF.adjust_hue(x, p)
    elif name == "saturation":
        x = TF.adjust_saturation(x, p)
    elif name == "rotation":
        sign = 1 - 2 * (torch.arange(len(x)) % 2)
        x = _affine(x, sign * float(p), 1.0)
    else:  # zoom_in, zoom_out
        x = _affine(x, torch.zeros(len(x)), float(p))
    return _uint8(x.clamp(0, 1))
