"""The one exception type users see: a clear, one-line message naming the problem."""


class HeadslimError(Exception):
    """A user-facing error; the CLI prints ``headslim: error: <message>`` and exits with 2."""
