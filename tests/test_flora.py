"""FLoRA (fdlora_jax/fl/methods/flora.py) on the tiny model through the
real engine, clients of ranks 4, 8 and 16: fresh adapters every round, the
stacked aggregate exact, bytes of the stack; main.py on the medical
scenario (logs: test_methods; kill and resume: test_run)."""

import numpy as np
import pytest

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import ConfigError
from fdlora_jax.fl.methods import flora
from fdlora_jax.run import validate_config
from tests.helpers import (LCFG, N, assert_deltas_close, config, copy,
                           engine, leaves, run_scenario, server_spy,
                           weighted_delta)

COUNTS = (1, 2, 4)
RANKS = (4, 8, 16)


@pytest.fixture(scope='module')
def eng(tiny):
  return engine(tiny, flora, config(flora__ranks=RANKS), COUNTS)


def test_every_round_starts_fresh_adapters_of_each_clients_rank(eng):
  state = eng.initial_state()
  starts = eng._starts['rounds']
  one = starts(state['client'], eng._download(eng.training[1],
                                              state['server'], 1))
  two = starts(state['client'], eng._download(eng.training[1],
                                              state['server'], 2))
  np.testing.assert_array_equal(one['rank'], RANKS)
  for path in lora_lib.adapted_paths(one['lora']):
    a = np.asarray(lora_lib._get(one['lora'], path)['a'])     # [N, L, in, 16]
    b = np.asarray(lora_lib._get(one['lora'], path)['b'])
    assert a.shape[-1] == max(RANKS) and not np.any(b)
    for i, r in enumerate(RANKS):
      assert np.all(np.any(a[i, ..., :r] != 0, axis=-2))
      assert not np.any(a[i, ..., r:])
    assert not np.allclose(a[0, ..., :4], a[1, ..., :4])   # per client
    a2 = np.asarray(lora_lib._get(two['lora'], path)['a'])
    assert not np.allclose(a, a2)                           # per round


def test_the_stacked_aggregate_is_exact_and_the_stack_is_sent(eng):
  state = eng.initial_state()
  w = np.asarray(COUNTS, float)
  component = int(lora_lib.rank_bytes(state['server']['stack'], 1))
  for i, (phase, _, t, _) in enumerate(eng.schedule()):
    with server_spy(eng, phase.name) as seen:
      new, m = eng.run_repeat(copy(state), i)
    _, uploads, _, _ = seen[0]
    np.testing.assert_array_equal(uploads['rank'], RANKS)
    # What the stack added is sum_i p_i a_i b_i of the uploads exactly
    # (each at alpha / r_i), whatever the ranks.
    old = lora_lib.delta_weights(state['server']['stack'], LCFG.scale)
    added = {p: np.asarray(d) - np.asarray(old[p]) for p, d in
             lora_lib.delta_weights(new['server']['stack'],
                                    LCFG.scale).items()}
    assert_deltas_close(added, weighted_delta(uploads['lora'], w,
                                              LCFG.scale))
    assert int(new['server']['sent']) == sum(RANKS)
    # Up: each client's own rank; down: the whole stack of the last round,
    # sum of the ranks, larger than any upload.
    assert m['bytes_up_per_client'] == [r * component for r in RANKS]
    down = 0 if i == 0 else sum(RANKS) * component
    assert m['bytes_down_per_client'] == [down] * N
    state = new
  assert all(np.all(np.isfinite(x)) for x in leaves(state))


def test_config_is_validated():
  for field, value in (('ranks', (4, 0)), ('ranks', (2.5,)),
                       ('weighting', 'mean')):
    c = config()
    c.method = 'flora'
    c.flora[field] = value
    with pytest.raises(ConfigError, match=f'flora.{field}'):
      validate_config(c)


def test_main_py_on_the_medical_scenario(tmp_path):
  r = run_scenario('flora', 'medical', tmp_path, '--config.flora.ranks=(2,4)')
  assert r['method'] == 'flora' and r['headline'] == 'global'
