"""The rank axis (fdlora_jax/fl/ranks.py and its helpers in lora.py):
per-client ranks, stacking clients on the rank axis, a preallocated stack,
bytes of the real components, and the truncated SVD, against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import ConfigError
from fdlora_jax.fl import ranks as ranks_lib
from fdlora_jax.fl.ranks import ClientRanks, Stack
from tests.helpers import (LCFG, assert_deltas_close, leaves, noise,
                           weighted_delta)


def adapters(model, n, rank, seed=0):
  """``[n]`` random adapters (``b`` non-zero) of rank ``rank``."""
  one = lora_lib.init_rank(model, rank, jax.random.key(seed))
  return noise(lora_lib.replicate(one, n), seed + 1)


def test_cycled_and_validated():
  np.testing.assert_array_equal(ranks_lib.cycled((4, 8), 5), [4, 8, 4, 8, 4])
  for bad in ((), (4, 0), (2.5,), 'abc'):
    with pytest.raises(ConfigError, match='x.ranks'):
      ranks_lib.validate_ranks(bad, 'x.ranks')
  ranks_lib.validate_ranks((1, 16), 'x.ranks')


def test_client_ranks_apply_each_rank_at_its_own_scale(tiny):
  model, _ = tiny
  cr = ClientRanks(np.asarray([1, 2, 4]), LCFG.rank)
  loras = cr.init(model, jax.random.key(0))
  assert lora_lib.rank_of(loras) == cr.width == 4
  loras = cr.mask(noise(loras, 3), jnp.asarray(cr.ranks))
  applied = cr.applied(loras, jnp.asarray(cr.ranks))
  got = lora_lib.delta_weights(applied, LCFG.scale)
  for i, r in enumerate(cr.ranks):
    own = lora_lib.delta_weights(jax.tree.map(lambda x: x[i], loras),
                                 LCFG.alpha / r)
    for p in own:
      np.testing.assert_allclose(got[p][i], own[p], rtol=1e-5, atol=1e-6)
  # unapplied undoes applied; the padding stays exactly zero.
  back = cr.unapplied(applied, jnp.asarray(cr.ranks))
  for x, y in zip(leaves(back), leaves(loras)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  trainable = cr.trainable(loras, jnp.asarray(cr.ranks))
  for x, m in zip(leaves(loras), leaves(trainable)):
    assert not np.any(np.where(np.broadcast_to(m, x.shape), 0.0, x))
  flat = ClientRanks(np.asarray([1, 2]), LCFG.rank, per_rank_scale=False)
  np.testing.assert_array_equal(flat.scale(jnp.asarray([1, 2])), [1.0, 1.0])


def test_rank_bytes_count_the_real_components(tiny):
  model, _ = tiny
  padded = lora_lib.init_rank(model, 8, jax.random.key(0))
  for r in (0, 3, 8):
    sliced = lora_lib.map_adapters(
        lambda n, r=r: {'a': n['a'][..., :r], 'b': n['b'][..., :r, :]}, padded)
    assert int(lora_lib.rank_bytes(padded, r)) == lora_lib.num_bytes(sliced)
  assert int(ClientRanks.upload_bytes({'lora': padded, 'rank': 8})) == (
      lora_lib.num_bytes(padded))
  parts = lora_lib.split_factors(padded)
  joined = lora_lib.join_factors(*parts)
  for x, y in zip(leaves(joined), leaves(padded)):
    np.testing.assert_array_equal(x, y)
  assert lora_lib.num_bytes(parts[0]) + lora_lib.num_bytes(parts[1]) == (
      lora_lib.num_bytes(padded))


def test_stacked_is_the_weighted_sum_of_the_products(tiny):
  """``stacked`` puts the clients side by side on the rank axis: its delta
  is ``sum_i p_i a_i b_i`` exactly, and a zero-weight NaN upload adds 0."""
  model, _ = tiny
  uploads = adapters(model, 3, 2)
  w = jnp.asarray([1.0, 2.0, 5.0])
  both = ranks_lib.stacked(uploads, w)
  assert lora_lib.rank_of(both) == 6
  assert_deltas_close(lora_lib.delta_weights(both, 1.0),
                      weighted_delta(uploads, w))
  poisoned = jax.tree.map(lambda x: x.at[1].set(jnp.nan), uploads)
  w0 = jnp.asarray([1.0, 0.0, 5.0])
  clean = ranks_lib.stacked(poisoned, w0)
  assert all(np.all(np.isfinite(x)) for x in leaves(clean))
  assert_deltas_close(lora_lib.delta_weights(clean, 1.0),
                      weighted_delta(uploads, w0))


def test_stack_slots_write_in_place_and_apply_with_the_adapter(tiny):
  model, _ = tiny
  stack = Stack(slots=3, width=4)
  empty = stack.zeros(model)
  assert lora_lib.rank_of(empty) == 12
  assert not any(np.any(x) for x in leaves(empty))
  part = adapters(model, 1, 4, seed=5)
  part = jax.tree.map(lambda x: x[0], part)
  written = jax.jit(stack.write)(empty, jnp.int32(1), part)
  for path in lora_lib.adapted_paths(part):
    a = np.asarray(lora_lib._get(written, path)['a'])
    b = np.asarray(lora_lib._get(written, path)['b'])
    np.testing.assert_array_equal(a[..., 4:8],
                                  lora_lib._get(part, path)['a'])
    np.testing.assert_array_equal(b[..., 4:8, :],
                                  lora_lib._get(part, path)['b'])
    assert not np.any(a[..., :4]) and not np.any(a[..., 8:])
  own = jax.tree.map(lambda x: x[0], adapters(model, 1, 4, seed=9))
  on = Stack.on(written, own)
  want = {p: np.asarray(d) + np.asarray(lora_lib.delta_weights(own, 1.0)[p])
          for p, d in lora_lib.delta_weights(part, 1.0).items()}
  assert_deltas_close(lora_lib.delta_weights(on, 1.0), want)


@pytest.mark.parametrize('rank', [1, 3, 6, 9])
def test_truncated_is_the_best_low_rank_approximation(tiny, rank):
  """Eckart-Young against numpy's SVD of the dense ``a b``, per layer; the
  first ``r`` components are the best rank-``r`` approximation for every
  ``r`` up to ``rank``; beyond the product's rank (6) the rest is zero."""
  model, _ = tiny
  lora = jax.tree.map(lambda x: x[0], adapters(model, 1, 6, seed=2))
  got = ranks_lib.truncated(lora, rank)
  assert lora_lib.rank_of(got) == rank
  for path in lora_lib.adapted_paths(lora):
    node = lora_lib._get(lora, path)
    dense = np.einsum('lir,lro->lio', np.asarray(node['a'], np.float64),
                      np.asarray(node['b'], np.float64))
    u, s, vt = np.linalg.svd(dense, full_matrices=False)
    out = lora_lib._get(got, path)
    for r in range(1, rank + 1):
      best = np.einsum('lir,lr,lro->lio', u[..., :r], s[..., :r],
                       vt[..., :r, :])
      mine = np.einsum('lir,lro->lio', np.asarray(out['a'][..., :r]),
                       np.asarray(out['b'][..., :r, :]))
      np.testing.assert_allclose(mine, best, rtol=1e-4, atol=1e-4,
                                 err_msg=f'{path} r={r}')
    if rank > 6:
      assert not np.any(np.asarray(out['a'][..., 6:]))
