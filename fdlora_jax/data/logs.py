"""LogHub logs (Scenario 1): line parsing, windows, and the log task.

Raw LogHub lines (BGL, Thunderbird, Spirit) start with a label token: `-`
for a normal line, an alert tag (`KERNDTLB`, `APPREAD`, ...) for an anomalous
one. Then come header fields, then the message. As in the paper, only the
message is kept:

  BGL          label ts date node time node type component level | message
               - 1117838570 2005.06.03 R02-M1-N0-C:J12-U11
                 2005-06-03-15.42.50.675872 R02-M1-N0-C:J12-U11 RAS KERNEL
                 INFO | instruction cache parity error corrected
  Thunderbird  label ts date node month day time location | component[pid]: msg
  (and Spirit) - 1131566461 2005.11.09 dn228 Nov 9 12:01:01 dn228/dn228
                 | crond(pam_unix)[2915]: session closed for user root

For Thunderbird and Spirit the `component[pid]:` prefix stays in the message,
as in the pre-windowed Spirit JSON (`Spirit/alpaca_input_w-10_spirit.json`).
Files are read as a stream of bytes, line by line (the full BGL log is 4.7M
lines); CRLF, a missing final newline and undecodable bytes (replaced by
U+FFFD) are fine. A line with fewer header fields than its system has, or
whose timestamp or date field is not a number / YYYY.MM.DD, is malformed: it
is skipped and counted.
"""

import collections
from collections.abc import Iterable, Iterator
import dataclasses
import glob
import json
import pathlib
import re

from absl import logging
import ml_collections

from fdlora_jax.data import synthetic
from fdlora_jax.data.examples import Example
from fdlora_jax.errors import ConfigError
from fdlora_jax.errors import DataError
from fdlora_jax.errors import MissingFileError
from fdlora_jax.errors import need

# Header fields (label included) before the message, per system.
HEADER_FIELDS = {'BGL': 9, 'Thunderbird': 8, 'Spirit': 8}
OPTIONS = ('no', 'yes')  # label 1 = anomalous; F1 positive class is 'yes'
LOGHUB_SOURCE = (
    'LogHub, https://github.com/logpai/loghub (Zhu et al., "Loghub", ISSRE '
    '2023); full logs: https://zenodo.org/records/8196385')
SPIRIT_JSON_SOURCE = (
    'pre-windowed Spirit windows (alpaca_input_w-10_spirit.json, MIT, '
    'LogReader), from the LogHub Spirit log')
# Files recognised in c.data.dir, in this order.
LOG_PATTERNS = ('BGL*.log', 'Thunderbird*.log', 'Spirit*.log', 'Spirit/*.json',
                'Spirit*.json')
_DATE = re.compile(r'\d{4}\.\d\d\.\d\d')
_BGL_TIME = re.compile(r'\d{4}-\d\d-\d\d-\d\d\.\d\d\.\d\d\.\d+')


@dataclasses.dataclass
class ParseStats:
  """Counts for one file: lines read, malformed lines skipped."""
  path: str
  lines: int = 0
  skipped: int = 0
  first_skipped: list[int] = dataclasses.field(default_factory=list)

  def skip(self, line_no: int) -> None:
    self.skipped += 1
    if len(self.first_skipped) < 5:
      self.first_skipped.append(line_no)

  def report(self) -> str:
    where = f' (first at line(s) {self.first_skipped})' if self.skipped else ''
    return (f'{self.path}: {self.lines} lines, skipped {self.skipped} '
            f'malformed{where}')


def system_of(path: str | pathlib.Path) -> str | None:
  """'BGL' | 'Thunderbird' | 'Spirit' from a file name, else None."""
  name = pathlib.Path(path).name.lower()
  for system in HEADER_FIELDS:
    if name.startswith(system.lower()):
      return system
  return None


def sniff_system(line: str) -> str | None:
  """Guesses the system from one raw line (BGL has a dashed timestamp)."""
  parts = line.split()
  if len(parts) > 4 and _BGL_TIME.fullmatch(parts[4]):
    return 'BGL'
  if len(parts) > 6 and parts[4].isalpha():
    return 'Thunderbird'
  return None


def parse_line(line: str, system: str) -> tuple[bool, str] | None:
  """(anomalous, message) for one raw line, or None if malformed."""
  n = HEADER_FIELDS[system]
  parts = line.rstrip().split(None, n)
  if len(parts) < n or not parts[1].isdigit() or not _DATE.fullmatch(parts[2]):
    return None
  return parts[0] != '-', (parts[n] if len(parts) > n else '')


def parse_lines(lines: Iterable[str], system: str,
                stats: ParseStats) -> Iterator[tuple[bool, str]]:
  """Parses raw lines lazily; malformed ones are counted in `stats`."""
  for line_no, line in enumerate(lines, start=1):
    stats.lines += 1
    parsed = parse_line(line, system)
    if parsed is None:
      stats.skip(line_no)
    else:
      yield parsed


def read_lines(path: str | pathlib.Path) -> Iterator[str]:
  """Decoded lines of a file, streamed (errors='replace', CRLF tolerated)."""
  with open(path, 'rb') as f:
    for raw in f:
      yield raw.decode('utf-8', errors='replace').rstrip('\r\n')


def windows(records: Iterable[tuple[bool, str]], size: int,
            stride: int) -> Iterator[tuple[tuple[str, ...], bool]]:
  """Fixed windows of consecutive messages, in time order.

  A window starts at every multiple of `stride` and holds `size` lines; a
  trailing incomplete window is dropped. A window is anomalous if any of its
  lines is. Only `size` lines are held in memory.

  Args:
    records: (anomalous, message) per line.
    size: lines per window (paper: 50).
    stride: lines between window starts (`size` for disjoint windows).

  Yields:
    (messages, anomalous).
  """
  if size < 1 or stride < 1:
    raise ValueError(f'window size and stride must be >= 1, got {size}, '
                     f'{stride}')
  buf = collections.deque(maxlen=size)
  for i, record in enumerate(records):
    buf.append(record)
    if len(buf) == size and (i + 1 - size) % stride == 0:
      yield tuple(m for _, m in buf), any(a for a, _ in buf)


def log_examples(path: str | pathlib.Path, size: int, stride: int,
                 stats: ParseStats,
                 system: str | None = None) -> Iterator[Example]:
  """Windows of one raw LogHub file as Examples, streamed."""
  path = pathlib.Path(path)
  system = system or system_of(path)
  lines = read_lines(path)
  if system is None:  # not named BGL*/Thunderbird*/Spirit*: look at line 1
    first = next(lines, '')
    system = sniff_system(first)
    if system is None:
      raise DataError(
          f'{path.resolve()}: cannot tell the log system (BGL / Thunderbird '
          '/ Spirit) from the file name or the first line; name the file '
          'BGL*.log, Thunderbird*.log or Spirit*.log')
    lines = _chain([first], lines)
  for msgs, anomalous in windows(parse_lines(lines, system, stats), size,
                                 stride):
    yield Example(text='\n'.join(msgs), options=OPTIONS, label=int(anomalous),
                  source=system, lines=msgs)


def _chain(head: list[str], tail: Iterator[str]) -> Iterator[str]:
  yield from head
  yield from tail


def spirit_json_examples(path: str | pathlib.Path,
                         stats: ParseStats) -> list[Example]:
  """Pre-windowed Spirit JSON: [{'conversation': [{'input', 'output'}]}].

  The log lines are what follows '###Logs:' in `input` (all of `input` when
  there is no such marker); `output` is 'yes' (anomalous) or 'no'. Flat
  records {'input', 'output'} are read too. Other records are skipped and
  counted.
  """
  path = pathlib.Path(path)
  with open(path, 'rb') as f:
    try:
      records = json.loads(f.read().decode('utf-8', errors='replace'))
    except json.JSONDecodeError as e:
      raise DataError(f'{path.resolve()}: not valid JSON ({e}); expected a '
                      "list of {'conversation': [{'input', 'output'}]} "
                      f'records from {SPIRIT_JSON_SOURCE}') from e
  if not isinstance(records, list):
    raise DataError(f'{path.resolve()}: expected a JSON list of windows, got '
                    f'{type(records).__name__}')
  out = []
  for i, record in enumerate(records, start=1):
    stats.lines += 1
    try:
      turn = record['conversation'][0] if 'conversation' in record else record
      text, answer = turn['input'], turn['output'].strip().lower()
    except (KeyError, IndexError, TypeError, AttributeError):
      stats.skip(i)
      continue
    if answer not in OPTIONS or not isinstance(text, str):
      stats.skip(i)
      continue
    text = text.split('###Logs:', 1)[-1].strip('\n')
    msgs = tuple(text.split('\n'))
    out.append(Example(text='\n'.join(msgs), options=OPTIONS,
                       label=OPTIONS.index(answer), source='Spirit',
                       lines=msgs))
  return out


def find_log_files(data_cfg: ml_collections.ConfigDict) -> list[pathlib.Path]:
  """The log files named by c.data.files, else those found in c.data.dir
  and its immediate subfolders (LOG_PATTERNS in each).

  Raises:
    MissingFileError: a named file, the directory, or any log file in it is
      missing (the message names the config field and the path).
  """
  root = pathlib.Path(data_cfg.dir).expanduser() if data_cfg.dir else None
  if data_cfg.files:
    files = []
    for name in data_cfg.files.split(','):
      p = pathlib.Path(name.strip()).expanduser()
      if not p.is_absolute() and root is not None:
        p = root / p
      if glob.has_magic(str(p)):  # a pattern: every file it matches
        hits = [pathlib.Path(h) for h in sorted(glob.glob(str(p)))
                if pathlib.Path(h).is_file()]
        if not hits:
          raise MissingFileError(
              f'config.data.files={data_cfg.files!r}: no log file matches '
              f'{p}; raw logs come from {LOGHUB_SOURCE}')
        files += [h for h in hits if h not in files]
        continue
      if not p.is_file():
        raise MissingFileError(
            f'config.data.files={data_cfg.files!r}: log file {p.resolve()} '
            f'does not exist; raw logs come from {LOGHUB_SOURCE}')
      files.append(p)
    return files
  if root is None or not root.is_dir():
    raise MissingFileError(
        f'config.data.dir={data_cfg.dir!r}: log directory '
        f'{root and root.resolve()} does not exist; expected files '
        f'{", ".join(LOG_PATTERNS)} from {LOGHUB_SOURCE}')
  files = []
  # The folder, then each of its subfolders (one level, sorted): a folder
  # of several sets (../shared/data: loghub/, loghub_random/) reads them
  # all.
  for folder in [root] + sorted(d for d in root.iterdir() if d.is_dir()):
    for pattern in LOG_PATTERNS:
      files += [p for p in sorted(folder.glob(pattern))
                if p.is_file() and p not in files]
  if not files:
    raise MissingFileError(
        f'config.data.dir={data_cfg.dir!r}: no log files in {root.resolve()}; '
        f'expected any of {", ".join(LOG_PATTERNS)} (raw lines from '
        f'{LOGHUB_SOURCE})')
  return files


def selected_systems(data_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The systems of c.data.systems ('BGL,Thunderbird', ...), checked."""
  systems = tuple(s.strip() for s in data_cfg.systems.split(',') if s.strip())
  need(systems and all(s in HEADER_FIELDS for s in systems), 'data.systems',
       data_cfg.systems,
       f'choose a comma-separated subset of {sorted(HEADER_FIELDS)}')
  return systems


def file_system(path: pathlib.Path) -> str | None:
  """The system a log file holds, from its name (pre-windowed JSON is
  Spirit's); None when only its first line can tell."""
  return 'Spirit' if path.suffix == '.json' else system_of(path)


def file_examples(path: pathlib.Path, size: int, stride: int,
                  stats: ParseStats) -> Iterator[Example]:
  """Examples of one log file: raw lines are windowed, JSON is pre-windowed."""
  if path.suffix == '.json':
    yield from spirit_json_examples(path, stats)
  else:
    yield from log_examples(path, size, stride, stats)


def check_stats(stats: ParseStats, n_examples: int, size: int) -> None:
  """Reports skipped lines; raises DataError for an empty or unusable file."""
  if stats.skipped:
    logging.warning('%s', stats.report())
  if stats.lines == 0:
    raise DataError(f'{stats.path}: file is empty')
  if stats.skipped == stats.lines:
    where = f'first at line(s) {stats.first_skipped}'
    raise DataError(f'{stats.path}: no valid lines ({stats.lines} lines, all '
                    f'malformed, {where}); expected the LogHub line format '
                    f'({LOGHUB_SOURCE})')
  if n_examples == 0:
    raise DataError(f'{stats.path}: {stats.lines - stats.skipped} valid '
                    f'lines, fewer than one window of {size} '
                    '(config.data.window_size)')


def check_windows(data_cfg: ml_collections.ConfigDict) -> None:
  """ConfigError unless c.data.window_size and window_stride are >= 1."""
  need(data_cfg.window_size >= 1, 'data.window_size', data_cfg.window_size,
       'must be >= 1')
  need(data_cfg.window_stride >= 1, 'data.window_stride',
       data_cfg.window_stride, 'must be >= 1')


def load_real(data_cfg: ml_collections.ConfigDict
              ) -> tuple[list[Example], str, dict[str, int]]:
  """(examples, data_source, skipped_by_file) from the real log files.

  `skipped_by_file` maps each file read (absolute path) to the malformed
  lines (raw logs) or records (Spirit JSON) skipped in it, 0 included.
  """
  check_windows(data_cfg)
  systems = selected_systems(data_cfg)
  size, stride = data_cfg.window_size, data_cfg.window_stride
  examples, described, skipped = [], [], {}
  files = selected_files(data_cfg)
  for path in files:
    stats = ParseStats(str(path.resolve()))
    got = list(file_examples(path, size, stride, stats))
    check_stats(stats, len(got), size)
    if not _wanted(path, got[0].source, systems, data_cfg):  # sniffed
      continue
    examples += got
    skipped[stats.path] = skipped.get(stats.path, 0) + stats.skipped
    origin = SPIRIT_JSON_SOURCE if path.suffix == '.json' else 'LogHub'
    described.append(f'{path.resolve()} ({origin}; {len(got)} windows, '
                     f'{sum(e.label for e in got)} anomalous)')
  if not examples:
    raise MissingFileError(
        f'config.data.dir={data_cfg.dir!r}: none of its log files '
        f'({", ".join(str(p) for p in files)}) holds a system of '
        f'config.data.systems={data_cfg.systems!r}')
  return examples, 'real: ' + '; '.join(described), skipped


def selected_files(data_cfg: ml_collections.ConfigDict
                   ) -> list[pathlib.Path]:
  """find_log_files, less those of a system not in c.data.systems (known
  from the file name; a file only its first line can tell is kept here and
  checked when read)."""
  systems = selected_systems(data_cfg)
  files = find_log_files(data_cfg)
  kept = [p for p in files if _wanted(p, file_system(p), systems, data_cfg)]
  if not kept:
    raise MissingFileError(
        f'config.data.dir={data_cfg.dir!r}: no log file of '
        f'config.data.systems={data_cfg.systems!r} among '
        f'{", ".join(p.name for p in files)}')
  return kept


def _wanted(path: pathlib.Path, system: str | None, systems: tuple[str, ...],
            data_cfg: ml_collections.ConfigDict) -> bool:
  """Whether to read `path` (of `system`, None: not known yet): files found
  in c.data.dir of another system are skipped; one named in c.data.files
  is an error."""
  if system is None or system in systems:
    return True
  if data_cfg.files:
    raise ConfigError(f'config.data.files={data_cfg.files!r} names '
                      f'{path.resolve()}, a {system} log, but '
                      f'config.data.systems={data_cfg.systems!r}')
  return False


def load_synthetic(data_cfg: ml_collections.ConfigDict,
                   seed: int) -> tuple[list[Example], str]:
  """(examples, data_source) from the built-in generator (no real data)."""
  systems = selected_systems(data_cfg)
  need(data_cfg.synthetic_windows >= 1, 'data.synthetic_windows',
       data_cfg.synthetic_windows, 'must be >= 1')
  need(data_cfg.synthetic_window_size >= 1, 'data.synthetic_window_size',
       data_cfg.synthetic_window_size, 'must be >= 1')
  need(0.0 <= data_cfg.synthetic_anomaly_rate <= 1.0,
       'data.synthetic_anomaly_rate', data_cfg.synthetic_anomaly_rate,
       'must be in [0, 1]')
  size = data_cfg.synthetic_window_size
  examples = []
  for k, system in enumerate(systems):
    n_windows = data_cfg.synthetic_windows // len(systems) + (
        k < data_cfg.synthetic_windows % len(systems))
    lines = synthetic.synthetic_lines(
        system, n_windows * size, seed=seed * 1000 + k, block=size,
        anomaly_rate=data_cfg.synthetic_anomaly_rate)
    stats = ParseStats(f'synthetic:{system}')
    for msgs, anomalous in windows(parse_lines(lines, system, stats), size,
                                   size):
      examples.append(Example(text='\n'.join(msgs), options=OPTIONS,
                              label=int(anomalous),
                              source=f'synthetic:{system}', lines=msgs))
  source = (f'synthetic: fdlora_jax built-in generator {synthetic.VERSION}, '
            f'seed {seed}, systems {",".join(systems)}, {len(examples)} '
            f'windows of {size} lines ({sum(e.label for e in examples)} '
            'anomalous); NOT real LogHub data')
  return examples, source
