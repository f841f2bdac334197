"""Decoding image files of any common mode into 8-bit RGB, with one-line reasons for failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp"}


class ImageDecodeError(ValueError):
    """A file that is not a usable image; the message says why."""


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit/32-bit grayscale: scale the full range to 8 bits (PIL's convert would clip at 255).
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA"):
        # Transparent pixels become white, like the bright background of a smear.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def load_rgb(path: str | Path) -> Image.Image:
    """Open and fully decode ``path`` as an RGB image, or raise ImageDecodeError with the reason."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.width < 1 or img.height < 1:
                raise ImageDecodeError("image has zero size")
            return _to_rgb(img)
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError("is a directory") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image file PIL can read") from None
    except ImageDecodeError:
        raise
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
        raise ImageDecodeError(f"cannot decode image ({e})") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(str(e)) from None


def list_image_files(paths: list[str | Path]) -> list[Path]:
    """Expand folders (recursively, sorted) into image files; plain file arguments are kept as given."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out
