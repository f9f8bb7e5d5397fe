"""Wall time per stage and peak memory of a whole run of the default config.

  python benchmarks/whole_run.py                       # configs/logs.py
  python benchmarks/whole_run.py --override=--config.fl.rounds=2

Runs ``python main.py --config=<config> --workdir=<tmp>`` in a subprocess
(the default config as a user runs it, SmolLM2-135M-Instruct on the built-in
synthetic logs) and prints, per stage:

  data     data, tokenizer and model loading, encoding   (results timing)
  <phase>  every training phase, e.g. local and rounds   (metrics.jsonl,
           sum of each phase's per-repeat ``wall_s``: compilation included)
  search   search phases, e.g. AdaFusion                 (results timing)
  eval     evaluation of every reported adapter          (results timing)
  total    run() from start to end                       (results timing)

next to the subprocess's own wall time (adds Python/JAX start-up) and its
peak resident memory (``getrusage(RUSAGE_CHILDREN).ru_maxrss``, the largest
child; main.py is the only one) and CPU time (user + sys). ``/proc/loadavg`` is recorded before and
after: on a shared machine the wall times are only as good as the load.
Writes ``--out`` (a path), by default ``benchmarks/results/<name>.json``
with a name that says what ran: ``whole_run_<config>`` plus each override, e.g.
``whole_run_logs__data.dir-loghub__method-fedavg`` (directories by their last
part), so a result file never claims to be "the default" when it is not.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common


def loadavg() -> str:
  try:
    with open('/proc/loadavg') as f:
      return f.read().strip()
  except OSError:
    return ''


def find(workdir: Path, name: str) -> Path:
  hits = sorted(workdir.rglob(name), key=lambda p: p.stat().st_mtime)
  if not hits:
    raise SystemExit(f'no {name} under {workdir}')
  return hits[-1]


def phase_walls(metrics_path: Path) -> dict[str, float]:
  """Seconds per training phase, summed over its metrics.jsonl lines."""
  out = collections.OrderedDict()
  for line in metrics_path.read_text().splitlines():
    r = json.loads(line)
    if 'wall_s' in r and r.get('phase') not in (None, 'final'):
      out[r['phase']] = out.get(r['phase'], 0.0) + float(r['wall_s'])
  return out


def default_name(config: str, overrides: list[str]) -> str:
  """``whole_run_<config stem>`` and ``__<field>-<value>`` per override."""
  parts = [f'whole_run_{Path(config).stem}']
  for o in overrides:
    field, _, value = o.removeprefix('--').removeprefix('config.').partition(
        '=')
    value = Path(value.rstrip('/')).name if '/' in value else value
    parts.append(f'{field}-{value}' if value else field)
  return re.sub(r'[^A-Za-z0-9._-]+', '_', '__'.join(parts))


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='configs/logs.py')
  p.add_argument('--override', action='append', default=[],
                 help='extra flags for main.py, e.g. --config.fl.rounds=2')
  p.add_argument('--workdir', default='')
  p.add_argument('--out', default=None)
  a = p.parse_args()
  workdir = Path(a.workdir or tempfile.mkdtemp(prefix='fdlora_whole_run_'))
  cmd = [sys.executable, 'main.py', f'--config={a.config}',
         f'--workdir={workdir}', *a.override]
  print(' '.join(cmd))
  load_before = loadavg()
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=common.REPO, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  load_after = loadavg()
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  peak_rss_mib = usage.ru_maxrss / 1024
  cpu_s = usage.ru_utime + usage.ru_stime
  if proc.returncode:
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    raise SystemExit(f'main.py failed ({proc.returncode})')
  results = json.loads(find(workdir, 'results.json').read_text())
  timing = results.get('timing')
  if not timing:
    raise SystemExit("results.json has no 'timing' entry")
  phases = phase_walls(find(workdir, 'metrics.jsonl'))
  total = float(timing['total_s'])
  stages = [('data', timing.get('data_s'))]
  stages += [(name, s) for name, s in phases.items()]
  stages += [('search', timing.get('search_s')), ('eval', timing.get('eval_s')),
             ('total', total),
             ('process wall (incl. start-up)', wall)]
  rows = [{'stage': name, 'seconds': float(s), 'share': float(s) / total}
          for name, s in stages if s is not None]
  common.print_table(rows)
  metric = results['metric']
  scores = {name: m['mean'][metric] for name, m in results['models'].items()}
  for name, m in results.get('reference', {}).items():
    scores[f'{name} (no model)'] = m['mean'][metric]
  print(f'peak RSS {peak_rss_mib:,.0f} MiB; CPU time {cpu_s:,.0f} s (user '
        f'{usage.ru_utime:,.0f} + sys {usage.ru_stime:,.0f}); loadavg '
        f'before: {load_before}; after: {load_after}')
  print(f'{results["task"]} ({results["data_source"]}), mean {metric}: '
        + ', '.join(f'{k} {v:.3f}' for k, v in scores.items()))
  common.write_json(default_name(a.config, a.override), {
      **common.machine(), 'command': cmd, 'model': results.get('model'),
      'data_source': results.get('data_source'),
      'is_synthetic': results.get('is_synthetic'),
      'timing': timing, 'phase_wall_s': phases, 'process_wall_s': wall,
      'peak_rss_mib': peak_rss_mib, 'cpu_s': cpu_s,
      'cpu_user_s': usage.ru_utime, 'cpu_sys_s': usage.ru_stime,
      'loadavg_before': load_before,
      'loadavg_after': load_after, 'metric': metric, 'mean_scores': scores,
      'rows': rows, 'results': results}, a.out)


if __name__ == '__main__':
  main()
