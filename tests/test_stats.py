"""fdlora_jax.stats against known answers: hand counts, worked examples and
exact distributions."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from fdlora_jax import stats


def test_auc_counts_concordant_pairs():
  # Positives 0.35 and 0.8 against negatives 0.1 and 0.4: 0.35 > 0.1,
  # 0.35 < 0.4, 0.8 > both: 3 of 4 pairs.
  assert stats.auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
  # A tie counts one half.
  assert stats.auc([0.5, 0.5, 0.9], [1, 0, 1]) == pytest.approx(0.75)
  with pytest.raises(ValueError, match='positive and one negative'):
    stats.auc([0.1, 0.2], [1, 1])


def test_auc_of_rows_is_the_auc_of_each_row():
  scores = np.array([[0.1, 0.4, 0.35, 0.8], [0.9, 0.1, 0.2, 0.3]])
  labels = [0, 0, 1, 1]
  assert stats.auc(scores, labels) == pytest.approx(
      [stats.auc(scores[0], labels), stats.auc(scores[1], labels)])
  assert stats.auc(scores[1], labels) == 0.5   # 0.2, 0.3 beat 0.1 only


def test_mcnemar_exact_by_hand():
  # A right / B wrong on 1 example, the reverse on 6: X ~ Bin(7, 1/2),
  # p = 2 P(X <= 1) = 2 (1 + 7) / 128 = 0.125.
  a = [1, 0, 0, 0, 0, 0, 0, 1, 1]
  b = [0, 1, 1, 1, 1, 1, 1, 1, 0]
  b_, c, p = stats.mcnemar_exact(a, b)
  assert (b_, c) == (2, 6)
  assert p == pytest.approx(2 * (1 + 8 + 28) / 256)    # 2 P(Bin(8) <= 2)
  assert stats.mcnemar_exact([1] + [0] * 6, [0] + [1] * 6)[2] == 0.125
  assert stats.mcnemar_exact([1, 0], [1, 0]) == (0, 0, 1.0)
  assert stats.mcnemar_exact([1] * 5 + [0] * 5, [0] * 5 + [1] * 5)[2] == 1.0


def test_holm_worked_example():
  # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06,
  # 0.04 -> non-decreasing 0.02, 0.03, 0.06, 0.06; back in input order.
  assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx(
      [0.03, 0.06, 0.06, 0.02])
  assert stats.holm([0.5, 0.9]) == [1.0, 1.0]


def test_seed_interval_is_students_t():
  mean, low, high = stats.seed_interval([1.0, 2.0, 3.0])
  half = 4.302652729911275 / math.sqrt(3)     # t_{0.975, 2} s / sqrt(n)
  assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
  assert stats.seed_interval([0.7]) == (0.7, 0.7, 0.7)


def test_bootstrap_interval_of_a_mean_matches_the_binomial():
  # The mean of 100 resampled 0/1 values (half ones) is Bin(100, 1/2) / 100:
  # its 2.5% and 97.5% quantiles are 0.40 and 0.60.
  x = np.array([0] * 50 + [1] * 50)
  exact = scipy_stats.binom.ppf([0.025, 0.975], 100, 0.5) / 100
  whole, low, high = stats.bootstrap_interval(np.mean, x, num_resamples=4000)
  assert whole == 0.5
  assert (low, high) == pytest.approx(tuple(exact), abs=0.011)


def test_bootstrap_keeps_every_stratum_whole():
  # Strata by label: every resample keeps 50 zeros and 50 ones, so the mean
  # never moves.
  x = np.array([0] * 50 + [1] * 50)
  assert stats.bootstrap_interval(np.mean, x, strata=x,
                                  num_resamples=200) == (0.5, 0.5, 0.5)
  # Two columns (client, label) are one stratum per pair.
  clients = np.array([0, 1] * 50)
  strata = np.stack([clients, x], 1)
  assert stats.bootstrap_interval(np.mean, x, strata=strata,
                                  num_resamples=200) == (0.5, 0.5, 0.5)


def test_verdict_needs_the_interval_and_the_test():
  assert stats.verdict(0.01, 0.2, 'A', 'B') == 'A better'
  assert stats.verdict(-0.2, -0.01, 'A', 'B') == 'B better'
  assert stats.verdict(-0.01, 0.2, 'A', 'B') == 'not distinguishable at 95%'
  # An interval that excludes 0 is not enough where the test disagrees.
  assert stats.verdict(0.01, 0.2, 'A', 'B', p=0.2) == (
      'not distinguishable at 95%')
  assert stats.verdict(0.01, 0.2, 'A', 'B', p=0.01) == 'A better'


def test_min_detectable_difference_by_hand():
  z = 1.959963984540054 + 0.8416212335729143
  assert stats.min_detectable_difference(100, 0.2) == pytest.approx(
      z * math.sqrt(0.2 / 100))
  with pytest.raises(ValueError):
    stats.min_detectable_difference(0, 0.2)
  assert stats.detectable_difference(0.01) == pytest.approx(z * 0.01)
