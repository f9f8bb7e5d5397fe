"""Shared helpers for the benchmark scripts: tables, JSON, FLOPs, matmul peak.

Not part of the library or the test suite. Every script prints a table and
writes ``benchmarks/results/<name>.json`` with the machine and the date.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / 'results'
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

ALL_TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj',
               'down_proj')

# Counted model FLOPs of one training token of the frozen-base LoRA step
# (multiply-add = 2 FLOPs), as used in every MFU figure here:
#
#   F = 4 * P_body + 4 * P_head * A / T + 6 * P_lora + 12 * L * T * H_attn
#
#   P_body  matmul weights of the decoder projections of every layer (the
#           embedding lookup is free). Forward 2 * P_body; backward only the
#           activation gradients dX = dY W^T, another 2 * P_body (no weight
#           gradient: frozen).
#   P_head  the LM head, D * V. The loss covers only the A answer tokens of a
#           T-token sequence, and the step computes logits only there, so the
#           head counts for A / T of the tokens (A = T: every position).
#   P_lora  adapter weights, r * (in + out) per targeted projection per layer;
#           forward 2, backward 4 (activation and weight gradients).
#   attention scores QK^T and the weighted sum PV: 4 * T * H_attn per token
#           per layer forward, twice that backward (PaLM's 12 L T H count; the
#           full T x T square, no causal halving, as the XLA path computes).
FLOPS_FORMULA = ('F/token = 4*P_body + 4*P_head*A/T + 6*P_lora + '
                 '12*L*T*H_attn (frozen base: forward + activation grads '
                 'only; LM head only at the A answer positions; LoRA: forward '
                 '+ activation + weight grads; attention QK^T and PV over the '
                 'full T x T, fwd 4 + bwd 8)')


def flops_per_token(cfg, lora_cfg, seq: int,
                    answer_tokens: int | None = None) -> dict:
  """The terms of :data:`FLOPS_FORMULA` for a ``LlamaConfig``/``LoraConfig``.

  ``answer_tokens``: A, the loss positions per sequence (default
  :data:`ANSWER_TOKENS`, as the benchmarks train).
  """
  answer = ANSWER_TOKENS if answer_tokens is None else answer_tokens
  shapes = {name: cfg.projection_shape(name)
            for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj',
                         'up_proj', 'down_proj')}
  layers = cfg.num_hidden_layers
  p_body = layers * sum(i * o for i, o in shapes.values())
  p_head = cfg.hidden_size * cfg.vocab_size
  p_base = p_body + p_head
  p_lora = layers * sum(lora_cfg.rank * (shapes[t][0] + shapes[t][1])
                        for t in lora_cfg.targets)
  h_attn = cfg.num_attention_heads * cfg.dim_per_head
  attn = 12 * layers * seq * h_attn
  return {'p_base': p_base, 'p_lora': p_lora,
          'flops_per_token': (4 * p_body + 4 * p_head * min(answer, seq) / seq
                              + 6 * p_lora + attn)}


def matmul_peak(seconds: float = 2.0, n: int = 2048,
                dtype: str = 'float32') -> float:
  """FLOP/s of a large ``jnp.dot`` in ``dtype`` through XLA in this process
  (best of a few, on random data): the machine's practical matmul peak for
  the MFU fractions."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best, t_end = float('inf'), time.perf_counter() + seconds
  while time.perf_counter() < t_end:
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def machine() -> dict:
  import jax
  info = {'machine': f'{platform.machine()} {os.cpu_count()} cpus',
          'platform': platform.platform(), 'python': platform.python_version(),
          'jax': jax.__version__, 'backend': jax.default_backend(),
          'date': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
  try:   # the code measured: commit, and whether the tree had changes
    rev = subprocess.run(['git', 'describe', '--always', '--dirty'],
                         cwd=REPO, capture_output=True, text=True, timeout=10)
    if rev.returncode == 0:
      info['commit'] = rev.stdout.strip()
  except (OSError, subprocess.SubprocessError):
    pass
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          info['cpu'] = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  return info


def median(xs):
  return statistics.median(xs)


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
  columns = columns or list(rows[0])
  cells = [[_fmt(r.get(c, '')) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells))
            for i, c in enumerate(columns)]
  print('  '.join(c.rjust(w) for c, w in zip(columns, widths)))
  for row in cells:
    print('  '.join(v.rjust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
  if isinstance(v, float):
    if abs(v) >= 100:
      return f'{v:,.0f}'
    return f'{v:.3g}'
  return str(v)


def write_json(name: str, payload: dict, out: str | None = None) -> Path:
  path = Path(out) if out else RESULTS / f'{name}.json'
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(payload, indent=2, default=str))
  print(f'wrote {path}')
  return path


# FDLoRA's inner step is SFT: the loss covers only the answer (a few tokens
# at the end: ' yes' / ' no' and eos), so the benchmarks train the same way on
# both sides (JAX loss_mask, torch labels=-100 elsewhere).
ANSWER_TOKENS = 4


def sft_loss_mask(shape) -> np.ndarray:
  """float32 mask of ``shape [..., T]`` with the last ANSWER_TOKENS set."""
  mask = np.zeros(shape, np.float32)
  mask[..., -ANSWER_TOKENS:] = 1.0
  return mask


def hf_llama_config(cfg):
  """The ``transformers.LlamaConfig`` of a project ``LlamaConfig``, with
  torch's fastest CPU attention (SDPA): the PyTorch side of a comparison."""
  import transformers
  hf = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_hidden_layers,
      num_attention_heads=cfg.num_attention_heads,
      num_key_value_heads=cfg.num_key_value_heads,
      max_position_embeddings=cfg.max_position_embeddings,
      rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
      tie_word_embeddings=cfg.tie_word_embeddings)
  hf._attn_implementation = 'sdpa'
  return hf
