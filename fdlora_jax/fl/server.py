"""Server side: the outer optimizer step on the mean pseudo-gradient.

The server sees only the global adapters the clients upload; its functions
take nothing else, so a personalized adapter cannot reach it.

    delta    = sum_i w_i (theta - theta_i) / sum_i w_i
    theta'   = theta - outer_opt(delta)

With ``optax.sgd(1.0)`` this is FedAvg; with ``optax.sgd(lr, momentum,
nesterov=True)`` it is DiLoCo's outer step, which FDLoRA uses.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


class ServerMetrics(NamedTuple):
  delta_norm: jax.Array     # L2 norm of the pseudo-gradient
  participants: jax.Array   # clients with non-zero weight


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


def make_server_update(outer: optax.GradientTransformation):
  """``server_update(global_lora, outer_state, uploads[N], weights[N])``.

  Returns ``(global_lora, outer_state, ServerMetrics)``; jitted.
  """

  def server_update(global_lora, outer_state, uploads, weights):
    delta = pseudo_gradient(global_lora, uploads, weights)
    updates, outer_state = outer.update(delta, outer_state, global_lora)
    new_global = optax.apply_updates(global_lora, updates)
    norm = jnp.sqrt(sum(jnp.sum(d.astype(jnp.float32) ** 2)
                        for d in jax.tree.leaves(delta)))
    return new_global, outer_state, ServerMetrics(norm, jnp.sum(weights > 0))

  return jax.jit(server_update)
