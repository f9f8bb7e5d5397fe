"""Tables and plots from a finished (or partly finished) suite.

  python -m fdlora_jax.report --workdir=runs/cpu [--out=runs/cpu/report]

Reads ``suite.json`` and every point's ``point.json``, ``results.json`` and
``metrics.jsonl`` under ``--workdir`` and writes, to ``--out`` (default
``<workdir>/report``):

* ``runs.json``: one compact record per finished run (data, model, method,
  seed, overrides, every row's mean and per-client metric, timing);
* ``tables.md``: one table per group whose ``report`` is a table, laid out
  like the paper's Tables 3-6: mean +- std over seeds (of each seed's mean
  over clients), the best value of each column in bold, and a line naming
  data, model and seeds under it; then a communication table (bytes per
  client per round and in total, for every method, from the engine's counts);
* one PNG per group whose ``report`` is a curve (Figures 5-7): the progress
  metric per round, one line per setting, a band for the std over seeds.

A group's ``report`` (in the suite file)::

  {'kind': 'table', 'title': ..., 'rows': 'method',        # one row per method
   'cols': ('data.task', 'data.dirichlet_alpha'),          # config paths
   'order': ('fdlora', 'fedavg', ...)}                     # row order
  {'kind': 'table', 'title': ..., 'rows': [(label, method, adapter), ...],
   'cols': (...), 'value': 'metric' | 'timing.total_s'}    # named adapters
  {'kind': 'curve', 'title': ..., 'series': 'fl.num_clients',
   'row': 'global', 'file': 'fig5_clients.png'}

``'paper': {'title': ..., 'values': {row label: value in %}}`` adds a last
column with the paper's figures, quoted as given (never bolded or compared).
``'references': True`` adds, in italics and never bolded, the no-model
answers every run scores on its test split (``results.json`` ``reference``:
each client's majority training label; always the positive answer).
``'from': '<group>'`` (or a list of groups) reads other groups' points (a
group without ``config`` runs nothing itself); ``'where': {path: value}``
keeps only the points whose config has those values.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags

from fdlora_jax.errors import (UserError, exit_on_user_error, fail,
                               parse_flags)

# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------
def get_path(d: dict, path: str) -> Any:
  for k in path.split('.'):
    if not isinstance(d, dict) or k not in d:
      return None
    d = d[k]
  return d


def load_points(workdir: Path) -> list[dict]:
  """Finished points: ``point.json`` + ``results.json`` + metrics lines."""
  points = []
  for pj in sorted(workdir.rglob('point.json')):
    res = pj.parent / 'results.json'
    if not res.is_file():
      continue
    metrics = pj.parent / 'metrics.jsonl'
    points.append({
        'point': json.loads(pj.read_text()),
        'results': json.loads(res.read_text()),
        'metrics': [json.loads(l) for l in metrics.read_text().splitlines()
                    if l] if metrics.is_file() else []})
  return points


def point_value(p: dict, adapter: str | None, value: str = 'metric'):
  """One seed's number: the adapter's mean metric over clients (the
  method's headline adapter by default), or a results path."""
  r = p['results']
  if value != 'metric':
    return get_path(r, value)
  row = adapter or r['headline']
  if row not in r['models']:
    return None
  return r['models'][row]['mean'][r['metric']]


# No-model answers every run scores on its own test split (results.json
# 'reference'), shown under a table's methods with ``'references': True``.
REFERENCES = {'majority': "majority guess (each client's training label)",
              'always_positive': 'always the positive answer'}


def reference_cell(points: list[dict], cols, col_key,
                   name: str) -> tuple[float, float, int]:
  """Mean +- std over seeds of a no-model reference. Runs with the same
  seed share the split, so each seed counts once."""
  per_seed = {}
  for p in points:
    ref = get_path(p['results'], f'reference.{name}')
    if ref is None or _col_key(p, cols) != col_key:
      continue
    per_seed.setdefault(p['results']['seed'],
                        ref['mean'][p['results']['metric']])
  return mean_std(list(per_seed.values()))


def _same(a, b) -> bool:
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    return float(a) == float(b)
  return a == b


def mean_std(values: list[float]) -> tuple[float, float, int]:
  v = np.asarray([x for x in values if x is not None], float)
  if not len(v):
    return float('nan'), float('nan'), 0
  return float(v.mean()), float(v.std()), len(v)


def _col_key(p: dict, cols) -> tuple:
  return tuple(get_path(p['results']['config'], c) for c in cols)


def _fmt_col(cols, key) -> str:
  return ', '.join(f'{c.split(".")[-1]}={k}' for c, k in zip(cols, key))


def _footer(points: list[dict]) -> str:
  # Sources that differ only in their seeded subsample are named once.
  data = sorted({re.sub(r'\bseed \d+\b', 'seed of the run',
                        p['results']['data_source']) for p in points})
  models = sorted({p['results']['model'] for p in points})
  seeds = sorted({p['results']['seed'] for p in points})
  synthetic = any(p['results']['is_synthetic'] for p in points)
  return (f'_data: {"; ".join(data)}{" (SYNTHETIC)" if synthetic else ""}. '
          f'model: {"; ".join(models)}. seeds: {seeds} '
          f'({len(points)} runs)._')


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------
def table(group: dict, points: list[dict]) -> tuple[str, dict]:
  """Markdown of one table, and its cells ``{(row, col): (mean, std, n)}``."""
  spec = group['report']
  cols = tuple(spec.get('cols', ()))
  value = spec.get('value', 'metric')
  scale = 100.0 if value == 'metric' else 1.0
  col_keys = sorted({_col_key(p, cols) for p in points}, key=str)
  if spec.get('rows', 'method') == 'method':
    labels = list(dict.fromkeys(p['results']['method'] for p in points))
    order = list(spec.get('order', ()))    # e.g. the suite's method order
    labels.sort(key=lambda m: order.index(m) if m in order else len(order))
    pick = {lab: (lab, None) for lab in labels}
  else:
    labels = [r[0] for r in spec['rows']]
    pick = {r[0]: (r[1], r[2]) for r in spec['rows']}
  cells = {}
  for lab in labels:
    method, adapter = pick[lab]
    for ck in col_keys:
      vals = [point_value(p, adapter, value) for p in points
              if p['results']['method'] == method and
              _col_key(p, cols) == ck]
      cells[(lab, ck)] = mean_std(vals)
  best = {}
  lower = spec.get('best', 'max') == 'min'
  for ck in col_keys:
    finite = [cells[(lab, ck)][0] for lab in labels
              if cells[(lab, ck)][2] and np.isfinite(cells[(lab, ck)][0])]
    if finite:
      best[ck] = min(finite) if lower else max(finite)
  head = ['method' if spec.get('rows', 'method') == 'method' else 'model']
  head += [_fmt_col(cols, ck) or 'value' for ck in col_keys]
  paper = spec.get('paper')      # the paper's own figures, beside ours
  if paper:
    head.append(paper['title'])
  lines = [f'### {spec.get("title", group["name"])}', '',
           '| ' + ' | '.join(head) + ' |',
           '|' + '---|' * len(head)]
  for lab in labels:
    row = [lab]
    for ck in col_keys:
      m, s, n = cells[(lab, ck)]
      if not n:
        row.append('-')
        continue
      text = f'{m * scale:.2f} ± {s * scale:.2f}'
      if ck in best and m == best[ck]:
        text = f'**{text}**'
      row.append(text)
    if paper:
      v = paper['values'].get(lab)
      row.append('' if v is None else f'{v:.2f}')
    lines.append('| ' + ' | '.join(row) + ' |')
  shown_refs = False
  if spec.get('references') and value == 'metric':
    for name, label in REFERENCES.items():
      refs = {ck: reference_cell(points, cols, ck, name) for ck in col_keys}
      if not any(n for _, _, n in refs.values()):
        continue
      shown_refs = True
      cells.update({(label, ck): v for ck, v in refs.items()})
      row = [f'_{label}_'] + [
          f'_{m * scale:.2f} ± {s * scale:.2f}_' if n else '-'
          for m, s, n in refs.values()] + ([''] if paper else [])
      lines.append('| ' + ' | '.join(row) + ' |')
  unit = ('mean ± std over seeds of the mean over clients, in %'
          if value == 'metric' else f'{value}, mean ± std over seeds')
  refs = (' Rows in italics answer without a model, from the same test '
          'splits (never bolded).' if shown_refs else '')
  lines += ['', f'{unit}; best per column in bold.{refs}', _footer(points),
            '']
  return '\n'.join(lines), cells


def communication(points: list[dict]) -> str:
  by_method: dict[str, list] = {}
  for p in points:
    c = p['results']['communication']
    rounds = [r for r in c['per_round'] if r['phase'] != 'local'] or \
        c['per_round']
    per_round = (np.mean([np.mean(r['bytes_up_per_client']) +
                          np.mean(r['bytes_down_per_client'])
                          for r in rounds]) if rounds else 0.0)
    by_method.setdefault(p['results']['method'], []).append(
        (per_round, c['bytes_total'], p['results']['num_clients'],
         len(c['per_round'])))
  lines = ['### Communication', '',
           '| method | bytes per client per round (up + down) | '
           'total bytes (all clients, whole run) |', '|---|---|---|']
  for m, rows in by_method.items():
    per_round = np.mean([r[0] for r in rows])
    total = np.mean([r[1] for r in rows])
    lines.append(f'| {m} | {per_round:,.0f} | {total:,.0f} |')
  lines += ['', 'From the engine\'s counts of the arrays each client '
            'downloaded and uploaded (`results.json` `communication`), '
            'averaged over the runs of each method.', _footer(points), '']
  return '\n'.join(lines)


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------
def curve(group: dict, points: list[dict], out: Path) -> Path:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  spec = group['report']
  key = f'eval_{spec.get("row", "global")}'
  series: dict[Any, list[dict[int, float]]] = {}
  metric = points[0]['results']['metric'] if points else 'f1'
  for p in points:
    s = get_path(p['results']['config'], spec['series'])
    if s is not None and isinstance(s, float) and not np.isfinite(s):
      s = 'inf'
    per_round = {l['round']: l[key][metric] for l in p['metrics']
                 if key in l and metric in l[key]}
    series.setdefault(s, []).append(per_round)
  fig, ax = plt.subplots(figsize=(6, 4))
  for s, runs in sorted(series.items(), key=lambda kv: str(kv[0])):
    rounds = sorted(set().union(*[set(r) for r in runs]))
    if not rounds:
      continue
    vals = np.array([[r.get(t, np.nan) for t in rounds] for r in runs])
    m = np.nanmean(vals, 0) * 100
    sd = np.nanstd(vals, 0) * 100
    ax.plot(rounds, m, marker='o', label=f'{spec["series"].split(".")[-1]}'
            f' = {s}')
    ax.fill_between(rounds, m - sd, m + sd, alpha=0.2)
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))   # rounds
  ax.set_xlabel('round')
  ax.set_ylabel(f'{metric} of the {spec.get("row", "global")} adapter (%), '
                'mean over clients')
  ax.set_title(spec.get('title', group['name']), fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  path = out / spec.get('file', f'{group["name"]}.png')
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


# ---------------------------------------------------------------------------
def write_report(workdir: str | Path, out: str | Path = '') -> dict:
  """Writes tables.md and the PNGs; returns ``{'tables', 'plots',
  'cells'}``."""
  work = Path(workdir).expanduser()
  suite_file = work / 'suite.json'
  if not suite_file.is_file():
    raise UserError(f'{work}: no suite.json; run fdlora_jax.suite there '
                    'first')
  suite = json.loads(suite_file.read_text())['suite']
  out = Path(out) if out else work / 'report'
  out.mkdir(parents=True, exist_ok=True)
  points = load_points(work)
  if not points:
    raise UserError(f'{work}: no finished point (results.json) yet')
  parts = [f'# Suite {suite.get("name", "")}: results', '',
           f'{len(points)} finished runs under `{work}`.', '']
  plots, all_cells = [], {}
  for g in suite['groups']:
    spec = g.get('report', {})
    source = spec.get('from', g['name'])
    sources = {source} if isinstance(source, str) else set(source)
    mine = [p for p in points if p['point']['group'] in sources and all(
        _same(get_path(p['results']['config'], k), v)
        for k, v in spec.get('where', {}).items())]
    if not mine or 'report' not in g:
      continue
    if g['report'].get('kind') == 'curve':
      path = curve(g, mine, out)
      plots.append(path)
      parts += [f'### {g["report"].get("title", g["name"])}', '',
                f'![{g["name"]}]({path.name})', '', _footer(mine), '']
    else:
      text, cells = table(g, mine)
      parts.append(text)
      all_cells[g['name']] = cells
  parts.append(communication(points))
  (out / 'tables.md').write_text('\n'.join(parts))
  (out / 'runs.json').write_text(json.dumps(runs_summary(points), indent=1))
  print(f'wrote {out / "tables.md"}, {out / "runs.json"} and {len(plots)} '
        'plot(s)')
  return {'tables': out / 'tables.md', 'runs': out / 'runs.json',
          'plots': plots, 'cells': all_cells}


def runs_summary(points: list[dict]) -> list[dict]:
  """One compact record per finished run (what the tables were made of):
  its point, data, model, method, seed, overrides, every row's mean and
  per-client metric, the no-model references and the timing."""
  out = []
  for p in points:
    r = p['results']
    metric = r['metric']
    out.append({
        'id': p['point']['id'], 'overrides': p['point']['overrides'],
        'method': r['method'], 'seed': r['seed'],
        'data_source': r['data_source'], 'is_synthetic': r['is_synthetic'],
        'model': r['model'], 'metric': metric, 'headline': r['headline'],
        'rows': {k: {'mean': v['mean'][metric],
                     'per_client': [c[metric] for c in v['per_client']]}
                 for k, v in r['models'].items()},
        'reference': {k: v['mean'][metric]
                      for k, v in r.get('reference', {}).items()},
        'timing_s': r['timing']})
  return out


def _cli():
  workdir = flags.DEFINE_string('workdir', None, 'A suite workdir.')
  out = flags.DEFINE_string('out', '', 'Output directory (default '
                            '<workdir>/report).')

  def main(argv):
    del argv
    if not workdir.value:
      fail('--workdir is required')
    with exit_on_user_error():
      write_report(workdir.value, out.value)

  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  _cli()
