"""Plain helpers shared by several test files: constants of the tiny setup,
batch makers, config builders, tree comparisons and main.py runners.

Not a test file (pytest collects nothing here). Fixtures live in
conftest.py; import these as ``from tests.helpers import ...`` (the repo root
is on the path: pyproject's ``[tool.pytest.ini_options] pythonpath``).
"""

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from configs import tiny as tiny_base
from fdlora_jax import lora as lora_lib
from fdlora_jax.deploy.local import free_port  # noqa: F401 (for the tests)
from fdlora_jax.fl.engine import Engine, Setup
from fdlora_jax.lora import LoraConfig
from fdlora_jax.model import PRESETS, Llama

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'


# ---------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------
def noisy(lora, seed, std=0.2):
  """``lora`` with every leaf (``b`` too) replaced by N(0, std^2) noise, so
  the adapter changes the model's output."""
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  return jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape) * std,
                      lora)


def noise(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + rng.normal(size=x.shape), tree)


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_same(a, b):
  for x, y in zip(leaves(a), leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def differs(a, b):
  return max(float(np.abs(x - y).max()) for x, y in zip(leaves(a), leaves(b)))


def copy(state):
  """The engine donates the optimizer state it is given: reuse a copy."""
  return jax.tree.map(jnp.copy, state)


def close(a, b, atol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol), a, b)


# ---------------------------------------------------------------------------
# Hugging Face checkpoints
# ---------------------------------------------------------------------------
def make_hf_llama(directory, *, tie=False, rope=None, seed=0, **overrides):
  """Saves a random ``transformers.LlamaForCausalLM`` (GQA, untied, rope theta
  50000 by default) to ``directory`` and returns the PyTorch model."""
  import torch
  import transformers
  torch.manual_seed(seed)
  kw = dict(vocab_size=96, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-6, max_position_embeddings=128,
            tie_word_embeddings=tie,
            rope_parameters=rope or {'rope_type': 'default',
                                     'rope_theta': 50000.0})
  kw.update(overrides)
  config = transformers.LlamaConfig(**kw)
  model = transformers.LlamaForCausalLM(config).eval()
  # Norm weights start at 1: randomise them so a wrong mapping shows up.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.uniform_(0.5, 1.5)
  model.save_pretrained(directory)
  return model


# ---------------------------------------------------------------------------
# The tiny model and engine (from test_engine.py and test_methods.py)
# ---------------------------------------------------------------------------
CFG = PRESETS['tiny']
LCFG = LoraConfig(rank=4, alpha=8.0, targets=('q_proj', 'v_proj', 'down_proj'))
N, K, B, T = 3, 2, 2, 12
POISON = CFG.vocab_size - 1   # a token whose embedding the NaN test poisons


def random_batches(step0, num_steps, seed=0, poison_client=None):
  """[K, N, B, T] batches, a pure function of the step. ``poison_client``
  gets the POISON token in every example."""
  out = {k: [] for k in ('tokens', 'loss_mask', 'attention_mask', 'valid')}
  for s in range(step0, step0 + num_steps):
    rng = np.random.default_rng(seed * 1000 + s)
    tokens = rng.integers(0, CFG.vocab_size - 1, (N, B, T))
    if poison_client is not None:
      tokens[poison_client, :, 2] = POISON
    out['tokens'].append(tokens)
    lm = np.zeros((N, B, T), np.float32)
    lm[..., T // 2:] = 1
    out['loss_mask'].append(lm)
    out['attention_mask'].append(np.ones((N, B, T), np.int32))
    out['valid'].append(np.ones((N, B), np.float32))
  return {k: np.stack(v) for k, v in out.items()}


def config(**fields):
  c = tiny_base.get_config()
  c.model.name = ''
  c.fl.num_clients, c.fl.inner_steps, c.fl.batch_size = N, K, B
  c.fl.inner_optimizer, c.fl.inner_lr, c.fl.dropout = 'sgd', 1.0, False
  c.fl.local_epochs, c.fl.rounds = 1.0, 2
  for path, value in fields.items():
    section, name = path.split('__')
    c[section][name] = value
  return c


def engine(tiny, module, c, counts=(2, 2, 2), sample=random_batches):
  model, base = tiny
  setup = Setup(model=model, base=base, config=c, num_clients=N,
                train_counts=np.asarray(counts),
                label_counts=np.ones((N, 2), np.int64), few_shot={},
                lora_init=lambda key: lora_lib.init(model, key))
  return Engine(module.build(setup), model, base, c.fl, N, sample, dp=c.dp)


def run_all(eng, state, upto=None):
  metrics = []
  for i in range(len(eng.schedule()) if upto is None else upto):
    state, m = eng.run_repeat(state, i)
    metrics.append(m)
  return state, metrics


# ---------------------------------------------------------------------------
# main.py on the tiny config (from test_methods.py)
# ---------------------------------------------------------------------------
TINY_FLAGS = ['--config.model.name=', '--config.data.synthetic_windows=40',
              '--config.data.min_examples_per_client=3',
              '--config.data.few_shot=2', '--config.fl.num_clients=2',
              '--config.fl.rounds=1', '--config.fl.inner_steps=1',
              '--config.fl.local_epochs=0.25', '--config.fl.local_steps=0',
              '--config.eval.every=1',
              '--config.fdlora.fusion.steps=1',
              '--config.fdlora.fusion.population_size=4',
              '--config.k_shot.shots=2']


def run_main_py(workdir, *flags, tmp, config='configs/tiny.py'):
  """``main.py`` on the tiny flags; returns the finished process."""
  return subprocess.run(
      [sys.executable, 'main.py', f'--config={config}',
       f'--workdir={workdir}',
       f'--config.model.tokenizer_cache={tmp / "tok"}', *TINY_FLAGS, *flags],
      cwd=REPO, capture_output=True, text=True, timeout=900)


MEDICAL = SHARED_DATA / 'medical'
# Config file and flags per scenario, after TINY_FLAGS: no stage-1 steps and
# no progress evaluation, one length bucket (fewer compilations).
FAST = ['--config.fl.local_epochs=0', '--config.eval.every=0']
SCENARIOS = {
    'logs': ('configs/tiny.py', [   # built-in synthetic logs
        *FAST, '--config.data.length_buckets=(256,)']),
    'medical': ('configs/medical.py', [   # PubMedQA sample, 60 examples
        *FAST, f'--config.data.dir={MEDICAL}', '--config.data.max_examples=60',
        '--config.data.max_length=512', '--config.data.length_buckets=(512,)']),
}


def run_scenario(method, scenario, tmp, *flags):
  """``main.py`` with ``method`` on the tiny config of ``scenario``; returns
  ``results.json`` (skips the medical scenario without ../shared/data)."""
  config, extra = SCENARIOS[scenario]
  if scenario == 'medical' and not MEDICAL.is_dir():
    pytest.skip(f'{MEDICAL} is absent')
  work = tmp / f'{method}_{scenario}'
  proc = run_main_py(work, f'--config.method={method}', *extra, *flags,
                     tmp=tmp, config=config)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads((work / 'results.json').read_text())


def fedavg_keys(tmp_path_factory):
  """The top-level keys of a FedAvg ``results.json`` (the common schema),
  from one untrained FedAvg run shared by the whole test session."""
  root = tmp_path_factory.getbasetemp()
  path = root / 'fedavg_logs' / 'results.json'
  if not path.is_file():
    run_scenario('fedavg', 'logs', root, '--config.fl.rounds=0')
  return set(json.loads(path.read_text()))


# ---------------------------------------------------------------------------
# main.py, both scenarios (from test_fedamp.py)
# ---------------------------------------------------------------------------
MEDICAL_FLAGS = [f'--config.data.dir={SHARED_DATA / "medical"}',
                 '--config.data.max_examples=60',
                 '--config.data.max_length=512']


def main_py(config_file, workdir, *flags, tmp):
  """``main.py`` on ``config_file`` and the tiny flags; returns its
  ``results.json`` (asserts it succeeded)."""
  proc = subprocess.run(
      [sys.executable, 'main.py', f'--config={config_file}',
       f'--workdir={workdir}', f'--config.model.tokenizer_cache={tmp / "tok"}',
       *TINY_FLAGS, *flags],
      cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads((workdir / 'results.json').read_text())


def adapter_bytes(r, rank=None):
  """Bytes of one adapter of the run's LoRA config (``rank``: another rank)
  on the tiny preset."""
  lc = r['config']['lora']
  model = Llama(CFG, LoraConfig(rank=int(rank or lc['rank']),
                                targets=tuple(lc['targets'])))
  return lora_lib.num_bytes(lora_lib.init(model, jax.random.key(0)))


def schema_keys(r):
  return (set(r), set(r['communication']),
          {k for p in r['communication']['per_round'] for k in p})


_FEDAVG = {}


def fedavg_schema(tmp):
  """The key set of a FedAvg results.json (run once per session, without
  training: only its keys matter)."""
  if 'keys' not in _FEDAVG:
    _FEDAVG['keys'] = schema_keys(main_py(
        'configs/tiny.py', tmp / 'fedavg', '--config.method=fedavg',
        '--config.fl.rounds=0', '--config.fl.local_epochs=0', tmp=tmp))
  return _FEDAVG['keys']


# ---------------------------------------------------------------------------
# main.py, both scenarios at once (from test_pfedlora.py)
# ---------------------------------------------------------------------------
MEDICAL_ARGS = ['--config=configs/medical.py',
                f'--config.data.dir={SHARED_DATA / "medical"}',
                '--config.data.max_examples=60', '--config.data.max_length=512']


def main_py_both(tmp_path, *flags):
  """``main.py`` on the tiny model for the logs (synthetic) and medical
  scenarios, both at once; returns ``{scenario: results.json}``. Flags after
  TINY_FLAGS win (e.g. ``--config.fl.local_epochs=0``: one compile less;
  the engine tests run every phase)."""
  procs = {}
  scenarios = ('logs', 'medical') if (SHARED_DATA / 'medical').is_dir() \
      else ('logs',)   # no sample data here: the synthetic scenario only
  for scenario in scenarios:
    config_flags = (MEDICAL_ARGS if scenario == 'medical'
                    else ['--config=configs/tiny.py'])
    work = tmp_path / scenario
    procs[scenario] = (work, subprocess.Popen(
        [sys.executable, 'main.py', *config_flags, f'--workdir={work}',
         f'--config.model.tokenizer_cache={tmp_path / "tok" / scenario}',
         *TINY_FLAGS, *flags],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  out = {}
  for scenario, (work, proc) in procs.items():
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, (scenario, err[-3000:])
    out[scenario] = json.loads((work / 'results.json').read_text())
  return out


# tiny preset: hidden 64, intermediate 176, 2 kv heads of 16.
IN_OUT = {'q_proj': 64 + 64, 'k_proj': 64 + 32, 'v_proj': 64 + 32,
          'o_proj': 64 + 64, 'gate_proj': 64 + 176, 'up_proj': 64 + 176,
          'down_proj': 176 + 64}
# The keys of every results.json (run.py; test_methods checks that every
# method, FedAvg included, writes this one set).
SCHEMA = {'method', 'headline', 'headline_metric', 'predictions',
          'data_source', 'is_synthetic',
          'skipped_lines', 'task', 'metric', 'model', 'seed', 'num_clients',
          'partition', 'phases', 'models', 'reference', 'search',
          'context_shots', 'communication', 'privacy', 'timing', 'config'}


# ---------------------------------------------------------------------------
# Data (the real samples in ../shared/data; see its README.md)
# ---------------------------------------------------------------------------
LOGHUB = SHARED_DATA / 'loghub'
SPIRIT_JSON = LOGHUB / 'Spirit' / 'alpaca_input_w-10_spirit.json'

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(),
                                  reason=f'{SHARED_DATA} is absent')


def logs_cfg(**data_fields):
  c = common.logs_data(common.base_config())
  c.data.update(data_fields)
  return c.data


def medical_cfg(task, **data_fields):
  c = common.medical_data(common.base_config(), task)
  c.data.dir = str(MEDICAL)
  c.data.update(data_fields)
  return c.data


def write_file(path, content):
  """Writes bytes to ``path`` (making its folders); returns ``path``."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(content)
  return path


def bgl_line(label='-', msg='instruction cache parity error corrected'):
  """One raw BGL log line."""
  return (f'{label} 1117838570 2005.06.03 R02-M1-N0-C:J12-U11 '
          f'2005-06-03-15.42.50.675872 R02-M1-N0-C:J12-U11 RAS KERNEL INFO '
          f'{msg}')


# ---------------------------------------------------------------------------
# What reaches a method's server (the LoRA-specific methods' tests)
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def server_spy(eng, phase='rounds'):
  """Within the block, every call of ``phase``'s server function appends
  its ``(server, uploads, weights, t)`` (as numpy) to the yielded list."""
  seen, real = [], eng._servers[phase]

  def spy(server, uploads, weights, t):
    seen.append(jax.tree.map(np.asarray, (server, uploads, weights, t)))
    return real(server, uploads, weights, t)
  eng._servers[phase] = spy
  try:
    yield seen
  finally:
    eng._servers[phase] = real


def weighted_delta(loras, weights, scale=1.0):
  """``{path: sum_i p_i a_i b_i scale}`` of ``[N, ...]`` adapters."""
  p = np.asarray(weights, np.float64) / np.sum(weights)
  out = {}
  for path, dw in lora_lib.delta_weights(loras, scale).items():
    out[path] = np.tensordot(p, np.asarray(dw, np.float64), axes=1)
  return out


def assert_deltas_close(got, want, rtol=1e-4, atol=1e-5):
  """Two ``{path: delta}`` dicts agree on every path."""
  assert set(got) == set(want)
  for p in want:
    np.testing.assert_allclose(np.asarray(got[p]), want[p], rtol=rtol,
                               atol=atol, err_msg=str(p))


# ---------------------------------------------------------------------------
# Several processes (jax.distributed)
# ---------------------------------------------------------------------------


def run_processes(commands, env, workdir, timeout_s, one_cpu=False):
  """Runs ``commands`` (argv lists) at once, cwd the repo, stdout/stderr to
  files under ``workdir`` (not pipes: one process blocked on a full pipe
  would stall the others inside a collective). ``one_cpu``: all of them on
  one CPU, where the host runs ahead of the devices most (how a loaded
  machine schedules them). Returns ``[(returncode, out, err)]``. A process still running after ``timeout_s`` fails the test with
  every process's last output and the Python stack of every thread of every
  process (faulthandler, on SIGABRT): where a collective hangs."""
  import signal
  import time
  env = dict(env, PYTHONFAULTHANDLER='1')
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  files = [(workdir / f'p{i}.out', workdir / f'p{i}.err')
           for i in range(len(commands))]
  handles = [(open(o, 'w'), open(e, 'w')) for o, e in files]
  procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=o, stderr=e)
           for cmd, (o, e) in zip(commands, handles)]
  if one_cpu:
    # From here, not a preexec_fn (Python code between fork and exec in a
    # threaded process can deadlock): the children are still starting
    # Python, before any thread whose affinity this would miss.
    import os
    cpu = min(os.sched_getaffinity(0))
    for p in procs:
      os.sched_setaffinity(p.pid, {cpu})
  deadline, late = time.monotonic() + timeout_s, None
  try:
    for i, p in enumerate(procs):
      try:
        p.wait(timeout=max(deadline - time.monotonic(), 1))
      except subprocess.TimeoutExpired:
        late = i
        break
    if late is not None:
      for p in procs:
        if p.poll() is None:
          p.send_signal(signal.SIGABRT)   # faulthandler prints the stacks
      for p in procs:
        try:
          p.wait(timeout=30)
        except subprocess.TimeoutExpired:
          pass
  finally:
    for p in procs:
      p.kill()
    for o, e in handles:
      o.close()
      e.close()
  outputs = [(p.returncode, o.read_text(), e.read_text())
             for p, (o, e) in zip(procs, files)]
  if late is not None:
    tails = '\n'.join(f'--- process {i} {name}:\n{text[-6000:]}'
                      for i, (_, out, err) in enumerate(outputs)
                      for name, text in (('out', out), ('err', err)))
    pytest.fail(f'process {late} still running after {timeout_s} s; '
                f'stacks at SIGABRT below\n{tails}')
  return outputs
