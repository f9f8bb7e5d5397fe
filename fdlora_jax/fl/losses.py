"""Loss terms shared by methods: token NLL, proximal pull, distillation
(KL divergences between two models' predictions), option-level
cross-entropy and its class-balanced (balanced softmax) form.

A method's ``loss(fwd, train, download, batch, rng)`` returns ``(mean loss,
target count)``; ``fwd`` (:class:`fdlora_jax.fl.engine.Forward`) applies the
frozen base with an adapter.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def mean_nll(logp: jax.Array, mask: jax.Array):
  """``-sum(logp * mask) / max(sum(mask), 1)``, the mean negative
  log-likelihood of the targets whose log-probabilities are ``logp`` (e.g.
  ``[B, A]`` from :meth:`Forward.target_log_probs`) where ``mask`` > 0, and
  the target count ``sum(mask)``."""
  count = jnp.sum(mask)
  return -jnp.sum(logp * mask) / jnp.maximum(count, 1.0), count


def token_nll(fwd, train: PyTree, download: PyTree, batch: dict, rng=None):
  """The plain method loss: :func:`mean_nll` of the answer tokens with the
  whole trained tree ``train`` as the adapter (``download`` unused)."""
  del download
  return fwd.nll(train, batch, rng)


def squared_distance(a: PyTree, b: PyTree) -> jax.Array:
  """``||a - b||^2`` over every leaf (float32)."""
  return sum(jnp.sum((x.astype(jnp.float32) - y.astype(jnp.float32)) ** 2)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def proximal(lora: PyTree, anchor: PyTree, lam: float) -> jax.Array:
  """``lam / 2 * ||lora - anchor||^2`` (FedProx, FedAMP)."""
  return 0.5 * lam * squared_distance(lora, jax.lax.stop_gradient(anchor))


# ---------------------------------------------------------------------------
# Option-level (class) losses over Forward.option_logits
# ---------------------------------------------------------------------------
# Added to every label count before the prior is taken: an option a client
# never saw gets prior ~1e-6 / n, i.e. its logit is shifted by about
# -14 - log(n) and it drops out of the softmax (as log(0) = -inf would in the
# reference implementation), while every number stays finite.
PRIOR_EPS = 1e-6


def label_log_prior(counts, eps: float = PRIOR_EPS) -> jax.Array:
  """``log p_o`` with ``p_o = (n_o + eps) / sum_o' (n_o' + eps)`` for label
  counts ``n [..., O]`` (float32)."""
  c = jnp.asarray(counts, jnp.float32) + eps
  return jnp.log(c) - jnp.log(jnp.sum(c, axis=-1, keepdims=True))


def option_ce(logits: jax.Array, labels: jax.Array, valid: jax.Array,
              log_prior=None):
  """Mean cross-entropy of ``labels [B]`` under ``logits [B, O]`` over the
  rows with ``valid [B]`` > 0, and the count of those rows.

  With ``log_prior [O]`` it is the balanced softmax (Ren et al., NeurIPS
  2020; FedRoD's generic-head loss): ``-log softmax(logits + log_prior)_y``.
  Training the logits through the prior-shifted softmax leaves the raw
  ``logits`` fit to a class-balanced distribution.
  """
  logits = logits.astype(jnp.float32)
  if log_prior is not None:
    logits = logits + log_prior
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  valid = valid.astype(jnp.float32)
  count = jnp.sum(valid)
  return jnp.sum(jnp.where(valid > 0, nll, 0.0)) / jnp.maximum(count, 1.0), \
      count


def balanced_softmax_ce(logits: jax.Array, labels: jax.Array,
                        valid: jax.Array, counts, eps: float = PRIOR_EPS):
  """:func:`option_ce` with the prior of the label ``counts [O]``."""
  return option_ce(logits, labels, valid, label_log_prior(counts, eps))


def _log1mexp(x: jax.Array) -> jax.Array:
  """``log(1 - exp(x))`` for ``x < 0``, stable at both ends."""
  return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)),
                   jnp.log1p(-jnp.exp(x)))


def bernoulli_kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
  """``KL(Bern(p) || Bern(q))`` elementwise, from ``log p`` and ``log q``.

  With ``p``, ``q`` two models' probabilities of the same target token, this
  is the KL between their next-token distributions coarsened to {the target,
  any other token}: a lower bound of the full-vocabulary KL that needs only
  the target log-probabilities. Probabilities are clipped to
  ``[0, 1 - 1e-6]`` so that both terms stay finite.
  """
  cap = jnp.log1p(-1e-6)
  logp = jnp.minimum(logp.astype(jnp.float32), cap)
  logq = jnp.minimum(logq.astype(jnp.float32), cap)
  p = jnp.exp(logp)
  return (p * (logp - logq)
          + (1.0 - p) * (_log1mexp(logp) - _log1mexp(logq)))


def categorical_kl(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
  """``KL(softmax(logits_p) || softmax(logits_q))`` over the last axis."""
  logp = jax.nn.log_softmax(logits_p.astype(jnp.float32), axis=-1)
  logq = jax.nn.log_softmax(logits_q.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
