"""benchmarks/inference_engines.py's full-size JPEGs: the predict study rebuilds the PBC originals' size from the
cropped files here, so what it measures is decoding at the size the issue names."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_rebuilt_full_size_jpegs_keep_the_centre_and_the_jpeg_settings(tmp_path):
    import inference_engines as ie

    rng = np.random.default_rng(0)
    src = tmp_path / "ig" / "IG_1.jpg"
    src.parent.mkdir()
    pixels = rng.integers(0, 256, (219, 216, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(src, quality=75, subsampling=0)
    (out,) = ie.rebuild_full_size([src], tmp_path, 360, 363)
    assert out.name == "ig_IG_1.jpg"
    with Image.open(src) as a, Image.open(out) as b:
        assert b.size == (360, 363) and b.format == "JPEG"
        assert b.quantization == a.quantization  # the source's tables, not PIL's default quality
        centre = np.asarray(b.convert("RGB"), np.int16)[72:72 + 219, 72:72 + 216]
        # re-encoding moves pixels a little, but the centre is the source image
        assert np.abs(centre - np.asarray(a.convert("RGB"), np.int16)).mean() < 12
    assert ie.describe_sizes([out]).startswith("360x363 px, ")


def test_full_size_option():
    import inference_engines as ie

    assert ie.full_size("360x363") == (360, 363) and ie.full_size("0") is None
    for bad in ("360", "axb", "0x10"):
        with pytest.raises(argparse.ArgumentTypeError, match="WxH"):
            ie.full_size(bad)
