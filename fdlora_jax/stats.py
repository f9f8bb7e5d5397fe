"""Intervals and paired comparisons for per-example results.

A user asks one question of a results table: does method A beat method B on
this data? These functions answer it from per-example outcomes, never from
means alone:

* :func:`resample_indices`: bootstrap draws of examples within strata
  (client x label), so every resample keeps each client's size and label
  mix; :func:`percentile_interval` the interval of the draws, and
  :func:`bootstrap_interval` both for any statistic of a set of examples.
* :func:`seed_interval`: a t interval over seeds (one figure per seed).
* :func:`mcnemar_exact`: the exact two-sided McNemar test on paired
  correct / incorrect answers.
* :func:`holm`: Holm's step-down adjustment across several comparisons.
* :func:`auc`: the area under the ROC curve of a score (ties count half).
* :func:`detectable_difference`: the smallest difference a test with a
  given standard error detects with the given power;
  :func:`min_detectable_difference` the same in accuracy for a paired design
  of n examples.
* :func:`verdict`: what an interval (and a test's p) of A - B says.

:mod:`fdlora_jax.outcomes` applies them to per-example records (figures
with intervals, paired differences resampling seeds then examples).

Everything is numpy on the host: these run once per report, on a few
thousand numbers. Per-example metrics themselves (accuracy, F1) are
:mod:`fdlora_jax.evaluate`'s; a statistic passed here can wrap them.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
from scipy import stats as scipy_stats

Statistic = Callable[..., float]


def auc(scores, labels):
  """P(score of a random positive > score of a random negative), ties 1/2.

  ``labels [R]`` are 1 (positive) / 0; ``scores`` is ``[R]`` (a float back)
  or ``[B, R]``, one AUC per row against the same labels (an array back).
  Raises ``ValueError`` without both classes.
  """
  scores = np.asarray(scores, np.float64)
  positive = np.asarray(labels).astype(bool)
  n_pos, n_neg = int(positive.sum()), int((~positive).sum())
  if not n_pos or not n_neg:
    raise ValueError('auc needs at least one positive and one negative')
  ranks = scipy_stats.rankdata(scores, axis=-1)     # ties: mean rank
  u = ranks[..., positive].sum(-1) - n_pos * (n_pos + 1) / 2
  out = u / (n_pos * n_neg)
  return float(out) if scores.ndim == 1 else out


def resample_indices(strata, num: int,
                     rng: np.random.Generator) -> np.ndarray:
  """``[num, R]``: bootstrap draws of the examples' positions, each drawn
  within its own stratum (``strata``: ``[R]`` ids, or ``[R, k]`` columns
  such as client and label, one stratum per distinct row), so column j of
  every draw holds an example of the same stratum as example j."""
  strata = np.asarray(strata)
  if strata.ndim == 2:
    strata = np.unique(strata, axis=0, return_inverse=True)[1].reshape(-1)
  out = np.empty((num, len(strata)), np.int64)
  for s in np.unique(strata):
    members = np.flatnonzero(strata == s)
    out[:, members] = members[rng.integers(0, len(members),
                                           (num, len(members)))]
  return out


def percentile_interval(draws, level: float = 0.95) -> tuple[float, float]:
  """``(low, high)``: the central ``level`` of ``draws``."""
  alpha = (1 - level) / 2
  low, high = np.quantile(np.asarray(draws, np.float64), [alpha, 1 - alpha])
  return float(low), float(high)


def bootstrap_interval(statistic: Statistic, *arrays, strata=None,
                       num_resamples: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float, float]:
  """``(statistic on all examples, low, high)``: a percentile bootstrap.

  ``arrays`` are per-example arrays of equal length (e.g. labels, preds);
  ``statistic(*arrays)`` maps them to a number. Each resample draws, within
  every stratum (``strata``, as in :func:`resample_indices`; none: one
  stratum), as many examples as it holds, with replacement.
  (:mod:`fdlora_jax.outcomes` computes its figures on all draws at once.)
  """
  arrays = [np.asarray(a) for a in arrays]
  n = len(arrays[0])
  if any(len(a) != n for a in arrays):
    raise ValueError(f'arrays of lengths {[len(a) for a in arrays]}')
  idx = resample_indices(np.zeros(n, np.int64) if strata is None else strata,
                         num_resamples, np.random.default_rng(seed))
  values = [statistic(*(a[i] for a in arrays)) for i in idx]
  return (float(statistic(*arrays)), *percentile_interval(values, level))


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


def detectable_difference(standard_error: float, *, alpha: float = 0.05,
                          power: float = 0.8) -> float:
  """The smallest true difference a two-sided test at level ``alpha``
  detects with ``power``, when its estimate has ``standard_error``:
  (z_{1-alpha/2} + z_power) * standard_error (normal approximation)."""
  z = scipy_stats.norm.ppf(1 - alpha / 2) + scipy_stats.norm.ppf(power)
  return float(z * standard_error)


def min_detectable_difference(num_examples: int, discordant: float, *,
                              alpha: float = 0.05,
                              power: float = 0.8) -> float:
  """The smallest difference in accuracy between two methods that a paired
  test on ``num_examples`` detects with ``power`` at level ``alpha``, when
  the methods disagree on a fraction ``discordant`` of the examples.

  Normal approximation to McNemar's test: the difference d = (b - c) / n has
  variance about ``discordant / n`` near d = 0, so its standard error is
  sqrt(discordant / n) (:func:`detectable_difference`).
  """
  if num_examples <= 0 or not 0 < discordant <= 1:
    raise ValueError(f'num_examples={num_examples}, discordant={discordant}')
  return detectable_difference(float(np.sqrt(discordant / num_examples)),
                               alpha=alpha, power=power)


def verdict(low: float, high: float, a: str, b: str,
            p: Optional[float] = None, level: float = 0.95) -> str:
  """What an interval of A - B says: "A better", "B better" or "not
  distinguishable at 95%". The interval must exclude 0 and, where a test's
  p-value ``p`` is given (e.g. Holm-adjusted McNemar), p must be below
  ``1 - level`` too."""
  significant = p is None or p < round(1 - level, 12)
  if significant and low > 0:
    return f'{a} better'
  if significant and high < 0:
    return f'{b} better'
  return f'not distinguishable at {level:.0%}'
