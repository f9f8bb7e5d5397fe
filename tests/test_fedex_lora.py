"""FedEx-LoRA (fdlora_jax/fl/methods/fedex_lora.py): the residual makes the
aggregate exact, on a toy server call and through the real engine; bytes of
the new residual slot; main.py on the medical scenario (logs:
test_methods)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import ConfigError
from fdlora_jax.fl.methods import fedex_lora
from fdlora_jax.fl.ranks import Stack
from fdlora_jax.run import validate_config
from tests.helpers import (LCFG, N, assert_deltas_close, config, copy,
                           engine, leaves, noise, run_scenario, server_spy,
                           weighted_delta)

COUNTS = (1, 2, 4)


def effective(server):
  """The delta every client applies: the residual stack and the global."""
  return Stack.on(server['residual'], server['global'])


def test_the_effective_update_is_the_weighted_mean_of_the_products(tiny):
  """Toy problem: random uploads (``b`` non-zero), weights 1, 2, 4; one
  server call. FedAvg of the factors alone misses; with the residual the
  effective delta is ``sum_i p_i a_i b_i``."""
  eng = engine(tiny, fedex_lora, config(), COUNTS)
  state = eng.initial_state()
  uploads = noise(lora_lib.replicate(state['server']['global'], N), 3)
  w = jnp.asarray(COUNTS, jnp.float32)
  new, metrics = eng._servers['rounds'](state['server'], uploads, w,
                                        jnp.int32(1))
  want = weighted_delta(uploads, w, LCFG.scale)
  assert_deltas_close(lora_lib.delta_weights(effective(new), LCFG.scale),
                      want)
  plain = lora_lib.delta_weights(new['global'], LCFG.scale)
  assert max(float(np.abs(plain[p] - want[p]).max()) for p in want) > 1e-2
  assert float(metrics['residual_norm']) > 0
  assert int(new['sent']) == N * LCFG.rank
  # A NaN client of weight 0 adds nothing.
  poisoned = jax.tree.map(lambda x: x.at[1].set(jnp.nan), uploads)
  w0 = jnp.asarray([1.0, 0.0, 4.0])
  new0, _ = eng._servers['rounds'](state['server'], poisoned, w0,
                                   jnp.int32(1))
  assert all(np.all(np.isfinite(x)) for x in leaves(new0))
  assert_deltas_close(lora_lib.delta_weights(effective(new0), LCFG.scale),
                      weighted_delta(uploads, w0, LCFG.scale))
  assert int(new0['sent']) == 2 * LCFG.rank


def test_every_round_is_exact_and_sends_only_the_new_slot(tiny):
  """Through the engine: after each repeat the effective model is the
  weighted mean of the clients' effective models (each trained on top of
  the previous residual)."""
  eng = engine(tiny, fedex_lora, config(), COUNTS)
  state = eng.initial_state()
  w = np.asarray(COUNTS, float)
  component = lora_lib.num_bytes(state['server']['global']) // LCFG.rank
  for i, (phase, _, t, _) in enumerate(eng.schedule()):
    with server_spy(eng, phase.name) as seen:
      new, m = eng.run_repeat(copy(state), i)
    _, uploads, _, _ = seen[0]
    before = lora_lib.replicate(state['server']['residual'], N)
    clients = Stack.on(before, uploads)
    assert_deltas_close(lora_lib.delta_weights(effective(new['server']),
                                               LCFG.scale),
                        weighted_delta(clients, w, LCFG.scale))
    sent = int(state['server']['sent'])
    assert sent == (0 if i == 0 else N * LCFG.rank)
    assert m['bytes_down_per_client'] == [
        lora_lib.num_bytes(state['server']['global']) + sent * component] * N
    assert m['bytes_up_per_client'] == [
        lora_lib.num_bytes(state['server']['global'])] * N
    state = new


def test_config_is_validated():
  c = config()
  c.method = 'fedex_lora'
  c.fedex_lora.weighting = 'mean'
  with pytest.raises(ConfigError, match='fedex_lora.weighting'):
    validate_config(c)


def test_main_py_on_the_medical_scenario(tmp_path):
  r = run_scenario('fedex_lora', 'medical', tmp_path)
  assert r['method'] == 'fedex_lora' and r['headline'] == 'global'
