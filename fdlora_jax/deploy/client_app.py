"""The Flower ClientApp: one client's site of any method.

A SuperNode runs it with ``--node-config "partition-id=<i>"`` (and
optionally ``state-dir=<path>``: the private state is also written there
after every message, ``client<i>.msgpack``, and per step for the two steps
the server may ask for next, so that a run resuming a stopped ServerApp,
or a restarted SuperNode, continues from it). The
run config (pyproject's ``[tool.flwr.app.config]``) names the experiment;
the private state (the method's client state and optimizer states) lives
in Flower's context state between messages and never leaves the node.

Messages (sent by :mod:`fdlora_jax.deploy.server_app`):

* ``query``: which partition this node holds and the config's fingerprint;
* ``train.repeat``: one repeat (``index``) from its download; replies the
  upload (clipped under DP) and the client's metrics; with secure
  aggregation it keeps the upload and replies the metrics only;
* ``train`` (wrapped in Flower's ``secaggplus_mod``): the SecAgg+ protocol,
  which masks the kept upload times the client's weight
  (:mod:`fdlora_jax.deploy.secagg`);
* ``evaluate.search``: the method's searches (AdaFusion) with the server
  state; replies their metrics;
* ``evaluate``: every evaluation row on the client's own test split;
  replies the answers and option scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from fdlora_jax.deploy import federation, secagg, wire

app = ClientApp()
_SITES: dict = {}      # (config fingerprint, partition) -> Site, per process


def _site(context: Context) -> federation.Site:
  rc = context.run_config
  c = federation.build_config(str(rc['config']), str(rc.get('overrides', '')))
  if 'partition-id' not in context.node_config:
    raise ValueError('node config has no partition-id: start the SuperNode '
                     'with --node-config "partition-id=<i>"')
  pid = int(context.node_config['partition-id'])
  key = (federation.fingerprint(c), pid)
  if key not in _SITES:
    _SITES[key] = federation.Site(federation.prepare(c), pid)
  return _SITES[key]


def _private(site: federation.Site, context: Context, step: int) -> dict:
  """The private state after ``step`` repeats (``len(schedule) + 1``:
  after the searches): this run's, or, in a run that resumes a stopped
  ServerApp or on a restarted SuperNode, the one kept in ``state-dir``."""
  for key in ('private', 'before'):
    if (key in context.state
        and int(context.state[f'{key}_step']['value']) == step):
      return wire.unpack(context.state[key], site.initial())
  path = _state_file(site, context, step)
  if path is not None and path.is_file():
    from flax import serialization
    return jax.tree.map(jax.numpy.asarray, serialization.from_state_dict(
        site.initial(), serialization.msgpack_restore(path.read_bytes())))
  if step == 0:
    return site.initial()
  raise ValueError(
      f'client {site.index}: no private state after repeat {step} '
      + ('in this run, and no state-dir to read it from (start the '
         'SuperNode with --node-config "... state-dir=<path>" to resume a '
         'stopped server or a restarted node)' if path is None else
         f'in this run or in {path}'))


def _state_file(site: federation.Site, context: Context, step: int):
  directory = context.node_config.get('state-dir')
  if not directory:
    return None
  # The config's fingerprint in the name: a state-dir shared by several
  # experiments never resumes one from another's state.
  return (Path(str(directory)).expanduser()
          / f'client{site.index}.{federation.fingerprint(site.x.config)}'
            f'.step{step}.msgpack')


def _keep(site: federation.Site, context: Context, private: dict,
          step: int, before_step: int) -> None:
  """Keeps the private state after ``step``, computed from the state after
  ``before_step``, in the run's context and, with a ``state-dir``, on disk:
  ``client<i>.<config fingerprint>.step<k>.msgpack`` for these two steps
  and ``client<i>.msgpack``, the newest. The server asks next for one of
  the two: ``step``, or ``before_step`` when it did not count this repeat
  (the reply was lost, or the server stopped before checkpointing it)."""
  kept = next((context.state[key] for key in ('private', 'before')
               if key in context.state and
               int(context.state[f'{key}_step']['value']) == before_step),
              None)
  if kept is not None:
    context.state['before'] = kept
    context.state['before_step'] = ConfigRecord({'value': before_step})
  elif 'before' in context.state:     # read from state-dir (or the start)
    del context.state['before']
    del context.state['before_step']
  context.state['private'] = wire.pack(private)
  context.state['private_step'] = ConfigRecord({'value': step})
  path = _state_file(site, context, step)
  if path is None:
    return
  from flax import serialization
  path.parent.mkdir(parents=True, exist_ok=True)
  data = serialization.msgpack_serialize(serialization.to_state_dict(
      jax.tree.map(np.asarray, private)))
  path.write_bytes(data)
  (path.parent / f'client{site.index}.msgpack').write_bytes(data)
  for old in path.parent.glob(path.name.replace(f'.step{step}.', '.step*.')):
    if int(old.name.split('.step')[1].split('.')[0]) not in (step,
                                                             before_step):
      old.unlink()


def _state_step(msg: Message) -> int:
  """The step of the private state the server asks this client to go on
  from (the last repeat it was in)."""
  return int(msg.content['config']['state_step'])


def _reply(msg: Message, **records) -> Message:
  return Message(content=RecordDict(records), reply_to=msg)


def _server_state(site: federation.Site, msg: Message):
  return wire.unpack(msg.content['server'], site.engine.initial_state()['server'])


@app.query()
def hello(msg: Message, context: Context) -> Message:
  site = _site(context)
  return _reply(msg, info=ConfigRecord({
      'partition-id': site.index,
      'fingerprint': federation.fingerprint(site.x.config)}))


@app.train('repeat')
def train(msg: Message, context: Context) -> Message:
  site = _site(context)
  cfg = msg.content['config']
  index = int(cfg['index'])
  template = federation.take(site.engine.broadcast(
      index, site.engine.initial_state()['server']), 0)
  download = wire.unpack(msg.content['download'], template)
  clip = float(cfg['dp_clip'])
  step = _state_step(msg)
  private, upload, metrics = site.train(_private(site, context, step),
                                        index, download,
                                        clip if clip > 0 else None)
  _keep(site, context, private, index + 1, step)
  metrics = ConfigRecord({'json': json.dumps(metrics)})
  if bool(cfg.get('secagg', False)):
    # Kept for the SecAgg+ protocol: the server never sees it alone.
    context.state['upload'] = ArrayRecord(
        [np.asarray(x) for x in jax.tree.leaves(upload)])
    return _reply(msg, metrics=metrics)
  return _reply(msg, upload=wire.pack(upload), metrics=metrics)


@app.train(mods=[secaggplus_mod])
def secure_upload(msg: Message, context: Context) -> Message:
  """The SecAgg+ masked-vector stage: the kept upload times the weight."""
  leaves = context.state['upload'].to_numpy_ndarrays()
  return secagg.client_reply(msg, leaves, float(context.run_config.get(
      'secagg-clipping-range', 8.0)))


@app.evaluate('search')
def search(msg: Message, context: Context) -> Message:
  site = _site(context)
  trained = len(site.engine.schedule())
  step = _state_step(msg)
  private, metrics = site.search(_private(site, context, step),
                                 _server_state(site, msg))
  _keep(site, context, private, trained + 1, step)
  return _reply(msg, metrics=wire.pack(
      {p: {k: {'value': v, 'axis': np.int32(a)} for k, (v, a) in m.items()}
       for p, m in metrics.items()}))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
  site = _site(context)
  step = _state_step(msg)
  rows = site.evaluate(_private(site, context, step),
                       _server_state(site, msg))
  return _reply(msg, rows=wire.pack(
      {name: {'preds': p, **({} if s is None else {'scores': s})}
       for name, (p, s) in rows.items()}),
      order=ConfigRecord({'names': list(rows)}))
