"""`load_task` (fdlora_jax/data/tasks.py): bad input of either scenario is
a one-line user error; balancing labels.

On the real samples in ../shared/data (see its README.md)."""

import numpy as np
import pytest

from fdlora_jax import data
from fdlora_jax import errors
from tests.helpers import logs_cfg, medical_cfg, needs_shared, write_file


def _random_bytes(n=4096):
  return np.random.default_rng(0).integers(0, 256, n, np.uint8).tobytes()


# Each case: (setup(tmp_path) -> (call, what the message must name)), type.
_BAD_INPUT = {
    'empty_log': (lambda t: (
        lambda: data.load_task(logs_cfg(dir=str(t)), 0),
        str(write_file(t / 'BGL_empty.log', b'').resolve())), errors.DataError),
    'binary_log': (lambda t: (
        lambda: data.load_task(logs_cfg(dir=str(t)), 0),
        str(write_file(t / 'BGL_x.log', _random_bytes()).resolve())),
                   errors.DataError),
    'binary_spirit_json': (lambda t: (
        lambda: data.load_task(logs_cfg(dir=str(t)), 0),
        str(write_file(t / 'Spirit' / 'x.json', _random_bytes()).resolve())),
                           errors.DataError),
    'missing_dir': (lambda t: (
        lambda: data.load_task(logs_cfg(dir=str(t / 'nope')), 0),
        f"config.data.dir='{t / 'nope'}'"), errors.MissingFileError),
    'missing_file': (lambda t: (
        lambda: data.load_task(logs_cfg(dir=str(t), files='BGL_9k.log'), 0),
        "config.data.files='BGL_9k.log'"), errors.MissingFileError),
    'missing_medical_dir': (lambda t: (
        lambda: data.load_task(medical_cfg('pubmedqa', dir=str(t / 'no')), 0),
        'config.data.dir='), errors.MissingFileError),
    'binary_pubmedqa': (lambda t: (
        lambda: data.load_task(medical_cfg('pubmedqa', dir=str(t)), 0),
        str(write_file(t / 'pubmedqa_x.json', _random_bytes()).resolve())),
                        errors.DataError),
    'binary_chemprot': (lambda t: (
        lambda: data.load_task(medical_cfg('chemprot', dir=str(t)), 0),
        str(write_file(t / 'chemprot_x.jsonl', _random_bytes()).resolve())),
                        errors.DataError),
    'binary_mqp_csv': (lambda t: (
        lambda: data.load_task(medical_cfg('mqp', dir=str(t)), 0),
        str(write_file(t / 'mqp_x.csv', _random_bytes()).resolve())),
                       errors.DataError),
    'unknown_task': (lambda t: (
        lambda: data.load_task(logs_cfg(task='nope'), 0),
        "config.data.task='nope'"), errors.ConfigError),
    'window_size': (lambda t: (
        lambda: data.load_task(logs_cfg(dir=str(t), window_size=0), 0),
        'config.data.window_size=0'), errors.ConfigError),
    'systems': (lambda t: (
        lambda: data.load_task(logs_cfg(systems='BGL,HDFS'), 0),
        "config.data.systems='BGL,HDFS'"), errors.ConfigError),
}


@pytest.mark.parametrize('case', sorted(_BAD_INPUT))
def test_bad_input_is_a_one_line_user_error(tmp_path, case):
  setup, kind = _BAD_INPUT[case]
  call, named = setup(tmp_path)
  with pytest.raises(kind) as e:
    call()
  message = str(e.value)
  assert isinstance(e.value, errors.UserError)
  assert named in message
  assert '\n' not in message and len(message.splitlines()) == 1


@needs_shared
def test_balance_keeps_the_rarest_labels_count_of_each():
  full = data.load_task(medical_cfg('pubmedqa'), 0)
  task = data.load_task(medical_cfg('pubmedqa', balance=True), 0)
  assert data.class_counts(task) == {'yes': 55, 'no': 55, 'maybe': 55}
  assert 'balanced: 55 per label of 3, seed 0' in task.data_source
  texts = [e.text for e in full.examples]
  order = [texts.index(e.text) for e in task.examples]
  assert order == sorted(order)          # a subset, in file order
  maybe = {e.text for e in full.examples if e.options[e.label] == 'maybe'}
  assert maybe <= {e.text for e in task.examples}   # the rarest: all kept
  other = data.load_task(medical_cfg('pubmedqa', balance=True), 1)
  assert [e.text for e in other.examples] != [e.text for e in task.examples]
  both = data.load_task(medical_cfg('pubmedqa', balance=True,
                                    max_examples=30), 0)
  assert len(both.examples) == 30
  assert {e.text for e in both.examples} <= {e.text for e in task.examples}
