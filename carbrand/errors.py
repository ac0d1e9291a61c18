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
