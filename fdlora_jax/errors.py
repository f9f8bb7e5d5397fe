"""Errors a user can fix: bad config values, missing or malformed files.

The command lines (``main.py``, ``fdlora_jax.suite``, ``fdlora_jax.report``)
print a :class:`UserError` as one line naming the field, file or tensor, and
exit with status 2 (:func:`exit_on_user_error`); any other exception is a
bug and keeps its traceback. Flags are checked the same way before ``main``
runs (:func:`parse_flags`, :func:`config_override_errors`): a value that does
not parse, or a ``--config.<path>`` override that names no field.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import os
import re
import sys
from typing import Iterator, NoReturn, Optional, Sequence


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


# ---------------------------------------------------------------------------
# Command-line flags
# ---------------------------------------------------------------------------
def field_names(config, prefix: str = '') -> list[str]:
  """Every dotted field name of a ConfigDict, groups included
  (``fl``, ``fl.rounds``, ...)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  names = []
  for key, value in config.items():
    names.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      names += field_names(value, f'{prefix}{key}.')
  return names


def no_such_field(path: str, config) -> Optional[str]:
  """``'config.<path>: no such field (did you mean ...?)'`` when the dotted
  ``path`` names no field of ``config``, else None."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  node = config
  for part in path.split('.'):
    if '[' in part:              # an index (ml_collections' a.b[0]): not ours
      return None
    if isinstance(node, ml_collections.ConfigDict):
      if part not in node:
        break
      node = node[part]
    elif isinstance(node, (bool, int, float, str)):
      break                      # a value has no fields
    else:
      return None                # e.g. a dataclass: ml_collections decides
  else:
    return None
  names = field_names(config)
  close = (difflib.get_close_matches(path, names, n=3, cutoff=0.8)
           or [n for n in names            # e.g. rounds: fl.rounds
               if n.rsplit('.', 1)[-1] == path.rsplit('.', 1)[-1]][:3])
  hint = (f'did you mean {" or ".join(close)}?' if close
          else 'no close match')
  return f'config.{path}: no such field ({hint})'


def config_file(argv: Sequence[str], name: str,
                default: Optional[str]) -> str:
  """The file ``--<name>`` names in ``argv`` (or ``default``), without a
  ``:arg`` suffix, as ml_collections loads it."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  probe = flags.FlagValues()     # where --<name> points, as absl reads it
  flags.DEFINE_string(name, default, '', flag_values=probe)
  try:
    probe(list(argv), known_only=True)
  except flags.Error:
    return default or ''
  return (probe[name].value or '').split(':', 1)[0]


def check_config_file(argv: Sequence[str], name: str,
                      default: Optional[str]) -> None:
  """:func:`fail` naming the file when ``--<name>`` names a config file that
  does not exist (ml_collections would raise from deep inside absl)."""
  path = config_file(argv, name, default)
  if path and not os.path.isfile(path):
    fail(f'--{name}={path}: no such config file')


def _bad_override(argv: Sequence[str], name: str,
                  default: Optional[str]) -> Optional[str]:
  """The message for the first ``--<name>.<path>`` in ``argv`` that names no
  field of the config file it overrides; None if there is none, or if the
  config file does not load (absl reports that itself)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  probe = flags.FlagValues()     # where --<name> points, as absl reads it
  flags.DEFINE_string(name, default, '', flag_values=probe)
  try:
    probe(list(argv), known_only=True)
    # 'file.py' or 'file.py:arg', as ml_collections loads it.
    path, *args = probe[name].value.split(':', 1)
    spec = importlib.util.spec_from_file_location(f'_{name}_file', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(*args)
  except Exception:  # pylint: disable=broad-except
    return None
  pattern = re.compile(rf'-{{1,2}}(no)?{re.escape(name)}\.([^=]+)')
  for arg in argv:
    match = pattern.match(arg)
    message = match and no_such_field(match.group(2), config)
    if message:
      return message
  return None


@contextlib.contextmanager
def config_override_errors(name: str = 'config',
                           default: Optional[str] = None) -> Iterator[None]:
  """Around ``config_flags.DEFINE_config_file(name, default, ...)`` and the
  flag parsing: a ``--<name>.<path>`` override that names no field of the
  config (ml_collections raises AttributeError or KeyError from inside absl,
  a long traceback) becomes :func:`fail` naming the field and the nearest
  valid names. Needed at both: without ``--<name>=`` on the command line,
  ml_collections loads the default config and its overrides when the flag is
  defined."""
  check_config_file(sys.argv, name, default)
  try:
    yield
  except (AttributeError, KeyError):
    message = _bad_override(sys.argv, name, default)
    if message is None:
      raise
    fail(message)


def parse_flags(argv: Sequence[str], config: Optional[str] = None,
                config_default: Optional[str] = None):
  """``app.run``'s ``flags_parser``: a flag that does not parse (absl prints
  two ``FATAL`` lines and exits with 1) becomes :func:`fail`; with
  ``config``, the name of a ``DEFINE_config_file`` flag, a misspelled
  override too (:func:`config_override_errors`)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if config:
    check_config_file(argv, config, config_default)
  guard = (config_override_errors(config, config_default) if config
           else contextlib.nullcontext())
  try:
    with guard:
      return flags.FLAGS(list(argv))
  except flags.Error as e:
    fail(e)
