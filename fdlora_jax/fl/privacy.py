"""Client-level differential privacy of what the clients upload.

Off by default (``config.dp.enabled``). Per training repeat whose phase has a
server, the engine (:class:`fdlora_jax.fl.engine.Engine`) applies
:func:`privatize` to the ``[N, ...]`` uploads before the server sees them:

    update_i  = upload_i - reference_i           (reference: what it downloaded)
    clipped_i = reference_i + update_i * min(1, C / ||update_i||)
    upload_i' = clipped_i + z,   z ~ N(0, (sigma C max_i p_i)^2 I), one draw

``p_i = w_i / sum_j w_j`` are the server's weights, so ``max_i p_i C`` bounds
how far one client's (clipped) update moves their weighted mean (``C / n``
with uniform weights). The same ``z`` is added to every upload, so a server
that reads the uploads only through their weighted mean sees that mean plus
``z``: the Gaussian mechanism on the mean, with noise multiplier ``sigma``,
as in DP-FedAvg (McMahan et al., 2018) and Flower's server-side DP wrappers.
Everything the server computes from it (an outer Nesterov step, a unit
direction) is post-processing.

A phase opts in with ``Phase.dp_reference``: what its upload is measured
against, from the client's state before the repeat and the download. It
must be known to the server, since the mean of the references passes
unclipped: :func:`downloaded` (the download, or zero when nothing was
downloaded), or a starting point every client shares (FDLoRA's stage 1
starts every personal adapter from the server's initial adapter). Methods whose server reads the uploads otherwise (a per-client
mix, products of factors, SVD, stacking) do not set it, and a run with
``dp.enabled`` refuses them: noise on a mean would not protect what they
compute.

Adaptive clipping (Andrew et al., 2021, "Differentially private learning
with adaptive clipping"): after each private round ``C <- C exp(-eta (b -
gamma))``, ``b`` the noisy fraction of clients whose update norm was at most
``C`` (count noise ``sigma_b``); the update noise then has multiplier
``(sigma^-2 - (2 sigma_b)^-2)^-1/2`` so that both releases together are one
Gaussian mechanism of multiplier ``sigma``.

Accounting: every client takes part in every round (no sampling), so ``T``
private rounds are ``T`` compositions of a Gaussian mechanism of multiplier
``sigma``; :func:`epsilon` asks ``dp_accounting``'s RDP accountant for the
epsilon at ``dp.delta``. Neighbouring datasets differ in one client's whole
data (add or remove), the server weights held fixed.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from fdlora_jax.errors import need

PyTree = Any


def config() -> ml_collections.ConfigDict:
  """``config.dp``: off by default."""
  c = ml_collections.ConfigDict()
  c.enabled = False
  c.clip = 1.0              # C: the norm each client's update is clipped to
  c.noise_multiplier = 1.0  # sigma: noise std / (C max_i p_i) on the mean
  # > 0: choose sigma so that the run's private rounds spend this epsilon at
  # `delta` (noise_multiplier is then ignored).
  c.epsilon = 0.0
  c.delta = 1e-5
  c.adaptive = False        # adapt C towards the target_quantile of norms
  c.target_quantile = 0.5   # gamma
  c.clip_lr = 0.2           # eta, on log C
  c.count_noise = 1.0       # sigma_b: std of the noise on the unclipped count
  return c


def validate(dp: ml_collections.ConfigDict) -> None:
  """Every ``config.dp`` field, naming the first bad one."""
  need(isinstance(dp.enabled, bool), 'dp.enabled', dp.enabled,
       'must be True or False')
  if not dp.enabled:
    return
  need(dp.clip > 0, 'dp.clip', dp.clip, 'must be > 0')
  need(dp.noise_multiplier >= 0, 'dp.noise_multiplier', dp.noise_multiplier,
       'must be >= 0 (0: clipping only, no privacy guarantee)')
  need(dp.epsilon >= 0, 'dp.epsilon', dp.epsilon,
       'must be >= 0 (0: use dp.noise_multiplier)')
  need(0 < dp.delta < 1, 'dp.delta', dp.delta, 'must be in (0, 1)')
  need(0 < dp.target_quantile < 1, 'dp.target_quantile', dp.target_quantile,
       'must be in (0, 1)')
  need(dp.clip_lr >= 0, 'dp.clip_lr', dp.clip_lr, 'must be >= 0')
  need(dp.count_noise > 0, 'dp.count_noise', dp.count_noise, 'must be > 0')


def downloaded(client: PyTree, download: PyTree) -> PyTree:
  """``Phase.dp_reference`` of a phase whose upload has its download's
  shapes: the update is the upload minus the download (minus zero when the
  phase downloads nothing)."""
  return download


# ---------------------------------------------------------------------------
# Accounting
# ---------------------------------------------------------------------------
def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
  """Epsilon at ``delta`` after ``rounds`` Gaussian mechanisms of multiplier
  ``noise_multiplier`` (RDP accountant of ``dp_accounting``); ``inf`` for no
  noise, 0 for no rounds."""
  if rounds <= 0:
    return 0.0
  if noise_multiplier <= 0:
    return math.inf
  import dp_accounting
  from dp_accounting import rdp
  accountant = rdp.RdpAccountant()
  accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), rounds)
  return float(accountant.get_epsilon(delta))


def noise_for_epsilon(target: float, rounds: int, delta: float) -> float:
  """The smallest noise multiplier whose :func:`epsilon` over ``rounds`` is
  at most ``target`` (bisection on a log scale, to 1e-4 relative)."""
  if rounds <= 0:
    return 0.0
  lo, hi = 1e-3, 1.0
  while epsilon(hi, rounds, delta) > target:
    lo, hi = hi, hi * 2
    if hi > 1e6:
      raise ValueError(f'no noise multiplier reaches epsilon {target}')
  while hi / lo > 1 + 1e-4:
    mid = math.sqrt(lo * hi)
    lo, hi = (mid, hi) if epsilon(mid, rounds, delta) > target else (lo, mid)
  return hi


def update_noise(noise_multiplier: float, count_noise: float,
                 adaptive: bool) -> float:
  """The multiplier of the noise on the mean update: ``sigma`` itself, or
  with adaptive clipping the share left after the count's release."""
  if not adaptive or noise_multiplier == 0:
    return noise_multiplier
  rest = noise_multiplier ** -2 - (2 * count_noise) ** -2
  if rest <= 0:
    raise ValueError('count noise too small for the noise multiplier')
  return rest ** -0.5


# ---------------------------------------------------------------------------
# The mechanism
# ---------------------------------------------------------------------------
def update_norms(upload: PyTree, reference: Optional[PyTree]) -> jax.Array:
  """``[N]``: the norm of each client's update (upload - reference)."""
  total = 0.0
  refs = (jax.tree.leaves(reference) if reference is not None
          else [None] * len(jax.tree.leaves(upload)))
  for u, r in zip(jax.tree.leaves(upload), refs):
    d = u.astype(jnp.float32) - (0.0 if r is None else r.astype(jnp.float32))
    total = total + jnp.sum(d.reshape(d.shape[0], -1) ** 2, axis=1)
  return jnp.sqrt(total)


def clip_updates(upload: PyTree, reference: Optional[PyTree], clip: jax.Array
                 ) -> tuple[PyTree, jax.Array]:
  """Each client's update clipped to norm ``clip``: ``(reference + update *
  min(1, clip / ||update||), norms [N])``. ``reference`` has the upload's
  structure, or is None (zero). A client can apply it to its own upload
  (client-side clipping, as a deployment does)."""
  norms = update_norms(upload, reference)
  factor = jnp.minimum(1.0, clip / jnp.maximum(norms, 1e-30))
  leaves, tree = jax.tree.flatten(upload)
  refs = (jax.tree.leaves(reference) if reference is not None
          else [None] * len(leaves))
  out = []
  for u, r in zip(leaves, refs):
    base = 0.0 if r is None else r.astype(jnp.float32)
    f = factor.reshape((-1,) + (1,) * (u.ndim - 1))
    out.append((base + (u.astype(jnp.float32) - base) * f).astype(u.dtype))
  return jax.tree.unflatten(tree, out), norms


def add_noise(uploads: PyTree, weights: jax.Array, clip: jax.Array,
              noise_multiplier: jax.Array, key: jax.Array
              ) -> tuple[PyTree, jax.Array]:
  """One Gaussian draw of std ``noise_multiplier * clip * max_i p_i`` added
  to every upload (the server's part): ``(uploads, std)``."""
  total = jnp.sum(weights)
  share = jnp.max(jnp.where(total > 0, weights / jnp.maximum(total, 1e-30),
                            0.0))
  std = noise_multiplier * clip * share
  leaves, tree = jax.tree.flatten(uploads)
  keys = jax.random.split(key, max(len(leaves), 1))
  out = [(u.astype(jnp.float32)
          + (jax.random.normal(k, u.shape[1:], jnp.float32) * std)[None]
          ).astype(u.dtype) for u, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, out), std


def privatize(upload: PyTree, reference: Optional[PyTree], weights: jax.Array,
              clip: jax.Array, noise_multiplier: jax.Array, key: jax.Array
              ) -> tuple[PyTree, dict]:
  """:func:`clip_updates` then :func:`add_noise` (module docstring).

  Returns ``(uploads, {'norms': [N], 'noise_std': []})``."""
  clipped, norms = clip_updates(upload, reference, clip)
  noisy, std = add_noise(clipped, weights, clip, noise_multiplier, key)
  return noisy, {'norms': norms, 'noise_std': std}


def adapt_clip(clip: jax.Array, norms: jax.Array, weights: jax.Array,
               target_quantile: float, clip_lr: float, count_noise: float,
               key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(C', b)``: the geometric update of the clipping norm from the noisy
  fraction ``b`` of participating clients whose norm was at most ``C``."""
  taking = weights > 0
  n = jnp.maximum(jnp.sum(taking), 1)
  below = jnp.sum(taking & (norms <= clip))
  b = (below + count_noise * jax.random.normal(key, (), jnp.float32)) / n
  return clip * jnp.exp(-clip_lr * (b - target_quantile)), b
