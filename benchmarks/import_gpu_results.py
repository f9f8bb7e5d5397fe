"""Copies what a GPU session measured into ``benchmarks/results/``.

  python benchmarks/import_gpu_results.py DIR --tag h200

DIR holds what ``benchmarks/gpu_session.sh`` wrote to ``$OUT`` (the device
tool brings it back): ``accelerator_7b.json``, ``client_throughput_gpu*.json``,
``overheads_logs_gpu.json`` (benchmarks/overheads.py),
``run_<name>_results.json`` with ``run_<name>.log`` (the ``/usr/bin/time -v``
output of that run), ``nvidia_smi.txt`` and ``versions.json``. Writes, each
with an ``env`` entry (device, driver, versions, the source directory):

  accelerator_<tag>.json         the 7B-shape step (rows as the script wrote)
  client_throughput_<tag>.json   rows of every client_throughput_gpu*.json
  whole_run_<tag>_<name>.json    per run: results.json, process wall and RSS
  overheads_logs_<tag>.json      the CPU default's time split, cold and warm

Where DIR has no ``versions.json`` (sessions before the script wrote one),
``--env`` gives the versions as JSON, e.g. copied from that session's notes;
the output records which.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import common


def time_v(log: Path) -> dict:
  """The ``/usr/bin/time -v`` fields of a run's log: command, wall, RSS."""
  text = log.read_text(errors='replace')
  out = {}
  m = re.search(r'Command being timed: "(.*)"', text)
  if m:
    out['command'] = m.group(1)
  m = re.search(r'Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)',
                text)
  if m:
    secs = 0.0
    for part in m.group(1).split(':'):
      secs = secs * 60 + float(part)
    out['process_wall_s'] = secs
  m = re.search(r'Maximum resident set size \(kbytes\): (\d+)', text)
  if m:
    out['peak_rss_mib'] = int(m.group(1)) / 1024
  for key, name in (('User time (seconds)', 'cpu_user_s'),
                    ('System time (seconds)', 'cpu_sys_s')):
    m = re.search(re.escape(key) + r': ([\d.]+)', text)
    if m:
      out[name] = float(m.group(1))
  m = re.search(r'Exit status: (\d+)', text)
  if m:
    out['exit_status'] = int(m.group(1))
  return out


def environment(src: Path, env_json: str) -> dict:
  env = {'source': str(src)}
  smi = src / 'nvidia_smi.txt'
  if smi.is_file():
    lines = [l for l in smi.read_text().splitlines() if l.strip()]
    if len(lines) >= 2:
      keys = [k.strip() for k in lines[0].split(',')]
      env['nvidia_smi'] = dict(zip(keys, (v.strip()
                                          for v in lines[1].split(','))))
  versions = src / 'versions.json'
  if versions.is_file():
    env['versions'] = json.loads(versions.read_text())
    env['versions_from'] = 'versions.json written by gpu_session.sh'
  elif env_json:
    env['versions'] = json.loads(env_json)
    env['versions_from'] = '--env given to import_gpu_results.py'
  else:
    raise SystemExit(f'{src}: no versions.json; give --env')
  return env


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('src', type=Path)
  p.add_argument('--tag', required=True, help='e.g. h200')
  p.add_argument('--env', default='', help='versions as JSON, where the '
                 'source has no versions.json')
  p.add_argument('--name', action='append', default=[],
                 help='OLD=NEW: a run name to rename, e.g. paper=logs_paper')
  p.add_argument('--dest', type=Path, default=common.RESULTS)
  a = p.parse_args()
  env = environment(a.src, a.env)
  env['imported_with'] = ' '.join(['python', *sys.argv])
  wrote = []

  def write(name, payload):
    path = a.dest / f'{name}.json'
    path.write_text(json.dumps({'env': env, **payload}, indent=2))
    wrote.append(path)

  acc = a.src / 'accelerator_7b.json'
  if acc.is_file():
    write(f'accelerator_{a.tag}', json.loads(acc.read_text()))
  parts = sorted(a.src.glob('client_throughput_gpu*.json'))
  if parts:
    runs = [json.loads(f.read_text()) for f in parts]
    rows = sorted((dict(r, file=f.name) for f, run in zip(parts, runs)
                   for r in run['rows']), key=lambda r: r['clients'])
    first = runs[0]
    write(f'client_throughput_{a.tag}', {
        **{k: v for k, v in first.items() if k != 'rows'},
        'runs': [{k: v for k, v in run.items() if k != 'rows'}
                 for run in runs],
        'rows': rows})
  for res in sorted(a.src.glob('run_*_results.json')):
    name = res.name[len('run_'):-len('_results.json')]
    log = a.src / f'run_{name}.log'
    name = dict(n.split('=', 1) for n in a.name).get(name, name)
    process = time_v(log) if log.is_file() else {}
    results = json.loads(res.read_text())
    write(f'whole_run_{a.tag}_{name}', {**process, 'results': results})
  over = a.src / 'overheads_logs_gpu.json'
  if over.is_file():
    write(f'overheads_logs_{a.tag}', json.loads(over.read_text()))
  if not wrote:
    raise SystemExit(f'{a.src}: nothing to import')
  for path in wrote:
    print(f'wrote {path}')


if __name__ == '__main__':
  main()
