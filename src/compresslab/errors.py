"""One exception type for bad user input, so callers can tell it from a bug."""


class ConfigError(ValueError):
    """Bad input: the message names the problem and the fix."""
