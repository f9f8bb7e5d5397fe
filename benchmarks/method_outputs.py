"""Every method's outputs on configs/tiny.py, to show that a change of code
left behaviour alone.

  python benchmarks/method_outputs.py --out /tmp/before     # on the old code
  python benchmarks/method_outputs.py --out /tmp/after      # on the new code
  python benchmarks/method_outputs.py --compare /tmp/before /tmp/after \
      [--write method_outputs_compare]

Runs ``main.py --config=configs/tiny.py --config.method=M`` for every method
in ``METHODS`` (fixed seed) and keeps ``results.json`` and ``metrics.jsonl``
without what varies from run to run: timings, wall times and the workdir's
path. ``--compare`` exits 1 unless every kept value is identical, and names
the first differing field of each method; ``--write NAME`` also records the
verdicts, with both sides' commits, in ``benchmarks/results/NAME.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import common

VARIES = {'timing', 'wall_s', 'process_wall_s', 'results', 'workdir'}


def strip(x, workdir: str):
  if isinstance(x, dict):
    return {k: strip(v, workdir) for k, v in x.items() if k not in VARIES}
  if isinstance(x, list):
    return [strip(v, workdir) for v in x]
  if isinstance(x, str):
    return x.replace(workdir, '<workdir>')
  return x


def run_all(out: Path, methods: list[str], extra: list[str]) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / 'COMMIT').write_text(common.machine().get('commit', 'unknown'))
  for m in methods:
    work = out / f'run_{m}'
    t0 = time.time()
    cmd = [sys.executable, 'main.py', '--config=configs/tiny.py',
           f'--config.method={m}', f'--workdir={work}', *extra]
    proc = subprocess.run(cmd, cwd=common.REPO, capture_output=True,
                          text=True)
    if proc.returncode:
      print(proc.stderr[-2000:])
      raise SystemExit(f'{m}: main.py exited {proc.returncode}')
    kept = {'results': strip(json.loads((work / 'results.json').read_text()),
                             str(work)),
            'metrics': [strip(json.loads(l), str(work)) for l in
                        (work / 'metrics.jsonl').read_text().splitlines()]}
    (out / f'{m}.json').write_text(json.dumps(kept, indent=1,
                                              sort_keys=True))
    print(f'{m}: {time.time() - t0:.0f} s', flush=True)


def first_difference(a, b, path='') -> str | None:
  if type(a) is not type(b):
    return f'{path}: {type(a).__name__} vs {type(b).__name__}'
  if isinstance(a, dict):
    for k in sorted(set(a) | set(b)):
      if k not in a or k not in b:
        return f'{path}.{k}: only on one side'
      d = first_difference(a[k], b[k], f'{path}.{k}')
      if d:
        return d
    return None
  if isinstance(a, list):
    if len(a) != len(b):
      return f'{path}: length {len(a)} vs {len(b)}'
    for i, (x, y) in enumerate(zip(a, b)):
      d = first_difference(x, y, f'{path}[{i}]')
      if d:
        return d
    return None
  return None if a == b else f'{path}: {a!r} vs {b!r}'


def compare(before: Path, after: Path, write: str = '') -> int:
  names = sorted(p.stem for p in before.glob('*.json'))
  if not names:
    raise SystemExit(f'{before}: no method outputs')
  verdicts = {}
  for m in names:
    other = after / f'{m}.json'
    if not other.is_file():
      verdicts[m] = f'missing in {after}'
    else:
      d = first_difference(json.loads((before / f'{m}.json').read_text()),
                           json.loads(other.read_text()))
      verdicts[m] = 'identical' if d is None else 'DIFFERS at ' + d
    print(f'{m}: {verdicts[m]}')
  status = 0 if all(v == 'identical' for v in verdicts.values()) else 1
  if write:
    def commit(side):
      f = side / 'COMMIT'
      return f.read_text().strip() if f.is_file() else 'unknown'
    common.write_json(write, {
        **common.machine(), 'before_commit': commit(before),
        'after_commit': commit(after),
        'what': ('benchmarks/method_outputs.py on configs/tiny.py for every '
                 'method: results.json and metrics.jsonl of the two commits '
                 'compared without timings'),
        'exit_status': status, 'methods': verdicts})
  return status


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', type=Path)
  p.add_argument('--compare', nargs=2, type=Path)
  p.add_argument('--methods', default='', help='comma-separated; default all')
  p.add_argument('--override', action='append', default=[])
  p.add_argument('--write', default='',
                 help='with --compare: benchmarks/results/<name>.json')
  a = p.parse_args()
  if a.compare:
    sys.exit(compare(*a.compare, write=a.write))
  if not a.out:
    p.error('--out or --compare')
  from fdlora_jax.fl.methods import METHODS
  methods = a.methods.split(',') if a.methods else list(METHODS)
  run_all(a.out, methods, a.override)


if __name__ == '__main__':
  main()
