"""fdlora_jax.data.references: the no-model answers on a toy set whose
answers are known, and the grouped split on the real BGL sample."""

import collections
from pathlib import Path

import numpy as np
import pytest

from fdlora_jax.data import logs, references
from fdlora_jax.data.examples import Example

BGL = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'loghub' / \
    'BGL_2k.log'


def ex(text, label, source='BGL'):
  return Example(text=text, options=('no', 'yes'), label=label, source=source)


def test_template_masks_numbers_hex_paths_and_addresses():
  assert references.template(
      'ciod: failed to read message prefix on control stream (CioStream '
      'socket to 172.16.96.116:33569') == (
          'ciod: failed to read message prefix on control stream (CioStream '
          'socket to <ip>')
  assert references.template('63543 double-hummer alignment exceptions') == \
      '<num> double-hummer alignment exceptions'
  assert references.template('fault at 0x1f2e3d in /usr/lib/libc.so.6') == \
      'fault at <hex> in <path>'
  assert references.template('core.2275 dumped  at 12:01:01') == \
      'core.<num> dumped at <num>'
  assert references.template('a b') == references.template('a  b')


TRAIN = [ex('kernel panic 12', 1), ex('kernel panic 13', 1),
         ex('disk ok', 0), ex('tlb error', 1),
         ex('session opened', 0, 'Thunderbird'),
         ex('session closed', 0, 'Thunderbird'),
         ex('session lost', 1, 'Thunderbird')]


def test_by_system_answers_each_systems_majority_label():
  test = [ex('anything', 0), ex('anything', 1, 'Thunderbird'),
          ex('anything', 0, 'Spirit')]
  # BGL: 3 yes, 1 no -> yes; Thunderbird: 2 no, 1 yes -> no; Spirit unseen:
  # the overall majority (4 yes, 3 no) -> yes.
  assert references.by_system(TRAIN, test).tolist() == [1, 0, 1]


def test_nearest_message_prefers_exact_then_template_then_system():
  test = [ex('disk ok', 1),                 # exact: no
          ex('kernel panic 99', 0),         # template 'kernel panic <num>': yes
          ex('session lost', 0, 'Thunderbird'),   # exact: yes
          ex('never seen', 0),              # BGL majority: yes
          ex('disk ok', 0, 'Thunderbird')]  # other system's text: TB majority
  assert references.nearest_message(TRAIN, test).tolist() == [0, 1, 1, 1, 0]


def test_group_keys():
  es = [ex('a 1', 0), ex('a 1', 0), ex('a 2', 1), ex('a 1', 0, 'Spirit')]
  assert references.group_keys(es, 'random') == ['0', '1', '2', '3']
  dedup = references.group_keys(es, 'dedup')
  assert dedup[0] == dedup[1] != dedup[2] and dedup[3] != dedup[0]
  templ = references.group_keys(es, 'template')
  assert templ[0] == templ[1] == templ[2] != templ[3]
  with pytest.raises(ValueError, match='split'):
    references.group_keys(es, 'by_day')


def test_grouped_mask_with_distinct_keys_is_a_stratified_split():
  labels = np.array([0] * 40 + [1] * 10)
  mask = references.grouped_test_mask([str(i) for i in range(50)], labels,
                                      0.8, np.random.default_rng(0))
  assert mask[labels == 0].sum() == 8 and mask[labels == 1].sum() == 2


@pytest.mark.skipif(not BGL.is_file(), reason='needs ../shared/data')
@pytest.mark.parametrize('split', ['dedup', 'template'])
def test_grouped_split_never_puts_one_key_on_both_sides_of_real_bgl(split):
  stats = logs.ParseStats(str(BGL))
  examples = list(logs.log_examples(BGL, 1, 1, stats))
  labels = np.array([e.label for e in examples])
  keys = references.group_keys(examples, split)
  mask = references.grouped_test_mask(keys, labels, 0.8,
                                      np.random.default_rng(0))
  sides = collections.defaultdict(set)
  for k, t in zip(keys, mask):
    sides[k].add(bool(t))
  assert all(len(s) == 1 for s in sides.values())
  # Both labels reach the test side, about a fifth of each.
  for lab in (0, 1):
    share = mask[labels == lab].mean()
    assert 0.1 < share < 0.5, (split, lab, share)
  # The real sample repeats its anomalous messages: far fewer keys than lines.
  anomalous = {k for k, l in zip(keys, labels) if l}
  assert len(anomalous) < labels.sum() / 2
