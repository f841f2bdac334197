"""What the command modules share: option helpers, argument types and the text table. No torch here."""

from __future__ import annotations

import argparse
import json
import sys

from bloodcell.choices import CHECKPOINTS, DEVICES, PRECISIONS, SIZES, SPLITS
from bloodcell.errors import BloodcellError, one_line

DATA_HELP = "a prepared dataset's name, or a MedMNIST-format .npz file (default: %(default)s)"
DIR_HELP = "folder of prepared datasets (default: $BLOODCELL_DATA_DIR, else the user cache folder)"
PRECISION_HELP = ("'bf16'/'fp16': train under autocast (weights stay fp32; validation and tests run in fp32; fp16 "
                  "with a gradient scaler). On a CPU, bf16 is about 3x faster for large models on CPUs with AMX or "
                  "AVX-512 BF16 and much slower on CPUs without them; see benchmarks/model_throughput.py "
                  "(default: %(default)s)")
DEVICE_HELP = "where the model runs: 'auto' = cuda, then mps, then cpu (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, like every other bloodcell error (usage stays in --help)."""

    def error(self, message: str):  # noqa: D401 - argparse's API
        print(f"bloodcell: error: {self.prog}: {one_line(message)} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def _number(text: str, cast, what: str, ok, bound: str):
    """``text`` as a number that ``ok`` accepts, or the argparse error naming what was wrong."""
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, "a whole number", lambda v: v >= 1, "at least 1")


def non_negative_int(text: str) -> int:
    return _number(text, int, "a whole number", lambda v: v >= 0, "0 or more")


def positive_float(text: str) -> float:
    return _number(text, float, "a number", lambda v: 0 < v < float("inf"), "a positive number")


def non_negative_float(text: str) -> float:
    return _number(text, float, "a number", lambda v: 0 <= v < float("inf"), "a number >= 0")


def unit_interval(text: str) -> float:
    return _number(text, float, "a number", lambda v: 0 < v <= 1, "in (0, 1]")


def fraction(text: str) -> float:
    return _number(text, float, "a number", lambda v: 0 <= v <= 1, "in [0, 1]")


def fraction_below_one(text: str) -> float:
    return _number(text, float, "a number", lambda v: 0 <= v < 1, "in [0, 1)")


def add_data_args(p: argparse.ArgumentParser, default: str | None = "bloodmnist") -> None:
    p.add_argument("--data", default=default,
                   help=DATA_HELP if default else "a prepared dataset's name, or a MedMNIST-format .npz file")
    p.add_argument("--size", type=int, default=64, choices=SIZES, help="image size in pixels (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help=DIR_HELP)


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)


def add_precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)


def add_checkpoint_arg(p: argparse.ArgumentParser, what: str = "use") -> None:
    p.add_argument("--checkpoint", choices=CHECKPOINTS, default="best",
                   help=f"weights to {what}: 'best' = the epoch with the highest validation accuracy, 'last' = the "
                        "final epoch (default: %(default)s)")


def add_split_arg(p: argparse.ArgumentParser, what: str = "evaluate on") -> None:
    p.add_argument("--split", choices=SPLITS, default="test",
                   help=f"which split of the run's dataset to {what} (default: %(default)s)")


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all cores)")


def add_max_pixels_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="refuse image files with more than N pixels, a guard against decompression bombs "
                        "(default: 178,956,970, PIL's limit; images over half of it get a warning; 0 = no limit)")


def apply_max_pixels(a: argparse.Namespace) -> None:
    """Set the decoder's pixel limit for this command (the default when not given, so calls never leak)."""
    from bloodcell.data.images import DEFAULT_MAX_PIXELS, set_max_pixels

    n = getattr(a, "max_pixels", None)
    if n is not None and n < 0:
        raise BloodcellError(f"--max-pixels must be 0 (no limit) or positive, not {n}")
    set_max_pixels(DEFAULT_MAX_PIXELS if n is None else (n or None))


def parse_model_args(items: list[str] | None) -> dict:
    """``--model-arg KEY=VALUE`` pairs; values are JSON when they parse as JSON, else strings."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BloodcellError(f"--model-arg '{item}' is not KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def text_table(header: list[str], rows: list[list]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:>{w}}}" if i else f"{{:<{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*map(str, r)) for r in [header, *rows])


def require(value, option: str) -> None:
    if not value:
        raise BloodcellError(f"give {option}")
