"""AdaFusion: fusing identities, the vmapped fitness, and the search itself."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdlora_jax import fusion
from fdlora_jax import lora as lora_lib
from fdlora_jax.lora import LoraConfig
from fdlora_jax.model import PRESETS, Llama, init_params
from tests import helpers

CFG = PRESETS['tiny']
LCFG = LoraConfig(rank=4, alpha=8.0, targets=('q_proj', 'v_proj', 'up_proj'))
N, F, L = 2, 3, 12


def noisy(lora, seed, std=0.3):
  return helpers.noisy(lora, seed, std)


@pytest.fixture(scope='module')
def setup():
  model = Llama(CFG, LCFG)
  base = init_params(CFG, jax.random.key(0))
  one = lora_lib.init(model, jax.random.key(1))
  personal = lora_lib.stack([noisy(one, 10 + i) for i in range(N)])
  global_ = lora_lib.stack([noisy(one, 20 + i) for i in range(N)])
  tokens = jax.random.randint(jax.random.key(2), (N, F, L), 0, CFG.vocab_size)
  attention_mask = np.ones((N, F, L), np.int32)
  attention_mask[0, 1, 9:] = 0        # right padding
  attention_mask[1, 2, 5:] = 0
  loss_mask = np.zeros((N, F, L), np.float32)
  loss_mask[:, :, 6:9] = 1.0          # the "answer" tokens
  loss_mask[1, 2, :] = 0.0            # an example with no loss tokens
  loss_mask[1, 2, 3] = 1.0
  fewshot = {'tokens': tokens, 'loss_mask': jnp.asarray(loss_mask),
             'attention_mask': jnp.asarray(attention_mask)}
  return model, base, personal, global_, fewshot


def with_shared_start(fewshot, length=16, seed=5):
  """Every example (padding rows too) opens with the same ``length`` tokens,
  as a prompt template does."""
  start = np.random.default_rng(seed).integers(0, CFG.vocab_size, length)
  n, f, _ = fewshot['tokens'].shape
  ones = np.ones((n, f, length))
  return {'tokens': jnp.concatenate(
              [jnp.asarray(np.broadcast_to(start, (n, f, length)),
                           jnp.int32), fewshot['tokens']], -1),
          'loss_mask': jnp.concatenate(
              [jnp.zeros((n, f, length)), fewshot['loss_mask']], -1),
          'attention_mask': jnp.concatenate(
              [jnp.asarray(ones, jnp.int32), fewshot['attention_mask']], -1)}


# ---- fuse -----------------------------------------------------------------
def test_fuse_endpoints_are_exact_and_half_is_the_mean(setup):
  _, _, personal, global_, _ = setup
  w = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  fused = fusion.fuse(personal, global_, w)
  for f, p, g in zip(jax.tree.leaves(fused), jax.tree.leaves(personal),
                     jax.tree.leaves(global_)):
    np.testing.assert_array_equal(f[0], p[0])   # client 0: personal
    np.testing.assert_array_equal(f[1], g[1])   # client 1: global
  half = fusion.fuse(personal, global_, jnp.full((N, 2), 0.5))
  for f, p, g in zip(jax.tree.leaves(half), jax.tree.leaves(personal),
                     jax.tree.leaves(global_)):
    np.testing.assert_allclose(f, (p + g) / 2, rtol=1e-6, atol=1e-7)


def test_fuse_mixes_a_and_b_not_delta_w(setup):
  _, _, personal, global_, _ = setup
  one_p = jax.tree.map(lambda x: x[0], personal)
  one_g = jax.tree.map(lambda x: x[0], global_)
  fused = fusion.fuse(one_p, one_g, jnp.array([0.3, 0.6]))  # w without N
  path = ('layers', 'self_attn', 'q_proj')
  dw = lora_lib.delta_weights(fused, 1.0)[path]
  get = lambda t, k: lora_lib._get(t, path)[k]
  a = 0.3 * get(one_p, 'a') + 0.6 * get(one_g, 'a')
  b = 0.3 * get(one_p, 'b') + 0.6 * get(one_g, 'b')
  np.testing.assert_allclose(dw, jnp.einsum('lir,lro->lio', a, b), rtol=1e-5,
                             atol=1e-6)
  linear = (0.3 * lora_lib.delta_weights(one_p, 1.0)[path]
            + 0.6 * lora_lib.delta_weights(one_g, 1.0)[path])
  assert float(jnp.abs(dw - linear).max()) > 1e-3


def test_fuse_rejects_bad_w(setup):
  _, _, personal, global_, _ = setup
  with pytest.raises(ValueError, match=r'\[\.\.\., 2\]'):
    fusion.fuse(personal, global_, jnp.ones((N, 3)))
  with pytest.raises(ValueError, match='leading axes'):
    fusion.fuse(personal, global_, jnp.ones((N + 1, 2)))


# ---- fitness ----------------------------------------------------------------
def test_fewshot_loss_by_hand(setup):
  model, base, personal, _, fewshot = setup
  lora = jax.tree.map(lambda x: x[1], personal)
  tok, lm, am = (fewshot[k][1] for k in ('tokens', 'loss_mask',
                                         'attention_mask'))
  got = fusion.fewshot_loss(model, base, lora, tok, lm, am)
  apply = jax.jit(model.apply)
  per_example = []
  for i in range(F):
    n = int(am[i].sum())
    logits = apply({'params': base, 'lora': lora}, tok[i:i + 1, :n])[0]
    logp = jax.nn.log_softmax(logits, -1)
    targets = [t for t in range(1, n) if lm[i, t] > 0]
    per_example.append(-sum(float(logp[t - 1, tok[i, t]]) for t in targets)
                       / len(targets))
  np.testing.assert_allclose(got, np.mean(per_example), rtol=1e-5)


def test_vmapped_fitness_equals_a_loop(setup):
  model, base, personal, global_, fewshot = setup
  lam = 0.05
  w = jax.random.uniform(jax.random.key(3), (N, 3, 2), minval=-1.5,
                         maxval=1.5)
  fitness = fusion.make_fitness_fn(model, base, personal, global_, fewshot,
                                   lam)
  got = fitness(w)
  assert got.shape == (N, 3)
  @jax.jit
  def one(p, g, wi, tokens, loss_mask, attention_mask):
    ce = fusion.fewshot_loss(model, base, fusion.fuse(p, g, wi), tokens,
                             loss_mask, attention_mask)
    return ce + lam * jnp.abs(wi).sum()

  for i in range(N):
    p = jax.tree.map(lambda x: x[i], personal)
    g = jax.tree.map(lambda x: x[i], global_)
    for j in range(3):
      want = one(p, g, w[i, j], fewshot['tokens'][i], fewshot['loss_mask'][i],
                 fewshot['attention_mask'][i])
      np.testing.assert_allclose(got[i, j], want, atol=1e-5)
  # P = 1, one candidate at a time (the benchmark's baseline), agrees too.
  np.testing.assert_allclose(fitness(w[:, 1:2])[:, 0], got[:, 1], atol=1e-5)
  # w = (1, 0) scores the personalized adapter alone.
  # w = (1, 0) scores the personalized adapter alone (fuse is exact there).
  personal_only = fitness(jnp.tile(jnp.array([[[1.0, 0.0]]]), (N, 1, 1)))
  p0 = jax.tree.map(lambda x: x[0], personal)
  want = one(p0, p0, jnp.array([1.0, 0.0]), fewshot['tokens'][0],
             fewshot['loss_mask'][0], fewshot['attention_mask'][0])
  np.testing.assert_allclose(personal_only[0, 0], want, atol=1e-5)


def test_adafusion_on_the_tiny_model_never_worsens_the_start(setup):
  model, base, personal, global_, fewshot = setup
  cfg = fusion.fusion_config()
  cfg.population_size, cfg.steps = 4, 2
  fitness = fusion.make_fitness_fn(model, base, personal, global_, fewshot,
                                   cfg.lam)
  w, history = fusion.adafusion(fitness, N, cfg, jax.random.key(0))
  assert w.shape == (N, 2)
  assert history['best_fitness'].shape == (2, N)
  assert history['mean_fitness'].shape == (2, N)
  np.testing.assert_allclose(fitness(w[:, None])[:, 0],
                             history['best_fitness'][-1], atol=1e-5)
  start = fitness(jnp.broadcast_to(jnp.asarray(cfg.init, jnp.float32),
                                   (N, 1, 2)))[:, 0]
  np.testing.assert_allclose(history['start_fitness'], start, atol=1e-5)
  assert np.all(np.asarray(history['best_fitness'][-1]) <= np.asarray(start))
  assert np.all(np.diff(np.asarray(history['best_fitness']), axis=0) <= 0)


# ---- search on a toy problem ---------------------------------------------
OPTIMA = jnp.array([[0.3, 0.8], [-0.5, 1.0], [1.2, -0.4]])


def toy_fitness(w):                      # [N, P, 2] -> [N, P]
  return ((w - OPTIMA[:, None]) ** 2).sum(-1)


@pytest.mark.parametrize('strategy,tol', [('CMA_ES', 1e-3),
                                          ('Sep_CMA_ES', 1e-3),
                                          ('DifferentialEvolution', 1e-3)])
def test_adafusion_finds_each_clients_optimum(strategy, tol):
  cfg = fusion.fusion_config()
  cfg.strategy, cfg.population_size, cfg.steps = strategy, 16, 40
  cfg.init = (0.5, 0.5)
  w, history = fusion.adafusion(toy_fitness, 3, cfg, jax.random.key(0))
  np.testing.assert_allclose(w, OPTIMA, atol=tol)
  np.testing.assert_allclose(history['best_fitness'][-1],
                             toy_fitness(w[:, None])[:, 0], rtol=1e-6)
  np.testing.assert_allclose(history['start_fitness'],
                             toy_fitness(jnp.full((3, 1, 2), 0.5))[:, 0])


def test_adafusion_keeps_the_start_point_when_nothing_beats_it():
  # Optimum exactly at the start point: the start is returned unchanged.
  cfg = fusion.fusion_config()
  cfg.steps, cfg.init = 3, (0.5, 0.5)
  w, history = fusion.adafusion(
      lambda w: ((w - 0.5) ** 2).sum(-1), 2, cfg, jax.random.key(1))
  np.testing.assert_array_equal(w, jnp.full((2, 2), 0.5))
  np.testing.assert_array_equal(history['best_fitness'], 0.0)


def test_adafusion_reports_progress_after_every_evaluation():
  cfg = fusion.fusion_config()
  cfg.steps, cfg.population_size = 4, 4
  calls = []
  w, _ = fusion.adafusion(lambda w: ((w - 0.3) ** 2).sum(-1), 2, cfg,
                          jax.random.key(0),
                          progress=lambda d, t: calls.append((d, t)))
  jax.block_until_ready(w)
  jax.effects_barrier()
  assert calls == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]


def test_adafusion_respects_bounds():
  cfg = fusion.fusion_config()
  cfg.bounds, cfg.steps, cfg.population_size = (-1.0, 1.0), 20, 8
  w, _ = fusion.adafusion(lambda w: ((w - 3.0) ** 2).sum(-1), 2, cfg,
                          jax.random.key(0))
  np.testing.assert_allclose(w, 1.0, atol=1e-6)


def test_compiled_search_is_reused_for_new_arrays(setup):
  model, base, personal, global_, fewshot = setup
  cfg = fusion.fusion_config()
  cfg.population_size, cfg.steps = 2, 1
  search = fusion.make_adafusion(N, cfg)
  f1 = fusion.make_fitness_fn(model, base, personal, global_, fewshot, 0.05)
  f2 = fusion.make_fitness_fn(model, base, global_, personal, fewshot, 0.05)
  search(f1, jax.random.key(0))
  search(f2, jax.random.key(0))
  assert search._cache_size() == 1


# ---- baselines and config errors ------------------------------------------
def test_baseline_weights():
  np.testing.assert_array_equal(fusion.baseline_weights('personal', 3),
                                [[1, 0]] * 3)
  np.testing.assert_array_equal(fusion.baseline_weights('global', 3),
                                [[0, 1]] * 3)
  np.testing.assert_array_equal(fusion.baseline_weights('average', 3),
                                [[0.5, 0.5]] * 3)
  np.testing.assert_array_equal(fusion.baseline_weights('sum', 3),
                                [[1, 1]] * 3)
  r1 = fusion.baseline_weights('random', 4, jax.random.key(0))
  r2 = fusion.baseline_weights('random', 4, jax.random.key(0))
  r3 = fusion.baseline_weights('random', 4, jax.random.key(1))
  np.testing.assert_array_equal(r1, r2)
  assert not np.array_equal(r1, r3)
  assert r1.shape == (4, 2) and float(r1.min()) >= -1.5
  assert float(r1.max()) <= 1.5 and len(np.unique(r1)) == 8
  with pytest.raises(ValueError, match='key'):
    fusion.baseline_weights('random', 4)
  with pytest.raises(ValueError, match="'median'"):
    fusion.baseline_weights('median', 4)


@pytest.mark.parametrize('field,value,match', [
    ('strategy', 'CMAES', r'fusion\.strategy=.*CMA_ES'),
    ('strategy', 'RandomSearch', r'fusion\.strategy'),
    ('population_size', 1, r'fusion\.population_size'),
    ('steps', 0, r'fusion\.steps'),
    ('bounds', (1.0, -1.0), r'fusion\.bounds'),
    ('init', (2.0, 0.0), r'fusion\.init'),
    ('sigma_init', 0.0, r'fusion\.sigma_init'),
])
def test_bad_config_names_the_field(field, value, match):
  cfg = fusion.fusion_config()
  setattr(cfg, field, value)
  with pytest.raises(ValueError, match=match):
    fusion.adafusion(toy_fitness, 3, cfg, jax.random.key(0))


def test_odd_population_for_open_es_is_a_value_error():
  cfg = fusion.fusion_config()
  cfg.strategy, cfg.population_size = 'Open_ES', 7
  with pytest.raises(ValueError, match=r'fusion\.population_size'):
    fusion.make_strategy(cfg)


def test_fitness_rejects_bad_shapes(setup):
  model, base, personal, global_, fewshot = setup
  fitness = fusion.make_fitness_fn(model, base, personal, global_, fewshot)
  with pytest.raises(ValueError, match=r'\[N, P, 2\]'):
    fitness(jnp.ones((N, 2)))
  bad = dict(fewshot, tokens=fewshot['tokens'][:1])
  with pytest.raises(ValueError, match='tokens'):
    fusion.make_fitness_fn(model, base, personal, global_, bad)


def test_fitness_runs_the_shared_start_once_with_the_same_result(setup):
  """Shots opening alike: the fitness caches that start per fused adapter
  (its Partial carries it) and equals the uncached loss of every member."""
  model, base, personal, global_, fewshot = setup
  shots = with_shared_start(fewshot)
  w = jax.random.uniform(jax.random.key(4), (N, 2, 2), minval=-1.5,
                         maxval=1.5)
  fitness = fusion.make_fitness_fn(model, base, personal, global_, shots,
                                   0.0)
  start = fitness.args[-1]
  assert start is not None and start.shape == (16,)
  got = fitness(w)
  for i in range(N):
    p, g = (jax.tree.map(lambda x, i=i: x[i], t) for t in (personal,
                                                          global_))
    for j in range(2):
      want = fusion.fewshot_loss(model, base, fusion.fuse(p, g, w[i, j]),
                                 *(shots[k][i] for k in (
                                     'tokens', 'loss_mask',
                                     'attention_mask')))
      np.testing.assert_allclose(got[i, j], want, rtol=1e-5, atol=1e-5)
  # No shared start (the setup's random shots): nothing is cached.
  assert fusion.make_fitness_fn(model, base, personal, global_, fewshot,
                                0.0).args[-1] is None
