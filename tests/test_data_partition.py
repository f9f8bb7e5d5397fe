"""Partitions (fdlora_jax/data/partition.py): Dirichlet and by-source
splits, rebalancing, stratified train/test and few-shot draws.

On the real samples in ../shared/data (see its README.md)."""

import json

import numpy as np
import pytest

from fdlora_jax import data
from fdlora_jax import errors
from fdlora_jax.data.partition import few_shot_draw
from fdlora_jax.data.partition import train_test_split
from tests.helpers import LOGHUB, logs_cfg, medical_cfg, needs_shared


def test_bad_partition_and_length_config_are_config_errors(tok):
  task = data.load_task(logs_cfg(), 0)
  for field, value in (('partition', 'iid'), ('dirichlet_alpha', 0.0),
                       ('train_fraction', 1.5),
                       ('min_examples_per_client', 1000)):
    with pytest.raises(errors.ConfigError, match=f'config.data.{field}='):
      data.partition(task, 3, logs_cfg(**{field: value}), seed=0)
  with pytest.raises(errors.ConfigError, match='config.data.max_length=16'):
    data.encode_options(tok, task, [np.arange(2)], logs_cfg(max_length=16))


def _label_entropy(task, part):
  labels, out = task.labels(), []
  for i in range(part.num_clients):
    idx = np.concatenate([part.train[i], part.test[i]])
    q = np.bincount(labels[idx], minlength=len(task.options)) / len(idx)
    q = q[q > 0]
    out.append(-(q * np.log(q)).sum())
  return float(np.mean(out))


@needs_shared
def test_dirichlet_partition_deterministic_and_complete():
  task = data.load_task(medical_cfg('pubmedqa'), 0)
  cfg = medical_cfg('pubmedqa')
  a = data.partition(task, 5, cfg, seed=7)
  b = data.partition(task, 5, cfg, seed=7)
  c = data.partition(task, 5, cfg, seed=8)
  assert all(np.array_equal(x, y) for x, y in zip(a.train + a.test +
                                                  a.few_shot,
                                                  b.train + b.test +
                                                  b.few_shot))
  assert not all(np.array_equal(x, y) for x, y in zip(a.train, c.train))
  everything = np.concatenate(a.train + a.test)
  assert np.array_equal(np.sort(everything), np.arange(500))  # once each
  for i in range(5):
    n = len(a.train[i]) + len(a.test[i])
    assert n >= cfg.min_examples_per_client
    assert len(a.test[i]) == max(1, round(0.2 * n))
    assert len(a.few_shot[i]) == min(5, len(a.train[i]))
    assert set(a.few_shot[i]) <= set(a.train[i])


@needs_shared
def test_smaller_alpha_more_skew():
  task = data.load_task(medical_cfg('pubmedqa'), 0)
  means = []
  for alpha in (0.1, 0.5, 1.0):
    cfg = medical_cfg('pubmedqa', dirichlet_alpha=alpha)
    means.append(np.mean([_label_entropy(task, data.partition(task, 5, cfg, s))
                          for s in range(10)]))
  # Mean per-client label entropy (nats, 3 classes), seeds 0..9.
  np.testing.assert_allclose(means, [0.3389, 0.6442, 0.7463], atol=2e-3)
  assert means[0] < means[1] < means[2]


def test_min_examples_rebalance():
  examples = [data.Example('x', ('no', 'yes'), int(i < 3), 's')
              for i in range(40)]
  task = data.Task('loghub', examples, ('no', 'yes'), 'f1', 'test', False)
  cfg = logs_cfg(dirichlet_alpha=0.01, min_examples_per_client=6)
  part = data.partition(task, 5, cfg, seed=0)
  sizes = [len(a) + len(b) for a, b in zip(part.train, part.test)]
  assert min(sizes) >= 6 and sum(sizes) == 40
  with pytest.raises(ValueError, match='min_examples_per_client=9'):
    data.partition(task, 5, logs_cfg(min_examples_per_client=9), seed=0)


def test_stratified_split_puts_each_repeated_label_in_test():
  # 60 examples, 6 anomalous, Dir(0.5) over 5 clients: the plain split
  # leaves some clients' anomalies all in train; the stratified split does
  # not, and keeps the same clients' examples (only the split changes).
  examples = [data.Example('x', ('no', 'yes'), int(i % 10 == 0), 's')
              for i in range(60)]
  task = data.Task('loghub', examples, ('no', 'yes'), 'f1', 'test', False)
  labels = task.labels()
  missed = 0
  for seed in range(20):
    plain = data.partition(task, 5, logs_cfg(), seed)
    strat = data.partition(task, 5, logs_cfg(stratify=True), seed)
    assert 'stratified' in strat.method and 'stratified' not in plain.method
    for i in range(5):
      client = np.concatenate([strat.train[i], strat.test[i]])
      assert np.array_equal(np.sort(client), np.sort(np.concatenate(
          [plain.train[i], plain.test[i]])))
      assert len(np.intersect1d(strat.train[i], strat.test[i])) == 0
      assert set(strat.few_shot[i]) <= set(strat.train[i])
      for k in (0, 1):
        held = int((labels[client] == k).sum())
        in_test = int((labels[strat.test[i]] == k).sum())
        if held >= 2:
          assert 1 <= in_test <= held - 1, (seed, i, k, held, in_test)
          assert in_test == min(max(round(0.2 * held), 1), held - 1)
      plain_yes = (labels[plain.test[i]] == 1).sum()
      held_yes = (labels[np.concatenate([plain.train[i], plain.test[i]])]
                  == 1).sum()
      missed += int(held_yes >= 2 and plain_yes == 0)
  assert missed > 0  # the plain split does miss them: the test is not empty


def test_stratified_split_of_singletons_keeps_one_each_side():
  idx = np.array([3, 8])
  labels = np.array([0, 0, 0, 1, 0, 0, 0, 0, 0, 0])  # idx: one of each label
  tr, te = train_test_split(
      idx, 0.8, np.random.default_rng(0), labels)
  assert len(tr) == 1 and len(te) == 1 and set(tr) | set(te) == {3, 8}


@needs_shared
def test_partition_by_source_and_json(tmp_path):
  task = data.load_task(logs_cfg(dir=str(LOGHUB)), 0)
  cfg = logs_cfg(dir=str(LOGHUB), partition='source')
  part = data.partition(task, 3, cfg, seed=0)
  for i, name in enumerate(['BGL', 'Spirit', 'Thunderbird']):
    idx = np.concatenate([part.train[i], part.test[i]])
    assert {task.examples[j].source for j in idx} == {name}
  data.write_partition(tmp_path / 'run' / 'partition.json', part, task)
  info = json.loads((tmp_path / 'run' / 'partition.json').read_text())
  assert info['clients'][0]['sources'] == {'BGL': 40}
  assert info['clients'][0]['class_counts']['train']['yes'] + info[
      'clients'][0]['class_counts']['test']['yes'] == 17
  assert info['data_source'] == task.data_source
  table = part.table(task)
  assert 'BGL:40' in table and 'client' in table and 'real:' in table


def test_stratified_few_shot_holds_every_label_the_client_trains_on():
  # 10% anomalous: 5 random draws from a client's training split often
  # miss its few anomalies; the stratified draw never does.
  examples = [data.Example('x', ('no', 'yes'), int(i % 10 == 0), 's')
              for i in range(200)]
  task = data.Task('loghub', examples, ('no', 'yes'), 'f1', 'test', False)
  labels = task.labels()
  missed = 0
  for seed in range(10):
    plain = data.partition(task, 5, logs_cfg(), seed)
    strat = data.partition(task, 5, logs_cfg(stratify=True), seed)
    for i in range(5):
      few = strat.few_shot[i]
      assert len(few) == min(5, len(strat.train[i])) == len(set(few))
      assert set(few) <= set(strat.train[i])
      assert set(labels[few]) == set(labels[strat.train[i]])
      missed += int(set(labels[plain.few_shot[i]]) !=
                    set(labels[plain.train[i]]))
  assert missed > 0  # the random draw does miss a label


def test_few_shot_draw_rarest_label_first_and_k_caps_it():
  labels = np.array([0] * 8 + [1] * 3 + [2])
  train = np.arange(12)
  rng = np.random.default_rng(0)
  one = few_shot_draw(train, 1, rng, labels)
  assert labels[one].tolist() == [2]
  two = few_shot_draw(train, 2, rng, labels)
  assert sorted(labels[two].tolist()) == [1, 2]
  assert len(few_shot_draw(train, 50, rng, labels)) == 12
  assert len(few_shot_draw(train, 3, rng, None)) == 3


@needs_shared
@pytest.mark.parametrize('split', ['dedup', 'template'])
def test_grouped_splits_keep_messages_on_one_side_of_real_bgl(split):
  """data.split: no message (dedup) or template on both sides, over every
  client, on the real BGL lines."""
  from fdlora_jax.data import references    # pylint: disable=g-import-not-at-top
  cfg = logs_cfg(dir=str(LOGHUB), files='BGL_2k.log', window_size=1,
                 window_stride=1, split=split, min_examples_per_client=20)
  task = data.load_task(cfg, 0)
  part = data.partition(task, 5, cfg, seed=0)
  key = (lambda e: e.text) if split == 'dedup' else (
      lambda e: references.template(e.text))
  train = {key(task.examples[j]) for idx in part.train for j in idx}
  test = {key(task.examples[j]) for idx in part.test for j in idx}
  assert test and not train & test
  assert f'{split} train/test split' in part.method
  n = len(task.examples)
  everything = np.concatenate(part.train + part.test)
  assert sorted(everything.tolist()) == list(range(n))   # nothing lost
  # The share of test examples stays near 1 - train_fraction.
  assert 0.1 < sum(map(len, part.test)) / n < 0.3


def test_a_bad_split_is_named(tok):
  del tok
  task = data.load_task(logs_cfg(), 0)
  with pytest.raises(errors.ConfigError, match='config.data.split='):
    data.partition(task, 3, logs_cfg(split='templates'), seed=0)


@needs_shared
def test_data_dir_reads_its_subfolders_so_thunderbird_has_anomalies():
  cfg = logs_cfg(dir=str(LOGHUB.parent), systems='BGL,Thunderbird',
                 window_size=1, window_stride=1)
  task = data.load_task(cfg, 0)
  by = {}
  for e in task.examples:
    by.setdefault(e.source, []).append(e.label)
  assert {s: (len(v), sum(v)) for s, v in by.items()} == {
      'BGL': (3000, 224), 'Thunderbird': (3000, 19)}
