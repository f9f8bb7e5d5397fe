"""The Flower deployment (fdlora_jax/deploy/): pytrees on the wire, a site
and the server run one client at a time equal the vmapped simulation, a
dropped client, bad input, and the whole thing over real processes: a
SuperLink and three SuperNodes on 127.0.0.1, `flwr run`, for FedAvg and
FDLoRA, against the simulation's state and metrics."""

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from fdlora_jax.deploy import federation, local
from fdlora_jax.errors import ConfigError

# configs/tiny.py, 3 clients, 2 rounds, sized to seconds per step.
OVERRIDES = ('fl.num_clients=3 fl.rounds=2 fl.inner_steps=1 '
             'fl.local_epochs=0.25 data.synthetic_windows=40 '
             'data.min_examples_per_client=3 data.few_shot=2 eval.every=0 '
             'fdlora.fusion.steps=1 fdlora.fusion.population_size=4')


def config(method, tmp, **extra):
  text = (f'{OVERRIDES} method={method} '
          f"model.tokenizer_cache='{tmp / 'tok'}' "
          + ' '.join(f'{k}={v!r}' for k, v in extra.items()))
  return federation.build_config('configs/tiny.py', text), text


def simulate(c):
  """The simulation's final state, search metrics, per-client answers and
  each row's metrics, and its repeats' metrics."""
  x = federation.prepare(c)
  state, repeats = x.engine.initial_state(), []
  for index in range(len(x.engine.schedule())):
    state, m = x.engine.run_repeat(state, index)
    repeats.append(m)
  state, searched = x.engine.run_searches(state)
  rows = x.method.rows(state['server'], state['client'])
  preds, metrics = {}, {}
  for k, v in rows.items():
    preds[k], outcome = x.predict(v)
    metrics[k] = x.metrics(preds[k], outcome)
  return x, state, searched, preds, metrics, repeats


def deploy_in_process(c, tmp, dropped=None):
  """Every site and the server in this process, one client at a time: what
  the Flower apps do, without the wire. ``dropped``: ``{repeat: [clients
  that sat it out]}`` (their state stays as it was)."""
  x = federation.prepare(c)
  sites = [federation.Site(x, i) for i in range(x.engine.num_clients)]
  server = federation.Server(x, tmp / 'work')
  private = [s.initial() for s in sites]
  state = server.initial()
  for index in range(len(x.engine.schedule())):
    download = x.engine.broadcast(index, state['server'])
    clip = float(state['dp']['clip']) if state.get('dp') else None
    away = (dropped or {}).get(index, [])
    outs = [(p, None, None) if s.index in away else
            s.train(p, index, None if download is None else
                    federation.take(download, s.index), clip)
            for s, p in zip(sites, private)]
    private = [o[0] for o in outs]
    state, _ = server.repeat(state, index, [o[1] for o in outs],
                             [o[2] for o in outs])
  searched = {}
  if x.engine.searches:
    got = [s.search(p, state['server']) for s, p in zip(sites, private)]
    private = [g[0] for g in got]
    searched = server.assemble_search([g[1] for g in got])
  rows = [s.evaluate(p, state['server']) for s, p in zip(sites, private)]
  return state, private, searched, rows


def close(a, b):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-4,
                               atol=1e-5)


# FedAvg without DP runs through real processes below.
@pytest.mark.parametrize('method,dp', [('fdlora', False), ('fedavg', True)])
def test_sites_one_at_a_time_equal_the_simulation(method, dp, tmp_path):
  # Under DP each site clips its own update and the server adds the noise:
  # the same numbers as the simulation, which does both in one place.
  c, _ = config(method, tmp_path)
  if dp:
    c.dp.enabled, c.dp.clip, c.dp.noise_multiplier = True, 0.05, 0.5
  x, sim, sim_searched, sim_preds, _, _ = simulate(c)
  state, private, searched, rows = deploy_in_process(c, tmp_path)
  close(state['server'], sim['server'])
  for i, p in enumerate(private):
    close(p['client'], federation.take(sim['client'], i))
  assert set(searched) == set(sim_searched)
  for phase in searched:
    for k in searched[phase]:
      np.testing.assert_allclose(searched[phase][k], sim_searched[phase][k],
                                 rtol=1e-4, atol=1e-5)
  for name, preds in sim_preds.items():
    got = np.stack([r[name][0] for r in rows])
    np.testing.assert_array_equal(got, preds)


def test_a_dropped_client_gets_weight_zero_and_is_named(tmp_path):
  c, _ = config('fedavg', tmp_path)
  x = federation.prepare(c)
  sites = [federation.Site(x, i) for i in range(3)]
  server = federation.Server(x, tmp_path / 'work')
  state = server.initial()
  download = x.engine.broadcast(1, state['server'])
  outs = [s.train(s.initial(), 1, federation.take(download, s.index))
          for s in sites]
  # Client 1 never replied: the round completes with clients 0 and 2.
  new, line = server.repeat(state, 1, [outs[0][1], None, outs[2][1]],
                            [outs[0][2], None, outs[2][2]])
  assert line['dropped_clients'] == [1]
  assert line['healthy'] == [True, False, True]
  assert line['participants'] == 2
  w = x.method.client_weights
  w = np.ones(3) if w is None else np.asarray(w, float)
  want = jax.tree.map(
      lambda a, b: (w[0] * a[0] + w[2] * b[0]) / (w[0] + w[2]),
      outs[0][1], outs[2][1])
  close(new['server']['global'], want)


def test_state_steps_follow_the_repeats_each_client_was_in():
  lines = [{'step': 1}, {'step': 2, 'dropped_clients': [2]},
           {'step': 3, 'dropped_clients': [1, 2]}, {'step': 4}]
  assert federation.state_steps(lines[:3], 3) == [3, 2, 1]
  assert federation.state_steps(lines[3:], 3, [3, 2, 1]) == [4, 4, 4]
  assert federation.state_steps([], 2) == [0, 0]


def test_a_client_back_from_a_drop_goes_on_from_its_state_before_it(
    tmp_path):
  """Client 2 finished repeat 1 but its reply was lost (its node died):
  the server counted it out, so in repeat 2 it goes on from its state
  after repeat 0, on a restarted node (an empty context: read from its
  state-dir), as if it had sat repeat 1 out."""
  pytest.importorskip('flwr')
  from flwr.app import Context, RecordDict
  from fdlora_jax.deploy import client_app
  c, _ = config('fedavg', tmp_path)
  x = federation.prepare(c)
  sites = [federation.Site(x, i) for i in range(3)]
  server = federation.Server(x, tmp_path / 'work')

  def context(i):
    return Context(run_id=1, node_id=i, node_config={
        'partition-id': i, 'state-dir': str(tmp_path / 'nodes')},
        state=RecordDict(), run_config={})
  ctx = [context(i) for i in range(3)]
  state, held, lines = server.initial(), [0, 0, 0], []
  for index in range(len(x.engine.schedule())):
    download = x.engine.broadcast(index, state['server'])
    outs = []
    for site in sites:
      before = client_app._private(site, ctx[site.index], held[site.index])
      private, upload, m = site.train(before, index,
                                      federation.take(download, site.index))
      client_app._keep(site, ctx[site.index], private, index + 1,
                       held[site.index])
      outs.append((upload, m))
    if index == 1:           # client 2's reply never came; its node restarts
      outs[2] = (None, None)
      ctx[2] = context(2)
    state, line = server.repeat(state, index, [o[0] for o in outs],
                                [o[1] for o in outs])
    lines.append(line)
    held = federation.state_steps([line], 3, held)
  assert [l.get('dropped_clients') for l in lines] == [
      None, [2]] + [None] * (len(lines) - 2)
  want, private, _, _ = deploy_in_process(c, tmp_path, dropped={1: [2]})
  close(state['server'], want['server'])
  last = len(lines)
  for i in range(3):
    close(client_app._private(sites[i], ctx[i], last)['client'],
          private[i]['client'])


def test_ask_drops_or_waits_for_a_node_that_is_gone(monkeypatch):
  """The server's round trip (server_app._ask) against a stand-in grid:
  node 12 (client 2) is gone (Flower answers NODE_UNAVAILABLE) and comes
  back as node 13. 'continue' completes the round without it; 'wait' asks
  again at the new node; a client that fails stops the run with its name;
  one that never comes back stops 'wait' at its deadline."""
  pytest.importorskip('flwr')
  from flwr.app import ConfigRecord, Error, Message, RecordDict
  from flwr.common.constant import ErrorCode
  from flwr.supercore.task_identity import TaskIdentity
  from fdlora_jax.deploy import server_app
  monkeypatch.setattr(TaskIdentity, '_run_id', 1)
  monkeypatch.setattr(TaskIdentity, '_task_id', 1)
  monkeypatch.setattr(TaskIdentity, '_node_id', 1)

  class Grid:
    def __init__(self, fail=None, back=True):
      self.online, self.fail, self.back = [10, 11, 12], fail, back

    def get_node_ids(self):
      return list(self.online)

    def send_and_receive(self, messages, timeout):
      out = []
      for m in messages:
        m.metadata.__dict__['_message_id'] = m.object_id   # as on a push
        node = m.metadata.dst_node_id
        TaskIdentity._node_id = node
        if node == 12:
          out.append(Message(Error(code=ErrorCode.NODE_UNAVAILABLE,
                                   reason='gone'), reply_to=m))
          self.online = [10, 11] + ([13] if self.back else [])
        elif node == self.fail:
          out.append(Message(Error(
              code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
              reason='ValueError: no private state'), reply_to=m))
        elif m.metadata.message_type == 'query':
          out.append(Message(RecordDict({'info': ConfigRecord({
              'partition-id': min(node - 10, 2), 'fingerprint': 'f'})}),
              reply_to=m))
        else:
          out.append(Message(RecordDict({'at': ConfigRecord({
              'node': node})}), reply_to=m))
      TaskIdentity._node_id = 1
      return out

  def ask(grid, on_drop):
    nodes = server_app.Nodes(grid, 3, 'f', timeout=0.01)
    nodes.of = {0: 10, 1: 11, 2: 12}
    got = server_app._ask(grid, nodes, 'train.repeat',
                          {p: RecordDict({}) for p in range(3)}, 0.01,
                          on_drop)
    return nodes, {p: None if r is None else r['at']['node']
                   for p, r in got.items()}

  grid = Grid()
  nodes, got = ask(grid, 'continue')
  assert got == {0: 10, 1: 11, 2: None}
  assert nodes.refresh() == [2] and nodes.of == {0: 10, 1: 11, 2: 13}
  assert nodes.refresh() == []
  nodes, got = ask(Grid(), 'wait')
  assert got == {0: 10, 1: 11, 2: 13}
  with pytest.raises(RuntimeError, match='client 1 .*no private state'):
    ask(Grid(fail=11), 'wait')
  with pytest.raises(RuntimeError, match=r'clients \[2\] did not reply'
                     '.*same partition-id and state-dir'):
    ask(Grid(back=False), 'wait')


def test_a_restarted_server_resumes_with_the_clients_kept_state(tmp_path):
  """The ServerApp checkpoints after every repeat and the ClientApp keeps its
  private state per step in its state-dir: a server stopped after a repeat
  and started again (a new run: the clients' run contexts are empty)
  finishes with the simulation's state. Client 0 had already done the next
  repeat when the server stopped; it resumes one step back."""
  pytest.importorskip('flwr')
  from flwr.app import Context, RecordDict
  from fdlora_jax.deploy import client_app
  c, _ = config('fdlora', tmp_path)
  x, sim, _, _, _, sim_repeats = simulate(c)
  sites = [federation.Site(x, i) for i in range(3)]
  nodes = tmp_path / 'nodes'

  def contexts(state_dir=nodes):
    return [Context(run_id=1, node_id=i, node_config={
        'partition-id': i, **({'state-dir': str(state_dir)} if state_dir
                              else {})}, state=RecordDict(), run_config={})
        for i in range(3)]

  def repeats(server, out, state, ctx, start, stop):
    for index in range(start, stop):
      download = x.engine.broadcast(index, state['server'])
      outs = []
      for site, context in zip(sites, ctx):
        before = client_app._private(site, context, index)
        private, upload, m = site.train(
            before, index, federation.take(download, site.index))
        client_app._keep(site, context, private, index + 1, index)
        outs.append((upload, m))
      state, line = server.repeat(state, index, [o[0] for o in outs],
                                  [o[1] for o in outs])
      out.log.write(line)
      server.checkpoint(out, index + 1, state)
    return state

  total = len(x.engine.schedule())
  stop = total - 1
  server = federation.Server(x, tmp_path / 'work')
  out = server.open()
  state, lines, done = server.resume(out)
  assert (lines, done) == ([], 0)
  ctx = contexts()
  repeats(server, out, state, ctx, 0, stop)
  # Client 0 finished repeat `stop` before the server stopped.
  download = x.engine.broadcast(stop, server.resume(out)[0]['server'])
  before = client_app._private(sites[0], ctx[0], stop)
  ahead, _, _ = sites[0].train(before, stop, federation.take(download, 0))
  client_app._keep(sites[0], ctx[0], ahead, stop + 1, stop)
  out.checkpoints.close()
  tag = federation.fingerprint(c)
  assert {p.name for p in nodes.glob('client0.*')} == {
      'client0.msgpack', f'client0.{tag}.step{stop}.msgpack',
      f'client0.{tag}.step{stop + 1}.msgpack'}

  again = federation.Server(x, tmp_path / 'work')
  out = again.open()
  state, lines, done = again.resume(out)
  assert done == stop and len(lines) == stop
  state = repeats(again, out, state, contexts(), stop, total)
  close(state['server'], sim['server'])
  # Each client's search (AdaFusion) from its kept state, read back from
  # its state-dir as evaluation would in yet another run.
  for site, context in zip(sites, contexts()):
    before = client_app._private(site, context, total)
    searched, _ = site.search(before, state['server'])
    client_app._keep(site, context, searched, total + 1, total)
  for i, context in enumerate(contexts()):
    close(client_app._private(sites[i], context, total + 1)['client'],
          federation.take(sim['client'], i))
  np.testing.assert_allclose(
      [l['train_loss'] for l in out.log.records()],
      [m['train_loss'] for m in sim_repeats], rtol=1e-4)
  # Without a state-dir a new run has nothing to resume from: one line.
  with pytest.raises(ValueError, match='client 1: no private state after '
                     f'repeat {stop}.*state-dir'):
    client_app._private(sites[1], contexts(None)[1], stop)


def test_bad_partition_and_overrides_name_the_cause(tmp_path):
  c, _ = config('fedavg', tmp_path)
  x = federation.prepare(c)
  with pytest.raises(ConfigError, match='partition-id=3.*fl.num_clients=3'):
    federation.Site(x, 3)
  with pytest.raises(ConfigError, match='not field=value'):
    federation.parse_overrides('fl.rounds')
  with pytest.raises(ConfigError, match='fl.roundz'):
    federation.build_config('configs/tiny.py', 'fl.roundz=2')


def test_a_super_node_that_cannot_reach_the_super_link_gives_up(tmp_path):
  """As docs/deploy.md says: with --max-wait-time, a SuperNode whose
  SuperLink is not there stops within about that time, saying so."""
  if not local.available():
    pytest.skip('flwr is not installed')
  t0 = time.time()
  # Output to a file: the SuperExec process the SuperNode starts outlives
  # it for a moment and would hold a pipe open.
  with open(tmp_path / 'node.log', 'w') as log:
    proc = subprocess.run(
        [str(local.BINDIR / 'flower-supernode'), '--insecure', '--superlink',
         f'127.0.0.1:{local.free_port()}', '--port', str(local.free_port()),
         '--max-wait-time', '3', '--node-config', 'partition-id=0'],
        env=dict(os.environ, FLWR_TELEMETRY_ENABLED='0',
                 FLWR_HOME=str(tmp_path)),
        stdout=log, stderr=subprocess.STDOUT, timeout=120)
  out = (tmp_path / 'node.log').read_text()
  assert proc.returncode == 1, (proc.returncode, out[-2000:])
  assert 'could not establish a connection to the SuperLink' in out, (
      out[-2000:])
  assert time.time() - t0 < 60


def test_the_wire_keeps_bits_and_structure():
  pytest.importorskip('flwr')
  from fdlora_jax.deploy import wire
  opt = optax.sgd(0.1, momentum=0.9).init({'w': np.ones((2, 3), np.float32)})
  tree = {'global': {'a': np.arange(6, dtype=np.float32).reshape(2, 3)},
          'outer': opt, 'k': np.int32(3)}
  back = wire.unpack(wire.pack(tree), tree)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  for u, v in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(u, v)
    assert np.asarray(u).dtype == np.asarray(v).dtype
  assert wire.unpack(wire.pack(None)) is None


# ---------------------------------------------------------------------------
# Real processes
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def flower_processes(tmp_path):
  """:func:`fdlora_jax.deploy.local.local_federation` of three SuperNodes
  (state-dir ``tmp_path/nodes``), or a skip where Flower is missing."""
  if not local.available():
    pytest.skip('flwr is not installed')
  with local.local_federation(tmp_path, 3) as federation:
    yield federation


@pytest.mark.slow
@pytest.mark.parametrize('method,secure', [('fedavg', False),
                                           ('fdlora', False),
                                           ('fedavg', True)])
def test_a_real_federation_equals_the_simulation(method, secure, tmp_path):
  """`flwr run` on a SuperLink and three SuperNodes (separate processes,
  gRPC over 127.0.0.1): the same server state, per-client adapters and
  per-client metrics as the vmapped simulation. With SecAgg+ the server
  receives no upload (no array at all in any reply of a round) and gets
  the weighted mean within the quantisation error."""
  # SecAgg+: one round with no local steps. FedAvg's local phase still has
  # one repeat (of 0 steps) whose server step averages, so there are two
  # secure aggregations, each within k = 3 quanta of the plain weighted sum
  # (Flower's stochastic rounding, under a quantum per client). SGD, not
  # AdamW: Adam's first step is about lr * sign(g), and the first
  # aggregation's rounding can flip a near-zero gradient's sign, a jump of
  # 2 lr p_i (about 6 quanta here) that SGD does not make.
  c, overrides = config(method, tmp_path, **(
      {'fl.rounds': 1, 'fl.local_epochs': 0.0,
       'fl.inner_optimizer': 'sgd'} if secure else {}))
  work, nodes = tmp_path / 'work', tmp_path / 'nodes'
  with flower_processes(tmp_path) as flwr_run:
    run = flwr_run(
        f'config="configs/tiny.py" overrides="{overrides}" workdir="{work}"'
        + (' secagg=true secagg-clipping-range=1.0 '
           'secagg-quantization-range=65536' if secure else ''))
    run.wait(timeout=1500)
    assert (work / 'results.json').is_file(), (
        (tmp_path / 'flwr_run.log').read_text()[-3000:]
        + (tmp_path / 'node0.log').read_text()[-2000:])
  from fdlora_jax.fl.engine import communication
  x, sim, _, _, metrics, repeats = simulate(c)
  server, clients = local.final_states(work, nodes, sim, 3)
  for i, client in enumerate(clients):
    close(client, federation.take(sim['client'], i))
  lines = [json.loads(l) for l in (work / 'metrics.jsonl').open()]
  if secure:
    # Against the simulation's plain weighted mean of the same uploads, with
    # quanta q = 2 / 2**16 over [-1, 1], coarse enough to stand out from the
    # float difference between a site's per-client step and the vmapped one
    # (the plain runs are nearer 1e-6). The rounding shows (over thousands
    # of values the largest difference is above a quarter quantum), and it
    # stays within two aggregations' 3 quanta each.
    q = 2 / 2 ** 16
    diff = max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
               for u, v in zip(jax.tree.leaves(server),
                               jax.tree.leaves(sim['server'])))
    assert q / 4 < diff <= 2 * 3 * q + 1e-6, (diff / q, q)
    # No upload reached the server: no array in any reply of any repeat
    # (FedAvg aggregates after every one; the final line aside).
    assert [l.get('secagg') for l in lines[:-1]] == [
        {'clients': [0, 1, 2], 'arrays_received': 0}] * (len(lines) - 1)
    return
  close(server, sim['server'])
  # Per-client metrics of every row, and the bytes on the wire.
  got = json.loads((work / 'results.json').read_text())
  assert set(got['models']) == set(metrics)
  for row, m in metrics.items():
    assert got['models'][row]['per_client'] == m['per_client'], row
  assert got['communication']['bytes_total'] == communication(
      repeats, 3)['bytes_total']
  np.testing.assert_allclose([l['train_loss'] for l in lines[:-1]],
                             [m['train_loss'] for m in repeats], rtol=1e-4)


@pytest.mark.slow
def test_a_killed_server_app_resumes_in_a_new_run(tmp_path):
  """The ServerApp process is killed (SIGKILL) once a repeat is
  checkpointed; a second `flwr run` on the same workdir resumes there, the
  SuperNodes' ClientApps read their private state from their state-dir, and
  the run ends with the simulation's server state, adapters, losses and
  privacy spent. Under client-level DP: the clip goes over the wire, and
  the noise after the restart is the simulation's; with adaptive
  clipping, the clip the server moves (checkpointed with its state) and
  each client's unclipped flag go over the wire too."""
  import signal
  c, overrides = config('fedavg', tmp_path, **{
      'fl.rounds': 4, 'dp.enabled': True, 'dp.clip': 0.05,
      'dp.noise_multiplier': 0.5, 'dp.adaptive': True})
  work, nodes = tmp_path / 'work', tmp_path / 'nodes'
  run_config = (f'config="configs/tiny.py" overrides="{overrides}" '
                f'workdir="{work}"')
  with flower_processes(tmp_path) as flwr_run:
    first = flwr_run(run_config)
    deadline = time.time() + 900
    while not (work / 'checkpoints' / '1').is_dir():
      assert time.time() < deadline and first.poll() is None, (
          (tmp_path / 'flwr_run.log').read_text()[-3000:])
      time.sleep(0.2)
    superlink = int((tmp_path / 'superlink.pid').read_text())
    apps = [p for p in local.descendants(superlink)
            if b'flwr-serverapp' in Path(f'/proc/{p}/cmdline').read_bytes()]
    assert apps, 'no flwr-serverapp process below the SuperLink'
    for p in apps:
      os.kill(p, signal.SIGKILL)
    assert not (work / 'results.json').exists()
    try:
      first.wait(timeout=120)
    except subprocess.TimeoutExpired:
      first.kill()
    second = flwr_run(run_config)
    second.wait(timeout=1500)
    log = (tmp_path / 'flwr_run.log').read_text()
    assert (work / 'results.json').is_file(), log[-3000:]
  assert 'resumed from' in log, log[-3000:]
  x, sim, _, _, metrics, repeats = simulate(c)
  server, clients = local.final_states(work, nodes, sim, 3)
  close(server, sim['server'])
  for i, client in enumerate(clients):
    close(client, federation.take(sim['client'], i))
  got = json.loads((work / 'results.json').read_text())
  for row, m in metrics.items():
    assert got['models'][row]['per_client'] == m['per_client'], row
  lines = [json.loads(l) for l in (work / 'metrics.jsonl').open()]
  assert [l['step'] for l in lines[:-1]] == list(range(1, len(repeats) + 1))
  np.testing.assert_allclose([l['train_loss'] for l in lines[:-1]],
                             [m['train_loss'] for m in repeats], rtol=1e-4)
  np.testing.assert_allclose([l['dp_epsilon'] for l in lines[:-1]],
                             [m['dp_epsilon'] for m in repeats])
  clips = [l['dp_clip'] for l in lines[:-1]]
  assert len(set(clips)) > 2, clips           # the clip moved, round by round
  np.testing.assert_allclose(clips, [m['dp_clip'] for m in repeats],
                             rtol=1e-5)
  assert got['privacy']['epsilon'] == pytest.approx(
      repeats[-1]['dp_epsilon'])


@pytest.mark.slow
def test_a_killed_super_node_drops_out_and_rejoins(tmp_path):
  """SuperNode 2 is killed (SIGKILL, its ClientApp with it) once repeat 0
  is checkpointed, and started again at once (a new node id, the same
  partition-id and state-dir). With on-drop='continue' the next round
  completes without it once Flower reports its old node unavailable (its
  heartbeats stopped); metrics.jsonl names it; the restarted node rejoins
  and goes on from its state before that round, read from its state-dir.
  The run ends as the simulation in which client 2 sat those rounds out:
  server state, each client's state and per-client metrics."""
  c, overrides = config('fedavg', tmp_path, **{'fl.rounds': 3})
  work, nodes = tmp_path / 'work', tmp_path / 'nodes'
  with flower_processes(tmp_path) as sites:
    run = sites(f'config="configs/tiny.py" overrides="{overrides}" '
                f'workdir="{work}" on-drop="continue"')
    deadline = time.time() + 900
    while not (work / 'checkpoints' / '1').is_dir():
      assert time.time() < deadline and run.poll() is None, (
          (tmp_path / 'flwr_run.log').read_text()[-3000:])
      time.sleep(0.2)
    sites.kill_node(2)
    sites.start_node(2)
    run.wait(timeout=1500)
    log = (tmp_path / 'flwr_run.log').read_text()
    assert (work / 'results.json').is_file(), (
        log[-3000:] + (tmp_path / 'node2.log').read_text()[-2000:])
  lines = [json.loads(l) for l in (work / 'metrics.jsonl').open()][:-1]
  dropped = {l['step'] - 1: l['dropped_clients'] for l in lines
             if 'dropped_clients' in l}
  assert dropped and set(map(tuple, dropped.values())) == {(2,)}, dropped
  assert 0 not in dropped and len(lines) - 1 not in dropped, dropped
  assert 'client 2 rejoined as node' in log, log[-3000:]
  want, private, _, rows = deploy_in_process(c, tmp_path / 'replay',
                                             dropped=dropped)
  xp = federation.prepare(c)
  server, clients = local.final_states(work, nodes,
                                       xp.engine.initial_state(), 3)
  close(server, want['server'])
  for client, p in zip(clients, private):
    close(client, p['client'])
  got = json.loads((work / 'results.json').read_text())
  assert got['dropped_clients'] == {str(k + 1): v for k, v in dropped.items()}
  for name in rows[0]:
    preds = np.stack([r[name][0] for r in rows])
    scores = (None if rows[0][name][1] is None else
              np.stack([r[name][1] for r in rows]))
    m = xp.metrics(preds, xp.outcome(preds, scores))
    assert got['models'][name]['per_client'] == m['per_client'], name


def test_overrides_keep_quoted_and_bracketed_values_whole():
  got = federation.parse_overrides(
      "data.answer_prefix=' ' fdlora.fusion.baselines=('sum', 'average') "
      "fl.rounds=2 method=fedavg model.tokenizer_cache='/tmp/a b'")
  assert got == {'data.answer_prefix': ' ',
                 'fdlora.fusion.baselines': ('sum', 'average'),
                 'fl.rounds': 2, 'method': 'fedavg',
                 'model.tokenizer_cache': '/tmp/a b'}


def test_secure_aggregation_weights_refusals_and_range(tmp_path):
  """The weights each client gets for SecAgg+ (0 for a dropped or
  non-finite client, the rest summing to one), a method whose server reads
  individual uploads refused, and a weighted upload outside the clipping
  range stopped with the field named."""
  from fdlora_jax.deploy import secagg
  c, _ = config('fedavg', tmp_path)
  server = federation.Server(federation.prepare(c), tmp_path / 'w')
  server.check_secure()
  ok = {'healthy': [True]}
  w = server.secure_weights(0, [ok, None, {'healthy': [False]}])
  np.testing.assert_allclose(w, [1.0, 0.0, 0.0])
  w = server.secure_weights(0, [ok, ok, ok])
  cw = server.engine.client_weights
  np.testing.assert_allclose(w, cw / cw.sum())
  c, _ = config('fedamp', tmp_path)
  with pytest.raises(ConfigError, match="secagg=true: method 'fedamp'"):
    federation.Server(federation.prepare(c), tmp_path / 'w').check_secure()
  got = secagg.weighted([np.array([1.0, -3.0], np.float32)], 0.5, 8.0)
  assert got[0].dtype == np.float64
  np.testing.assert_array_equal(got[0], [0.5, -1.5])
  with pytest.raises(ValueError, match='secagg-clipping-range=1'):
    secagg.weighted([np.array([1.0, -3.0], np.float32)], 0.5, 1.0)
