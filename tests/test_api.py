"""What a method declares (fdlora_jax/fl/api.py): the run's keys."""

import types

import jax
import numpy as np

from fdlora_jax.fl import api
from fdlora_jax.fl.engine import Engine


def same(a, b):
  np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))


def test_keys_are_the_keys_drawn_before_they_had_one_home():
  """Outputs stay bit-identical only if every purpose keeps its old key:
  run.py's init key(seed + 1), the engine's fold_in of key(seed) by phase
  and index, search i's key(seed + 2 + i), FDLoRA's rows key(seed + 3)."""
  k = api.Keys(7)
  same(k.init(), jax.random.key(8))
  same(k.steps(2, 5), jax.random.fold_in(
      jax.random.fold_in(jax.random.key(7), 2), 5))
  same(k.search(0), jax.random.key(9))
  same(k.search(1), jax.random.key(10))
  same(k.rows(), jax.random.key(10))


def test_engine_and_setup_share_the_run_keys():
  method = api.Method('none', init=lambda key: ({}, {}), phases=(),
                      rows=lambda s, c: {})
  eng = Engine(method=method, model=None, base=None, fl_cfg=None,
               num_clients=3, sample=None, seed=4)
  setup = api.Setup(model=None, base=None,
                    config=types.SimpleNamespace(seed=4), num_clients=3,
                    train_counts=np.ones(3), label_counts=np.ones((3, 2)),
                    few_shot={}, lora_init=None)
  assert eng.keys == setup.keys == api.Keys(4)
  same(eng._rngs(1, 3)[2], jax.random.split(api.Keys(4).steps(1, 3), 3)[2])
