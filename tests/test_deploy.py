"""The Flower deployment (fdlora_jax/deploy/): pytrees on the wire, a site
and the server run one client at a time equal the vmapped simulation, a
dropped client, bad input, and the whole thing over real processes: a
SuperLink and three SuperNodes on 127.0.0.1, `flwr run`, for FedAvg and
FDLoRA, against the simulation's state and metrics."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from fdlora_jax.deploy import federation
from fdlora_jax.errors import ConfigError
from tests.helpers import REPO

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


def deploy_in_process(c, tmp):
  """Every site and the server in this process, one client at a time: what
  the Flower apps do, without the wire."""
  x = federation.prepare(c)
  sites = [federation.Site(x, i) for i in range(x.engine.num_clients)]
  server = federation.Server(x, tmp / 'work')
  private = [s.initial() for s in sites]
  state = server.initial()
  for index in range(len(x.engine.schedule())):
    download = x.engine.broadcast(index, state['server'])
    clip = float(state['dp']['clip']) if state.get('dp') else None
    outs = [s.train(p, index, None if download is None else
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


def test_bad_partition_and_overrides_name_the_cause(tmp_path):
  c, _ = config('fedavg', tmp_path)
  x = federation.prepare(c)
  with pytest.raises(ConfigError, match='partition-id=3.*fl.num_clients=3'):
    federation.Site(x, 3)
  with pytest.raises(ConfigError, match='not field=value'):
    federation.parse_overrides('fl.rounds')
  with pytest.raises(ConfigError, match='fl.roundz'):
    federation.build_config('configs/tiny.py', 'fl.roundz=2')


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
def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


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
  bindir = Path(sys.executable).parent
  if not (bindir / 'flower-superlink').exists():
    pytest.skip('flwr is not installed')
  # SecAgg+: one aggregation (no local phase, one round), so the final
  # server state is one aggregate of the very uploads the simulation
  # averages in the clear. (After two, the second round's clients start
  # from globals a quantum apart, and Adam moves a rare weight further.)
  c, overrides = config(method, tmp_path, **(
      {'fl.rounds': 1, 'fl.local_epochs': 0.0} if secure else {}))
  home, work, nodes = tmp_path / 'flwr', tmp_path / 'work', tmp_path / 'nodes'
  home.mkdir()
  port = free_port()
  (home / 'config.toml').write_text(
      f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
  env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED='0',
             JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  procs, logs = [], []

  def start(name, *args):
    log = open(tmp_path / f'{name}.log', 'w')
    logs.append(log)
    procs.append(subprocess.Popen([str(bindir / args[0]), *args[1:]],
                                  cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT))
  try:
    start('superlink', 'flower-superlink', '--insecure',
          '--disable-runtime-dependency-installation', '--port', str(port),
          '--database', str(tmp_path / 'state.db'))
    time.sleep(3)
    for i in range(3):
      start(f'node{i}', 'flower-supernode', '--insecure', '--superlink',
            f'127.0.0.1:{port}', '--port', str(free_port()), '--node-config',
            f"partition-id={i} state-dir='{nodes}'")
    run = subprocess.run(
        [str(bindir / 'flwr'), 'run', '.', 'test', '--stream',
         '--run-config', f'config="configs/tiny.py" overrides="{overrides}" '
         f'workdir="{work}"'
         + (' secagg=true secagg-clipping-range=1.0 '
            'secagg-quantization-range=65536' if secure else '')],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert (work / 'results.json').is_file(), (
        run.stdout[-3000:] + run.stderr[-2000:]
        + (tmp_path / 'node0.log').read_text()[-2000:])
  finally:
    for p in procs[::-1]:
      p.terminate()
    for p in procs:
      try:
        p.wait(10)
      except subprocess.TimeoutExpired:
        p.kill()
    for log in logs:
      log.close()
  from flax import serialization
  from fdlora_jax.fl.engine import communication
  x, sim, _, _, metrics, repeats = simulate(c)
  server = serialization.from_state_dict(
      sim['server'], serialization.msgpack_restore(
          (work / 'server_state.msgpack').read_bytes()))
  template = federation.take(sim['client'], 0)
  for i in range(3):
    private = serialization.msgpack_restore(
        (nodes / f'client{i}.msgpack').read_bytes())
    close(serialization.from_state_dict(template, private['client']),
          federation.take(sim['client'], i))
  lines = [json.loads(l) for l in (work / 'metrics.jsonl').open()]
  if secure:
    # Against the simulation's plain weighted mean of the same uploads, with
    # quanta q = 2 / 2**16 over [-1, 1], coarse enough to stand out from the
    # float difference between a site's per-client step and the vmapped one
    # (the plain runs are nearer 1e-6). The rounding shows (over thousands
    # of values the largest difference is above a quarter quantum), and it
    # stays within 16 quanta. Rounding each client's weighted value alone
    # would bound it by three; 6.7 was measured (about 4 at 2**22 levels),
    # not yet explained: docs/deploy.md.
    q = 2 / 2 ** 16
    diff = max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
               for u, v in zip(jax.tree.leaves(server),
                               jax.tree.leaves(sim['server'])))
    assert q / 4 < diff <= 16 * q, (diff, q)
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
