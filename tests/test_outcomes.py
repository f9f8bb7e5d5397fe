"""fdlora_jax.outcomes: per-example records and their figures, by hand."""

import numpy as np
import pytest

from fdlora_jax import outcomes
from fdlora_jax import stats


def hand_example(scores=True) -> outcomes.PerExample:
  # Client 0: labels 1 1 0 0, answers 1 0 0 1; client 1: labels 0 0 0,
  # answers 0 1 0 (no anomalous test example).
  label = np.array([1, 1, 0, 0, 0, 0, 0])
  pred = np.array([1, 0, 0, 1, 0, 1, 0])
  margin = np.array([2.0, -1.0, -3.0, 0.5, -2.0, 1.0, -0.5])
  return outcomes.PerExample(
      client=np.array([0, 0, 0, 0, 1, 1, 1]), example=np.arange(7) + 10,
      label=label, pred=pred,
      scores=np.stack([np.zeros(7), margin], -1) if scores else None)


def test_figures_by_hand():
  f = outcomes.figures(hand_example(), positive=1, num_clients=2)
  v = {k: x['value'] for k, x in f['figures'].items()}
  # Pooled: tp 1, fp 2, fn 1: precision 1/3, recall 1/2, F1 0.4.
  assert v['pooled_precision'] == pytest.approx(1 / 3)
  assert v['pooled_recall'] == pytest.approx(0.5)
  assert v['pooled_f1'] == pytest.approx(0.4)
  assert v['pooled_accuracy'] == pytest.approx(4 / 7)
  # Client F1: 0.5 and 0 (no positive to find); only client 0 has both.
  assert v['client_mean_f1'] == pytest.approx(0.25)
  assert v['client_mean_f1_both'] == pytest.approx(0.5)
  assert f['excluded_clients'] == [1]
  # AUC of the margin: positives 2.0 and -1.0 against negatives -3, 0.5,
  # -2, 1, -0.5: 2.0 beats all 5, -1.0 beats 2 (-3, -2): 7 of 10 pairs.
  assert v['auc'] == pytest.approx(0.7)
  for x in f['figures'].values():
    assert x['low'] <= x['value'] <= x['high']


def test_references_without_scores_have_no_auc_and_multiclass_accuracy():
  f = outcomes.figures(hand_example(scores=False), positive=1, num_clients=2)
  assert 'auc' not in f['figures']
  m = outcomes.figures(hand_example(), positive=None, num_clients=2)
  assert set(m['figures']) == {'pooled_accuracy', 'client_mean_accuracy'}
  # Client accuracies 2/4 and 2/3.
  assert m['figures']['client_mean_accuracy']['value'] == pytest.approx(
      (0.5 + 2 / 3) / 2)


def test_resampling_stays_in_each_stratum():
  strata = np.array([0, 0, 1, 1, 1, 2])
  idx = stats.resample_indices(strata, 200, np.random.default_rng(0))
  assert idx.shape == (200, 6)
  assert (strata[idx] == strata[None]).all()
  assert len(np.unique(idx[:, 2])) == 3    # all of stratum 1 is drawn


def test_constant_answers_per_client_have_a_point_interval():
  # Within client x label strata a client's label counts are fixed, so a
  # rule that answers one label per client scores the same on every draw.
  o = hand_example(scores=False)
  o.pred = np.array([1, 1, 1, 1, 0, 0, 0])
  f = outcomes.figures(o, positive=1, num_clients=2)['figures']['pooled_f1']
  assert f['low'] == f['value'] == f['high']


def test_from_arrays_maps_rows_to_examples_and_skips_padding():
  preds = np.array([[1, 0, 0], [0, 1, 0]])
  labels = np.array([[1, 1, 0], [0, 0, 0]])
  valid = np.array([[True, True, False], [True, True, True]])
  scores = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
  o = outcomes.from_arrays(preds, labels, valid, [[7, 3], [0, 1, 2]], scores)
  assert o.client.tolist() == [0, 0, 1, 1, 1]
  assert o.example.tolist() == [7, 3, 0, 1, 2]
  assert o.pred.tolist() == [1, 0, 0, 1, 0]
  assert o.scores[1].tolist() == [2.0, 3.0]
  with pytest.raises(ValueError, match='client 0'):
    outcomes.from_arrays(preds, labels, valid, [[7], [0, 1, 2]])


def test_save_and_load_round_trip(tmp_path):
  o = hand_example()
  outcomes.save(tmp_path / 'p' / 'fused.npz', o)
  back = outcomes.load(tmp_path / 'p' / 'fused.npz')
  for k in ('client', 'example', 'label', 'pred', 'scores'):
    np.testing.assert_array_equal(getattr(back, k), getattr(o, k))
  outcomes.save(tmp_path / 'r.npz', hand_example(scores=False))
  assert outcomes.load(tmp_path / 'r.npz').scores is None


def test_paired_difference_identities():
  a = hand_example()
  same = outcomes.paired_difference([(a, a), (a, a)], 'pooled_f1', 1, 2)
  assert same['difference'] == same['low'] == same['high'] == 0.0
  assert same['p_mcnemar'] == 1.0 and same['n'] == 14
  # B right everywhere A is wrong (3 examples per seed): McNemar counts
  # b = 0, c = 6 over two seeds, p = 2 / 2**6.
  b = outcomes.PerExample(a.client, a.example, a.label, a.label.copy())
  d = outcomes.paired_difference([(a, b), (a, b)], 'pooled_accuracy', 1, 2)
  assert (d['a_only'], d['b_only']) == (0, 6)
  assert d['p_mcnemar'] == pytest.approx(2 / 64)
  assert d['difference'] == pytest.approx(4 / 7 - 1)
  assert d['high'] < 0 and outcomes.versus(d['low'], d['high']) == 'worse'
  with pytest.raises(ValueError, match='same test examples'):
    c = outcomes.PerExample(a.client, a.example + 1, a.label, a.pred)
    outcomes.paired_difference([(a, c)], 'pooled_f1', 1, 2)


def test_paired_difference_separates_a_real_difference_and_not_noise():
  rng = np.random.default_rng(1)
  label = rng.integers(0, 2, 200)
  client = rng.integers(0, 3, 200)
  def row(p_right):
    pred = np.where(rng.random(200) < p_right, label, 1 - label)
    return outcomes.PerExample(client, np.arange(200), label, pred)
  good, bad, noisy = row(0.9), row(0.6), row(0.9)
  def verdict(a, b):
    d = outcomes.paired_difference([(a, b)], 'pooled_accuracy', 1, 3)
    return stats.verdict(d['low'], d['high'], 'A', 'B', p=d['p_mcnemar'])
  d = outcomes.paired_difference([(good, bad)], 'pooled_accuracy', 1, 3)
  assert d['difference'] == pytest.approx(
      good.correct().mean() - bad.correct().mean())
  assert verdict(good, bad) == 'A better'
  assert verdict(bad, good) == 'B better'
  assert verdict(good, noisy) == 'not distinguishable at 95%'


def test_format_figures_names_the_references_a_row_does_not_beat():
  row = {'figures': {'pooled_f1': {'value': 0.5, 'low': 0.4, 'high': 0.6}},
         'versus_references': {'majority': {'verdict': 'better'},
                               'by_system': {'verdict': 'not '
                                             'distinguishable'}}}
  text = outcomes.format_figures({'fused': row}, 'pooled_f1')
  assert '50.0 [40.0, 60.0]' in text
  assert 'majority; not by_system' in text
