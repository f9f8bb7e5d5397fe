"""Loss terms shared by methods: token NLL, proximal pull, distillation.

A method's ``loss(fwd, train, download, batch, rng)`` returns ``(mean loss,
target count)``; ``fwd`` (:class:`fdlora_jax.fl.engine.Forward`) applies the
frozen base with an adapter.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def token_nll(fwd, lora: PyTree, batch: dict, rng=None):
  """Mean next-token NLL of the answer tokens with ``lora``, and the count."""
  return fwd.nll(lora, batch, rng)


def squared_distance(a: PyTree, b: PyTree) -> jax.Array:
  """``||a - b||^2`` over every leaf (float32)."""
  return sum(jnp.sum((x.astype(jnp.float32) - y.astype(jnp.float32)) ** 2)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def proximal(lora: PyTree, anchor: PyTree, lam: float) -> jax.Array:
  """``lam / 2 * ||lora - anchor||^2`` (FedProx, FedAMP)."""
  return 0.5 * lam * squared_distance(lora, jax.lax.stop_gradient(anchor))
