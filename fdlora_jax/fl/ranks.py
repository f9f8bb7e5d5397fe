"""The rank axis, shared by the methods that need more than one rank-r
adapter per client: per-client ranks (:class:`ClientRanks`) and a method's
own low-rank change to the effective base (:class:`Stack`).

**Per-client ranks.** Clients of different ranks run as one vmapped program:
every client's adapter is padded to the largest rank and the components at
and beyond its own rank are masked to exact zeros (:func:`lora.mask_rank`),
never trained (:meth:`ClientRanks.trainable`) and never counted on the wire
(:meth:`ClientRanks.upload_bytes`). With ``per_rank_scale`` a client of rank
``r_i`` applies its adapter at ``alpha / r_i``, as PEFT would; the model
applies every adapter at ``alpha / r`` of its config, so
:meth:`ClientRanks.applied` scales ``b`` by ``r / r_i``.

**A stack on the effective base.** FedEx-LoRA's residual and FLoRA's merged
aggregates change what a client trains on, but the frozen base is shared by
all clients and methods and is never copied or written. The change is kept
as low-rank factors in the method's server state, preallocated for every
round (``slots`` x ``width`` components, zeros until written), so the state
has one shape from round 0 to the end (one compile; checkpoints restore into
it). A client applies it by concatenating it with its adapter on the rank
axis (:func:`lora.concat_rank`): ``delta = stack + adapter`` exactly.
Why factors and not a dense ``[in, out]`` delta: docs/methods.md, "The rank
axis".
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import need

PyTree = Any


def cycled(values: Sequence[int], n: int) -> np.ndarray:
  """``[N]``: client ``i`` gets ``values[i % len(values)]``."""
  values = tuple(values)
  return np.asarray([values[i % len(values)] for i in range(n)], np.int32)


def validate_ranks(values, field: str) -> None:
  """``values`` must be a non-empty sequence of positive integers."""
  ranks = tuple(values) if not isinstance(values, str) else ()
  need(len(ranks) > 0 and all(isinstance(r, (int, np.integer)) and r > 0
                              for r in ranks),
       field, values, 'must be a non-empty sequence of positive integers')


@dataclasses.dataclass(frozen=True)
class ClientRanks:
  """``ranks [N]`` of clients that share one padded adapter shape."""
  ranks: np.ndarray            # [N] each client's rank
  model_rank: int              # the model's LoRA rank (its scale alpha / r)
  per_rank_scale: bool = True  # client i at alpha / r_i (PEFT)

  @property
  def width(self) -> int:
    """The padded rank every client's adapter has."""
    return int(np.max(self.ranks))

  def scale(self, rank) -> jax.Array:
    """``b``'s factor for an adapter of rank ``rank``: ``r / rank`` with
    ``per_rank_scale``, else 1."""
    if not self.per_rank_scale:
      return jnp.ones_like(jnp.asarray(rank, jnp.float32))
    return self.model_rank / jnp.asarray(rank, jnp.float32)

  def fresh(self, model, key: jax.Array, rank) -> PyTree:
    """One client's fresh adapter (random ``a``, zero ``b``) of rank
    ``rank`` padded to :attr:`width`; ``rank`` may be traced."""
    return lora_lib.mask_rank(lora_lib.init_rank(model, self.width, key), rank)

  def init(self, model, key: jax.Array) -> PyTree:
    """``[N]`` fresh adapters: one draw of rank :attr:`width`, masked to each
    client's rank (the same init wherever ranks agree)."""
    one = lora_lib.init_rank(model, self.width, key)
    return lora_lib.mask_rank(lora_lib.replicate(one, len(self.ranks)),
                              jnp.asarray(self.ranks))

  @staticmethod
  def mask(lora: PyTree, rank) -> PyTree:
    """``lora`` with the components from ``rank`` on exactly 0."""
    return lora_lib.mask_rank(lora, rank)

  @staticmethod
  def trainable(lora: PyTree, rank) -> PyTree:
    """A :class:`~fdlora_jax.fl.api.Trainable` mask: the first ``rank``
    components train, the padding stays bit-identical (zero)."""
    return lora_lib.rank_mask(lora, rank)

  def applied(self, lora: PyTree, rank) -> PyTree:
    """What the model applies for a client of rank ``rank``: masked, and at
    ``alpha / rank`` with ``per_rank_scale``."""
    return lora_lib.scale_b(lora_lib.mask_rank(lora, rank), self.scale(rank))

  def unapplied(self, lora: PyTree, rank) -> PyTree:
    """The inverse of :meth:`applied` on a masked adapter: the factors a
    client of rank ``rank`` holds so that it applies ``lora``."""
    return lora_lib.scale_b(lora_lib.mask_rank(lora, rank),
                            1.0 / self.scale(rank))

  # -- a client's trained tree {'lora', 'rank'}: the rank rides along, frozen
  @staticmethod
  def train(lora: PyTree, rank) -> dict:
    """The tree a client of rank ``rank`` trains: its padded adapter and
    its rank (float, outside the mask)."""
    return {'lora': lora, 'rank': jnp.asarray(rank).astype(jnp.float32)}

  def train_mask(self, train: dict) -> dict:
    """The :meth:`train` tree's trainable mask: the real components."""
    return {'lora': self.trainable(train['lora'], train['rank']),
            'rank': jnp.array(False)}

  def own(self, train: dict) -> PyTree:
    """What the model applies of a :meth:`train` tree."""
    return self.applied(train['lora'], train['rank'])

  def upload(self, train: dict) -> dict:
    """What a client sends of a :meth:`train` tree: the applied adapter and
    its rank, whose real components :meth:`upload_bytes` counts."""
    return {'lora': self.own(train),
            'rank': train['rank'].astype(jnp.int32)}

  @staticmethod
  def upload_bytes(upload: dict) -> jax.Array:
    """A ``wire_bytes`` of :meth:`upload`'s trees (downloads too)."""
    return lora_lib.rank_bytes(upload['lora'], upload['rank'])


@dataclasses.dataclass(frozen=True)
class Stack:
  """``slots`` x ``width`` low-rank components on the effective base: slot
  ``t`` holds what the server added at round ``t``."""
  slots: int
  width: int

  @property
  def rank(self) -> int:
    return self.slots * self.width

  def zeros(self, model) -> PyTree:
    """The empty stack (all components zero: no change to the base)."""
    return jax.tree.map(jnp.zeros_like, lora_lib.init_rank(
        model, max(self.rank, 1), jax.random.key(0)))

  def write(self, stack: PyTree, slot, part: PyTree) -> PyTree:
    """``stack`` with slot ``slot`` (traced) set to ``part`` (rank
    :attr:`width`)."""
    return lora_lib.write_rank(stack, part, jnp.asarray(slot) * self.width)

  @staticmethod
  def on(stack: PyTree, lora: PyTree) -> PyTree:
    """The adapter a client applies: the stack and its own ``lora``
    concatenated on the rank axis (``delta`` is their sum)."""
    return lora_lib.concat_rank(stack, lora)


def stacked(uploads: PyTree, weights: jax.Array) -> PyTree:
  """One adapter whose ``delta`` is ``sum_i p_i delta_i``: the clients'
  ``a`` side by side and ``p_i b_i`` (``p`` the normalised ``weights``) on
  the rank axis, rank ``N r``. A zero-weight upload (even a NaN one) adds
  exact zeros."""
  total = jnp.sum(weights)
  p = jnp.where(total > 0, weights / jnp.maximum(total, 1e-30), 0.0)
  used = p > 0

  def node(n):
    keep = lambda x: jnp.where(
        used.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0)
    return {'a': keep(n['a']),
            'b': keep(n['b']) * p.reshape((-1,) + (1,) * (n['b'].ndim - 1)
                                          ).astype(n['b'].dtype)}
  return lora_lib.clients_on_rank(lora_lib.map_adapters(node, uploads))


def _truncated_factors(a: np.ndarray, b: np.ndarray, rank: int
                       ) -> tuple[np.ndarray, np.ndarray]:
  """:func:`truncated` of one node, in numpy (float64): ``a [.., in, K]``,
  ``b [.., K, out]`` -> ``[.., in, rank]``, ``[.., rank, out]``."""
  q, r = np.linalg.qr(np.asarray(a, np.float64))       # [.., in, k1], [.., k1, K]
  u, sv, vt = np.linalg.svd(r @ np.asarray(b, np.float64),
                            full_matrices=False)       # [.., k1, k], [.., k, out]
  k = sv.shape[-1]
  if k < rank:
    u = np.pad(u, [(0, 0)] * (u.ndim - 1) + [(0, rank - k)])
    vt = np.pad(vt, [(0, 0)] * (vt.ndim - 2) + [(0, rank - k), (0, 0)])
    sv = np.pad(sv, [(0, 0)] * (sv.ndim - 1) + [(0, rank - k)])
  sq = np.sqrt(sv[..., :rank])
  left = q @ (u[..., :rank] * sq[..., None, :])
  right = sq[..., :, None] * vt[..., :rank, :]
  return left.astype(a.dtype), right.astype(b.dtype)


def truncated(lora: PyTree, rank: int) -> PyTree:
  """The best rank-``rank`` approximation of ``lora``'s ``delta = a b``
  (Eckart-Young), as factors of rank ``rank`` sorted by singular value
  (largest first): ``a = U_k sqrt(S_k)``, ``b = sqrt(S_k) V_k^T``, so the
  first ``r`` components are the best rank-``r`` approximation for every
  ``r <= rank``. With ``a = Q R`` (QR), ``a b = Q (R b)`` and the SVD of the
  small ``R b`` (``K x out``, ``K`` the stacked rank) gives ``U = Q U'``:
  no ``[in, out]`` matrix is formed. Components beyond the product's rank
  are zero.

  The factorisation runs on the host in numpy (float64) through
  ``jax.pure_callback``: XLA's CPU LAPACK calls hung when two of them ran
  at once inside one jitted function (every thread waiting, no CPU use;
  jax 0.10.2 on the 2-core machine, two ``jnp.linalg.qr`` of ``[30, 576,
  40]`` suffice), and a server runs one per adapted matrix. The matrices are
  small (``K`` rows), once per round."""
  def node(n):
    a, b = n['a'], n['b']
    shapes = (jax.ShapeDtypeStruct(a.shape[:-1] + (rank,), a.dtype),
              jax.ShapeDtypeStruct(b.shape[:-2] + (rank, b.shape[-1]),
                                   b.dtype))
    left, right = jax.pure_callback(
        lambda x, y: _truncated_factors(x, y, rank), shapes, a, b,
        vmap_method='sequential')
    return {'a': left, 'b': right}
  return lora_lib.map_adapters(node, lora)


def delta_norm(lora) -> jax.Array:
  """``sqrt(sum ||a b||_F^2)`` over every node and layer, from the ``r x r``
  Gram matrices (no ``[in, out]`` matrix is formed)."""
  total = 0.0
  for node in jax.tree.leaves(lora, is_leaf=lambda x: isinstance(x, dict)
                              and set(x) == {'a', 'b'}):
    ga = jnp.einsum('...ir,...is->...rs', node['a'], node['a'])
    gb = jnp.einsum('...ro,...so->...rs', node['b'], node['b'])
    total = total + jnp.sum(ga * gb)
  return jnp.sqrt(jnp.maximum(total, 0.0))
