"""FedRoD (fdlora_jax/fl/methods/fedrod.py): the balanced softmax
(fdlora_jax/fl/losses.py) by hand, the personalized adapter as the sum of
both heads, privacy of the personal head, and main.py on both scenarios."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import ConfigError
from fdlora_jax.fl import losses
from fdlora_jax.fl.engine import Engine, Forward, Setup
from fdlora_jax.fl.methods import fedrod
from fdlora_jax.lora import LoraConfig
from fdlora_jax.model import PRESETS, Llama
from tests.helpers import (CFG, LCFG, N, T, close, config, copy, fedavg_keys,
                           noisy, random_batches, run_scenario)

L = CFG.num_hidden_layers
BODY = L - max(1, L // 4)
OPTIONS = np.array([10, 20], np.int32)   # first token of option 0 and 1
COUNTS = np.array([[3, 1], [1, 1], [0, 2]])
MARKER = 0.0123


# ---------------------------------------------------------------------------
# The balanced softmax
# ---------------------------------------------------------------------------
def test_balanced_softmax_matches_hand_computation():
  """Two options, counts (3, 1): prior (3/4, 1/4). With two options the
  cross-entropy is softplus(z_other - z_label), z = logit + log prior:
    row 0, label 0: z1 - z0 = (2 - 1) + log(1/3)  -> softplus(1 - ln 3)
    row 1, label 1: z0 - z1 = (0.5 + 0.5) + log 3 -> softplus(1 + ln 3)
  Row 2 is padding (valid 0) and counts for nothing."""
  logits = jnp.array([[1.0, 2.0], [0.5, -0.5], [50.0, -50.0]])
  labels = jnp.array([0, 1, 1])
  valid = jnp.array([1.0, 1.0, 0.0])
  softplus = lambda x: math.log1p(math.exp(x))
  want = (softplus(1 - math.log(3)) + softplus(1 + math.log(3))) / 2
  assert want == pytest.approx(1.429669, abs=1e-6)
  got, count = losses.balanced_softmax_ce(logits, labels, valid,
                                          np.array([3, 1]))
  assert float(got) == pytest.approx(want, rel=1e-5) and float(count) == 2
  # Uniform counts: the plain cross-entropy.
  plain = (softplus(1.0) + softplus(1.0)) / 2
  got, _ = losses.balanced_softmax_ce(logits, labels, valid,
                                      np.array([7, 7]))
  assert float(got) == pytest.approx(plain, rel=1e-6)
  got, _ = losses.option_ce(logits, labels, valid)
  assert float(got) == pytest.approx(plain, rel=1e-6)


def test_balanced_softmax_with_an_unseen_option_stays_finite():
  """Counts (0, 5): prior_0 = eps / (5 + 2 eps), so the loss of label 1 is
  softplus(2 + log(eps / 5)) ~ 2e-7 e^2; value and gradient finite."""
  f = lambda z: losses.balanced_softmax_ce(
      z, jnp.array([1]), jnp.array([1.0]), np.array([0, 5]))[0]
  z = jnp.array([[2.0, 0.0]])
  eps = losses.PRIOR_EPS
  want = math.log1p(math.exp(2 + math.log(eps / (5 + 2 * eps))))
  assert float(f(z)) == pytest.approx(want, abs=1e-7)   # float32 log-softmax
  assert want == pytest.approx(1.4778e-6, rel=1e-4)
  assert np.all(np.isfinite(np.asarray(jax.grad(f)(z))))
  np.testing.assert_allclose(
      losses.label_log_prior(np.array([[3, 1], [0, 5]])),
      np.log([[0.75, 0.25], [eps / (5 + 2 * eps), (5 + eps) / (5 + 2 * eps)]]),
      rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# The personalized adapter is the sum of both heads
# ---------------------------------------------------------------------------
def test_personalized_prediction_is_the_sum_of_both_heads(tiny):
  model, base = tiny
  fresh = lora_lib.init(model, jax.random.key(1))
  body, generic = lora_lib.split_layers(noisy(fresh, 1, 0.1), BODY)
  _, personal = lora_lib.split_layers(noisy(fresh, 2, 0.1), BODY)
  both = fedrod.personalized(body, generic, personal)
  assert both['layers']['self_attn']['q_proj']['a'].shape[-1] == \
      2 * LCFG.rank
  # delta_W adds: body layers get the generic adapter's only.
  g_full = lora_lib.join_layers(body, generic)
  p_full = lora_lib.join_layers(jax.tree.map(jnp.zeros_like, body), personal)
  dw = lora_lib.delta_weights(both, LCFG.scale)
  dg = lora_lib.delta_weights(g_full, LCFG.scale)
  dp = lora_lib.delta_weights(p_full, LCFG.scale)
  for path in dw:
    np.testing.assert_allclose(dw[path], dg[path] + dp[path], atol=1e-6)
    assert float(jnp.abs(dp[path][BODY:]).max()) > 1e-3
  # The model with the concatenated adapter equals the base with
  # W + delta_generic + delta_personal merged in.
  tokens = jax.random.randint(jax.random.key(5), (2, T), 0, CFG.vocab_size)
  out = model.apply({'params': base, 'lora': both}, tokens)
  merged = lora_lib.merge(lora_lib.merge(base, g_full, LCFG.scale), p_full,
                          LCFG.scale)
  ref = model.apply({'params': merged}, tokens)
  np.testing.assert_allclose(out, ref, atol=2e-4)
  only_generic = model.apply({'params': base, 'lora': g_full}, tokens)
  assert float(jnp.abs(out - only_generic).max()) > 1e-2


# ---------------------------------------------------------------------------
# Through the engine
# ---------------------------------------------------------------------------
def answer_batches(step0, num_steps):
  """``random_batches`` whose answers start with option 0 or 1's token."""
  b = random_batches(step0, num_steps)
  first = T // 2
  pick = (np.arange(b['tokens'].shape[2])[None, None, :] +
          np.arange(step0, step0 + num_steps)[:, None, None] +
          np.arange(N)[None, :, None]) % 2
  b['tokens'][..., first] = OPTIONS[pick]
  return b


def make_method(tiny, c, option_ids=OPTIONS):
  model, base = tiny
  return fedrod.build(Setup(
      model=model, base=base, config=c, num_clients=N,
      train_counts=COUNTS.sum(1), label_counts=COUNTS, few_shot={},
      lora_init=lambda key: lora_lib.init(model, key),
      option_ids=option_ids))


def make_engine(tiny, c):
  model, base = tiny
  return Engine(make_method(tiny, c), model, base, c.fl, N, answer_batches)


def test_personal_head_never_reaches_the_server(tiny):
  c = config()
  c.fl.local_epochs = 0.0
  eng = make_engine(tiny, c)
  state = eng.initial_state(jax.random.key(1))
  state = dict(state, server=noisy(state['server'], 3, 0.05),
               client=dict(state['client'],
                           personal=noisy(state['client']['personal'], 4,
                                          0.05)))
  i = next(i for i, s in enumerate(eng.schedule()) if s[0].name == 'rounds')
  state = dict(state, done=jnp.int32(i))
  seen, real = [], eng._servers['rounds']
  eng._servers['rounds'] = lambda s, u, w, t: (
      seen.append(jax.tree.map(np.asarray, (s, u))), real(s, u, w, t))[1]
  marker = jax.tree.map(lambda x: jnp.full_like(x, MARKER),
                        state['client']['personal'])
  with_marker = dict(state, client=dict(state['client'], personal=marker))
  a, m = eng.run_repeat(copy(state), i)
  b, _ = eng.run_repeat(copy(with_marker), i)
  # What reaches the server: body + generic head, nothing of the personal
  # head (nor the label prior).
  assert jax.tree.structure(seen[0][1]) == jax.tree.structure(state['server'])
  for leaf in jax.tree.leaves(seen[1]):
    assert not np.any(leaf == np.float32(MARKER))
  # The personal loss holds body and generic head fixed and the balanced loss
  # does not see the personal head: the new global model is the same bit
  # for bit whatever the personal heads are.
  close(a['server'], b['server'], atol=0)
  moved = max(float(jnp.abs(x - y).max()) for x, y in zip(
      jax.tree.leaves(a['server']), jax.tree.leaves(state['server'])))
  assert moved > 1e-4
  # The personal heads trained and stayed local; the prior stayed
  # bit-identical.
  for x, y in zip(jax.tree.leaves(a['client']['personal']),
                  jax.tree.leaves(state['client']['personal'])):
    assert x.shape[1] == L - BODY and float(jnp.abs(x - y).max()) > 1e-4
  np.testing.assert_array_equal(a['client']['log_prior'],
                                losses.label_log_prior(COUNTS))
  size = lora_lib.num_bytes(state['server'])
  assert m['bytes_up_per_client'] == m['bytes_down_per_client'] == [size] * N
  assert m['participants'] == N


def test_loss_is_balanced_generic_plus_personal_ce(tiny):
  """A client's loss: the balanced softmax of the generic model's option
  logits with that client's own label counts, plus the plain CE of the
  personalized model's; padded rows count for nothing."""
  model, base = tiny
  method = make_method(tiny, config())
  phase = method.phases[1]
  server, client = method.init(jax.random.key(1))
  server = noisy(server, 3, 0.05)
  client = dict(client, personal=noisy(client['personal'], 4, 0.05))
  batch = jax.tree.map(lambda x: jnp.asarray(x[0, 2]), answer_batches(0, 1))
  batch['valid'] = batch['valid'].at[1].set(0.0)      # one padded row
  fwd = Forward(model, base, None, False)
  me = 2                                               # counts (0, 2)

  @jax.jit
  def by_method(client, server):
    train = jax.tree.map(lambda x: x[me], jax.vmap(phase.start, in_axes=(
        0, None))(client, server))
    return phase.loss(fwd, train, server, batch, None)

  @jax.jit
  def by_hand(client, server):
    generic = lora_lib.join_layers(server['body'], server['generic'])
    logits, label = fwd.option_logits(generic, batch, OPTIONS)
    mine = jax.tree.map(lambda x: x[me], client['personal'])
    logits_p, _ = fwd.option_logits(
        fedrod.personalized(server['body'], server['generic'], mine), batch,
        OPTIONS)
    return (losses.balanced_softmax_ce(logits, label, batch['valid'],
                                       COUNTS[me]),
            losses.option_ce(logits, label, batch['valid']),
            losses.option_ce(logits_p, label, batch['valid']), label)

  got, count = by_method(client, server)
  (balanced, _), (plain, _), (personal, n), label = by_hand(client, server)
  assert float(count) == float(n) == 1.0
  np.testing.assert_allclose(got, balanced + personal, rtol=1e-5)
  assert abs(float(balanced) - float(plain)) > 1e-2  # the prior matters
  np.testing.assert_array_equal(label, [batch['tokens'][0, T // 2] == 20,
                                        batch['tokens'][1, T // 2] == 20])


def test_needs_distinct_option_tokens(tiny):
  with pytest.raises(ConfigError, match='fedrod'):
    make_method(tiny, config(), option_ids=None)


@pytest.mark.parametrize('scenario', ['logs', 'medical'])
def test_main_py(tmp_path, tmp_path_factory, scenario):
  r = run_scenario('fedrod', scenario, tmp_path)
  assert set(r) == fedavg_keys(tmp_path_factory)   # the common schema
  assert r['method'] == 'fedrod' and r['phases'] == ['local', 'rounds']
  assert r['headline'] == 'personalized'
  assert list(r['models']) == ['personalized', 'generic']
  for row in r['models'].values():
    assert 0.0 <= row['mean'][r['metric']] <= 1.0
  lcfg = LoraConfig.from_config(
      ml_collections.ConfigDict(r['config']['lora']))
  fresh = lora_lib.init(Llama(PRESETS['tiny'], lcfg), jax.random.key(0))
  rounds = r['communication']['per_round']
  assert [x['phase'] for x in rounds] == ['local', 'rounds']
  for x in rounds:   # body + generic head: the whole adapter's layers
    assert x['bytes_up_per_client'] == [lora_lib.num_bytes(fresh)] * 2
    assert x['bytes_down_per_client'] == [lora_lib.num_bytes(fresh)] * 2
