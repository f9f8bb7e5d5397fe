"""pFedLoRA (fdlora_jax/fl/methods/pfedlora.py): heterogeneous private ranks
in one padded program, private/shared alternation, only the shared adapter
uploaded; the rank helpers of fdlora_jax/lora.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import ConfigError
from fdlora_jax.fl.methods import METHODS, pfedlora
from fdlora_jax.run import validate_config
from tests.helpers import (IN_OUT, LCFG, N, SCHEMA, assert_same, config,
                           copy, differs, engine, leaves, main_py_both,
                           noise, run_all)

RANKS = (1, 2, 3)


def pconfig(**fields):
  return config(pfedlora__private_ranks=RANKS, **fields)


def rounds_index(eng):
  return [i for i, s in enumerate(eng.schedule()) if s[0].name == 'rounds']


# ---------------------------------------------------------------------------
# The rank helpers
# ---------------------------------------------------------------------------
def test_rank_helpers_pad_mask_and_concatenate(tiny):
  model, _ = tiny
  small = jax.tree.map(lambda x: x + 1.0, lora_lib.init_rank(model, 2,
                                                             jax.random.key(0)))
  assert small['layers']['self_attn']['q_proj']['a'].shape[-1] == 2
  padded = lora_lib.pad_rank(small, 5)
  # Padding adds exact zeros and no change to delta.
  for p in lora_lib.adapted_paths(small):
    node = lora_lib._get(padded, p)
    assert node['a'].shape[-1] == 5 and node['b'].shape[-2] == 5
    assert not np.any(np.asarray(node['a'][..., 2:]))
    assert not np.any(np.asarray(node['b'][..., 2:, :]))
  for p, dw in lora_lib.delta_weights(small, 1.0).items():
    np.testing.assert_allclose(lora_lib.delta_weights(padded, 1.0)[p], dw,
                               atol=1e-6)
  # Masking rank 1 of the padded one = the first component alone.
  one = lora_lib.mask_rank(padded, 1)
  first = lora_lib.map_adapters(
      lambda n: {'a': n['a'][..., :1], 'b': n['b'][..., :1, :]}, small)
  for p, dw in lora_lib.delta_weights(first, 1.0).items():
    np.testing.assert_allclose(lora_lib.delta_weights(one, 1.0)[p], dw,
                               atol=1e-6)
  # Per-client ranks [N] on [N, ...] leaves.
  many = lora_lib.mask_rank(lora_lib.replicate(padded, 3), jnp.array([0, 1, 2]))
  for p in lora_lib.adapted_paths(small):
    a = np.asarray(lora_lib._get(many, p)['a'])
    b = np.asarray(lora_lib._get(many, p)['b'])
    assert [int(np.any(a[i], axis=(0, 1)).sum()) for i in range(3)] == [0, 1, 2]
    assert [int(np.any(b[i], axis=(0, 2)).sum()) for i in range(3)] == [0, 1, 2]
  # Concatenating on the rank axis sums the deltas.
  both = lora_lib.concat_rank(small, one)
  for p, dw in lora_lib.delta_weights(both, 1.0).items():
    want = (lora_lib.delta_weights(small, 1.0)[p] +
            lora_lib.delta_weights(one, 1.0)[p])
    np.testing.assert_allclose(dw, want, rtol=1e-5, atol=1e-5)


def test_model_applies_each_part_at_its_own_scale(tiny, trained):
  """personalized delta = alpha/r_i a_p b_p + alpha/r_s a_s b_s; with
  scale_per_rank off both parts get the model's alpha/r_config."""
  _, state0, _, _ = trained
  server, client = state0['server'], state0['client']
  private = lora_lib.mask_rank(noise(client['private'], 2),
                               jnp.asarray(RANKS))
  shared = noise(server['shared'], 3)
  for per_rank in (True, False):
    method = engine(tiny, pfedlora,
                    pconfig(pfedlora__scale_per_rank=per_rank)).method
    rows = method.rows({'shared': shared}, dict(client, private=private))
    got = lora_lib.delta_weights(rows['personalized'], LCFG.scale)
    s_s = LCFG.alpha / 4 if per_rank else LCFG.scale
    for i, r in enumerate(RANKS):
      s_p = LCFG.alpha / r if per_rank else LCFG.scale
      dp = lora_lib.delta_weights(jax.tree.map(lambda x: x[i], private), s_p)
      ds = lora_lib.delta_weights(shared, s_s)
      for p in dp:
        np.testing.assert_allclose(got[p][i], dp[p] + ds[p], rtol=1e-5,
                                   atol=1e-5)
    shared_row = lora_lib.delta_weights(rows['shared'], LCFG.scale)
    for p, dw in lora_lib.delta_weights(shared, s_s).items():
      np.testing.assert_allclose(shared_row[p][0], dw, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# One engine trained through all phases (private_steps=1 of K=2)
# ---------------------------------------------------------------------------
COUNTS = (1, 2, 4)


@pytest.fixture(scope='module')
def trained(tiny):
  eng = engine(tiny, pfedlora, pconfig(pfedlora__private_steps=1), COUNTS)
  state0 = eng.initial_state(jax.random.key(1))
  after_local, (m_local,) = run_all(eng, copy(state0), upto=1)
  return eng, state0, after_local, m_local


def spy_round(eng, state):
  """Runs the first round on ``state``; returns the new state, metrics and
  what reached the server function and left ``finish``."""
  phase = eng.training[1]
  seen = {}
  real_finish, real_server = (eng._finishes[phase.name],
                              eng._servers[phase.name])

  def finish_spy(client, train, download, t):
    seen['trained_shared'] = jax.tree.map(np.asarray, train['shared'])
    return real_finish(client, train, download, t)

  def server_spy(server, uploads, weights, t):
    seen['server_args'] = jax.tree.map(np.asarray, (server, uploads, weights))
    return real_server(server, uploads, weights, t)
  eng._finishes[phase.name], eng._servers[phase.name] = finish_spy, server_spy
  try:
    new, m = eng.run_repeat(copy(state), rounds_index(eng)[0])
  finally:
    eng._finishes[phase.name], eng._servers[phase.name] = (real_finish,
                                                          real_server)
  return new, m, seen


# ---------------------------------------------------------------------------
# Heterogeneous ranks
# ---------------------------------------------------------------------------
def test_each_client_keeps_its_own_rank_and_padding_stays_zero(trained):
  eng, state0, after_local, _ = trained
  np.testing.assert_array_equal(state0['client']['rank'], RANKS)
  state = after_local
  for i in rounds_index(eng):
    state, _ = eng.run_repeat(copy(state), i)
  private = state['client']['private']
  assert differs(private, state0['client']['private']) > 1e-3
  for p in lora_lib.adapted_paths(private):
    a = np.asarray(lora_lib._get(private, p)['a'])      # [N, L, in, R]
    b = np.asarray(lora_lib._get(private, p)['b'])      # [N, L, R, out]
    assert a.shape[-1] == max(RANKS)
    for i, r in enumerate(RANKS):
      assert not np.any(a[i, ..., r:]) and not np.any(b[i, :, r:, :]), p
      # Every kept component trained (b started at 0) and the delta of
      # every layer has exactly the client's rank.
      assert np.all(np.any(b[i, :, :r, :] != 0, axis=-1)), p
      for layer in range(a.shape[1]):
        assert np.linalg.matrix_rank(a[i, layer] @ b[i, layer]) == r, (p, i)


def test_padding_is_never_trained_nor_used(trained):
  """Garbage in a client's padded components stays bit-identical through a
  round and changes nothing that is trained or uploaded."""
  eng, _, state, _ = trained
  mask = lora_lib.rank_mask(state['client']['private'],
                            state['client']['rank'])
  junk = jax.tree.map(lambda x, m: jnp.where(m, x, 7.0),
                      state['client']['private'], mask)
  dirty = dict(state, client=dict(state['client'], private=junk))
  i = rounds_index(eng)[0]
  clean_new, _ = eng.run_repeat(copy(state), i)
  dirty_new, _ = eng.run_repeat(copy(dirty), i)
  full = jax.tree.map(lambda x, m: jnp.broadcast_to(m, x.shape), junk, mask)
  for x, m in zip(leaves(dirty_new['client']['private']), leaves(full)):
    assert (~m).any()
    np.testing.assert_array_equal(x[~m], 7.0)
  # What training produced on the real components is the same.
  keep = lambda t: jax.tree.map(lambda x, m: jnp.where(m, x, 0.0), t, mask)
  assert_same(keep(clean_new['client']['private']),
              keep(dirty_new['client']['private']))
  assert_same(clean_new['server'], dirty_new['server'])


# ---------------------------------------------------------------------------
# The round: private steps, then shared steps; only the shared adapter sent
# ---------------------------------------------------------------------------
def test_frozen_part_is_bit_identical_in_each_part_of_the_round(tiny, trained):
  """private_steps=1. With K=1 (the private step alone) the shared adapter
  comes back exactly as downloaded; with K=2 (then one shared step) the
  private LoRA is exactly the K=1 result, and the shared adapter moved."""
  eng2, _, state, _ = trained
  c = pconfig(pfedlora__private_steps=1)
  c.fl.inner_steps = 1
  eng1 = engine(tiny, pfedlora, c, COUNTS)
  assert rounds_index(eng1)[0] == rounds_index(eng2)[0]
  assert eng1.schedule()[1][3] == eng2.schedule()[1][3]   # same data
  after_1, _, seen_1 = spy_round(eng1, state)
  after_2, _, seen_2 = spy_round(eng2, state)
  download = lora_lib.replicate(state['server']['shared'], N)
  assert_same(seen_1['trained_shared'], download)
  assert differs(after_1['client']['private'], state['client']['private']) \
      > 1e-3
  assert_same(after_2['client']['private'], after_1['client']['private'])
  assert differs(seen_2['trained_shared'], download) > 1e-3


def test_default_private_steps_is_half_of_k_rounded_up(tiny, trained):
  _, state0, _, _ = trained
  train = {'private': jax.tree.map(lambda x: x[0], state0['client']['private']),
           'shared': state0['server']['shared'], 'rank': jnp.float32(2)}
  for k, want in ((1, 1), (2, 1), (3, 2), (4, 2)):
    c = pconfig()
    c.fl.inner_steps = k
    phase = engine(tiny, pfedlora, c).training[1]
    masks = [phase.trainable(train, jnp.int32(i)) for i in range(k)]
    private_on = [bool(np.any(m['private']['layers']['self_attn']['q_proj'][
        'a'])) for m in masks]
    shared_on = [bool(m['shared']['layers']['self_attn']['q_proj']['a'])
                 for m in masks]
    assert private_on == [i < want for i in range(k)], k
    assert shared_on == [i >= want for i in range(k)], k


def test_only_the_shared_adapter_reaches_the_server(trained):
  eng, _, state, m_local = trained
  new, m, seen = spy_round(eng, state)
  server, uploads, weights = seen['server_args']
  assert jax.tree.structure(uploads) == jax.tree.structure(
      state['server']['shared'])
  for p in lora_lib.adapted_paths(uploads):
    assert lora_lib._get(uploads, p)['a'].shape[-1] == 4      # shared_rank
    assert lora_lib._get(uploads, p)['b'].shape[-2] == 4
  assert_same(uploads, seen['trained_shared'])
  assert set(server) == {'shared'}
  # FedAvg's example-weighted mean of the uploads.
  w = np.asarray(COUNTS, float) / sum(COUNTS)
  np.testing.assert_allclose(weights, w, rtol=1e-6)
  for got, u in zip(leaves(new['server']['shared']), leaves(uploads)):
    np.testing.assert_allclose(got, np.tensordot(w, u, axes=1), atol=1e-6)
  size = lora_lib.num_bytes(state['server']['shared'])
  assert m['bytes_up_per_client'] == [size] * N
  assert m['bytes_down_per_client'] == [size] * N
  # The local phase sends nothing.
  assert m_local['bytes_up_per_client'] == [0] * N
  assert m_local['bytes_down_per_client'] == [0] * N


def test_config_is_validated():
  for field, value in (('private_ranks', ()), ('private_ranks', (4, 0)),
                       ('shared_rank', 0), ('private_steps', -2),
                       ('weighting', 'mean')):
    c = config()
    c.method = 'pfedlora'
    c.pfedlora[field] = value
    with pytest.raises(ConfigError, match=f'pfedlora.{field}'):
      validate_config(c)
  c = config()
  c.method = 'pfedlora'
  validate_config(c)
  assert METHODS['pfedlora'] is pfedlora


# ---------------------------------------------------------------------------
# main.py, both scenarios
# ---------------------------------------------------------------------------
def test_runs_from_main_py_in_both_scenarios(tmp_path):
  results = main_py_both(tmp_path, '--config.method=pfedlora',
                         '--config.pfedlora.private_ranks=(2,6)',
                         '--config.fl.local_epochs=0')
  for scenario, r in results.items():
    assert r['is_synthetic'] == (scenario == 'logs')
    assert r['method'] == 'pfedlora' and r['headline'] == 'personalized'
    assert set(r['models']) == {'personalized', 'shared'}
    assert set(r) == SCHEMA
    # Per round: the shared adapter (rank 4) down and up; nothing in stage 1.
    targets = r['config']['lora']['targets']
    shared = 4 * 4 * 2 * sum(IN_OUT[t] for t in targets)   # tiny: 2 layers
    per_round = {p['phase']: p for p in r['communication']['per_round']}
    assert per_round['local']['bytes_up_per_client'] == [0, 0]
    assert per_round['local']['bytes_down_per_client'] == [0, 0]
    assert per_round['rounds']['bytes_up_per_client'] == [shared] * 2
    assert per_round['rounds']['bytes_down_per_client'] == [shared] * 2
    assert r['communication']['bytes_total'] == 4 * shared
