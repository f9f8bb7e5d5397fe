"""Run outputs: orbax run-state checkpoints, metrics.jsonl, TensorBoard event
files (written directly, no TensorFlow), results.json.

Workdir layout::

  workdir/config.json        the resolved config
  workdir/partition.json     per client, per class counts (data module)
  workdir/metrics.jsonl      one JSON line per phase repeat / round
  workdir/events.out.tfevents.*   scalars for TensorBoard
  workdir/results.json       final metrics of every evaluated adapter
  workdir/checkpoints/<step>/     orbax: the whole run state
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from fdlora_jax import sharding
from fdlora_jax.errors import ConfigError

PyTree = Any


# ---------------------------------------------------------------------------
# Run-state checkpoints (orbax)
# ---------------------------------------------------------------------------
class StateCheckpoints:
  """Saves the run state after a round; restores the newest one.

  The state is a pytree of arrays (see :mod:`fdlora_jax.fl.api`); a step
  number is the number of repeats completed over all training phases.
  ``min_interval_s`` > 0 skips a save that comes sooner than that after the
  previous one, unless forced (the caller forces the last repeat of each
  phase): an orbax save costs about 0.1 s however small the state, most of
  a tiny CPU round. A killed run then resumes from the last save and redoes
  at most ``min_interval_s`` of rounds, to the same results. Under
  ``jax.distributed`` process 0's clock decides for every process (a save is
  a collective: one process saving alone would wait for the others forever).
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2,
               min_interval_s: float = 0.0):
    self.directory = Path(directory).absolute()
    self.min_interval_s = float(min_interval_s)
    self._last_save = None
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: PyTree, force: bool = True) -> bool:
    """Saves ``state`` as ``step`` unless it is not forced and comes within
    ``min_interval_s`` of the previous save; returns whether it saved."""
    now = time.monotonic()
    skip = (not force and self._last_save is not None
            and now - self._last_save < self.min_interval_s)
    if not force and self.min_interval_s > 0:
      skip = sharding.same_on_every_process(skip)
    if skip:
      return False
    state = sharding.globalize(state)      # jax.distributed: one checkpoint
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self.manager.wait_until_finished()
    self._last_save = time.monotonic()
    return True

  def restore(self, like: PyTree, step: Optional[int] = None) -> PyTree:
    """Restores into the structure, shapes and dtypes of ``like``."""
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            sharding.globalize(like))
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    self.manager.close()


# ---------------------------------------------------------------------------
# TensorBoard event files without TensorFlow
# ---------------------------------------------------------------------------
def _crc32c_table():
  poly, table = 0x82F63B78, []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ poly if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  c = 0xFFFFFFFF
  for b in data:
    c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    out.append(b | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
  return _varint((num << 3) | wire) + payload


def _bytes_field(num: int, data: bytes) -> bytes:
  return _field(num, 2, _varint(len(data)) + data)


def _event(wall_time: float, step: int = 0, file_version: str = '',
           scalars: Optional[dict[str, float]] = None) -> bytes:
  """An ``tensorflow.Event`` protobuf, encoded by hand."""
  msg = _field(1, 1, struct.pack('<d', wall_time))
  msg += _field(2, 0, _varint(step))
  if file_version:
    msg += _bytes_field(3, file_version.encode())
  if scalars:
    summary = b''
    for tag, value in scalars.items():
      v = _bytes_field(1, tag.encode()) + _field(2, 5,
                                                struct.pack('<f', value))
      summary += _bytes_field(1, v)
    msg += _bytes_field(5, summary)
  return msg


def _record(data: bytes) -> bytes:
  header = struct.pack('<Q', len(data))
  return (header + struct.pack('<I', _masked_crc(header)) + data
          + struct.pack('<I', _masked_crc(data)))


class EventWriter:
  """Writes scalar summaries TensorBoard reads (``tensorboard --logdir``)."""

  def __init__(self, logdir: str | os.PathLike):
    Path(logdir).mkdir(parents=True, exist_ok=True)
    name = (f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}'
            f'.{os.getpid()}')
    self.path = Path(logdir) / name
    self._f = open(self.path, 'ab')
    self._f.write(_record(_event(time.time(), file_version='brain.Event:2')))
    self._f.flush()

  def scalars(self, step: int, values: dict[str, float]) -> None:
    clean = {k: float(v) for k, v in values.items()
             if v is not None and np.isfinite(v)}
    if clean:
      self._f.write(_record(_event(time.time(), step, scalars=clean)))
      self._f.flush()

  def close(self) -> None:
    self._f.close()


def read_events(path: str | os.PathLike) -> list[tuple[int, dict[str, float]]]:
  """Parses the scalar events of a file (checks every CRC). For tests."""
  data, out, pos = Path(path).read_bytes(), [], 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (n,) = struct.unpack('<Q', header)
    if struct.unpack('<I', data[pos + 8:pos + 12])[0] != _masked_crc(header):
      raise ValueError(f'{path}: bad length CRC at byte {pos}')
    body = data[pos + 12:pos + 12 + n]
    if struct.unpack('<I', data[pos + 12 + n:pos + 16 + n])[0] != \
        _masked_crc(body):
      raise ValueError(f'{path}: bad data CRC at byte {pos}')
    pos += 16 + n
    out.append(_parse_event(body))
  return [e for e in out if e[1]]


def _read_varint(b: bytes, i: int) -> tuple[int, int]:
  shift = result = 0
  while True:
    byte = b[i]
    result |= (byte & 0x7F) << shift
    i += 1
    if not byte & 0x80:
      return result, i
    shift += 7


def _fields(b: bytes):
  i = 0
  while i < len(b):
    key, i = _read_varint(b, i)
    num, wire = key >> 3, key & 7
    if wire == 0:
      val, i = _read_varint(b, i)
    elif wire == 1:
      val, i = b[i:i + 8], i + 8
    elif wire == 5:
      val, i = b[i:i + 4], i + 4
    else:
      n, i = _read_varint(b, i)
      val, i = b[i:i + n], i + n
    yield num, val


def _parse_event(body: bytes) -> tuple[int, dict[str, float]]:
  step, scalars = 0, {}
  for num, val in _fields(body):
    if num == 2:
      step = val
    elif num == 5:
      for _, value in _fields(val):
        fields = dict(_fields(value))
        scalars[fields[1].decode()] = struct.unpack('<f', fields[2])[0]
  return step, scalars


# ---------------------------------------------------------------------------
# Resuming: the same experiment, or a refusal
# ---------------------------------------------------------------------------
def check_resumable(saved_path: Path, config, allowed: tuple[str, ...] = (),
                    ignored: tuple[str, ...] = ()) -> None:
  """Refuses to resume a workdir whose saved config (``saved_path``,
  config.json) differs from ``config`` in a field that shapes the state:
  any field but those starting with one of ``allowed`` (named in the
  message as what may change) or ``ignored`` (never read by this run)."""
  if not saved_path.is_file():
    raise ConfigError(f'{saved_path.parent} has checkpoints but no '
                     f'config.json; cannot check it is the same experiment')
  details = config_changes(json.loads(saved_path.read_text()), config,
                           allowed + ignored)
  if details:
    raise ConfigError(
        f'{saved_path.parent} holds a run with a different config ({details}'
        f'); use a new --workdir, or change only {", ".join(allowed)} when '
        f'resuming')


def config_changes(saved: dict, config, allowed: tuple[str, ...] = (),
                   defaults=None) -> str:
  """``'field: old -> new, ...'`` (at most 6) for the fields of ``config``
  (a ConfigDict) that differ from the ``saved`` config dict, ignoring those
  starting with any of ``allowed``; ``''`` when none does. With
  ``defaults`` (a ConfigDict), a field the saved config lacks (added to the
  code since) is no change while ``config`` holds its default value."""
  # Both as results.json writes them (non-finite floats as strings).
  flat = lambda c: _flatten(to_jsonable(json.loads(c.to_json_best_effort())))
  saved = _flatten(to_jsonable(saved))
  now = flat(config)
  default = flat(defaults) if defaults is not None else {}
  changed = sorted(k for k in set(saved) | set(now)
                   if saved.get(k) != now.get(k)
                   and not (allowed and k.startswith(allowed))
                   and not (k not in saved and k in default
                            and default[k] == now.get(k)))
  return ', '.join(f'{k}: {saved.get(k)!r} -> {now.get(k)!r}'
                   for k in changed[:6]) + (' ...' if len(changed) > 6 else '')


def _flatten(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


# ---------------------------------------------------------------------------
# metrics.jsonl and results.json
# ---------------------------------------------------------------------------
class MetricsLog:
  """Appends one JSON object per line. Training lines carry ``step`` (the
  checkpoint step they lead to). On resume from step ``s``, lines past ``s``
  and the final lines are dropped, so a resumed run's log equals an
  uninterrupted one's."""

  def __init__(self, path: str | os.PathLike, resume_step: Optional[int]):
    self.path = Path(path)
    if not resume_step:
      self.path.write_text('')
    elif self.path.exists():
      kept = [line for line in self.path.read_text().splitlines()
              if line and 0 < json.loads(line).get('step', 0) <= resume_step]
      self.path.write_text(''.join(line + '\n' for line in kept))

  def write(self, record: dict) -> None:
    with open(self.path, 'a') as f:
      f.write(json.dumps(to_jsonable(record)) + '\n')

  def records(self) -> list[dict]:
    return [json.loads(line) for line in self.path.read_text().splitlines()
            if line]


def to_jsonable(x):
  if isinstance(x, dict):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if isinstance(x, (np.ndarray, jax.Array)):
    return to_jsonable(np.asarray(x).tolist())
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, np.bool_):
    return bool(x)
  if isinstance(x, float) and not np.isfinite(x):
    return str(x)  # 'nan' / 'inf': JSON has no such numbers
  return x


def write_json(path: str | os.PathLike, obj: Any) -> None:
  tmp = Path(str(path) + '.tmp')
  tmp.write_text(json.dumps(to_jsonable(obj), indent=2, sort_keys=False))
  tmp.replace(path)
