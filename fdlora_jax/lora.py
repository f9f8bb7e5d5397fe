"""LoRA adapters as plain pytrees.

A LoRA pytree mirrors the model's module tree and holds, for every targeted
projection, ``{'a': [L, in, r], 'b': [L, r, out]}`` (``L`` is the stacked layer
axis). ``a`` is PEFT's ``lora_A.weight`` transposed and ``b`` is
``lora_B.weight`` transposed, so ``delta_W = a @ b * alpha / r`` in Flax's
``[in, out]`` kernel layout. A fresh adapter has random ``a`` and zero ``b``,
so it leaves the model unchanged.

Many clients' adapters are the same pytree with a leading client axis
``[N, L, ...]`` (:func:`stack`, :func:`replicate`), the form that
``jax.vmap`` and the federated algorithms use.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fdlora_jax.errors import ConfigError

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank r, alpha (scale alpha / r), dropout on the LoRA input, targets."""
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ('q_proj', 'v_proj')

  def __post_init__(self):
    if isinstance(self.targets, str):
      raise ConfigError(f'lora.targets must be a sequence of names, got the '
                        f'string {self.targets!r}')
    # Canonical order, so configs compare equal however targets were listed.
    object.__setattr__(self, 'targets', tuple(sorted(set(self.targets))))
    if self.rank <= 0:
      raise ConfigError(f'lora.rank must be > 0, got {self.rank}')
    if self.alpha <= 0:
      raise ConfigError(f'lora.alpha must be > 0, got {self.alpha}')
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f'lora.dropout must be in [0, 1), got {self.dropout}')
    if not self.targets:
      raise ConfigError('lora.targets must name at least one projection')

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def validate(self, known: Sequence[str]) -> None:
    unknown = [t for t in self.targets if t not in known]
    if unknown:
      raise ConfigError(f'lora.targets {unknown} are not projections of this '
                        f'model; choose from {tuple(known)}')

  @classmethod
  def from_config(cls, c) -> 'LoraConfig':
    return cls(rank=int(c.rank), alpha=float(c.alpha),
               dropout=float(c.dropout), targets=tuple(c.targets))


# ---------------------------------------------------------------------------
# Tree utilities
# ---------------------------------------------------------------------------
def adapted_paths(lora: PyTree) -> list[tuple[str, ...]]:
  """Module paths (e.g. ``('layers', 'self_attn', 'q_proj')``) with an a/b."""
  out = []

  def visit(node, path):
    if isinstance(node, dict) and set(node) == {'a', 'b'}:
      out.append(path)
    elif isinstance(node, dict):
      for k in sorted(node):
        visit(node[k], path + (k,))
  visit(_as_dict(lora), ())
  return out


def _as_dict(tree: PyTree) -> PyTree:
  if hasattr(tree, 'unfreeze'):
    tree = tree.unfreeze()
  if isinstance(tree, dict):
    return {k: _as_dict(v) for k, v in tree.items()}
  return tree


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def num_params(tree: PyTree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def num_bytes(tree: PyTree) -> int:
  """Exact bytes of the arrays in ``tree`` (shape x itemsize)."""
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def stack(loras: Sequence[PyTree]) -> PyTree:
  """``[tree_1, ..., tree_N]`` -> one tree with a leading client axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *loras)


def unstack(stacked: PyTree) -> list[PyTree]:
  n = jax.tree.leaves(stacked)[0].shape[0]
  return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)]


def replicate(lora: PyTree, n: int) -> PyTree:
  """The same adapter for ``n`` clients: ``[N, ...]``."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), lora)


def head_start(head_layers: int, num_layers: int) -> int:
  """The first layer of a head of the top ``head_layers`` layers (0: the top
  quarter, at least one), i.e. the number of body layers below it; <= 0 when
  the head would take every layer."""
  return num_layers - (int(head_layers) or max(1, num_layers // 4))


def split_layers(lora: PyTree, at: int) -> tuple[PyTree, PyTree]:
  """``(layers [0, at), layers [at, L))`` of one adapter (layer axis 0, no
  client axis): e.g. FedRep's shared body and personal head."""
  return (jax.tree.map(lambda x: x[:at], lora),
          jax.tree.map(lambda x: x[at:], lora))


def join_layers(lower: PyTree, upper: PyTree) -> PyTree:
  """The inverse of :func:`split_layers`: ``lower`` layers, then ``upper``."""
  return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=0), lower,
                      upper)


def split_factors(lora: PyTree) -> tuple[PyTree, PyTree]:
  """``(a tree, b tree)``: the adapter's shape with each node's ``a`` (or
  ``b``) in place of the node, e.g. FFA-LoRA's frozen ``a`` and trained
  ``b``. Works with or without a client axis."""
  return (map_adapters(lambda n: n['a'], lora),
          map_adapters(lambda n: n['b'], lora))


def join_factors(a: PyTree, b: PyTree) -> PyTree:
  """The inverse of :func:`split_factors`."""
  if isinstance(a, dict):
    return {k: join_factors(a[k], b[k]) for k in a}
  return {'a': a, 'b': b}


def delta_weights(lora: PyTree, scale: float) -> dict:
  """``{path: a @ b * scale}`` in kernel layout ``[..., in, out]``."""
  return {p: jnp.einsum('...ir,...ro->...io', _get(lora, p)['a'],
                        _get(lora, p)['b']) * scale
          for p in adapted_paths(lora)}


def merge(params: PyTree, lora: PyTree, scale: float) -> PyTree:
  """Base params with every adapted kernel replaced by ``W + a b scale``.

  The result runs without a ``lora`` collection and gives the same output as
  ``params`` with ``lora`` (up to float rounding).
  """
  merged = jax.tree.map(lambda x: x, _as_dict(params))  # shallow copy
  for path, dw in delta_weights(_as_dict(lora), scale).items():
    node = _get(merged, path)
    node['kernel'] = (node['kernel'].astype(jnp.float32) + dw).astype(
        node['kernel'].dtype)
  return merged


def init(model, rng: jax.Array) -> PyTree:
  """A fresh adapter for ``model`` (a ``Llama`` with a ``LoraConfig``).

  Only the ``lora`` collection is returned; under ``jit`` the base-weight
  initialisers are dead code and cost nothing.
  """
  tokens = jnp.zeros((1, 1), jnp.int32)
  init_fn = jax.jit(lambda r: model.init(r, tokens)['lora'])
  return _as_dict(init_fn(rng))


def init_rank(model, rank: int, rng: jax.Array) -> PyTree:
  """A fresh adapter of rank ``rank`` for ``model`` (its own initialiser:
  random ``a``, zero ``b``), whatever the model's configured rank."""
  return init(model.clone(lora=dataclasses.replace(model.lora, rank=int(rank))),
              rng)


# ---------------------------------------------------------------------------
# The rank axis: masks, padding, two adapters at once
# ---------------------------------------------------------------------------
# In every adapter node ``a`` is ``[..., in, r]`` (rank last) and ``b`` is
# ``[..., r, out]`` (rank second to last). A rank argument may be a scalar or
# carry leading client axes (``[N]`` for leaves ``[N, L, ...]``).
def map_adapters(fn, tree: PyTree, *others: PyTree) -> PyTree:
  """``tree`` with each adapter node (a dict with keys ``a`` and ``b``)
  replaced by ``fn(node, *same node of others)``."""
  def visit(node, *rest):
    if isinstance(node, dict) and set(node) == {'a', 'b'}:
      return fn(node, *rest)
    return {k: visit(v, *(r[k] for r in rest)) for k, v in node.items()}
  return visit(_as_dict(tree), *map(_as_dict, others))


def _rank_vector(rank, size: int) -> jax.Array:
  """``[..., size]`` bool: component ``k`` is below ``rank``."""
  rank = jnp.asarray(rank)
  return jnp.arange(size) < rank[..., None]


def _lead(mask: jax.Array, ndim: int, tail: int) -> jax.Array:
  """Reshapes ``mask [lead..., R(, 1)]`` so it broadcasts to a leaf of
  ``ndim`` dimensions whose last ``tail`` dimensions it already matches."""
  lead = mask.shape[:mask.ndim - tail]
  return mask.reshape(lead + (1,) * (ndim - len(lead) - tail) +
                      mask.shape[mask.ndim - tail:])


def rank_mask(lora: PyTree, rank) -> PyTree:
  """Bool masks broadcastable to every leaf of ``lora``: True on the first
  ``rank`` rank components (``a``'s columns, ``b``'s rows), False on the rest
  (padding). ``rank`` may be traced."""
  def node(n):
    r = n['a'].shape[-1]
    v = _rank_vector(rank, r)
    return {'a': _lead(v, n['a'].ndim, 1),
            'b': _lead(v[..., None], n['b'].ndim, 2)}
  return map_adapters(node, lora)


def mask_rank(lora: PyTree, rank) -> PyTree:
  """``lora`` with the rank components from ``rank`` on set to exactly 0."""
  return jax.tree.map(lambda x, m: jnp.where(m, x, jnp.zeros_like(x)), lora,
                      rank_mask(lora, rank))


def pad_rank(lora: PyTree, rank: int) -> PyTree:
  """``lora`` padded with zero rank components up to ``rank``."""
  def node(n):
    extra = rank - n['a'].shape[-1]
    if extra < 0:
      raise ValueError(f'cannot pad rank {n["a"].shape[-1]} down to {rank}')
    pa = [(0, 0)] * (n['a'].ndim - 1) + [(0, extra)]
    pb = [(0, 0)] * (n['b'].ndim - 2) + [(0, extra), (0, 0)]
    return {'a': jnp.pad(n['a'], pa), 'b': jnp.pad(n['b'], pb)}
  return map_adapters(node, lora)


def concat_rank(*loras: PyTree) -> PyTree:
  """One adapter whose ``delta_W`` is the sum of the given ones: ``a`` joined
  along its last (rank) axis, ``b`` along its second last, so ``[a1 a2] @
  [b1; b2] = a1 b1 + a2 b2`` (at the model's one scale, alpha / r of its
  config). Works with or without a client axis."""
  return map_adapters(
      lambda n, *rest: {
          'a': jnp.concatenate([n['a']] + [m['a'] for m in rest], -1),
          'b': jnp.concatenate([n['b']] + [m['b'] for m in rest], -2)},
      *loras)


def scale_b(lora: PyTree, factor) -> PyTree:
  """``lora`` with ``b`` times ``factor`` (a scalar, or one per leading
  client axis), so ``delta`` is scaled by it."""
  factor = jnp.asarray(factor, jnp.float32)
  return map_adapters(lambda n: {
      'a': n['a'],
      'b': n['b'] * _lead(factor[..., None, None], n['b'].ndim, 2)}, lora)


def rank_of(lora: PyTree) -> int:
  """The rank ``r`` of an adapter (the last axis of its ``a`` leaves)."""
  return int(_get(_as_dict(lora), adapted_paths(lora)[0])['a'].shape[-1])


def rank_bytes(lora: PyTree, rank) -> jax.Array:
  """Bytes of the first ``rank`` rank components of every adapter node of
  one adapter (no client axis): what a padded adapter of real rank ``rank``
  puts on the wire. ``rank`` may be traced (int32: up to 2 GiB)."""
  total = 0
  for p in adapted_paths(lora):
    n = _get(_as_dict(lora), p)
    a, b = n['a'], n['b']
    per = (int(np.prod(a.shape[:-1])) * jnp.dtype(a.dtype).itemsize +
           int(np.prod(b.shape[:-2] + b.shape[-1:])) *
           jnp.dtype(b.dtype).itemsize)
    total = total + per * jnp.asarray(rank, jnp.int32)
  return jnp.asarray(total, jnp.int32)


def clients_on_rank(lora: PyTree) -> PyTree:
  """``[N, ..., in, r]``/``[N, ..., r, out]`` -> one adapter of rank
  ``N r``: client ``i``'s components at ``[i r, (i + 1) r)``, so its
  ``delta`` is the sum of the clients' (FLoRA's stacking)."""
  def node(n):
    a, b = n['a'], n['b']
    k, r = a.shape[0], a.shape[-1]
    a = jnp.moveaxis(a, 0, -2)                       # [..., in, N, r]
    b = jnp.moveaxis(b, 0, -3)                       # [..., N, r, out]
    return {'a': a.reshape(a.shape[:-2] + (k * r,)),
            'b': b.reshape(b.shape[:-3] + (k * r,) + b.shape[-1:])}
  return map_adapters(node, lora)


def write_rank(lora: PyTree, part: PyTree, start) -> PyTree:
  """``lora`` with its rank components ``[start, start + r_part)`` replaced
  by ``part``'s (``start`` may be traced)."""
  def node(n, m):
    a0 = jnp.zeros((), jnp.int32)
    sa = (a0,) * (n['a'].ndim - 1) + (jnp.asarray(start, jnp.int32),)
    sb = (a0,) * (n['b'].ndim - 2) + (jnp.asarray(start, jnp.int32), a0)
    return {'a': jax.lax.dynamic_update_slice(n['a'], m['a'].astype(
                n['a'].dtype), sa),
            'b': jax.lax.dynamic_update_slice(n['b'], m['b'].astype(
                n['b'].dtype), sb)}
  return map_adapters(node, lora, part)


def mixed(parts: Sequence[PyTree], weights) -> PyTree:
  """One adapter whose output is ``sum_k weights[k] * delta_k x``: the parts
  side by side on the rank axis (:func:`concat_rank`), each ``b`` scaled by
  its weight. ``weights`` is ``[K]``, or ``[lead..., K]`` for parts with
  leading client (or row) axes. The adapters' outputs are mixed, not their
  factors: ``(w1 a1 + w2 a2)(w1 b1 + w2 b2)`` would add cross terms."""
  weights = jnp.asarray(weights, jnp.float32)
  return concat_rank(*(scale_b(p, weights[..., k])
                       for k, p in enumerate(parts)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class InstanceMix:
  """A row whose adapter depends on the test instance ``x``: the output
  ``sum_k w_k(x) delta_k x`` of ``parts``, with ``w(x) = weigh(e(x),
  context)``. ``e(x)`` is the model's final (normed) hidden state at the
  prompt's last token under the ``probe`` adapter; ``weigh`` is the method's
  rule for one client (``e [H]``, that client's ``context`` -> ``[K]``).

  ``parts``, ``probe`` and ``context`` carry the client axis ``[N, ...]``,
  like any row; :mod:`fdlora_jax.evaluate` builds each test row's adapter
  (:func:`mixed`) before scoring it. A pytree (``weigh`` is static), so
  ``jax.tree.map(lambda x: x[idx], mix)`` picks clients.
  """
  parts: tuple
  probe: PyTree
  context: PyTree
  weigh: Callable = dataclasses.field(metadata=dict(static=True))
