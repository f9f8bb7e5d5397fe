"""Copies a finished (or partly finished) suite's outputs into the repository,
without checkpoints and event files, so its report can be re-made from them.

  python benchmarks/store_suite.py runs/cpu benchmarks/results/cpu_suite

Keeps ``suite.json`` and, per finished point, ``point.json``,
``results.json``, ``metrics.jsonl``, ``partition.json`` and
``predictions/`` (the per-example answers the pairwise tables need).
Unfinished points are left out. ``benchmarks/publish.py`` renders
docs/results.md's CPU study from the copy.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

KEEP = ('point.json', 'results.json', 'metrics.jsonl', 'partition.json')


def main(src: str, dest: str) -> None:
  src, dest = Path(src), Path(dest)
  if not (src / 'suite.json').is_file():
    raise SystemExit(f'{src}: no suite.json')
  if dest.exists():
    shutil.rmtree(dest)
  dest.mkdir(parents=True)
  shutil.copy2(src / 'suite.json', dest / 'suite.json')
  n = 0
  for res in sorted(src.rglob('results.json')):
    point = res.parent
    if not (point / 'point.json').is_file():
      continue
    out = dest / point.relative_to(src)
    out.mkdir(parents=True)
    for name in KEEP:
      if (point / name).is_file():
        shutil.copy2(point / name, out / name)
    shutil.copytree(point / 'predictions', out / 'predictions')
    n += 1
  print(f'stored {n} finished points of {src} in {dest}')


if __name__ == '__main__':
  if len(sys.argv) != 3:
    raise SystemExit(__doc__)
  main(sys.argv[1], sys.argv[2])
