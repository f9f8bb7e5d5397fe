"""How FedEx-LoRA's residual and FLoRA's merged stacks are held: low-rank
factors on the rank axis (what the methods do) against one dense ``[in,
out]`` delta per adapted matrix (the alternative), counted from the shapes
of the methods' real server state.

  python benchmarks/stack_memory.py        # seconds: shapes only

For each setting the method is built on the preset's shapes and its
``init`` traced with ``jax.eval_shape`` (nothing is allocated), so the bytes
are those of the state the engine holds. Per setting: the stack's bytes,
the dense alternative's, and the multiply-adds per token each adds to a
forward pass (factors: ``R (in + out)``; dense: ``in out`` per matrix and
layer). The stack is preallocated for every round (T + 1 slots), so these
are its bytes from round 0 on.

Writes ``benchmarks/results/stack_memory.json``.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

import common
from configs import logs as logs_config
from fdlora_jax import lora as lora_lib
from fdlora_jax.fl.api import Setup
from fdlora_jax.fl.methods import fedex_lora, flora
from fdlora_jax.lora import LoraConfig
from fdlora_jax.model import PRESETS, Llama

# (label, preset, clients, rank, rounds)
SETTINGS = (
    ('CPU study (configs/suites/cpu.py)', 'smollm2_135m', 5, 8, 2),
    ('CPU default (configs/logs.py)', 'smollm2_135m', 5, 8, 8),
    ('paper, SmolLM2-135M', 'smollm2_135m', 5, 8, 30),
    ('paper, LLaMA-2-7B', 'llama2_7b', 5, 8, 30),
)


def state_bytes(module, key: str, preset: str, n: int, rank: int,
                rounds: int) -> dict:
  cfg = PRESETS[preset]
  c = logs_config.get_config()
  c.lora.rank, c.fl.rounds, c.fl.num_clients = rank, rounds, n
  model = Llama(cfg, LoraConfig(rank=rank, alpha=float(c.lora.alpha),
                                targets=tuple(c.lora.targets)))
  setup = Setup(model=model, base=None, config=c, num_clients=n,
                train_counts=np.full(n, 100), label_counts=np.ones((n, 2)),
                few_shot={}, lora_init=lambda k: lora_lib.init(model, k))
  server, _ = jax.eval_shape(module.build(setup).init, jax.random.key(0))
  stack = server[key]
  r_total = lora_lib.rank_of(stack)
  dense = madds_stack = madds_dense = 0
  for path in lora_lib.adapted_paths(stack):
    a = lora_lib._get(stack, path)['a']              # [L, in, R]
    b = lora_lib._get(stack, path)['b']              # [L, R, out]
    layers, d_in, d_out = a.shape[0], a.shape[1], b.shape[-1]
    dense += layers * d_in * d_out * 4
    madds_stack += layers * r_total * (d_in + d_out)
    madds_dense += layers * d_in * d_out
  return {'stack_rank': r_total, 'stack_bytes': lora_lib.num_bytes(stack),
          'dense_bytes': dense, 'stack_madds_per_token': madds_stack,
          'dense_madds_per_token': madds_dense,
          'adapter_bytes': lora_lib.num_bytes(
              jax.eval_shape(lambda k: lora_lib.init(model, k),
                             jax.random.key(0)))}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default=None)
  args = p.parse_args(argv)
  rows = []
  for label, preset, n, rank, rounds in SETTINGS:
    for name, module, key in (('fedex_lora', fedex_lora, 'residual'),
                              ('flora', flora, 'stack')):
      row = {'setting': label, 'preset': preset, 'clients': n, 'rank': rank,
             'rounds': rounds, 'method': name,
             **state_bytes(module, key, preset, n, rank, rounds)}
      row['stack_over_dense'] = row['stack_bytes'] / row['dense_bytes']
      rows.append(row)
  common.print_table(rows, ['setting', 'method', 'stack_rank', 'stack_bytes',
                            'dense_bytes', 'stack_over_dense'])
  common.write_json('stack_memory', {**common.machine(), 'rows': rows,
                                     'targets': list(
                                         logs_config.get_config().lora.targets)},
                    args.out)


if __name__ == '__main__':
  main()
