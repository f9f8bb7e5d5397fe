"""Errors a user can fix: bad config values, missing or malformed files.

``main.py`` prints a :class:`UserError` as one line naming the field, file or
tensor, and exits with status 2; any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations


class UserError(ValueError):
  """Bad input: the message names the field, file or tensor and the fix."""


class ConfigError(UserError):
  """A config field has a bad value."""


class DataError(UserError):
  """A data file or directory is missing, empty or malformed."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or directory named by the config does not exist."""


def need(ok: bool, field: str, value, what: str) -> None:
  """Raises :class:`ConfigError` ``config.<field>=<value>: <what>`` unless
  ``ok``."""
  if not ok:
    raise ConfigError(f'config.{field}={value!r}: {what}')
