"""The embedded byte-level BPE tokenizer and checkpoint tokenizer loading."""

import pathlib

import pytest

from fdlora_jax import tokenizer as tokenizer_lib
from fdlora_jax.data import synthetic

SHARED = pathlib.Path(__file__).parents[1].parent / 'shared' / 'data'


def _texts():
  texts = list(synthetic.synthetic_lines('BGL', 300, seed=0, block=10))
  texts += list(synthetic.synthetic_lines('Spirit', 300, seed=0, block=10))
  return texts


def test_cached_and_deterministic(tmp_path, caplog):
  caplog.set_level('INFO')
  texts = _texts()
  a = tokenizer_lib.embedded_tokenizer(texts, 400, str(tmp_path / 'a'))
  assert 'trained' in caplog.text
  caplog.clear()
  b = tokenizer_lib.embedded_tokenizer(iter(texts), 400, str(tmp_path / 'a'))
  assert 'loaded from cache' in caplog.text
  c = tokenizer_lib.embedded_tokenizer(texts, 400, str(tmp_path / 'c'))
  sample = texts[:20] + ['Is there an anomaly? yes']
  assert (a(sample)['input_ids'] == b(sample)['input_ids'] ==
          c(sample)['input_ids'])
  assert a.get_vocab() == c.get_vocab()  # retrained from scratch: the same
  assert len(list((tmp_path / 'a').iterdir())) == 1
  # Other texts or another size: another cache entry.
  tokenizer_lib.embedded_tokenizer(texts[:-1], 400, str(tmp_path / 'a'))
  tokenizer_lib.embedded_tokenizer(texts, 300, str(tmp_path / 'a'))
  assert len(list((tmp_path / 'a').iterdir())) == 3


@pytest.mark.parametrize('vocab_size', [260, 512])
def test_round_trip_and_size(tmp_path, vocab_size):
  tok = tokenizer_lib.embedded_tokenizer(_texts(), vocab_size, str(tmp_path))
  assert len(tok) <= vocab_size
  assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id,
          tok.pad_token_id) == (0, 1, 2, 3)
  texts = _texts()[:50]
  if (SHARED / 'loghub' / 'BGL_2k.log').is_file():
    texts += (SHARED / 'loghub' / 'BGL_2k.log').read_text().splitlines()[:200]
  texts += ['  tabs\tand unicode \u00e9\u4e2d \ufffd {x} <s>?', '']
  for text in texts:
    ids = tok(text)['input_ids']
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_too_small_vocab(tmp_path):
  with pytest.raises(ValueError, match='at least 260'):
    tokenizer_lib.embedded_tokenizer(['x'], 100, str(tmp_path))


def test_load_tokenizer_sets_pad(tmp_path):
  tok = tokenizer_lib.embedded_tokenizer(_texts(), 300, str(tmp_path / 'c'))
  tok.pad_token = None
  tok.save_pretrained(str(tmp_path / 'ckpt'))
  loaded = tokenizer_lib.load_tokenizer(str(tmp_path / 'ckpt'))
  assert loaded.pad_token == '<unk>'
  with pytest.raises(FileNotFoundError, match='nope'):
    tokenizer_lib.load_tokenizer(str(tmp_path / 'nope'))


def test_answer_options_are_single_tokens(tmp_path):
  texts = ['Answer yes or no.\nkernel panic at node 12', 'all fine'] * 20
  tok = tokenizer_lib.embedded_tokenizer(texts, 300, str(tmp_path),
                                         whole=(' yes', ' no', ' maybe'))
  assert len(tok) <= 300
  for option in (' yes', ' no', ' maybe'):
    ids = tok(option, add_special_tokens=False)['input_ids']
    assert len(ids) == 1, (option, tok.convert_ids_to_tokens(ids))
    assert tok.decode(ids) == option
  text = 'Answer yes or no. maybe'
  assert tok.decode(tok(text, add_special_tokens=False)['input_ids']) == text
