r"""Benchmark: a 1M-line LogHub-format log through the data pipeline.

Generates a synthetic BGL-format log (the built-in generator; synthetic, not
real LogHub data), then times each phase in its own subprocess, so that each
phase's peak RSS (resource.getrusage ru_maxrss) is its own:

  stream     parse + window the file as a stream, counting windows (nothing
             kept: the memory a 4.7M-line BGL pass needs)
  plain      load_task on the file (c.data.use_tfds=False: Examples in memory)
  tfds_build build the TFDS array_record dataset (FdloraLoghub) from the file
  tfds_read  tfds.data_source: 1,000 random reads, then load_task through TFDS

Phases `stream`, `plain` and `tfds_build` alternate over --repeats rounds;
medians are printed in a table and all runs written as JSON to
benchmarks/results/build_tfds_logs.json.

  python benchmarks/build_tfds_logs.py --lines=1000000 --repeats=3
"""

import json
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import common
from fdlora_jax.data import logs
from fdlora_jax.data import synthetic

_LINES = flags.DEFINE_integer('lines', 1_000_000, 'lines in the log')
_WINDOW = flags.DEFINE_integer('window', 50, 'window size = stride')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'rounds of the timed phases')
_WORKDIR = flags.DEFINE_string('workdir', '', 'scratch dir (default: temp)')
_PHASE = flags.DEFINE_string('phase', '', 'internal: run one phase')
_OUT = flags.DEFINE_string(
    'out', str(pathlib.Path(__file__).parent / 'results' /
               'build_tfds_logs.json'), 'JSON results')


def _cfg(workdir: pathlib.Path, round_: int = 0):
  c = common.logs_data(common.base_config())
  c.data.dir = str(workdir / 'logs')
  c.data.window_size = c.data.window_stride = _WINDOW.value
  c.data.tfds_dir = str(workdir / f'tfds_{round_}')
  return c.data


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB


def run_phase(phase: str, workdir: pathlib.Path, round_: int) -> dict:
  """Runs one phase in this process; returns its figures."""
  from fdlora_jax import data  # pylint: disable=g-import-not-at-top
  cfg = _cfg(workdir, round_)
  base = {'rss_after_imports_mib': _peak_rss_mib()}
  t0 = time.perf_counter()
  if phase == 'generate':
    synthetic.write_synthetic_log(workdir / 'logs' / 'BGL_synthetic.log',
                                  'BGL', _LINES.value, seed=0,
                                  block=_WINDOW.value)
    n = _LINES.value
  elif phase == 'stream':
    stats = logs.ParseStats('bench')
    n = sum(1 for _ in logs.log_examples(
        workdir / 'logs' / 'BGL_synthetic.log', _WINDOW.value,
        _WINDOW.value, stats))
  elif phase == 'plain':
    n = len(data.load_task(cfg, 0).examples)
  elif phase == 'tfds_build':
    from fdlora_jax.data import tfds_data  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()
    n = tfds_data.build(cfg).info.splits['train'].num_examples
  elif phase == 'tfds_read':
    import numpy as np  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from fdlora_jax.data import tfds_data  # pylint: disable=g-import-not-at-top
    builder = tfds_data.builder_for(cfg)
    source = tfds.data_source(builder.name, split='train',
                              data_dir=cfg.tfds_dir,
                              builder_kwargs={
                                  'config': builder.builder_config,
                                  'file_format': 'array_record'})
    picks = np.random.default_rng(0).integers(len(source), size=1000)
    t1 = time.perf_counter()
    for i in picks:
      _ = source[int(i)]
    random_ms = (time.perf_counter() - t1) * 1000 / len(picks)
    cfg.use_tfds = True
    n = len(data.load_task(cfg, 0).examples)
    return {'phase': phase, 'seconds': time.perf_counter() - t0,
            'peak_rss_mib': _peak_rss_mib(), 'items': n, **base,
            'random_read_ms': random_ms,
            'tensorflow_imported': 'tensorflow' in sys.modules}
  else:
    raise ValueError(f'unknown phase {phase}')
  return {'phase': phase, 'seconds': time.perf_counter() - t0,
          'peak_rss_mib': _peak_rss_mib(), 'items': n, **base,
          'tensorflow_imported': 'tensorflow' in sys.modules}


def _child(phase: str, workdir: pathlib.Path, round_: int) -> dict:
  cmd = [sys.executable, __file__, f'--phase={phase}', f'--workdir={workdir}',
         f'--lines={_LINES.value}', f'--window={_WINDOW.value}',
         f'--repeats={round_}']
  out = subprocess.run(cmd, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if _PHASE.value:  # child: --repeats carries the round number
    print(json.dumps(run_phase(_PHASE.value, pathlib.Path(_WORKDIR.value),
                               _REPEATS.value)))
    return
  workdir = pathlib.Path(_WORKDIR.value or tempfile.mkdtemp(prefix='bench_'))
  try:
    runs = [_child('generate', workdir, 0)]
    size = (workdir / 'logs' / 'BGL_synthetic.log').stat().st_size
    for r in range(_REPEATS.value):
      for phase in ('stream', 'plain', 'tfds_build'):
        runs.append(_child(phase, workdir, r))
      if r == 0:
        runs.append(_child('tfds_read', workdir, 0))
      shutil.rmtree(workdir / f'tfds_{r}', ignore_errors=True)
  finally:
    if not _WORKDIR.value:
      shutil.rmtree(workdir, ignore_errors=True)
  print(f'{_LINES.value:,} synthetic BGL-format lines ({size / 2**20:.0f} '
        f'MiB), windows of {_WINDOW.value}; medians of {_REPEATS.value} '
        f'rounds; {os.cpu_count()} CPUs')
  print(f'(peak RSS includes ~{runs[0]["rss_after_imports_mib"]:.0f} MiB '
        'of imports before any data is read)')
  print(f'{"phase":<11} {"seconds":>8} {"peak RSS MiB":>13} {"items":>9}')
  table = {}
  for phase in ('generate', 'stream', 'plain', 'tfds_build', 'tfds_read'):
    rs = [x for x in runs if x['phase'] == phase]
    table[phase] = {
        'seconds_median': statistics.median(x['seconds'] for x in rs),
        'peak_rss_mib_median': statistics.median(
            x['peak_rss_mib'] for x in rs),
        'items': rs[0]['items'], 'runs': len(rs)}
    print(f'{phase:<11} {table[phase]["seconds_median"]:8.2f} '
          f'{table[phase]["peak_rss_mib_median"]:13.0f} {rs[0]["items"]:9,}')
  read = [x for x in runs if x['phase'] == 'tfds_read'][0]
  print(f'tfds_read: {read["random_read_ms"]:.3f} ms per random '
        f'tfds.data_source read; TensorFlow imported in any phase: '
        f'{any(x["tensorflow_imported"] for x in runs)}')
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({
      'lines': _LINES.value, 'window': _WINDOW.value, 'file_bytes': size,
      'data': 'synthetic (fdlora_jax built-in generator, BGL format)',
      'python': sys.version.split()[0], 'cpus': os.cpu_count(),
      'medians': table, 'runs': runs}, indent=1) + '\n')
  print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
