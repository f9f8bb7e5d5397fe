"""Server side: the rules the methods' server functions share.

Every function takes the uploads (``[N, ...]``) and weights, never a
client's private state. Non-finite clients have weight 0 and never enter a
sum.

    delta    = sum_i w_i (theta - theta_i) / sum_i w_i
    theta'   = theta - outer_opt(delta)

:func:`mean_step` is FedAvg's server (``outer_opt`` a plain step of
``lr``); :func:`outer_step` takes any optax optimizer, e.g. ``optax.sgd(lr,
momentum, nesterov=True)``, DiLoCo's outer step, which FDLoRA uses;
:func:`replace_step` is for a server that sets its state to a new value.
All report :func:`step_metrics`. :func:`validate_weighting` checks a
method's ``weighting`` field; :func:`weighting_config` is the block of a
method that has no other.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fdlora_jax.errors import need

PyTree = Any
# How the server weights the clients: equally, or by training examples.
WEIGHTINGS = ('uniform', 'examples')


def validate_weighting(c, name: str) -> None:
  """``config.<name>.weighting`` must be one of :data:`WEIGHTINGS`."""
  value = c[name].weighting
  need(value in WEIGHTINGS, f'{name}.weighting', value,
       "must be 'uniform' or 'examples'")


def weighting_config() -> ml_collections.ConfigDict:
  """The config block of a method whose only field is ``weighting``
  (``'examples'``, as FedAvg)."""
  c = ml_collections.ConfigDict()
  c.weighting = 'examples'  # server mean: 'examples' (as FedAvg) | 'uniform'
  return c


def outer_optimizer(lr: float, momentum: float, nesterov: bool = True
                    ) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum; ``momentum=0`` is plain SGD."""
  return optax.sgd(lr, momentum=momentum or None,
                   nesterov=bool(nesterov and momentum))


def pseudo_gradient(global_lora: PyTree, uploads: PyTree,
                    weights: jax.Array) -> PyTree:
  """``sum_i w_i (theta - theta_i) / sum_i w_i``; zero if all weights are 0."""
  total = jnp.sum(weights)
  norm = jnp.where(total > 0, weights / jnp.maximum(total, 1e-30), 0.0)

  def mean_delta(g, u):
    w = norm.reshape((-1,) + (1,) * (u.ndim - 1)).astype(u.dtype)
    # where() keeps a NaN in a zero-weight upload out of the sum.
    return jnp.sum(jnp.where(w > 0, (g[None] - u) * w, 0.0), axis=0)
  return jax.tree.map(mean_delta, global_lora, uploads)


def weighted_mean(uploads: PyTree, weights: jax.Array) -> PyTree:
  """``sum_i w_i u_i / sum_i w_i`` leafwise; a zero-weight upload (even a
  NaN one) never enters the sum."""
  total = jnp.sum(weights)
  norm = jnp.where(total > 0, weights / jnp.maximum(total, 1e-30), 0.0)

  def mean(u):
    w = norm.reshape((-1,) + (1,) * (u.ndim - 1)).astype(u.dtype)
    return jnp.sum(jnp.where(w > 0, u * w, 0.0), axis=0)
  return jax.tree.map(mean, uploads)


def tree_norm(tree: PyTree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(x.astype(jnp.float32) ** 2)
                      for x in jax.tree.leaves(tree)))


def step_metrics(delta: PyTree, weights: jax.Array) -> dict:
  """What an averaging server reports: ``delta_norm``, the norm of the
  server's change, and ``participants``, the clients with weight > 0."""
  return {'delta_norm': tree_norm(delta), 'participants': jnp.sum(weights > 0)}


def mean_step(theta: PyTree, uploads: PyTree, weights: jax.Array,
              lr: float = 1.0) -> tuple[PyTree, dict]:
  """FedAvg's server: ``theta - lr * delta`` with ``delta`` the
  :func:`pseudo_gradient`; with ``lr = 1`` the weighted mean of the uploads
  (``theta`` itself when every weight is 0). Returns ``(theta',``
  :func:`step_metrics` ``)``."""
  delta = pseudo_gradient(theta, uploads, weights)
  new = jax.tree.map(lambda x, d: x - lr * d, theta, delta)
  return new, step_metrics(delta, weights)


def replace_step(theta: PyTree, new: PyTree, weights: jax.Array
                 ) -> tuple[PyTree, dict]:
  """A server that sets its state to ``new`` (e.g. a :func:`weighted_mean`):
  ``(new,`` :func:`step_metrics` of ``theta - new`` ``)``."""
  delta = jax.tree.map(lambda x, y: x - y, theta, new)
  return new, step_metrics(delta, weights)


def outer_step(outer: optax.GradientTransformation, global_lora: PyTree,
               outer_state: PyTree, uploads: PyTree, weights: jax.Array
               ) -> tuple[PyTree, PyTree, dict]:
  """One outer step on the mean pseudo-gradient of ``uploads [N, ...]``.

  Returns ``(global_lora, outer_state,`` :func:`step_metrics` ``)``.
  """
  delta = pseudo_gradient(global_lora, uploads, weights)
  updates, outer_state = outer.update(delta, outer_state, global_lora)
  new_global = optax.apply_updates(global_lora, updates)
  return new_global, outer_state, step_metrics(delta, weights)


def flatten_clients(uploads: PyTree) -> jax.Array:
  """``[N, D]``: each client's upload as one float32 vector (all leaves)."""
  return jnp.concatenate([x.reshape(x.shape[0], -1).astype(jnp.float32)
                          for x in jax.tree.leaves(uploads)], axis=1)


def pairwise_cosine(flat: jax.Array) -> jax.Array:
  """``[N, N]`` cosine similarities of the rows of ``flat [N, D]`` (0 for a
  zero row; a non-finite row is treated as zero)."""
  flat = jnp.where(jnp.isfinite(flat), flat, 0.0)
  norm = jnp.sqrt(jnp.sum(flat * flat, axis=1, keepdims=True))
  unit = flat / jnp.maximum(norm, 1e-30)
  return unit @ unit.T


def mix(uploads: PyTree, matrix: jax.Array) -> PyTree:
  """``out_i = sum_j matrix[i, j] upload_j`` leafwise (``[N, ...]`` ->
  ``[M, ...]``); an upload whose column is all zero (even a NaN one) never
  enters a sum."""
  used = jnp.any(matrix != 0, axis=0)                              # [N]

  def one(u):
    keep = used.reshape((-1,) + (1,) * (u.ndim - 1))
    clean = jnp.where(keep, u, 0.0).astype(jnp.float32)
    return jnp.einsum('ij,j...->i...', matrix.astype(jnp.float32),
                      clean).astype(u.dtype)
  return jax.tree.map(one, uploads)


def delta_cosine(uploads: PyTree) -> jax.Array:
  """``[N, N]`` cosine similarities of the clients' weight deltas
  ``delta_W = a b`` (all adapted matrices, all layers, as one vector), from
  the ``r x r`` Gram matrices: ``<a_i b_i, a_j b_j> = sum((a_i^T a_j) *
  (b_i b_j^T))``, never forming an ``[in, out]`` matrix. The LoRA scale
  cancels. A non-finite adapter is treated as zero."""
  clean = lambda x: jnp.where(jnp.isfinite(x), x, 0.0).astype(jnp.float32)
  inner = 0.0
  nodes = jax.tree.leaves(uploads, is_leaf=lambda n: isinstance(n, dict)
                          and set(n) == {'a', 'b'})
  for node in nodes:
    a, b = clean(node['a']), clean(node['b'])        # [N, L, in, r], [N, L, r, out]
    ga = jnp.einsum('ilmr,jlms->ijlrs', a, a)
    gb = jnp.einsum('ilrn,jlsn->ijlrs', b, b)
    inner = inner + jnp.sum(ga * gb, axis=(2, 3, 4))
  norm = jnp.sqrt(jnp.maximum(jnp.diagonal(inner), 0.0))
  return inner / jnp.maximum(norm[:, None] * norm[None, :], 1e-30)
