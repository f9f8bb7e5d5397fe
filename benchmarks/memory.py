"""Peak host memory of one inner round: vmapped JAX vs PyTorch + peft.

  python benchmarks/memory.py                 # ~3 min on 2 cores

Every (implementation, N) runs in a fresh subprocess, which reports its peak
resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, raw,
nothing subtracted): ``load_peak`` once the base model is built; then the
high-water mark is reset (``/proc/self/clear_refs``), ``baseline`` is the
resident size with the model loaded, and ``peak`` the high-water mark of one
round of K AdamW steps on N clients (adapters, optimizer states, compilation
and the step). ``delta`` = peak - baseline. The model is a LLaMA whose base is hundreds of times the LoRA
(``--hidden 768 --layers 6``, vocab 32000, q/v LoRA rank 8 as in the paper),
so the base dominates:

  jax_vmap        ``fl.sft_clients_update`` (the base held once, shared by
                  the vmap; adapters and optimizer states donated).
  jax_vmap_remat  the same with ``cfg.remat=True`` (each decoder layer
                  rematerialised: activations of one layer live at a time).
  torch           one ``PeftModel`` with N adapters, clients one after
                  another, one AdamW per adapter.

Writes ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import common


def _maxrss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mib() -> float:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024.0
  return float('nan')


def _baseline() -> tuple[float, float, bool]:
  """(peak so far, resident now, peak reset?) once the base is loaded.

  Building the base (random init under jit) has its own transient peak; the
  kernel's high-water mark is reset here (``/proc/self/clear_refs`` = 5) so
  that the peak reported after the round is the round's own.
  """
  import gc
  gc.collect()
  load_peak = _maxrss_mib()
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    reset = True
  except OSError:
    reset = False
  return load_peak, _rss_mib(), reset


def child(a) -> dict:
  """Runs in the subprocess: build, baseline, one round, peak."""
  import numpy as np
  from fdlora_jax.model import LlamaConfig
  cfg = LlamaConfig(vocab_size=32000, hidden_size=a.hidden,
                    intermediate_size=a.intermediate,
                    num_hidden_layers=a.layers,
                    num_attention_heads=a.hidden // 64,
                    num_key_value_heads=a.hidden // 64,
                    max_position_embeddings=4096,
                    remat=a.impl == 'jax_vmap_remat')
  n, k, b, t = a.n, a.steps, a.batch, a.seq
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (k, n, b, t)).astype(np.int32)
  targets = tuple(a.targets.split(','))
  if a.impl.startswith('jax'):
    import jax
    import jax.numpy as jnp
    import optax
    from fdlora_jax import lora as lora_lib
    from fdlora_jax.fl import init_opt_states, sft_clients_update
    from fdlora_jax.lora import LoraConfig
    from fdlora_jax.model import Llama, init_params
    lcfg = LoraConfig(rank=a.rank, alpha=2.0 * a.rank, dropout=0.05,
                      targets=targets)
    model = Llama(cfg, lcfg)
    base = jax.block_until_ready(init_params(cfg, jax.random.key(0)))
    load_peak, baseline, reset = _baseline()
    lora = jax.tree.map(jnp.array, lora_lib.replicate(
        lora_lib.init(model, jax.random.key(1)), n))
    opt = optax.adamw(2e-4, weight_decay=0.01)
    state = init_opt_states(opt, lora)
    batches = {'tokens': jnp.asarray(tokens),
               'loss_mask': jnp.asarray(common.sft_loss_mask((k, n, b, t))),
               'attention_mask': jnp.ones((k, n, b, t), jnp.int32),
               'valid': jnp.ones((k, n, b), jnp.float32)}
    update = sft_clients_update(model, opt, dropout=True, donate=True)
    t0 = time.perf_counter()
    lora, state, _, _ = update(base, lora, state, batches,
                               jax.random.split(jax.random.key(2), n),
                               num_targets=common.ANSWER_TOKENS)
    jax.block_until_ready(lora)
    first_s = time.perf_counter() - t0
    base_mib = lora_lib.num_bytes(base) / 2**20
    lora_mib = lora_lib.num_bytes(lora) / 2**20
  else:
    import torch
    import transformers
    import peft
    torch.set_num_threads(os.cpu_count())
    hf = common.hf_llama_config(cfg)
    model = transformers.LlamaForCausalLM(hf)
    model.requires_grad_(False)
    load_peak, baseline, reset = _baseline()
    pcfg = peft.LoraConfig(r=a.rank, lora_alpha=2.0 * a.rank,
                           lora_dropout=0.05, target_modules=list(targets))
    pm = peft.get_peft_model(model, pcfg, adapter_name='client0')
    for i in range(1, n):
      pm.add_adapter(f'client{i}', pcfg)
    pm.train()
    opts = [torch.optim.AdamW(
        [p for name, p in pm.named_parameters() if f'.client{i}.' in name],
        lr=2e-4, weight_decay=0.01) for i in range(n)]
    t0 = time.perf_counter()
    for i in range(n):
      pm.set_adapter(f'client{i}')
      for s in range(k):
        x = torch.from_numpy(tokens[s, i]).long()
        labels = x.masked_fill(
            torch.from_numpy(common.sft_loss_mask(x.shape)) == 0, -100)
        pm(input_ids=x, labels=labels).loss.backward()
        opts[i].step()
        opts[i].zero_grad(set_to_none=True)
    first_s = time.perf_counter() - t0
    base_mib = sum(p.numel() * p.element_size()
                   for p in model.parameters()) / 2**20
    lora_mib = sum(p.numel() * p.element_size()
                   for name, p in pm.named_parameters()
                   if 'lora_' in name) / 2**20
  peak = _maxrss_mib()
  return {'impl': a.impl, 'clients': n, 'load_peak_mib': load_peak,
          'baseline_mib': baseline, 'peak_mib': peak, 'peak_was_reset': reset, 'delta_mib': peak - baseline,
          'base_weights_mib': base_mib, 'lora_weights_mib': lora_mib,
          'first_round_s': first_s}


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--clients', default='1,5,10')
  p.add_argument('--impls', default='jax_vmap,jax_vmap_remat,torch')
  p.add_argument('--hidden', type=int, default=768)
  p.add_argument('--intermediate', type=int, default=2048)
  p.add_argument('--layers', type=int, default=6)
  p.add_argument('--seq', type=int, default=128)
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--steps', type=int, default=1)
  p.add_argument('--rank', type=int, default=8)
  p.add_argument('--targets', default='q_proj,v_proj')
  p.add_argument('--impl', help=argparse.SUPPRESS)   # child mode
  p.add_argument('--n', type=int, help=argparse.SUPPRESS)
  p.add_argument('--out', default=None)
  a = p.parse_args()
  if a.impl:
    print('RESULT ' + json.dumps(child(a)))
    return

  rows = []
  passthrough = [f'--{k}={getattr(a, k)}' for k in
                 ('hidden', 'intermediate', 'layers', 'seq', 'batch', 'steps',
                  'rank', 'targets')]
  for n in map(int, a.clients.split(',')):
    for impl in a.impls.split(','):
      cmd = [sys.executable, __file__, f'--impl={impl}', f'--n={n}',
             *passthrough]
      proc = subprocess.run(cmd, capture_output=True, text=True,
                            cwd=common.REPO)
      line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
      if proc.returncode or not line:
        print(proc.stderr[-2000:])
        raise SystemExit(f'{impl} N={n} failed')
      row = json.loads(line[0][len('RESULT '):])
      rows.append(row)
      common.print_table([row])
  for row in rows:
    one = [r for r in rows if r['impl'] == row['impl'] and r['clients'] == 1]
    if one:
      row['peak_vs_n1'] = row['peak_mib'] / one[0]['peak_mib']
  print()
  cols = ['impl', 'clients', 'load_peak_mib', 'baseline_mib', 'peak_mib', 'delta_mib',
          'peak_vs_n1', 'base_weights_mib', 'lora_weights_mib', 'first_round_s']
  common.print_table(sorted(rows, key=lambda r: (r['impl'], r['clients'])),
                     cols)
  common.write_json('memory', {**common.machine(), 'args': vars(a),
                               'rows': rows,
                               'notes': 'MiB; each row a fresh subprocess; '
                                        'load_peak = ru_maxrss after building '
                                        'the base; baseline = VmRSS then; peak '
                                        '= ru_maxrss of the round after a '
                                        'high-water reset. first_round_s: the '
                                        'one round incl. JAX compilation / '
                                        'torch warm-up.'},
                    a.out)


if __name__ == '__main__':
  main()
