"""The one exception type users see: a clear, one-line message naming the problem."""


class HeadslimError(Exception):
    """A user-facing error; the CLI prints ``headslim: error: <message>`` and exits with 2."""


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (its type's name when empty), at most 300 characters: what a
    one-line :class:`HeadslimError` quotes of an error raised by another library.

    Example:
        >>> first_line(ValueError("bad shape\\n  traceback detail"))
        'bad shape'
    """
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]
