"""Per-example outcomes of a run, and the figures (with intervals) made of them.

Every evaluated row of a run (an adapter, or a no-model reference) leaves
one file, ``<workdir>/predictions/<row>.npz``::

  client   int32  [R]     the client whose test split holds the example
  example  int64  [R]     its index in the task (as in partition.json)
  label    int32  [R]     the correct option
  pred     int32  [R]     the row's answer
  scores   float32 [R, O] option log-likelihoods (model rows scored by
                          option; absent for references and greedy answers)

so any statistic can be recomputed from the workdir without the model
(:func:`load`). :func:`figures` turns one file into the numbers
``results.json`` reports for the row, each with a 95% bootstrap interval
over test examples, resampled within client x label strata:

* binary tasks (log anomaly detection; positive = 'yes'): pooled (micro) F1,
  precision, recall and accuracy over all test examples; the AUC of
  score(yes) - score(no) (threshold-free); the client-mean F1 over every
  client (today's figure) and over the clients whose test split has both
  classes (the others are named in ``excluded_clients``);
* multi-class tasks: pooled accuracy (= micro F1) and the client-mean
  accuracy.

:data:`HEADLINE` says which figure a table leads with, and why.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np

from fdlora_jax import stats

NUM_RESAMPLES = 1000
LEVEL = 0.95

# The figure each kind of task leads with, and why (written to results.json).
HEADLINE = {
    'f1': ('pooled_f1',
           'F1 of the anomalous class over all test examples pooled: every '
           'example counts once, so clients with few test lines cannot move '
           'it by whole points, and a client with no anomalous test line '
           '(whose own F1 is undefined, scored 0) does not drag it down'),
    'accuracy': ('pooled_accuracy',
                 'accuracy over all test examples pooled: every example '
                 'counts once, whatever its client holds'),
}
HEADLINE['micro_f1'] = HEADLINE['accuracy']


@dataclasses.dataclass
class PerExample:
  """One row's answers on every test example (see the module docstring)."""
  client: np.ndarray
  example: np.ndarray
  label: np.ndarray
  pred: np.ndarray
  scores: Optional[np.ndarray] = None

  def __len__(self) -> int:
    return len(self.label)

  def correct(self) -> np.ndarray:
    return self.pred == self.label


def from_arrays(preds, labels, valid, test_index, scores=None) -> PerExample:
  """Flattens ``[N, M]`` predictions (and ``[N, M, O]`` scores) of the test
  arrays into a :class:`PerExample`; ``test_index[i]`` are client i's task
  indices, in the order of its rows."""
  preds, labels, valid = (np.asarray(x) for x in (preds, labels, valid))
  clients, rows = np.nonzero(valid)
  for i in range(len(test_index)):
    if int(valid[i].sum()) != len(test_index[i]):
      raise ValueError(f'client {i}: {int(valid[i].sum())} valid test rows, '
                       f'{len(test_index[i])} test examples')
  example = np.asarray([test_index[c][r] for c, r in zip(clients, rows)],
                       np.int64)
  return PerExample(
      client=clients.astype(np.int32), example=example,
      label=labels[clients, rows].astype(np.int32),
      pred=preds[clients, rows].astype(np.int32),
      scores=(None if scores is None else
              np.asarray(scores, np.float32)[clients, rows]))


def save(path: str | Path, outcome: PerExample) -> None:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = {k: v for k, v in dataclasses.asdict(outcome).items()
            if v is not None}
  np.savez_compressed(path, **arrays)


def load(path: str | Path) -> PerExample:
  with np.load(Path(path)) as f:
    return PerExample(**{k: f[k] for k in f.files})


# ---------------------------------------------------------------------------
# Figures with intervals
# ---------------------------------------------------------------------------
def _f1(tp, fp, fn):
  tp, fp, fn = (np.asarray(x, np.float64) for x in (tp, fp, fn))
  precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
  recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=tp + fn > 0)
  f1 = np.divide(2 * precision * recall, precision + recall,
                 out=np.zeros_like(tp), where=precision + recall > 0)
  return f1, precision, recall


def statistics(o: PerExample, pred: np.ndarray, margin: Optional[np.ndarray],
               positive: Optional[int], num_clients: int) -> dict:
  """Every figure of :func:`figures` for the draws ``pred [B, R]`` (and
  ``margin [B, R]``) of examples whose client and label are ``o``'s (fixed
  per column: draws stay within client x label strata)."""
  label, client = o.label, o.client
  onehot = np.eye(num_clients, dtype=np.float64)[client]        # [R, N]
  held = onehot.sum(0) > 0                                      # [N]
  correct = pred == label
  out = {'pooled_accuracy': correct.mean(-1)}
  per_client_acc = (correct @ onehot) / np.maximum(onehot.sum(0), 1)
  if positive is None:
    out['client_mean_accuracy'] = per_client_acc[:, held].mean(-1)
    return out
  is_pos = label == positive
  says = pred == positive
  tp, fp, fn = says & is_pos, says & ~is_pos, ~says & is_pos
  f1, precision, recall = _f1(tp.sum(-1), fp.sum(-1), fn.sum(-1))
  out.update(pooled_f1=f1, pooled_precision=precision, pooled_recall=recall)
  cf1 = _f1(tp @ onehot, fp @ onehot, fn @ onehot)[0]          # [B, N]
  out['client_mean_f1'] = cf1[:, held].mean(-1)
  both = held & ((is_pos @ onehot) > 0) & ((~is_pos @ onehot) > 0)
  if both.any():
    out['client_mean_f1_both'] = cf1[:, both].mean(-1)
  if margin is not None and is_pos.any() and (~is_pos).any():
    out['auc'] = stats.auc(margin, is_pos)
  return out


def _margin(o: PerExample, positive: Optional[int]) -> Optional[np.ndarray]:
  """score(positive) - the best other option's score, where scored."""
  if o.scores is None or positive is None:
    return None
  others = np.delete(o.scores, positive, axis=-1).max(-1)
  return o.scores[:, positive] - others


def strata(o: PerExample) -> np.ndarray:
  """One id per example: its client x label stratum."""
  return o.client.astype(np.int64) * (int(o.label.max(initial=0)) + 1) + \
      o.label


def figures(o: PerExample, positive: Optional[int], num_clients: int,
            num_resamples: int = NUM_RESAMPLES, level: float = LEVEL,
            seed: int = 0) -> dict:
  """``{'figures': {name: {'value', 'low', 'high'}}, 'excluded_clients',
  'interval'}``: each figure on all test examples, with a percentile
  bootstrap interval over examples resampled within client x label."""
  if not len(o):
    return {'figures': {}, 'excluded_clients': [], 'interval': ''}
  margin = _margin(o, positive)
  whole = statistics(o, o.pred[None], None if margin is None else
                     margin[None], positive, num_clients)
  idx = stats.resample_indices(strata(o), num_resamples,
                               np.random.default_rng(seed))
  draws = statistics(o, o.pred[idx], None if margin is None else margin[idx],
                     positive, num_clients)
  out = {}
  for name, value in whole.items():
    low, high = stats.percentile_interval(draws[name], level)
    out[name] = {'value': float(value[0]), 'low': float(low),
                 'high': float(high)}
  excluded = []
  if positive is not None:
    is_pos = o.label == positive
    for c in range(num_clients):
      mine = o.client == c
      if mine.any() and not (is_pos[mine].any() and (~is_pos[mine]).any()):
        excluded.append(c)
  return {'figures': out, 'excluded_clients': excluded,
          'interval': f'{level:.0%} percentile bootstrap over test examples '
                      f'within client x label ({num_resamples} resamples)'}


# ---------------------------------------------------------------------------
# Paired differences: two rows on the same examples
# ---------------------------------------------------------------------------
def _check_paired(a: PerExample, b: PerExample) -> None:
  if not (np.array_equal(a.example, b.example) and
          np.array_equal(a.client, b.client)):
    raise ValueError('the two rows were not scored on the same test '
                     'examples in the same order')


def paired_draws(a: PerExample, b: PerExample, name: str,
                 positive: Optional[int], num_clients: int,
                 num_resamples: int = NUM_RESAMPLES,
                 seed: int = 0) -> tuple[float, np.ndarray]:
  """``(figure(a) - figure(b), draws [num_resamples])``: the difference of
  figure ``name`` between two rows on all examples, and on bootstrap draws
  of the examples (within client x label), the same draw for both."""
  _check_paired(a, b)
  idx = stats.resample_indices(strata(a), num_resamples,
                               np.random.default_rng(seed))
  ma, mb = _margin(a, positive), _margin(b, positive)
  def value(o, m, pick):
    return statistics(o, o.pred[pick], None if m is None else m[pick],
                      positive, num_clients)[name]
  whole = float(value(a, ma, np.arange(len(a))[None])[0]
                - value(b, mb, np.arange(len(b))[None])[0])
  return whole, value(a, ma, idx) - value(b, mb, idx)


def paired_difference(pairs: list[tuple[PerExample, PerExample]], name: str,
                      positive: Optional[int], num_clients: int,
                      num_resamples: int = NUM_RESAMPLES, level: float = LEVEL,
                      seed: int = 0) -> dict:
  """The difference of figure ``name`` between rows A and B over seeds:
  ``pairs`` holds one ``(a, b)`` per seed, on that seed's test examples.
  The point estimate is the mean over seeds of figure(a) - figure(b); the
  interval a two-stage percentile bootstrap: seeds drawn with replacement,
  then examples within each drawn seed's client x label strata (the same
  draw for A and B). Also McNemar's exact test on the correct / incorrect
  answers pooled over seeds.

  Returns ``{'difference', 'low', 'high', 'se', 'p_mcnemar', 'a_only',
  'b_only', 'n'}`` (``se``: the standard deviation of the bootstrap
  differences; ``a_only``: examples A answers right and B wrong).
  """
  if not pairs:
    raise ValueError('no seeds to compare')
  rng = np.random.default_rng(seed)
  wholes, draws = [], []
  for k, (a, b) in enumerate(pairs):
    w, d = paired_draws(a, b, name, positive, num_clients, num_resamples,
                        seed=seed + 1 + k)
    wholes.append(w)
    draws.append(d)
  draws = np.stack(draws)                                        # [S, B]
  s = len(pairs)
  pick = (rng.integers(0, s, (num_resamples, s)) if s > 1
          else np.zeros((num_resamples, 1), np.int64))
  values = draws[pick, np.arange(num_resamples)[:, None]].mean(-1)
  low, high = stats.percentile_interval(values, level)
  ca = np.concatenate([a.correct() for a, _ in pairs])
  cb = np.concatenate([b.correct() for _, b in pairs])
  a_only, b_only, p = stats.mcnemar_exact(ca, cb)
  return {'difference': float(np.mean(wholes)), 'low': float(low),
          'high': float(high), 'se': float(np.std(values)),
          'p_mcnemar': p, 'a_only': a_only,
          'b_only': b_only, 'n': int(len(ca))}


def versus(low: float, high: float) -> str:
  """What an interval of A - B says of A: 'better', 'worse' or 'not
  distinguishable' (the interval holds 0; :func:`stats.verdict`)."""
  return {'A better': 'better', 'B better': 'worse'}.get(
      stats.verdict(low, high, 'A', 'B', level=LEVEL), 'not distinguishable')


def format_figures(rows: dict[str, dict], headline: str,
                   scale: float = 100.0) -> str:
  """A plain-text table of every row's pooled figures with 95% intervals,
  and, for model rows, which no-model references it beats."""
  shown = (headline, 'auc', 'client_mean_f1_both', 'client_mean_f1',
           'client_mean_accuracy')
  have = {k for m in rows.values() for k in m.get('figures', {})}
  names = [k for k in shown if k in have]
  head = ['model'] + names + ['beats the no-model references?']
  lines = []
  for label, m in rows.items():
    f = m.get('figures', {})
    row = [label] + [f'{f[k]["value"] * scale:.1f} [{f[k]["low"] * scale:.1f}'
                     f', {f[k]["high"] * scale:.1f}]' if k in f else '-'
                     for k in names]
    vs = m.get('versus_references')
    if vs is None:
      row.append('')
    else:
      beaten = [k for k, d in vs.items() if d['verdict'] == 'better']
      rest = [k for k in vs if k not in beaten]
      row.append('all' if not rest else
                 f'not {", ".join(rest)}' if not beaten else
                 f'{", ".join(beaten)}; not {", ".join(rest)}')
    lines.append(row)
  widths = [max(len(str(r[i])) for r in [head] + lines)
            for i in range(len(head))]
  fmt = lambda r: '  '.join(str(x).ljust(w) if i in (0, len(r) - 1) else
                            str(x).rjust(w)
                            for i, (x, w) in enumerate(zip(r, widths)))
  return '\n'.join([f'% [95% interval over test examples]; all figures in '
                    'results.json:', fmt(head),
                    '  '.join('-' * w for w in widths)] +
                   [fmt(r) for r in lines])
