"""FedSA-LoRA (fdlora_jax/fl/methods/fedsa_lora.py) on the tiny model
through the real engine: ``a`` shared and averaged, ``b`` never leaves its
client; main.py on the medical scenario (logs: test_methods)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import ConfigError
from fdlora_jax.fl.methods import fedsa_lora
from fdlora_jax.run import validate_config
from tests.helpers import (N, close, config, copy, differs, engine, leaves,
                           run_scenario, server_spy)

COUNTS = (1, 2, 4)
MARKER = 0.0123


def first_round(eng):
  return next(i for i, s in enumerate(eng.schedule()) if s[0].name == 'rounds')


def test_a_is_the_weighted_mean_and_b_stays_on_the_client(tiny):
  eng = engine(tiny, fedsa_lora, config(), COUNTS)
  state = eng.initial_state()
  after_local, _ = eng.run_repeat(copy(state), 0)
  # Every client's b set to a marker: it must never reach the server.
  marked = dict(after_local, client={'b': jax.tree.map(
      lambda x: jnp.full_like(x, MARKER), after_local['client']['b'])})
  i = first_round(eng)
  with server_spy(eng) as seen:
    new, m = eng.run_repeat(copy(marked), i)
  server, uploads, weights, _ = seen[0]
  assert jax.tree.structure(uploads) == jax.tree.structure(
      state['server']['a'])
  for leaf in leaves((server, uploads)):
    assert not np.any(leaf == np.float32(MARKER))
  w = np.asarray(COUNTS, float) / sum(COUNTS)
  np.testing.assert_allclose(weights / weights.sum(), w, rtol=1e-6)
  close(new['server']['a'],
        jax.tree.map(lambda u: np.tensordot(w, u, axes=1), uploads),
        atol=1e-6)
  # Every client evaluates (and next downloads) that a with its own b.
  rows = eng.method.rows(new['server'], new['client'])['personalized']
  a_rows = lora_lib.split_factors(rows)[0]
  close(a_rows, lora_lib.replicate(new['server']['a'], N), atol=0)
  # The b's trained and differ between clients.
  b = [np.asarray(x) for x in leaves(new['client']['b'])]
  assert all(np.abs(x[0] - x[1]).max() > 1e-4 for x in b)
  assert differs(new['client']['b'], marked['client']['b']) > 1e-4
  size = lora_lib.num_bytes(state['server']['a'])
  assert m['bytes_up_per_client'] == [size] * N
  assert m['bytes_down_per_client'] == [size] * N


def test_config_is_validated():
  c = config()
  c.method = 'fedsa_lora'
  c.fedsa_lora.weighting = 'mean'
  with pytest.raises(ConfigError, match='fedsa_lora.weighting'):
    validate_config(c)


def test_main_py_on_the_medical_scenario(tmp_path):
  r = run_scenario('fedsa_lora', 'medical', tmp_path)
  assert r['method'] == 'fedsa_lora' and r['headline'] == 'personalized'
