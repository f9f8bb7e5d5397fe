"""Tokenizers: a checkpoint's own, or a small embedded one trained offline.

The embedded tokenizer is a byte-level BPE (GPT-2 style: every byte is a
token, so any text round-trips exactly) trained with the `tokenizers`
library on the run's own text. Special tokens: <unk>=0, <s>=1, </s>=2,
<pad>=3; <s> is prepended to every encoded text (as LLaMA does), </s> never
added, and '<s>' or '</s>' written in a text is plain text, not a special
token (split_special_tokens=True). It is cached under `cache_dir/<hash>`, the
hash covering the texts, the vocabulary size and `FORMAT_VERSION`, so a rerun
loads it instantly.
"""

from collections.abc import Iterable, Sequence
import hashlib
import os
import pathlib
import shutil
import tempfile
from typing import Optional

from absl import logging
import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import processors
from tokenizers import trainers
import transformers

from fdlora_jax.errors import MissingFileError, need

FORMAT_VERSION = 'bytebpe-v1'
SPECIAL_TOKENS = ('<unk>', '<s>', '</s>', '<pad>')
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def load_tokenizer(
    checkpoint_dir: str,
    gguf_cache_dir: Optional[str] = None,
) -> transformers.PreTrainedTokenizerBase:
  """The tokenizer of a local checkpoint, with a pad token.

  `checkpoint_dir` is what `checkpoint.load_pretrained` accepts: a Hugging
  Face checkpoint directory, a LLaMA `.gguf` file, or a directory holding one
  (converted once into `gguf_cache_dir`, default `checkpoint.GGUF_CACHE_DIR`;
  see `checkpoint.gguf_to_hf`).

  Without a pad token, pad = unk (LLaMA's usual choice), else eos; a log line
  says which. Special-token strings inside the text ('</s>' in a log line)
  are tokenized as plain text (split_special_tokens=True); bos/eos come only
  from add_special_tokens and the data code.
  """
  from fdlora_jax import checkpoint  # pylint: disable=g-import-not-at-top
  given = pathlib.Path(checkpoint_dir).expanduser()
  if not given.exists():
    raise MissingFileError(f'config.model.checkpoint: {given.resolve()} is not a '
                            'directory with tokenizer files or a .gguf file')
  path = checkpoint.resolve_checkpoint(
      given, gguf_cache_dir or checkpoint.GGUF_CACHE_DIR)
  tok = transformers.AutoTokenizer.from_pretrained(
      str(path), local_files_only=True, split_special_tokens=True)
  if tok.pad_token is None:
    tok.pad_token = tok.unk_token if tok.unk_token is not None else (
        tok.eos_token)
    logging.info('tokenizer %s has no pad token; using %r (id %d)', path,
                 tok.pad_token, tok.pad_token_id)
  if tok.eos_token is None:
    raise checkpoint.CheckpointError(f'{path}: the tokenizer has no eos '
                                     'token; the answer must end with one')
  return tok


def _hash(texts: list[str], vocab_size: int) -> str:
  h = hashlib.sha256(f'{FORMAT_VERSION}\0{vocab_size}\0'.encode())
  for t in texts:
    h.update(t.encode('utf-8', errors='replace'))
    h.update(b'\0')
  return h.hexdigest()[:16]


def _wrap(tok: tokenizers.Tokenizer) -> transformers.PreTrainedTokenizerFast:
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, unk_token='<unk>', bos_token='<s>',
      eos_token='</s>', pad_token='<pad>',
      clean_up_tokenization_spaces=False, split_special_tokens=True)


def _train(texts: list[str], vocab_size: int) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  tok.post_processor = processors.TemplateProcessing(
      single='<s> $A', pair='<s> $A $B', special_tokens=[('<s>', 1)])
  return tok


def embedded_tokenizer(texts: Iterable[str], vocab_size: int,
                       cache_dir: str, whole: Sequence[str] = ()
                       ) -> transformers.PreTrainedTokenizerFast:
  """A byte-level BPE trained on `texts`, cached; deterministic.

  Args:
    texts: the run's own text (prompts and answers).
    vocab_size: upper bound on len(tokenizer) (at least 260: 256 bytes and
      4 special tokens).
    cache_dir: e.g. c.model.tokenizer_cache; the tokenizer is stored in
      `<cache_dir>/<hash>/tokenizer.json`.
    whole: strings that must each be one token wherever they occur (the
      answer options, e.g. ' yes' and ' no'), so that scoring options by
      log-likelihood compares one token with one token.

  Returns:
    The tokenizer (pad, bos, eos, unk set).
  """
  need(vocab_size >= _MIN_VOCAB, 'model.tokenizer_vocab_size', vocab_size,
       f'a byte-level BPE needs at least {_MIN_VOCAB}')
  texts = list(texts)
  if not texts:
    raise ValueError('embedded_tokenizer: no text to train on')
  whole = sorted(set(whole))
  key = _hash(texts + ['\0whole\0'] + whole, vocab_size)
  path = pathlib.Path(cache_dir).expanduser() / key / 'tokenizer.json'
  if path.is_file():
    logging.info('embedded tokenizer: loaded from cache %s', path)
    return _wrap(tokenizers.Tokenizer.from_file(str(path)))
  tok = _train(texts, vocab_size - len(whole))
  tok.add_tokens([tokenizers.AddedToken(w, normalized=False) for w in whole])
  path.parent.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=path.parent.parent))
  try:
    tok.save(str(tmp / 'tokenizer.json'))
    os.replace(tmp, path.parent)  # atomic: a reader sees all or nothing
  except OSError:  # another process wrote the same key first
    if not path.is_file():
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  logging.info('embedded tokenizer: trained (vocab %d) on %d texts, saved to '
               '%s', tok.get_vocab_size(), len(texts), path)
  return _wrap(tok)
