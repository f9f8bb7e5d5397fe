"""The inner step on one accelerator: LLaMA-2-7B shapes, N clients, bf16.

  # on a GPU (cudnn flash attention, remat, donated buffers):
  python benchmarks/accelerator.py                         # 7B, N=5, T=1024,2048
  # on this CPU (a check that the script runs; figures are not GPU figures):
  python benchmarks/accelerator.py --preset small --seq 128 --dtype float32
  # multi-device layout on 4 forced host devices (clients x model mesh):
  XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
    python benchmarks/accelerator.py --preset small --seq 128 --dtype float32 \\
    --clients 4 --mesh 2,2 --max-clients 8

Builds the preset with random weights in ``--dtype`` (bf16 storage and
compute), ``remat=True``, ``attention='auto'`` (``jax.nn.dot_product_attention``
with ``implementation='cudnn'`` for bf16 on a GPU, XLA elsewhere) and times
``fl.sft_clients_update`` (adapters and optimizer states donated) for
``--clients`` N at each ``--seq``. Reports:

  tokens/s    N * B * T * K / step time (median of ``--repeats``)
  MFU         counted FLOPs / time / peak, with
              F/token = 4*P_body + 4*P_head*A/T + 6*P_lora + 12*L*T*H_attn
              (frozen base: forward 2*P_body plus activation gradients
              2*P_body, no weight gradients; the LM head only at the A = 4
              answer positions the SFT loss covers; LoRA forward 2, backward 4 per
              weight; attention QK^T and PV over the full T x T, fwd 4 +
              bwd 8, no causal halving; remat's recomputed forward is not
              counted). The peak is a dense matmul in ``--dtype`` timed in
              the same process (``--peak-tflops`` overrides it, e.g. 989 for
              an H100/H200 SXM's bf16 dense peak).
  peak memory ``jax.devices()[0].memory_stats()['peak_bytes_in_use']``
              (accelerators only; 'n/a' on the CPU backend).
  max N       the largest N (doubling, then bisection, up to
              ``--max-clients``) whose step compiles and runs.

Writes ``benchmarks/results/accelerator.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import time

import common
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fdlora_jax import lora as lora_lib
from fdlora_jax import sharding
from fdlora_jax.fl import init_opt_states, sft_clients_update
from fdlora_jax.lora import LoraConfig
from fdlora_jax.model import PRESETS, Llama, init_params


def peak_flops(dtype, n: int) -> float:
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(10):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def memory_stats() -> dict:
  try:
    return jax.devices()[0].memory_stats() or {}
  except Exception:  # the CPU backend has none
    return {}


class Step:
  """One compiled inner round for N clients, on an optional mesh."""

  def __init__(self, model, base, opt, n, batch, seq, steps, mesh):
    cfg = model.cfg
    lora = lora_lib.replicate(lora_lib.init(model, jax.random.key(1)), n)
    lora = jax.tree.map(jnp.array, lora)
    state = init_opt_states(opt, lora)
    rng = np.random.default_rng(0)
    batches = {
        'tokens': rng.integers(0, cfg.vocab_size, (steps, n, batch, seq)
                               ).astype(np.int32),
        'loss_mask': common.sft_loss_mask((steps, n, batch, seq)),
        'attention_mask': np.ones((steps, n, batch, seq), np.int32),
        'valid': np.ones((steps, n, batch), np.float32)}
    rngs = jax.random.split(jax.random.key(2), n)
    if mesh is not None:
      lora, state, rngs = sharding.shard_clients((lora, state, rngs), mesh)
      batches = sharding.shard_clients(batches, mesh, axis=1)
    else:
      batches = jax.tree.map(jnp.asarray, batches)
    self.args = [base, lora, state, batches, rngs]
    self.mesh = mesh
    update = sft_clients_update(model, opt, dropout=True, donate=True)
    t0 = time.perf_counter()
    self.compiled = update.lower(
        *self.args, num_targets=common.ANSWER_TOKENS).compile()
    self.compile_s = time.perf_counter() - t0

  def run(self) -> float:
    base, lora, state, batches, rngs = self.args
    t0 = time.perf_counter()
    lora, state, _, _ = self.compiled(base, lora, state, batches, rngs)
    jax.block_until_ready(lora)
    dt = time.perf_counter() - t0
    if self.mesh is not None:
      # XLA may hand the adapters back split over 'model' as well; the
      # compiled step wants them as it was compiled for (clients only).
      lora, state = sharding.shard_clients((lora, state), self.mesh)
    self.args = [base, lora, state, batches, rngs]
    return dt


def fits(model, base, opt, n, a, seq, mesh) -> bool:
  try:
    s = Step(model, base, opt, n, a.batch, seq, a.steps, mesh)
    s.run()
    del s
    return True
  except Exception as e:  # XlaRuntimeError RESOURCE_EXHAUSTED and the like
    msg = str(e)
    if 'RESOURCE_EXHAUSTED' in msg or 'out of memory' in msg.lower() or \
        'Out of memory' in msg:
      return False
    raise


def max_clients(model, base, opt, a, seq, mesh, start) -> int:
  step = mesh.shape[sharding.CLIENTS] if mesh is not None else 1
  lo, hi = 0, None
  n = max(start, step)
  while n <= a.max_clients:                       # doubling
    if fits(model, base, opt, n, a, seq, mesh):
      lo, n = n, n * 2
    else:
      hi = n
      break
  if hi is None:
    return lo                                      # capped by --max-clients
  while hi - lo > step:                            # bisection
    mid = (lo + hi) // 2 // step * step
    if mid <= lo:
      break
    if fits(model, base, opt, mid, a, seq, mesh):
      lo = mid
    else:
      hi = mid
  return lo


def main():
  on_gpu = jax.default_backend() == 'gpu'
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--preset', default='llama2_7b')
  p.add_argument('--seq', default='1024,2048')
  p.add_argument('--clients', type=int, default=5)
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--steps', type=int, default=1)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--rank', type=int, default=8)
  p.add_argument('--targets', default='q_proj,v_proj')
  p.add_argument('--dtype', default='bfloat16' if on_gpu else 'float32')
  p.add_argument('--no-remat', action='store_true')
  p.add_argument('--mesh', default='',
                 help="'c,m': clients x model mesh (default: one device)")
  p.add_argument('--max-clients', type=int, default=64 if on_gpu else 8)
  p.add_argument('--no-search', action='store_true')
  p.add_argument('--peak-tflops', type=float, default=0.0)
  p.add_argument('--out', default=None)
  a = p.parse_args()

  cfg = PRESETS[a.preset].replace(dtype=a.dtype, param_dtype=a.dtype,
                                  remat=not a.no_remat, attention='auto')
  lcfg = LoraConfig(rank=a.rank, alpha=2.0 * a.rank, dropout=0.05,
                    targets=tuple(a.targets.split(',')))
  model = Llama(cfg, lcfg)
  mesh = None
  if a.mesh:
    c, m = map(int, a.mesh.split(','))
    mesh = sharding.make_mesh(c, m)
  base = init_params(cfg, jax.random.key(0))
  if mesh is not None:
    base = sharding.shard_base(base, mesh)
  opt = optax.adamw(2e-4, weight_decay=0.01)
  peak = (a.peak_tflops * 1e12 if a.peak_tflops else
          peak_flops(jnp.dtype(a.dtype), 8192 if on_gpu else 2048))
  attention = ('cudnn' if on_gpu and a.dtype in ('bfloat16', 'float16')
               else 'xla')
  print(f'{jax.devices()[0].device_kind} x{jax.device_count()}, '
        f'{a.preset} {a.dtype}, attention={attention}, remat={cfg.remat}, '
        f'mesh={a.mesh or "none"}, peak {peak / 1e12:.2f} TFLOP/s')
  print('FLOPs: ' + common.FLOPS_FORMULA)

  rows = []
  for seq in map(int, a.seq.split(',')):
    fl = common.flops_per_token(cfg, lcfg, seq)
    step = Step(model, base, opt, a.clients, a.batch, seq, a.steps, mesh)
    step.run()                                        # warm-up
    times = [step.run() for _ in range(a.repeats)]
    t = common.median(times)
    tokens = a.clients * a.batch * seq * a.steps
    stats = memory_stats()
    del step
    row = {'preset': a.preset, 'dtype': a.dtype, 'seq': seq,
           'clients': a.clients, 'batch': a.batch, 'step_s': t / a.steps,
           'tokens_per_s': tokens / t,
           'mfu': tokens * fl['flops_per_token'] / t / peak,
           'peak_mem_gib': (stats.get('peak_bytes_in_use', 0) / 2**30
                            if stats else 'n/a'),
           'max_clients': ('skipped' if a.no_search else
                           max_clients(model, base, opt, a, seq, mesh,
                                       a.clients)),
           'flops_per_token': fl['flops_per_token'],
           'times_s': [round(x, 4) for x in times]}
    rows.append(row)
    common.print_table([row], [c for c in row if c != 'times_s'])
  print()
  common.print_table(rows, [c for c in rows[0] if c != 'times_s'])
  common.write_json('accelerator', {
      **common.machine(), 'device': jax.devices()[0].device_kind,
      'device_count': jax.device_count(), 'args': vars(a),
      'attention': attention, 'remat': cfg.remat, 'peak_flops': peak,
      'flops_formula': common.FLOPS_FORMULA, 'rows': rows,
      'notes': ('max_clients capped by --max-clients; on the CPU backend '
                'nothing runs out of memory, so it only checks the search.')},
      a.out)


if __name__ == '__main__':
  main()
