"""One exception type for everything a user can get wrong: the CLI prints it as one line."""


class BloodcellError(Exception):
    """A user-facing error: bad input, missing files, unknown names. Printed without a traceback."""


def one_line(text: str) -> str:
    """``text`` with control characters escaped (a newline from a CSV cell, say), so a message stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
