"""The inner step on one accelerator: LLaMA-2-7B shapes, N clients, bf16.

  # on a GPU (cudnn flash attention, remat, donated buffers):
  python benchmarks/accelerator.py --profile /tmp/trace  # 7B, N=5, T=2048
  # on this CPU (a check that the script runs; figures are not GPU figures):
  python benchmarks/accelerator.py --preset small --seq 128 --clients 2 \\
    --sweep 1,3 --sweep-no-remat 1,2
  # multi-device layout on 4 forced host devices (clients x model mesh):
  XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
    python benchmarks/accelerator.py --preset small --seq 128 --clients 4 \\
    --mesh 2,2 --sweep '' --sweep-no-remat '' --variants ''

Builds the preset with random weights in ``--dtype`` (bf16 on a GPU: storage
and compute), LoRA rank ``--rank`` (64) on ``--targets`` (q, v), and times
``fl.sft_clients_update`` (K = ``--steps`` AdamW steps in one call, adapters
and optimizer states donated). In this order, each row written to the JSON
as soon as it is measured (a run cut short keeps what it has):

  1. the headline: N = ``--clients`` with remat and ``--attention`` ('auto':
     ``jax.nn.dot_product_attention`` with cudnn for bf16 on a GPU, XLA
     elsewhere); with ``--profile DIR``, one more round under
     ``jax.profiler`` (a perfetto trace in DIR);
  2. ``--sweep-no-remat`` N without remat, up to the first out-of-memory;
  3. ``--sweep`` N with remat (the last one after step 4);
  4. ``--variants`` of the headline: ``no_dropout`` (the cost of the LoRA
     dropout's random bits), ``xla_attention`` (no cudnn);
  5. with ``--verify-max``, one run at the predicted largest N.

Per row:

  tokens/s    N * B * T * K / round time (median of ``--repeats``)
  MFU         counted FLOPs / time / peak, with
              F/token = 4*P_body + 4*P_head*A/T + 6*P_lora + 12*L*T*H_attn
              (frozen base: forward 2*P_body plus activation gradients
              2*P_body, no weight gradients; the LM head only at the A = 4
              answer positions the SFT loss covers; LoRA forward 2, backward
              4 per weight; attention QK^T and PV over the full T x T, fwd 4
              + bwd 8, no causal halving; remat's recomputed forward is not
              counted). The peak is a dense matmul in ``--dtype`` on random
              data, timed in the same process (``--peak-tflops`` overrides
              it).
  memory      XLA's compiled account (arguments + outputs - aliased +
              temporaries) and the process's ``peak_bytes_in_use`` so far.
  max N       predicted per remat setting from a linear fit of the compiled
              memory over the measured N against the device's
              ``bytes_limit`` (memory is affine in N: the base once, the
              rest per client).

Writes ``benchmarks/results/accelerator.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import time
from typing import Optional

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
  """One compiled inner round (K steps) for N clients, on an optional mesh."""

  def __init__(self, model, base, opt, n, batch, seq, steps, mesh,
               dropout=True):
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
    update = sft_clients_update(model, opt, dropout=dropout, donate=True)
    t0 = time.perf_counter()
    self.compiled = update.lower(
        *self.args, num_targets=common.ANSWER_TOKENS).compile()
    self.compile_s = time.perf_counter() - t0
    self.memory = compiled_memory(self.compiled)

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


def compiled_memory(compiled) -> dict:
  """XLA's own account of a compiled step's device memory (bytes)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if m is None:
    return {}
  out = {k: int(getattr(m, k, 0) or 0) for k in (
      'argument_size_in_bytes', 'output_size_in_bytes',
      'alias_size_in_bytes', 'temp_size_in_bytes',
      'generated_code_size_in_bytes')}
  out['total_bytes'] = (out['argument_size_in_bytes']
                        + out['output_size_in_bytes']
                        - out['alias_size_in_bytes']
                        + out['temp_size_in_bytes'])
  return out


def is_oom(e: Exception) -> bool:
  msg = str(e)
  return ('RESOURCE_EXHAUSTED' in msg or 'out of memory' in msg.lower())


def measure(model, base, opt, n, a, seq, mesh, *, dropout=True,
            repeats=None, profile_dir=None) -> dict:
  """Compile, warm up, time ``repeats`` rounds; a row (or an OOM row)."""
  repeats = a.repeats if repeats is None else repeats
  cfg = model.cfg
  try:
    step = Step(model, base, opt, n, a.batch, seq, a.steps, mesh, dropout)
    step.run()                                        # warm-up
    times = [step.run() for _ in range(repeats)]
    if profile_dir:
      jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
      step.run()
      jax.profiler.stop_trace()
  except Exception as e:  # pylint: disable=broad-except
    if not is_oom(e):
      raise
    return {'clients': n, 'seq': seq, 'remat': cfg.remat,
            'attention': cfg.attention, 'dropout': dropout, 'oom': True,
            'error': str(e).split('\n')[0][:300]}
  t = common.median(times)
  tokens = n * a.batch * seq * a.steps
  fl = common.flops_per_token(cfg, model.lora, seq)
  stats = memory_stats()
  row = {'clients': n, 'seq': seq, 'remat': cfg.remat,
         'attention': cfg.attention, 'dropout': dropout,
         'round_s': t, 'step_s': t / a.steps,
         'tokens_per_s': tokens / t,
         'mfu': tokens * fl['flops_per_token'] / t / a.peak,
         'compiled_gib': step.memory.get('total_bytes', 0) / 2**30,
         'process_peak_gib': (stats.get('peak_bytes_in_use', 0) / 2**30
                              if stats else 'n/a'),
         'compile_s': step.compile_s,
         'flops_per_token': fl['flops_per_token'],
         'memory': step.memory, 'times_s': [round(x, 4) for x in times]}
  del step
  return row


def predict_max_clients(rows, limit_bytes) -> Optional[int]:
  """The largest N whose compiled memory fits ``limit_bytes``, from a linear
  fit of XLA's compiled totals over the measured N (memory is affine in N:
  the shared base once, activations and adapters per client)."""
  pts = sorted({r['clients']: r['memory']['total_bytes'] for r in rows
                if r.get('memory', {}).get('total_bytes')}.items())
  if len(pts) < 2 or not limit_bytes:
    return None
  (n0, m0), (n1, m1) = pts[0], pts[-1]
  per_client = (m1 - m0) / (n1 - n0)
  if per_client <= 0:
    return None
  return int((limit_bytes - (m0 - n0 * per_client)) // per_client)


COLUMNS = ['clients', 'seq', 'remat', 'attention', 'dropout', 'step_s',
           'tokens_per_s', 'mfu', 'compiled_gib', 'process_peak_gib',
           'compile_s']


def main():
  on_gpu = jax.default_backend() == 'gpu'
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--preset', default='llama2_7b')
  p.add_argument('--seq', type=int, default=2048)
  p.add_argument('--clients', type=int, default=5,
                 help='N of the headline row (MFU, peak memory, profile)')
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--steps', type=int, default=3, help='K, steps per round')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--rank', type=int, default=64)
  p.add_argument('--targets', default='q_proj,v_proj')
  p.add_argument('--dtype', default='bfloat16' if on_gpu else 'float32')
  p.add_argument('--sweep', default='1,10,20,40',
                 help='further N with remat, after the headline N')
  p.add_argument('--sweep-no-remat', default='1,2,4',
                 help="N without remat ('' to skip)")
  p.add_argument('--variants', default='no_dropout,xla_attention',
                 help='headline-N variants: no_dropout, xla_attention')
  p.add_argument('--verify-max', action='store_true',
                 help='run the predicted largest N (with remat) once')
  p.add_argument('--mesh', default='',
                 help="'c,m': clients x model mesh (default: one device)")
  p.add_argument('--profile', default='',
                 help='directory for a jax.profiler trace of one headline '
                      'round')
  p.add_argument('--attention', default='auto',
                 help="'auto' (cudnn for bf16 on a GPU), 'cudnn' or 'xla'")
  p.add_argument('--peak-tflops', type=float, default=0.0)
  p.add_argument('--out', default=None)
  a = p.parse_args()

  def build(remat=True, attention='auto'):
    cfg = PRESETS[a.preset].replace(dtype=a.dtype, param_dtype=a.dtype,
                                    remat=remat, attention=attention)
    lcfg = LoraConfig(rank=a.rank, alpha=2.0 * a.rank, dropout=0.05,
                      targets=tuple(a.targets.split(',')))
    return Llama(cfg, lcfg)

  mesh = None
  if a.mesh:
    c, m = map(int, a.mesh.split(','))
    mesh = sharding.make_mesh(c, m)
  model = build(attention=a.attention)
  base = init_params(model.cfg, jax.random.key(0))
  if mesh is not None:
    base = sharding.shard_base(base, mesh)
  opt = optax.adamw(2e-4, weight_decay=0.01)
  a.peak = (a.peak_tflops * 1e12 if a.peak_tflops else
            common.matmul_peak(n=8192 if on_gpu else 2048, dtype=a.dtype))
  attention = ('cudnn' if on_gpu and a.dtype in ('bfloat16', 'float16')
               else 'xla')
  limit = memory_stats().get('bytes_limit', 0)
  print(f'{jax.devices()[0].device_kind} x{jax.device_count()}, '
        f'{a.preset} {a.dtype}, auto attention={attention}, '
        f'mesh={a.mesh or "none"}, matmul peak {a.peak / 1e12:.1f} TFLOP/s, '
        f'memory limit {limit / 2**30:.1f} GiB', flush=True)
  print('FLOPs: ' + common.FLOPS_FORMULA, flush=True)

  rows = []
  payload = {**common.machine(), 'device': jax.devices()[0].device_kind,
             'device_count': jax.device_count(), 'args': vars(a),
             'auto_attention': attention, 'peak_flops': a.peak,
             'memory_limit_bytes': limit,
             'flops_formula': common.FLOPS_FORMULA,
             'lora': {'rank': a.rank, 'targets': a.targets},
             'rows': rows}

  def add(row):
    rows.append(row)
    common.print_table([row], [c for c in COLUMNS + ['oom'] if c in row])
    common.write_json('accelerator', payload, a.out)   # a killed run keeps it

  # Most wanted first: a run cut short by its time limit keeps these.
  add(measure(model, base, opt, a.clients, a, a.seq, mesh,
              profile_dir=a.profile or None))
  if a.sweep_no_remat:
    plain = build(remat=False, attention=a.attention)
    for n in map(int, a.sweep_no_remat.split(',')):
      row = measure(plain, base, opt, n, a, a.seq, mesh, repeats=2)
      add(row)
      if row.get('oom'):
        break
    plain_rows = [r for r in rows if not r.get('remat') and not r.get('oom')]
    payload['max_clients_no_remat_predicted'] = predict_max_clients(
        plain_rows, limit)
  sweep = list(map(int, filter(None, a.sweep.split(','))))
  for n in sweep[:-1]:
    add(measure(model, base, opt, n, a, a.seq, mesh, repeats=2))
  for v in filter(None, a.variants.split(',')):
    if v == 'no_dropout':
      add(measure(model, base, opt, a.clients, a, a.seq, mesh, dropout=False))
    elif v == 'xla_attention':
      add(measure(build(attention='xla'), base, opt, a.clients, a, a.seq,
                  mesh))
    else:
      raise SystemExit(f'unknown variant {v!r}')
  for n in sweep[-1:]:
    add(measure(model, base, opt, n, a, a.seq, mesh, repeats=2))
  remat_rows = [r for r in rows if r.get('remat') and not r.get('oom')
                and r['attention'] == a.attention and r['dropout']]
  payload['max_clients_remat_predicted'] = predict_max_clients(remat_rows,
                                                               limit)
  if a.verify_max and payload['max_clients_remat_predicted']:
    n = payload['max_clients_remat_predicted']
    add(measure(model, base, opt, n, a, a.seq, mesh, repeats=1))
  print()
  common.print_table([r for r in rows if not r.get('oom')], COLUMNS)
  print('max N predicted from compiled memory: with remat',
        payload['max_clients_remat_predicted'], ', without remat',
        payload.get('max_clients_no_remat_predicted'))
  common.write_json('accelerator', payload, a.out)


if __name__ == '__main__':
  main()
