"""FFA-LoRA (fdlora_jax/fl/methods/ffa_lora.py) on the tiny model through
the real engine: ``a`` frozen at its one shared draw, only ``b`` sent, the
aggregate exact; main.py on the medical scenario (logs: test_methods)."""

import jax
import numpy as np
import pytest

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import ConfigError
from fdlora_jax.fl.methods import ffa_lora
from fdlora_jax.run import validate_config
from tests.helpers import (LCFG, N, assert_deltas_close, assert_same, config,
                           copy, engine, run_scenario, server_spy,
                           weighted_delta)

COUNTS = (1, 2, 4)


@pytest.fixture(scope='module')
def run(tiny):
  """Every repeat of a tiny run, with what reached the server and what each
  client trained (``finish``'s ``train``)."""
  eng = engine(tiny, ffa_lora, config(), COUNTS)
  state = eng.initial_state()
  states, metrics, seen, trained = [state], [], [], []
  for i, (phase, *_rest) in enumerate(eng.schedule()):
    real = eng._finishes[phase.name]

    def finish_spy(client, train, download, t, real=real):
      trained.append(jax.tree.map(np.asarray, (train, download)))
      return real(client, train, download, t)
    eng._finishes[phase.name] = finish_spy
    try:
      with server_spy(eng, phase.name) as spy:
        state, m = eng.run_repeat(copy(state), i)
    finally:
      eng._finishes[phase.name] = real
    states.append(state)
    metrics.append(m)
    seen.append(spy[0])
  return eng, states, metrics, seen, trained


def test_a_is_its_shared_draw_after_every_round(run):
  """The server's ``a`` is the init's draw after every round, and what a
  client trains is ``b`` alone: every client applies that same ``a``."""
  eng, states, _, _, trained = run
  a0 = lora_lib.split_factors(lora_lib.init(eng.model, eng.keys.init()))[0]
  for s in states:
    assert_same(s['server']['a'], a0)
  for train, download in trained:
    assert jax.tree.structure(train) == jax.tree.structure(
        states[0]['server']['b'])
    assert_same(download['a'], lora_lib.replicate(a0, N))
  # b moved (the method trained something).
  assert any(np.any(np.asarray(x)) for x in
             jax.tree.leaves(states[-1]['server']['b']))


def test_only_b_reaches_the_server_and_the_mean_is_exact(run):
  """``mean(b_i)`` with the common ``a`` is ``mean(a b_i)`` to float
  tolerance, and the uploads are ``b`` alone."""
  eng, states, metrics, seen, _ = run
  w = np.asarray(COUNTS, float)
  for before, after, (server, uploads, weights, _) in zip(
      states, states[1:], seen):
    assert jax.tree.structure(uploads) == jax.tree.structure(
        before['server']['b'])
    a = lora_lib.replicate(before['server']['a'], N)
    want = weighted_delta(lora_lib.join_factors(a, uploads), w, LCFG.scale)
    got = lora_lib.delta_weights(
        lora_lib.join_factors(after['server']['a'], after['server']['b']), LCFG.scale)
    assert_deltas_close(got, want)
  size = lora_lib.num_bytes(states[0]['server']['b'])
  for m in metrics:        # a is never sent: b down and up
    assert m['bytes_down_per_client'] == [size] * N
    assert m['bytes_up_per_client'] == [size] * N
  assert size < lora_lib.num_bytes(states[0]['server'])


def test_config_is_validated():
  c = config()
  c.method = 'ffa_lora'
  c.ffa_lora.weighting = 'mean'
  with pytest.raises(ConfigError, match='ffa_lora.weighting'):
    validate_config(c)


def test_main_py_on_the_medical_scenario(tmp_path):
  r = run_scenario('ffa_lora', 'medical', tmp_path)
  assert r['method'] == 'ffa_lora' and r['headline'] == 'global'
  assert r['communication']['bytes_total'] > 0
