"""User-facing errors.

Anything a user can trigger with bad input raises ``OnnxpressError`` with one line
that names the problem and the fix; the CLI prints that line and exits 2, with no
traceback.
"""


class OnnxpressError(Exception):
    """A problem with the user's input: the message says what is wrong and how to fix it."""
