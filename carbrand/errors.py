"""User-facing errors: each one is printed as a single line by the CLI, never as a traceback."""


class CarbrandError(Exception):
    """A problem the user can fix (bad input, missing file). Exit code 1."""

    exit_code = 1


class UsageError(CarbrandError):
    """A bad command line or config value. Exit code 2, as argparse uses."""

    exit_code = 2


class ConfigError(UsageError):
    """A config key that is unknown, of the wrong type, or holds an impossible value."""


class DataError(CarbrandError):
    """A dataset, manifest or image that cannot be used as given."""


def first_line(error: BaseException | str, limit: int = 200) -> str:
    """The first non-empty line of an error's text (or its type name), at most `limit` characters.

    Library errors often add source excerpts, advice or whole tracebacks after the first
    line; a one-line message keeps only what names the problem.
    """
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    fallback = type(error).__name__ if isinstance(error, BaseException) else "error"
    return (lines[0] if lines else fallback)[:limit]
