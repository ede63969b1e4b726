"""Errors that carry a message meant for the user (the CLI prints them without a traceback)."""


class VlpromptError(Exception):
    """Base class: a problem the user can fix (bad file, bad config, missing weights)."""


class ConfigError(VlpromptError, ValueError):
    """A config key or value is wrong."""


class DataError(VlpromptError, ValueError):
    """An annotation or media file is missing, unreadable or malformed."""


class WeightsUnavailableError(VlpromptError, RuntimeError):
    """Pretrained weights cannot be found locally or downloaded."""
