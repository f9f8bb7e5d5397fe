"""The client step sharded over 4 (forced host) devices equals the unsharded
step. Runs in a subprocess: the device count is fixed when JAX starts."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fdlora_jax.sharding import base_spec
from tests.helpers import free_port, run_processes

REPO = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent('''
  import json
  import jax, jax.numpy as jnp, numpy as np, optax
  from fdlora_jax import lora as lora_lib, sharding
  from fdlora_jax.fl import init_opt_states, sft_clients_update
  from fdlora_jax.lora import LoraConfig
  from fdlora_jax.model import PRESETS, Llama, init_params

  assert jax.device_count() == 4, jax.devices()
  n, k, b, t = 4, 2, 2, 16
  cfg = PRESETS['tiny']
  model = Llama(cfg, LoraConfig(rank=4, alpha=8.0, dropout=0.1,
                                targets=('q_proj', 'v_proj', 'down_proj')))
  base = init_params(cfg, jax.random.key(0))
  lora = lora_lib.stack([lora_lib.init(model, jax.random.key(i))
                         for i in range(n)])
  opt = optax.adamw(1e-2, weight_decay=0.01)
  state = init_opt_states(opt, lora)
  rng = np.random.default_rng(0)
  batches = {'tokens': rng.integers(0, cfg.vocab_size, (k, n, b, t)),
             'loss_mask': np.ones((k, n, b, t), np.float32),
             'attention_mask': np.ones((k, n, b, t), np.int32),
             'valid': np.ones((k, n, b), np.float32)}
  batches['attention_mask'][:, 1, 0, :5] = 0          # some padding
  batches['valid'][1, 2] = 0                          # an empty example
  rngs = jax.random.split(jax.random.key(7), n)
  update = sft_clients_update(model, opt, dropout=True, donate=False)
  ref = update(base, lora, state, batches, rngs)

  out = {}
  for clients, shards in ((4, 1), (2, 2)):
    mesh = sharding.make_mesh(clients, shards)
    got = update(sharding.shard_base(base, mesh),
                 sharding.shard_clients(lora, mesh),
                 sharding.shard_clients(state, mesh),
                 sharding.shard_clients(batches, mesh, axis=1),
                 sharding.shard_clients(rngs, mesh))
    lora_out = got[0]
    leaf = jax.tree.leaves(lora_out)[0]
    diff = max(float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32)
                                     - jnp.asarray(y, jnp.float32))))
               for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(got)))
    out[f'{clients}x{shards}'] = {
        'diff': diff, 'devices': len(leaf.sharding.device_set),
        'client_shard_rows': leaf.addressable_shards[0].data.shape[0]}
  print('RESULT ' + json.dumps(out))
''')


def test_sharded_step_equals_unsharded():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, '-c', SCRIPT], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][0]
  result = json.loads(line[len('RESULT '):])
  for layout, r in result.items():
    assert r['diff'] <= 1e-5, (layout, r)
    assert r['devices'] == 4, (layout, r)
  # Clients really split: 4 clients over 4 shards -> 1 per device; over 2
  # shards -> 2 per device.
  assert result['4x1']['client_shard_rows'] == 1
  assert result['2x2']['client_shard_rows'] == 2


ROUND_SCRIPT = textwrap.dedent('''
  import json, sys
  import jax, jax.numpy as jnp, numpy as np
  from tests.helpers import CFG, LCFG
  from configs import tiny as tiny_base
  from fdlora_jax import lora as lora_lib
  from fdlora_jax.fl.engine import Engine, Setup
  from fdlora_jax.fl.methods import fdlora
  from fdlora_jax.model import Llama, init_params
  from fdlora_jax.sharding import device_mesh

  n, k, b, t = 4, 2, 1, 12
  model = Llama(CFG, LCFG)
  base = init_params(CFG, jax.random.key(0))
  c = tiny_base.get_config()
  c.model.name = ''
  c.fl.num_clients, c.fl.inner_steps, c.fl.batch_size = n, k, b
  c.fl.inner_lr, c.fl.local_epochs, c.fl.rounds, c.fl.dropout = (
      1e-2, 1.0, 2, False)
  c.fdlora.outer_lr, c.fdlora.sync_every = 0.7, 2.0

  def sample(step0, num_steps):
    rng = np.random.default_rng(step0)
    lm = np.zeros((num_steps, n, b, t), np.float32)
    lm[..., -3:] = 1
    return {'tokens': rng.integers(0, CFG.vocab_size, (num_steps, n, b, t)),
            'loss_mask': lm,
            'attention_mask': np.ones((num_steps, n, b, t), np.int32),
            'valid': np.ones((num_steps, n, b), np.float32)}

  def two_rounds(mesh):
    setup = Setup(model=model, base=base, config=c, num_clients=n,
                  train_counts=np.array([3, 2, 3, 1]),
                  label_counts=np.ones((n, 2), np.int64), few_shot={},
                  lora_init=lambda key: lora_lib.init(model, key))
    eng = Engine(fdlora.build(setup), model, base, c.fl, n, sample,
                 mesh=mesh)
    state = eng.initial_state(jax.random.key(1))
    for i in range(len(eng.schedule())):
      state, _ = eng.run_repeat(state, i)
    return state

  mesh = device_mesh(n, 1)
  sharded, single = two_rounds(mesh), two_rounds(None)
  diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in
             zip(jax.tree.leaves(sharded), jax.tree.leaves(single)))
  leaf = sharded['client']['personal']['layers']['self_attn']['q_proj']['a']
  print('RESULT ' + json.dumps({
      'mesh': dict(mesh.shape), 'diff': diff,
      'devices': len(leaf.sharding.device_set),
      'rows_per_device': leaf.addressable_shards[0].data.shape[0],
      'mesh_5_clients': dict(device_mesh(5, 1).shape)
      if device_mesh(5, 1) is not None else None}))
''')


def test_fdlora_rounds_on_a_mesh_equal_one_device():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, '-c', ROUND_SCRIPT], env=env,
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][0]
  r = json.loads(line[len('RESULT '):])
  assert r['mesh'] == {'clients': 4, 'model': 1}
  assert r['devices'] == 4 and r['rows_per_device'] == 1
  assert r['diff'] <= 1e-5, r
  # 5 clients cannot be split over 4 devices evenly: no client split.
  assert r['mesh_5_clients'] is None


@pytest.mark.parametrize('shape,shards,spec', [
    ((64, 128), 2, (None, 'model')),          # kernel: output features
    ((4, 64, 176), 2, (None, None, 'model')),  # stacked layers: never axis 0
    ((4, 64, 175), 2, (None, 'model')),        # falls back to the input axis
    ((4, 63, 175), 2, ()),                     # nothing divides: replicated
    ((64,), 2, ()),                            # norm scale
    ((64, 128), 1, ()),                        # one model shard
])
def test_base_spec(shape, shards, spec):
  assert tuple(base_spec(shape, shards)) == spec


def _checkpoint(path: Path):
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  ck = ocp.PyTreeCheckpointer()
  tree = ck.metadata(path).item_metadata.tree
  return ck.restore(path, restore_args=jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))


def _diff_json(a, b, path=''):
  """Paths where two results.json differ (floats to 1e-5; timings
  skipped)."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = [f'{path}/{k}: missing' for k in set(a) ^ set(b)]
    for k in set(a) & set(b):
      if k not in ('timing', 'wall_s', 'seconds'):
        out += _diff_json(a[k], b[k], f'{path}/{k}')
    return out
  if isinstance(a, list) and isinstance(b, list):
    if len(a) != len(b):
      return [f'{path}: length {len(a)} != {len(b)}']
    return [d for i, (x, y) in enumerate(zip(a, b))
            for d in _diff_json(x, y, f'{path}[{i}]')]
  if isinstance(a, float) and isinstance(b, float):
    return [] if abs(a - b) <= 1e-5 * max(1.0, abs(b)) else [
        f'{path}: {a} != {b}']
  return [] if a == b else [f'{path}: {a!r} != {b!r}']


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
  """main.py as 2 jax.distributed processes of 2 (forced host) devices each,
  the 4 clients split over all 4 devices, equals main.py in one process on
  one device: results.json, every row's answers and the final checkpoint.
  Both processes share one CPU: their host loops run far ahead of their
  devices, as on a loaded machine (where option scoring once hung)."""
  import json
  import jax
  import numpy as np
  args = [sys.executable, 'main.py', '--config=configs/tiny.py',
          '--config.fl.num_clients=4']
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  env.pop('XLA_FLAGS', None)
  single = subprocess.run(args + [f'--workdir={tmp_path / "single"}'],
                          env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=900)
  assert single.returncode == 0, single.stderr[-3000:]
  port = free_port()
  multi_env = dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  outs = run_processes(
      [args + [f'--workdir={tmp_path / "multi"}',
               f'--coordinator=127.0.0.1:{port}', '--num_processes=2',
               f'--process_id={i}', '--distributed_timeout=120']
       + (['--verbosity=0'] if i == 0 else []) for i in range(2)],
      multi_env, tmp_path / 'logs', timeout_s=900, one_cpu=True)
  for code, _, err in outs:
    assert code == 0, err[-3000:]
  outs = [(out, err) for _, out, err in outs]
  # The clients really were split over the 4 devices of both processes.
  assert "Mesh {'clients': 4, 'model': 1} over 4 devices" in outs[0][1]
  # Process 0 printed and wrote; process 1 neither (Gloo's own C++ lines
  # about connected ranks aside, which its threads may interleave).
  assert 'results:' in outs[0][0]
  for printed in ('results:', 'client  train', 'method '):
    assert printed not in outs[1][0], outs[1][0][-2000:]
  multi, one = tmp_path / 'multi', tmp_path / 'single'
  diffs = _diff_json(json.loads((multi / 'results.json').read_text()),
                     json.loads((one / 'results.json').read_text()))
  assert not diffs, diffs[:10]
  for f in sorted((one / 'predictions').glob('*.npz')):
    a, b = np.load(multi / 'predictions' / f.name), np.load(f)
    np.testing.assert_array_equal(a['pred'], b['pred'], err_msg=f.name)
    if 'scores' in b:                  # model rows (references have none)
      np.testing.assert_allclose(a['scores'], b['scores'], rtol=1e-4,
                                 atol=1e-5, err_msg=f.name)
  step = max(int(d.name) for d in (one / 'checkpoints').iterdir()
             if d.name.isdigit())
  a = _checkpoint(multi / 'checkpoints' / str(step) / 'default')
  b = _checkpoint(one / 'checkpoints' / str(step) / 'default')
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float32),
                               np.asarray(y, np.float32), rtol=1e-4,
                               atol=1e-5)


def test_distributed_bad_launch_is_one_line(tmp_path):
  """A process that cannot reach the coordinator, or a process id out of
  range: one line naming it, exit status 2, nothing written."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  port = free_port()       # nothing listens there
  for extra, words in [
      (['--num_processes=2', '--process_id=1', '--distributed_timeout=2'],
       'could not reach process 0'),
      (['--num_processes=2', '--process_id=2'], '--process_id=2 must be in'),
  ]:
    proc = subprocess.run(
        [sys.executable, 'main.py', '--config=configs/tiny.py',
         f'--workdir={tmp_path / "w"}', f'--coordinator=127.0.0.1:{port}']
        + extra, env=env, cwd=REPO, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], proc.stderr
    assert not (tmp_path / 'w').exists()
