"""Client-level DP (fdlora_jax/fl/privacy.py and the engine's use of it):
clipping and noise as a known answer at a fixed key, the accountant against
the exact epsilon of a composed Gaussian mechanism, adaptive clipping, and
the engine: DP with no noise and no binding clip changes nothing, a binding
clip bounds what the server sees, methods whose server is not a weighted
mean are refused."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dp_accounting

from fdlora_jax.errors import ConfigError
from fdlora_jax.fl import privacy
from fdlora_jax.fl.methods import fdlora, fedamp, fedavg, ffa_lora
from tests.helpers import assert_same, config, copy, engine, run_all, server_spy

KEY = jax.random.key(7)


def tree(x, y):
  return {'x': jnp.asarray(x, jnp.float32), 'y': jnp.asarray(y, jnp.float32)}


# Three clients around the reference (1, 1 | 2): updates (3, 4 | 0) of norm 5,
# (0, 0 | 1) of norm 1 and a NaN one with weight 0.
REF = tree([[1.0, 1.0]] * 3, [[2.0]] * 3)
UP = tree([[4.0, 5.0], [1.0, 1.0], [np.nan, 1.0]], [[2.0], [3.0], [2.0]])
W = jnp.asarray([1.0, 3.0, 0.0])


def test_privatize_clips_each_update_and_adds_one_draw_known_answer():
  out, m = privatize_known(clip=2.0, sigma=0.5)
  # Client 0 (norm 5) is scaled by 2/5, client 1 (norm 1) is not clipped.
  want = np.array([[1 + 3 * 0.4, 1 + 4 * 0.4], [1.0, 1.0]])
  std = 0.5 * 2.0 * 0.75                        # sigma * C * max p_i
  assert float(m['noise_std']) == pytest.approx(std)
  kx, ky = jax.random.split(KEY, 2)
  zx = np.asarray(jax.random.normal(kx, (2,))) * std
  zy = np.asarray(jax.random.normal(ky, (1,))) * std
  np.testing.assert_allclose(np.asarray(out['x'])[:2], want + zx, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out['y'])[:2],
                             np.array([[2.0], [3.0]]) + zy, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(m['norms'])[:2], [5.0, 1.0])


def privatize_known(clip, sigma):
  return privacy.privatize(UP, REF, W, jnp.float32(clip), sigma, KEY)


def test_the_weighted_mean_gets_exactly_the_one_draw():
  from fdlora_jax.fl.server import weighted_mean
  noisy, _ = privatize_known(clip=2.0, sigma=0.5)
  clean, _ = privatize_known(clip=2.0, sigma=0.0)
  diff = jax.tree.map(lambda a, b: a - b, weighted_mean(noisy, W),
                      weighted_mean(clean, W))
  one = jax.tree.map(lambda a, b: a[0] - b[0], noisy, clean)
  for k in ('x', 'y'):
    np.testing.assert_allclose(diff[k], one[k], rtol=1e-5)
    assert np.all(np.isfinite(diff[k]))          # the NaN client is left out


def test_noise_std_is_sigma_clip_over_n_with_uniform_weights():
  n, d = 4, 200_000
  up = {'w': jnp.zeros((n, d))}
  out, m = privacy.privatize(up, None, jnp.ones(n), jnp.float32(3.0), 2.0,
                             KEY)
  assert float(m['noise_std']) == pytest.approx(2.0 * 3.0 / n)
  assert float(jnp.std(out['w'][0])) == pytest.approx(1.5, rel=0.01)


def test_no_reference_clips_the_upload_itself():
  up = {'w': jnp.asarray([[3.0, 4.0], [0.3, 0.4]])}
  out, m = privacy.privatize(up, None, jnp.ones(2), jnp.float32(1.0), 0.0,
                             KEY)
  np.testing.assert_allclose(out['w'], [[0.6, 0.8], [0.3, 0.4]], rtol=1e-6)


@pytest.mark.parametrize('sigma,rounds', [(1.0, 10), (2.0, 30), (0.8, 8)])
def test_accountant_is_the_library_rdp_and_bounds_the_exact_epsilon(sigma,
                                                                    rounds):
  eps = privacy.epsilon(sigma, rounds, 1e-5)
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.GaussianDpEvent(sigma), rounds)
  assert eps == acc.get_epsilon(1e-5)
  # T Gaussian mechanisms of multiplier sigma are one of sigma / sqrt(T),
  # whose exact epsilon RDP can only over-state, by little.
  exact = dp_accounting.get_epsilon_gaussian(sigma / math.sqrt(rounds), 1e-5)
  assert exact <= eps <= 1.15 * exact


def test_noise_for_epsilon_inverts_the_accountant():
  sigma = privacy.noise_for_epsilon(4.0, 9, 1e-5)
  assert privacy.epsilon(sigma, 9, 1e-5) <= 4.0
  assert privacy.epsilon(sigma * 0.999, 9, 1e-5) > 4.0
  assert privacy.epsilon(0.0, 3, 1e-5) == math.inf
  assert privacy.epsilon(1.0, 0, 1e-5) == 0.0


def test_adaptive_clip_moves_towards_the_quantile():
  norms = jnp.asarray([1.0, 2.0, 3.0, 9.0])
  w = jnp.asarray([1.0, 1.0, 1.0, 0.0])            # client 3 takes no part
  clip, b = privacy.adapt_clip(jnp.float32(2.5), norms, w, 0.5, 0.2, 1e-6,
                               KEY)
  assert float(b) == pytest.approx(2 / 3, abs=1e-5)
  assert float(clip) == pytest.approx(2.5 * math.exp(-0.2 * (2 / 3 - 0.5)),
                                      rel=1e-5)
  # The update noise leaves room for the count's release.
  z = privacy.update_noise(1.0, 2.0, True)
  assert (z ** -2 + 4.0 ** -2) ** -0.5 == pytest.approx(1.0)
  with pytest.raises(ValueError):
    privacy.update_noise(1.0, 0.4, True)


# ---------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------
def dp_config(method='fedavg', **dp):
  c = config()
  c.method = method
  c.dp.enabled = True
  for k, v in dp.items():
    c.dp[k] = v
  return c


@pytest.mark.parametrize('module', [fedavg, fdlora])
def test_no_noise_and_a_loose_clip_change_nothing(tiny, module):
  plain = engine(tiny, module, config())
  private = engine(tiny, module, dp_config(module.NAME, clip=1e9,
                                           noise_multiplier=0.0))
  s0 = plain.initial_state()
  a, _ = run_all(plain, copy(s0))
  b, metrics = run_all(private, dict(copy(s0), dp={'clip': jnp.float32(1e9)}))
  assert_same(a['server'], b['server'])
  assert_same(a['client'], b['client'])
  assert metrics[-1]['dp_epsilon'] == 'inf'


def test_a_binding_clip_bounds_each_update_the_server_sees(tiny):
  eng = engine(tiny, fedavg, dp_config(clip=1e-3, noise_multiplier=0.0))
  state = eng.initial_state()
  with server_spy(eng, 'rounds') as seen:
    run_all(eng, state)
  for server, uploads, weights, _ in seen:
    sq = sum(np.sum((u - g[None]) ** 2, axis=tuple(range(1, u.ndim)))
             for u, g in zip(jax.tree.leaves(uploads),
                             jax.tree.leaves(server['global'])))
    assert np.all(np.sqrt(sq) <= 1e-3 * (1 + 1e-4))
    assert np.all(np.sqrt(sq) > 0.99e-3)            # clipped, not zeroed


def test_noise_reaches_the_server_and_epsilon_grows_each_round(tiny):
  eng = engine(tiny, fedavg, dp_config(epsilon=8.0))
  _, metrics = run_all(eng, eng.initial_state())
  eps = [m['dp_epsilon'] for m in metrics]
  assert eps == sorted(eps) and eps[-1] == pytest.approx(8.0, rel=1e-3)
  assert eng.guarantee(len(eng.schedule()))['private_rounds'] == len(metrics)
  assert all(m['dp_noise_std'] > 0 for m in metrics)


def test_adaptive_clip_is_carried_in_the_state(tiny):
  eng = engine(tiny, ffa_lora, dp_config('ffa_lora', adaptive=True,
                                         clip=1e-6, count_noise=5.0))
  state, metrics = run_all(eng, eng.initial_state())
  clips = [m['dp_clip'] for m in metrics]
  # Every update exceeds a 1e-6 clip: the clip grows each round.
  assert clips == sorted(clips) and clips[-1] > clips[0]
  assert float(state['dp']['clip']) > clips[-1]


def test_a_server_that_is_not_a_weighted_mean_is_refused(tiny):
  with pytest.raises(ConfigError, match='dp.enabled.*fedamp'):
    engine(tiny, fedamp, dp_config('fedamp'))


def test_bad_dp_fields_name_the_field():
  for field, value in [('clip', 0.0), ('delta', 1.0), ('noise_multiplier', -1),
                       ('target_quantile', 1.0)]:
    c = dp_config(**{field: value})
    with pytest.raises(ConfigError, match=f'dp.{field}'):
      privacy.validate(c.dp)


def test_fdlora_stage1_is_measured_from_the_shared_initial_adapter(tiny):
  # The personal adapters all start from the server's initial adapter, so
  # under a binding clip the mean moves at most C from it (not towards 0).
  eng = engine(tiny, fdlora, dp_config('fdlora', clip=1e-3,
                                       noise_multiplier=0.0))
  s0 = eng.initial_state()
  s1, _ = eng.run_repeat(copy(s0), 0)
  moved = np.sqrt(sum(np.sum((np.asarray(a) - np.asarray(b)) ** 2)
                      for a, b in zip(jax.tree.leaves(s1['server']['global']),
                                      jax.tree.leaves(s0['server']['global']))))
  assert 0 < moved <= 1e-3 * (1 + 1e-4)
