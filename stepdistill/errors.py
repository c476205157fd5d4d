"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """A mistake in what the user asked for (bad config, missing file, ...), reported without a traceback."""


class ConfigError(UserError):
    """An unknown config key, a value of the wrong type, or an invalid combination of values."""


class DataError(UserError):
    """A data source that cannot be read or holds nothing usable."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors can span many lines), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
