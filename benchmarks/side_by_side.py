"""Whole ``main.py`` runs of two checkouts, alternated, on one machine.

  git worktree add /tmp/before <commit>
  python benchmarks/side_by_side.py --before=/tmp/before --runs=3
  python benchmarks/side_by_side.py --before=/tmp/before \\
      --config=configs/logs.py --runs=1 --name=side_by_side_logs

Runs ``python main.py --config=<config> --workdir=<tmp>`` in ``--before``
and in this checkout ("after") in turn, B A B A ... (after first, so that
neither side always runs on the warmer machine), each in a fresh process,
and records each run's wall time, CPU time and peak memory, the ratios
after / before pair by pair and their medians, and whether each pair's
``results.json`` is identical once the timings are left out.

The after side runs as a user runs it: with ``main.py``'s persistent
compilation cache in ``--cache`` (emptied first, so its first run is cold,
and kept, so the later runs are warm). ``--after_flag`` adds flags to the
after side only (e.g. ``--compilation_cache=`` for cache off). Writes
``benchmarks/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from method_outputs import strip   # results without what varies by run


def one(repo: Path, config: str, overrides: list[str], extra: list[str],
        env: dict, tmp: Path, tag: str) -> dict:
  work = tmp / tag
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.time()
  proc = subprocess.run(
      [sys.executable, 'main.py', f'--config={config}', f'--workdir={work}',
       *overrides, *extra], cwd=repo, env=env, capture_output=True,
      text=True)
  wall = time.time() - t0
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode:
    raise SystemExit(f'{repo}: main.py exited {proc.returncode}:\n'
                     + proc.stderr[-2000:])
  results = json.loads((work / 'results.json').read_text())
  shutil.rmtree(work)
  return {'wall_s': round(wall, 2),
          'cpu_s': round(after.ru_utime + after.ru_stime - before.ru_utime
                         - before.ru_stime, 2),
          'peak_rss_mib': round(after.ru_maxrss / 1024, 0),
          'timing': results['timing'], 'results': strip(results, str(work))}


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--before', type=Path, required=True,
                 help="a checkout of the code to compare against")
  p.add_argument('--config', default='configs/tiny.py')
  p.add_argument('--override', action='append', default=[])
  p.add_argument('--runs', type=int, default=3, help='pairs')
  p.add_argument('--cache', type=Path,
                 default=Path(tempfile.gettempdir()) / 'side_by_side_cache')
  p.add_argument('--after_flag', action='append', default=[])
  p.add_argument('--name', default='side_by_side_tiny')
  p.add_argument('--out')
  a = p.parse_args()
  shutil.rmtree(a.cache, ignore_errors=True)
  env = dict(os.environ)
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  rev = subprocess.run(['git', 'describe', '--always', '--dirty'],
                       cwd=a.before, capture_output=True, text=True)
  pairs = []
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(a.runs):
      new = one(common.REPO, a.config, a.override,
                [f'--compilation_cache={a.cache}', *a.after_flag], env,
                Path(tmp), f'after{i}')
      old = one(a.before, a.config, a.override, [], env, Path(tmp),
                f'before{i}')
      same = new.pop('results') == old.pop('results')
      pair = {'after': new, 'before': old,
              'after_cache': 'cold' if i == 0 else 'warm',
              'ratio_wall': round(new['wall_s'] / old['wall_s'], 3),
              'results_identical': same}
      pairs.append(pair)
      print(f"pair {i}: before {old['wall_s']:.1f} s, after "
            f"{new['wall_s']:.1f} s ({pair['after_cache']} cache), ratio "
            f"{pair['ratio_wall']:.2f}, results identical: {same}",
            flush=True)
  warm = [q['ratio_wall'] for q in pairs[1:]]
  common.write_json(a.name, {
      **common.machine(),
      'before': {'path': str(a.before), 'commit': rev.stdout.strip()},
      'config': a.config, 'overrides': a.override,
      'after_flags': a.after_flag, 'pairs': pairs,
      'ratio_cold': pairs[0]['ratio_wall'],
      'ratio_warm_median': common.median(warm) if warm else None,
      'before_wall_median': common.median(
          [q['before']['wall_s'] for q in pairs]),
      'after_warm_wall_median': common.median(
          [q['after']['wall_s'] for q in pairs[1:]]) if warm else None,
      'all_identical': all(q['results_identical'] for q in pairs)}, a.out)


if __name__ == '__main__':
  main()
