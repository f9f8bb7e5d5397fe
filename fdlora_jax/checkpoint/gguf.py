"""llama.cpp GGUF files, converted once into a cached Hugging Face directory.

``gguf_to_hf`` reads a LLaMA GGUF with the ``gguf`` package (numpy only, no
torch) and writes what ``hf`` loads: ``config.json`` from the metadata, every
tensor dequantized under its HF name, and the tokenizer, built from the
metadata with the ``tokenizers`` library. So there is one loading path.

GGUF -> HF names (q/k rows are put back from llama.cpp's interleaved rope
order)::

  token_embd.weight          model.embed_tokens.weight
  blk.i.attn_q/k/v/output    model.layers.i.self_attn.q/k/v/o_proj.weight
  blk.i.ffn_gate/up/down     model.layers.i.mlp.gate/up/down_proj.weight
  blk.i.attn_norm/ffn_norm   model.layers.i.input/post_attention_layernorm
  output_norm.weight         model.norm.weight
  output.weight              lm_head.weight (absent: tied embeddings)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from absl import logging
import ml_dtypes
import numpy as np

from fdlora_jax.checkpoint.hf import CheckpointError, write_safetensors
from fdlora_jax.errors import MissingFileError

GGUF_CACHE_DIR = '~/.cache/fdlora_jax/gguf'
# Part of every cache key: bump it when the converted output changes (v2:
# the tokenizer is built from the metadata, digits split as llama.cpp does).
GGUF_FORMAT_VERSION = 'gguf-hf-v2'
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


# llama.cpp's token types (``tokenizer.ggml.token_type``).
_GGUF_TOKEN_CONTROL, _GGUF_TOKEN_USER_DEFINED = 3, 4

# llama.cpp's llama3 split (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_LLAMA3).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (regexes that split the text first, then GPT-2's
# split or not, ignore_merges, add_bos when the file does not say), as
# llama.cpp's llama-vocab.cpp sets them for a byte-level BPE vocabulary.
# GPT-2's split is the one ``pre_tokenizers.ByteLevel(use_regex=True)`` has.
_GGUF_BPE_PRE = {}
for _name in ('gpt-2', 'phi-2', 'exaone4'):
  _GGUF_BPE_PRE[_name] = ((), True, False, False)
for _name in ('starcoder', 'refact', 'command-r', 'smollm', 'codeshell',
              'exaone', 'minerva-7b'):
  # Every digit its own piece, then GPT-2's split: SmolLM2's own tokenizer
  # (a Digits pre-tokenizer before ByteLevel) does the same.
  _GGUF_BPE_PRE[_name] = ((r'\p{N}',), True, False, False)
for _name in ('llama3', 'llama-v3', 'llama-bpe', 'falcon3', 'falcon-h1',
              'pixtral', 'midm-2.0', 'lfm2'):
  _GGUF_BPE_PRE[_name] = ((_LLAMA3_SPLIT,), False, True, True)
del _name


def _byte_level_alphabet() -> list[str]:
  """GPT-2's printable spelling of each byte value (``bytes_to_unicode``)."""
  printable = set(range(ord('!'), ord('~') + 1)) | set(
      range(ord('\xa1'), ord('\xac') + 1)) | set(range(ord('\xae'), 256))
  spelling, extra = [], 256
  for b in range(256):
    if b in printable:
      spelling.append(chr(b))
    else:
      spelling.append(chr(extra))
      extra += 1
  return spelling


def _gguf_tokenizer(reader, path: Path):
  """The file's tokenizer as a transformers fast tokenizer, or None.

  Built from the GGUF metadata with the public ``tokenizers`` API and wrapped
  in ``transformers.PreTrainedTokenizerFast``; transformers' own GGUF code
  (internal, changed between versions, and its reader imports torch) is not
  used. Only byte-level BPE vocabularies (``tokenizer.ggml.model`` "gpt2",
  SmolLM2's) are supported, split as llama.cpp does for the file's
  ``tokenizer.ggml.pre``; sentencepiece ("llama") and other vocabularies are
  refused.
  """
  if 'tokenizer.ggml.tokens' not in reader.fields:
    return None
  # pylint: disable=g-import-not-at-top
  import tokenizers
  from tokenizers import decoders
  from tokenizers import models
  from tokenizers import pre_tokenizers
  from tokenizers import processors
  import transformers
  # pylint: enable=g-import-not-at-top

  def value(key, default=None):
    return _gguf_value(reader, f'tokenizer.{key}', path, default)

  vocab_type = value('ggml.model')
  if vocab_type != 'gpt2':
    raise CheckpointError(
        f'{path}: tokenizer.ggml.model is {vocab_type!r}; only "gpt2" '
        f'(byte-level BPE) tokenizers can be built from a GGUF file')
  pre = value('ggml.pre')
  if pre is None:
    logging.warning('GGUF %s states no tokenizer.ggml.pre; splitting text '
                    'as GPT-2 does', path)
    pre = 'gpt-2'
  if pre not in _GGUF_BPE_PRE:
    raise CheckpointError(
        f'{path}: tokenizer.ggml.pre {pre!r} is not supported; supported: '
        f'{", ".join(sorted(_GGUF_BPE_PRE))}')
  splits, gpt2_split, ignore_merges, add_bos_default = _GGUF_BPE_PRE[pre]

  tokens = value('ggml.tokens')
  types = value('ggml.token_type') or [1] * len(tokens)
  if len(types) != len(tokens):
    raise CheckpointError(f'{path}: {len(tokens)} tokens but {len(types)} '
                          f'token types')
  spelling = _byte_level_alphabet()
  alphabet = set(spelling)
  vocab, special, added = {}, [], []
  for i, (token, token_type) in enumerate(zip(tokens, types)):
    spelled = set(token) <= alphabet
    if token_type == _GGUF_TOKEN_USER_DEFINED:
      # Matched whole in the text, as llama.cpp does; kept under its own
      # spelling so the added token finds its id.
      added.append(tokenizers.AddedToken(token, special=False,
                                         normalized=False))
    elif not spelled:
      # Not written in the byte alphabet (a control token llama.cpp marked
      # by mistake, say): spell it so, as an ordinary token.
      token = ''.join(spelling[b] for b in token.encode('utf-8'))
    elif token_type == _GGUF_TOKEN_CONTROL:
      special.append(tokenizers.AddedToken(token, special=True,
                                           normalized=False))
    if vocab.setdefault(token, i) != i:
      raise CheckpointError(f'{path}: token {token!r} appears twice in the '
                            f'vocabulary (ids {vocab[token]} and {i})')
  if 'tokenizer.ggml.merges' not in reader.fields:
    raise CheckpointError(f'{path}: a BPE vocabulary without '
                          f'tokenizer.ggml.merges')
  merges = []
  for merge in value('ggml.merges'):
    pair = merge.split(' ')
    if len(pair) != 2:
      raise CheckpointError(f'{path}: merge {merge!r} is not two tokens')
    merges.append(tuple(pair))
  try:
    tok = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=merges, dropout=None, unk_token=None,
        continuing_subword_prefix='', end_of_word_suffix='', fuse_unk=False,
        byte_fallback=False, ignore_merges=ignore_merges))
  except Exception as e:  # the Rust side raises plain Exceptions
    raise CheckpointError(f'{path}: cannot build its BPE tokenizer '
                          f'({e})') from e
  steps = [pre_tokenizers.Split(tokenizers.Regex(r), behavior='isolated')
           for r in splits]
  steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False,
                                        use_regex=gpt2_split))
  tok.pre_tokenizer = (steps[0] if len(steps) == 1
                       else pre_tokenizers.Sequence(steps))
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(special)
  tok.add_tokens(added)
  if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
    raise CheckpointError(f'{path}: the tokenizer built has '
                          f'{tok.get_vocab_size(with_added_tokens=True)} '
                          f'tokens, the file {len(tokens)}')

  names = {}
  for name, key in (('bos_token', 'bos_token_id'),
                    ('eos_token', 'eos_token_id'),
                    ('unk_token', 'unknown_token_id'),
                    ('pad_token', 'padding_token_id')):
    token_id = value(f'ggml.{key}')
    if token_id is not None:
      if not 0 <= int(token_id) < len(tokens):
        raise CheckpointError(f'{path}: tokenizer.ggml.{key} {token_id} is '
                              f'not a token id (vocabulary of {len(tokens)})')
      names[name] = tok.id_to_token(int(token_id))
  add_bos = bool(value('ggml.add_bos_token', add_bos_default))
  add_eos = bool(value('ggml.add_eos_token', False))
  for flag, name in ((add_bos, 'bos_token'), (add_eos, 'eos_token')):
    if flag and name not in names:
      raise CheckpointError(f'{path}: the tokenizer adds a {name} but the '
                            f'file names none')
  # What transformers' add_bos_token/add_eos_token build, set here too so
  # the saved tokenizer.json says it whatever the transformers version.
  first = [names['bos_token']] if add_bos else []
  last = [names['eos_token']] if add_eos else []
  try:
    tok.post_processor = processors.TemplateProcessing(
        single=[*first, '$A:0', *last],
        pair=[*first, '$A:0', *last, *[f'{t}:1' for t in first], '$B:1',
              *[f'{t}:1' for t in last]],
        special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys(
            first + last)])
  except Exception as e:  # a token with ':' cannot be written in a template
    raise CheckpointError(f'{path}: cannot add {first + last} to every '
                          f'text ({e})') from e
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, **names, add_bos_token=add_bos,
      add_eos_token=add_eos, chat_template=value('chat_template'),
      clean_up_tokenization_spaces=False)


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
