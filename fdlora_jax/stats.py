"""Intervals and paired comparisons for per-example results.

A user asks one question of a results table: does method A beat method B on
this data? These functions answer it from per-example outcomes, never from
means alone:

* :func:`bootstrap_interval`: a percentile interval for any statistic of a
  set of test examples, resampled within strata (client x label), so every
  resample keeps each client's size and label mix.
* :func:`seed_interval`: a t interval over seeds (one figure per seed).
* :func:`paired_bootstrap`: the difference of a statistic between two
  methods on the same examples, resampling seeds, then examples within each
  seed's strata: both methods always see the same resampled examples.
* :func:`mcnemar_exact`: the exact two-sided McNemar test on paired
  correct / incorrect answers.
* :func:`holm`: Holm's step-down adjustment across several comparisons.
* :func:`auc`: the area under the ROC curve of a score (ties count half).
* :func:`min_detectable_difference`: the smallest difference in accuracy a
  paired design of n examples detects with the given power.

Everything is numpy on the host: these run once per report, on a few
thousand numbers. Per-example metrics themselves (accuracy, F1) are
:mod:`fdlora_jax.evaluate`'s; a statistic passed here can wrap them.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
from scipy import stats as scipy_stats

Statistic = Callable[..., float]


def auc(scores, labels) -> float:
  """P(score of a random positive > score of a random negative), ties 1/2.

  ``labels`` are 1 (positive) / 0. Raises ``ValueError`` without both.
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels).astype(bool)
  pos, neg = scores[labels], scores[~labels]
  if not len(pos) or not len(neg):
    raise ValueError('auc needs at least one positive and one negative')
  ranks = scipy_stats.rankdata(np.concatenate([pos, neg]))   # ties: mean rank
  u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
  return float(u / (len(pos) * len(neg)))


def _strata_indices(strata: Optional[np.ndarray], n: int) -> list[np.ndarray]:
  if strata is None:
    return [np.arange(n)]
  strata = np.asarray(strata)
  if strata.ndim == 2:        # several columns, e.g. (client, label)
    _, strata = np.unique(strata, axis=0, return_inverse=True)
  return [np.flatnonzero(strata == s) for s in np.unique(strata)]


def _resample(groups: list[np.ndarray], rng: np.random.Generator):
  return np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])


def bootstrap_interval(statistic: Statistic, *arrays, strata=None,
                       num_resamples: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float, float]:
  """``(statistic on all examples, low, high)``: a percentile bootstrap.

  ``arrays`` are per-example arrays of equal length (e.g. labels, preds);
  ``statistic(*arrays)`` maps them to a number. Each resample draws, within
  every stratum (``strata``: one id per example, or an [n, k] array of ids
  such as client and label), as many examples as it holds, with
  replacement.
  """
  arrays = [np.asarray(a) for a in arrays]
  n = len(arrays[0])
  if any(len(a) != n for a in arrays):
    raise ValueError(f'arrays of lengths {[len(a) for a in arrays]}')
  groups = _strata_indices(strata, n)
  rng = np.random.default_rng(seed)
  values = np.empty(num_resamples)
  for i in range(num_resamples):
    idx = _resample(groups, rng)
    values[i] = statistic(*(a[idx] for a in arrays))
  alpha = (1 - level) / 2
  low, high = np.quantile(values, [alpha, 1 - alpha])
  return float(statistic(*arrays)), float(low), float(high)


def seed_interval(values: Sequence[float],
                  level: float = 0.95) -> tuple[float, float, float]:
  """``(mean, low, high)``: Student's t interval over per-seed figures
  (a single seed gives an interval of its own value on both sides)."""
  v = np.asarray(values, np.float64)
  m = float(v.mean())
  if len(v) < 2:
    return m, m, m
  half = (scipy_stats.t.ppf(0.5 + level / 2, len(v) - 1)
          * v.std(ddof=1) / np.sqrt(len(v)))
  return m, float(m - half), float(m + half)


def paired_bootstrap(statistic: Statistic, runs_a, runs_b, *,
                     num_resamples: int = 2000, level: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:
  """``(difference, low, high)`` of ``mean_seed statistic(A) - statistic(B)``.

  ``runs_a`` / ``runs_b``: one entry per seed, the same seeds in the same
  order, each a dict with ``arrays`` (the per-example arrays the statistic
  takes, e.g. ``(labels, preds)``) and optional ``strata``; A and B of a
  seed must hold the same examples in the same order (same labels and
  strata). Each resample draws seeds with replacement, then examples within
  each drawn seed's strata, and applies the same draw to A and B.
  """
  if len(runs_a) != len(runs_b) or not runs_a:
    raise ValueError(f'{len(runs_a)} and {len(runs_b)} seeds: need the same '
                     'seeds, at least one')
  prepared = []
  for ra, rb in zip(runs_a, runs_b):
    a = [np.asarray(x) for x in ra['arrays']]
    b = [np.asarray(x) for x in rb['arrays']]
    if len(a[0]) != len(b[0]):
      raise ValueError('A and B of a seed must hold the same examples')
    prepared.append((a, b, _strata_indices(ra.get('strata'), len(a[0]))))

  def diff(seeds, draws):
    return float(np.mean([statistic(*(x[i] for x in prepared[s][0]))
                          - statistic(*(x[i] for x in prepared[s][1]))
                          for s, i in zip(seeds, draws)]))

  k = len(prepared)
  whole = diff(range(k), [np.arange(len(p[0][0])) for p in prepared])
  rng = np.random.default_rng(seed)
  values = np.empty(num_resamples)
  for r in range(num_resamples):
    seeds = rng.integers(0, k, k) if k > 1 else np.zeros(1, int)
    values[r] = diff(seeds, [_resample(prepared[s][2], rng) for s in seeds])
  alpha = (1 - level) / 2
  low, high = np.quantile(values, [alpha, 1 - alpha])
  return whole, float(low), float(high)


def mcnemar_exact(correct_a, correct_b) -> tuple[int, int, float]:
  """``(b, c, p)``: b = A right where B is wrong, c = the reverse, and the
  exact two-sided p-value, ``min(1, 2 P(X <= min(b, c)))`` for X ~
  Binomial(b + c, 1/2) (1.0 where they never disagree)."""
  a = np.asarray(correct_a).astype(bool)
  b_ = np.asarray(correct_b).astype(bool)
  if a.shape != b_.shape:
    raise ValueError(f'answers of shapes {a.shape} and {b_.shape}')
  b, c = int(np.sum(a & ~b_)), int(np.sum(~a & b_))
  if b + c == 0:
    return b, c, 1.0
  p = 2 * scipy_stats.binom.cdf(min(b, c), b + c, 0.5)
  return b, c, float(min(1.0, p))


def holm(pvalues: Sequence[float]) -> list[float]:
  """Holm's step-down adjusted p-values, in the input's order: the i-th
  smallest p times (m - i), made non-decreasing, capped at 1."""
  p = np.asarray(pvalues, np.float64)
  m = len(p)
  order = np.argsort(p, kind='stable')
  adjusted = np.empty(m)
  running = 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (m - rank) * p[i]))
    adjusted[i] = running
  return adjusted.tolist()


def min_detectable_difference(num_examples: int, discordant: float, *,
                              alpha: float = 0.05,
                              power: float = 0.8) -> float:
  """The smallest difference in accuracy between two methods that a paired
  test on ``num_examples`` detects with ``power`` at level ``alpha``, when
  the methods disagree on a fraction ``discordant`` of the examples.

  Normal approximation to McNemar's test: the difference d = (b - c) / n has
  variance about ``discordant / n`` near d = 0, so
  d_min = (z_{1-alpha/2} + z_power) sqrt(discordant / n).
  """
  if num_examples <= 0 or not 0 < discordant <= 1:
    raise ValueError(f'num_examples={num_examples}, discordant={discordant}')
  z = scipy_stats.norm.ppf(1 - alpha / 2) + scipy_stats.norm.ppf(power)
  return float(z * np.sqrt(discordant / num_examples))


def verdict(low: float, high: float, a: str, b: str) -> str:
  """What an interval of A - B says: "A better", "B better" or "not
  distinguishable" (the interval holds 0)."""
  if low > 0:
    return f'{a} better'
  if high < 0:
    return f'{b} better'
  return 'not distinguishable'
