"""The one exception type users see: a clear one-line message, exit code 2 from the CLI."""


class DesteinError(Exception):
    """Bad input or an impossible request, explained in one line.

    The CLI prints ``error: <message>`` and exits with status 2; library callers catch it
    like any other exception. Raise it for anything a user can fix (a malformed file, an
    unknown model, a vector file for another model); let real bugs raise what they raise.
    """


def reason(exc: BaseException, limit: int = 200) -> str:
    """The first line of a library's exception, for quoting inside a one-line error."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
