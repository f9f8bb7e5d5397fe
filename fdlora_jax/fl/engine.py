"""The one engine every federated method runs on.

A method (``fdlora_jax/fl/methods/*.py``) is pure functions over pytrees: what
the server broadcasts, what a client trains and with which loss, what it
uploads, how the server combines uploads, and which adapters to evaluate. It
holds no ``jit``, ``vmap``, masks, RNG or placement. Those live here, and only
here:

* ``jit`` of one compiled client step per phase: a ``vmap`` over clients of a
  ``lax.scan`` over the K local steps, the base shared (``in_axes=None``),
  the trained tree and its optimizer state donated;
* step masks (a client with fewer examples, or past its own number of steps,
  changes nothing), the non-finite guard (a client whose loss or gradient
  turns NaN/inf stops for the round, keeps its previous state and gets server
  weight 0), elementwise ``trainable`` masks (frozen entries stay
  bit-identical);
* RNG folding (phase, round, chunk) and mesh placement of the client axis;
* communication bytes, counted from the arrays actually broadcast to and
  uploaded by each client, per round.

Run state (one pytree; :class:`fdlora_jax.io.StateCheckpoints` saves it
whole)::

  {'done':   int32 []       repeats completed over all phases (checkpoint step)
   'server': method's server state, no client axis
   'client': method's client state, every leaf [N, ...], never given to the
             server function
   'opt':    {phase name: optax state [N, ...] of the tree that phase trains}}

Data flow of one repeat (round ``t``) of a training phase::

  download[N] = replicate(phase.broadcast(server, t))   (or per client)
  train[N]    = vmap(phase.start)(client, download)
  train[N]    = K masked steps of grad(phase.loss) w.r.t. train
  client, upload[N] = vmap(phase.finish)(client, train, download, t)
  server      = phase.server(server, upload, weights * healthy, t)

The server function's arguments are the server state, the uploads and the
weights; the client state cannot reach it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fdlora_jax import lora as lora_lib
from fdlora_jax import sharding
from fdlora_jax.fl import losses
from fdlora_jax.model import (num_targets_bucket, positions_from_mask,
                              target_log_probs)

PyTree = Any


# ---------------------------------------------------------------------------
# What a method declares
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Phase:
  """One phase of a method: ``repeats`` repeats of local training, or a
  gradient-free ``search`` run once.

  Training phases (all functions are pure and see one client: the engine
  vmaps them):
    start(client, download) -> train: the tree the K steps optimise.
    loss(fwd, train, download, batch, rng) -> (mean loss, target count):
      ``fwd`` is a :class:`Forward` (the frozen base applied with an adapter).
    trainable(train, i) -> mask tree (bool, broadcastable to each leaf) or
      None, at local step ``i`` (0-based within the repeat, traced): entries
      outside the mask stay bit-identical. A mask that depends on ``i``
      alternates parts within a round (FedRep: head steps, then body).
    finish(client, train, download, t) -> (client, upload). ``upload`` is
      what leaves the client (``None``: nothing).
    broadcast(server, t) -> download, shared by all clients (``None``:
      nothing). With ``personal_download`` it returns ``[N, ...]`` leaves,
      one download per client.
    server(server, uploads[N], weights[N], t) -> (server, metrics dict).
    wire_bytes(upload) -> int: the bytes one client's upload puts on the
      wire, when that is not the size of its arrays (e.g. factors of a
      rank chosen at run time, padded to a fixed shape). Default: the size
      of the upload's arrays.
  Search phases:
    search(server, client, key, progress) -> (client, metrics dict); runs
      once, after the training phases (e.g. AdaFusion), not vmapped by the
      engine. ``progress`` is None or a host ``(done, total)`` callback.

  ``steps`` is ``[N]`` real local steps per client per repeat (the engine
  masks the rest); ``first_round`` numbers the repeats (0 for a stage before
  the federated rounds, 1 for the first round); ``chunk`` caps the steps per
  compiled call (progress, memory).
  """
  name: str
  repeats: int = 1
  steps: Optional[np.ndarray] = None
  first_round: int = 1
  chunk: int = 0
  start: Optional[Callable] = None
  loss: Optional[Callable] = None
  trainable: Optional[Callable] = None
  finish: Optional[Callable] = None
  broadcast: Optional[Callable] = None
  personal_download: bool = False
  server: Optional[Callable] = None
  reset_opt: bool = False
  search: Optional[Callable] = None
  wire_bytes: Optional[Callable] = None

  @property
  def is_search(self) -> bool:
    return self.search is not None


@dataclasses.dataclass(frozen=True)
class Method:
  """A federated method, as the engine and ``run()`` see it.

  init(key) -> (server state, client state [N, ...]).
  rows(server, client) -> {name: adapters [N, ...] or None (the base)}: what
    the final evaluation scores, in order.
  headline: the row that stands for the method in comparisons (default: the
    first row).
  progress_rows(server, client) -> rows evaluated every ``eval.every``
    rounds (default: none).
  client_weights: ``[N]`` server weights before the health mask.
  context_shots: k in-context examples of the client's own training split
    put in every evaluation prompt (k-shot); 0 for none.
  context_length: the token budget of such a prompt, demonstrations
    included (0: ``data.max_length``).
  """
  name: str
  init: Callable
  phases: tuple[Phase, ...]
  rows: Callable
  headline: str = ''
  progress_rows: Optional[Callable] = None
  client_weights: Optional[np.ndarray] = None
  context_shots: int = 0
  context_length: int = 0


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a method may read of the run when it is built."""
  model: Any                    # Llama with the run's LoraConfig
  base: PyTree                  # frozen base weights
  config: Any                   # the whole run config (c.fl, c.<method>)
  num_clients: int
  train_counts: np.ndarray      # [N] training examples per client
  label_counts: np.ndarray      # [N, O] training examples per answer option
  few_shot: dict                # tokens/loss_mask/attention_mask [N, F, L]
  lora_init: Callable           # key -> a fresh adapter (no client axis)
  # [O] token id that starts each answer option (None when two options
  # start with the same token): class logits for option-level losses.
  option_ids: Optional[np.ndarray] = None

  def steps(self, amount: float, unit: str) -> np.ndarray:
    """``[N]`` real steps per client: ``amount`` steps, or epochs of data."""
    return client_steps(self.train_counts, amount, unit,
                        self.config.fl.batch_size)

  def local_steps(self) -> np.ndarray:
    """``[N]`` steps of the first (local) phase: ``fl.local_steps`` per
    client when > 0 (each client cycles its own data), else
    ``fl.local_epochs`` epochs of each client's data."""
    fl = self.config.fl
    if fl.local_steps:
      return self.steps(fl.local_steps, 'steps')
    return self.steps(fl.local_epochs, 'epochs')

  def local_phase(self, **rules) -> Phase:
    """The phase before round 1 (``first_round`` 0): :meth:`local_steps`
    per client unless ``rules`` set ``steps``, in compiled calls of at most
    ``fl.stage1_chunk`` steps. ``rules`` are the :class:`Phase`'s other
    fields (start, loss, ...)."""
    rules.setdefault('steps', self.local_steps())
    return Phase('local', first_round=0, chunk=self.config.fl.stage1_chunk,
                 **rules)

  def round_phase(self, **rules) -> Phase:
    """The federated rounds: ``fl.rounds`` repeats of ``fl.inner_steps``
    (in ``fl.inner_unit``) per client, unless ``rules`` set ``steps``."""
    fl = self.config.fl
    rules.setdefault('steps', self.steps(fl.inner_steps, fl.inner_unit))
    return Phase('rounds', repeats=fl.rounds, **rules)

  def example_weights(self, weighting: str) -> Optional[np.ndarray]:
    """The server's client weights: ``[N]`` shares of the training examples
    for ``'examples'``; ``None`` (uniform) otherwise."""
    if weighting != 'examples':
      return None
    return self.train_counts / max(self.train_counts.sum(), 1)


def client_steps(counts: np.ndarray, amount: float, unit: str,
                 batch_size: int) -> np.ndarray:
  """Real optimizer steps per client: ``amount`` steps, or epochs of data."""
  counts = np.asarray(counts)
  if unit == 'steps':
    return np.where(counts > 0, int(amount), 0).astype(np.int32)
  return np.ceil(amount * counts / batch_size).astype(np.int32)


# ---------------------------------------------------------------------------
# The model as a loss sees it
# ---------------------------------------------------------------------------
class Forward(NamedTuple):
  """The frozen base applied with an adapter, inside the compiled step."""
  model: Any
  base: PyTree
  num_targets: Optional[int]
  dropout: bool

  def target_log_probs(self, lora, batch, rng=None):
    """``(logp [B, A], mask [B, A])`` at the ``loss_mask`` targets; padded
    rows (``valid`` 0) are masked."""
    logp, mask = target_log_probs(
        self.model, {'params': self.base, 'lora': lora}, batch['tokens'],
        batch['loss_mask'], batch['attention_mask'], self.num_targets,
        rngs={'dropout': rng} if (self.dropout and rng is not None) else None)
    if 'valid' in batch:
      mask = mask * batch['valid'][:, None].astype(jnp.float32)
    return logp, mask

  def option_logits(self, lora, batch, option_ids, rng=None):
    """``[B, O]`` logits of each option's first token at the position that
    predicts the answer's first token (the first ``loss_mask`` token), and
    ``[B]`` the label: the option whose first token is the answer's."""
    first = jnp.argmax(batch['loss_mask'] > 0, axis=-1)               # [B]
    at = jnp.maximum(first - 1, 0)[:, None]                           # [B, 1]
    kwargs = {}
    if self.dropout and rng is not None:
      kwargs = dict(deterministic=False, rngs={'dropout': rng})
    logits = self.model.apply(
        {'params': self.base, 'lora': lora}, batch['tokens'],
        batch['attention_mask'], positions_from_mask(batch['attention_mask']),
        logits_at=at, **kwargs)[:, 0].astype(jnp.float32)
    answer = jnp.take_along_axis(batch['tokens'], first[:, None], 1)[:, 0]
    label = jnp.argmax(answer[:, None] == jnp.asarray(option_ids)[None], -1)
    return logits[:, jnp.asarray(option_ids)], label

  def nll(self, lora, batch, rng=None):
    """Mean next-token NLL over the targets, and their count."""
    return losses.mean_nll(*self.target_log_probs(lora, batch, rng))


class StepMetrics(NamedTuple):
  loss: jax.Array        # mean loss of this step's batch
  tokens: jax.Array      # target tokens in the batch (0: nothing to learn)
  applied: jax.Array     # the update was applied
  nonfinite: jax.Array   # loss or gradient was NaN/inf


def _all_finite(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def accumulated_value_and_grad(loss: Callable, train: PyTree, batch: dict,
                               rng: jax.Array, accum: int = 1):
  """``((mean loss, count), grads)`` of ``loss(train, batch, rng)`` over the
  whole ``[B, ...]`` batch, computed in ``accum`` micro-batches of
  ``B / accum`` rows (gradient accumulation: the activations of one
  micro-batch at a time are live).

  Each micro-batch's mean and gradient are weighted by its target count, so
  for a loss that is a mean over its count (plus terms that do not depend on
  the batch, e.g. a proximal pull) the result equals the whole batch's up to
  float rounding. Dropout draws a key per micro-batch.
  """
  grad_fn = jax.value_and_grad(loss, has_aux=True)
  if accum == 1:
    return grad_fn(train, batch, rng)
  b = jax.tree.leaves(batch)[0].shape[0]
  if b % accum:
    raise ValueError(f'batch of {b} rows does not split into {accum} '
                     'micro-batches (fl.grad_accum must divide fl.batch_size)')
  micro = jax.tree.map(
      lambda x: x.reshape((accum, b // accum) + x.shape[1:]), batch)

  def body(acc, inputs):
    total, count, grads = acc
    (v, n), g = grad_fn(train, *inputs)
    w = n.astype(jnp.float32)
    some = n > 0      # an empty micro-batch adds nothing (not even a NaN)
    total = total + jnp.where(some, v * w, 0.0)
    grads = jax.tree.map(      # summed in float32 whatever the params'
        lambda a, x: a + jnp.where(some, x.astype(jnp.float32) * w, 0.0),
        grads, g)
    return (total, count + w, grads), None

  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), train)
  (total, count, grads), _ = jax.lax.scan(
      body, (jnp.float32(0), jnp.float32(0), zeros),
      (micro, jax.random.split(rng, accum)))
  denom = jnp.maximum(count, 1.0)
  return (total / denom, count), jax.tree.map(
      lambda g, x: (g / denom).astype(x.dtype), grads, train)


def make_client_update(loss: Callable, optimizer: optax.GradientTransformation,
                       trainable: Optional[Callable] = None,
                       grad_accum: int = 1) -> Callable:
  """``update(fwd, train, opt_state, download, batches[K], rng)`` for one
  client: K optimizer steps in ``lax.scan``, each over its batch in
  ``grad_accum`` micro-batches (:func:`accumulated_value_and_grad`).

  Returns ``(train, opt_state, healthy, StepMetrics[K])``. A step with no
  target token changes nothing; a non-finite step stops the client.
  """

  def step(fwd, download, carry, inputs):
    train, opt_state, healthy = carry
    batch, rng, i = inputs
    (value, count), grads = accumulated_value_and_grad(
        lambda t, b, r: loss(fwd, t, download, b, r), train, batch, rng,
        grad_accum)
    finite = jnp.isfinite(value) & _all_finite(grads)
    apply = healthy & finite & (count > 0)
    mask = None if trainable is None else trainable(train, i)
    if mask is not None:
      grads = jax.tree.map(lambda g, m: jnp.where(m, g, 0.0), grads, mask)
    updates, new_opt = optimizer.update(grads, opt_state, train)
    new_train = optax.apply_updates(train, updates)
    if mask is not None:   # frozen entries stay bit-identical
      new_train = jax.tree.map(lambda n, o, m: jnp.where(m, n, o), new_train,
                               train, mask)
    keep = lambda new, old: jnp.where(apply, new, old)
    train = jax.tree.map(keep, new_train, train)
    opt_state = jax.tree.map(keep, new_opt, opt_state)
    healthy = healthy & (finite | (count == 0))
    return (train, opt_state, healthy), StepMetrics(
        jnp.where(count > 0, value, 0.0), count, apply, ~finite & (count > 0))

  def update(fwd, train, opt_state, download, batches, rng, step0=0):
    num_steps = jax.tree.leaves(batches)[0].shape[0]
    rngs = jax.random.split(rng, num_steps)
    (train, opt_state, healthy), metrics = jax.lax.scan(
        lambda c, x: step(fwd, download, c, x),
        (train, opt_state, jnp.array(True)),
        (batches, rngs, step0 + jnp.arange(num_steps, dtype=jnp.int32)))
    return train, opt_state, healthy, metrics

  return update


def make_clients_update(model, loss: Callable,
                        optimizer: optax.GradientTransformation,
                        trainable: Optional[Callable] = None,
                        dropout: bool = False, donate: bool = True,
                        grad_accum: int = 1) -> Callable:
  """All clients in one compiled step.

  ``(base, train[N], opt[N], download[N], batches[K, N, ...], rng[N],
  step0=0, num_targets=None) -> (train[N], opt[N], healthy[N],
  StepMetrics[N, K])``; ``step0`` numbers the first of the K steps within
  the repeat (for ``trainable``).
  """
  one = make_client_update(loss, optimizer, trainable, grad_accum)

  def many(base, train, opt_state, download, batches, rngs, step0=0,
           num_targets=None):
    fwd = Forward(model, base, num_targets, dropout)
    return jax.vmap(lambda *a: one(fwd, *a, step0=step0),
                    in_axes=(0, 0, 0, 1, 0))(
                        train, opt_state, download, batches, rngs)

  return jax.jit(many, static_argnames=('num_targets',),
                 donate_argnums=(1, 2) if donate else ())


# ---------------------------------------------------------------------------
# Optimizer of the local steps (c.fl)
# ---------------------------------------------------------------------------
INNER_SCHEDULES = ('constant', 'cosine', 'linear')
INNER_OPTIMIZERS = ('adamw', 'sgd')


def inner_optimizer(fl_cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW (or plain SGD) with the configured learning-rate schedule."""
  lr = fl_cfg.inner_lr
  warmup = int(fl_cfg.inner_warmup_steps)
  kind = fl_cfg.inner_schedule
  if kind == 'constant':
    schedule = optax.constant_schedule(lr)
    if warmup:
      schedule = optax.join_schedules(
          [optax.linear_schedule(0.0, lr, warmup), schedule], [warmup])
  else:
    decay = max(total_steps - warmup, 1)
    tail = (optax.cosine_decay_schedule(lr, decay) if kind == 'cosine'
            else optax.linear_schedule(lr, 0.0, decay))
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)), tail],
        [max(warmup, 1)]) if warmup else tail
  if fl_cfg.inner_optimizer == 'sgd':
    return optax.sgd(schedule)
  return optax.adamw(schedule, b1=fl_cfg.inner_b1, b2=fl_cfg.inner_b2,
                     weight_decay=fl_cfg.inner_weight_decay)


# ---------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------
def per_client_bytes(tree: PyTree, n: int) -> list[int]:
  """Bytes of each client's slice of a ``[N, ...]`` tree (0 for None)."""
  if tree is None:
    return [0] * n
  return [lora_lib.num_bytes(tree) // n] * n if jax.tree.leaves(tree) else (
      [0] * n)


@dataclasses.dataclass
class Engine:
  """Runs a :class:`Method`'s training phases over all clients at once.

  ``sample(step0, num_steps) -> batches [K, N, B, T]`` supplies training data
  as a pure function of the global step, so a resumed run sees the same order.
  """
  method: Method
  model: Any
  base: PyTree
  fl_cfg: Any
  num_clients: int
  sample: Callable[[int, int], dict]
  seed: int = 0
  mesh: Any = None

  def __post_init__(self):
    self.training = [p for p in self.method.phases if not p.is_search]
    self.searches = [p for p in self.method.phases if p.is_search]
    # One inner optimizer per phase; a decaying lr schedule spans the steps
    # its state counts: the phase's every repeat, or one repeat when the
    # state is reset at each (Phase.reset_opt).
    self.optimizers = {
        p.name: inner_optimizer(self.fl_cfg, self.max_steps(p) * (
            1 if p.reset_opt else p.repeats)) for p in self.training}
    self.key = jax.random.key(self.seed)
    self._updates = {
        p.name: make_clients_update(self.model, p.loss,
                                    self.optimizers[p.name],
                                    p.trainable, dropout=self.fl_cfg.dropout,
                                    grad_accum=self.fl_cfg.grad_accum)
        for p in self.training}
    self._servers = {p.name: jax.jit(p.server) for p in self.training
                     if p.server is not None}
    self._starts = {p.name: jax.jit(jax.vmap(p.start)) for p in self.training}
    self._finishes = {
        p.name: jax.jit(jax.vmap(p.finish, in_axes=(0, 0, 0, None)))
        for p in self.training}
    n = self.num_clients
    w = self.method.client_weights
    self.client_weights = np.ones(n) if w is None else np.asarray(w, float)

  # -- the schedule ------------------------------------------------------------
  @staticmethod
  def max_steps(phase: Phase) -> int:
    return int(np.max(phase.steps, initial=0))

  def schedule(self) -> list[tuple[Phase, int, int, int]]:
    """``(phase, repeat, round number, first global data step)`` of every
    repeat of every training phase, in order; index = checkpoint step - 1."""
    out, cursor = [], 0
    for p in self.training:
      k = self.max_steps(p)
      for r in range(p.repeats):
        out.append((p, r, p.first_round + r, cursor))
        cursor += k
    return out

  # -- state -----------------------------------------------------------------
  def _place(self, tree: PyTree, axis: int = 0) -> PyTree:
    """On a mesh: split the client axis over 'clients'; else unchanged."""
    if self.mesh is None or tree is None:
      return tree
    return sharding.shard_clients(tree, self.mesh, axis)

  def _download(self, phase: Phase, server: PyTree, t: int) -> PyTree:
    if phase.broadcast is None:
      return None
    d = phase.broadcast(server, jnp.int32(t))
    if not phase.personal_download:
      d = lora_lib.replicate(d, self.num_clients)
    return self._place(d)

  def initial_state(self, key: jax.Array) -> dict:
    """The state before any training (also the structure to restore into)."""
    server, client = self.method.init(key)
    opt = {}
    for p in self.training:
      download = self._download(p, server, p.first_round)
      opt[p.name] = jax.jit(jax.vmap(self.optimizers[p.name].init))(
          self._starts[p.name](client, download))
    return {'done': jnp.array(0, jnp.int32), 'server': server,
            'client': client, 'opt': opt}

  def _rngs(self, phase_index: int, index: int) -> jax.Array:
    k = jax.random.fold_in(jax.random.fold_in(self.key, phase_index), index)
    return self._place(jax.random.split(k, self.num_clients))

  def _batches(self, step0: int, num_steps: int, real: np.ndarray):
    b = dict(self.sample(step0, num_steps))
    active = np.arange(num_steps)[:, None] < real[None, :]       # [K, N]
    b['valid'] = b['valid'] * active[:, :, None]
    num_targets = num_targets_bucket(b['loss_mask'])
    return self._place(jax.tree.map(jnp.asarray, b), axis=1), num_targets

  # -- one repeat ----------------------------------------------------------------
  def run_repeat(self, state: dict, index: int, progress=None
                 ) -> tuple[dict, dict]:
    """Runs repeat ``index`` of :meth:`schedule`; returns the new state and
    its metrics (per-client loss, health, bytes, server metrics).

    The phase's optimizer state in ``state`` is donated: pass a copy to run
    the same state twice."""
    phase, _, t, cursor = self.schedule()[index]
    n = self.num_clients
    p_index = self.method.phases.index(phase) + 1
    server, client = state['server'], self._place(state['client'])
    download = self._download(phase, server, t)
    train = self._starts[phase.name](client, download)
    opt = self._place(state['opt'][phase.name])
    if phase.reset_opt:
      opt = jax.jit(jax.vmap(self.optimizers[phase.name].init))(train)
    steps = np.asarray(phase.steps)
    k = self.max_steps(phase)
    chunk = max(1, min(phase.chunk or k, k)) if k else 0
    healthy = jnp.ones(n, bool)
    losses, tokens, nonfinite = [], [], np.zeros(n, np.int64)
    for c, s0 in enumerate(range(0, k, chunk or 1)):
      real = np.clip(steps - s0, 0, chunk)
      batches, num_targets = self._batches(cursor + s0, chunk, real)
      train, opt, ok, m = self._updates[phase.name](
          self.base, train, opt, download, batches, self._rngs(p_index, t + c),
          jnp.int32(s0), num_targets=num_targets)
      train, opt = self._place((train, opt))
      healthy = healthy & ok
      losses.append(np.asarray(m.loss * m.tokens).sum(1))
      tokens.append(np.asarray(m.tokens).sum(1))
      nonfinite += np.asarray(m.nonfinite).sum(1)
      if progress is not None:
        progress(min(s0 + chunk, k), k)
    new_client, upload = self._finishes[phase.name](client, train, download,
                                                    jnp.int32(t))
    # A client that went non-finite keeps its previous state and is left out
    # of the server's mean.
    new_client = jax.tree.map(
        lambda new, old: jnp.where(
            healthy.reshape((n,) + (1,) * (new.ndim - 1)), new, old),
        new_client, client)
    weights = jnp.asarray(self.client_weights, jnp.float32) * healthy
    server_metrics = {}
    if phase.server is not None:
      server, sm = self._servers[phase.name](server, upload, weights,
                                             jnp.int32(t))
      server_metrics = {k: np.asarray(v).tolist() for k, v in sm.items()}
    tok = np.sum(tokens, 0) if tokens else np.zeros(n)
    loss = (np.sum(losses, 0) / np.maximum(tok, 1)) if losses else np.zeros(n)
    new_state = {'done': jnp.array(index + 1, jnp.int32), 'server': server,
                 'client': new_client,
                 'opt': dict(state['opt'], **{phase.name: opt})}
    metrics = {
        'phase': phase.name, 'round': t,
        'train_loss': loss.tolist(),
        'train_loss_mean': float(loss.mean()) if n else 0.0,
        'healthy': np.asarray(healthy).tolist(),
        'nonfinite_steps': nonfinite.tolist(),
        'bytes_down_per_client': per_client_bytes(download, n),
        'bytes_up_per_client': (
            per_client_bytes(upload, n) if phase.wire_bytes is None else
            np.asarray(jax.jit(jax.vmap(phase.wire_bytes))(upload),
                       np.int64).tolist()),
        **server_metrics,
    }
    return new_state, metrics

  def run_searches(self, state: dict, progress: Optional[Callable] = None
                   ) -> tuple[dict, dict]:
    """The method's search phases (after training), in order; search ``i``
    gets the key ``key(seed + 2 + i)``. ``progress(phase_name)``, when given,
    returns the ``(done, total)`` callback handed to that search."""
    metrics = {}
    client = state['client']
    for i, p in enumerate(self.searches):
      client, m = p.search(state['server'], client,
                           jax.random.key(self.seed + 2 + i),
                           progress(p.name) if progress else None)
      metrics[p.name] = {k: np.asarray(v).tolist() for k, v in m.items()}
    return dict(state, client=client), metrics


# ---------------------------------------------------------------------------
# The plain case: one adapter, token NLL (tests and benchmarks)
# ---------------------------------------------------------------------------
def sft_clients_update(model, optimizer: optax.GradientTransformation,
                       dropout: bool = False, donate: bool = True,
                       grad_accum: int = 1) -> Callable:
  """``(base, lora[N], opt[N], batches[K, N, ...], rng[N], num_targets=None)
  -> (lora[N], opt[N], healthy[N], StepMetrics[N, K])``: every client trains
  its whole adapter on the token NLL."""
  many = make_clients_update(model, losses.token_nll, optimizer,
                             dropout=dropout, donate=False,
                             grad_accum=grad_accum)

  def update(base, lora, opt_state, batches, rngs, num_targets=None):
    return many(base, lora, opt_state, None, batches, rngs,
                num_targets=num_targets)
  # Jitted itself (the inner jit inlines), so callers can ``.lower`` it.
  return jax.jit(update, static_argnames=('num_targets',),
                 donate_argnums=(1, 2) if donate else ())


def sft_client_update(model, optimizer: optax.GradientTransformation,
                      dropout: bool = False,
                      num_targets: Optional[int] = None) -> Callable:
  """One client's ``(base, lora, opt, batches[K], rng)`` (not jitted)."""
  one = make_client_update(losses.token_nll, optimizer)

  def update(base, lora, opt_state, batches, rng):
    return one(Forward(model, base, num_targets, dropout), lora, opt_state,
               None, batches, rng)
  return update


def init_opt_states(optimizer: optax.GradientTransformation,
                    lora: PyTree) -> PyTree:
  """Optimizer states for stacked trees ``[N, ...]``."""
  return jax.jit(jax.vmap(optimizer.init))(lora)
