"""Compile time and step time of the vmapped LoRA train step (AdamW, K=1).

  python benchmarks/step_time.py --presets tiny,llama2_7b_narrow --clients 5

Prints a table and writes benchmarks/results/step_time.json.
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import common  # noqa: F401  (puts the repo on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fdlora_jax import lora as lora_lib
from fdlora_jax.fl import init_opt_states, sft_clients_update
from fdlora_jax.lora import LoraConfig
from fdlora_jax.model import PRESETS, Llama, init_params


def measure(preset, n, batch, seq, steps, repeats, remat):
  cfg = PRESETS[preset].replace(remat=remat)
  lcfg = LoraConfig(rank=8, alpha=16, targets=('q_proj', 'v_proj'))
  model = Llama(cfg, lcfg)
  base = init_params(cfg, jax.random.key(0))
  lora = lora_lib.replicate(lora_lib.init(model, jax.random.key(1)), n)
  opt = optax.adamw(2e-4, weight_decay=0.01)
  state = init_opt_states(opt, lora)
  rng = np.random.default_rng(0)
  batches = {
      'tokens': jnp.asarray(rng.integers(0, cfg.vocab_size,
                                         (steps, n, batch, seq)), jnp.int32),
      'loss_mask': jnp.ones((steps, n, batch, seq), jnp.float32),
      'attention_mask': jnp.ones((steps, n, batch, seq), jnp.int32),
      'valid': jnp.ones((steps, n, batch), jnp.float32)}
  rngs = jax.random.split(jax.random.key(2), n)
  update = sft_clients_update(model, opt, dropout=False)
  t0 = time.perf_counter()
  compiled = update.lower(base, lora, state, batches, rngs).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    lora, state, _, m = compiled(base, lora, state, batches, rngs)
    jax.block_until_ready(lora)
    times.append((time.perf_counter() - t0) / steps)
  step = statistics.median(times)
  return {'preset': preset, 'layers': cfg.num_hidden_layers,
          'hidden': cfg.hidden_size, 'clients': n, 'batch': batch,
          'seq': seq, 'remat': remat, 'compile_s': round(compile_s, 3),
          'step_s_median': round(step, 5),
          'tokens_per_s': round(n * batch * seq / step, 1)}


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--presets', default='tiny,llama2_7b_narrow')
  p.add_argument('--clients', type=int, default=5)
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--seq', type=int, default=128)
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--remat', action='store_true')
  p.add_argument('--out', default='benchmarks/results/step_time.json')
  a = p.parse_args()
  rows = [measure(name, a.clients, a.batch, a.seq, a.steps, a.repeats,
                  a.remat) for name in a.presets.split(',')]
  head = list(rows[0])
  print(' | '.join(head))
  for r in rows:
    print(' | '.join(str(r[k]) for k in head))
  meta = {'machine': f'{platform.machine()} {os.cpu_count()} cpus',
          'backend': jax.default_backend(), 'jax': jax.__version__,
          'date': time.strftime('%Y-%m-%d'), 'rows': rows,
          'note': 'K steps run inside one lax.scan; step time = call / K'}
  Path(a.out).parent.mkdir(parents=True, exist_ok=True)
  Path(a.out).write_text(json.dumps(meta, indent=2))


if __name__ == '__main__':
  main()
