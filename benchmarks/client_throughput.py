"""Client-step throughput: vmapped JAX vs sequential JAX vs PyTorch + peft.

  python benchmarks/client_throughput.py         # SmolLM2-135M, N = 1, 5, 10
  python benchmarks/client_throughput.py --model= --preset small --clients 1,3,5,10

One FDLoRA inner round (K AdamW steps on every client) is timed three ways,
on the same LLaMA weights, LoRA targets, rank, dropout, sequence length and
batch. By default the model is the default config's pretrained
SmolLM2-135M-Instruct (``--model``, a name in
``fdlora_jax.checkpoint.NAMED_MODELS``) with its real weights: JAX loads them
with ``checkpoint.load_pretrained``, and PyTorch loads the same converted
Hugging Face directory (``checkpoint.resolve_checkpoint`` of the GGUF) with
``LlamaForCausalLM.from_pretrained``. ``--model=`` uses a random-weight
``--preset`` instead. The LoRA targets default to configs/logs.py's.

  (a) jax_vmap  ``fl.sft_clients_update``: all N clients in one jitted vmap,
                K steps in ``lax.scan``, base shared.
  (b) jax_seq   the same per-client function (``fl.sft_client_update``,
                jitted once) called for one client after another.
  (c) torch     ``transformers.LlamaForCausalLM`` + ``peft``: one
                ``PeftModel`` holding N named adapters, ``set_adapter`` per
                client, one ``torch.optim.AdamW`` per adapter, clients one
                after another (the way existing FL simulators do it).

Runs alternate (a, b, c), (b, c, a), (c, a, b), ...; each figure is the median
over ``--repeats`` rounds. ``torch.set_num_threads`` is set to the number of
cores XLA's CPU client uses (all of them, ``os.cpu_count()``), and
``torch.set_flush_denormal(True)`` as XLA does. JAX and torch run in two
worker processes (in one process, torch ran 3-12x slower after JAX calls);
the parent alternates the requests. Achieved model
FLOP/s use ``common.FLOPS_FORMULA`` and are given as a fraction of a large f32
``jnp.dot`` timed in the same process. Prints a table and writes
``benchmarks/results/client_throughput.json``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time

# On a GPU the JAX and torch workers share the device: JAX must not grab 75%
# of its memory up front (read when the backend starts, inherited by the
# spawned workers).
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import common  # noqa: F401  (puts the repo on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fdlora_jax import checkpoint
from fdlora_jax import lora as lora_lib
from fdlora_jax.fl import init_opt_states, sft_clients_update
from fdlora_jax.fl import sft_client_update
from fdlora_jax.lora import LoraConfig
from fdlora_jax.model import PRESETS, Llama, init_params, num_targets_bucket


def logs_config():
  from configs import logs  # pylint: disable=g-import-not-at-top
  return logs.get_config()


def make_batches(cfg, n, k, b, t, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (k, n, b, t)).astype(np.int32)
  return {'tokens': tokens,
          'loss_mask': common.sft_loss_mask((k, n, b, t)),
          'attention_mask': np.ones((k, n, b, t), np.int32),
          'valid': np.ones((k, n, b), np.float32)}


class JaxVmap:
  """(a): one call trains all N clients."""

  def __init__(self, model, base, opt, batches, n, dropout):
    self.base = base
    self.lora = lora_lib.replicate(lora_lib.init(model, jax.random.key(1)), n)
    self.lora = jax.tree.map(jnp.array, self.lora)     # own buffers (donated)
    self.state = init_opt_states(opt, self.lora)
    self.batches = jax.tree.map(jnp.asarray, batches)
    self.rngs = jax.random.split(jax.random.key(2), n)
    update = sft_clients_update(model, opt, dropout=dropout, donate=True)
    t0 = time.perf_counter()
    self.fn = update.lower(
        self.base, self.lora, self.state, self.batches, self.rngs,
        num_targets=num_targets_bucket(batches['loss_mask'])).compile()
    self.compile_s = time.perf_counter() - t0

  def round(self):
    self.lora, self.state, _, _ = self.fn(self.base, self.lora, self.state,
                                          self.batches, self.rngs)
    jax.block_until_ready(self.lora)


class JaxSequential:
  """(b): the same per-client step, one client after another."""

  def __init__(self, model, base, opt, batches, n, dropout):
    self.base = base
    one = lora_lib.init(model, jax.random.key(1))
    self.loras = [jax.tree.map(jnp.array, one) for _ in range(n)]
    self.states = [jax.jit(opt.init)(l) for l in self.loras]
    self.batches = [jax.tree.map(lambda x, i=i: jnp.asarray(x[:, i]), batches)
                    for i in range(n)]
    self.rngs = list(jax.random.split(jax.random.key(2), n))
    fn = jax.jit(sft_client_update(
        model, opt, dropout, num_targets_bucket(batches['loss_mask'])),
                 donate_argnums=(1, 2))
    t0 = time.perf_counter()
    self.fn = fn.lower(base, self.loras[0], self.states[0], self.batches[0],
                       self.rngs[0]).compile()
    self.compile_s = time.perf_counter() - t0

  def round(self):
    for i in range(len(self.loras)):
      self.loras[i], self.states[i], _, _ = self.fn(
          self.base, self.loras[i], self.states[i], self.batches[i],
          self.rngs[i])
    jax.block_until_ready(self.loras)


class TorchPeft:
  """(c): one PeftModel with N named adapters, set_adapter per client."""

  def __init__(self, cfg, lcfg, batches, n, hf_dir=None, dtype='float32'):
    import torch
    import transformers
    import peft
    self.torch = torch
    self.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    if hf_dir:   # the same weights as the JAX side, converted once from GGUF
      base = transformers.LlamaForCausalLM.from_pretrained(
          hf_dir, dtype=torch_dtype, attn_implementation='sdpa')
    else:
      base = transformers.LlamaForCausalLM(common.hf_llama_config(cfg))
    base = base.to(self.device, dtype=torch_dtype)
    base.requires_grad_(False)
    pcfg = peft.LoraConfig(r=lcfg.rank, lora_alpha=lcfg.alpha,
                           lora_dropout=lcfg.dropout,
                           target_modules=list(lcfg.targets))
    self.model = peft.get_peft_model(base, pcfg, adapter_name='client0')
    for i in range(1, n):
      self.model.add_adapter(f'client{i}', pcfg)
    self.model.train()
    self.opts = []
    for i in range(n):
      params = [p for name, p in self.model.named_parameters()
                if f'.client{i}.' in name]
      self.opts.append(torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01))
    # Inputs on the device once, as the JAX side holds its batches.
    tokens = torch.from_numpy(batches['tokens']).long()
    self.inputs = {
        'tokens': tokens.to(self.device),
        'mask': torch.from_numpy(batches['attention_mask']).long().to(
            self.device),
        'labels': tokens.masked_fill(
            torch.from_numpy(batches['loss_mask']) == 0, -100).to(
                self.device)}
    self.n = n

  def round(self):
    k = self.inputs['tokens'].shape[0]
    for i in range(self.n):
      self.model.set_adapter(f'client{i}')   # only this adapter trains
      for s in range(k):
        loss = self.model(input_ids=self.inputs['tokens'][s, i],
                          attention_mask=self.inputs['mask'][s, i],
                          labels=self.inputs['labels'][s, i]).loss
        loss.backward()
        self.opts[i].step()
        self.opts[i].zero_grad(set_to_none=True)
    if self.device == 'cuda':
      self.torch.cuda.synchronize()


def timed(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def load_model(name: str, preset: str, dtype: str = 'float32'):
  """(LlamaConfig, JAX base params or None, HF directory or None)."""
  if not name:
    return PRESETS[preset].replace(dtype=dtype, param_dtype=dtype), None, None
  path = checkpoint.resolve_model_name(name)
  hf_dir = checkpoint.resolve_checkpoint(path)
  cfg, base = checkpoint.load_pretrained(hf_dir, dtype=dtype,
                                         param_dtype=dtype)
  return cfg, base, str(hf_dir)


def worker(conn, kind, name, preset, lcfg, n, steps, batch, seq, threads,
           warmup, dtype):
  """A process that builds the runners of one framework, then times a round
  of the one named in each request (JAX and torch thread pools never share a
  process: in one process torch ran 3-12x slower after JAX calls)."""
  import torch
  torch.set_num_threads(threads)
  # XLA's CPU backend flushes denormals to zero; without the same, torch's
  # rounds slowed down by 5-25x at random (denormal gradients / Adam states).
  torch.set_flush_denormal(True)
  cfg, base, hf_dir = load_model(name, preset, dtype)
  batches = make_batches(cfg, n, steps, batch, seq)
  runners = {}
  if kind == 'jax':
    model = Llama(cfg, lcfg)
    if base is None:
      base = init_params(cfg, jax.random.key(0))
    opt = optax.adamw(2e-4, weight_decay=0.01)
    dropout = lcfg.dropout > 0
    runners['jax_vmap'] = JaxVmap(model, base, opt, batches, n, dropout)
    runners['jax_seq'] = JaxSequential(model, base, opt, batches, n, dropout)
  else:
    del base
    runners['torch'] = TorchPeft(cfg, lcfg, batches, n, hf_dir, dtype)
  for r in runners.values():
    for _ in range(warmup):                         # compile, caches
      r.round()
  conn.send({k: getattr(r, 'compile_s', 0.0) for k, r in runners.items()})
  while True:
    name = conn.recv()
    if name is None:
      break
    conn.send(timed(runners[name].round))


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='smollm2-135m-instruct',
                 help="a NAMED_MODELS name with real weights; '' for --preset")
  p.add_argument('--preset', default='small')
  p.add_argument('--clients', default='1,5,10')
  p.add_argument('--batch', type=int, default=1)   # configs: fl.batch_size
  p.add_argument('--seq', type=int, default=256)   # configs: data.max_length
  p.add_argument('--steps', type=int, default=3)   # configs: fl.inner_steps
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--rank', type=int, default=8)
  p.add_argument('--dropout', type=float, default=0.05)
  p.add_argument('--targets', default=','.join(logs_config().lora.targets),
                 help='LoRA targets (default: configs/logs.py)')
  p.add_argument('--warmup', type=int, default=2,
                 help='untimed rounds per runner (the first compiles)')
  p.add_argument('--impls', default='jax_vmap,jax_seq,torch')
  p.add_argument('--threads', type=int, default=os.cpu_count(),
                 help='torch.set_num_threads (XLA CPU uses all cores)')
  p.add_argument('--dtype', default=None,
                 help='base weights and compute, both sides (default: '
                      'bfloat16 on a GPU, float32 elsewhere)')
  p.add_argument('--out', default=None)
  a = p.parse_args()
  on_gpu = jax.default_backend() == 'gpu'
  a.dtype = a.dtype or ('bfloat16' if on_gpu else 'float32')

  import torch
  torch.set_num_threads(a.threads)
  with open('/proc/loadavg') as f:
    load_start = f.read().strip()
  cfg = (checkpoint.load_hf_config(checkpoint.resolve_checkpoint(
      checkpoint.resolve_model_name(a.model))) if a.model
         else PRESETS[a.preset])
  lcfg = LoraConfig(rank=a.rank, alpha=2.0 * a.rank, dropout=a.dropout,
                    targets=tuple(a.targets.split(',')))
  impls = a.impls.split(',')
  fl = common.flops_per_token(cfg, lcfg, a.seq)
  n_peak = 8192 if on_gpu else 2048
  peak = common.matmul_peak(n=n_peak, dtype=a.dtype)
  print(f'{jax.devices()[0].device_kind}: matmul peak ({a.dtype} '
        f'{n_peak}^3 jnp.dot): {peak / 1e9:.1f} GFLOP/s; '
        f'torch threads {torch.get_num_threads()}; '
        f'{fl["flops_per_token"] / 1e6:.2f} MFLOP/token; '
        f'base {fl["p_base"]:,} / LoRA {fl["p_lora"]:,} matmul params')

  def write(rows):
    with open('/proc/loadavg') as f:
      load_end = f.read().strip()
    common.write_json('client_throughput', {
        **common.machine(), 'args': vars(a),
        'device': jax.devices()[0].device_kind, 'dtype': a.dtype,
        'model': a.model or f'preset {a.preset} (random weights)',
        'loadavg_start': load_start, 'loadavg_end': load_end,
        'torch': torch.__version__, 'torch_threads': torch.get_num_threads(),
        'matmul_peak_flops': peak, 'flops_formula': common.FLOPS_FORMULA,
        **fl, 'rows': rows,
        'notes': 'tok_s: training tokens (N*K*B*T) per second of one inner '
                 'round; mfu: achieved counted FLOP/s over the matmul peak '
                 'measured in the same process; medians over alternated '
                 'runs. loadavg: /proc/loadavg after each N (a shared '
                 'machine inflates every time).'},
        a.out)

  rows = []
  ctx = multiprocessing.get_context('spawn')
  for n in map(int, a.clients.split(',')):
    procs, conns, owner = [], {}, {}
    for kind, names in (('jax', ('jax_vmap', 'jax_seq')), ('torch', ('torch',))):
      names = [x for x in names if x in impls]
      if not names:
        continue
      parent, child = ctx.Pipe()
      proc = ctx.Process(target=worker, args=(child, kind, a.model, a.preset,
                                              lcfg, n, a.steps, a.batch, a.seq,
                                              a.threads, a.warmup, a.dtype))
      proc.start()
      compile_s = parent.recv()      # built and warmed up (one at a time)
      procs.append(proc)
      for x in names:
        owner[x] = parent
      conns[kind] = compile_s
    compile_s = {k: v for c in conns.values() for k, v in c.items()}
    order = [x for x in impls if x in owner]
    times = {name: [] for name in order}
    for rep in range(a.repeats):
      shift = rep % len(order)
      for name in order[shift:] + order[:shift]:    # alternate the order
        owner[name].send(name)
        times[name].append(owner[name].recv())
    for c in set(owner.values()):
      c.send(None)
    for proc in procs:
      proc.join()
    tokens = n * a.steps * a.batch * a.seq
    row = {'clients': n}
    for name in order:
      t = common.median(times[name])
      row[f'{name}_tok_s'] = tokens / t
      row[f'{name}_mfu'] = tokens * fl['flops_per_token'] / t / peak
    for other in ('jax_seq', 'torch'):
      if 'jax_vmap' in times and other in times:
        row[f'vmap/{other.replace("jax_", "")}'] = (
            row['jax_vmap_tok_s'] / row[f'{other}_tok_s'])
    row['times_s'] = {k: [round(x, 4) for x in v] for k, v in times.items()}
    row['compile_s'] = {k: round(v, 2) for k, v in compile_s.items()}
    with open('/proc/loadavg') as f:
      row['loadavg'] = f.read().strip()
    rows.append(row)
    print_cols = [c for c in row if c not in ('times_s', 'compile_s')]
    common.print_table([row], print_cols)
    write(rows)                    # after every N: a killed run keeps them

  print()
  cols = [c for c in rows[0] if c not in ('times_s', 'compile_s')]
  common.print_table(rows, cols)


if __name__ == '__main__':
  main()
