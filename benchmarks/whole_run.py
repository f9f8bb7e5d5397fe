"""Wall time of a whole FDLoRA run, by stage.

  python benchmarks/whole_run.py                       # configs/logs.py
  python benchmarks/whole_run.py --override=--config.fl.rounds=2

Runs ``python main.py --config=<config> --workdir=<tmp>`` in a subprocess and
prints the stage breakdown that ``fdlora_jax/run.py`` stores in
``results.json`` under ``timing`` (data_s; train_s, every training phase;
search_s, e.g. AdaFusion; eval_s; total_s), next to the subprocess's own
wall time (which adds Python and JAX start-up). Writes ``benchmarks/results/whole_run.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

STAGES = ('data_s', 'train_s', 'search_s', 'eval_s', 'total_s')


def find_results(workdir: Path) -> Path:
  hits = sorted(workdir.rglob('results.json'), key=lambda p: p.stat().st_mtime)
  if not hits:
    raise SystemExit(f'no results.json under {workdir}')
  return hits[-1]


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
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=common.REPO, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if proc.returncode:
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    raise SystemExit(f'main.py failed ({proc.returncode})')
  results = json.loads(find_results(workdir).read_text())
  timing = results.get('timing')
  if not timing:
    raise SystemExit("results.json has no 'timing' entry")
  total = timing.get('total_s') or sum(timing.get(s, 0) for s in STAGES[:-1])
  rows = [{'stage': s[:-2], 'seconds': float(timing[s]),
           'share': float(timing[s]) / total if s != 'total_s' else 1.0}
          for s in STAGES if s in timing]
  rows.append({'stage': 'process wall (incl. start-up)', 'seconds': wall,
               'share': wall / total})
  common.print_table(rows)
  common.write_json('whole_run', {**common.machine(), 'command': cmd,
                                  'timing': timing, 'process_wall_s': wall,
                                  'rows': rows}, a.out)


if __name__ == '__main__':
  main()
