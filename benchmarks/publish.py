"""Writes every measured figure in README.md and docs/ from its results file.

  python benchmarks/publish.py           # rewrite the generated blocks
  python benchmarks/publish.py --check   # exit 1 where a block differs

A generated block in a Markdown file is

  <!-- figures: NAME -->
  ...written by RENDERERS[NAME] from benchmarks/results/*.json...
  <!-- /figures -->

To change a figure, change the results file (re-measure) or the renderer,
then run this script; never edit inside a block. ``tests/test_docs.py`` runs
``--check``, so a block that disagrees with its file fails the tests. Each
block ends with the files it read and when and where they were measured.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

import numpy as np

import common

REPO = common.REPO
RESULTS = common.RESULTS
PAGES = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]
BLOCK = re.compile(r'(<!-- figures: (?P<name>[\w-]+) -->\n)(?P<body>.*?)'
                   r'(<!-- /figures -->)', re.S)
DATASHEET_BF16_FLOPS = 989e12   # H100/H200 SXM dense bf16, the datasheet's


# ---------------------------------------------------------------- helpers

def load(name: str) -> dict:
  return json.loads((RESULTS / name).read_text())


def f3(x) -> str:
  return '-' if x is None else f'{x:.3f}'


def secs(x) -> str:
  return f'{x:,.0f} s' if x >= 10 else f'{x:.1f} s'


def gib(mib) -> str:
  return f'{mib / 1024:.1f} GiB'


def table(header, rows) -> str:
  out = ['| ' + ' | '.join(header) + ' |',
         '|' + '|'.join('---' for _ in header) + '|']
  out += ['| ' + ' | '.join(str(c) for c in r) + ' |' for r in rows]
  return '\n'.join(out)


def day(date: str) -> str:
  return date.split(' ')[0] if date else 'undated'


def source(*items) -> str:
  """``items``: (file, record) pairs; the line naming them."""
  parts = []
  for name, d in items:
    when = day(d.get('date', '')) if isinstance(d, dict) else ''
    parts.append(f'`benchmarks/results/{name}`' + (f' ({when})' if when
                                                      and when != 'undated'
                                                      else ''))
  return '_Source: ' + ', '.join(parts) + '._'


def counts(row: dict, tests: list[dict]) -> dict:
  """Pooled confusion counts of an F1 row from its per-client metrics and
  each client's test labels ({'yes': P, 'no': N})."""
  tp = fp = fn = tn = 0
  for c, t in zip(row['per_client'], tests):
    pos, n = t.get('yes', 0), c['n']
    neg = n - pos
    correct = round(c['accuracy'] * n)
    t_p = round(c['recall'] * pos)
    t_n = correct - t_p
    tp, fn, tn, fp = tp + t_p, fn + pos - t_p, tn + t_n, fp + neg - t_n
  return {'tp': tp, 'fp': fp, 'fn': fn, 'tn': tn, 'errors': fp + fn,
          'n': tp + fp + fn + tn,
          'pooled_f1': 2 * tp / (2 * tp + fp + fn) if tp else 0.0}


def mean_std(xs) -> str:
  return f'{np.mean(xs):.3f} ± {np.std(xs):.3f}'


def with_std(row: dict) -> dict:
  """A results row with ``std`` (population, as evaluate computes it)."""
  if 'std' in row:
    return row
  used = [c for c in row['per_client'] if c['n']]
  keys = [k for k in row['mean'] if k != 'n']
  return {**row, 'std': {k: float(np.std([c[k] for c in used]))
                         for k in keys}}


# ------------------------------------------------------------- renderers

def first_run() -> str:
  """README: what command 1 prints and how long it takes."""
  import types  # pylint: disable=g-import-not-at-top
  from fdlora_jax import evaluate, outcomes  # pylint: disable=g-import-not-at-top
  s = load('whole_run_logs.json')
  r = s['results']
  task = types.SimpleNamespace(metric=r['metric'], options=tuple(
      r['config']['data'].get('options', ())) or ('no', 'yes'))
  rows = dict(r['models'])
  rows.update({evaluate.reference_row(k, task): v
               for k, v in r['reference'].items()})
  t = s['timing']
  g = load('whole_run_h200_logs.json')
  gt = g['results']['timing']
  # The load when the run started: afterwards it counts the run itself.
  load_avg = float(s['loadavg_before'].split()[0])
  return '\n'.join([
      'It trains FDLoRA\'s three phases with progress bars, then prints one '
      'row per evaluated adapter and per no-model answer: F1 of the '
      'anomalous class and the rest (mean ± std over the 5 clients, in %) '
      'with each client\'s F1; then the pooled figures with their 95% '
      'intervals and which no-model answers each adapter beats. On the '
      'built-in synthetic lines, seed 0:',
      '',
      '```text',
      evaluate.format_table(rows, ['f1', 'precision', 'recall', 'accuracy']),
      '',
      outcomes.format_figures(rows, r['headline_metric']['name']),
      '```',
      '',
      f'On the 2-core CPU that run took **{secs(s["process_wall_s"])}** from '
      f'start to exit (data {secs(t["data_s"])}, training '
      f'{secs(t["train_s"])}, AdaFusion {secs(t["search_s"])}, evaluation '
      f'{secs(t["eval_s"])}) at a peak RSS of {gib(s["peak_rss_mib"])}'
      + (f', while other work shared the machine (load average '
         f'{load_avg:.1f} on 2 cores at its start)' if load_avg > 1.5
         else '') + '. On '
      f'one {g["env"]["nvidia_smi"]["name"]} the logs config of 2026-12-04 '
      f'on the LogHub samples took **{secs(g["process_wall_s"])}** (data '
      f'{secs(gt["data_s"])}, training {secs(gt["train_s"])}, AdaFusion '
      f'{secs(gt["search_s"])}, evaluation {secs(gt["eval_s"])}).',
      '',
      source(('whole_run_logs.json', s),
             ('whole_run_h200_logs.json', g['results'] | {
                 'date': g['env']['versions'].get('date', '')}))])


def h200_runs() -> str:
  """results.md / performance.md: the times of two whole runs on the H200.
  Their scores are in the files but carry no interval (the runs predate
  per-example outputs), so no score is shown."""
  rows = []
  for name, title in (('whole_run_h200_logs.json',
                       '`configs/logs.py` (the CPU default of the day)'),
                      ('whole_run_h200_logs_paper.json',
                       '`configs/logs_paper.py` (the paper\'s settings)')):
    g = load(name)
    res = g['results']
    t = res['timing']
    sizes = ' / '.join(str(c['n']) for c in
                       res['models'][res['headline']]['per_client'])
    rows.append([title, secs(g['process_wall_s']), gib(g['peak_rss_mib']),
                 secs(t['data_s']), secs(t['train_s']), secs(t['search_s']),
                 secs(t['eval_s']), sizes])
  return '\n'.join([
      table(['run (LogHub samples, seed 0)', 'start to exit',
             'peak host RSS', 'data', 'training', 'AdaFusion', 'evaluation',
             'test examples per client'], rows), '',
      source(*((n, {'date': load(n)['env']['versions'].get('date')})
               for n in ('whole_run_h200_logs.json',
                         'whole_run_h200_logs_paper.json')))])


def h200_env() -> str:
  g = load('accelerator_h200.json')
  env = g['env']
  smi, v = env['nvidia_smi'], env['versions']
  names = ['python', 'jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint',
           'evosax', 'gguf', 'transformers', 'torch', 'peft', 'numpy']
  return '\n'.join([
      f'One {smi["name"]} ({smi["memory.total [MiB]"]}, driver '
      f'{smi["driver_version"]}, SM clock up to {smi["clocks.max.sm [MHz]"]}), '
      f'{g["machine"]}, at commit `{v.get("commit", "?")}` on '
      f'{day(v.get("date", g.get("date", "")))}. Versions: '
      + ', '.join(f'{k} {v[k]}' for k in names if k in v) + '.',
      '', source(('accelerator_h200.json', g))])


def h200_step() -> str:
  g = load('accelerator_h200.json')
  a = g['args']
  rows = []
  for r in g['rows']:
    tflops = r['tokens_per_s'] * r['flops_per_token'] / 1e12
    rows.append([r['clients'], 'yes' if r['remat'] else 'no',
                 f'{r["step_s"]:.3f}', f'{r["tokens_per_s"]:,.0f}',
                 f'{tflops:.0f}', f'{r["mfu"]:.3f}',
                 f'{tflops * 1e12 / DATASHEET_BF16_FLOPS:.3f}',
                 f'{r["compiled_gib"]:.1f}'])
  peak = g['peak_flops'] / 1e12
  return '\n'.join([
      f'`python benchmarks/accelerator.py --preset {a["preset"]} --seq '
      f'{a["seq"]} --rank {a["rank"]} --targets {a["targets"]} --steps '
      f'{a["steps"]}`: random weights, {a["dtype"]}, attention '
      f'{g.get("auto_attention", a["attention"])}, K = {a["steps"]} AdamW '
      f'steps per call. "measured peak" is the script\'s own 8192^3 bf16 '
      f'matmul in the same process ({peak:.0f} TFLOP/s); the datasheet\'s '
      f'dense bf16 peak is {DATASHEET_BF16_FLOPS / 1e12:.0f} TFLOP/s.', '',
      table(['N', 'remat', 'step (s)', 'tokens/s', 'TFLOP/s',
             'MFU vs measured peak', 'MFU vs datasheet', 'compiled GiB'],
            rows), '',
      f'Largest N predicted from compiled memory with remat at T = '
      f'{a["seq"]}: {g.get("max_clients_remat_predicted")}.', '',
      source(('accelerator_h200.json', g))])


def _throughput(g: dict) -> list:
  rows = []
  for r in g['rows']:
    rows.append([r['clients'], f'{r["jax_vmap_tok_s"]:,.0f}',
                 f'{r["jax_seq_tok_s"]:,.0f}',
                 f'{r["torch_tok_s"]:,.0f}' if 'torch_tok_s' in r else '',
                 f'{r["vmap/seq"]:.2f}',
                 f'{r["vmap/torch"]:.2f}' if 'vmap/torch' in r else '',
                 f'{r["jax_vmap_mfu"]:.3f}'])
  return rows


THROUGHPUT_HEADER = ['N', '(a) vmap tok/s', '(b) one by one tok/s',
                     '(c) torch + peft tok/s', '(a)/(b)', '(a)/(c)',
                     '(a) MFU vs measured peak']


def h200_throughput() -> str:
  g = load('client_throughput_h200.json')
  a = g['args']
  return '\n'.join([
      f'`python benchmarks/client_throughput.py --model= --preset '
      f'{a["preset"]} --seq {a["seq"]} --steps {a["steps"]} --targets '
      f'{a["targets"]}`: {g["model"]}, {g["dtype"]}, rank {a["rank"]}.',
      '', table(THROUGHPUT_HEADER, _throughput(g)), '',
      source(('client_throughput_h200.json', g))])


def cpu_throughput() -> str:
  out = []
  for name in ('client_throughput.json', 'client_throughput_smollm2.json'):
    g = load(name)
    a = g['args']
    what = (g.get('model') if a.get('model') else f'preset {a["preset"]}')
    out += [f'{what}, T = {a["seq"]}, K = {a["steps"]}, targets '
            f'{a["targets"]}, {g.get("dtype", "float32")}, torch with '
            f'{g["torch_threads"]} threads:', '',
            table(THROUGHPUT_HEADER, _throughput(g)), '',
            source((name, g)), '']
  return '\n'.join(out[:-1])


def cpu_step_time() -> str:
  g = load('step_time.json')
  rows = [[r['preset'], r['layers'], r['hidden'], r['clients'], r['seq'],
           f'{r["compile_s"]:.1f}', f'{r["step_s_median"] * 1e3:.1f}',
           f'{r["tokens_per_s"]:,.0f}'] for r in g['rows']]
  return '\n'.join([
      table(['preset', 'layers', 'width', 'N', 'T', 'compile (s)',
             'step (ms)', 'tokens/s'], rows), '',
      f'{g["note"]}.', '', source(('step_time.json', g))])


def cpu_memory() -> str:
  g = load('memory.json')
  a = g['args']
  by = {}
  for r in g['rows']:
    by.setdefault(r['impl'], {})[r['clients']] = r
  rows = []
  for impl, rs in by.items():
    lo, hi = rs[min(rs)], rs[max(rs)]
    rows.append([impl, f'{lo["peak_mib"]:,.0f} / {lo["delta_mib"]:,.0f}',
                 f'{hi["peak_mib"]:,.0f} / {hi["delta_mib"]:,.0f}',
                 f'{hi["peak_mib"] / lo["peak_mib"]:.2f}'])
  base = g['rows'][0]['base_weights_mib']
  return '\n'.join([
      f'A base of {a["layers"]} layers x {a["hidden"]} wide ({base:,.0f} MiB '
      f'of weights), T = {a["seq"]}, rank {a["rank"]} on {a["targets"]}; a '
      'fresh process per row; delta over the loaded base.', '',
      table(['impl', f'N = {min(rs)} peak / delta (MiB)',
             f'N = {max(rs)} peak / delta (MiB)', 'peak ratio'], rows), '',
      source(('memory.json', g))])


def cpu_fusion() -> str:
  g = load('fusion_speed.json')
  r = g['rows'][0]
  return '\n'.join([
      f'{r["evaluations"]} fitness evaluations (N = {r["clients"]}, '
      f'population {r["population"]}, {r["steps"]} steps, preset '
      f'{r["preset"]}): the vmapped search took {secs(r["vmapped_search_s"])}, '
      f'a Python loop over single candidates {secs(r["loop_s"])} '
      f'(loop / vmapped {r["loop/vmapped_search"]:.2f}). {g["notes"]}', '',
      source(('fusion_speed.json', g))])


def cpu_prefix() -> str:
  g = load('prefix_cache_logs.json')
  sw, sc = g['scoring_whole_s']['steady'], g['scoring_cached_s']['steady']
  fw, fc = g['fitness_whole_s']['steady'], g['fitness_cached_s']['steady']
  return '\n'.join([
      f'`configs/logs.py` with {", ".join(g["overrides"])} (the logs config '
      f'of that date: see the data line), {g["shared_prefix_tokens"]} shared '
      f'tokens of {g["length"]}, {g["test_examples"]} test examples:', '',
      table(['what', 'whole rows', 'shared start cached', 'change'],
            [['option scoring', secs(sw), secs(sc), f'{sc / sw - 1:+.0%}'],
             ['AdaFusion fitness', secs(fw), secs(fc),
              f'{fc / fw - 1:+.0%}']]), '',
      f'Largest score difference {g["scoring_max_abs_diff"]:.1e}; every '
      f'prediction agreed: {g["scoring_predictions_agree"]}. Data: '
      f'{g["data_source"].split(": ", 1)[0]} LogHub samples.', '',
      source(('prefix_cache_logs.json', g))])


def cpu_tfds() -> str:
  g = load('build_tfds_logs.json')
  m = g['medians']
  read = next(r for r in g['runs'] if r['phase'] == 'tfds_read')
  return '\n'.join([
      f'{g["lines"]:,} BGL-format lines ({g["file_bytes"] / 2**20:,.0f} MiB, '
      f'{m["stream"]["items"]:,} windows of {g["window"]}; {g["data"]}): '
      f'streaming parse {secs(m["stream"]["seconds_median"])} at a peak RSS '
      f'of {m["stream"]["peak_rss_mib_median"]:,.0f} MiB; TFDS array_record '
      f'build {secs(m["tfds_build"]["seconds_median"])}, peak '
      f'{m["tfds_build"]["peak_rss_mib_median"]:,.0f} MiB; random read '
      f'{read["random_read_ms"]:.3f} ms.', '',
      source(('build_tfds_logs.json', {}))])


def cpu_whole_runs() -> str:
  rows = []
  items = []
  def add(label, d, name):
    t = d['timing']
    ph = d.get('phase_wall_s', {})
    rows.append([label, secs(d['process_wall_s']), secs(t['data_s']),
                 ', '.join(f'{k} {secs(v)}' for k, v in ph.items()),
                 secs(t['search_s']), secs(t['eval_s']),
                 gib(d['peak_rss_mib'])])
    items.append((name, d))
  add('`configs/logs.py`, synthetic lines (README command 1)',
      load('whole_run_logs.json'), 'whole_run_logs.json')
  add('`configs/logs.py`, synthetic lines (earlier default)',
      load('synthetic_default_seed0.json'), 'synthetic_default_seed0.json')
  # Measured on the earlier logs default (58 test lines per seed); kept for
  # their timings, their scores are archived (archive/README.md).
  for r in load('archive/logs_default_seeds.json')['runs']:
    add(f'`configs/logs.py`, LogHub samples (earlier default: 58 test '
        f'lines), seed {r["seed"]}', r['fdlora'],
        'archive/logs_default_seeds.json')
  add('`configs/medical.py`, PubMedQA sample (archived run)',
      load('archive/medical_default_seed0.json'),
      'archive/medical_default_seed0.json')
  tiny = RESULTS / 'whole_run_tiny.json'
  if tiny.is_file():
    add('`configs/tiny.py` (tiny random model)', load(tiny.name), tiny.name)
  seen, uniq = set(), []
  for n, d in items:
    if n not in seen:
      seen.add(n)
      uniq.append((n, d))
  return '\n'.join([
      table(['run (FDLoRA, seed 0 unless named)', 'wall', 'data',
             'training phases', 'AdaFusion', 'evaluation', 'peak RSS'], rows),
      '', source(*uniq)])


def central_probes() -> str:
  """methods.md: how fast one adapter on the pooled task learns, per data
  layout (the evidence for one line per example)."""
  rows, items = [], []
  for name, label in (('central_probe_3line_space.json',
                       '3-line windows, answer after a space'),
                      ('central_probe_3line.json',
                       '3-line windows, answer opens the turn'),
                      ('central_probe_lines.json',
                       'one line per example (today\'s default)')):
    g = load(name)
    items.append((name, g))
    ev = g['rows']
    rows.append([label, ', '.join(f'{r["auc"]:.2f}' for r in ev),
                 ', '.join(f'{r["accuracy"]:.2f}' for r in ev),
                 ', '.join(f'{r["said_yes"]:.2f}' for r in ev),
                 f'{ev[0]["loss"]:.2f}', secs(ev[-1]['elapsed_s'])])
  steps = ', '.join(str(r['step']) for r in load(items[0][0])['rows'])
  first = load(items[0][0])['rows'][0]['step']
  return '\n'.join([
      f'`python benchmarks/central_probe.py`: one adapter trained on the '
      f'whole task pooled into one client (batch 1, the default\'s lr), the '
      f'test split scored after steps {steps}. One run each, on '
      f'{load(items[-1][0])["test"]} test lines of the balanced `loghub/` '
      f'samples of the time: a diagnostic of the training signal, with no '
      f'interval, that compares no methods.', '',
      table(['data', 'AUC of score(yes) - score(no)', 'accuracy',
             'share answered "yes"', f'mean train loss, steps 1-{first}',
             'time'], rows), '',
      source(*items)])


def suite_report(name: str) -> str:
  """A stored suite's report (``benchmarks/results/<name>/``: results.json
  and per-example predictions/ of every point), re-made from its runs."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from fdlora_jax import report  # pylint: disable=g-import-not-at-top
  work = RESULTS / name
  with tempfile.TemporaryDirectory() as out:
    rep = report.write_report(work, out, quiet=True)
    text = rep['tables'].read_text()
  # Drop the page title and the local path; tables from '###' on.
  body = text[text.index('###'):].replace('### ', '#### ')
  suite = json.loads((work / 'suite.json').read_text())
  return '\n'.join([body.rstrip(), '',
                    f'_Source: `benchmarks/results/{name}/` (suite '
                    f'{suite["name"]!r}, {rep["num_points"]} runs; '
                    f'`python -m fdlora_jax.report '
                    f'--workdir=benchmarks/results/{name}`)._'])


def cpu_suite() -> str:
  """results.md: the CPU study's report."""
  return suite_report('cpu_suite')


def lora_suite() -> str:
  """results.md: the LoRA-specific methods beside the CPU study's."""
  return suite_report('lora_suite')


def dp_suite() -> str:
  """privacy.md: the headline against epsilon (configs/suites/dp.py)."""
  return suite_report('dp_suite')


def stack_memory() -> str:
  g = load('stack_memory.json')
  rows = []
  for r in g['rows']:
    if r['method'] != 'fedex_lora':   # FLoRA's stack has the same shape
      continue
    rows.append([r['setting'], f'{r["clients"]} x rank {r["rank"]}, '
                 f'T = {r["rounds"]}', f'{r["stack_rank"]:,}',
                 f'{r["stack_bytes"] / 2**20:,.0f}',
                 f'{r["dense_bytes"] / 2**20:,.0f}',
                 f'{r["stack_over_dense"]:.2f}',
                 f'{r["stack_madds_per_token"] / r["dense_madds_per_token"]:.2f}'])
  return '\n'.join([
      'Server state of FedEx-LoRA\'s residual (FLoRA\'s stack has the same '
      f'shape when every client has the model\'s rank), LoRA on '
      f'{", ".join(g["targets"])}, counted from the shapes of the built '
      'method\'s state (`jax.eval_shape`).', '',
      table(['setting', 'clients, rounds', 'stack rank', 'stack (MiB)',
             'dense delta (MiB)', 'stack / dense', 'forward multiply-adds, '
             'stack / dense'], rows), '',
      source(('stack_memory.json', g))])


def _overhead_row(label: str, run: dict) -> list:
  """One run's seconds per kind, summed over its stages."""
  tot = {}
  for row in run['stages'].values():
    for k, v in row.items():
      if k != 'calls':
        tot[k] = tot.get(k, 0.0) + v
  n = sum(r['calls'].get('compile', 0) for r in run['stages'].values())
  loading = sum(tot.get(k, 0.0) for k in ('data', 'model', 'encode'))
  return [label, secs(run['process_wall_s']), secs(run['run_s']),
          secs(tot.get('trace', 0.0) + tot.get('lower', 0.0)),
          f"{secs(tot.get('compile', 0.0))} ({n})",
          secs(tot.get('cache_load', 0.0)), secs(tot.get('device_wait', 0.0)),
          secs(tot.get('checkpoint', 0.0)), secs(loading),
          secs(tot.get('host', 0.0))]


def _stage_rows(run: dict) -> list:
  rows = []
  for name, r in run['stages'].items():
    rows.append([name, secs(r['wall']),
                 secs(r.get('trace', 0.0) + r.get('lower', 0.0)),
                 f"{secs(r.get('compile', 0.0))} ({r['calls'].get('compile', 0)})",
                 secs(r.get('device_wait', 0.0)),
                 secs(r.get('checkpoint', 0.0)), secs(r['host'])])
  return rows


def cpu_overheads() -> str:
  items, rows, out = [], [], []
  for name, label in (('overheads_tiny_before.json', 'before'),
                      ('overheads_tiny.json', 'after'),
                      ('overheads_logs_before.json', 'before'),
                      ('overheads_logs.json', 'after')):
    if not (RESULTS / name).is_file():
      continue
    d = load(name)
    items.append((name, d))
    cfg = f"`{d['config']}`"
    for r in d['runs']:
      cache = {'off': 'cache off', 'cold': 'cold cache',
               'warm': 'warm cache'}[r['cache']]
      every = d.get('checkpoint_every', 0)
      ck = 'a checkpoint every round' if not every else f'checkpoints >= {every:g} s apart'
      rows.append(_overhead_row(f'{cfg}, {label}: {cache}, {ck}', r))
  out.append(table(['run', 'process', 'run()', 'trace + lower',
                    'compile (programs)', 'of which cache loads',
                    'device wait', 'checkpoints', 'data, model, encoding',
                    'host'], rows))
  for stem in ('tiny', 'logs'):
    names = [f'overheads_{stem}_before.json', f'overheads_{stem}.json']
    if all((RESULTS / n).is_file() for n in names):
      heads = [r['headline'] for n in names for r in load(n)['runs']]
      same = all(h == heads[0] for h in heads)
      out += ['', f'`configs/{stem}.py`: every evaluated row\'s client-mean '
              f'metrics identical in all {len(heads)} runs above: '
              f'{"yes" if same else "NO"}.']
      b, w = load(names[0])['runs'][0], load(names[1])['runs'][-1]
      if stem == 'logs' and w['cache'] == 'warm':
        fixed = sum(_kind_total(b, k) - _kind_total(w, k)
                    for k in ('compile', 'checkpoint'))
        wait = (_kind_total(b, 'device_wait', 'train')
                - _kind_total(w, 'device_wait', 'train'))
        out[-1] += (
            f' Compilation and checkpoints, what the fixes touch, fell by '
            f'{secs(fixed)} of {secs(b["run_s"])} (warm); the training\'s '
            f'device wait, which no change here touches, moved by '
            f'{secs(wait)} between the runs (the machine\'s drift), so the '
            f'whole-run ratio, {b["process_wall_s"] / w["process_wall_s"]:.2f}'
            f'x, measures the machine as much as the code.')
  for stem in ('tiny', 'logs'):
    name = f'overheads_{stem}_before.json'
    if not (RESULTS / name).is_file():
      continue
    out += ['', f'Per stage, `configs/{stem}.py` before (one run):', '',
            table(['stage', 'wall', 'trace + lower', 'compile (programs)',
                   'device wait', 'checkpoints', 'host'],
                  _stage_rows(load(name)['runs'][0]))]
  return '\n'.join(out + ['', source(*items)])


def side_by_side() -> str:
  items, rows = [], []
  for name in ('side_by_side_tiny.json', 'side_by_side_logs.json'):
    if not (RESULTS / name).is_file():
      continue
    d = load(name)
    items.append((name, d))
    for i, q in enumerate(d['pairs']):
      rows.append([f"`{d['config']}`", i + 1, secs(q['before']['wall_s']),
                   f"{secs(q['after']['wall_s'])} ({q['after_cache']} cache)",
                   f"{q['ratio_wall']:.2f}",
                   'yes' if q['results_identical'] else 'NO'])
  return '\n'.join([
      table(['config', 'pair', 'before', 'after', 'after / before',
             'results.json identical (timings aside)'], rows), '',
      source(*items)])


def _kind_total(run: dict, kind: str, stage: str | None = None) -> float:
  stages = [run['stages'][stage]] if stage else run['stages'].values()
  return sum(r.get(kind, 0.0) for r in stages)


def cpu_overhead_fixes() -> str:
  """Each fix's saving predicted from the before profile, next to the same
  component in the after profile (warm cache) and the side-by-side walls."""
  b = load('overheads_tiny_before.json')
  a = load('overheads_tiny.json')
  before = b['runs'][0]
  warm = [r for r in a['runs'] if r['cache'] == 'warm']
  if not warm:
    raise SystemExit('overheads_tiny.json: no warm-cache run')
  after = warm[-1]
  compile_b = _kind_total(before, 'compile')
  search_b = _kind_total(before, 'compile', 'search')
  ck_b = _kind_total(before, 'checkpoint')
  def saves(run):
    return sum(r['calls'].get('saves', r['calls'].get('checkpoint', 0))
               for r in run['stages'].values())
  n_b, n_a = saves(before), saves(after)
  rows = [
      ['persistent compilation cache (warm)',
       f'the compile time of every program but the search: '
       f'{secs(compile_b - search_b)}',
       f'compile {secs(compile_b)} -> {secs(_kind_total(after, "compile"))}'
       f' (search included, next row)'],
      ['search progress callback only on a terminal',
       f'the search\'s compile time: {secs(search_b)}',
       f'search compile {secs(search_b)} -> '
       f'{secs(_kind_total(after, "compile", "search"))}'],
      ['checkpoints >= 60 s apart, and after each phase',
       f'{n_b - n_a} of {n_b} saves: {secs(ck_b * (n_b - n_a) / max(n_b, 1))}',
       f'checkpoints {secs(ck_b)} -> '
       f'{secs(_kind_total(after, "checkpoint"))}'],
  ]
  predicted = compile_b + ck_b * (n_b - n_a) / max(n_b, 1)
  wait = _kind_total(after, 'device_wait')
  lines = [table(['fix', 'predicted saving (from the before profile)',
                  'the same component, before -> after (warm cache)'], rows),
           '', f'`run()` before: {secs(before["run_s"])}; predicted after, '
           f'with a warm cache: {secs(before["run_s"] - predicted)}; '
           f'measured: {secs(after["run_s"])}. The device wait alone is '
           f'{secs(wait)} of it (the search\'s compute counted as host time '
           f'before, when its progress callback made the call wait for it).']
  sbs = RESULTS / 'side_by_side_tiny.json'
  items = [('overheads_tiny_before.json', b), ('overheads_tiny.json', a)]
  if sbs.is_file():
    d = load(sbs.name)
    items.append((sbs.name, d))
    lines.append(
        f'Whole processes side by side: before {secs(d["before_wall_median"])}'
        f' (median), after {secs(d["pairs"][0]["after"]["wall_s"])} with a '
        f'cold cache (ratio {d["ratio_cold"]:.2f}) and '
        f'{secs(d["after_warm_wall_median"])} warm (median ratio '
        f'{d["ratio_warm_median"]:.2f}); results.json identical in every '
        f'pair: {"yes" if d["all_identical"] else "NO"}. A third of the '
        f'before wall, {secs(d["before_wall_median"] / 3)}, is about what '
        f'the warm run spends on device compute and process start-up alone '
        f'({secs(wait + after["process_wall_s"] - after["run_s"])}).')
  return '\n'.join(lines + ['', source(*items)])


def seed_axis_bound(seeds: int = 3) -> str:
  """What points that differ only in seed could save as one program over a
  seed axis, bounded from the warm-cache profiles: the per-process part is
  paid once, the per-seed compute (training's device wait, the search's,
  evaluation's) ``seeds`` times, since on this CPU a vmapped program over
  more rows costs what the rows cost one by one."""
  items, rows = [], []
  for name in ('overheads_tiny.json', 'overheads_logs.json'):
    if not (RESULTS / name).is_file():
      continue
    d = load(name)
    warm = [r for r in d['runs'] if r['cache'] == 'warm']
    if not warm:
      continue
    items.append((name, d))
    r = warm[-1]
    ev = r['stages'].get('evaluate', {})
    per_seed = (_kind_total(r, 'device_wait', 'train')
                + _kind_total(r, 'device_wait', 'search')
                + ev.get('wall', 0.0) - sum(ev.get(k, 0.0) for k in (
                    'trace', 'lower', 'compile')))
    wall = r['process_wall_s']
    once = wall - per_seed
    loading = sum(_kind_total(r, k) for k in ('data', 'encode'))
    stacked = once + seeds * per_seed
    rows.append([f"`{d['config']}`", secs(wall), secs(per_seed), secs(once),
                 secs(loading), f'{once / wall:.0%}',
                 f'{stacked / (seeds * wall):.2f}'])
  if not rows:
    raise SystemExit('seed-axis: no overheads_*.json with a warm run')
  return '\n'.join([
      table(['config (warm cache)', 'process', 'per-seed compute',
             'paid once per process', 'of which data and encoding',
             'share paid once',
             f'{seeds} seeds stacked / {seeds} processes (bound)'], rows),
      '', source(*items)])


def method_outputs() -> str:
  """Every method's tiny-config outputs, before and after a change of
  code (benchmarks/method_outputs.py --compare --write)."""
  name = 'method_outputs_compare.json'
  d = load(name)
  verdicts = d['methods']
  same = [m for m, v in verdicts.items() if v == 'identical']
  differ = {m: v for m, v in verdicts.items() if v != 'identical'}
  text = (f"`configs/tiny.py`, every method ({len(verdicts)}), commit "
          f"`{d['before_commit']}` against `{d.get('after_commit', '?')}`: "
          f"results.json and metrics.jsonl identical, timings aside, for "
          f"{len(same)} of {len(verdicts)}"
          + ('.' if not differ else '; differing: ' + '; '.join(
              f'`{m}` ({v})' for m, v in differ.items()) + '.'))
  return '\n'.join([text, '', source((name, d))])


def deploy_methods() -> str:
  """Every method through `flwr run` on a local federation (real
  processes), against the simulation."""
  name = 'deploy_methods_real.json'
  d = load(name)
  rows = []
  for r in d['rows']:
    if not r['ran']:
      rows.append([f"`{r['method']}`", 'did not finish', '-', '-', '-'])
      continue
    rows.append([f"`{r['method']}`", 'yes',
                 f"{r['server_state_max_abs_diff']:.1e}",
                 f"{r['client_state_max_abs_diff']:.1e}",
                 'yes' if r['per_client_metrics_equal'] else 'NO'])
  return '\n'.join([
      table(['method', 'flwr run finished', 'server state, max abs diff',
             'client states, max abs diff',
             "every row's per-client metrics equal"], rows), '',
      f"{d['machine']}; `{d['command']}`; config `{d['config']}`"
      + ''.join(f"; `{m}` adds `{e}`" for m, e in d['extra'].items()) + '.',
      '', source((name, d))])


RENDERERS = {
    'first-run': first_run,
    'h200-runs': h200_runs, 'h200-env': h200_env, 'h200-step': h200_step,
    'h200-throughput': h200_throughput, 'cpu-throughput': cpu_throughput,
    'cpu-step-time': cpu_step_time, 'cpu-memory': cpu_memory,
    'cpu-fusion': cpu_fusion, 'cpu-prefix': cpu_prefix, 'cpu-tfds': cpu_tfds,
    'cpu-whole-runs': cpu_whole_runs, 'central-probes': central_probes,
    'cpu-suite': cpu_suite, 'lora-suite': lora_suite, 'dp-suite': dp_suite,
    'stack-memory': stack_memory, 'cpu-overheads': cpu_overheads,
    'side-by-side': side_by_side, 'cpu-overhead-fixes': cpu_overhead_fixes,
    'deploy-methods': deploy_methods, 'seed-axis': seed_axis_bound,
    'method-outputs': method_outputs,
}


# ------------------------------------------------------------------ main

def render(text: str, page: Path) -> str:
  cache = {}

  def fill(m):
    name = m.group('name')
    if name not in RENDERERS:
      raise SystemExit(f'{page}: unknown figures block {name!r} (known: '
                       f'{", ".join(sorted(RENDERERS))})')
    if name not in cache:
      cache[name] = RENDERERS[name]().rstrip('\n') + '\n'
    return m.group(1) + cache[name] + m.group(4)
  return BLOCK.sub(fill, text)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--check', action='store_true',
                 help='change nothing; exit 1 where a block differs')
  p.add_argument('pages', nargs='*', type=Path, default=PAGES)
  a = p.parse_args(argv)
  stale = []
  for page in a.pages:
    text = page.read_text()
    new = render(text, page)
    if new == text:
      continue
    if a.check:
      stale.append(page)
      diff = difflib.unified_diff(text.splitlines(), new.splitlines(),
                                  str(page), 'from the results files',
                                  lineterm='', n=0)
      print('\n'.join(list(diff)[:40]))
    else:
      page.write_text(new)
      print(f'wrote {page}')
  if stale:
    print(f'{len(stale)} page(s) disagree with their results files: '
          f'{", ".join(str(s) for s in stale)}; run python '
          'benchmarks/publish.py', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
