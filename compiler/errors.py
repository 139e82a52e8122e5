"""User-facing errors.

Anything a user can trigger with bad input raises ``OnnxpressError`` with one line
that names the problem and the fix; the CLI prints that line and exits 2, with no
traceback.
"""


class OnnxpressError(Exception):
    """A problem with the user's input: the message says what is wrong and how to fix it."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name when it has none), for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(": ") if text else type(exc).__name__
