"""Where a whole run's wall time goes: tracing, lowering and compiling,
waiting for device results, checkpoint writes, and the host work between.

  python benchmarks/overheads.py                                # configs/tiny.py
  python benchmarks/overheads.py --config=configs/logs.py
  python benchmarks/overheads.py --repeats=2 --cache=/tmp/jaxcache  # cold, then warm

Each run is ``fdlora_jax.run.run`` in a fresh Python process (this file with
``--child``), as ``main.py`` runs it, instrumented from outside the library:

* jax.monitoring duration events: ``jaxpr_trace_duration`` (tracing),
  ``jaxpr_to_mlir_module_duration`` (lowering), ``backend_compile_duration``
  (XLA compilation, or its load from the persistent cache: the cache's own
  retrieval event says how much of it was loading), each counted;
* timers around ``StateCheckpoints.save`` (checkpoint writes),
  ``sharding.to_host`` (the host waiting for device results: device compute
  that nothing overlapped), and the loading steps of ``run.prepare``
  (task data, model and tokenizer, encoding).

Every figure is attributed to the stage it fell in: ``prepare`` (data,
tokenizer, model, encoding, the method and its engine), ``train``,
``search`` (AdaFusion), ``evaluate``, ``write``. "host" is what is left of a
stage: Python between calls, dispatch, data sampling, metrics and logs.

``--checkpoint_every`` is main.py's flag (60 s; 0: a checkpoint after every
round, as before it existed). ``--repo=DIR`` measures another checkout
(e.g. a worktree of an older commit; its own ``fdlora_jax`` is imported).
``--cache=DIR`` runs with the persistent compilation cache in DIR (as
``main.py`` does by default, in ~/.cache/fdlora_jax/jax); without it the
cache is off. With ``--repeats=2`` and an empty DIR the first run is cold
and the second warm. Writes ``benchmarks/results/overheads_<config>.json``
(``--out``) with the machine, date, jax version and commit.
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

STAGES = ('prepare', 'train', 'search', 'evaluate', 'write')
KINDS = ('trace', 'lower', 'compile', 'cache_load', 'device_wait',
         'checkpoint', 'data', 'model', 'encode')
EVENTS = {'/jax/core/compile/jaxpr_trace_duration': 'trace',
          '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lower',
          '/jax/core/compile/backend_compile_duration': 'compile',
          '/jax/compilation_cache/cache_retrieval_time_sec': 'cache_load'}


def child(config: str, overrides: list[str], workdir: str, out: str) -> None:
  """One instrumented run; writes its breakdown to ``out``. The code run is
  the checkout in the working directory (``--repo``)."""
  sys.path.insert(0, os.getcwd())
  import jax
  from jax import monitoring

  from fdlora_jax import data as data_lib
  from fdlora_jax import io as io_lib
  from fdlora_jax import run as run_lib
  from fdlora_jax import sharding
  if os.environ.get('OVERHEADS_CACHE'):
    from fdlora_jax import runtime      # (older checkouts have no cache)
    runtime.use_compilation_cache(os.environ['OVERHEADS_CACHE'])
  seconds = collections.defaultdict(float)
  counts = collections.defaultdict(int)
  stage = ['import']
  depth = collections.Counter()

  jax_time = [0.0]      # tracing/lowering/compiling so far, for nesting

  def listener(event, duration, **_):
    kind = EVENTS.get(event)
    if kind:
      seconds[(stage[0], kind)] += duration
      counts[(stage[0], kind)] += 1
      if kind != 'cache_load':          # within 'compile'
        jax_time[0] += duration
  monitoring.register_event_duration_secs_listener(listener)

  def timed(owner, name, kind):
    """Times ``owner.name`` as ``kind``, less the tracing and compiling
    within it (counted as theirs)."""
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
      depth[kind] += 1
      t0, j0 = time.perf_counter(), jax_time[0]
      try:
        return real(*args, **kwargs)
      finally:
        depth[kind] -= 1
        if not depth[kind]:           # nested calls count once
          seconds[(stage[0], kind)] += (time.perf_counter() - t0
                                        - (jax_time[0] - j0))
          counts[(stage[0], kind)] += 1
    setattr(owner, name, wrapper)

  real_save = io_lib.StateCheckpoints.save

  def save(self, *args, **kwargs):
    saved = real_save(self, *args, **kwargs)
    counts[(stage[0], 'saves')] += saved is not False   # older: None, saved
    return saved
  io_lib.StateCheckpoints.save = save
  timed(io_lib.StateCheckpoints, 'save', 'checkpoint')
  timed(sharding, 'to_host', 'device_wait')
  timed(data_lib, 'load_task', 'data')
  timed(data_lib, 'partition', 'data')
  timed(run_lib, 'build_model', 'model')
  timed(data_lib, 'encode_clients', 'encode')
  timed(data_lib, 'encode_options', 'encode')

  walls = {}

  def staged(name, fn_name):
    real = getattr(run_lib, fn_name)

    def wrapper(*args, **kwargs):
      stage[0] = name
      t0 = time.perf_counter()
      try:
        return real(*args, **kwargs)
      finally:
        walls[name] = walls.get(name, 0.0) + time.perf_counter() - t0
    setattr(run_lib, fn_name, wrapper)

  for name, fn_name in (('prepare', 'prepare'), ('prepare', 'open_outputs'),
                        ('train', 'train'), ('search', 'search'),
                        ('evaluate', 'evaluate'), ('write', 'write')):
    staged(name, fn_name)

  from fdlora_jax.suite import load_file, set_field
  c = load_file(Path(config).absolute(), 'get_config')
  for o in overrides:
    field, _, value = o.removeprefix('--').removeprefix('config.').partition(
        '=')
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass                                  # a plain string
    set_field(c, field, value)
  t0 = time.perf_counter()
  every = float(os.environ.get('OVERHEADS_CHECKPOINT_EVERY', '60'))
  # (older checkouts save after every round and take no interval)
  results = (run_lib.run(c, workdir, every) if every else
             run_lib.run(c, workdir))
  total = time.perf_counter() - t0
  breakdown = {}
  for name in STAGES:
    row = {k: round(seconds[(name, k)], 3) for k in KINDS
           if (name, k) in seconds}
    row['calls'] = {k: counts[(name, k)] for k in (*KINDS, 'saves')
                    if (name, k) in counts}
    wall = walls.get(name, 0.0)
    # cache_load lies within compile.
    accounted = sum(v for k, v in row.items()
                    if k in ('trace', 'lower', 'compile', 'device_wait',
                             'checkpoint', 'data', 'model', 'encode'))
    row['wall'] = round(wall, 3)
    row['host'] = round(max(wall - accounted, 0.0), 3)
    breakdown[name] = row
  Path(out).write_text(json.dumps({
      'run_s': round(total, 3), 'stages': breakdown,
      'timing': results['timing'],
      'headline': {k: m['mean'] for k, m in results['models'].items()},
      'devices': [str(d) for d in jax.devices()]}, indent=1))


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='configs/tiny.py')
  p.add_argument('--override', action='append', default=[])
  p.add_argument('--repeats', type=int, default=1)
  p.add_argument('--cache', default='',
                 help='persistent compilation cache directory (off if empty)')
  p.add_argument('--checkpoint_every', type=float, default=60.0,
                 help="as main.py's flag (0: a checkpoint after every round)")
  p.add_argument('--repo', type=Path, default=common.REPO,
                 help='the checkout to measure (e.g. a worktree of main)')
  p.add_argument('--out', type=Path)
  p.add_argument('--child', nargs=2, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.child:
    child(a.config, a.override, *a.child)
    return
  runs = []
  for _ in range(a.repeats):
    cache = Path(a.cache).expanduser() if a.cache else None
    state = ('off' if cache is None else
             'warm' if cache.is_dir() and any(cache.iterdir()) else 'cold')
    with tempfile.TemporaryDirectory() as tmp:
      env = dict(os.environ, OVERHEADS_CACHE=str(cache or ''),
                 OVERHEADS_CHECKPOINT_EVERY=str(a.checkpoint_every))
      env.pop('JAX_COMPILATION_CACHE_DIR', None)
      t0 = time.time()
      subprocess.run([sys.executable, str(Path(__file__).absolute()),
                      '--config', a.config,
                      *[f'--override={o}' for o in a.override],
                      '--child', f'{tmp}/work', f'{tmp}/out.json'],
                     cwd=a.repo, env=env, check=True,
                     stdout=subprocess.DEVNULL)
      r = json.loads(Path(f'{tmp}/out.json').read_text())
    r['process_wall_s'] = round(time.time() - t0, 3)
    r['cache'] = state
    runs.append(r)
    print(table(r), flush=True)
  name = f'overheads_{Path(a.config).stem}'
  common.write_json(name, {**common.machine(), 'repo': str(a.repo),
                           'config': a.config,
                           'overrides': a.override,
                           'checkpoint_every': a.checkpoint_every,
                           'runs': runs},
                    a.out)


def table(r: dict) -> str:
  cols = ('wall', 'trace', 'lower', 'compile', 'cache_load', 'device_wait',
          'checkpoint', 'data', 'model', 'encode', 'host')
  lines = [f"{r['cache']} cache: process {r['process_wall_s']:.1f} s, "
           f"run {r['run_s']:.1f} s",
           '| stage | ' + ' | '.join(cols) + ' | compiles |',
           '|---' * (len(cols) + 2) + '|']
  for name, row in r['stages'].items():
    cells = [f"{row[k]:.2f}" if k in row else '' for k in cols]
    lines.append(f'| {name} | ' + ' | '.join(cells)
                 + f" | {row['calls'].get('compile', 0)} |")
  return '\n'.join(lines)


if __name__ == '__main__':
  main()
