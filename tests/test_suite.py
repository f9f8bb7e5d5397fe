"""The suite runner and the report (fdlora_jax/suite.py, report.py)."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from fdlora_jax import report as report_lib
from fdlora_jax import run as run_lib
from fdlora_jax import suite as suite_lib
from fdlora_jax.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def tiny_suite(tmp_path):
  s = suite_lib.load_file(REPO / 'configs/suites/tiny.py', 'get_suite')
  s['fixed']['model.tokenizer_cache'] = str(tmp_path / 'tok')
  return s


def test_tiny_suite_runs_reports_and_resumes(tmp_path, monkeypatch):
  suite = tiny_suite(tmp_path)
  points = suite_lib.expand(suite)
  assert len(points) == 2 * 2 * 2 + 2 * 2
  work = tmp_path / 'w'

  # Kill the suite at its 4th point: 3 points finish.
  real = run_lib.run
  calls = []

  def dying(c, workdir):
    calls.append(workdir)
    if len(calls) == 4:
      raise KeyboardInterrupt('killed')
    return real(c, workdir)
  monkeypatch.setattr(run_lib, 'run', dying)
  with pytest.raises(KeyboardInterrupt):
    suite_lib.run_suite(suite, work, REPO)
  finished = sorted(p.parent for p in work.rglob('results.json'))
  assert len(finished) == 3

  # Resume: the 3 finished points are not run again.
  calls.clear()
  monkeypatch.setattr(run_lib, 'run', lambda c, w: (calls.append(w),
                                                    real(c, w))[1])
  out = suite_lib.run_suite(suite, work, REPO)
  assert out == {'done': len(points), 'ran': len(points) - 3,
                 'skipped': 3, 'seconds': pytest.approx(out['seconds'])}
  assert not set(map(str, finished)) & set(calls)

  rep = report_lib.write_report(work)
  text = rep['tables'].read_text()
  for title in ('Table 3 (RQ1), tiny', 'Table 6 (RQ7), tiny',
                'Communication', 'Figure 5 (RQ2), tiny'):
    assert title in text
  assert 'seeds: [0, 1]' in text and 'SYNTHETIC' in text
  assert rep['plots'] and rep['plots'][0].stat().st_size > 1000
  assert rep['plots'][0].read_bytes()[:4] == b'\x89PNG'
  # One cell by hand: FedAvg at alpha 0.5, the mean over the two seeds of
  # each seed's headline figure (pooled F1 of its headline row, global),
  # with Student's t interval over the seeds.
  vals = []
  for seed in (0, 1):
    r = json.loads((work / 'rq1' / 'method=fedavg,dirichlet_alpha=0.5' /
                    f'seed{seed}' / 'results.json').read_text())
    assert r['headline'] == 'global'
    assert r['headline_metric']['name'] == 'pooled_f1'
    vals.append(r['models']['global']['figures']['pooled_f1']['value'])
  m, lo, hi, n = rep['cells']['rq1'][('fedavg', (0.5,))]
  half = scipy_stats.t.ppf(0.975, 1) * np.std(vals, ddof=1) / np.sqrt(2)
  assert n == 2 and m == pytest.approx(sum(vals) / 2)
  # t interval clipped to [0, 1]: every figure is a proportion.
  assert (lo, hi) == pytest.approx((max(m - half, 0.0), min(m + half, 1.0)))
  assert f'{m * 100:.1f} [{lo * 100:.1f}, {hi * 100:.1f}]' in text
  runs = json.loads(rep['runs'].read_text())
  assert len(runs) == len(points)
  fedavg = sorted((r for r in runs if r['id'].startswith(
      'rq1/method=fedavg,dirichlet_alpha=0.5')), key=lambda r: r['seed'])
  assert [r['rows']['global']['headline']['value'] for r in fedavg] == vals
  assert all(r['is_synthetic'] and r['model'] for r in runs)

  # The pairwise table, re-derived from the per-example files alone.
  pairs = {(d['a'], d['b']): d for g in json.loads(
      rep['pairwise'].read_text()) if g['group'] == 'rq7'
           for d in g['pairs']}
  assert len(pairs) == 6            # 4 fusion rows, every pair once
  diffs, a_only, b_only = [], 0, 0
  for alpha in (0.5, 1.0):
    for seed in (0, 1):
      pred = work / 'rq1' / f'method=fdlora,dirichlet_alpha={alpha}' / \
          f'seed{seed}' / 'predictions'
      a, b = (np.load(pred / f'{row}.npz') for row in ('fused', 'fusion_sum'))
      assert (a['example'] == b['example']).all()
      f1 = lambda o: 2 * np.sum((o['pred'] == 1) & (o['label'] == 1)) / max(
          np.sum(o['pred'] == 1) + np.sum(o['label'] == 1), 1)
      diffs.append(f1(a) - f1(b))
      ra, rb = a['pred'] == a['label'], b['pred'] == b['label']
      a_only += int(np.sum(ra & ~rb))
      b_only += int(np.sum(~ra & rb))
  d = pairs[('Sum', 'AdaFusion')]
  assert d['difference'] == pytest.approx(-np.mean(diffs))
  assert (d['a_only'], d['b_only']) == (b_only, a_only)
  k = a_only + b_only
  p = (min(1.0, 2 * scipy_stats.binom.cdf(min(a_only, b_only), k, 0.5))
       if k else 1.0)
  assert d['p_mcnemar'] == pytest.approx(p)
  assert d['low'] <= d['difference'] <= d['high']
  holm = sorted(x['p_holm'] for x in pairs.values())
  assert holm == sorted(holm) and all(x['p_holm'] >= x['p_mcnemar']
                                      for x in pairs.values())
  pts = lambda x: f'{round(x * 100, 1) + 0.0:+.1f}'
  assert (f'| Sum | AdaFusion | {pts(d["difference"])} '
          f'[{pts(d["low"])}, {pts(d["high"])}] |') in text
  assert 'label by system of origin' in text
  # Power: the median bootstrap standard error of the pairs that ever
  # disagree, times z_0.975 + z_0.8.
  power = next(g['power'] for g in json.loads(rep['pairwise'].read_text())
               if g['group'] == 'rq7')
  ses = [x['se'] for x in pairs.values() if x['se'] > 0]
  assert ses, 'the tiny fusion rows never disagree: the power check is void'
  assert power['min_detectable'] == pytest.approx(
      (1.959963984540054 + 0.8416212335729143) * np.median(ses))
  assert f'{power["min_detectable"] * 100:.1f} points at 80% power' in text

  # The suite changed since: a finished point is refused, not reported
  # stale, and nothing runs.
  suite['fixed']['fdlora.fusion.population_size'] = 6
  monkeypatch.setattr(run_lib, 'run', lambda c, w: pytest.fail('ran'))
  with pytest.raises(ConfigError, match=r'rq1/method=fdlora.*'
                     r'fdlora\.fusion\.population_size: 4 -> 6'):
    suite_lib.run_suite(suite, work, REPO)


def test_bad_suite_field_is_rejected_before_any_run(tmp_path):
  suite = tiny_suite(tmp_path)
  suite['groups'][0]['grid']['fl.roundz'] = (1,)
  with pytest.raises(ConfigError, match=r'fl\.roundz: no such field '
                     r'\(did you mean fl\.rounds\?\)'):
    suite_lib.run_suite(suite, tmp_path / 'w', REPO)
  suite = tiny_suite(tmp_path)
  suite['groups'][0]['grid']['method'] = ('fdlora', 'fedsgd')
  with pytest.raises(ConfigError, match='method'):
    suite_lib.run_suite(suite, tmp_path / 'w', REPO)
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('name', ['cpu', 'paper'])
def test_shipped_suites_build_and_validate_every_point(name, tmp_path,
                                                      monkeypatch, capsys):
  """Every point of the suites the README runs has a valid config, and
  every report reads groups that exist (a dry run runs nothing)."""
  monkeypatch.chdir(REPO)
  suite = suite_lib.load_file(REPO / f'configs/suites/{name}.py',
                              'get_suite')
  out = suite_lib.run_suite(suite, tmp_path / 'w', REPO, dry_run=True)
  assert out['ran'] == 0 and not (tmp_path / 'w').exists()
  listed = [l for l in capsys.readouterr().out.splitlines()
            if l.startswith('todo  ')]
  assert len(listed) == len(suite_lib.expand(suite)) > 0
  suite['groups'][-1]['report']['from'] = 'rq_missing'
  with pytest.raises(ConfigError, match='rq_missing'):
    suite_lib.run_suite(suite, tmp_path / 'w', REPO, dry_run=True)


def test_table_puts_the_papers_figures_beside_its_own():
  """A 'paper' column is quoted as given, and never wins the bold."""
  def point(method, seed, f1):
    return {'results': {
        'method': method, 'headline': 'x', 'metric': 'f1', 'seed': seed,
        'config': {'data': {'dirichlet_alpha': 0.5}},
        'models': {'x': {'mean': {'f1': f1}}},
        'data_source': 'real: test', 'model': 'm', 'is_synthetic': False}}
  points = [point('fdlora', 0, 0.5), point('fdlora', 1, 0.7),
            point('fedavg', 0, 0.55), point('fedavg', 1, 0.55)]
  group = {'name': 'rq1', 'report': {
      'kind': 'table', 'rows': 'method', 'cols': ('data.dirichlet_alpha',),
      'paper': {'title': 'paper (Table 3)',
                'values': {'fdlora': 78.17, 'fedavg': 44.53}}}}
  text, cells, _ = report_lib.table(group, points)
  assert text.index('| fdlora |') < text.index('| fedavg |')
  group['report']['order'] = ('fedavg', 'fdlora')
  assert (report_lib.table(group, points)[0].index('| fedavg |') <
          report_lib.table(group, points)[0].index('| fdlora |'))
  del group['report']['order']
  assert '| method | dirichlet_alpha=0.5 | paper (Table 3) |' in text
  # Mean [Student t interval over the 2 seeds]: 0.6 +- 12.706 * 0.1,
  # clipped to [0, 1] (F1 is a proportion).
  assert '| fdlora | **60.0 [0.0, 100.0]** | 78.17 |' in text
  assert '| fedavg | 55.0 [55.0, 55.0] | 44.53 |' in text
  assert '**78.17**' not in text
  assert cells[('fdlora', (0.5,))] == pytest.approx((0.6, 0.0, 1.0, 2))
  # Unclipped where the interval fits (five seeds).
  five = [point('fdlora', s, f) for s, f in enumerate(
      (0.5, 0.55, 0.6, 0.65, 0.7))]
  half = scipy_stats.t.ppf(0.975, 4) * np.std([0.5, 0.55, 0.6, 0.65, 0.7],
                                              ddof=1) / np.sqrt(5)
  assert report_lib.table(group, five)[1][('fdlora', (0.5,))] == \
      pytest.approx((0.6, 0.6 - half, 0.6 + half, 5))


def test_table_shows_the_no_model_references_once_per_seed():
  """'references': True adds the majority guess and "always positive" rows
  (italics, never bold), each seed counted once however many methods ran."""
  def point(method, seed, f1, majority, always):
    ref = lambda v: {'mean': {'f1': v}}
    return {'results': {
        'method': method, 'headline': 'x', 'metric': 'f1', 'seed': seed,
        'config': {'data': {'dirichlet_alpha': 0.5}},
        'models': {'x': {'mean': {'f1': f1}}},
        'reference': {'majority': ref(majority),
                      'always_positive': ref(always)},
        'data_source': 'real: test', 'model': 'm', 'is_synthetic': False}}
  points = [point('fdlora', 0, 0.5, 0.9, 0.2),
            point('fedavg', 0, 0.4, 0.9, 0.2),
            point('fdlora', 1, 0.7, 0.7, 0.4),
            point('fedavg', 1, 0.6, 0.7, 0.4)]
  group = {'name': 'rq1', 'report': {
      'kind': 'table', 'rows': 'method', 'cols': ('data.dirichlet_alpha',),
      'references': True}}
  text, cells, _ = report_lib.table(group, points)
  majority = report_lib.REFERENCES['majority']
  assert cells[(majority, (0.5,))][::3] == pytest.approx((0.8, 2))
  assert f'| _{majority}_ | _80.0 [0.0, 100.0]_ |' in text
  assert '| _always the positive answer_ | _30.0 [0.0, 100.0]_ |' in text
  # The best method is bold; the better reference (80 > 60) is not.
  assert '| fdlora | **60.0 [0.0, 100.0]** |' in text
  assert '**80.0' not in text
  # Without the flag, no reference rows.
  del group['report']['references']
  assert majority not in report_lib.table(group, points)[0]


def test_footer_names_a_seeded_data_source_once():
  points = [{'results': {'data_source': f'real: logs (subsample of 200, '
                                         f'seed {s})', 'model': 'm',
                         'seed': s, 'is_synthetic': False}}
            for s in (0, 1, 2)]
  footer = report_lib._footer(points)   # pylint: disable=protected-access
  assert footer.count('real: logs') == 1
  assert 'subsample of 200, seed of the run' in footer
  assert 'seeds: [0, 1, 2] (3 runs)' in footer
