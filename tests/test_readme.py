"""Every ``bloodcell ...`` command shown in the README and docs/ parses with today's CLI (options and choices
exist), so the documentation cannot drift from the code unnoticed."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from bloodcell.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def shown_commands() -> list[tuple[str, str]]:
    """(page:line, command) for each ``bloodcell`` command in a code block or inline code span."""
    out = []
    for page in PAGES:
        in_block = False
        for n, line in enumerate(page.read_text().splitlines(), start=1):
            if line.startswith("```"):
                in_block = not in_block
                continue
            # an inline span ("`bloodcell export --int8`") names a command and options in prose: its options must
            # exist; a code-block line is a whole command and must parse
            candidates = [line] if in_block else [c for c in re.findall(r"`(bloodcell [^`]+)`", line) if " --" in c]
            for c in candidates:
                c = c.split("#", 1)[0].strip()
                if c.startswith("bloodcell ") and "..." not in c:
                    kind = "command" if in_block else "options"
                    out.extend((f"{page.name}:{n}", kind, x) for x in expand(c))
    return out


def expand(command: str) -> list[str]:
    """``[--opt X]`` -> ``--opt X``; ``a|b`` choices -> the first; ``data list | info | audit`` -> three."""
    command = re.sub(r"\[([^\]]*)\]", r"\1", command)
    command = re.sub(r"\bSUITE\b", "paper-table3", command)  # the placeholder of a suite name
    if " | " in command:
        head, *alts = command.split(" | ")
        base = head.rsplit(" ", 1)[0]
        return [head, *[f"{base} {a.strip()}" for a in alts]]
    return [re.sub(r"(\S+?)\|\S+", r"\1", command)]


COMMANDS = shown_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) > 20


@pytest.mark.parametrize("where,kind,command", COMMANDS, ids=[w for w, _, _ in COMMANDS])
def test_documented_command_parses(where, kind, command, capsys):
    args = shlex.split(command)[1:]
    if kind == "options":
        parser = build_parser()
        for word in args:
            sub = parser._subparsers._group_actions[0].choices if parser._subparsers else {}
            if word not in sub:
                break
            parser = sub[word]
        known = {o for a in parser._actions for o in a.option_strings}
        unknown = [w.split("=")[0] for w in args if w.startswith("--") and w.split("=")[0] not in known]
        assert not unknown, f"{where}: '{command}': {parser.prog} has no option {', '.join(unknown)}"
        return
    try:
        build_parser().parse_args(args)
    except SystemExit as e:
        err = capsys.readouterr().err
        assert e.code == 0, f"{where}: '{command}' does not parse: {err.strip()}"


def test_no_page_keeps_an_unfilled_placeholder():
    """A figure left as ``@@NAME@@`` by a draft is a page that claims a measurement it does not give."""
    left = [f"{p.name}:{n}" for p in PAGES for n, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"@@[A-Z0-9_]+@@", line)]
    assert not left, f"unfilled placeholders at {', '.join(left)}"
