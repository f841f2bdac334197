"""The ``bloodcell`` command line: a thin layer over the package's functions.

Building the parser imports no torch (the command modules import it inside their functions), so ``--help``
answers at once; every user error is one line on stderr, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

from bloodcell import __version__
from bloodcell.commands import MODULES
from bloodcell.commands.common import Parser
from bloodcell.errors import BloodcellError


def build_parser() -> Parser:
    p = Parser(prog="bloodcell",
               description="Train, evaluate, explain and use efficient classifiers for microscope images of blood "
                           "cells. 'bloodcell COMMAND --help' explains each command and option.")
    p.add_argument("--version", action="version", version=f"bloodcell {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for name in MODULES:
        importlib.import_module(f"bloodcell.commands.{name}").add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BloodcellError as e:
        print(f"bloodcell: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nbloodcell: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # a file the user named cannot be read or written: say which, no traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"bloodcell: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
