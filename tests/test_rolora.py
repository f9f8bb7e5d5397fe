"""RoLoRA (fdlora_jax/fl/methods/rolora.py) on the tiny model through the
real engine: one factor trains per round, the other is bit-identical on
every client, each aggregate is the mean of the products; main.py on the
medical scenario (logs: test_methods)."""

import numpy as np
import pytest

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import ConfigError
from fdlora_jax.fl.methods import rolora
from fdlora_jax.run import validate_config
from tests.helpers import (LCFG, N, assert_deltas_close, assert_same, config,
                           copy, differs, engine, run_scenario, server_spy,
                           weighted_delta)

COUNTS = (1, 2, 4)


def test_the_factors_take_turns():
  assert [bool(rolora.trains_b(t)) for t in range(5)] == [
      True, True, False, True, False]


def test_frozen_factor_is_bit_identical_and_the_aggregate_exact(tiny):
  eng = engine(tiny, rolora, config(), COUNTS)
  state = eng.initial_state()
  w = np.asarray(COUNTS, float)
  trained = []
  for i, (phase, _, t, _) in enumerate(eng.schedule()):
    with server_spy(eng, phase.name) as seen:
      new, m = eng.run_repeat(copy(state), i)
    _, uploads, _, _ = seen[0]
    on_b = bool(rolora.trains_b(t))
    trained.append('b' if on_b else 'a')
    frozen, moving = ('a', 'b') if on_b else ('b', 'a')
    # Every client's frozen factor is the download's, bit for bit; the
    # server keeps it, and moves the trained one.
    assert_same(uploads[frozen],
                lora_lib.replicate(state['server'][frozen], N))
    assert_same(new['server'][frozen], state['server'][frozen])
    assert differs(new['server'][moving], state['server'][moving]) > 1e-5
    # The new global product is the weighted mean of the clients' products.
    assert_deltas_close(
        lora_lib.delta_weights(lora_lib.join_factors(new['server']['a'], new['server']['b']),
                               LCFG.scale),
        weighted_delta(lora_lib.join_factors(uploads['a'], uploads['b']), w, LCFG.scale))
    # Only the trained factor leaves a client.
    assert m['bytes_up_per_client'] == [
        lora_lib.num_bytes(state['server'][moving])] * N
    assert m['bytes_down_per_client'] == [
        lora_lib.num_bytes(state['server'])] * N
    state = new
  assert trained == ['b', 'b', 'a']     # local stage, round 1, round 2


def test_config_is_validated():
  c = config()
  c.method = 'rolora'
  c.rolora.weighting = 'mean'
  with pytest.raises(ConfigError, match='rolora.weighting'):
    validate_config(c)


def test_main_py_on_the_medical_scenario(tmp_path):
  r = run_scenario('rolora', 'medical', tmp_path)
  assert r['method'] == 'rolora' and r['headline'] == 'global'
