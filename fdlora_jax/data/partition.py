"""Splitting a task over clients: Dirichlet label skew or by source.

Dirichlet(alpha) label skew (Hsu et al., 2019, as in the paper): for each
class, a proportion vector p ~ Dir(alpha * 1_N) over the N clients; that
class's examples (shuffled) are cut in those proportions. Smaller alpha, more
skew. Every client must get at least `min_examples_per_client`: the draw is
repeated (up to 100 times, the usual FedML loop); if a client is still short,
examples are moved one at a time, each a random one from the currently
largest client, until every client has the minimum. The partition's
`method` string says whether that rebalancing happened.

Each client's examples are then split train/test at random
(`train_fraction`, paper 8:2, at least one of each; with `stratify`, per
label, so each label a client holds twice or more is in its test set). With
`split` 'dedup' or 'template' the test set is instead drawn once over all
examples, whole groups of identical messages (or templates) at a time
(`references.grouped_test_mask`), so no message (template) is on both sides
for any client; a client then keeps what falls on each side. Then
`few_shot` examples (paper 5) are drawn from its training set for the
AdaFusion stage (with `stratify`, every label it holds at least once). All of it is a function of the seed.
"""

import collections
import dataclasses
import json
import pathlib

import ml_collections
import numpy as np

from fdlora_jax.data import references
from fdlora_jax.data.examples import Task
from fdlora_jax.errors import ConfigError
from fdlora_jax.errors import need

_MAX_DRAWS = 100
SPLITS = ('random', 'dedup', 'template')


@dataclasses.dataclass
class Partition:
  """Per client: indices into task.examples (sorted, so file order is kept).

  Attributes:
    train: per client, its training examples.
    test: per client, its local test examples.
    few_shot: per client, a subset of train for the fusion stage.
    method: how it was made, e.g. 'dirichlet(alpha=0.5), seed 0'.
  """
  train: list[np.ndarray]
  test: list[np.ndarray]
  few_shot: list[np.ndarray]
  method: str = ''

  @property
  def num_clients(self) -> int:
    return len(self.train)

  def to_json(self, task: Task) -> dict:
    """Per client: sizes, per-class and per-source counts, and indices.

    Also `skipped_lines`: {file read (absolute path): malformed lines or
    records skipped in it} (`task.skipped_by_file`; empty for synthetic data).
    """
    labels = task.labels()
    clients = []
    for i in range(self.num_clients):
      everything = np.concatenate([self.train[i], self.test[i]])
      clients.append({
          'client': i,
          'num_train': len(self.train[i]),
          'num_test': len(self.test[i]),
          'num_few_shot': len(self.few_shot[i]),
          'class_counts': {
              split: _counts(labels[idx], task.options)
              for split, idx in (('train', self.train[i]),
                                 ('test', self.test[i]))},
          'sources': dict(sorted(collections.Counter(
              task.examples[j].source for j in everything).items())),
          'train': self.train[i].tolist(),
          'test': self.test[i].tolist(),
          'few_shot': self.few_shot[i].tolist(),
      })
    return {'task': task.name, 'method': self.method,
            'num_clients': self.num_clients, 'options': list(task.options),
            'data_source': task.data_source,
            'is_synthetic': task.is_synthetic,
            'skipped_lines': dict(task.skipped_by_file), 'clients': clients}

  def table(self, task: Task) -> str:
    """A printable table: per client, train/test sizes, classes, sources."""
    info = self.to_json(task)
    head = ['client', 'train', 'test', 'few'] + list(task.options) + [
        'sources']
    rows = []
    for c in info['clients']:
      both = [c['class_counts']['train'][o] + c['class_counts']['test'][o]
              for o in task.options]
      sources = ', '.join(f'{s}:{n}' for s, n in c['sources'].items())
      rows.append([str(c['client']), str(c['num_train']), str(c['num_test']),
                   str(c['num_few_shot'])] + [str(n) for n in both] +
                  [sources])
    widths = [max(len(r[k]) for r in rows + [head]) for k in range(len(head))]
    fmt = lambda r: '  '.join(x.rjust(w) if k < len(head) - 1 else x
                              for k, (x, w) in enumerate(zip(r, widths)))
    title = (f'{task.name}: {self.method}; data: {task.data_source}')
    return '\n'.join([title, fmt(head)] + [fmt(r) for r in rows])


def _counts(labels: np.ndarray, options: tuple[str, ...]) -> dict[str, int]:
  counts = np.bincount(labels, minlength=len(options))
  return dict(zip(options, counts.tolist()))


def dirichlet_split(labels: np.ndarray, num_clients: int, alpha: float,
                    min_size: int, rng: np.random.Generator
                    ) -> tuple[list[np.ndarray], bool]:
  """(per-client indices, rebalanced) with Dir(alpha) label skew."""
  if min_size * num_clients > len(labels):
    raise ConfigError(
        f'config.data.min_examples_per_client={min_size}: x {num_clients} '
        f'clients needs {min_size * num_clients} examples, the task has '
        f'{len(labels)}')
  for _ in range(_MAX_DRAWS):
    parts = [[] for _ in range(num_clients)]
    for k in np.unique(labels):
      idx = rng.permutation(np.flatnonzero(labels == k))
      p = rng.dirichlet(np.full(num_clients, alpha))
      cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
      for client, chunk in enumerate(np.split(idx, cuts)):
        parts[client].extend(chunk.tolist())
    if min(len(part) for part in parts) >= min_size:
      return [np.sort(np.asarray(p, np.int64)) for p in parts], False
  while True:  # still short after _MAX_DRAWS: move examples to the short
    short = min(range(num_clients), key=lambda c: len(parts[c]))
    if len(parts[short]) >= min_size:
      break
    largest = max(range(num_clients), key=lambda c: len(parts[c]))
    moved = parts[largest].pop(int(rng.integers(len(parts[largest]))))
    parts[short].append(moved)
  return [np.sort(np.asarray(p, np.int64)) for p in parts], True


def source_split(sources: list[str], num_clients: int,
                 rng: np.random.Generator) -> list[np.ndarray]:
  """Clients by source dataset.

  With N >= S sources, client i takes source i % S, and a source's examples
  are shuffled and split evenly over its clients. With N < S, client i takes
  every source s with s % N == i.
  """
  names = sorted(set(sources))
  by_source = {s: np.flatnonzero(np.asarray(sources) == s) for s in names}
  parts = [[] for _ in range(num_clients)]
  if num_clients >= len(names):
    for s, name in enumerate(names):
      owners = list(range(s, num_clients, len(names)))
      for owner, chunk in zip(owners, np.array_split(
          rng.permutation(by_source[name]), len(owners))):
        parts[owner].extend(chunk.tolist())
  else:
    for s, name in enumerate(names):
      parts[s % num_clients].extend(by_source[name].tolist())
  return [np.sort(np.asarray(p, np.int64)) for p in parts]


def train_test_split(idx: np.ndarray, train_fraction: float,
                     rng: np.random.Generator,
                     labels: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Random split, at least one train and one test example when n >= 2.

  With `labels` (the task's label per example), the split is stratified: each
  label's examples are split on their own, round(n_k * (1 - train_fraction))
  to test, and a label a client holds at least twice keeps at least one
  example on each side, so a client's rare class is in its test set too.
  """
  n = len(idx)
  if labels is None:
    n_test = int(round(n * (1.0 - train_fraction)))
    if n >= 2:
      n_test = min(max(n_test, 1), n - 1)
    perm = rng.permutation(idx)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])
  train, test = [], []
  for k in np.unique(labels[idx]):
    perm = rng.permutation(idx[labels[idx] == k])
    n_test = int(round(len(perm) * (1.0 - train_fraction)))
    if len(perm) >= 2 and 0.0 < train_fraction < 1.0:
      n_test = min(max(n_test, 1), len(perm) - 1)
    test.extend(perm[:n_test].tolist())
    train.extend(perm[n_test:].tolist())
  if n >= 2 and (not test or not train):  # every label held once
    donor, receiver = (train, test) if not test else (test, train)
    receiver.append(donor.pop(int(rng.integers(len(donor)))))
  return (np.sort(np.asarray(train, np.int64)),
          np.sort(np.asarray(test, np.int64)))


def partition(task: Task, num_clients: int,
              data_cfg: ml_collections.ConfigDict, seed: int) -> Partition:
  """Splits `task` over clients as `data_cfg.partition` says.

  Args:
    task: the task.
    num_clients: N.
    data_cfg: `c.data` (partition, dirichlet_alpha, min_examples_per_client,
      train_fraction, stratify, few_shot).
    seed: the same seed gives the same partition.

  Returns:
    The Partition (train, test, few-shot indices per client).
  """
  need(data_cfg.partition in ('dirichlet', 'source'), 'data.partition',
       data_cfg.partition, "choose 'dirichlet' or 'source'")
  need(data_cfg.min_examples_per_client >= 0, 'data.min_examples_per_client',
       data_cfg.min_examples_per_client, 'must be >= 0')
  need(0.0 <= data_cfg.train_fraction <= 1.0, 'data.train_fraction',
       data_cfg.train_fraction, 'must be in [0, 1]')
  need(data_cfg.few_shot >= 0, 'data.few_shot', data_cfg.few_shot,
       'must be >= 0')
  need(data_cfg.get('split', 'random') in SPLITS, 'data.split',
       data_cfg.get('split'), f'choose from {SPLITS}')
  rng = np.random.default_rng([seed, 0])
  if data_cfg.partition == 'dirichlet':
    need(data_cfg.dirichlet_alpha > 0, 'data.dirichlet_alpha',
         data_cfg.dirichlet_alpha, 'the Dirichlet alpha must be > 0')
    parts, rebalanced = dirichlet_split(
        task.labels(), num_clients, data_cfg.dirichlet_alpha,
        data_cfg.min_examples_per_client, rng)
    method = (f'dirichlet(alpha={data_cfg.dirichlet_alpha}) label skew over '
              f'{num_clients} clients, seed {seed}, min '
              f'{data_cfg.min_examples_per_client} per client' +
              (' (rebalanced)' if rebalanced else ''))
  elif data_cfg.partition == 'source':
    parts = source_split([e.source for e in task.examples], num_clients, rng)
    short = [i for i, p in enumerate(parts)
             if len(p) < data_cfg.min_examples_per_client]
    if short:
      raise ConfigError(
          f"config.data.partition='source': clients {short} get fewer than "
          f'config.data.min_examples_per_client='
          f'{data_cfg.min_examples_per_client} examples '
          f'({len(set(e.source for e in task.examples))} sources, '
          f'{num_clients} clients)')
    method = f'by source over {num_clients} clients, seed {seed}'
  else:  # checked above
    raise AssertionError(data_cfg.partition)
  labels = task.labels()
  split = data_cfg.get('split', 'random')
  in_test = None
  if split != 'random':       # whole groups of messages to test, globally
    in_test = references.grouped_test_mask(
        references.group_keys(task.examples, split), labels,
        data_cfg.train_fraction, np.random.default_rng([seed, 2]))
    method += (f', {split} train/test split ('
               + ('no message' if split == 'dedup' else 'no template')
               + ' on both sides)')
  if data_cfg.stratify:
    method += (', train/test split and few-shot draw stratified by label')
  train, test, few = [], [], []
  for i, idx in enumerate(parts):
    split_rng = np.random.default_rng([seed, 1, i])
    if in_test is None:
      tr, te = train_test_split(
          idx, data_cfg.train_fraction, split_rng,
          labels if data_cfg.stratify else None)
    else:
      tr, te = idx[~in_test[idx]], idx[in_test[idx]]
    train.append(tr)
    test.append(te)
    few.append(few_shot_draw(tr, data_cfg.few_shot, split_rng,
                             labels if data_cfg.stratify else None))
  return Partition(train, test, few, method)


def few_shot_draw(train: np.ndarray, k: int, rng: np.random.Generator,
                  labels: np.ndarray | None = None) -> np.ndarray:
  """``min(k, len(train))`` of a client's training indices, sorted: its
  few-shot set (AdaFusion's fitness data).

  With ``labels`` (``data.stratify``) every label the client holds is drawn
  once first (as many as ``k`` allows, rarest first), the rest at random.
  Without, all ``k`` at random: on a skewed client 5 random draws are often
  all of its majority label, and a fitness on those cannot see that the
  adapter it favours never answers the minority.
  """
  train = np.asarray(train, np.int64)
  k = min(k, len(train))
  if labels is None:
    return np.sort(rng.choice(train, k, replace=False))
  held, counts = np.unique(labels[train], return_counts=True)
  first = []
  for label in held[np.argsort(counts, kind='stable')][:k]:
    first.append(rng.choice(train[labels[train] == label]))
  rest = np.setdiff1d(train, first)
  more = rng.choice(rest, k - len(first), replace=False)
  return np.sort(np.concatenate([np.asarray(first, np.int64), more]))


def write_partition(path: str | pathlib.Path,
                    partition: Partition,  # pylint: disable=redefined-outer-name
                    task: Task) -> None:
  """Writes `partition.to_json(task)` to `path` (parents created)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(partition.to_json(task), indent=1) + '\n')
