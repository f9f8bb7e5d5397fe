"""What a federated method declares: :class:`Phase`, :class:`Method` and what
it may read of the run, :class:`Setup`.

A method (``fdlora_jax/fl/methods/*.py``) is pure functions over pytrees: what
the server broadcasts, what a client trains and with which loss, what it
uploads, how the server combines uploads, and which adapters to evaluate. It
holds no ``jit``, ``vmap``, masks, RNG or placement: the engine
(:mod:`fdlora_jax.fl.engine`) owns those. Every function a method supplies
has its signature below, as a Protocol; all see one client (the engine vmaps
them) except ``server``, ``broadcast``, ``search``, ``init`` and ``rows``.

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
from typing import Any, Callable, NamedTuple, Optional, Protocol, Sequence

import jax
import numpy as np

PyTree = Any
Metrics = dict           # name -> array or number, written to metrics.jsonl


# ---------------------------------------------------------------------------
# The functions a method supplies
# ---------------------------------------------------------------------------
class Start(Protocol):
  def __call__(self, client: PyTree, download: PyTree) -> PyTree:
    """The tree the K steps optimise (``train``)."""


class Loss(Protocol):
  def __call__(self, fwd: 'Forward', train: PyTree, download: PyTree,
               batch: dict, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(mean loss, target count)`` of one batch. ``fwd`` is a
    :class:`fdlora_jax.fl.step.Forward` (the frozen base applied with an
    adapter); ``fwd.step`` is the local step within the repeat, as
    :class:`Trainable` gets it."""


class Trainable(Protocol):
  def __call__(self, train: PyTree, i: jax.Array) -> Optional[PyTree]:
    """A mask tree (bool, broadcastable to each leaf) or None at local step
    ``i`` (0-based within the repeat, traced): entries outside the mask stay
    bit-identical. A mask that depends on ``i`` alternates parts within a
    round (FedRep: head steps, then body)."""


class Finish(Protocol):
  def __call__(self, client: PyTree, train: PyTree, download: PyTree,
               t: jax.Array) -> tuple[PyTree, PyTree]:
    """``(client, upload)``; ``upload`` is what leaves the client (``None``:
    nothing)."""


class Broadcast(Protocol):
  def __call__(self, server: PyTree, t: jax.Array) -> PyTree:
    """The download, shared by all clients (``None``: nothing); with
    ``Phase.personal_download``, ``[N, ...]`` leaves, one per client."""


class Server(Protocol):
  def __call__(self, server: PyTree, uploads: PyTree, weights: jax.Array,
               t: jax.Array) -> tuple[PyTree, Metrics]:
    """The new server state from the ``[N, ...]`` uploads and ``[N]``
    weights (non-finite clients at 0)."""


class WireBytes(Protocol):
  def __call__(self, upload: PyTree) -> jax.Array:
    """The bytes one client's upload puts on the wire, when that is not the
    size of its arrays (e.g. factors of a rank chosen at run time, padded
    to a fixed shape). The same signature counts one client's download
    (``Phase.download_bytes``), e.g. only the new part of a stack that grows
    by a slot each round."""


class Search(Protocol):
  def __call__(self, server: PyTree, client: PyTree, key: jax.Array,
               progress: Optional[Callable[[int, int], None]]
               ) -> tuple[PyTree, Metrics]:
    """``(client, metrics)``; runs once, after the training phases (e.g.
    AdaFusion), not vmapped by the engine. ``progress`` is None or a host
    ``(done, total)`` callback."""


class Init(Protocol):
  def __call__(self, key: jax.Array) -> tuple[PyTree, PyTree]:
    """``(server state, client state [N, ...])``."""


class Rows(Protocol):
  def __call__(self, server: PyTree, client: PyTree
               ) -> dict[str, Optional[PyTree]]:
    """``{name: adapters [N, ...] or None (the base)}``, in order. A row
    may be a :class:`fdlora_jax.lora.InstanceMix`: adapters mixed per test
    instance (FedDPA)."""


class EvalContext(NamedTuple):
  """What a method puts before every evaluation prompt."""
  shots: int                     # k: demonstrations asked for per prompt
  demos: Sequence[np.ndarray]    # per client, own training examples shown
  length: int = 0                # tokens of a whole prompt (0: data.max_length)


class Context(Protocol):
  def __call__(self, train: Sequence[np.ndarray]) -> EvalContext:
    """The evaluation prompts' context, from each client's training
    indices (``Partition.train``): e.g. k-shot's demonstrations."""


# ---------------------------------------------------------------------------
# What a method declares
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Phase:
  """One phase of a method: ``repeats`` repeats of local training (``start``,
  ``loss``, ``trainable``, ``finish``, ``broadcast``, ``server``,
  ``wire_bytes``; see their Protocols), or a gradient-free ``search`` run
  once.

  ``steps`` is ``[N]`` real local steps per client per repeat (the engine
  masks the rest); ``first_round`` numbers the repeats (0 for a stage before
  the federated rounds, 1 for the first round); ``chunk`` caps the steps per
  compiled call (progress, memory). ``personal_download``: ``broadcast``
  returns one download per client. ``reset_opt``: a fresh optimizer state at
  every repeat. ``wire_bytes`` defaults to the size of the upload's arrays,
  ``download_bytes`` to the size of the download's. ``dp_reference``
  ((client, download) -> a tree of the upload's structure, or None for
  zero; known to the server) is what an upload is measured against under
  client-level DP
  (:mod:`fdlora_jax.fl.privacy`); a phase sets it only when its ``server``
  reads the uploads through their weighted mean alone, and ``config.dp``
  refuses a method with a server phase that does not.
  """
  name: str
  repeats: int = 1
  steps: Optional[np.ndarray] = None
  first_round: int = 1
  chunk: int = 0
  start: Optional[Start] = None
  loss: Optional[Loss] = None
  trainable: Optional[Trainable] = None
  finish: Optional[Finish] = None
  broadcast: Optional[Broadcast] = None
  personal_download: bool = False
  server: Optional[Server] = None
  reset_opt: bool = False
  search: Optional[Search] = None
  wire_bytes: Optional[WireBytes] = None
  download_bytes: Optional[WireBytes] = None
  dp_reference: Optional[Callable[[PyTree, PyTree], PyTree]] = None

  @property
  def is_search(self) -> bool:
    return self.search is not None


@dataclasses.dataclass(frozen=True)
class Method:
  """A federated method, as the engine and ``run()`` see it.

  ``init`` makes the state; ``rows`` is what the final evaluation scores.
  headline: the row that stands for the method in comparisons (default: the
    first row).
  progress_rows: rows evaluated every ``eval.every`` rounds (default: none).
  client_weights: ``[N]`` server weights before the health mask.
  context: what every evaluation prompt carries before the question
    (default: nothing; k-shot: demonstrations).
  resumable: config fields (prefixes, e.g. ``'fdlora.fusion.'``) a resumed
    run may change because they do not shape the saved state.
  """
  name: str
  init: Init
  phases: tuple[Phase, ...]
  rows: Rows
  headline: str = ''
  progress_rows: Optional[Rows] = None
  client_weights: Optional[np.ndarray] = None
  context: Optional[Context] = None
  resumable: tuple[str, ...] = ()


# ---------------------------------------------------------------------------
# The run's random keys
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Keys:
  """Every random key of a run, from its one seed, each purpose once.

  The values are those the code drew before keys had one home (seed
  offsets), so outputs stay bit-identical: ``init`` ``key(seed + 1)``;
  training steps ``fold_in(fold_in(key(seed), phase), index)``; search
  ``i`` ``key(seed + 2 + i)``; ``rows`` ``key(seed + 3)``; a fresh adapter
  per round and client ``fold_in(fold_in(key(seed + 4), round), client)``;
  DP noise ``fold_in(key(seed + 5), repeat index)``.
  """
  seed: int

  def init(self) -> jax.Array:
    """The method's :class:`Init`."""
    return jax.random.key(self.seed + 1)

  def steps(self, phase: int, index: int) -> jax.Array:
    """One compiled call of training phase number ``phase`` (1-based),
    numbered ``index`` (round + chunk); the engine splits it per client."""
    return jax.random.fold_in(
        jax.random.fold_in(jax.random.key(self.seed), phase), index)

  def search(self, i: int) -> jax.Array:
    """The ``i``-th search phase (0-based)."""
    return jax.random.key(self.seed + 2 + i)

  def fresh(self, round_: jax.Array, client: jax.Array) -> jax.Array:
    """A fresh adapter drawn by client ``client`` at repeat ``round_`` (both
    may be traced), for methods that restart LoRA every round (FLoRA)."""
    return jax.random.fold_in(
        jax.random.fold_in(jax.random.key(self.seed + 4), round_), client)

  def dp(self, index: int) -> jax.Array:
    """The server's noise for client-level DP in repeat ``index`` of the
    schedule (0-based over all phases)."""
    return jax.random.fold_in(jax.random.key(self.seed + 5), index)

  def rows(self) -> jax.Array:
    """Random choices among the rows to evaluate (e.g. FDLoRA's random
    fusion baseline)."""
    return jax.random.key(self.seed + 3)


# ---------------------------------------------------------------------------
# What a method may read of the run
# ---------------------------------------------------------------------------
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
  lora_init: Callable[[jax.Array], PyTree]  # key -> a fresh adapter
  # [O] token id that starts each answer option (None when two options
  # start with the same token): class logits for option-level losses.
  option_ids: Optional[np.ndarray] = None

  @property
  def keys(self) -> Keys:
    """The run's keys (the engine's, from ``config.seed``)."""
    return Keys(int(self.config.seed))

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
