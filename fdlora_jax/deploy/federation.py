"""What a deployed process computes, without Flower: one client's site and
the server, each built from the same config as the simulation.

A :class:`Site` is one client: its private state (the method's client state
and optimizer states, its slice of the simulation's), and the engine's
:meth:`~fdlora_jax.fl.engine.Engine.client_repeat` on it, with the keys,
batches and steps that client has in the simulation. The :class:`Server`
runs the engine's :meth:`~fdlora_jax.fl.engine.Engine.broadcast` and
:meth:`~fdlora_jax.fl.engine.Engine.server_repeat` on the stacked uploads,
and writes the run's outputs as :func:`fdlora_jax.run.run` does. Flower
(``fdlora_jax.deploy.client_app``, ``server_app``) only moves their arrays.

Every process builds the run with :func:`fdlora_jax.run.prepare`, so the
partition, the model and the method are the simulation's, from the same
seed: each site reads the config's data and keeps its own client's part.
A site runs the method's search and its evaluation rows at the
federation's width, with its own state in every client slot, and keeps its
own slot: exact, at N times the search's cost (a per-client search path is
future work).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fdlora_jax import run as run_lib
from fdlora_jax.errors import ConfigError
from fdlora_jax.suite import load_file, set_field

PyTree = Any
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------
# The config every process builds
# ---------------------------------------------------------------------------
def parse_overrides(text: str) -> dict:
  """``'fl.rounds=2 method=fedavg'`` -> ``{'fl.rounds': 2, 'method':
  'fedavg'}`` (values as Python literals, else strings; a value with
  spaces in quotes or brackets: ``data.answer_prefix=' '``)."""
  out = {}
  for item in _fields(text):
    if '=' not in item:
      raise ConfigError(f'deploy overrides: {item!r} is not field=value')
    key, value = item.split('=', 1)
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def _fields(text: str) -> list[str]:
  """``text`` split at spaces outside quotes and brackets."""
  items, current, quote, depth = [], '', '', 0
  for ch in text:
    if quote:
      quote = '' if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch.isspace() and depth == 0:
      if current:
        items.append(current)
      current = ''
      continue
    current += ch
  if current:
    items.append(current)
  return items


def build_config(config_file: str, overrides: str = ''
                 ) -> ml_collections.ConfigDict:
  """The run's config: ``config_file`` (relative to the repository, or
  absolute) with ``overrides`` applied."""
  path = Path(config_file)
  if not path.is_absolute():
    path = REPO / path
  c = load_file(path, 'get_config')
  for key, value in parse_overrides(overrides).items():
    set_field(c, key, value)
  return c


def fingerprint(c: ml_collections.ConfigDict) -> str:
  """A short hash of the whole config: server and sites must agree."""
  text = json.dumps(json.loads(c.to_json_best_effort()), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepare(c: ml_collections.ConfigDict) -> run_lib.Experiment:
  """:func:`fdlora_jax.run.prepare` after every field is checked."""
  return run_lib.prepare(c, run_lib.validate_config(c))


def take(tree: PyTree, i: int) -> PyTree:
  """Client ``i``'s ``[1, ...]`` slice of a ``[N, ...]`` tree."""
  return jax.tree.map(lambda x: x[i:i + 1], tree)


def widen(tree: PyTree, n: int) -> PyTree:
  """A ``[1, ...]`` slice repeated into ``n`` client slots."""
  return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), tree)


def client_axis(shape: tuple, n: int) -> Optional[int]:
  """The client axis of a per-client search metric: its first axis of size
  ``n`` (None: a value shared by all clients)."""
  return next((a for a, d in enumerate(shape) if d == n), None)


def state_steps(lines: list[dict], n: int,
                held: Optional[list[int]] = None) -> list[int]:
  """The step of each client's private state after the repeats' metrics
  ``lines`` (from ``held``, or the start): the last repeat it was in. A
  client named in a line's ``dropped_clients`` keeps its step: it goes on
  from its state before that repeat, whatever it computed meanwhile."""
  held = list(held) if held is not None else [0] * n
  for line in lines:
    for i in set(range(n)) - set(line.get('dropped_clients', [])):
      held[i] = int(line['step'])
  return held


# ---------------------------------------------------------------------------
# One client
# ---------------------------------------------------------------------------
class Site:
  """Client ``index`` of the run ``x``: its private state and its part of
  every repeat, search and evaluation."""

  def __init__(self, x: run_lib.Experiment, index: int):
    n = x.engine.num_clients
    if not 0 <= index < n:
      raise ConfigError(f'partition-id={index}: the run has '
                        f'fl.num_clients={n} (ids 0..{n - 1})')
    self.x, self.index, self.n = x, index, n
    self.engine = x.engine

  def initial(self) -> dict:
    """This client's slice of the simulation's initial client and
    optimizer states (the private state)."""
    s = self.engine.initial_state()
    return {'client': take(s['client'], self.index),
            'opt': take(s['opt'], self.index)}

  def train(self, private: dict, index: int, download: PyTree,
            dp_clip: Optional[float] = None) -> tuple[dict, PyTree, dict]:
    """Repeat ``index`` on this client: ``(private, upload [1, ...],
    metrics)``; ``download`` is its ``[1, ...]`` slice."""
    phase = self.engine.schedule()[index][0]
    client, opt, upload, m = self.engine.client_repeat(
        index, private['client'], private['opt'][phase.name], download,
        clients=np.array([self.index]), dp_clip=dp_clip)
    private = {'client': client,
               'opt': dict(private['opt'], **{phase.name: opt})}
    return private, upload, m

  def search(self, private: dict, server: PyTree) -> tuple[dict, dict]:
    """The method's searches for this client: ``(private, metrics)``, each
    metric ``(this client's slice along its client axis, the axis)`` (axis
    -1: a value shared by all clients)."""
    state = {'server': server, 'client': widen(private['client'], self.n)}
    state, metrics = self.engine.run_searches(state)
    private = dict(private, client=take(state['client'], self.index))
    mine = {}
    for phase, values in metrics.items():
      mine[phase] = {}
      for k, v in values.items():
        v = np.asarray(v)
        axis = client_axis(v.shape, self.n)
        mine[phase][k] = ((v, -1) if axis is None else
                          (np.take(v, [self.index], axis=axis), axis))
    return private, mine

  def evaluate(self, private: dict, server: PyTree) -> dict:
    """``{row: (preds [M], scores [M, O] or None)}`` on this client's test
    split."""
    x, i = self.x, self.index
    rows = x.method.rows(server, widen(private['client'], self.n))
    tests = dataclasses.replace(
        x.tests, **{f.name: getattr(x.tests, f.name)[i:i + 1]
                    for f in dataclasses.fields(x.tests)
                    if isinstance(getattr(x.tests, f.name), np.ndarray)})
    out = {}
    from fdlora_jax import evaluate as eval_lib
    for name, adapters in rows.items():
      mine = None if adapters is None else take(adapters, i)
      preds, scores = eval_lib.adapter_predictions(
          x.model, self.engine.base, mine, tests, x.task, x.config.eval,
          x.tokenizer)
      out[name] = (np.asarray(preds)[0],
                   None if scores is None else np.asarray(scores)[0])
    return out


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------
class Server:
  """The server of the run ``x``: the method's broadcast and server
  functions through the engine, and the run's outputs in ``workdir``."""

  def __init__(self, x: run_lib.Experiment, workdir: str | Path):
    self.x, self.engine = x, x.engine
    self.n = x.engine.num_clients
    self.work = Path(workdir).expanduser()
    self.t0 = time.time()

  def open(self) -> run_lib.Outputs:
    return run_lib.open_outputs(self.x, self.work)

  def initial(self) -> dict:
    """The server state and, under DP, the clip."""
    s = self.engine.initial_state()
    return {'server': s['server'], 'dp': s.get('dp')}

  def checkpoint(self, out: run_lib.Outputs, step: int, state: dict) -> None:
    """The server's state after ``step`` repeats, in the workdir's
    checkpoints (what :meth:`resume` reads back)."""
    out.checkpoints.save(step, {'server': state['server'],
                                'dp': state['dp'] or {}})

  def resume(self, out: run_lib.Outputs) -> tuple[dict, list[dict], int]:
    """``(state, metrics lines, repeats done)`` from the workdir: the newest
    checkpoint of a ServerApp that stopped, or the start. The clients hold
    their own state for that step (the ClientApp's ``state-dir``)."""
    state = self.initial()
    if not out.resume:
      return state, [], 0
    like = {'server': state['server'], 'dp': state['dp'] or {}}
    got = out.checkpoints.restore(like, out.resume)
    return ({'server': got['server'], 'dp': got['dp'] or None},
            out.log.records(), int(out.resume))

  def upload_template(self, index: int) -> PyTree:
    """The structure (shapes, dtypes) of one client's ``[1, ...]`` upload
    in repeat ``index``, to read it off the wire (tuples and NamedTuples
    included)."""
    e = self.engine
    phase, _, t, _ = e.schedule()[index]
    if not hasattr(self, '_start'):
      self._start = e.initial_state()
    client = take(self._start['client'], 0)
    download = e.broadcast(index, self._start['server'])
    download = None if download is None else take(download, 0)

    def upload(c, d):
      return e._finishes[phase.name](c, e._starts[phase.name](c, d), d,
                                     jnp.int32(t))[1]
    return jax.eval_shape(upload, client, download)

  def check_secure(self) -> None:
    """Secure aggregation gives the server only the weighted mean of the
    uploads: a method whose server needs more (the phases DP refuses, with
    no ``Phase.dp_reference``) is refused."""
    for p in self.engine.training:
      if p.server is not None and p.dp_reference is None:
        raise ConfigError(
            f'secagg=true: method {self.x.config.method!r} (phase {p.name!r})'
            ' reads individual uploads on the server, not only their '
            'weighted mean, so it cannot run under secure aggregation')

  def secure_weights(self, index: int,
                     client_metrics: list[Optional[dict]]) -> np.ndarray:
    """Each client's share ``p_i = w_i / sum_j w_j`` of the weighted mean in
    repeat ``index`` (0 for a dropped or non-finite client), sent to it for
    secure aggregation."""
    w = self.engine.client_weights * np.array(
        [m is not None and bool(m['healthy'][0]) for m in client_metrics])
    return w / w.sum() if w.sum() > 0 else w

  def repeat(self, state: dict, index: int, uploads: list[PyTree],
             client_metrics: list[Optional[dict]],
             aggregate: Optional[PyTree] = None) -> tuple[dict, dict]:
    """The server's part of repeat ``index`` from each client's ``[1, ...]``
    upload and metrics (None: the client dropped out this round; it gets
    weight 0 and its upload is never read). With secure aggregation the
    uploads are unknown and ``aggregate`` is their weighted mean
    (``[1, ...]``): every client's slot holds it, so the server function's
    weighted mean is that mean. Returns the state and the repeat's metrics
    line, as the simulation writes it."""
    phase = self.engine.schedule()[index][0]
    if aggregate is not None:
      uploads = [aggregate if m is not None else None
                 for m in client_metrics]
    present = [u for u, m in zip(uploads, client_metrics) if m is not None]
    if not present:
      raise RuntimeError(f'repeat {index}: no client replied')
    like = present[0]
    filled = [u if m is not None else jax.tree.map(jnp.zeros_like, like)
              for u, m in zip(uploads, client_metrics)]
    stacked = (jax.tree.map(lambda *u: jnp.concatenate(u), *filled)
               if jax.tree.leaves(like) else like)
    healthy = np.array([m is not None and bool(m['healthy'][0])
                        for m in client_metrics])
    unclipped = [bool(m['dp_unclipped'][0]) if m is not None and
                 'dp_unclipped' in m else False for m in client_metrics]
    server, dp_state, sm = self.engine.server_repeat(
        index, state['server'], stacked, healthy, state.get('dp'), unclipped)
    zero = {'train_loss': [0.0], 'healthy': [False], 'nonfinite_steps': [0],
            'bytes_down_per_client': [0], 'bytes_up_per_client': [0]}
    per = [m if m is not None else zero for m in client_metrics]
    line = {'phase': phase.name, 'round': self.engine.schedule()[index][2],
            'step': index + 1}
    for key in zero:
      line[key] = [v for m in per for v in m[key]]
    line['train_loss_mean'] = float(np.mean(line['train_loss']))
    line.update(sm)
    dropped = [i for i, m in enumerate(client_metrics) if m is None]
    if dropped:
      line['dropped_clients'] = dropped
    return {'server': server, 'dp': dp_state}, line

  def assemble_search(self, replies: list[dict]) -> dict:
    """The search metrics of every client (each reply from
    :meth:`Site.search`), as the simulation reports them."""
    out = {}
    for phase in replies[0]:
      out[phase] = {}
      for k, (value, axis) in replies[0][phase].items():
        out[phase][k] = (np.asarray(value).tolist() if axis < 0 else
                         np.concatenate([np.asarray(r[phase][k][0])
                                         for r in replies], axis=axis
                                        ).tolist())
    return out

  def save_state(self, state: dict) -> None:
    """The final server state, ``server_state.msgpack`` in the workdir
    (flax's state dict of it)."""
    from flax import serialization
    self.work.mkdir(parents=True, exist_ok=True)
    (self.work / 'server_state.msgpack').write_bytes(
        serialization.msgpack_serialize(serialization.to_state_dict(
            jax.tree.map(np.asarray, state['server']))))

  def finish(self, out: run_lib.Outputs, rows: list[dict], searched: dict,
             repeats: list[dict]) -> dict:
    """results.json and the predictions from every client's ``{row:
    (preds [M], scores)}``, through :func:`fdlora_jax.run.write`."""
    x = self.x
    evaluated = {}
    for name in rows[0]:
      preds = np.stack([r[name][0] for r in rows])
      scores = (None if rows[0][name][1] is None else
                np.stack([r[name][1] for r in rows]))
      outcome = x.outcome(preds, scores)
      evaluated[name] = (name, x.metrics(preds, outcome), outcome)
    references = {}
    from fdlora_jax import evaluate as eval_lib
    for key, (label, preds) in eval_lib.references(
        x.task, x.part, x.label_counts, x.tests).items():
      outcome = x.outcome(preds)
      references[key] = (label, x.metrics(preds, outcome), outcome)
    x.timing['total_s'] = time.time() - self.t0
    return run_lib.write(x, out, evaluated, references, searched, repeats)
