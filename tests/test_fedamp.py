"""FedAMP (fdlora_jax/fl/methods/fedamp.py): attention weights, the
personalized cloud adapters, the proximal pull, per-client downloads, and a
run from main.py in both scenarios."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdlora_jax import lora as lora_lib
from fdlora_jax.fl.engine import Engine, Forward
from fdlora_jax.fl.methods import fdlora, fedamp
from fdlora_jax.fl.server import (delta_cosine, flatten_clients, mix,
                                  pairwise_cosine)
from tests.helpers import (MEDICAL_FLAGS, N, adapter_bytes, close, config,
                           copy, engine, fedavg_schema, main_py, noisy,
                           random_batches, schema_keys)

SIGMA, SELF = 3.0, 0.4


# ---------------------------------------------------------------------------
# Attention weights
# ---------------------------------------------------------------------------
def test_identical_clients_attend_to_each_other_most():
  x, y = np.random.default_rng(0).normal(size=(2, 50))
  flat = jnp.asarray(np.stack([x, x, y]))
  cos = pairwise_cosine(flat)
  xi = np.asarray(fedamp.attention_weights(cos, jnp.ones(3), SIGMA, SELF))
  # Each of the two twins gives the other more than the third client does.
  assert xi[0, 1] > xi[2, 1] and xi[1, 0] > xi[2, 0]
  # The formula: (1 - xi_ii) exp(s cos_ij) / sum_{h != i} exp(s cos_ih).
  c = float(np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y))
  np.testing.assert_allclose(
      xi[0, 1], (1 - SELF) * np.exp(SIGMA) / (np.exp(SIGMA) +
                                              np.exp(SIGMA * c)), rtol=1e-5)
  np.testing.assert_allclose(xi[2, 0], (1 - SELF) / 2, rtol=1e-6)
  np.testing.assert_allclose(np.diag(xi), SELF)
  np.testing.assert_allclose(xi.sum(1), 1.0, rtol=1e-6)
  # sigma = 0: the neighbours share 1 - xi_ii equally.
  xi0 = np.asarray(fedamp.attention_weights(cos, jnp.ones(3), 0.0, SELF))
  np.testing.assert_allclose(xi0[0], [SELF, (1 - SELF) / 2, (1 - SELF) / 2],
                             rtol=1e-6)


def test_zero_weight_clients_are_no_ones_neighbour():
  flat = jnp.asarray(np.random.default_rng(1).normal(size=(4, 20)))
  weights = jnp.array([1.0, 0.0, 1.0, 1.0])
  xi = np.asarray(fedamp.attention_weights(pairwise_cosine(flat), weights,
                                           SIGMA, SELF))
  np.testing.assert_array_equal(xi[[0, 2, 3], 1], 0.0)
  np.testing.assert_allclose(xi.sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.diag(xi), SELF)
  # A client whose only neighbour is gone keeps all of itself.
  xi = np.asarray(fedamp.attention_weights(
      pairwise_cosine(flat[:2]), jnp.array([1.0, 0.0]), SIGMA, SELF))
  np.testing.assert_allclose(xi, [[1.0, 0.0], [1 - SELF, SELF]])


def test_delta_cosine_is_the_cosine_of_a_times_b(tiny):
  model, _ = tiny
  fresh = lora_lib.init(model, jax.random.key(0))
  uploads = lora_lib.stack([noisy(fresh, i) for i in range(N)])
  is_ab = lambda n: isinstance(n, dict) and set(n) == {'a', 'b'}
  flat = jnp.concatenate([
      jnp.einsum('nlir,nlro->nlio', ab['a'], ab['b']).reshape(N, -1)
      for ab in jax.tree.leaves(uploads, is_leaf=is_ab)], axis=1)
  close(delta_cosine(uploads), pairwise_cosine(flat), atol=1e-5)
  # Not the cosine of the raw parameters.
  assert float(jnp.abs(delta_cosine(uploads) - pairwise_cosine(
      flatten_clients(uploads))).max()) > 1e-2


@pytest.mark.parametrize('similarity', ['delta', 'adapter'])
def test_server_mixes_uploads_and_keeps_u_of_a_failed_client(tiny,
                                                             similarity):
  eng = engine(tiny, fedamp, config(fedamp__sigma=SIGMA,
                                    fedamp__self_weight=SELF,
                                    fedamp__similarity=similarity))
  server = eng.training[1].server
  model, _ = tiny
  fresh = lora_lib.init(model, jax.random.key(0))
  uploads = lora_lib.stack([noisy(fresh, i) for i in range(N)])
  prev = lora_lib.stack([noisy(fresh, 10 + i) for i in range(N)])
  state, m = jax.jit(server)({'u': prev}, uploads, jnp.ones(N), 1)
  cos = (delta_cosine(uploads) if similarity == 'delta'
         else pairwise_cosine(flatten_clients(uploads)))
  xi = fedamp.attention_weights(cos, jnp.ones(N), SIGMA, SELF)
  close(m['cosine'], cos, atol=1e-5)
  close(m['attention'], xi, atol=1e-6)
  for i in range(N):   # u_i = sum_j xi_ij w_j, by hand
    expect = jax.tree.map(lambda x: sum(xi[i, j] * x[j] for j in range(N)),
                          uploads)
    close(jax.tree.map(lambda x: x[i], state['u']), expect, atol=1e-6)
  # Client 1 went non-finite: its NaN upload reaches no one, it keeps its u.
  bad = jax.tree.map(lambda x: x.at[1].set(jnp.nan), uploads)
  state, m = jax.jit(server)({'u': prev}, bad, jnp.array([1.0, 0.0, 1.0]), 1)
  close(jax.tree.map(lambda x: x[1], state['u']),
        jax.tree.map(lambda x: x[1], prev), atol=0)
  xi = np.asarray(m['attention'])
  np.testing.assert_allclose(xi[0], [SELF, 0.0, 1 - SELF], rtol=1e-6)
  close(jax.tree.map(lambda x: x[0], state['u']),
        jax.tree.map(lambda x: SELF * x[0] + (1 - SELF) * x[2], uploads),
        atol=1e-6)
  assert m['participants'] == 2


# ---------------------------------------------------------------------------
# The proximal step
# ---------------------------------------------------------------------------
def test_proximal_term_pulls_toward_u(tiny):
  model, base = tiny
  lam = 0.7
  eng = engine(tiny, fedamp, config(fedamp__lam=lam))
  loss = eng.training[1].loss
  fwd = Forward(model, base, None, False)
  fresh = lora_lib.init(model, jax.random.key(0))
  w, u = noisy(fresh, 1, std=0.05), noisy(fresh, 2, std=0.05)
  batch = jax.tree.map(lambda x: jnp.asarray(x[0, 0]), random_batches(0, 1))
  grads = jax.jit(lambda t, b: (
      jax.grad(lambda x: loss(fwd, x, u, b, None)[0])(t),
      jax.grad(lambda x: fwd.nll(x, b)[0])(t)))
  # The loss is NLL + lam/2 ||w - u||^2: its gradient adds lam (w - u).
  g, g_nll = grads(w, batch)
  close(jax.tree.map(jnp.subtract, g, g_nll),
        jax.tree.map(lambda a, b: lam * (a - b), w, u), atol=1e-5)
  # A batch with no target: the step is the pull alone, straight toward u.
  empty = dict(batch, loss_mask=jnp.zeros_like(batch['loss_mask']))
  assert float(loss(fwd, w, u, empty, None)[1]) == 0
  g, g_nll = grads(w, empty)
  close(g_nll, jax.tree.map(jnp.zeros_like, w), atol=0)
  close(g, jax.tree.map(lambda a, b: lam * (a - b), w, u), atol=1e-6)
  lr = 0.5
  stepped = jax.tree.map(lambda a, d: a - lr * d, w, g)
  dist = lambda a: float(sum(jnp.sum((x - y) ** 2) for x, y in zip(
      jax.tree.leaves(a), jax.tree.leaves(u)))) ** 0.5
  np.testing.assert_allclose(dist(stepped), (1 - lr * lam) * dist(w),
                             rtol=1e-5)


# ---------------------------------------------------------------------------
# A round through the engine
# ---------------------------------------------------------------------------
def test_round_downloads_u_i_per_client_and_starts_from_it(tiny):
  c = config(fedamp__sigma=SIGMA, fedamp__self_weight=SELF)
  counts = (2, 2, 0)   # client 2 takes no step: it ends where it started
  eng = engine(tiny, fedamp, c, counts)
  state, m0 = eng.run_repeat(eng.initial_state(jax.random.key(1)), 0)
  u = state['server']['u']
  size = lora_lib.num_bytes(jax.tree.map(lambda x: x[0], u))
  assert m0['bytes_down_per_client'] == [0] * N   # local phase: no download
  assert m0['bytes_up_per_client'] == [size] * N
  # The first u comes from the local adapters' attention.
  xi = fedamp.attention_weights(delta_cosine(state['client']['lora']),
                                jnp.ones(N), SIGMA, SELF)
  close(u, mix(state['client']['lora'], xi), atol=1e-6)
  # Every client gets its own u_i.
  for i in range(N):
    for j in range(i):
      assert max(float(jnp.abs(x[i] - x[j]).max())
                 for x in jax.tree.leaves(u)) > 1e-4, (i, j)

  new, m1 = eng.run_repeat(copy(state), 1)
  assert m1['bytes_down_per_client'] == [size] * N   # one slice each
  assert m1['bytes_up_per_client'] == [size] * N
  # Client 2 trained from u_2 without a step: its adapter is u_2.
  close(jax.tree.map(lambda x: x[2], new['client']['lora']),
        jax.tree.map(lambda x: x[2], u), atol=0)
  # Clients 0, 1 moved away from their u_i; the new u mixes the uploads.
  assert max(float(jnp.abs(x[0] - y[0]).max()) for x, y in zip(
      jax.tree.leaves(new['client']['lora']), jax.tree.leaves(u))) > 1e-4
  xi = fedamp.attention_weights(delta_cosine(new['client']['lora']),
                                jnp.ones(N), SIGMA, SELF)
  close(new['server']['u'], mix(new['client']['lora'], xi), atol=1e-6)
  np.testing.assert_allclose(np.sum(m1['attention'], 1), 1.0, rtol=1e-6)
  # Same local steps in total as an FDLoRA client.
  f = engine(tiny, fdlora, c, counts)
  assert sum(p.repeats * Engine.max_steps(p) for p in eng.training) == sum(
      p.repeats * Engine.max_steps(p) for p in f.training)


# ---------------------------------------------------------------------------
# From main.py, both scenarios
# ---------------------------------------------------------------------------
SHORT = ['--config.eval.every=0', '--config.fl.rounds=2']


def test_main_py_both_scenarios(tmp_path):
  ref = fedavg_schema(tmp_path)
  for name, cfg, extra in (('logs', 'configs/tiny.py', []),
                           ('medical', 'configs/medical.py', MEDICAL_FLAGS)):
    r = main_py(cfg, tmp_path / name, '--config.method=fedamp', *SHORT,
                *extra, tmp=tmp_path)
    assert schema_keys(r) == ref, name
    size = adapter_bytes(r)
    assert r['method'] == 'fedamp' and r['headline'] == 'personalized'
    assert list(r['models']) == ['personalized']
    assert r['phases'] == ['local', 'rounds']
    rounds = r['communication']['per_round']
    assert [p['round'] for p in rounds] == [0, 1, 2]
    # An adapter up and (from round 1) the client's own u_i down, every
    # round.
    assert rounds[0]['bytes_down_per_client'] == [0, 0]
    for p in rounds:
      assert p['bytes_up_per_client'] == [size, size], name
    for p in rounds[1:]:
      assert p['bytes_down_per_client'] == [size, size], name
    assert r['communication']['bytes_total'] == 2 * (3 + 2) * size
