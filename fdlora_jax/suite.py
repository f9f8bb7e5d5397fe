"""Runs a grid of experiments (a *suite*), resumably, one workdir per point.

  python -m fdlora_jax.suite --suite=configs/suites/cpu.py --workdir=runs/cpu
  python -m fdlora_jax.report --workdir=runs/cpu        # tables.md + PNGs

A suite file defines ``get_suite() -> dict``::

  {'name': 'cpu',
   'configs': {'logs': 'configs/logs.py', ...},   # base config files
   'fixed': {'fl.rounds': 10, ...},               # every point
   'seeds': (0, 1, 2),
   'groups': [
     {'name': 'rq1_logs', 'config': 'logs',
      'grid': {'method': ('fdlora', 'fedavg'),
               'data.dirichlet_alpha': (0.1, 0.5, 1.0)},
      'fixed': {...},                            # this group only
      'report': {...}},                          # see fdlora_jax.report
     {'name': 'rq7', 'report': {..., 'from': 'rq1'}},   # no runs of its own
   ]}

Every point (group x grid product x seed) goes through the same
:func:`fdlora_jax.run.run` into ``<workdir>/<group>/<key=value,...>/seed<s>``
with a ``point.json`` naming its group and overrides. A point whose
``results.json`` exists is skipped, so a killed suite resumes where it
stopped (a point killed midway resumes from its own checkpoints); a
finished point whose config no longer equals the suite's (the suite file or
a config default changed since) is refused, naming the fields, instead of
being reported stale; a field added to the code since it ran is no change
while the point holds its default. Every point's config is built and validated before
the first one runs.

Shared between points: the pretrained model (loaded once per process) and,
through JAX's persistent compilation cache under ``<workdir>/.jax_cache``,
compiled steps of equal shapes.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import time
from pathlib import Path
from typing import Any

from absl import app, flags, logging
from tqdm.auto import tqdm

from fdlora_jax import io as io_lib
from fdlora_jax import run as run_lib
from fdlora_jax.errors import (ConfigError, UserError, exit_on_user_error,
                               fail, no_such_field, parse_flags)
from fdlora_jax.fl.methods import other_blocks

def load_file(path: str | Path, function: str) -> Any:
  """Calls ``function()`` of the Python file at ``path``."""
  path = Path(path)
  if not path.is_file():
    raise ConfigError(f'{path}: suite or config file not found')
  spec = importlib.util.spec_from_file_location(f'_suite_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, function):
    raise ConfigError(f'{path}: has no {function}()')
  return getattr(module, function)()


def set_field(c, path: str, value) -> None:
  """``c.a.b = value`` for the dotted ``path``, naming a bad path."""
  *parents, leaf = path.split('.')
  def missing():    # naming the nearest fields
    return ConfigError('suite: ' + (no_such_field(path, c) or
                                    f'config has no field {path!r}'))
  node = c
  for p in parents:
    if p not in node:
      raise missing()
    node = node[p]
  if leaf not in node:
    raise missing()
  field_type = type(node[leaf])
  if isinstance(node[leaf], float) and isinstance(value, int):
    value = float(value)
  if isinstance(node[leaf], tuple) and isinstance(value, list):
    value = tuple(value)
  try:
    node[leaf] = value
  except TypeError as e:
    raise ConfigError(f'suite: {path}={value!r} does not fit the field '
                      f'type {field_type.__name__}') from e


def _slug(value) -> str:
  text = str(value).replace('/', '_').replace(' ', '')
  return text.strip("'\"()[]").replace("'", '').replace(',', '+')


def expand(suite: dict) -> list[dict]:
  """Every point: ``{'id', 'group', 'config', 'overrides', 'seed'}``."""
  seeds = tuple(suite.get('seeds', (0,)))
  points = []
  for g in suite['groups']:
    if 'config' not in g:     # a report over another group's points
      continue
    grid = g.get('grid', {})
    keys = list(grid)
    # Seeds outermost: a suite stopped early has whole seeds of every
    # setting, which the paired comparisons need.
    for seed, combo in itertools.product(
        g.get('seeds', seeds), itertools.product(*(grid[k] for k in keys))):
      over = {**suite.get('fixed', {}), **g.get('fixed', {}),
              **dict(zip(keys, combo))}
      tag = ','.join(f'{k.split(".")[-1]}={_slug(v)}'
                     for k, v in zip(keys, combo)) or 'default'
      points.append({'id': f'{g["name"]}/{tag}/seed{seed}',
                     'group': g['name'], 'config': g['config'],
                     'overrides': {**over, 'seed': seed}, 'seed': seed})
  ids = [p['id'] for p in points]
  if len(set(ids)) != len(ids):
    raise ConfigError('suite: two points share a workdir; give groups '
                      'distinct names')
  return points


def point_config(suite: dict, point: dict, root: Path, overrides: bool = True):
  """The point's config: its base config file, then (``overrides``) the
  point's fields."""
  base = suite['configs'][point['config']]
  path = Path(base)
  if not path.is_absolute():
    path = root / path
  c = load_file(path, 'get_config')
  for field, value in (point['overrides'].items() if overrides else ()):
    set_field(c, field, value)
  return c


def check_reports(suite: dict) -> None:
  """Every report's ``'from'`` names a group of the suite."""
  names = {g.get('name') for g in suite['groups']}
  for g in suite['groups']:
    source = g.get('report', {}).get('from', ())
    for name in ((source,) if isinstance(source, str) else source):
      if name not in names:
        raise ConfigError(f'suite group {g.get("name")!r}: its report reads '
                          f'from {name!r}, which is not a group of the suite')


def run_suite(suite: dict, workdir: str | Path, root: Path = Path('.'),
              only: tuple[str, ...] = (), dry_run: bool = False) -> dict:
  """Runs every unfinished point; returns ``{'done', 'ran', 'skipped',
  'seconds'}``."""
  work = Path(workdir).expanduser()
  check_reports(suite)
  points = [p for p in expand(suite) if not only or p['group'] in only]
  configs = {}
  for p in points:                      # every config checked up front
    c = point_config(suite, p, root)
    try:
      run_lib.validate_config(c)
    except UserError as e:
      raise ConfigError(f'suite point {p["id"]}: {e}') from e
    configs[p['id']] = c
  finished = {p['id'] for p in points
              if (work / p['id'] / 'results.json').is_file()}
  for pid in sorted(finished):          # a finished point must still match
    saved = json.loads((work / pid / 'results.json').read_text())['config']
    # A field added to the code since the point ran is no change while the
    # point keeps its default (e.g. config.dp, off).
    point = next(p for p in points if p['id'] == pid)
    changes = io_lib.config_changes(
        saved, configs[pid], other_blocks(configs[pid]),
        defaults=point_config(suite, point, root, overrides=False))
    if changes:
      raise ConfigError(
          f'suite point {pid}: its finished results.json was run with a '
          f'different config ({changes}); delete {work / pid} to run it '
          f'again, or use a new --workdir')
  print(f'suite {suite.get("name", "")}: {len(points)} points, '
        f'{len(finished)} finished, {len(points) - len(finished)} to run '
        f'-> {work}')
  if dry_run:
    for p in points:
      print(('done  ' if p['id'] in finished else 'todo  ') + p['id'])
    return {'done': len(finished), 'ran': 0, 'skipped': len(finished),
            'seconds': 0.0}
  work.mkdir(parents=True, exist_ok=True)
  (work / 'suite.json').write_text(json.dumps(
      {'name': suite.get('name', ''), 'suite': suite}, indent=2,
      default=str))
  t0 = time.time()
  ran = 0
  bar = tqdm(total=len(points), initial=len(finished), unit='point',
             desc='suite', disable=None)
  for p in points:
    if p['id'] in finished:
      continue
    bar.set_postfix_str(p['id'])
    if bar.disable:
      print(f'[{len(finished) + ran + 1}/{len(points)}] {p["id"]}',
            flush=True)
    out = work / p['id']
    out.mkdir(parents=True, exist_ok=True)
    (out / 'point.json').write_text(json.dumps(p, indent=2))
    run_lib.run(configs[p['id']], str(out))
    ran += 1
    bar.update(1)
  bar.close()
  seconds = time.time() - t0
  print(f'suite done: {len(points)} points ({ran} run now, '
        f'{len(finished)} before) in {seconds:.0f} s')
  return {'done': len(points), 'ran': ran, 'skipped': len(finished),
          'seconds': seconds}


def enable_compilation_cache(workdir: Path) -> None:
  """Compiled steps of equal shapes are shared between points (and runs)."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir',
                    str(Path(workdir).expanduser() / '.jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def _cli():
  suite_flag = flags.DEFINE_string('suite', None, 'Suite file (get_suite()).')
  workdir = flags.DEFINE_string('workdir', None, 'Root of the point workdirs.')
  only = flags.DEFINE_string('only', '', 'Comma-separated group names to run '
                             '(default: all).')
  dry = flags.DEFINE_bool('dry_run', False, 'List the points and stop.')

  def main(argv):
    del argv
    if not suite_flag.value or not workdir.value:
      fail('--suite and --workdir are required')
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)
    with exit_on_user_error():
      suite = load_file(suite_flag.value, 'get_suite')
      enable_compilation_cache(Path(workdir.value))
      run_suite(suite, workdir.value, Path('.'),
                tuple(g for g in only.value.split(',') if g), dry.value)

  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  _cli()
