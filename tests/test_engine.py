"""Exact identities of the engine (fdlora_jax/fl/engine.py) on the tiny model."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fdlora_jax import lora as lora_lib
from fdlora_jax.fl import engine as engine_lib
from fdlora_jax.fl import server as server_lib
from fdlora_jax.fl.engine import (Engine, Method, Phase, init_opt_states,
                                  sft_client_update, sft_clients_update)
from fdlora_jax.model import Llama, init_params
from tests.helpers import (CFG, LCFG, B, K, N, POISON, T,
                           random_batches)


def fl_cfg(**kw):
  c = ml_collections.ConfigDict(dict(
      rounds=2, inner_lr=1.0, inner_warmup_steps=0, inner_schedule='constant',
      inner_optimizer='sgd', inner_b1=0.9, inner_b2=0.999,
      inner_weight_decay=0.0, dropout=False, batch_size=B, grad_accum=1))
  c.update(kw)
  return c


@pytest.fixture(scope='module')
def setup():
  model = Llama(CFG, LCFG)
  base = init_params(CFG, jax.random.key(0))
  fresh = lora_lib.init(model, jax.random.key(1))
  return model, base, fresh


def averaging_method(fresh, steps=K, weights=None, trainable=None):
  """A FedAvg-shaped toy method: one adapter, one round phase."""
  def server(s, uploads, w, t):
    return {'global': server_lib.weighted_mean(uploads, w)}, {
        'participants': jnp.sum(w > 0)}
  phase = Phase('rounds', repeats=2, steps=np.broadcast_to(steps, (N,)),
                broadcast=lambda s, t: s['global'],
                start=lambda client, d: d,
                loss=lambda fwd, tr, d, b, r: fwd.nll(tr, b, r),
                trainable=trainable,
                finish=lambda client, tr, d, t: (dict(client, last=tr), tr),
                server=server)
  init = lambda key: ({'global': fresh},
                      {'last': lora_lib.replicate(fresh, N)})
  return Method('toy', init, (phase,), rows=lambda s, c: {},
                client_weights=weights)


def make_engine(setup, method, sample=random_batches, **kw):
  model, base, _ = setup
  return Engine(method=method, model=model, base=base, fl_cfg=fl_cfg(**kw),
                num_clients=N, sample=sample)


def test_vmapped_step_equals_separate_steps(setup):
  model, base, fresh = setup
  # eps=1e-3: Adam's g / (|g| + eps) would otherwise blow float reassociation
  # between batched and unbatched matmuls (1e-9 in g) up to lr-sized noise
  # where a gradient is ~0.
  opt = optax.adamw(1e-2, eps=1e-3, weight_decay=0.01)
  loras = lora_lib.stack([jax.tree.map(lambda x, i=i: x + 0.01 * i, fresh)
                          for i in range(N)])
  states = init_opt_states(opt, loras)
  batches = jax.tree.map(jnp.asarray, random_batches(0, K))
  rngs = jax.random.split(jax.random.key(3), N)
  many = sft_clients_update(model, opt, donate=False)
  out_l, out_s, healthy, m = many(base, loras, states, batches, rngs)
  one = jax.jit(sft_client_update(model, opt))
  # Updates are ~1e-2 per step; 1e-5 leaves room only for float
  # reassociation (seen up to 1.4e-6), not for a mixed-up client.
  for i in range(N):
    pick = lambda t: jax.tree.map(lambda x: x[i], t)
    l_i, s_i, h_i, m_i = one(base, pick(loras), pick(states),
                             jax.tree.map(lambda x: x[:, i], batches),
                             rngs[i])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                 pick(out_l), l_i)
    np.testing.assert_allclose(m.loss[i], m_i.loss, rtol=1e-5)
  b = out_l['layers']['self_attn']['q_proj']['b']
  assert float(jnp.abs(b[0] - b[1]).max()) > 1e-3  # clients really differ
  assert bool(jnp.all(healthy)) and m.loss.shape == (N, K)


def test_gradient_accumulation_equals_the_whole_batch(setup):
  """B = 2 rows in 2 micro-batches of 1 give the same K SGD steps as the
  whole batch, also when a row is padding (its micro-batch counts 0)."""
  model, base, fresh = setup
  opt = optax.sgd(1.0)
  loras = lora_lib.replicate(fresh, N)
  batches = random_batches(0, K)
  batches['valid'][1, 0, 1] = 0.0          # client 0, step 1: one real row
  batches['loss_mask'][0, 1, 0, T // 2:T // 2 + 3] = 0   # unequal counts
  batches = jax.tree.map(jnp.asarray, batches)
  rngs = jax.random.split(jax.random.key(3), N)
  outs = [sft_clients_update(model, opt, donate=False, grad_accum=a)(
      base, loras, init_opt_states(opt, loras), batches, rngs)
      for a in (1, 2)]
  (l1, _, h1, m1), (l2, _, h2, m2) = outs
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               l1, l2)
  np.testing.assert_allclose(m1.loss, m2.loss, rtol=1e-5)
  np.testing.assert_array_equal(m1.tokens, m2.tokens)
  assert bool(jnp.all(h1)) and bool(jnp.all(h2))
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), l2, loras)
  assert max(jax.tree.leaves(moved)) > 1e-3   # the steps did something
  with pytest.raises(ValueError, match='grad_accum'):
    sft_clients_update(model, opt, donate=False, grad_accum=3)(
        base, loras, init_opt_states(opt, loras), batches, rngs)


def test_one_round_equals_weighted_mean_of_separate_clients(setup):
  """K plain SGD steps per client, then the server's weighted mean, equals
  running each client alone and averaging by hand."""
  model, base, fresh = setup
  weights = np.array([1.0, 2.0, 5.0])
  eng = make_engine(setup, averaging_method(fresh, weights=weights))
  state = eng.initial_state(jax.random.key(0))
  new, metrics = eng.run_repeat(state, 0)
  one = jax.jit(sft_client_update(model, optax.sgd(1.0)))
  batches = jax.tree.map(jnp.asarray, random_batches(0, K))
  rngs = eng._rngs(1, 1)
  finals = [one(base, fresh, optax.sgd(1.0).init(fresh),
                jax.tree.map(lambda x: x[:, i], batches), rngs[i])[0]
            for i in range(N)]
  expect = jax.tree.map(
      lambda *xs: sum(w * x for w, x in zip(weights, xs)) / weights.sum(),
      *finals)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               new['server']['global'], expect)
  moved = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(jnp.abs(a - b).max()), new['server']['global'],
      fresh)))
  assert moved > 1e-3
  assert metrics['participants'] == N
  # Bytes: each client downloaded and uploaded one adapter.
  size = lora_lib.num_bytes(fresh)
  assert metrics['bytes_down_per_client'] == [size] * N
  assert metrics['bytes_up_per_client'] == [size] * N
  # The second round continues the data order (steps K..2K-1).
  assert eng.schedule()[1][3] == K


def test_nonfinite_client_keeps_state_and_gets_weight_zero(setup):
  model, base, fresh = setup
  poisoned = lambda s0, k: random_batches(s0, k, poison_client=1)
  eng = make_engine(setup, averaging_method(fresh), sample=poisoned)
  eng.base = jax.tree.map(lambda x: x, base)
  emb = eng.base['embed_tokens']['embedding']
  eng.base['embed_tokens']['embedding'] = emb.at[POISON].set(jnp.nan)
  state = eng.initial_state(jax.random.key(0))
  new, metrics = eng.run_repeat(state, 0)
  assert metrics['healthy'] == [True, False, True]
  assert metrics['nonfinite_steps'][1] >= 1 and metrics['participants'] == 2
  for leaf in jax.tree.leaves(new['server']['global']):
    assert bool(jnp.all(jnp.isfinite(leaf)))
  # The poisoned client keeps its previous state; the others moved.
  last0 = jax.tree.leaves(state['client']['last'])
  last1 = jax.tree.leaves(new['client']['last'])
  for a, b in zip(last0, last1):
    np.testing.assert_array_equal(a[1], b[1])
  assert any(float(jnp.abs(a[0] - b[0]).max()) > 0
             for a, b in zip(last0, last1))
  # Healthy clients' mean only: equal to a run where client 1 has weight 0.
  clean = make_engine(setup, averaging_method(
      fresh, weights=np.array([1.0, 0.0, 1.0])), sample=poisoned)
  clean.base = eng.base
  ref, _ = clean.run_repeat(clean.initial_state(jax.random.key(0)), 0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               new['server']['global'], ref['server']['global'])


def test_masked_steps_change_nothing(setup):
  model, base, fresh = setup
  opt = optax.adamw(1e-2)
  loras = lora_lib.replicate(fresh, N)
  states = init_opt_states(opt, loras)
  batches = random_batches(0, K)
  batches['valid'][:, 2] = 0  # client 2 has no data this round
  out_l, out_s, healthy, m = sft_clients_update(model, opt, donate=False)(
      base, loras, states, jax.tree.map(jnp.asarray, batches),
      jax.random.split(jax.random.key(0), N))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[2], b[2]),
               out_l, loras)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[2], b[2]),
               out_s, states)
  assert bool(healthy[2]) and float(m.tokens[2].sum()) == 0


def test_clients_stop_after_their_own_number_of_steps(setup):
  """steps [1, 2, 0]: client 0 takes one step of two, client 2 none."""
  model, base, fresh = setup
  steps = np.array([1, 2, 0])
  eng = make_engine(setup, averaging_method(fresh, steps=steps))
  new, m = eng.run_repeat(eng.initial_state(jax.random.key(0)), 0)
  one = jax.jit(sft_client_update(model, optax.sgd(1.0)))
  batches = jax.tree.map(jnp.asarray, random_batches(0, 1))
  rngs = eng._rngs(1, 1)
  first = one(base, fresh, optax.sgd(1.0).init(fresh),
              jax.tree.map(lambda x: x[:, 0], batches), rngs[0])[0]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, atol=1e-6),
               new['client']['last'], first)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[2], b),
               new['client']['last'], fresh)
  assert m['train_loss'][2] == 0.0 and m['train_loss'][1] > 0


def test_trainable_mask_keeps_frozen_entries_bit_identical(setup):
  """Only layer 1 of every leaf trains (a FedRep-style layer split)."""
  _, _, fresh = setup
  fresh = jax.tree.map(lambda x: x + 0.05, fresh)  # non-zero b: real grads
  top = lambda tree, i: jax.tree.map(
      lambda x: (jnp.arange(x.shape[0]) == 1).reshape(
          (-1,) + (1,) * (x.ndim - 1)), tree)
  eng = make_engine(setup, averaging_method(fresh, trainable=top))
  new, _ = eng.run_repeat(eng.initial_state(jax.random.key(0)), 0)
  for a, b in zip(jax.tree.leaves(new['client']['last']),
                  jax.tree.leaves(fresh)):
    np.testing.assert_array_equal(a[:, 0], np.broadcast_to(b[0], a[:, 0].shape))
    assert float(jnp.abs(a[:, 1] - b[1]).max()) > 0


def test_trainable_mask_can_alternate_within_a_round(setup):
  """Step 0 trains layer 0 only, step 1 layer 1 only: after step 0 layer 1
  is untouched, and the final layer 0 equals the step-0 result."""
  _, _, fresh = setup
  fresh = jax.tree.map(lambda x: x + 0.05, fresh)
  by_step = lambda tree, i: jax.tree.map(
      lambda x: (jnp.arange(x.shape[0]) == i).reshape(
          (-1,) + (1,) * (x.ndim - 1)), tree)
  one_step = make_engine(setup, averaging_method(fresh, steps=1,
                                                 trainable=by_step))
  after0, _ = one_step.run_repeat(one_step.initial_state(jax.random.key(0)), 0)
  both = make_engine(setup, averaging_method(fresh, steps=2,
                                             trainable=by_step))
  after1, _ = both.run_repeat(both.initial_state(jax.random.key(0)), 0)
  for a0, a1, f in zip(jax.tree.leaves(after0['client']['last']),
                       jax.tree.leaves(after1['client']['last']),
                       jax.tree.leaves(fresh)):
    np.testing.assert_array_equal(a0[:, 1], np.broadcast_to(f[1],
                                                            a0[:, 1].shape))
    np.testing.assert_array_equal(a1[:, 0], a0[:, 0])
    assert float(jnp.abs(a1[:, 1] - f[1]).max()) > 0


def test_outer_nesterov_step_matches_hand_computation():
  g = {'w': jnp.array([1.0, 2.0])}
  uploads = {'w': jnp.array([[0.0, 2.0], [1.0, 0.0]])}
  delta = server_lib.pseudo_gradient(g, uploads, jnp.array([1.0, 1.0]))
  np.testing.assert_allclose(delta['w'], [0.5, 1.0])
  outer = server_lib.outer_optimizer(0.1, 0.5, nesterov=True)
  g1, s1, m = server_lib.outer_step(outer, g, outer.init(g), uploads,
                                    jnp.array([1.0, 1.0]))
  # optax nesterov: m = d + mu m_prev; step = d + mu m  -> 1.5 d at step 1
  np.testing.assert_allclose(g1['w'], g['w'] - 0.1 * 1.5 * delta['w'],
                             rtol=1e-6)
  np.testing.assert_allclose(m['delta_norm'], np.sqrt(0.25 + 1.0), rtol=1e-6)


@pytest.mark.parametrize('kind', ['cosine', 'linear', 'constant'])
def test_inner_schedules_follow_their_formula(kind):
  """SGD on f(x) = x with the schedule: step i moves x by exactly lr_i."""
  total, warmup, lr = 10, 2, 0.5
  opt = engine_lib.inner_optimizer(
      fl_cfg(inner_schedule=kind, inner_warmup_steps=warmup, inner_lr=lr),
      total)
  x, state, moves = jnp.zeros(()), None, []
  state = opt.init(x)
  for _ in range(total):
    upd, state = opt.update(jnp.ones(()), state, x)
    moves.append(-float(upd))
  decay = total - warmup
  for i, got in enumerate(moves):
    if i < warmup:
      want = lr * i / warmup
    elif kind == 'cosine':
      want = lr * 0.5 * (1 + np.cos(np.pi * (i - warmup) / decay))
    elif kind == 'linear':
      want = lr * (1 - (i - warmup) / decay)
    else:
      want = lr
    assert got == pytest.approx(want, abs=1e-6), (kind, i)


@pytest.mark.parametrize('reset', [False, True])
def test_each_phase_decays_its_lr_over_its_own_steps(setup, reset):
  """A linear schedule reaches 0 at the last step a phase's optimizer state
  counts: 4 local steps; 2 rounds x 3 steps (one round when the state is
  reset each round), not the run's 10 steps."""
  _, _, fresh = setup
  loss = lambda fwd, tr, d, b, r: fwd.nll(tr, b, r)
  keep = lambda client, tr, d, t: (client, tr)
  local = Phase('local', steps=np.full(N, 4), broadcast=None,
                start=lambda client, d: client['p'], loss=loss, finish=keep)
  rounds = Phase('rounds', repeats=2, steps=np.full(N, 3),
                 broadcast=None, start=lambda client, d: client['p'],
                 loss=loss, finish=keep, reset_opt=reset)
  method = Method('two', lambda key: ({}, {'p': lora_lib.replicate(
      fresh, N)}), (local, rounds), rows=lambda s, c: {})
  eng = make_engine(setup, method, inner_schedule='linear', inner_lr=0.5)
  for name, horizon in (('local', 4), ('rounds', 3 if reset else 6)):
    opt = eng.optimizers[name]
    x, moves = jnp.zeros(()), []
    state = opt.init(x)
    for _ in range(horizon):
      upd, state = opt.update(jnp.ones(()), state, x)
      moves.append(-float(upd))
    np.testing.assert_allclose(
        moves, 0.5 * (1 - np.arange(horizon) / horizon), atol=1e-6)


def test_client_steps_in_epochs_and_steps():
  counts = np.array([10, 3, 0])
  np.testing.assert_array_equal(
      engine_lib.client_steps(counts, 1.5, 'epochs', 2), [8, 3, 0])
  np.testing.assert_array_equal(
      engine_lib.client_steps(counts, 3, 'steps', 2), [3, 3, 0])


def test_setup_builds_the_two_standard_phases_and_example_weights():
  """Setup.local_phase / round_phase read fl.* (the schedule every method
  but k-shot shares); example_weights are shares of the training data."""
  fl = ml_collections.ConfigDict(dict(
      local_steps=0, local_epochs=1.0, stage1_chunk=4, rounds=3,
      inner_steps=2, inner_unit='steps', batch_size=2))
  s = engine_lib.Setup(model=None, base=None,
                       config=ml_collections.ConfigDict({'fl': fl}),
                       num_clients=3, train_counts=np.array([10, 3, 0]),
                       label_counts=None, few_shot={}, lora_init=None)
  loss = lambda fwd, train, download, batch, rng: (0.0, 1)
  local = s.local_phase(loss=loss)
  assert (local.name, local.first_round, local.chunk, local.repeats) == (
      'local', 0, 4, 1)
  np.testing.assert_array_equal(local.steps, [5, 2, 0])   # 1 epoch, batch 2
  assert local.loss is loss
  rounds = s.round_phase(loss=loss, reset_opt=True)
  assert (rounds.name, rounds.first_round, rounds.repeats) == ('rounds', 1, 3)
  np.testing.assert_array_equal(rounds.steps, [2, 2, 0])
  assert rounds.reset_opt and rounds.loss is loss
  own = np.array([7, 7, 7], np.int32)
  np.testing.assert_array_equal(s.round_phase(steps=own).steps, own)
  np.testing.assert_array_equal(s.local_phase(steps=own).steps, own)
  fl.local_steps = 6
  np.testing.assert_array_equal(s.local_phase().steps, [6, 6, 0])
  np.testing.assert_allclose(s.example_weights('examples'),
                             [10 / 13, 3 / 13, 0])
  assert s.example_weights('uniform') is None
  empty = dataclasses.replace(s, train_counts=np.zeros(3))
  np.testing.assert_array_equal(empty.example_weights('examples'), 0)


def test_option_logits_are_the_logits_before_the_answer(setup):
  model, base, fresh = setup
  tok = jnp.array([[5, 6, 7, 8, 30, 2, 0], [5, 6, 9, 31, 2, 0, 0]])
  am = (tok > 0).astype(jnp.int32)
  lm = jnp.array([[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 0, 0]], jnp.float32)
  fwd = engine_lib.Forward(model, base, None, False)
  logits, label = fwd.option_logits(
      fresh, {'tokens': tok, 'loss_mask': lm, 'attention_mask': am},
      np.array([31, 30]))
  full = model.apply({'params': base, 'lora': fresh}, tok, am)
  np.testing.assert_allclose(logits[0], full[0, 3, jnp.array([31, 30])],
                             atol=1e-5)
  np.testing.assert_allclose(logits[1], full[1, 2, jnp.array([31, 30])],
                             atol=1e-5)
  np.testing.assert_array_equal(label, [1, 0])


def test_wire_bytes_override_the_array_size(setup):
  _, _, fresh = setup
  method = averaging_method(fresh)
  phase = method.phases[0]
  import dataclasses
  method = dataclasses.replace(method, phases=(dataclasses.replace(
      phase, wire_bytes=lambda upload: jnp.int32(7)),))
  eng = make_engine(setup, method)
  _, m = eng.run_repeat(eng.initial_state(jax.random.key(0)), 0)
  assert m['bytes_up_per_client'] == [7] * N
  assert m['bytes_down_per_client'] == [lora_lib.num_bytes(fresh)] * N


def test_compiled_functions_are_built_once(setup, monkeypatch):
  """Every jitted function is built with the engine: a second repeat of the
  same shapes traces nothing again (a Python side effect counts traces)."""
  model, base, fresh = setup
  traces = {'init': 0, 'wire_bytes': 0}
  real = engine_lib.inner_optimizer

  def counted_optimizer(*args):
    opt = real(*args)
    def init(params):
      traces['init'] += 1
      return opt.init(params)
    return optax.GradientTransformation(init, opt.update)

  def wire_bytes(upload):
    traces['wire_bytes'] += 1
    return jnp.int32(7)

  monkeypatch.setattr(engine_lib, 'inner_optimizer', counted_optimizer)
  method = averaging_method(fresh)
  phase = dataclasses.replace(method.phases[0], reset_opt=True,
                              wire_bytes=wire_bytes)
  eng = make_engine(setup, dataclasses.replace(method, phases=(phase,)))
  state, m = eng.run_repeat(eng.initial_state(jax.random.key(0)), 0)
  state, m = eng.run_repeat(state, 1)
  assert m['bytes_up_per_client'] == [7] * N
  assert traces == {'init': 1, 'wire_bytes': 1}


def test_communication_totals_the_repeats_bytes():
  repeats = [{'phase': 'local', 'round': 0, 'train_loss': [0.0],
              'bytes_down_per_client': [0, 0], 'bytes_up_per_client': [5, 6]},
             {'phase': 'rounds', 'round': 1,
              'bytes_down_per_client': [3, 3], 'bytes_up_per_client': [2, 1]}]
  got = engine_lib.communication(repeats, 2)
  assert got['bytes_down_per_client'] == [3, 3]
  assert got['bytes_up_per_client'] == [7, 7]
  assert got['bytes_total'] == 20
  assert got['per_round'][0] == {'phase': 'local', 'round': 0,
                                 'bytes_down_per_client': [0, 0],
                                 'bytes_up_per_client': [5, 6]}
  assert engine_lib.communication([], 2)['bytes_total'] == 0


@pytest.mark.parametrize('name', ['fedavg', 'fdlora'])
def test_clients_run_one_at_a_time_equal_the_vmapped_repeat(tiny, name):
  """What a deployment does: the server broadcasts, each client runs
  client_repeat on its own slice (its own keys, batches, steps), the
  server stacks the uploads and runs server_repeat. Equal to run_repeat."""
  from fdlora_jax.fl.methods import method_module
  from tests.helpers import config, copy, engine
  c = config()
  c.method = name
  eng = engine(tiny, method_module(c), c, counts=(2, 1, 3))
  whole = eng.initial_state()
  sliced = copy(whole)
  take = lambda tree, i: jax.tree.map(lambda x: x[i:i + 1], tree)
  for index, (phase, *_) in enumerate(eng.schedule()):
    whole, m = eng.run_repeat(whole, index)
    download = eng.broadcast(index, sliced['server'])
    parts = [eng.client_repeat(index, take(sliced['client'], i),
                               take(sliced['opt'][phase.name], i),
                               take(download, i), clients=np.array([i]))
             for i in range(N)]
    cat = lambda trees: jax.tree.map(lambda *x: jnp.concatenate(x), *trees)
    uploads = cat([p[2] for p in parts])
    healthy = np.concatenate([p[3]['healthy'] for p in parts])
    server, _, sm = eng.server_repeat(index, sliced['server'], uploads,
                                      healthy)
    sliced = dict(sliced, server=server, client=cat([p[0] for p in parts]),
                  opt=dict(sliced['opt'], **{phase.name: cat(
                      [p[1] for p in parts])}))
    for key in ('train_loss', 'bytes_up_per_client', 'bytes_down_per_client'):
      np.testing.assert_allclose(sum((p[3][key] for p in parts), []), m[key],
                                 rtol=1e-5)
  # Equal to float tolerance: XLA may order a sum differently for one
  # client than for three.
  for a, b in zip(jax.tree.leaves((whole['server'], whole['client'])),
                  jax.tree.leaves((sliced['server'], sliced['client']))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-5)
