"""Answers that need no model, and the keys that group repeated messages.

A model row that does not beat these has not learned the task. Two of them
read only the training data's labels:

* :func:`by_system`: the label of the system a test example comes from (its
  ``source``), as the training examples of that system mostly have it. In
  the LogHub samples every anomalous line is a BGL line, so this rule alone
  separates much of the task.
* :func:`nearest_message`: the label of the same message in the training
  data (exact match), else of the same template (numbers, hex, paths and
  addresses masked), else :func:`by_system`'s answer.

Both are fit on the training examples of all clients together: an upper
reference for what label lookups can do, not a federated method. They join
the majority guess and always "yes" of :func:`fdlora_jax.evaluate.references`
in every run's results.json.

:func:`template` is also the key of the ``template`` train/test split, and
the exact text the key of the ``dedup`` split (``fdlora_jax.data.partition``).
"""

from __future__ import annotations

import collections
import re
from typing import Sequence

import numpy as np

from fdlora_jax.data.examples import Example

# Most specific first: each match is replaced by its placeholder.
_MASKS = (
    (re.compile(r'\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b'), '<ip>'),
    (re.compile(r'(?:/[\w.+-]+){2,}/?'), '<path>'),
    (re.compile(r'\b0x[0-9a-fA-F]+\b'), '<hex>'),
    (re.compile(r'\b(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{6,}\b'), '<hex>'),
    (re.compile(r'[-+]?\d+(?:[.:]\d+)*'), '<num>'),
)


def template(text: str) -> str:
  """``text`` with addresses, paths, hex and numbers masked, spaces folded:
  messages that differ only in such fields share one template."""
  for pattern, placeholder in _MASKS:
    text = pattern.sub(placeholder, text)
  return ' '.join(text.split())


def group_keys(examples: Sequence[Example], split: str) -> list[str]:
  """The key that keeps examples together in a train/test split:
  ``'random'`` each example alone, ``'dedup'`` its exact text,
  ``'template'`` its :func:`template` (with its source, so two systems'
  messages never merge)."""
  if split == 'random':
    return [str(i) for i in range(len(examples))]
  if split == 'dedup':
    return [f'{e.source}\0{e.text}' for e in examples]
  if split == 'template':
    return [f'{e.source}\0{template(e.text)}' for e in examples]
  raise ValueError(f"split must be 'random', 'dedup' or 'template', got "
                   f'{split!r}')


def _majority(labels: list[int]) -> int:
  """The most common label; the smallest label on a tie."""
  counts = collections.Counter(labels)
  return min(counts, key=lambda k: (-counts[k], k))


def by_system(train: Sequence[Example], test: Sequence[Example]) -> np.ndarray:
  """Per test example, the majority training label of its ``source``, or
  the overall majority for a source no training example has."""
  if not train:
    raise ValueError('by_system needs training examples')
  per_source = collections.defaultdict(list)
  for e in train:
    per_source[e.source].append(e.label)
  overall = _majority([e.label for e in train])
  rule = {s: _majority(v) for s, v in per_source.items()}
  return np.asarray([rule.get(e.source, overall) for e in test], np.int32)


def nearest_message(train: Sequence[Example],
                    test: Sequence[Example]) -> np.ndarray:
  """Per test example: the majority training label of the same text (same
  source), else of the same template, else :func:`by_system`'s."""
  exact = collections.defaultdict(list)
  templ = collections.defaultdict(list)
  for e in train:
    exact[(e.source, e.text)].append(e.label)
    templ[(e.source, template(e.text))].append(e.label)
  fallback = by_system(train, test)
  out = []
  for e, f in zip(test, fallback):
    if (e.source, e.text) in exact:
      out.append(_majority(exact[(e.source, e.text)]))
    elif (e.source, template(e.text)) in templ:
      out.append(_majority(templ[(e.source, template(e.text))]))
    else:
      out.append(int(f))
  return np.asarray(out, np.int32)


def grouped_test_mask(keys: Sequence[str], labels: np.ndarray,
                      train_fraction: float,
                      rng: np.random.Generator) -> np.ndarray:
  """bool [n]: which examples go to test, whole groups at a time.

  Groups (examples sharing a key) get the majority label of their examples
  and are shuffled; per label, each group in turn moves to test if that
  brings the label's test count closer to ``round(n_label * (1 -
  train_fraction))``. A group is never split, so no key is on both sides. With every key distinct this is a
  stratified random split of the examples.
  """
  labels = np.asarray(labels)
  members = collections.defaultdict(list)
  for i, k in enumerate(keys):
    members[k].append(i)
  groups = list(members.values())
  group_label = np.asarray([_majority(labels[g].tolist()) for g in groups])
  test = np.zeros(len(labels), bool)
  for lab in np.unique(group_label):
    ids = np.flatnonzero(group_label == lab)
    target = round(sum(len(groups[i]) for i in ids) * (1 - train_fraction))
    taken = 0
    for i in rng.permutation(ids):     # a group joins if it brings the count
      size = len(groups[i])            # closer to the target
      if abs(taken + size - target) < abs(taken - target):
        test[groups[i]] = True
        taken += size
  return test
