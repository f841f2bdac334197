"""Decoding image files of any common mode into 8-bit RGB, with one-line reasons for failures.

Decompression bombs: an image over the pixel limit (``set_max_pixels``, the CLI's ``--max-pixels``) is refused
per file before its pixels are decoded. The default is PIL's own: it refuses images over 2 x
``PIL.Image.MAX_IMAGE_PIXELS`` = 178,956,970 pixels (about 537 MB as RGB). Images over half the limit are
decoded, with a one-line warning naming the file.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from bloodcell.errors import BloodcellError
from bloodcell.io import warn

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp"}
DEFAULT_MAX_PIXELS = 178_956_970  # PIL's default refusal limit, 2 * int(1024 * 1024 * 1024 // 4 // 3)
_max_pixels: int | None = DEFAULT_MAX_PIXELS


class ImageDecodeError(ValueError):
    """A file that is not a usable image; the message says why."""


def set_max_pixels(n: int | None) -> None:
    """Refuse images of more than ``n`` pixels (None: no limit), in this process and PIL.

    Worker processes must call it too (pass ``get_max_pixels()`` to a pool initializer): a spawned process
    starts with the default.
    """
    global _max_pixels
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
        raise BloodcellError(f"--max-pixels must be a positive whole number of pixels, got {n!r}")
    _max_pixels = None if n is None else int(n)
    # PIL refuses above 2 * MAX_IMAGE_PIXELS: half of n, rounded up, so PIL never refuses what we allow (load_rgb
    # checks the exact limit); the default n gives back PIL's own 89,478,485.
    Image.MAX_IMAGE_PIXELS = None if n is None else (int(n) + 1) // 2


def get_max_pixels() -> int | None:
    return _max_pixels


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit/32-bit grayscale: scale the full range to 8 bits (PIL's convert would clip at 255).
        arr = np.asarray(img).astype(np.float64)
        if not np.isfinite(arr).all():
            raise ImageDecodeError("image has NaN or infinite pixel values")
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


def _too_large(pixels: int | None) -> str:
    n = f"{pixels:,} pixels" if pixels is not None else "too many pixels"
    limit = f"{_max_pixels:,}" if _max_pixels is not None else "PIL's"
    return f"image has {n}, over the --max-pixels limit of {limit} (a decompression bomb?)"


def _pixels_in(e: Exception) -> int | None:
    m = re.search(r"\((\d+) pixels\)", str(e))
    return int(m.group(1)) if m else None


def load_rgb(path: str | Path) -> Image.Image:
    """Open and fully decode ``path`` as an RGB image, or raise ImageDecodeError with the reason."""
    path = Path(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            # PIL's own two-line DecompressionBombWarning is replaced by the one bloodcell line below; any other
            # warning while decoding (corrupt EXIF, a truncated read) becomes one bloodcell line naming the file
            warnings.simplefilter("always")
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                return _open_rgb(path)
            finally:
                for w in caught:
                    text = str(w.message).strip()
                    warn(f"{path}: {text.splitlines()[0] if text else w.category.__name__}")
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError("is a directory") from None
    except PermissionError:
        raise ImageDecodeError("permission denied") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image file PIL can read") from None
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(_too_large(_pixels_in(e))) from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
        raise ImageDecodeError(f"cannot decode image ({e})") from None
    except MemoryError:
        raise ImageDecodeError("not enough memory to decode it (lower --max-pixels to refuse such files)") from None


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        pixels = img.width * img.height
        if _max_pixels is not None and pixels > _max_pixels:
            raise ImageDecodeError(_too_large(pixels))
        if _max_pixels is not None and pixels > _max_pixels / 2:
            mb = pixels * (len(img.getbands()) + 3) / 2**20
            warn(f"{path}: {pixels:,} pixels is large (over half the --max-pixels limit of "
                 f"{_max_pixels:,}); decoding it needs ~{mb:,.0f} MB")
        img.load()
        if img.width < 1 or img.height < 1:
            raise ImageDecodeError("image has zero size")
        return _to_rgb(img)


def list_image_files(paths: list[str | Path]) -> list[Path]:
    """Expand folders (recursively, sorted) into image files; plain file arguments are kept as given."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out
