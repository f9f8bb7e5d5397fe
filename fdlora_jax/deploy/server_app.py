"""The Flower ServerApp: the server of any method, over real SuperNodes.

Run config (pyproject's ``[tool.flwr.app.config]``, or ``flwr run
--run-config``):

* ``config``: the experiment's config file (relative to the repository);
* ``overrides``: ``'field=value ...'`` as ``--config.field=value`` would;
* ``workdir``: where results.json, metrics.jsonl and the predictions go;
* ``on-drop``: a client that does not reply within ``round-timeout``
  seconds, or whose SuperNode is gone: ``'continue'`` (the round completes
  with the others; the metrics line names who dropped, and the client goes
  on from its state before that round when it is back) or ``'wait'`` (ask
  it again, for up to ten timeouts). The searches and the evaluation
  always wait: each client holds its own data. A restarted SuperNode
  (same ``partition-id`` and ``state-dir``) rejoins under its new node id;
* ``connect-timeout``: seconds to wait for every SuperNode to connect;
* ``secagg``: ``true`` aggregates the uploads with Flower's SecAgg+ (the
  server learns their weighted mean only; :mod:`fdlora_jax.deploy.secagg`),
  with ``secagg-clipping-range``, ``secagg-quantization-range`` and
  ``secagg-threshold``.

The server never sees a client's private state: it sends each client its
download and reads back its upload and metrics, as in the simulation
(:mod:`fdlora_jax.deploy.federation`).

The server state is checkpointed in ``workdir`` after every repeat. A
ServerApp started again on the same workdir (a new ``flwr run``) resumes
after the last checkpointed repeat; each client then reads its private
state for that repeat from its ``state-dir``.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from fdlora_jax.deploy import federation, secagg, wire
from fdlora_jax.errors import ConfigError

app = ServerApp()


# Errors a reply carries when its client is gone (its SuperNode stopped or
# lost), not when the client failed: those count as no reply.
_GONE = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE,
         ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.CLIENT_APP_CRASHED)


class Nodes:
  """The SuperNode of every partition: ``{partition id: node id}``, kept up
  to date as SuperNodes stop and start. A restarted SuperNode joins with a
  new node id; it is mapped back to its client by the ``partition-id`` it
  reports, once it holds the server's config."""

  def __init__(self, grid: Grid, n: int, fingerprint: str, timeout: float):
    self.grid, self.n, self.fingerprint = grid, n, fingerprint
    self.timeout = timeout
    self.of: dict[int, int] = {}

  def connect(self) -> None:
    """Waits for all n SuperNodes to connect and hold the server's config."""
    t0 = time.time()
    nodes = list(self.grid.get_node_ids())
    while len(nodes) < self.n:
      if time.time() - t0 > self.timeout:
        raise ConfigError(f'{len(nodes)} of fl.num_clients={self.n} '
                          f'SuperNodes connected within {self.timeout:.0f} s')
      time.sleep(1.0)
      nodes = list(self.grid.get_node_ids())
    found = self._query(nodes)
    missing = sorted(set(range(self.n)) - set(found))
    if missing:
      raise ConfigError(f'no SuperNode holds partition-id {missing}')
    self.of = found

  def refresh(self) -> list[int]:
    """Maps SuperNodes that joined since (a restarted node) to their
    partitions; returns the partitions that moved."""
    new = [node for node in self.grid.get_node_ids()
           if node not in self.of.values()]
    moved = []
    for pid, node in self._query(new, rejoin=True).items():
      print(f'client {pid} rejoined as node {node} (was node '
            f'{self.of.get(pid)})', flush=True)
      self.of[pid] = node
      moved.append(pid)
    return moved

  def _query(self, nodes: list[int], rejoin: bool = False) -> dict:
    """``{partition id: node id}`` of the nodes that answer the query."""
    if not nodes:
      return {}
    out = {}
    messages = [Message(content=RecordDict({}), dst_node_id=node,
                        message_type=MessageType.QUERY) for node in nodes]
    for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
      if reply.has_error():
        if rejoin:           # not ready yet (or gone): asked again later
          continue
        raise ConfigError(f'node {reply.metadata.src_node_id}: '
                          f'{reply.error.reason}')
      info = reply.content['info']
      pid = int(info['partition-id'])
      if info['fingerprint'] != self.fingerprint:
        raise ConfigError(f'client {pid} (node {reply.metadata.src_node_id}) '
                          'runs a different config than the server')
      if pid in out:
        raise ConfigError(f'two SuperNodes hold partition-id={pid}')
      out[pid] = reply.metadata.src_node_id
    return out


def _ask(grid: Grid, nodes: Nodes, kind: str, content: dict,
         timeout: float, on_drop: str = 'wait') -> dict:
  """Sends ``content[pid]`` (a RecordDict) to the node of every partition
  ``pid``; returns ``{pid: reply content or None (dropped)}``. A client
  that does not reply within ``timeout`` (or whose node is gone) is
  dropped (``on_drop='continue'``) or asked again, at its restarted node if
  it rejoined, for up to ten timeouts (``'wait'``)."""
  want, replies = set(content), {}
  deadline = time.time() + 10 * timeout
  while want:
    messages = {pid: Message(content=content[pid],
                             dst_node_id=nodes.of[pid], message_type=kind)
                for pid in sorted(want)}
    got = list(grid.send_and_receive(list(messages.values()),
                                     timeout=timeout))
    sent = {m.metadata.message_id: pid for pid, m in messages.items()}
    for reply in got:
      pid = sent.get(reply.metadata.reply_to_message_id)
      if pid is None or pid not in want:
        continue
      if reply.has_error():
        if reply.error.code in _GONE:
          continue
        raise RuntimeError(f'client {pid} (node {nodes.of[pid]}): '
                           f'{reply.error.reason}')
      replies[pid] = reply.content
      want.discard(pid)
    if want and on_drop == 'continue':
      replies.update({pid: None for pid in want})
      break
    if want:
      if time.time() > deadline:
        raise RuntimeError(
            f'clients {sorted(want)} did not reply within '
            f'{10 * timeout:.0f} s; restart their SuperNodes with the same '
            'partition-id and state-dir to go on')
      time.sleep(min(5.0, timeout))
      nodes.refresh()
  return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
  rc = context.run_config
  c = federation.build_config(str(rc['config']), str(rc.get('overrides', '')))
  on_drop = str(rc.get('on-drop', 'continue'))
  if on_drop not in ('continue', 'wait'):
    raise ConfigError(f"on-drop={on_drop!r}: must be 'continue' or 'wait'")
  timeout = float(rc.get('round-timeout', 600))
  x = federation.prepare(c)
  server = federation.Server(x, str(rc['workdir']))
  n, engine = server.n, server.engine
  nodes = Nodes(grid, n, federation.fingerprint(c),
                float(rc.get('connect-timeout', 120)))
  nodes.connect()
  secure = str(rc.get('secagg', 'false')).lower() in ('true', '1')
  settings = secagg.Settings.from_run_config(rc) if secure else None
  if secure:
    server.check_secure()
    if n < 2 or settings.threshold < 2:
      raise ConfigError(f'secagg=true needs fl.num_clients >= 2 and '
                        f'secagg-threshold >= 2 (got {n}, '
                        f'{settings.threshold})')
  out = server.open()
  state, repeats, done = server.resume(out)
  if done:
    print(f'resumed from {out.checkpoints.directory} after repeat {done} '
          f'of {len(engine.schedule())}', flush=True)
  # The step of each client's private state: the last repeat it was in (a
  # client that dropped out of a repeat goes on from its state before it).
  held = federation.state_steps(repeats, n)
  for index in range(done, len(engine.schedule())):
    t0 = time.time()
    nodes.refresh()
    phase = engine.schedule()[index][0]
    hidden = secure and phase.server is not None
    seen = secagg.RecordingGrid(grid)
    download = engine.broadcast(index, state['server'])
    clip = float(state['dp']['clip']) if state.get('dp') else -1.0
    content = {pid: RecordDict({
        'download': wire.pack(federation.take(download, pid)
                              if download is not None else None),
        'config': ConfigRecord({'index': index, 'dp_clip': clip,
                                'secagg': hidden,
                                'state_step': held[pid]})})
        for pid in range(n)}
    replies = _ask(seen, nodes, 'train.repeat', content, timeout, on_drop)
    like = server.upload_template(index)
    metrics = [None if replies[p] is None else
               json.loads(replies[p]['metrics']['json']) for p in range(n)]
    if hidden:
      share = server.secure_weights(index, metrics)
      leaves, inside = secagg.weighted_mean(
          seen, context, {nodes.of[p]: float(share[p]) for p in range(n)
                          if metrics[p] is not None}, settings, index + 1)
      if leaves is None:
        raise RuntimeError(f'repeat {index}: too few clients stayed for '
                           'secure aggregation to finish')
      # A client that left during the protocol is not in the mean.
      metrics = [m if nodes.of[p] in inside else None
                 for p, m in enumerate(metrics)]
      flat, tree = jax.tree.flatten(like)
      aggregate = jax.tree.unflatten(tree, [
          np.asarray(v).reshape(t.shape).astype(t.dtype)
          for v, t in zip(leaves, flat)])
      state, line = server.repeat(state, index, [None] * n, metrics,
                                  aggregate=aggregate)
      line['secagg'] = {'clients': [p for p in range(n)
                                    if nodes.of[p] in inside],
                        'arrays_received': seen.arrays}
    else:
      uploads = [None if replies[p] is None else
                 wire.unpack(replies[p]['upload'], like) for p in range(n)]
      state, line = server.repeat(state, index, uploads, metrics)
    held = federation.state_steps([line], n, held)
    line['wall_s'] = time.time() - t0
    # The metrics line first, then the checkpoint (as run.train): a server
    # stopped in between resumes from the previous step, without this line.
    out.log.write(line)
    server.checkpoint(out, index + 1, state)
    repeats.append(line)
    print(f"repeat {index + 1}/{len(engine.schedule())} ({line['phase']}): "
          f"train loss {line['train_loss_mean']:.4f}"
          + (f", dropped {line['dropped_clients']}"
             if 'dropped_clients' in line else ''), flush=True)
  # The searches and the evaluation need every client (each holds its own
  # data): they wait for a dropped client to come back.
  server_state = wire.pack(state['server'])
  searched = {}
  if engine.searches:
    replies = _ask(grid, nodes, 'evaluate.search', {p: RecordDict({
        'server': server_state,
        'config': ConfigRecord({'state_step': held[p]})}) for p in range(n)},
        timeout)
    got = [wire.unpack(replies[p]['metrics']) for p in range(n)]
    searched = server.assemble_search(
        [{ph: {k: (v['value'], int(v['axis'])) for k, v in m.items()}
          for ph, m in g.items()} for g in got])
    held = [len(engine.schedule()) + 1] * n
  replies = _ask(grid, nodes, MessageType.EVALUATE, {p: RecordDict({
      'server': server_state,
      'config': ConfigRecord({'state_step': held[p]})}) for p in range(n)},
      timeout)
  rows = []
  for p in range(n):
    got = wire.unpack(replies[p]['rows'])
    names = list(replies[p]['order']['names'])
    rows.append({k: (np.asarray(got[k]['preds']),
                     np.asarray(got[k]['scores']) if 'scores' in got[k]
                     else None) for k in names})
  server.save_state(state)
  server.finish(out, rows, searched, repeats)
