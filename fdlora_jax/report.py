"""Tables and plots from a finished (or partly finished) suite.

  python -m fdlora_jax.report --workdir=runs/cpu [--out=runs/cpu/report]

Reads ``suite.json`` and every point's ``point.json``, ``results.json`` and
``metrics.jsonl`` under ``--workdir`` and writes, to ``--out`` (default
``<workdir>/report``):

* ``runs.json``: one compact record per finished run (data, model, method,
  seed, overrides, every row's mean and per-client metric, timing);
* ``tables.md``: one table per group whose ``report`` is a table, laid out
  like the paper's Tables 3-6: each row's headline figure (results.json
  ``headline_metric``, e.g. pooled F1) as mean [95% interval] over seeds
  (Student t; a single seed shows its bootstrap interval over test
  examples), the highest mean in bold, a line naming data, model and seeds;
  then the table's pairwise comparisons, from the runs' per-example files
  (``predictions/*.npz``): every pair of rows on the same seeds and test
  examples (paired bootstrap of the difference, seeds then examples within
  client x label; exact McNemar on the pooled answers; Holm across the
  table's pairs; a verdict "A better", "B better" or "not distinguishable at
  95%"), every row against each no-model reference, the smallest accuracy
  difference the design detects (power), and the table's ``orderings``;
  then a communication table (bytes per client per round and in total);
* ``pairwise.json``: every comparison's numbers;
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
each client's majority training label; always the positive answer; the
label of the example's system; the label of the nearest training message).
``'orderings': [(claim, [(A, B), ...]), ...]`` states claims "A above B"
between a table's rows; each is reported "held" (every pair's verdict is A
better), "did not hold" (some pair's is B better) or "not distinguishable",
with the differences and their intervals.
``'col_names': {'epsilon=None': 'no DP'}`` renames a column's header.
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

from fdlora_jax import outcomes
from fdlora_jax import stats
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
        'dir': str(pj.parent),
        'point': json.loads(pj.read_text()),
        'results': json.loads(res.read_text()),
        'metrics': [json.loads(l) for l in metrics.read_text().splitlines()
                    if l] if metrics.is_file() else []})
  return points


def headline_name(r: dict) -> str:
  """The figure a run leads with (results.json ``headline_metric``)."""
  return get_path(r, 'headline_metric.name') or r['metric']


def figure(m: dict, r: dict) -> tuple[float, float, float] | None:
  """``(value, low, high)`` of the run's headline figure in one row's
  metrics; runs from before per-example outputs give their client mean
  with no interval."""
  f = get_path(m, f'figures.{headline_name(r)}')
  if f is not None:
    return f['value'], f['low'], f['high']
  v = m['mean'][r['metric']]
  return v, float('nan'), float('nan')


def point_value(p: dict, adapter: str | None, value: str = 'metric'):
  """One seed's number: the headline figure of the adapter's row (the
  method's headline row by default), or a results path."""
  got = point_figure(p, adapter, value)
  return None if got is None else got[0]


def point_figure(p: dict, adapter: str | None, value: str = 'metric'):
  """``(value, low, high)`` of :func:`point_value` (NaN bounds for a
  results path); ``value='figures.NAME'`` picks another figure."""
  r = p['results']
  row = adapter or r['headline']
  if value.startswith('figures.'):
    f = get_path(r, f'models.{row}.{value}')
    return None if f is None else (f['value'], f['low'], f['high'])
  if value != 'metric':
    v = get_path(r, value)
    return None if v is None else (v, float('nan'), float('nan'))
  if row not in r['models']:
    return None
  return figure(r['models'][row], r)


# No-model answers every run scores on its own test split (results.json
# 'reference'), shown under a table's methods with ``'references': True``.
REFERENCES = {'majority': "majority guess (each client's training label)",
              'always_positive': 'always the positive answer',
              'by_system': 'label by system of origin',
              'nearest_message': 'label of the nearest training message'}


def reference_figures(points: list[dict], cols, col_key,
                      name: str) -> list[tuple[float, float, float]]:
  """A no-model reference's headline figure per seed. Runs with the same
  seed share the split, so each seed counts once."""
  per_seed = {}
  for p in points:
    ref = get_path(p['results'], f'reference.{name}')
    if ref is None or _col_key(p, cols) != col_key:
      continue
    per_seed.setdefault(p['results']['seed'], figure(ref, p['results']))
  return [per_seed[k] for k in sorted(per_seed)]


def _same(a, b) -> bool:
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    return float(a) == float(b)
  return a == b


def mean_std(values: list[float]) -> tuple[float, float, int]:
  v = np.asarray([x for x in values if x is not None], float)
  if not len(v):
    return float('nan'), float('nan'), 0
  return float(v.mean()), float(v.std()), len(v)


def interval(figures: list) -> tuple[float, float, float, int]:
  """``(mean, low, high, seeds)`` of per-seed ``(value, low, high)``: a
  Student t interval over seeds, clipped to [0, 1] (every figure here is a
  proportion, F1 or AUC), or one seed's own bootstrap interval."""
  figures = [f for f in figures if f is not None]
  if not figures:
    return float('nan'), float('nan'), float('nan'), 0
  if len(figures) == 1:
    return (*figures[0], 1)
  mean, low, high = stats.seed_interval([f[0] for f in figures])
  return mean, max(low, 0.0), min(high, 1.0), len(figures)


def _col_key(p: dict, cols) -> tuple:
  return tuple(get_path(p['results']['config'], c) for c in cols)


def _fmt_col(cols, key, names=None) -> str:
  text = ', '.join(f'{c.split(".")[-1]}={k}' for c, k in zip(cols, key))
  return (names or {}).get(text, text)


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
def _rows(spec: dict, points: list[dict]) -> dict[str, tuple]:
  """``{row label: (method, adapter or None)}`` of a table, in order."""
  if spec.get('rows', 'method') == 'method':
    labels = list(dict.fromkeys(p['results']['method'] for p in points))
    order = list(spec.get('order', ()))    # e.g. the suite's method order
    labels.sort(key=lambda m: order.index(m) if m in order else len(order))
    return {lab: (lab, None) for lab in labels}
  return {r[0]: (r[1], r[2]) for r in spec['rows']}


def _pct(x: float) -> str:
  return f'{x * 100:.1f}' if np.isfinite(x) else '-'


def table(group: dict, points: list[dict]) -> tuple[str, dict, dict]:
  """Markdown of one table, its cells ``{(row, col): (mean, low, high,
  seeds)}`` (the headline figure, or ``value``, per row and column) and its
  :func:`pairwise` comparisons."""
  spec = group['report']
  cols = tuple(spec.get('cols', ()))
  value = spec.get('value', 'metric')
  is_metric = value == 'metric'
  col_keys = sorted({_col_key(p, cols) for p in points}, key=str)
  pick = _rows(spec, points)
  labels = list(pick)
  cells = {}
  for lab in labels:
    method, adapter = pick[lab]
    for ck in col_keys:
      got = [point_figure(p, adapter, value) for p in points
             if p['results']['method'] == method and
             _col_key(p, cols) == ck]
      if is_metric:
        cells[(lab, ck)] = interval(got)
      else:
        m, sd, n = mean_std([g[0] for g in got if g is not None])
        cells[(lab, ck)] = (m, m - sd, m + sd, n)
  best = {}
  lower = spec.get('best', 'max') == 'min'
  for ck in col_keys:
    finite = [cells[(lab, ck)][0] for lab in labels
              if cells[(lab, ck)][3] and np.isfinite(cells[(lab, ck)][0])]
    if finite:
      best[ck] = min(finite) if lower else max(finite)
  # The threshold-free AUC beside an F1 headline, where the runs have it.
  auc = {}
  if is_metric:
    for lab in labels:
      method, adapter = pick[lab]
      for ck in col_keys:
        got = [point_figure(p, adapter, 'figures.auc') for p in points
               if p['results']['method'] == method and
               _col_key(p, cols) == ck]
        if any(g is not None for g in got):
          auc[(lab, ck)] = interval(got)
  head = ['method' if spec.get('rows', 'method') == 'method' else 'model']
  names = spec.get('col_names')
  head += [_fmt_col(cols, ck, names) or 'value' for ck in col_keys]
  if auc:
    head += [f'AUC {_fmt_col(cols, ck, names)}'.strip() for ck in col_keys]
  paper = spec.get('paper')      # the paper's own figures, beside ours
  if paper:
    head.append(paper['title'])
  lines = [f'### {spec.get("title", group["name"])}', '',
           '| ' + ' | '.join(head) + ' |',
           '|' + '---|' * len(head)]

  def cell(m, lo, hi, n):
    if not n:
      return '-'
    if is_metric:
      return f'{_pct(m)} [{_pct(lo)}, {_pct(hi)}]'
    return f'{m:.1f} ± {(hi - m):.1f}'

  for lab in labels:
    row = [lab]
    for ck in col_keys:
      text = cell(*cells[(lab, ck)])
      if ck in best and cells[(lab, ck)][0] == best[ck]:
        text = f'**{text}**'
      row.append(text)
    if auc:
      row += [cell(*auc[(lab, ck)]) if (lab, ck) in auc else '-'
              for ck in col_keys]
    if paper:
      v = paper['values'].get(lab)
      row.append('' if v is None else f'{v:.2f}')
    lines.append('| ' + ' | '.join(row) + ' |')
  shown_refs = False
  if spec.get('references') and is_metric:
    for name, label in REFERENCES.items():
      refs = {ck: interval(reference_figures(points, cols, ck, name))
              for ck in col_keys}
      if not any(v[3] for v in refs.values()):
        continue
      shown_refs = True
      cells.update({(label, ck): v for ck, v in refs.items()})
      row = [f'_{label}_'] + [f'_{cell(*v)}_' if v[3] else '-'
                              for v in refs.values()] + (
                                  ['-'] * len(col_keys) if auc else []) + (
                                  [''] if paper else [])
      lines.append('| ' + ' | '.join(row) + ' |')
  if is_metric:
    names = sorted({headline_name(p['results']) for p in points})
    unit = (f'{", ".join(names)} in % (results.json `headline_metric`), '
            'the mean over seeds with a 95% Student t interval over seeds, '
            'clipped to [0, 100] '
            '(one seed: its bootstrap interval over test examples); the '
            'highest mean in bold, which alone is no verdict: see the '
            'pairwise table' + ('. AUC: of score(yes) - score(no), '
                                'threshold-free, the same kind of interval'
                                if auc else ''))
  else:
    unit = f'{value}, mean ± std over seeds; lowest in bold'
  refs = (' Rows in italics answer without a model, from the same test '
          'splits.' if shown_refs else '')
  lines += ['', f'{unit}.{refs}', _footer(points), '']
  compared = {}
  if is_metric:
    text, compared = pairwise(group, points)
    lines.append(text)
  return '\n'.join(lines), cells, compared


# ---------------------------------------------------------------------------
# Paired comparisons
# ---------------------------------------------------------------------------
def _outcome(p: dict, row: str) -> outcomes.PerExample | None:
  if 'dir' not in p:
    return None
  path = Path(p['dir']) / 'predictions' / f'{row}.npz'
  return outcomes.load(path) if path.is_file() else None


def _positive(r: dict):
  return 1 if r['metric'] == 'f1' else None


def pairwise(group: dict, points: list[dict]) -> tuple[str, dict]:
  """Every pair of a table's rows on the seeds both have, and every row
  against each no-model reference: the paired bootstrap interval of the
  headline figure's difference (seeds, then examples), McNemar's exact
  test on the pooled answers, Holm's adjustment across the table's pairs,
  and a verdict. Returns markdown and ``{'pairs', 'references',
  'orderings', 'power'}``."""
  spec = group['report']
  pick = _rows(spec, points)
  cols = tuple(spec.get('cols', ()))
  per_row = {}       # label -> {(column, seed): (outcome, point)}
  for lab, (method, adapter) in pick.items():
    for p in points:
      if p['results']['method'] != method:
        continue
      o = _outcome(p, adapter or p['results']['headline'])
      if o is not None:
        key = (_col_key(p, cols), p['results']['seed'])
        per_row.setdefault(lab, {})[key] = (o, p)
  labels = [lab for lab in pick if lab in per_row]
  if not labels:
    return '', {}
  any_r = next(iter(per_row[labels[0]].values()))[1]['results']
  name, positive = headline_name(any_r), _positive(any_r)
  n_clients = any_r['num_clients']
  pairs = []
  for i, a in enumerate(labels):
    for b in labels[i + 1:]:
      seeds = sorted(set(per_row[a]) & set(per_row[b]), key=str)
      if not seeds:
        continue
      d = outcomes.paired_difference(
          [(per_row[a][s][0], per_row[b][s][0]) for s in seeds], name,
          positive, n_clients)
      pairs.append({'a': a, 'b': b, 'seeds': seeds, **d})
  for d, h in zip(pairs, stats.holm([d['p_mcnemar'] for d in pairs])):
    d['p_holm'] = h
    d['verdict'] = _verdict(d, d['a'], d['b'])
  versus = []
  for lab in labels:
    for key, ref_label in REFERENCES.items():
      seeds = sorted(per_row[lab], key=str)
      refs = [_outcome(per_row[lab][s][1], f'reference_{key}') for s in seeds]
      if any(r is None for r in refs):
        continue
      d = outcomes.paired_difference(
          [(per_row[lab][s][0], r) for s, r in zip(seeds, refs)], name,
          positive, n_clients)
      versus.append({'a': lab, 'b': key, 'seeds': seeds, **d})
  for d, h in zip(versus, stats.holm([d['p_mcnemar'] for d in versus])):
    d['p_holm'] = h
    d['verdict'] = ('beats it' if _verdict(d, 'a', 'b') == 'a better'
                    else 'does not beat it')
  auc_pairs = _auc_pairs(pairs, per_row, positive, n_clients)
  power = _power(pairs, name)
  orderings = [_ordering(claim, want, pairs)
               for claim, want in spec.get('orderings', ())]
  lines = [f'Pairwise ({name}, A - B in points; {_fmt_seeds(pairs)}):', '',
           '| A | B | A - B [95% interval] | A only / B only right | '
           'McNemar p | Holm p | verdict |', '|---|---|---|---|---|---|---|']
  for d in pairs:
    lines.append(f'| {d["a"]} | {d["b"]} | {_diff(d)} | {d["a_only"]} / '
                 f'{d["b_only"]} | {_p(d["p_mcnemar"])} | {_p(d["p_holm"])} '
                 f'| {d["verdict"]} |')
  lines += ['', 'Each row against the answers that need no model (same '
            'seeds and test examples):', '',
            '| row | reference | row - reference [95% interval] | Holm p | '
            'verdict |', '|---|---|---|---|---|']
  for d in versus:
    lines.append(f'| {d["a"]} | {REFERENCES[d["b"]]} | {_diff(d)} | '
                 f'{_p(d["p_holm"])} | {d["verdict"]} |')
  lines += ['', VERDICT_RULE, '']
  if auc_pairs:
    lines += [f'Pairwise AUC (of score(yes) - score(no), threshold-free; A - '
              f'B in points, {100 * (1 - 0.05 / len(auc_pairs)):.2f}% '
              'intervals: Bonferroni over the table\'s pairs):', '',
              '| A | B | A - B [interval] | verdict |', '|---|---|---|---|']
    for d in auc_pairs:
      lines.append(f'| {d["a"]} | {d["b"]} | {_diff(d)} | {d["verdict"]} |')
    lines.append('')
  if power:
    lines += [power['text'], '']
  for o in orderings:
    lines.append(f'* **{o["claim"]}**: {o["result"]} ({o["detail"]})')
  if orderings:
    lines.append('')
  return '\n'.join(lines), {'group': group['name'], 'figure': name,
                            'pairs': pairs, 'auc_pairs': auc_pairs,
                            'references': versus,
                            'orderings': orderings, 'power': power}


VERDICT_RULE = (
    'A verdict names a winner only when the paired bootstrap interval of '
    'the difference (seeds resampled, then test examples within client x '
    'label) excludes 0 and the Holm-adjusted exact McNemar p (on the '
    'answers pooled over seeds) is below 0.05; otherwise "not '
    'distinguishable at 95%".')


def _verdict(d: dict, a: str, b: str) -> str:
  return stats.verdict(d['low'], d['high'], a, b, p=d['p_holm'])


def _p(p: float) -> str:
  """A p-value; one below the smallest double prints as a bound, not 0."""
  return f'{p:.3g}' if p > 0 else '< 1e-300'


def _pts(x: float) -> str:
  """A difference in points, signed; never "-0.0"."""
  return f'{round(x * 100, 1) + 0.0:+.1f}'


def _diff(d: dict) -> str:
  return f'{_pts(d["difference"])} [{_pts(d["low"])}, {_pts(d["high"])}]'


def _fmt_seeds(pairs: list[dict]) -> str:
  seeds = sorted({k[1] for d in pairs for k in d['seeds']})
  settings = {k[0] for d in pairs for k in d['seeds']}
  return f'seeds {seeds}' + (f', paired within each of {len(settings)} '
                             'settings' if len(settings) > 1 else '')


def _auc_pairs(pairs, per_row, positive, n_clients) -> list[dict]:
  """The pairs again on AUC, where both rows have option scores: paired
  bootstrap intervals at a Bonferroni-adjusted level; a verdict where the
  interval excludes 0."""
  if positive is None:
    return []
  todo = [d for d in pairs if all(
      o.scores is not None for lab in (d['a'], d['b'])
      for o, _ in (per_row[lab][k] for k in d['seeds']))]
  out = []
  for d in todo:
    try:
      a = outcomes.paired_difference(
          [(per_row[d['a']][k][0], per_row[d['b']][k][0])
           for k in d['seeds']], 'auc', positive, n_clients,
          level=1 - 0.05 / len(todo))
    except KeyError:      # a seed whose test split lacks a class
      continue
    a['verdict'] = stats.verdict(a['low'], a['high'], d['a'], d['b'])
    out.append({'a': d['a'], 'b': d['b'], 'seeds': d['seeds'], **a})
  return out


def _power(pairs: list[dict], name: str) -> dict:
  """What the design can detect (80% power, 5% level): in the headline
  figure, from the paired bootstrap's standard error of the pairs'
  differences (median over pairs whose rows ever disagree); in accuracy,
  from the test examples and the pairs' median disagreement (McNemar)."""
  if not pairs:
    return {}
  n = max(d['n'] for d in pairs)
  ses = [d['se'] for d in pairs if d['se'] > 0]
  out = {'n': n, 'figure': name}
  if ses:
    se = float(np.median(ses))
    out.update(se=se, min_detectable=stats.detectable_difference(se))
    figure = (f'Power: in {name}, the median pair\'s bootstrap standard '
              f'error (seeds, then examples) is {se * 100:.1f} points, so '
              'this design detects differences of about '
              f'{out["min_detectable"] * 100:.1f} points at 80% power (5% '
              'level, normal approximation)')
  else:
    figure = (f'Power: no pair of rows ever gave different answers, so '
              f'these runs cannot show a difference in {name}')
  disc = float(np.median([(d['a_only'] + d['b_only']) / d['n']
                          for d in pairs]))
  if disc <= 0:
    assumed = 0.1
    mdd = stats.min_detectable_difference(n, assumed)
    out.update(discordant=0.0, min_detectable_accuracy=mdd)
    out['text'] = (f'{figure}. In accuracy, on {n} paired test answers (all '
                   f'seeds): had two rows disagreed on {assumed:.0%} of them, '
                   f'differences of about {mdd * 100:.1f} points (McNemar).')
    return out
  mdd = stats.min_detectable_difference(n, disc)
  out.update(discordant=disc, min_detectable_accuracy=mdd)
  out['text'] = (f'{figure}. In accuracy, on {n} paired test answers (all '
                 f'seeds), where the median pair disagrees on {disc:.1%}: '
                 f'differences of about {mdd * 100:.1f} points (McNemar).')
  return out


def _ordering(claim: str, want: list, pairs: list[dict]) -> dict:
  """'held' (every "A above B" has verdict A better), 'did not hold' (some
  has B better) or 'not distinguishable', with the differences."""
  found, details = [], []
  for a, b in want:
    d = next((x for x in pairs if (x['a'], x['b']) == (a, b)), None)
    flip = d is None
    if flip:
      d = next((x for x in pairs if (x['a'], x['b']) == (b, a)), None)
    if d is None:
      found.append('missing')
      details.append(f'{a} vs {b}: not run')
      continue
    sign = -1 if flip else 1
    diff, low, high = (sign * d['difference'], *sorted(
        (sign * d['low'], sign * d['high'])))
    v = d['verdict']
    found.append('held' if v == f'{a} better' else
                 'did not hold' if v == f'{b} better' else 'nd')
    details.append(f'{a} - {b} {_pts(diff)} [{_pts(low)}, {_pts(high)}]')
  result = ('did not hold' if 'did not hold' in found else
            'held' if all(f == 'held' for f in found) else
            'not run' if all(f == 'missing' for f in found) else
            'not distinguishable')
  return {'claim': claim, 'result': result, 'detail': '; '.join(details)}


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
def write_report(workdir: str | Path, out: str | Path = '',
                 quiet: bool = False) -> dict:
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
  plots, all_cells, pairs_out = [], {}, []
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
      text, cells, compared = table(g, mine)
      parts.append(text)
      all_cells[g['name']] = cells
      if compared:
        pairs_out.append(compared)
  parts.append(communication(points))
  (out / 'tables.md').write_text('\n'.join(parts))
  (out / 'runs.json').write_text(json.dumps(runs_summary(points), indent=1))
  (out / 'pairwise.json').write_text(json.dumps(pairs_out, indent=1))
  if not quiet:
    print(f'wrote {out / "tables.md"}, {out / "pairwise.json"}, '
          f'{out / "runs.json"} and {len(plots)} plot(s)')
  return {'tables': out / 'tables.md', 'runs': out / 'runs.json',
          'pairwise': out / 'pairwise.json', 'plots': plots,
          'num_points': len(points),
          'cells': all_cells, 'pairs': pairs_out}


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
        'headline_figure': headline_name(r),
        'rows': {k: {'mean': v['mean'][metric],
                     'per_client': [c[metric] for c in v['per_client']],
                     'headline': dict(zip(('value', 'low', 'high'),
                                          figure(v, r)))}
                 for k, v in r['models'].items()},
        'reference': {k: dict(zip(('value', 'low', 'high'), figure(v, r)))
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
