"""PEFT LoRA adapters: this project's LoRA pytree to and from PEFT's format.

``save_peft_adapter`` writes a directory that
``peft.PeftModel.from_pretrained`` loads; ``load_peft_adapter`` reads one
back, checking its config, rank, targets and tensor shapes.

PEFT adapter keys (``adapter_model.safetensors``)::

  base_model.model.model.layers.i.self_attn.q_proj.lora_A.weight  (r, in)  = a[i].T
  base_model.model.model.layers.i.self_attn.q_proj.lora_B.weight  (out, r) = b[i].T
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from fdlora_jax.checkpoint.hf import (CheckpointError, read_safetensors,
                                      write_safetensors)
from fdlora_jax.errors import MissingFileError
from fdlora_jax.lora import LoraConfig, adapted_paths
from fdlora_jax.model import ATTENTION_PROJECTIONS, PROJECTIONS, LlamaConfig

_PEFT_PREFIX = 'base_model.model.'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'
ADAPTER_CONFIG = 'adapter_config.json'


def save_peft_adapter(directory: str | os.PathLike, lora: dict,
                      lora_cfg: LoraConfig,
                      base_model_name_or_path: str = '') -> Path:
  """Writes ``lora`` as a PEFT LoRA adapter for ``LlamaForCausalLM``.

  ``peft.PeftModel.from_pretrained(model, directory)`` loads the result.
  """
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tensors = {}
  for path in adapted_paths(lora):
    if path[0] != 'layers' or len(path) != 3:
      raise ValueError(f'unexpected LoRA path {path}')
    _, module, proj = path
    a = np.asarray(jax.device_get(lora['layers'][module][proj]['a']),
                   np.float32)
    b = np.asarray(jax.device_get(lora['layers'][module][proj]['b']),
                   np.float32)
    if a.ndim != 3:
      raise ValueError(f'LoRA {"/".join(path)}/a has shape {a.shape}; save '
                       f'one client at a time (no leading client axis)')
    for i in range(a.shape[0]):
      stem = f'{_PEFT_PREFIX}model.layers.{i}.{module}.{proj}'
      tensors[f'{stem}.lora_A.weight'] = a[i].T
      tensors[f'{stem}.lora_B.weight'] = b[i].T
  write_safetensors(directory / ADAPTER_WEIGHTS, tensors,
                    metadata={'format': 'pt'})
  config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM',
      'base_model_name_or_path': base_model_name_or_path or None,
      'r': lora_cfg.rank, 'lora_alpha': lora_cfg.alpha,
      'lora_dropout': lora_cfg.dropout,
      'target_modules': sorted(lora_cfg.targets), 'bias': 'none',
      'fan_in_fan_out': False, 'inference_mode': True,
      'init_lora_weights': True, 'modules_to_save': None,
      'use_rslora': False, 'use_dora': False, 'layers_to_transform': None,
      'layers_pattern': None, 'rank_pattern': {}, 'alpha_pattern': {},
      'revision': None,
  }
  (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
  return directory


_ADAPTER_RE = re.compile(
    r'^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)'
    r'\.lora_(A|B)(?:\.[\w-]+)?\.weight$')


def load_peft_adapter(directory: str | os.PathLike, cfg: LlamaConfig,
                      lora_cfg: Optional[LoraConfig] = None
                      ) -> tuple[dict, LoraConfig]:
  """Reads a PEFT LoRA adapter directory into a LoRA pytree.

  If ``lora_cfg`` is given, the adapter's rank and targets must match it.
  Returns ``(lora, lora_cfg)``.
  """
  directory = Path(directory)
  cfg_path = directory / ADAPTER_CONFIG
  if not cfg_path.is_file():
    raise MissingFileError(f'{cfg_path} not found (a PEFT adapter directory '
                            f'holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})')
  ac = json.loads(cfg_path.read_text())
  if ac.get('peft_type', 'LORA') != 'LORA':
    raise CheckpointError(f'{cfg_path}: peft_type {ac.get("peft_type")!r} is '
                          f'not LORA')
  for flag in ('use_rslora', 'use_dora'):
    if ac.get(flag):
      raise CheckpointError(f'{cfg_path}: {flag}=true is not supported')
  if ac.get('rank_pattern') or ac.get('alpha_pattern'):
    raise CheckpointError(f'{cfg_path}: per-module rank_pattern/alpha_pattern '
                          f'are not supported')
  targets = ac.get('target_modules')
  if isinstance(targets, str) or not targets:
    raise CheckpointError(f'{cfg_path}: target_modules must be a list of '
                          f'projection names, got {targets!r}')
  found = LoraConfig(rank=int(ac['r']), alpha=float(ac['lora_alpha']),
                     dropout=float(ac.get('lora_dropout', 0.0)),
                     targets=tuple(sorted(targets)))
  found.validate(PROJECTIONS)
  if lora_cfg is not None:
    if lora_cfg.rank != found.rank:
      raise CheckpointError(f'{cfg_path}: adapter rank r={found.rank} does '
                            f'not match lora.rank={lora_cfg.rank}')
    if set(lora_cfg.targets) != set(found.targets):
      raise CheckpointError(f'{cfg_path}: adapter target_modules '
                            f'{list(found.targets)} do not match lora.targets '
                            f'{list(lora_cfg.targets)}')
  r, n_layers = found.rank, cfg.num_hidden_layers
  lora: dict = {'layers': {}}
  seen: dict[tuple, set] = {}
  weights = directory / ADAPTER_WEIGHTS
  for name, arr in read_safetensors(weights):
    m = _ADAPTER_RE.match(name)
    if not m:
      raise CheckpointError(f'{weights}: unknown adapter tensor {name!r}')
    layer, module, proj, which = int(m.group(1)), m.group(2), m.group(3), \
        m.group(4)
    if proj not in found.targets:
      raise CheckpointError(f'{weights}: tensor {name!r} adapts {proj}, which '
                            f'is not in target_modules {list(found.targets)}')
    if layer >= n_layers:
      raise CheckpointError(f'{weights}: tensor {name!r} is beyond '
                            f'num_hidden_layers={n_layers}')
    fan_in, fan_out = cfg.projection_shape(proj)
    want = (r, fan_in) if which == 'A' else (fan_out, r)
    if tuple(arr.shape) != want:
      raise CheckpointError(f'{weights}: tensor {name!r} has shape '
                            f'{tuple(arr.shape)}, expected {want} (r={r})')
    node = lora['layers'].setdefault(module, {}).setdefault(proj, {
        'a': np.zeros((n_layers, fan_in, r), np.float32),
        'b': np.zeros((n_layers, r, fan_out), np.float32)})
    node['a' if which == 'A' else 'b'][layer] = arr.T.astype(np.float32)
    seen.setdefault((module, proj, which), set()).add(layer)
  for proj in found.targets:
    module = 'self_attn' if proj in ATTENTION_PROJECTIONS else 'mlp'
    for which in 'AB':
      lacking = set(range(n_layers)) - seen.get((module, proj, which), set())
      if lacking:
        raise CheckpointError(f'{weights}: missing lora_{which} of {proj} for '
                              f'layers {sorted(lacking)}')
  return jax.tree.map(jnp.asarray, lora), found
