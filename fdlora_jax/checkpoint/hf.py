"""Hugging Face checkpoints: safetensors files, a LLaMA's config and params.

Everything reads local paths; nothing is downloaded. Safetensors files are
memory-mapped and converted tensor by tensor into preallocated arrays of the
parameter dtype, so peak host memory stays near one copy of the model. No
pickle is ever loaded. ``CheckpointError`` is the error of every format.

Name mapping (HF -> this project's ``params`` tree, ``i`` = layer)::

  model.layers.i.self_attn.q_proj.weight    layers/self_attn/q_proj/kernel [i] = W.T
  model.layers.i.mlp.gate_proj.weight       layers/mlp/gate_proj/kernel    [i] = W.T
  model.layers.i.input_layernorm.weight     layers/input_layernorm/scale   [i]
  model.norm.weight                         norm/scale
  lm_head.weight                            lm_head                        = W.T

"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from fdlora_jax.errors import MissingFileError, UserError
from fdlora_jax.model import (ATTENTION_PROJECTIONS, MLP_PROJECTIONS,
                              ROPE_TYPES, LlamaConfig)

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
