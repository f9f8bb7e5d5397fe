"""A local federation: a SuperLink and SuperNodes as processes on 127.0.0.1,
started as docs/deploy.md starts them by hand (for tests and benchmarks).

  with local_federation(tmp, n=3) as federation:
    federation('config="configs/tiny.py" workdir="/tmp/w"').wait()

No Flower import here: only its command-line programs, next to Python's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BINDIR = Path(sys.executable).parent


def available() -> bool:
  """Whether Flower's programs are installed next to this Python."""
  return (BINDIR / 'flower-superlink').exists()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
  """Every process below ``pid`` (from /proc)."""
  children = {}
  for stat in Path('/proc').glob('[0-9]*/stat'):
    try:
      fields = stat.read_text().rsplit(')', 1)[1].split()
    except OSError:
      continue
    children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
  out, todo = [], [pid]
  while todo:
    for child in children.get(todo.pop(), []):
      out.append(child)
      todo.append(child)
  return out


class LocalFederation:
  """A SuperLink and ``n`` SuperNodes (partition ids 0..n-1, ``state-dir``
  ``tmp/nodes``) started by :func:`local_federation`. Calling it starts
  ``flwr run . --stream`` with a run config (a Popen; output in
  ``tmp/flwr_run.log``)."""

  def __init__(self, tmp: Path, n: int):
    self.tmp, self.n = Path(tmp), n
    home, self.port = self.tmp / 'flwr', free_port()
    home.mkdir(parents=True)
    (home / 'config.toml').write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
        f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
    self.env = dict(os.environ, FLWR_HOME=str(home),
                    FLWR_TELEMETRY_ENABLED='0', JAX_PLATFORMS='cpu',
                    JAX_COMPILATION_CACHE_DIR=str(self.tmp / 'jax_cache'),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
    self.procs, self.logs, self.nodes = [], [], {}

  def _start(self, name: str, *args) -> subprocess.Popen:
    log = open(self.tmp / f'{name}.log', 'a')
    self.logs.append(log)
    self.procs.append(subprocess.Popen(
        [str(BINDIR / args[0]), *args[1:]], cwd=REPO, env=self.env,
        stdout=log, stderr=subprocess.STDOUT))
    return self.procs[-1]

  def __call__(self, run_config: str) -> subprocess.Popen:
    return self._start('flwr_run', 'flwr', 'run', '.', 'local', '--stream',
                       '--run-config', run_config)

  def start_link(self) -> None:
    link = self._start('superlink', 'flower-superlink', '--insecure',
                       '--disable-runtime-dependency-installation', '--port',
                       str(self.port), '--database',
                       str(self.tmp / 'state.db'))
    (self.tmp / 'superlink.pid').write_text(str(link.pid))

  def start_node(self, i: int) -> None:
    """SuperNode ``i`` (again, after :meth:`kill_node`: a new node id, the
    same partition-id and state-dir)."""
    self.nodes[i] = self._start(
        f'node{i}', 'flower-supernode', '--insecure', '--superlink',
        f'127.0.0.1:{self.port}', '--port', str(free_port()),
        '--node-config',
        f"partition-id={i} state-dir='{self.tmp / 'nodes'}'")

  def kill_node(self, i: int) -> None:
    """SIGKILL to SuperNode ``i`` and every process below it (its
    ClientApp): a site that goes down mid-round."""
    node = self.nodes[i]
    for pid in [node.pid, *descendants(node.pid)]:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    node.wait(10)

  def stop(self) -> None:
    """Everything, the ClientApp and ServerApp processes Flower started
    included (they outlive their SuperNode and SuperLink)."""
    started = [c for p in self.procs for c in descendants(p.pid)]
    for p in self.procs[::-1]:
      p.terminate()
    for pid in started:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    for p in self.procs:
      try:
        p.wait(10)
      except subprocess.TimeoutExpired:
        p.kill()
    for log in self.logs:
      log.close()


@contextlib.contextmanager
def local_federation(tmp: Path, n: int = 3):
  """A :class:`LocalFederation` of a SuperLink and ``n`` SuperNodes, logs in
  ``tmp/<name>.log``, the SuperLink's pid in ``tmp/superlink.pid``; all
  stopped on exit."""
  federation = LocalFederation(tmp, n)
  try:
    federation.start_link()
    time.sleep(3)
    for i in range(n):
      federation.start_node(i)
    yield federation
  finally:
    federation.stop()


def final_states(work: Path, state_dir: Path, like: dict,
                 num_clients: int) -> tuple:
  """``(server state, [each client's private client state])`` a finished
  run left in ``work`` and the nodes' ``state_dir``, in the structure of
  ``like`` (an engine state: ``like['client']`` has the client axis)."""
  import jax
  from flax import serialization
  from fdlora_jax.deploy.federation import take
  server = serialization.from_state_dict(
      like['server'], serialization.msgpack_restore(
          (Path(work) / 'server_state.msgpack').read_bytes()))
  template = take(like['client'], 0)
  if not jax.tree.leaves(template):    # no private state (zero-shot): none
    return server, [template] * num_clients   # written, none to read
  clients = [serialization.from_state_dict(
      template, serialization.msgpack_restore(
          (Path(state_dir) / f'client{i}.msgpack').read_bytes())['client'])
      for i in range(num_clients)]
  return server, clients
