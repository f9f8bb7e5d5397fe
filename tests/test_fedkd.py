"""FedKD (fdlora_jax/fl/methods/fedkd.py): SVD compression of the mentee's
update, the energy threshold schedule, adaptive mutual distillation, each
adapter at its own scale, a round through the engine, and a run from main.py
in both scenarios."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import ConfigError
from fdlora_jax.fl.engine import Engine, Forward, Setup
from fdlora_jax.fl.losses import bernoulli_kl, categorical_kl
from fdlora_jax.fl.methods import fdlora, fedkd
from fdlora_jax.model import Llama, init_params
from tests.helpers import (CFG, LCFG, MEDICAL_FLAGS, N, adapter_bytes, close,
                           config, copy, engine, fedavg_schema, main_py,
                           noisy, random_batches, schema_keys)

T0, T1 = 0.9, 0.97


@pytest.fixture(scope='module')
def tiny():
  model = Llama(CFG, LCFG)
  base = init_params(CFG, jax.random.key(0))
  return model, base


def kept(s_full, threshold):
  """The smallest k whose energy share reaches the threshold (numpy)."""
  e = np.asarray(s_full, np.float64) ** 2
  if e.sum() == 0:
    return 0
  return int(np.argmax(np.cumsum(e) >= threshold * e.sum() * (1 - 1e-7))) + 1


# ---------------------------------------------------------------------------
# SVD compression and the threshold schedule
# ---------------------------------------------------------------------------
def test_svd_compression_keeps_the_thresholds_energy_and_no_more():
  rng = np.random.default_rng(0)
  # Decaying spectra, so that different matrices keep different k.
  a = rng.normal(size=(4, 30, 6)) * np.geomspace(1, 0.05, 6)
  a[3] = 0.0                                        # nothing to send
  b = rng.normal(size=(4, 6, 20)) * np.geomspace(1, 0.3, 6)[:, None]
  tree = {'a': jnp.asarray(a, jnp.float32), 'b': jnp.asarray(b, jnp.float32)}
  for threshold in (0.5, 0.9, 0.99):
    c = fedkd.svd_compress(tree, threshold)
    back = fedkd.svd_decompress(c)
    expect_bytes, ks = 0, []
    for name, x in (('a', a), ('b', b)):
      for l in range(4):
        u, s, v = np.linalg.svd(x[l], full_matrices=False)
        k = kept(s, threshold)
        ks.append(k)
        assert int(np.sum(np.asarray(c[name]['s'][l]) > 0)) == k
        np.testing.assert_allclose(back[name][l], (u[:, :k] * s[:k]) @ v[:k],
                                   atol=1e-5)
        total = np.sum(x[l] ** 2)
        if total > 0:   # >= the threshold's share; one fewer falls short
          share = np.sum(np.asarray(back[name][l], np.float64) ** 2) / total
          assert share >= threshold * (1 - 1e-5)
          assert np.sum(s[:k - 1] ** 2) / total < threshold
        expect_bytes += k * (x.shape[1] + x.shape[2] + 1) * 4
    assert int(fedkd.svd_wire_bytes(c)) == expect_bytes
    assert len(set(ks)) > 2    # the test really spans several k
  c = fedkd.svd_compress(tree, 0.9)
  np.testing.assert_array_equal(c['a']['s'][3], 0.0)
  # Threshold 1 keeps every non-zero singular value: exact reconstruction.
  close(fedkd.svd_decompress(fedkd.svd_compress(tree, 1.0)), tree,
        atol=1e-5)


def test_threshold_schedule_runs_from_t_start_to_t_end():
  f = lambda t, rounds=5: float(fedkd.energy_threshold(t, rounds, T0, T1))
  assert f(1) == pytest.approx(T0) and f(5) == pytest.approx(T1)
  assert f(0) == pytest.approx(T0)                  # the local phase
  assert f(3) == pytest.approx((T0 + T1) / 2)       # linear
  assert f(1, rounds=1) == pytest.approx(T0)


# ---------------------------------------------------------------------------
# Adaptive mutual distillation
# ---------------------------------------------------------------------------
def test_bernoulli_and_categorical_kl_formulas():
  p, q = np.array([0.2, 0.9, 0.5]), np.array([0.6, 0.3, 0.5])
  want = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
  np.testing.assert_allclose(bernoulli_kl(jnp.log(p), jnp.log(q)), want,
                             rtol=1e-5, atol=1e-7)
  lp, lq = np.array([1.0, -2.0, 0.5]), np.array([0.0, 1.0, -1.0])
  pp, qq = np.exp(lp) / np.exp(lp).sum(), np.exp(lq) / np.exp(lq).sum()
  np.testing.assert_allclose(categorical_kl(jnp.asarray(lp), jnp.asarray(lq)),
                             np.sum(pp * np.log(pp / qq)), rtol=1e-5)


def two_adapters(model, seed=0):
  mentor = lora_lib.init_rank(model, 16, jax.random.key(seed))
  mentee = lora_lib.init_rank(model, 4, jax.random.key(seed + 1))
  return {'mentor': noisy(mentor, seed + 2, std=0.3),
          'mentee': noisy(mentee, seed + 3, std=0.3)}


@pytest.mark.parametrize('distill', ['token', 'option'])
def test_distillation_alone_moves_both_and_each_only_from_the_other(
    tiny, distill):
  model, base = tiny
  fwd = Forward(model, base, None, False)
  train = two_adapters(model)
  batch = jax.tree.map(lambda x: jnp.asarray(x[0, 0]), random_batches(0, 1))
  ids = np.array([5, 9])
  terms_fn = lambda t: fedkd.distillation_terms(fwd, t, batch, None, distill,
                                                ids)

  # Terms and the gradient of each KL term, in one compiled program.
  everything = jax.jit(lambda t: (terms_fn(t), jax.jacrev(
      lambda x: jnp.stack([terms_fn(x)['kd_t'], terms_fn(x)['kd_s']]))(t)))
  terms, jac = everything(train)
  g_t, g_s = (jax.tree.map(lambda x, i=i: x[i], jac) for i in range(2))

  # The values: the NLLs, and each KL divided by the sum of the NLLs.
  @jax.jit
  def reference(t):
    out = (fwd.target_log_probs(t['mentor'], batch),
           fwd.target_log_probs(t['mentee'], batch))
    if distill == 'option':
      out += (fwd.option_logits(t['mentor'], batch, ids)[0],
              fwd.option_logits(t['mentee'], batch, ids)[0])
    return out
  (lp_t, mask), (lp_s, _), *options = reference(train)
  nll_t = float(-jnp.sum(lp_t * mask) / jnp.sum(mask))
  nll_s = float(-jnp.sum(lp_s * mask) / jnp.sum(mask))
  np.testing.assert_allclose([terms['task_t'], terms['task_s']],
                             [nll_t, nll_s], rtol=1e-5)
  if distill == 'token':
    kl_t = jnp.sum(bernoulli_kl(lp_s, lp_t) * mask) / jnp.sum(mask)
    kl_s = jnp.sum(bernoulli_kl(lp_t, lp_s) * mask) / jnp.sum(mask)
  else:
    y_t, y_s = options
    kl_t = jnp.mean(categorical_kl(y_s, y_t))
    kl_s = jnp.mean(categorical_kl(y_t, y_s))
  np.testing.assert_allclose(
      [terms['kd_t'], terms['kd_s']],
      [kl_t / (nll_t + nll_s), kl_s / (nll_t + nll_s)], rtol=1e-4)
  assert float(terms['kd_t']) > 0 and float(terms['kd_s']) > 0
  norm = lambda g: max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g))
  # The mentor learns from the mentee's prediction and vice versa; neither
  # term reaches the model it learns from.
  assert norm(g_t['mentor']) > 1e-6 and norm(g_t['mentee']) == 0.0
  assert norm(g_s['mentee']) > 1e-6 and norm(g_s['mentor']) == 0.0
  # So the distillation loss alone (kd_t + kd_s, gradient g_t + g_s) moves
  # both adapters.

  # Equal predictions, nothing to distil: a rank-16 mentor with the mentee's
  # delta (rank 4) and 12 empty ranks (same shapes: no new compilation).
  train['mentor'] = jax.tree.map(
      lambda ab, other: {
          'a': jnp.concatenate([ab['a'], other['a'][..., :12]], -1),
          'b': jnp.concatenate([ab['b'], 0 * other['b'][..., :12, :]], -2)},
      train['mentee'], train['mentor'],
      is_leaf=lambda n: isinstance(n, dict) and set(n) == {'a', 'b'})
  terms, jac = everything(train)
  np.testing.assert_allclose(terms['task_t'], terms['task_s'], rtol=1e-5)
  assert abs(float(terms['kd_t'])) < 1e-6 and abs(float(terms['kd_s'])) < 1e-6
  assert norm(jac) < 1e-4


def test_adapters_run_at_their_own_scale(tiny):
  """Through a model whose LoraConfig has rank 4, ``scale_b(x, 4 / 16)``
  makes a rank-16 adapter add ``a b alpha / 16``."""
  model, base = tiny
  mentor = two_adapters(model)['mentor']
  assert lora_lib.rank_of(mentor) == 16 and LCFG.rank == 4
  tokens = jnp.asarray(random_batches(0, 1)['tokens'][0, 0])
  apply = jax.jit(model.apply)
  out = apply({'params': base,
               'lora': lora_lib.scale_b(mentor, LCFG.rank / 16)}, tokens)
  merged = lora_lib.merge(base, mentor, LCFG.alpha / 16)
  np.testing.assert_allclose(out, apply({'params': merged}, tokens),
                             atol=2e-4)
  # The rows hand the evaluation each adapter at its own scale.
  eng = engine(tiny, fedkd, config())
  server, _ = eng.method.init(jax.random.key(0))
  client = {'mentor': lora_lib.stack([mentor] * N)}
  rows = eng.method.rows(server, client)
  assert list(rows) == ['mentor', 'mentee'] and eng.method.headline == 'mentor'
  close(rows['mentor'], lora_lib.scale_b(client['mentor'], LCFG.rank / 16),
        atol=0)
  # 'option' needs options with distinct first tokens.
  setup = Setup(model=model, base=base, config=config(fedkd__distill='option'),
                num_clients=N, train_counts=np.ones(N, np.int64),
                label_counts=np.ones((N, 2)), few_shot={},
                lora_init=lambda key: lora_lib.init(model, key))
  with pytest.raises(ConfigError, match='fedkd.distill'):
    fedkd.build(setup)
  with pytest.raises(ConfigError, match='fedkd.T_end'):
    fedkd.validate(config(fedkd__T_end=0.5))


# ---------------------------------------------------------------------------
# A round through the engine
# ---------------------------------------------------------------------------
def test_rounds_upload_the_compressed_mentee_update_only(tiny):
  c = config(fedkd__mentor_rank=8, fedkd__mentee_rank=2, fedkd__T_start=T0,
             fedkd__T_end=T1)
  c.fl.local_epochs = 0.0   # round 0 takes no step (one compiled step less)
  counts = (2, 2, 0)   # client 2 takes no step: its update is zero
  eng = engine(tiny, fedkd, c, counts)
  seen = []
  for name in ('local', 'rounds'):
    real = eng._finishes[name]

    def spy(client, train, download, t, real=real):
      out = real(client, train, download, t)
      seen.append(jax.tree.map(np.asarray, (train, download, out[1])))
      return out
    eng._finishes[name] = spy
  state = eng.initial_state(jax.random.key(1))
  mentee_bytes = lora_lib.num_bytes(state['server']['mentee'])
  for index, threshold in ((0, T0), (1, T0), (2, T1)):   # rounds 0, 1, 2
    old = copy(state)
    state, m = eng.run_repeat(state, index)
    train, download, upload = seen[-1]
    assert m['bytes_down_per_client'] == [mentee_bytes] * N
    # Only the mentee's factors leave a client, as u, s, v per matrix.
    assert jax.tree.structure(jax.tree.map(
        lambda x: 0, upload, is_leaf=lambda n: isinstance(n, dict) and
        set(n) == {'u', 's', 'v'})) == jax.tree.structure(
            jax.tree.map(lambda x: 0, download))
    # The kept triplets and their bytes, from the SVD of the real update.
    delta = jax.tree.map(lambda x, d: x - d, train['mentee'], download)
    got = fedkd.svd_decompress(upload)
    mean = jax.tree.map(lambda x: np.mean(x, 0), got)
    for i in range(N):
      expect = 0
      for path, x in jax.tree_util.tree_leaves_with_path(delta):
        for l in range(x.shape[1]):
          u, s, v = np.linalg.svd(x[i, l], full_matrices=False)
          k = kept(s, threshold)
          y = got
          for p in path:
            y = y[p.key]
          np.testing.assert_allclose(y[i, l], (u[:, :k] * s[:k]) @ v[:k],
                                     atol=1e-5)
          expect += k * (x.shape[2] + x.shape[3] + 1) * 4
      assert m['bytes_up_per_client'][i] == expect, (index, i)
    if index:
      assert m['bytes_up_per_client'][2] == 0 < min(
          m['bytes_up_per_client'][:2])
    else:   # nobody stepped: nothing to send
      assert m['bytes_up_per_client'] == [0] * N
    # The server adds the mean decompressed update to the mentee.
    close(state['server']['mentee'],
          jax.tree.map(jnp.add, old['server']['mentee'], mean), atol=1e-6)
  # Mentors are private and moved only where there were steps.
  moved = [max(float(jnp.abs(x[i] - y[i]).max()) for x, y in zip(
      jax.tree.leaves(state['client']['mentor']),
      jax.tree.leaves(copy(eng.initial_state(jax.random.key(1)))['client']
                      ['mentor']))) for i in range(N)]
  assert moved[0] > 1e-4 and moved[1] > 1e-4 and moved[2] == 0.0
  assert lora_lib.rank_of(jax.tree.map(lambda x: x[0],
                                       state['client']['mentor'])) == 8
  f = engine(tiny, fdlora, c, counts)
  assert sum(p.repeats * Engine.max_steps(p) for p in eng.training) == sum(
      p.repeats * Engine.max_steps(p) for p in f.training)


# ---------------------------------------------------------------------------
# From main.py, both scenarios
# ---------------------------------------------------------------------------
def test_main_py_both_scenarios(tmp_path):
  ref = fedavg_schema(tmp_path)
  for name, cfg, extra in (('logs', 'configs/tiny.py', []),
                           ('medical', 'configs/medical.py', MEDICAL_FLAGS)):
    # local_epochs=0: round 0 takes no step (one compilation less), so
    # nothing is sent up.
    r = main_py(cfg, tmp_path / name, '--config.method=fedkd',
                '--config.eval.every=0', '--config.fl.rounds=2',
                '--config.fl.local_epochs=0', *extra, tmp=tmp_path)
    assert schema_keys(r) == ref, name
    assert r['method'] == 'fedkd' and r['headline'] == 'mentor'
    assert list(r['models']) == ['mentor', 'mentee']
    rounds = r['communication']['per_round']
    assert [p['round'] for p in rounds] == [0, 1, 2]
    mentee = adapter_bytes(r, rank=4)
    # At most every triplet of every factor matrix (k <= 4): a_l [in, 4]
    # sends <= 4 (in + 5) floats, b_l [4, out] <= 4 (out + 5).
    lc = r['config']['lora']
    most = sum(
        CFG.num_hidden_layers * 4 * 4 * ((din + 4 + 1) + (4 + dout + 1))
        for din, dout in (_dims(t) for t in lc['targets']))
    assert rounds[0]['bytes_up_per_client'] == [0, 0]
    for p in rounds:
      assert p['bytes_down_per_client'] == [mentee] * 2, name
    for p in rounds[1:]:
      assert all(0 < b <= most for b in p['bytes_up_per_client']), name
      assert all(b % 4 == 0 for b in p['bytes_up_per_client'])
    total = sum(sum(p['bytes_down_per_client']) + sum(p['bytes_up_per_client'])
                for p in rounds)
    assert r['communication']['bytes_total'] == total


def _dims(target):
  h, i = CFG.hidden_size, CFG.intermediate_size
  kv = CFG.num_key_value_heads * (h // CFG.num_attention_heads)
  return {'q_proj': (h, h), 'k_proj': (h, kv), 'v_proj': (h, kv),
          'o_proj': (h, h), 'gate_proj': (h, i), 'up_proj': (h, i),
          'down_proj': (i, h)}[target]
