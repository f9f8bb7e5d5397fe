"""The shared server rules (fdlora_jax/fl/server.py): FedAvg's mean step, the
step that replaces the state, their metrics, and the weighting check, as
exact identities on tiny trees whose every number is a power-of-two
fraction (so float32 arithmetic is exact)."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fdlora_jax.errors import ConfigError
from fdlora_jax.fl import server

NAN = float('nan')


def tree(x, y):
  return {'x': jnp.asarray(x, jnp.float32), 'y': jnp.asarray(y, jnp.float32)}


def exact(got, want):
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))


# Three clients; the third is non-finite and has weight 0.
THETA = tree([0.0, 1.0], [[0.0]])
UPLOADS = tree([[4.0, 1.0], [8.0, 1.0], [NAN, 1.0]], [[[2.0]], [[6.0]], [[NAN]]])


def test_mean_step_is_the_weighted_mean_and_skips_a_zero_weight_nan():
  new, metrics = server.mean_step(THETA, UPLOADS, jnp.asarray([1.0, 3.0, 0.0]))
  # By hand: 1/4 u_0 + 3/4 u_1; the NaN client never enters the sum.
  exact(new, tree([0.25 * 4 + 0.75 * 8, 1.0], [[0.25 * 2 + 0.75 * 6]]))
  # delta = theta - mean = (-7, 0) and (-5): its norm is sqrt(49 + 25).
  assert float(metrics['delta_norm']) == np.float32(np.sqrt(74.0))
  assert int(metrics['participants']) == 2


def test_mean_step_weights_need_not_sum_to_one():
  a, ma = server.mean_step(THETA, UPLOADS, jnp.asarray([1.0, 3.0, 0.0]))
  b, mb = server.mean_step(THETA, UPLOADS, jnp.asarray([2.0, 6.0, 0.0]))
  exact(a, b)
  assert float(ma['delta_norm']) == float(mb['delta_norm'])


def test_mean_step_with_a_server_lr_moves_part_of_the_way():
  new, metrics = server.mean_step(THETA, UPLOADS,
                                  jnp.asarray([1.0, 3.0, 0.0]), lr=0.5)
  exact(new, tree([3.5, 1.0], [[2.5]]))          # theta + 0.5 (mean - theta)
  # The metric is the pseudo-gradient's norm, whatever the lr.
  assert float(metrics['delta_norm']) == np.float32(np.sqrt(74.0))


def test_mean_step_with_every_weight_zero_keeps_the_state():
  new, metrics = server.mean_step(THETA, UPLOADS, jnp.zeros(3))
  exact(new, THETA)
  assert float(metrics['delta_norm']) == 0.0
  assert int(metrics['participants']) == 0


def test_outer_step_with_plain_sgd_is_the_mean_step():
  outer = optax.sgd(1.0)
  w = jnp.asarray([1.0, 3.0, 0.0])
  g, _, metrics = server.outer_step(outer, THETA, outer.init(THETA), UPLOADS,
                                    w)
  want, want_metrics = server.mean_step(THETA, UPLOADS, w)
  exact(g, want)
  assert metrics.keys() == want_metrics.keys() == {'delta_norm',
                                                   'participants'}
  for k in metrics:
    assert float(metrics[k]) == float(want_metrics[k])


def test_replace_step_reports_the_change_and_the_participants():
  new_state = tree([3.0, 1.0], [[4.0]])
  new, metrics = server.replace_step(THETA, new_state,
                                     jnp.asarray([0.5, 0.0, 0.5]))
  exact(new, new_state)
  assert float(metrics['delta_norm']) == 5.0       # ||(-3, 0, -4)||
  assert int(metrics['participants']) == 2


def test_step_metrics_counts_only_positive_weights():
  m = server.step_metrics(tree([3.0], [[-4.0]]),
                          jnp.asarray([0.0, 2.0, 1e-9, 0.0]))
  assert float(m['delta_norm']) == 5.0
  assert int(m['participants']) == 2


@pytest.mark.parametrize('value', ['uniform', 'examples'])
def test_validate_weighting_accepts_both_rules(value):
  c = ml_collections.ConfigDict({'fedavg': {'weighting': value}})
  server.validate_weighting(c, 'fedavg')


def test_validate_weighting_names_the_field_and_the_choices():
  c = ml_collections.ConfigDict({'fedrep': {'weighting': 'clients'}})
  with pytest.raises(ConfigError) as e:
    server.validate_weighting(c, 'fedrep')
  assert str(e.value) == ("config.fedrep.weighting='clients': must be "
                          "'uniform' or 'examples'")
