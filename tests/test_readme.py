"""The README's "Adding a method" example is real code that works."""

import importlib.util
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fdlora_jax.fl.engine import sft_client_update
from tests.helpers import K, N, config, engine, random_batches

README = Path(__file__).resolve().parents[1] / 'README.md'


def readme_method(tmp_path):
  text = README.read_text()
  blocks = re.findall(r'```python\n(.*?)```', text, re.S)
  code = [b for b in blocks if b.startswith('"""FedProx')]
  assert len(code) == 1, 'the README lost its FedProx example'
  path = tmp_path / 'fedprox.py'
  path.write_text(code[0])
  spec = importlib.util.spec_from_file_location('fedprox', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_readme_fedprox_example_runs_and_is_fedavg_at_mu_zero(tmp_path,
                                                              tiny):
  fedprox = readme_method(tmp_path)
  model, base = tiny
  c = config()
  c.fedprox = fedprox.config()
  c.fedprox.mu = 0.0
  fedprox.validate(c)
  eng = engine(tiny, fedprox, c)
  state = eng.initial_state(jax.random.key(1))
  g0 = state['server']['global']
  new, m = eng.run_repeat(state, 0)
  one = jax.jit(sft_client_update(model, optax.sgd(1.0)))
  batches = jax.tree.map(jnp.asarray, random_batches(0, K))
  rngs = eng._rngs(1, 1)
  finals = [one(base, g0, optax.sgd(1.0).init(g0),
                jax.tree.map(lambda x: x[:, i], batches), rngs[i])[0]
            for i in range(N)]
  expect = jax.tree.map(lambda *xs: sum(xs) / N, *finals)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               new['server']['global'], expect)
  assert m['bytes_up_per_client'][0] > 0
  # mu > 0 pulls the clients toward the global adapter: a different result.
  c.fedprox.mu = 0.5   # SGD at lr 1: halves the drift each step
  eng = engine(tiny, fedprox, c)
  pulled, _ = eng.run_repeat(eng.initial_state(jax.random.key(1)), 0)
  d_free = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(
      jax.tree.leaves(new['server']['global']), jax.tree.leaves(g0)))
  d_prox = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(
      jax.tree.leaves(pulled['server']['global']), jax.tree.leaves(g0)))
  assert d_prox < d_free
