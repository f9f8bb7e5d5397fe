"""Errors a user can fix: bad config values, missing or malformed files.

The command lines (``main.py``, ``fdlora_jax.suite``, ``fdlora_jax.report``)
print a :class:`UserError` as one line naming the field, file or tensor, and
exit with status 2 (:func:`exit_on_user_error`); any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator, NoReturn


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


def fail(message) -> NoReturn:
  """Prints ``error: <message>`` on one line to stderr and exits with 2."""
  print('error: ' + ' '.join(str(message).split()), file=sys.stderr)
  sys.exit(2)


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
  """A command line's body: a :class:`UserError` raised inside becomes
  :func:`fail`; anything else propagates with its traceback."""
  try:
    yield
  except UserError as e:
    fail(e)
