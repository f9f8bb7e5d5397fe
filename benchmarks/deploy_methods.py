"""Every method through the deployment's code path, against the simulation.

  python benchmarks/deploy_methods.py [--methods=fedavg,fdlora,...]

For each method on configs/tiny.py (3 clients, 2 rounds, the sizes of
tests/test_deploy.py): the vmapped simulation, then the deployment's sites
and server (fdlora_jax/deploy/federation.py) one client at a time, with
every tree that would cross the network (downloads, uploads, server state,
search metrics, answers) packed and unpacked by fdlora_jax/deploy/wire.py
as the Flower apps do. Writes benchmarks/results/deploy_methods.json: per
method, the largest difference in the server state and in the clients'
states, and whether every row's answers are equal. (Flower's transport
itself is tested for FedAvg and FDLoRA in tests/test_deploy.py.)

  python benchmarks/deploy_methods.py --real [--methods=...]

runs each method through Flower itself: `flwr run .` on a SuperLink and
three SuperNodes started here on 127.0.0.1 (each ClientApp a process), and
compares the final server state, every client's state (its state-dir
file) and every row's per-client metrics in results.json with the
simulation; benchmarks/results/deploy_methods_real.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fdlora_jax.deploy import federation, wire  # noqa: E402
from fdlora_jax.deploy.local import final_states, local_federation  # noqa: E402
from fdlora_jax.fl.methods import METHODS  # noqa: E402

OVERRIDES = ('fl.num_clients=3 fl.rounds=2 fl.inner_steps=1 '
             'fl.local_epochs=0.25 data.synthetic_windows=40 '
             'data.min_examples_per_client=3 data.few_shot=2 eval.every=0 '
             'fdlora.fusion.steps=1 fdlora.fusion.population_size=4')
RESULTS = Path(__file__).resolve().parent / 'results'
# What a method needs beyond OVERRIDES: FedRep's head steps need K >= 2;
# FedRoD's class logits need options that start with distinct tokens.
EXTRA = {'fedrep': 'fl.inner_steps=2', 'fedrod': "data.answer_prefix=' '"}


def max_diff(a, b) -> float:
  d = [float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v))))
       for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
       if np.size(u)]
  return max(d, default=0.0)


def wired(tree, template=None):
  return wire.unpack(wire.pack(tree), template)


def one(method: str, tmp: str) -> dict:
  c = federation.build_config(
      'configs/tiny.py', f'{OVERRIDES} {EXTRA.get(method, "")} '
      f"method={method} model.tokenizer_cache='{tmp}/tok'")
  x = federation.prepare(c)
  e, n = x.engine, x.engine.num_clients
  sim = e.initial_state()
  for i in range(len(e.schedule())):
    sim, _ = e.run_repeat(sim, i)
  sim, _ = e.run_searches(sim)
  sim_rows = x.method.rows(sim['server'], sim['client'])
  sim_preds = {k: np.asarray(x.predict(v)[0]) for k, v in sim_rows.items()}

  sites = [federation.Site(x, i) for i in range(n)]
  server = federation.Server(x, Path(tmp) / 'work')
  start = server.initial()
  private = [wired(s.initial(), s.initial()) for s in sites]
  state = server.initial()
  for index in range(len(e.schedule())):
    download = e.broadcast(index, state['server'])
    like = server.upload_template(index)
    outs = []
    for s, p in zip(sites, private):
      d = None if download is None else federation.take(download, s.index)
      d = wired(d, None if d is None else federation.take(
          e.broadcast(index, start['server']), 0))
      p, up, m = s.train(p, index, d)
      outs.append((wired(p, s.initial()), wired(up, like),
                   json.loads(json.dumps(m))))
    private = [o[0] for o in outs]
    state, _ = server.repeat(state, index, [o[1] for o in outs],
                             [o[2] for o in outs])
  server_state = wired(state['server'], start['server'])
  if e.searches:
    got = [s.search(p, server_state) for s, p in zip(sites, private)]
    private = [g[0] for g in got]
  answers = [s.evaluate(p, server_state) for s, p in zip(sites, private)]
  return {
      'server_state_max_abs_diff': max_diff(state['server'], sim['server']),
      'client_state_max_abs_diff': max(
          max_diff(p['client'], federation.take(sim['client'], i))
          for i, p in enumerate(private)),
      'rows': list(sim_preds),
      'answers_equal': all(
          np.array_equal(np.stack([a[k][0] for a in answers]), sim_preds[k])
          for k in sim_preds)}


def real(method: str, tmp: Path, flwr_run) -> dict:
  """``method`` through ``flwr run`` on the local federation, against the
  simulation: the final server state, every client's private state (its
  state-dir file) and every row's per-client metrics in results.json."""
  overrides = (f'{OVERRIDES} {EXTRA.get(method, "")} method={method} '
               f"model.tokenizer_cache='{tmp}/tok'")
  c = federation.build_config('configs/tiny.py', overrides)
  x = federation.prepare(c)
  e = x.engine
  sim = e.initial_state()
  for i in range(len(e.schedule())):
    sim, _ = e.run_repeat(sim, i)
  sim, _ = e.run_searches(sim)
  metrics = {k: x.metrics(*x.predict(v))
             for k, v in x.method.rows(sim['server'], sim['client']).items()}
  work = tmp / f'work_{method}'
  flwr_run(f'config="configs/tiny.py" overrides="{overrides}" '
           f'workdir="{work}"').wait(timeout=1800)
  if not (work / 'results.json').is_file():
    return {'ran': False,
            'error': (tmp / 'flwr_run.log').read_text()[-1500:]}
  got = json.loads((work / 'results.json').read_text())
  server, clients = final_states(work, tmp / 'nodes', sim,
                                 e.num_clients)
  return {
      'ran': True,
      'server_state_max_abs_diff': max_diff(server, sim['server']),
      'client_state_max_abs_diff': max(
          max_diff(cl, federation.take(sim['client'], i))
          for i, cl in enumerate(clients)),
      'rows': list(metrics),
      'per_client_metrics_equal': all(
          got['models'][k]['per_client'] == m['per_client']
          for k, m in metrics.items())}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--methods', default=','.join(METHODS))
  ap.add_argument('--real', action='store_true',
                  help='through `flwr run` on a SuperLink and three '
                  'SuperNodes on 127.0.0.1 (deploy_methods_real.json)')
  args = ap.parse_args()
  if args.real:
    return main_real(args.methods.split(','))
  path = RESULTS / 'deploy_methods.json'
  methods = args.methods.split(',')
  # Rows of methods not run now are kept from the file.
  rows = ([r for r in json.loads(path.read_text())['rows']
           if r['method'] not in methods] if path.is_file() else [])
  for method in methods:
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
      r = one(method, tmp)
    r.update(method=method, seconds=round(time.time() - t0, 1))
    print(json.dumps(r), flush=True)
    rows.append(r)
  out = {'date': datetime.datetime.now().strftime('%Y-%m-%d %H:%M'),
         'machine': f'{platform.machine()}, {jax.device_count()} '
                    f'{jax.default_backend()} device(s)',
         'jax': jax.__version__, 'command': 'python benchmarks/deploy_methods.py',
         'config': f'configs/tiny.py {OVERRIDES}', 'extra': EXTRA,
         'rows': sorted(rows, key=lambda r: list(METHODS).index(r['method']))}
  path.write_text(json.dumps(out, indent=2))


def main_real(methods: list[str]) -> None:
  path = RESULTS / 'deploy_methods_real.json'
  rows = ([r for r in json.loads(path.read_text())['rows']
           if r['method'] not in methods] if path.is_file() else [])
  with tempfile.TemporaryDirectory() as tmp, \
      local_federation(Path(tmp)) as flwr_run:
    for method in methods:
      t0 = time.time()
      r = real(method, Path(tmp), flwr_run)
      r.update(method=method, seconds=round(time.time() - t0, 1))
      print(json.dumps(r), flush=True)
      rows.append(r)
      # Written after every method: a long run keeps what it measured.
      path.write_text(json.dumps({
          'date': datetime.datetime.now().strftime('%Y-%m-%d %H:%M'),
          'machine': f'{platform.machine()}, {jax.device_count()} '
                     f'{jax.default_backend()} device(s)',
          'jax': jax.__version__,
          'command': 'python benchmarks/deploy_methods.py --real',
          'config': f'configs/tiny.py {OVERRIDES}', 'extra': EXTRA,
          'rows': sorted(rows, key=lambda r: list(METHODS).index(
              r['method']))}, indent=2))


if __name__ == '__main__':
  main()
