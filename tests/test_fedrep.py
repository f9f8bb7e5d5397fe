"""FedRep (fdlora_jax/fl/methods/fedrep.py) on the tiny model through the
real engine: what reaches the server, which part each local step trains,
bytes on the wire, and main.py on both scenarios."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import ConfigError
from fdlora_jax.fl.methods import fedrep
from fdlora_jax.model import Llama, PRESETS
from fdlora_jax.lora import LoraConfig
from tests.helpers import (CFG, N, close, config, copy, engine, fedavg_keys,
                           noisy, run_scenario)

L = CFG.num_hidden_layers
BODY = L - max(1, L // 4)   # head_layers=0: the top quarter, at least one
MARKER = 0.0123


def rounds_config(k):
  """K local steps a round, no stage-1 steps (round 1 reads steps 0..K-1)."""
  c = config(fl__inner_steps=k)
  c.fl.local_epochs = 0.0
  return c


def first_round(eng, state):
  """``state`` moved to the first 'rounds' repeat, and that repeat's index."""
  i = next(i for i, s in enumerate(eng.schedule()) if s[0].name == 'rounds')
  return dict(state, done=jnp.int32(i)), i


def spy_on_server(eng, phase='rounds'):
  """Records the arguments of the server function of ``phase``."""
  seen, real = [], eng._servers[phase]

  def spy(server, uploads, weights, t):
    seen.append(jax.tree.map(np.asarray, (server, uploads, weights)))
    return real(server, uploads, weights, t)
  eng._servers[phase] = spy
  return seen


def with_heads(state, heads):
  return dict(state, client=dict(state['client'], head=heads))


def noisy_state(eng):
  """Initial state with non-zero body and heads (``b`` too), so every part
  gets a gradient."""
  state = eng.initial_state(jax.random.key(1))
  return dict(state, server={'body': noisy(state['server']['body'], 3, 0.05)},
              client={'head': noisy(state['client']['head'], 4, 0.05)})


@pytest.fixture(scope='module')
def engines(tiny):
  """``{K: engine}`` for K = 1 (= head_steps: head only) and K = 2 (one head
  step, then one body step); shared, each compiles once."""
  return {k: engine(tiny, fedrep, rounds_config(k)) for k in (1, 2)}


def test_server_gets_only_the_body_layers(engines):
  eng = engines[2]
  state, i = first_round(eng, noisy_state(eng))
  marker = jax.tree.map(lambda x: jnp.full_like(x, MARKER),
                        state['client']['head'])
  seen = spy_on_server(eng)
  new, m = eng.run_repeat(copy(with_heads(state, marker)), i)
  server, uploads, weights = seen[0]
  body = state['server']['body']
  assert jax.tree.structure(uploads) == jax.tree.structure(body)
  for u, b in zip(jax.tree.leaves(uploads), jax.tree.leaves(body)):
    assert b.shape[0] == BODY < L          # the layer axis: body layers only
    assert u.shape == (N,) + b.shape
  for leaf in jax.tree.leaves((server, uploads)):
    assert not np.any(leaf == np.float32(MARKER))
  # The new body is the weighted mean of exactly these uploads.
  w = weights / weights.sum()
  close(new['server']['body'],
        jax.tree.map(lambda u: np.tensordot(w, u, axes=1), uploads),
        atol=1e-6)
  # The heads trained and stayed on the clients.
  for h in jax.tree.leaves(new['client']['head']):
    assert h.shape[1] == L - BODY and not np.all(np.asarray(h) == MARKER)
  # Bytes: the body down and up, nothing of the head.
  size = lora_lib.num_bytes(body)
  head = lora_lib.num_bytes(state['client']['head']) // N
  assert size * (L - BODY) == head * BODY    # the layers' share of the bytes
  assert m['bytes_up_per_client'] == [size] * N
  assert m['bytes_down_per_client'] == [size] * N


def test_head_steps_freeze_the_body_and_body_steps_the_head(engines):
  """K = head_steps = 1: only the head trains, the upload is the download
  bit for bit, so the new global body is the old one whatever the heads are.
  K = 2: step 0 is that same head step, step 1 trains the body only."""
  one, two = engines[1], engines[2]
  state, i = first_round(one, noisy_state(one))
  body0 = state['server']['body']

  seen = spy_on_server(one)
  after1, _ = one.run_repeat(copy(state), i)
  close(seen[0][1], lora_lib.replicate(body0, N), atol=0)
  close(after1['server']['body'], body0, atol=0)
  moved = lambda a, b: max(float(jnp.abs(x - y).max()) for x, y in zip(
      jax.tree.leaves(a), jax.tree.leaves(b)))
  assert moved(after1['client']['head'], state['client']['head']) > 1e-4
  # ... and the global body does not depend on the heads then.
  marker = jax.tree.map(lambda x: jnp.full_like(x, MARKER),
                        state['client']['head'])
  after1m, _ = one.run_repeat(copy(with_heads(state, marker)), i)
  close(after1m['server']['body'], body0, atol=0)

  after2, _ = two.run_repeat(copy(state), i)
  close(after2['client']['head'], after1['client']['head'], atol=0)
  assert moved(after2['server']['body'], body0) > 1e-4
  # In a body step the client's head is part of the forward, so the body it
  # uploads depends on its head (FedRep's design; only the body leaves).
  after2m, _ = two.run_repeat(copy(with_heads(state, marker)), i)
  assert moved(after2m['server']['body'], after2['server']['body']) > 0


def test_config_checks():
  with pytest.raises(ConfigError, match='fedrep.head_steps'):
    fedrep.validate(config(fl__inner_steps=1))   # K = 1: no body step
  with pytest.raises(ConfigError, match='fedrep.head_steps'):
    fedrep.validate(config(fl__inner_steps=3, fedrep__head_steps=3))
  fedrep.validate(config(fl__inner_steps=3, fedrep__head_steps=2))
  c = config(fl__inner_steps=1)
  c.fl.inner_unit = 'epochs'   # steps vary per client: no static check
  fedrep.validate(c)
  assert lora_lib.head_start(0, 2) == 1      # the top quarter, at least 1
  assert lora_lib.head_start(0, 32) == 24
  assert lora_lib.head_start(3, 32) == 29


def test_head_needs_a_body_below_it(tiny):
  with pytest.raises(ConfigError, match='fedrep.head_layers'):
    engine(tiny, fedrep, config(fedrep__head_layers=L))


@pytest.mark.parametrize('scenario', ['logs', 'medical'])
def test_main_py(tmp_path, tmp_path_factory, scenario):
  r = run_scenario('fedrep', scenario, tmp_path, '--config.fl.inner_steps=2')
  assert set(r) == fedavg_keys(tmp_path_factory)   # the common schema
  assert r['method'] == 'fedrep' and r['phases'] == ['local', 'rounds']
  assert r['headline'] == 'personalized' and list(r['models']) == [
      'personalized']
  score = r['models']['personalized']['mean'][r['metric']]
  assert 0.0 <= score <= 1.0
  lcfg = LoraConfig.from_config(
      ml_collections.ConfigDict(r['config']['lora']))
  fresh = lora_lib.init(Llama(PRESETS['tiny'], lcfg), jax.random.key(0))
  body = lora_lib.split_layers(fresh, BODY)[0]
  rounds = r['communication']['per_round']
  assert [x['phase'] for x in rounds] == ['local', 'rounds']
  for x in rounds:
    assert x['bytes_up_per_client'] == [lora_lib.num_bytes(body)] * 2
    assert x['bytes_down_per_client'] == [lora_lib.num_bytes(body)] * 2
