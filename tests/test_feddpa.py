"""FedDPA (fdlora_jax/fl/methods/feddpa.py): the instance weights against
the rule computed by hand, each test row scored under its own mixed adapter,
the local adapter never reaching the server, the local-then-global split of
a round; main.py on the medical scenario (logs: test_methods)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdlora_jax import evaluate
from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import ConfigError
from fdlora_jax.fl.api import Setup
from fdlora_jax.fl.methods import feddpa
from fdlora_jax.model import Llama, init_params, positions_from_mask
from fdlora_jax.run import validate_config
from fdlora_jax.fl.step import Forward
from tests.helpers import (CFG, LCFG, N, close, config, copy, differs,
                           engine, leaves, noisy, random_batches, run_scenario,
                           server_spy)
from tests.test_evaluate import make_arrays

COUNTS = (1, 2, 4)
MARKER = 0.0123


def cosine(x, y):
  return float(x @ y / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-8))


def test_instance_weights_follow_the_rule_on_a_toy_set():
  rng = np.random.default_rng(0)
  e = rng.normal(size=8)
  refs = rng.normal(size=(4, 8))
  refs[1] = 3 * e                     # cos 1
  refs[2] = -e                        # cos -1
  valid = np.array([True, True, True, False])   # the last is padding
  want = 0.5 * np.mean([cosine(e, r) for r in refs[:3]])
  got = np.asarray(feddpa.instance_weights(jnp.asarray(e), jnp.asarray(refs),
                                           jnp.asarray(valid), 0.5))
  np.testing.assert_allclose(got, [want, 1 - want], rtol=1e-5)
  # A client with no reference gives the global adapter nothing.
  none = feddpa.instance_weights(jnp.asarray(e), jnp.asarray(refs),
                                 jnp.zeros(4, bool), 0.5)
  np.testing.assert_allclose(np.asarray(none), [0.0, 1.0])


def test_mixed_adds_the_weighted_outputs_not_the_factors():
  model = Llama(CFG, LCFG)
  one = lora_lib.init(model, jax.random.key(1))
  g, loc = noisy(one, 2), noisy(one, 3)
  got = lora_lib.delta_weights(lora_lib.mixed((g, loc), [0.3, 0.7]), 1.0)
  dg, dl = (lora_lib.delta_weights(x, 1.0) for x in (g, loc))
  for path, dw in got.items():
    np.testing.assert_allclose(dw, 0.3 * dg[path] + 0.7 * dl[path],
                               rtol=1e-5, atol=1e-6)


@pytest.fixture(scope='module')
def mix_setup():
  """Two clients' global and local adapters, their few-shot references and
  test arrays on the tiny model."""
  model = Llama(CFG, LCFG)
  base = init_params(CFG, jax.random.key(0))
  one = lora_lib.init(model, jax.random.key(1))
  arrays = make_arrays(seed=4)
  n = arrays['tokens'].shape[0]
  glob = lora_lib.replicate(noisy(one, 5, 0.3), n)
  local = lora_lib.stack([noisy(one, 10 + i, 0.3) for i in range(n)])
  return model, base, glob, local, arrays


def embed(model, base, lora, tokens, mask, at):
  """The final hidden state at ``at`` of one unpadded sequence, by hand."""
  x = model.apply({'params': base, 'lora': lora}, jnp.asarray(tokens[None]),
                  jnp.asarray(mask[None]),
                  positions_from_mask(jnp.asarray(mask[None])),
                  return_hidden=True)
  return np.asarray(x[0, at])


def test_each_test_row_is_scored_under_its_own_weights(mix_setup):
  model, base, glob, local, arrays = mix_setup
  n, m = arrays['tokens'].shape[:2]
  rng = np.random.default_rng(1)
  refs = rng.normal(size=(n, 3, CFG.hidden_size)).astype(np.float32)
  valid = np.ones((n, 3), bool)
  weigh = lambda e, ctx: feddpa.instance_weights(e, ctx['refs'], ctx['valid'],
                                                 0.9)
  mix = lora_lib.InstanceMix(parts=(glob, local), probe=local,
                             context={'refs': jnp.asarray(refs),
                                      'valid': jnp.asarray(valid)},
                             weigh=weigh)
  got = evaluate.option_scores(model, base, mix, arrays, chunk=3)
  seen = set()
  for c in range(n):
    lo_c = jax.tree.map(lambda x: x[c], local)
    for j in range(m):
      om, tok, am = (arrays[k][c, j] for k in ('option_mask', 'tokens',
                                               'attention_mask'))
      first = int(np.argmax(om.sum(-1) > 0))
      end = int(np.argmax(om[first] > 0)) - 1
      e = embed(model, base, lo_c, tok[first], am[first], end)
      w = 0.9 * np.mean([cosine(e, r) for r in refs[c]])
      seen.add(round(w, 4))
      # The row's adapter, built by hand, scored alone.
      one = lora_lib.mixed((jax.tree.map(lambda x: x[c], glob), lo_c),
                           [w, 1 - w])
      single = {k: v[c:c + 1, j:j + 1] for k, v in arrays.items()}
      want = evaluate.option_scores(
          model, base, jax.tree.map(lambda x: x[None], one), single)
      np.testing.assert_allclose(got[c, j], want[0, 0], rtol=1e-4, atol=1e-4)
  assert len(seen) > 1      # the weights do differ between instances


def test_generation_takes_each_prompts_own_adapter(mix_setup):
  model, base, glob, local, arrays = mix_setup
  tok = type('Tok', (), {'eos_token_id': -1, 'pad_token_id': 0,
                         'decode': lambda self, ids, **kw: ' '.join(
                             map(str, ids))})()
  n = arrays['tokens'].shape[0]
  context = {'refs': jnp.ones((n, 1, CFG.hidden_size)),
             'valid': jnp.ones((n, 1), bool)}
  # A weigh that ignores the instance: the same as that fixed mixture.
  fixed = lambda e, ctx: jnp.asarray([0.25, 0.75]) + 0 * e[0]
  mix = lora_lib.InstanceMix((glob, local), local, context, fixed)
  _, got = evaluate.generated_predictions(model, base, mix, arrays, tok,
                                          ('a', 'b', 'c'), 3, chunk=2,
                                          yes_no=False)
  both = lora_lib.mixed((glob, local), jnp.tile(jnp.asarray([0.25, 0.75]),
                                                (n, 1)))
  _, want = evaluate.generated_predictions(model, base, both, arrays, tok,
                                           ('a', 'b', 'c'), 3, chunk=2,
                                           yes_no=False)
  assert got == want


def first_round(eng):
  return next(i for i, s in enumerate(eng.schedule()) if s[0].name == 'rounds')


def test_the_local_adapter_never_reaches_the_server(tiny):
  eng = engine(tiny, feddpa, config(), COUNTS)
  state = eng.initial_state()
  after_local, _ = eng.run_repeat(copy(state), 0)
  marked = dict(after_local, client=dict(
      after_local['client'], local=jax.tree.map(
          lambda x: jnp.full_like(x, MARKER), after_local['client']['local'])))
  i = first_round(eng)
  with server_spy(eng) as seen:
    new, m = eng.run_repeat(copy(marked), i)
  server, uploads, weights, _ = seen[0]
  assert jax.tree.structure(uploads) == jax.tree.structure(
      state['server']['global'])
  for leaf in leaves((server, uploads)):
    assert not np.any(leaf == np.float32(MARKER))
  w = np.asarray(COUNTS, float) / sum(COUNTS)
  np.testing.assert_allclose(weights / weights.sum(), w, rtol=1e-6)
  close(new['server']['global'],
        jax.tree.map(lambda u: np.tensordot(w, u, axes=1), uploads),
        atol=1e-6)
  # The local adapters trained, each on its own client, and what went up
  # is not them.
  assert differs(new['client']['local'], marked['client']['local']) > 1e-4
  assert differs(uploads, new['client']['local']) > 1e-4
  # With the global adapter trained alone (joint_global False), the uploads
  # do not depend on what the local adapters hold.
  other = dict(after_local, client=dict(
      after_local['client'], local=jax.tree.map(
          lambda x: x + 0.5, after_local['client']['local'])))
  with server_spy(eng) as seen_other:
    eng.run_repeat(copy(other), i)
  close(seen_other[0][1], uploads, atol=0)
  size = lora_lib.num_bytes(state['server']['global'])
  assert m['bytes_up_per_client'] == [size] * len(COUNTS)


def test_a_round_trains_the_local_adapter_then_the_global_one(tiny):
  """``k`` steps of the local adapter (the global frozen), then the rest on
  the global copy (the local frozen): moving the boundary past every step
  leaves the upload the download; moving it to 0 leaves the local adapter
  bit-identical."""
  eng = engine(tiny, feddpa, config(), COUNTS)
  state, _ = eng.run_repeat(copy(eng.initial_state()), 0)
  i = first_round(eng)
  assert list(eng.schedule()[i][0].steps) == [2 * config().fl.inner_steps] * 3
  k = state['client']['k']
  all_local = dict(state, client=dict(state['client'], k=k + 100))
  with server_spy(eng) as seen:
    after, _ = eng.run_repeat(copy(all_local), i)
  for u in jax.tree.leaves(seen[0][1]):
    np.testing.assert_array_equal(u, np.broadcast_to(u[:1], u.shape))
  close(seen[0][1], lora_lib.replicate(state['server']['global'], 3), atol=0)
  assert differs(after['client']['local'], state['client']['local']) > 1e-4
  no_local = dict(state, client=dict(state['client'], k=0 * k))
  with server_spy(eng) as seen:
    after, _ = eng.run_repeat(copy(no_local), i)
  close(after['client']['local'], state['client']['local'], atol=0)
  assert differs(seen[0][1], lora_lib.replicate(
      state['server']['global'], 3)) > 1e-4


def test_the_rounds_loss_mixes_local_then_global(tiny):
  """Steps before ``k`` see ``local_weight`` of the local adapter and the
  rest of the global one; later steps the global adapter alone."""
  model, base = tiny
  c = config()
  c.feddpa.local_weight = 0.3
  loss = engine(tiny, feddpa, c, COUNTS).method.phases[1].loss
  one = lora_lib.init(model, jax.random.key(0))
  glob, loc = noisy(one, 1), noisy(one, 2)
  train = {'local': loc, 'global': glob, 'k': jnp.float32(2)}
  batch = jax.tree.map(lambda x: jnp.asarray(x[0, 0]), random_batches(0, 1))
  fwd = Forward(model, base, None, False)
  want_local = fwd.nll(lora_lib.mixed((loc, glob), [0.3, 0.7]), batch)[0]
  want_global = fwd.nll(glob, batch)[0]
  assert abs(float(want_local) - float(want_global)) > 1e-3
  for step, want in ((0, want_local), (1, want_local), (2, want_global),
                     (3, want_global)):
    got = loss(fwd._replace(step=jnp.int32(step)), train, None, batch, None)
    np.testing.assert_allclose(float(got[0]), float(want), rtol=1e-6)


def test_rows_weigh_by_the_few_shot_instances(tiny):
  """rows(): ``dynamic`` compares with the client's few-shot instances
  under its local adapter; ``fixed`` is the fixed mixture."""
  model, base = tiny
  c = config()
  rng = np.random.default_rng(2)
  shots = {'tokens': rng.integers(1, CFG.vocab_size, (N, 3, 10)),
           'attention_mask': np.ones((N, 3, 10), np.int32),
           'loss_mask': np.zeros((N, 3, 10), np.float32)}
  shots['attention_mask'][..., 8:] = 0
  for cl in range(N):                   # answers of 2 or 3 tokens
    shots['loss_mask'][cl, :, 5 + cl % 2:8] = 1
  shots['loss_mask'][2, 1] = 0          # a padded few-shot row
  method = feddpa.build(Setup(
      model=model, base=base, config=c, num_clients=N,
      train_counts=np.asarray(COUNTS), label_counts=np.ones((N, 2), np.int64),
      few_shot=shots, lora_init=lambda key: lora_lib.init(model, key)))
  server, client = method.init(jax.random.key(0))
  client = dict(client, local=lora_lib.stack([
      noisy(jax.tree.map(lambda x: x[0], client['local']), 20 + i)
      for i in range(N)]))
  rows = method.rows(server, client)
  assert list(rows) == ['dynamic', 'fixed', 'global', 'local']
  mix = rows['dynamic']
  for cl in range(N):
    lo = jax.tree.map(lambda x: x[cl], client['local'])
    for f in range(3):
      lm = shots['loss_mask'][cl, f]
      if not lm.any():
        assert not bool(mix.context['valid'][cl, f])
        continue
      want = embed(model, base, lo, shots['tokens'][cl, f],
                   shots['attention_mask'][cl, f], int(np.argmax(lm > 0)) - 1)
      np.testing.assert_allclose(mix.context['refs'][cl, f], want, rtol=1e-4,
                                 atol=1e-5)
  g = lora_lib.replicate(server['global'], N)
  dg, dl, got = (lora_lib.delta_weights(x, 1.0) for x in (
      g, client['local'], rows['fixed']))
  for path, dw in got.items():
    np.testing.assert_allclose(dw, 0.5 * dg[path] + 0.5 * dl[path],
                               rtol=1e-5, atol=1e-6)


def test_config_is_validated():
  for field, value in (('max_weight', 0.0), ('local_weight', 1.5),
                       ('weighting', 'mean')):
    c = config()
    c.method = 'feddpa'
    c.feddpa[field] = value
    with pytest.raises(ConfigError, match=f'feddpa.{field}'):
      validate_config(c)
  c = config()
  c.method, c.data.few_shot = 'feddpa', 0
  with pytest.raises(ConfigError, match='data.few_shot'):
    validate_config(c)


def test_main_py_on_the_medical_scenario(tmp_path):
  r = run_scenario('feddpa', 'medical', tmp_path)
  assert r['method'] == 'feddpa' and r['headline'] == 'dynamic'
  assert set(r['models']) >= {'dynamic', 'fixed', 'global', 'local'}
