"""FedLoRA-Optimizer (fdlora_jax/fl/methods/fedlora_opt.py): magnitude and
direction of each LoRA rank component (fdlora_jax/lora.py), A's directions
federated and renormalised, B's magnitudes tuned locally, B never sent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import ConfigError
from fdlora_jax.fl.methods import METHODS, fedlora_opt
from fdlora_jax.run import validate_config
from tests.helpers import (IN_OUT, N, SCHEMA, assert_same, config, copy,
                           differs, engine, leaves, main_py_both, noise,
                           random_batches)

COUNTS = (1, 2, 4)


def norms(x, axis):
  return np.linalg.norm(np.asarray(x), axis=axis)


# ---------------------------------------------------------------------------
# The reparametrization
# ---------------------------------------------------------------------------
def test_decompose_then_compose_is_the_same_adapter(tiny):
  model, base = tiny
  lora = noise(lora_lib.init(model, jax.random.key(0)), 1)
  # One rank component of one b is zero: magnitude 0, still exact.
  q = lora['layers']['self_attn']['q_proj']
  q['b'] = q['b'].at[:, 1, :].set(0.0)
  parts = fedlora_opt.decompose(lora)
  for p in lora_lib.adapted_paths(lora):
    node, plain = lora_lib._get(parts, p), lora_lib._get(lora, p)
    # Directions: unit vectors per rank component (a's columns over `in`,
    # b's rows over `out`); magnitudes: their norms.
    np.testing.assert_allclose(norms(node['a']['d'], -2), 1.0, atol=1e-6)
    np.testing.assert_allclose(norms(node['b']['d'], -1), 1.0, atol=1e-6)
    np.testing.assert_allclose(node['a']['m'], norms(plain['a'], -2),
                               rtol=1e-6)
    np.testing.assert_allclose(node['b']['m'], norms(plain['b'], -1),
                               rtol=1e-6)
    assert node['a']['m'].shape == plain['a'].shape[:-2] + (
        plain['a'].shape[-1],)
  back = fedlora_opt.compose(parts)
  # Only A decomposed: B stays the same array, and composing gives lora.
  half = fedlora_opt.decompose(lora, ('a',))
  for p in lora_lib.adapted_paths(lora):
    assert lora_lib._get(half, p)['b'] is lora_lib._get(lora, p)['b']
    np.testing.assert_array_equal(lora_lib._get(half, p)['a']['d'],
                                  lora_lib._get(parts, p)['a']['d'])
  for x, y in zip(leaves(fedlora_opt.compose(half)), leaves(lora),
                  strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  for x, y in zip(leaves(back), leaves(lora), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(
      back['layers']['self_attn']['q_proj']['b'][:, 1], 0.0)
  # unit(): finite gradient at a zero vector (a zero row of b).
  g = jax.grad(lambda x: jnp.sum(fedlora_opt.unit(x, -1) * 2.0))(
      jnp.zeros((2, 3)).at[0].set(1.0))
  assert bool(jnp.all(jnp.isfinite(g))) and not np.any(np.asarray(g[1]))
  # A direction's own norm does not matter.
  scaled = jax.tree.map(lambda x: x, parts)
  for p in lora_lib.adapted_paths(parts):
    node = lora_lib._get(scaled, p)
    node['a'] = dict(node['a'], d=node['a']['d'] * 3.0)
  for x, y in zip(leaves(fedlora_opt.compose(scaled)), leaves(lora)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  # The model's output is the plain adapter's.
  tokens = jnp.asarray(random_batches(0, 1)['tokens'][0, 0])
  out = lambda l: model.apply({'params': base, 'lora': l}, tokens)
  ref = out(lora)
  zero = jax.tree.map(jnp.zeros_like, lora)
  assert float(jnp.abs(ref - out(zero)).max()) > 1e-3   # the adapter matters
  np.testing.assert_allclose(out(back), ref, rtol=1e-4, atol=5e-5)


# ---------------------------------------------------------------------------
# One engine through all phases
# ---------------------------------------------------------------------------
@pytest.fixture(scope='module')
def trained(tiny):
  eng = engine(tiny, fedlora_opt, config(), COUNTS)
  state = eng.initial_state(jax.random.key(1))
  states, metrics = [state], []
  for i in range(len(eng.schedule())):
    state, m = eng.run_repeat(copy(state), i)
    states.append(state)
    metrics.append(m)
  return eng, states, metrics


def index_of(eng, name):
  return [i for i, s in enumerate(eng.schedule()) if s[0].name == name]


def test_fresh_adapter_changes_nothing_and_a_is_the_servers(trained):
  eng, states, _ = trained
  names = [p.name for p in eng.method.phases]
  assert names == ['local', 'rounds', 'personalize']
  state0 = states[0]
  lora = state0['client']['lora']
  for p in lora_lib.adapted_paths(lora):
    node = lora_lib._get(lora, p)
    np.testing.assert_array_equal(node['b'], 0.0)          # B plain, zero
    np.testing.assert_allclose(norms(node['a']['d'], -2), 1.0, atol=1e-6)
    np.testing.assert_array_equal(
        node['a']['d'],
        lora_lib.replicate(lora_lib._get(state0['server']['a_dir'], p), N))
    m_a = np.asarray(node['a']['m'])
    np.testing.assert_array_equal(m_a, np.broadcast_to(m_a[0], m_a.shape))


def test_server_sees_only_unit_a_directions_and_renormalises(trained):
  eng, states, _ = trained
  i = index_of(eng, 'rounds')[0]
  state = states[i]
  phase = eng.schedule()[i][0]
  seen = {}
  real_finish, real_server = (eng._finishes[phase.name],
                              eng._servers[phase.name])

  def finish_spy(client, train, download, t):
    seen['train'] = jax.tree.map(np.asarray, train)
    return real_finish(client, train, download, t)

  def server_spy(server, uploads, weights, t):
    seen['args'] = jax.tree.map(np.asarray, (server, uploads, weights))
    return real_server(server, uploads, weights, t)
  eng._finishes[phase.name], eng._servers[phase.name] = finish_spy, server_spy
  try:
    new, m = eng.run_repeat(copy(state), i)
  finally:
    eng._finishes[phase.name], eng._servers[phase.name] = (real_finish,
                                                          real_server)
  server, uploads, weights = seen['args']
  # Only A's directions: the server state and uploads have a_dir's
  # structure, and the uploads are the trained A directions made unit.
  assert set(server) == {'a_dir'}
  assert jax.tree.structure(uploads) == jax.tree.structure(
      state['server']['a_dir'])
  trained_a = fedlora_opt.a_directions(seen['train'])
  for u, d in zip(leaves(uploads), leaves(trained_a), strict=True):
    np.testing.assert_allclose(u, d / norms(d, -2)[..., None, :], rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(norms(u, -2), 1.0, atol=1e-6)
  # B trained on the clients (it moved) but no B array reached the server.
  b_before = lora_lib.map_adapters(lambda n: n['b'], state['client']['lora'])
  b_after = lora_lib.map_adapters(lambda n: n['b'], seen['train'])
  assert differs(b_before, b_after) > 1e-4
  for b in leaves(b_after):
    assert all(b.shape != x.shape or not np.array_equal(b, x)
               for x in leaves((server, uploads)))
  # The server: weighted mean, renormalised to unit norm.
  w = np.asarray(COUNTS, float) / sum(COUNTS)
  np.testing.assert_allclose(weights, w, rtol=1e-6)
  for got, u in zip(leaves(new['server']['a_dir']), leaves(uploads)):
    mean = np.tensordot(w, u, axes=1)
    np.testing.assert_allclose(got, mean / norms(mean, -2)[..., None, :],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norms(got, -2), 1.0, atol=1e-6)
    assert np.abs(norms(mean, -2) - 1.0).max() > 1e-6   # renorm did work
  size = lora_lib.num_bytes(state['server']['a_dir'])
  assert m['bytes_up_per_client'] == m['bytes_down_per_client'] == [size] * N


def test_global_stage_trains_the_chosen_parts_only(trained):
  """Default global_trains: A's magnitudes stay the shared initial value on
  every client; A's directions and the plain B train, B per client."""
  eng, states, _ = trained
  last_round = index_of(eng, 'rounds')[-1] + 1
  before, after = states[0]['client']['lora'], states[last_round]['client'][
      'lora']
  a_part = lambda t, k: lora_lib.map_adapters(lambda n: n['a'][k], t)
  b_part = lambda t: lora_lib.map_adapters(lambda n: n['b'], t)
  assert_same(a_part(after, 'm'), a_part(before, 'm'))
  assert differs(a_part(after, 'd'), a_part(before, 'd')) > 1e-4
  assert differs(b_part(after), b_part(before)) > 1e-4
  for b in leaves(b_part(after)):
    assert np.abs(b[0] - b[1]).max() > 1e-5      # clients differ
  mask = fedlora_opt.global_mask(before, ('a_dir', 'a_mag', 'b'))
  assert all(bool(x) for x in leaves(mask))


def test_local_stage_changes_only_b_magnitudes(trained):
  eng, states, metrics = trained
  (i,) = index_of(eng, 'personalize')
  state, final = states[i], states[i + 1]
  a_dir = lora_lib.replicate(state['server']['a_dir'], N)
  global_model = fedlora_opt.with_a_directions(state['client']['lora'],
                                               a_dir)
  # The tree the stage started from, by the engine's own compiled start.
  start = eng._starts['personalize'](state['client'], a_dir)
  close = fedlora_opt.decompose(global_model, ('b',))
  for x, y in zip(leaves(start), leaves(close), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  personal = final['client']['personal']
  assert jax.tree.structure(personal) == jax.tree.structure(start)
  pick = lambda t, f, k: lora_lib.map_adapters(lambda n: n[f][k], t)
  for f, k in (('a', 'd'), ('a', 'm'), ('b', 'd')):
    assert_same(pick(personal, f, k), pick(start, f, k))
  assert differs(pick(personal, 'b', 'm'), pick(start, 'b', 'm')) > 1e-4
  # The global stage's result is kept as it was.
  assert_same(final['client']['lora'], state['client']['lora'])
  assert_same(final['server'], state['server'])
  # One download of A's directions, nothing uploaded.
  m = metrics[i]
  assert m['bytes_down_per_client'] == [
      lora_lib.num_bytes(state['server']['a_dir'])] * N
  assert m['bytes_up_per_client'] == [0] * N
  # Rows: the adapters of each stage, composed.
  rows = eng.method.rows(final['server'], final['client'])
  assert list(rows) == ['personalized', 'global']
  assert_same(rows['personalized'], fedlora_opt.compose(personal))
  assert_same(rows['global'], fedlora_opt.compose(global_model))
  assert eng.method.headline == 'personalized'


def test_local_stage_epochs_default_to_the_local_phase(tiny):
  c = config(fedlora_opt__local_stage_epochs=-1.0)
  c.fl.local_epochs = 2.0
  eng = engine(tiny, fedlora_opt, c, COUNTS)
  local, _, stage = eng.method.phases
  np.testing.assert_array_equal(stage.steps, local.steps)
  np.testing.assert_array_equal(stage.steps, [1, 2, 4])
  # Equal local steps (fl.local_steps): the stage takes the same.
  c.fl.local_steps = 3
  local, _, stage = engine(tiny, fedlora_opt, c, COUNTS).method.phases
  np.testing.assert_array_equal(stage.steps, [3, 3, 3])
  np.testing.assert_array_equal(stage.steps, local.steps)
  eng = engine(tiny, fedlora_opt,
               config(fedlora_opt__local_stage_epochs=0.5), COUNTS)
  np.testing.assert_array_equal(eng.method.phases[2].steps, [1, 1, 1])


def test_config_is_validated():
  for field, value in (('global_trains', ('b',)),
                       ('global_trains', ('a_dir', 'b_mag')),
                       ('local_stage_epochs', -0.5), ('weighting', 'mean')):
    c = config()
    c.method = 'fedlora_opt'
    c.fedlora_opt[field] = value
    with pytest.raises(ConfigError, match=f'fedlora_opt.{field}'):
      validate_config(c)
  c = config()
  c.method = 'fedlora_opt'
  validate_config(c)
  assert METHODS['fedlora_opt'] is fedlora_opt


# ---------------------------------------------------------------------------
# main.py, both scenarios
# ---------------------------------------------------------------------------
def test_runs_from_main_py_in_both_scenarios(tmp_path):
  results = main_py_both(tmp_path, '--config.method=fedlora_opt',
                         '--config.fl.local_epochs=0',
                         '--config.fedlora_opt.local_stage_epochs=0.25')
  for scenario, r in results.items():
    assert r['is_synthetic'] == (scenario == 'logs')
    assert r['method'] == 'fedlora_opt' and r['headline'] == 'personalized'
    assert set(r['models']) == {'personalized', 'global'}
    assert set(r) == SCHEMA
    assert r['phases'] == ['local', 'rounds', 'personalize']
    # A's directions [L, in, r] (tiny: 2 layers; rank from the config).
    cfg = r['config']
    a_dir = sum(4 * 2 * (IN_OUT[t] - OUT[t]) * cfg['lora']['rank']
                for t in cfg['lora']['targets'])
    per_round = {p['phase']: p for p in r['communication']['per_round']}
    for phase in ('local', 'rounds'):
      assert per_round[phase]['bytes_up_per_client'] == [a_dir] * 2
      assert per_round[phase]['bytes_down_per_client'] == [a_dir] * 2
    assert per_round['personalize']['bytes_up_per_client'] == [0, 0]
    assert per_round['personalize']['bytes_down_per_client'] == [a_dir] * 2
    assert r['communication']['bytes_total'] == 2 * 5 * a_dir


OUT = {'q_proj': 64, 'k_proj': 32, 'v_proj': 32, 'o_proj': 64,
       'gate_proj': 176, 'up_proj': 176, 'down_proj': 64}
