"""The errors a user can cause. The CLI prints them as one line and exits with status 2."""


class DistillError(Exception):
    """Bad input: the message names the bad thing and what was expected."""


class ConfigError(DistillError):
    """An invalid configuration key or value."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class DataError(DistillError):
    """Unreadable, missing or inconsistent data."""


class TeacherError(DistillError):
    """A teacher folder that is missing or cannot be loaded."""
