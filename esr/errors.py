"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class EsrError(Exception):
    """A user-facing error: bad input, missing resource, unreachable hub.

    The message must fit on one line and say what to do about it; the CLI prints it without a
    traceback. Anything else that escapes is a bug and keeps its traceback.
    """
