"""AdaFusion: per-client, gradient-free fusion of the personalized and global LoRA.

FDLoRA's third stage (Qi et al., 2024, Sec. 3.4) gives every client two
adapters, its personalized LoRA ``p`` and the global (shared) LoRA ``s``, and
searches for two weights ``w = (w1, w2)`` that minimise

    CE(few-shot examples; fused LoRA) + lam * |w|_1

without gradients. The fused adapter mixes the ``a`` and ``b`` matrices
separately (as LoraHub does)::

    a = w1 * a_p + w2 * a_s,    b = w1 * b_p + w2 * b_s

so ``delta_W = (w1 a_p + w2 a_s)(w1 b_p + w2 b_s) alpha / r``, which is *not* a
linear mix of the two ``delta_W``; ``w = (1, 0)`` gives the personalized LoRA
exactly and ``w = (0, 1)`` the global one.

All clients are searched at once: every client has its own evosax state
(``ask``/``tell`` are vmapped over clients), and the fitness of the whole
``[N, P]`` population is one vmapped forward pass (clients x population). The
``ask -> fitness -> tell`` loop runs inside one ``jit`` under ``lax.scan``.

Example::

  fitness = make_fitness_fn(model, base, personal, global_, fewshot, lam=0.05)
  w, history = adafusion(fitness, num_clients, fusion_config(), key)
  fused = fuse(personal, global_, w)                  # [N, ...] adapters

evosax facts this module relies on (evosax 0.3.2): every algorithm
*minimises* fitness (``argmin`` in ``EvolutionaryAlgorithm.tell``); algorithms
are looked up by name in the dict ``evosax.algorithms.algorithms``;
distribution-based ones start from ``init(key, mean, params)``,
population-based ones from ``init(key, population, fitness, params)``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fdlora_jax.errors import ConfigError, need
from fdlora_jax.model import (num_targets_bucket, prefill, shared_prefix,
                              target_log_probs)

PyTree = Any
Array = jax.Array


def _evosax():
  """evosax's algorithms, imported on first use: importing evosax runs JAX
  computations, which would start JAX's backend before
  ``jax.distributed.initialize`` can (``main.py --coordinator``)."""
  from evosax.algorithms import algorithms
  from evosax.algorithms.population_based.base import PopulationBasedAlgorithm
  return algorithms, PopulationBasedAlgorithm


@functools.cache
def strategies() -> tuple[str, ...]:
  """The evosax algorithms ``fusion.strategy`` may name. Names in
  ``evosax.algorithms.algorithms`` whose constructors need more than
  (population_size, solution) are left out: RandomSearch (a sampling_fn),
  SV_CMA_ES and SV_Open_ES (num_populations)."""
  return tuple(sorted(
      name for name, cls in _evosax()[0].items()
      if all(p.default is not inspect.Parameter.empty
             for p in list(inspect.signature(cls.__init__).parameters.values()
                           )[1:]
             if p.name not in ('population_size', 'solution')
             and p.kind is p.POSITIONAL_OR_KEYWORD)))

BASELINES = ('personal', 'global', 'average', 'sum', 'random')


def fusion_config() -> ml_collections.ConfigDict:
  """Defaults for AdaFusion (meant for ``configs/common.py`` as ``c.fusion``)."""
  c = ml_collections.ConfigDict()
  # Any name in strategies() (the dict ``evosax.algorithms.algorithms``).
  c.strategy = 'CMA_ES'
  c.population_size = 8   # candidates per client per step
  c.steps = 5             # paper: 5 ask/tell rounds
  # Start point (w1, w2), evaluated before the first step and kept if nothing
  # beats it. (1, 0) is the client's own personalized adapter, so the search
  # never returns a worse few-shot fitness than personalization alone. On the
  # real LogHub samples (README, 3 seeds) it gave the best fused F1 of the
  # starts tried: 0.209 vs 0.160 from (0.5, 0.5), the 'average' baseline.
  # (LoraHub starts from 0, which here would be the bare base model.)
  c.init = (1.0, 0.0)
  # Initial search spread: evosax's ``std_init`` (or a constant
  # ``std_schedule``) for distribution-based strategies; the scatter of the
  # initial population around ``init`` for population-based ones.
  c.sigma_init = 0.3
  c.bounds = (-1.5, 1.5)  # every candidate is clipped to [lo, hi] (LoraHub)
  c.lam = 0.05            # L1 penalty on w (LoraHub / FDLoRA)
  return c


# ---------------------------------------------------------------------------
# Fusing adapters
# ---------------------------------------------------------------------------
def fuse(personal: PyTree, global_: PyTree, w: Array) -> PyTree:
  """``w1 * personal + w2 * global_`` leafwise, i.e. on every ``a`` and ``b``.

  Args:
    personal: a LoRA pytree, optionally with leading axes (e.g. ``[N, ...]``).
    global_: the same tree structure and shapes as ``personal``.
    w: ``[..., 2]``; its leading axes broadcast against the leading axes of
      every leaf (``w [N, 2]`` with adapters ``[N, L, ...]``, or ``w [2]``).

  Returns:
    The fused LoRA, leaves in the dtype of ``personal``.
  """
  w = jnp.asarray(w)
  if w.ndim < 1 or w.shape[-1] != 2:
    raise ValueError(f'fuse: w must have shape [..., 2] (w1 personal, w2 '
                     f'global), got {w.shape}')
  if jax.tree.structure(personal) != jax.tree.structure(global_):
    raise ValueError('fuse: personal and global_ LoRA trees differ in '
                     'structure')
  lead = w.shape[:-1]

  def mix(p, g):
    if p.shape != g.shape:
      raise ValueError(f'fuse: personal leaf {p.shape} and global leaf '
                       f'{g.shape} differ in shape')
    if p.shape[:len(lead)] != lead:
      raise ValueError(f'fuse: w leading axes {lead} do not match the '
                       f'leading axes of a LoRA leaf {p.shape}')
    expand = (Ellipsis,) + (None,) * (p.ndim - len(lead))
    w1, w2 = w[..., 0][expand], w[..., 1][expand]
    return (w1 * p + w2 * g).astype(p.dtype)
  return jax.tree.map(mix, personal, global_)


# ---------------------------------------------------------------------------
# Few-shot fitness
# ---------------------------------------------------------------------------
def fewshot_loss(model, base: PyTree, lora: Optional[PyTree], tokens: Array,
                 loss_mask: Array, attention_mask: Array,
                 num_targets: Optional[int] = None,
                 start: Optional[Array] = None) -> Array:
  """Mean over examples of the per-token CE on the ``loss_mask`` tokens.

  ``loss_mask`` marks target tokens (the answer). Each example's loss is its
  summed NLL divided by its number of loss tokens; examples with no loss token
  (padding rows) are left out of the mean (0.0 if there are none). Padding
  (``attention_mask == 0``) never counts as a loss token.

  Args:
    model: a ``Llama``; base: its params; lora: one adapter (no client axis)
      or None for the bare base.
    tokens, loss_mask, attention_mask: ``[F, L]``.
    num_targets: see :func:`fdlora_jax.model.target_log_probs`.
    start: ``[P]``, the tokens every example opens with
      (:func:`fdlora_jax.model.shared_prefix_length`): they run once, into
      a KV cache, instead of once per example. Same loss up to rounding.
  """
  variables = {'params': base} if lora is None else {'params': base,
                                                     'lora': lora}
  cache = None if start is None else prefill(model, variables, start)
  logp, mask = target_log_probs(model, variables, tokens, loss_mask,
                                attention_mask, num_targets, cache=cache)
  count = mask.sum(-1)
  per_example = -(logp * mask).sum(-1) / jnp.maximum(count, 1.0)
  has_loss = (count > 0).astype(jnp.float32)
  return (per_example * has_loss).sum() / jnp.maximum(has_loss.sum(), 1.0)


@dataclasses.dataclass(frozen=True)
class _FusedFitness:
  """The static half of a fitness function (the model); hashable, so a jitted
  search is reused when only the arrays change."""
  model: Any
  num_targets: Optional[int] = None

  def __call__(self, base, personal, global_, fewshot, lam, start, w):
    return _population_fitness(self.model, self.num_targets, base, personal,
                               global_, fewshot, lam, start, w)


@functools.partial(jax.jit, static_argnames=('model', 'num_targets'))
def _population_fitness(model, num_targets, base, personal, global_, fewshot,
                        lam, start, w):
  if w.ndim != 3 or w.shape[-1] != 2:
    raise ValueError(f'fitness: w must be [N, P, 2], got {w.shape}')

  def one_client(p, g, shots, w_client):          # w_client [P, 2]
    def one_member(wi):                            # wi [2]
      lora = fuse(p, g, wi)
      ce = fewshot_loss(model, base, lora, shots['tokens'],
                        shots['loss_mask'], shots['attention_mask'],
                        num_targets, start)
      return ce + lam * jnp.abs(wi).sum()
    return jax.vmap(one_member)(w_client)

  return jax.vmap(one_client)(personal, global_, fewshot, w)


def make_fitness_fn(model, base: PyTree, personal: PyTree, global_: PyTree,
                    fewshot: dict, lam: float = 0.05
                    ) -> jax.tree_util.Partial:
  """``f(w [N, P, 2]) -> [N, P]``: few-shot CE of each fused LoRA + lam |w|_1.

  One vmapped pass: over clients (``personal``, ``global_`` and ``fewshot``
  on axis 0; ``base`` shared) of a vmap over the population.

  Args:
    model: a ``Llama`` with the LoRA config of the adapters.
    base: base params (shared by all clients).
    personal, global_: LoRA trees ``[N, ...]`` (``lora.replicate`` the global
      adapter if there is one copy).
    fewshot: ``{'tokens', 'loss_mask', 'attention_mask'}``, each ``[N, F, L]``.
    lam: L1 weight on ``w``.

  Returns:
    A ``jax.tree_util.Partial``: a pytree whose leaves are the arrays, so it
    can be passed *into* ``jit`` (as :func:`adafusion` does) without baking
    the base weights into the program as constants. Calling it directly runs
    a jitted function (compiled once per shape; ``P = 1`` works).
  """
  missing = {'tokens', 'loss_mask', 'attention_mask'} - set(fewshot)
  if missing:
    raise ValueError(f'fewshot is missing {sorted(missing)}')
  n = jax.tree.leaves(personal)[0].shape[0]
  for name in ('tokens', 'loss_mask', 'attention_mask'):
    if np.ndim(fewshot[name]) != 3 or np.shape(fewshot[name])[0] != n:
      raise ValueError(f'fewshot[{name!r}] must be [N={n}, F, L], got '
                       f'{np.shape(fewshot[name])}')
  if lam < 0:
    raise ConfigError(f'fusion.lam must be >= 0, got {lam}')
  shots = {k: jnp.asarray(fewshot[k]) for k in ('tokens', 'loss_mask',
                                                  'attention_mask')}
  # The prompt start all shots share runs once per fused adapter.
  start = shared_prefix(fewshot['tokens'], fewshot['loss_mask'],
                        fewshot['attention_mask'])
  start = jnp.asarray(start) if start.size else None
  return jax.tree_util.Partial(
      _FusedFitness(model, num_targets_bucket(fewshot['loss_mask'])), base,
      personal, global_, shots, jnp.float32(lam), start)


# ---------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------
def validate_config(cfg, field: str = 'fusion') -> None:
  """Raises :class:`ConfigError` naming the offending ``<field>.*`` entry;
  ``field`` is where the block sits in the run's config (FDLoRA:
  ``'fdlora.fusion'``), so the message names the flag to fix."""
  need(cfg.strategy in strategies(), f'{field}.strategy', cfg.strategy,
       f'not a supported evosax algorithm; choose from {list(strategies())}')
  need(int(cfg.population_size) >= 2, f'{field}.population_size',
       cfg.population_size, 'must be >= 2')
  need(int(cfg.steps) >= 1, f'{field}.steps', cfg.steps, 'must be >= 1')
  need(len(cfg.bounds) == 2 and float(cfg.bounds[0]) < float(cfg.bounds[1]),
       f'{field}.bounds', tuple(cfg.bounds), 'must be (lo, hi) with lo < hi')
  need(len(cfg.init) == 2, f'{field}.init', tuple(cfg.init),
       'must be (w1, w2)')
  lo, hi = map(float, cfg.bounds)
  need(all(lo <= float(x) <= hi for x in cfg.init), f'{field}.init',
       tuple(cfg.init), f'lies outside {field}.bounds {(lo, hi)}')
  need(float(cfg.sigma_init) > 0, f'{field}.sigma_init', cfg.sigma_init,
       'must be > 0')
  need(float(cfg.lam) >= 0, f'{field}.lam', cfg.lam, 'must be >= 0')
  _algorithm(cfg, field)   # what only the algorithm knows (Open_ES: even P)


def _algorithm(cfg, field: str = 'fusion'):
  """The evosax algorithm named ``cfg.strategy``, with the initial spread
  set to ``cfg.sigma_init`` where the algorithm has one."""
  cls = _evosax()[0][cfg.strategy]
  kwargs = {}
  if 'std_schedule' in inspect.signature(cls.__init__).parameters:
    kwargs['std_schedule'] = optax.constant_schedule(float(cfg.sigma_init))
  try:
    return cls(population_size=int(cfg.population_size),
               solution=jnp.zeros(2, jnp.float32), **kwargs)
  except AssertionError as e:  # e.g. Open_ES needs an even population
    raise ConfigError(f'config.{field}.population_size='
                      f'{cfg.population_size}: not valid for '
                      f'{field}.strategy={cfg.strategy!r}: {e}') from e


def make_strategy(cfg):
  """The evosax algorithm named ``cfg.strategy`` and its params, with the
  initial spread set to ``cfg.sigma_init`` where the algorithm has one."""
  validate_config(cfg)
  es = _algorithm(cfg)
  params = es.default_params
  if hasattr(params, 'std_init'):
    params = params.replace(std_init=jnp.asarray(float(cfg.sigma_init)))
  return es, params


def make_adafusion(num_clients: int, cfg,
                   progress: Optional[Callable[[int, int], None]] = None
                   ) -> Callable:
  """A jitted ``search(fitness_fn, key) -> (w_best [N, 2], history)``.

  ``progress(done, total)``, when given, is called on the host (a
  ``jax.debug.callback``, in order on one device) after each of the
  ``total = steps + 1`` population evaluations (the start one included), so
  a bar can follow the one compiled search.

  ``fitness_fn`` must be a pytree callable (what :func:`make_fitness_fn`
  returns, or any function wrapped in ``jax.tree_util.Partial``). Use this
  form to compile once (``search.lower(fitness_fn, key).compile()``) and to
  time compilation and running apart; :func:`adafusion` is the one-call form.
  """
  es, es_params = make_strategy(cfg)
  n, p, steps = int(num_clients), int(cfg.population_size), int(cfg.steps)
  lo, hi = map(float, cfg.bounds)
  sigma = float(cfg.sigma_init)
  population_based = isinstance(es, _evosax()[1])
  clients = jnp.arange(n)

  def finite(f):
    return jnp.where(jnp.isnan(f), jnp.inf, f)

  def report(done):
    if progress is not None:
      # Ordered effects need one device; on several (a mesh, or
      # jax.distributed) the callback may come once per device, out of
      # order: progress callbacks take the largest count seen.
      jax.debug.callback(lambda d: progress(int(d), steps + 1), done,
                         ordered=jax.device_count() == 1)

  @jax.jit
  def search(fitness_fn, key):
    start = jnp.broadcast_to(jnp.asarray(cfg.init, jnp.float32), (n, 2))
    key, k_init, k_pop = jax.random.split(key, 3)
    init_keys = jax.random.split(k_init, n)
    if population_based:
      # Member 0 of the initial population is the start point itself.
      noise = sigma * jax.random.normal(k_pop, (n, p, 2))
      pop0 = jnp.clip(start[:, None] + noise.at[:, 0].set(0.0), lo, hi)
      fit0 = fitness_fn(pop0)
      state = jax.vmap(es.init, (0, 0, 0, None))(init_keys, pop0, fit0,
                                                 es_params)
      start_fitness = fit0[:, 0]
      idx = jnp.argmin(finite(fit0), -1)
      best_w, best_f = pop0[clients, idx], finite(fit0)[clients, idx]
    else:
      start_fitness = fitness_fn(start[:, None])[:, 0]
      state = jax.vmap(es.init, (0, 0, None))(init_keys, start, es_params)
      best_w, best_f = start, finite(start_fitness)
    report(1)

    def step(carry, xs):
      k, i = xs
      state, best_w, best_f = carry
      k_ask, k_tell = jax.random.split(k)
      x, state = jax.vmap(es.ask, (0, 0, None))(
          jax.random.split(k_ask, n), state, es_params)
      x = jnp.clip(x, lo, hi)   # the ES is told the clipped (evaluated) points
      f = fitness_fn(x)
      state, _ = jax.vmap(es.tell, (0, 0, 0, 0, None))(
          jax.random.split(k_tell, n), x, f, state, es_params)
      idx = jnp.argmin(finite(f), -1)
      step_w, step_f = x[clients, idx], finite(f)[clients, idx]
      better = step_f < best_f
      best_w = jnp.where(better[:, None], step_w, best_w)
      best_f = jnp.where(better, step_f, best_f)
      report(i + 2)
      return (state, best_w, best_f), {'best_fitness': best_f,
                                       'mean_fitness': f.mean(-1)}

    (_, best_w, _), history = jax.lax.scan(
        step, (state, best_w, best_f),
        (jax.random.split(key, steps), jnp.arange(steps)))
    history['start_fitness'] = start_fitness
    return best_w, history

  return search


def adafusion(fitness_fn: Callable, num_clients: int, cfg, key: Array,
              progress: Optional[Callable[[int, int], None]] = None
              ) -> tuple[Array, dict]:
  """Searches fusion weights for every client at once.

  Args:
    fitness_fn: ``f(w [N, P, 2]) -> [N, P]``, lower is better (evosax
      minimises). Usually :func:`make_fitness_fn`; a plain function works too
      (its closed-over arrays then become compile-time constants).
    num_clients: N.
    cfg: :func:`fusion_config` fields (strategy, population_size, steps, init,
      sigma_init, bounds; ``lam`` is used by :func:`make_fitness_fn`).
    key: PRNG key.
    progress: optional ``progress(done, total)``, see :func:`make_adafusion`.

  Returns:
    ``w_best [N, 2]``: per client the best point evaluated (the start point
    included), and ``history``: ``best_fitness [steps, N]`` (best so far after
    each step), ``mean_fitness [steps, N]`` (population mean at each step),
    ``start_fitness [N]``.
  """
  if not isinstance(fitness_fn, jax.tree_util.Partial):
    fitness_fn = jax.tree_util.Partial(fitness_fn)
  return make_adafusion(num_clients, cfg, progress)(fitness_fn, key)


def baseline_weights(kind: str, num_clients: int, key: Optional[Array] = None,
                     bounds: tuple[float, float] = (-1.5, 1.5)) -> Array:
  """Fixed fusion weights ``[N, 2]`` (paper Table 6, plus the two ends).

  'personal' (1, 0), 'global' (0, 1), 'average' (0.5, 0.5), 'sum' (1, 1),
  'random' (uniform in ``bounds``, seeded by ``key``; needs a key).
  """
  fixed = {'personal': (1.0, 0.0), 'global': (0.0, 1.0),
           'average': (0.5, 0.5), 'sum': (1.0, 1.0)}
  if kind in fixed:
    return jnp.tile(jnp.asarray(fixed[kind], jnp.float32), (num_clients, 1))
  if kind == 'random':
    if key is None:
      raise ValueError("baseline_weights('random') needs a PRNG key")
    lo, hi = bounds
    return jax.random.uniform(key, (num_clients, 2), jnp.float32, lo, hi)
  raise ValueError(f'Unknown fusion baseline {kind!r}; choose from '
                   f'{list(BASELINES)}')
