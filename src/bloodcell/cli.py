"""The ``bloodcell`` command line: a thin layer over the package's functions.

Building the parser imports no torch (the command modules import it inside their functions), so ``--help``
answers at once; every user error is one line on stderr, never a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

from bloodcell import __version__
from bloodcell.commands import MODULES
from bloodcell.commands.common import Parser
from bloodcell.errors import BloodcellError, one_line


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
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # for commands that relaunch themselves
    if extra:  # commands taking files (explain) accept them after options too: `explain RUN --out D a.png`
        if getattr(args, "paths", None) is not None and not any(x.startswith("-") for x in extra):
            args.paths = [*args.paths, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except BloodcellError as e:
        return _fail(e)
    except KeyboardInterrupt:
        print("\nbloodcell: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # a file the user named cannot be read or written: say which, no traceback
        return _fail(f"{e.filename}: {e.strerror or e}" if e.filename else (e.strerror or str(e)))
    except Exception as e:  # a bug: one line for the user, the traceback on request
        if os.environ.get("BLOODCELL_DEBUG"):
            raise
        print(f"bloodcell: internal error: {one_line(f'{type(e).__name__}: {e}')} (please report it; set "
              "BLOODCELL_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 3


def _fail(message) -> int:
    print(f"bloodcell: error: {one_line(message)}", file=sys.stderr)
    return 2
