"""One exception type for everything a user can get wrong: the CLI prints it as one line."""


class BloodcellError(Exception):
    """A user-facing error: bad input, missing files, unknown names. Printed without a traceback."""
