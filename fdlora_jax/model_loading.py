"""The run's model: a pretrained checkpoint (:mod:`fdlora_jax.checkpoint`)
with its own tokenizer, or a preset with random weights and a small BPE
tokenizer trained on the task's text (:mod:`fdlora_jax.tokenizer`).

A process keeps the last pretrained model it loaded, so the points of a
suite load it once.
"""

from __future__ import annotations

from pathlib import Path

import jax

from fdlora_jax import checkpoint as checkpoint_lib
from fdlora_jax import data as data_lib
from fdlora_jax.errors import ConfigError, DataError, UserError
from fdlora_jax.lora import LoraConfig
from fdlora_jax.model import PRESETS, Llama, init_params
from fdlora_jax.tokenizer import embedded_tokenizer, load_tokenizer


def build_model(c, task):
  """(model, base params, tokenizer, model description) of config ``c``."""
  execution = dict(dtype=c.model.dtype, param_dtype=c.model.param_dtype,
                   remat=c.model.remat, attention=c.model.attention)
  lcfg = LoraConfig.from_config(c.lora)
  if c.model.checkpoint or c.model.name:
    path = (Path(c.model.checkpoint).expanduser() if c.model.checkpoint
            else checkpoint_lib.resolve_model_name(c.model.name))
    cfg, base, tokenizer = _load_pretrained(path, execution)
    described = (f'{c.model.name} ({path.resolve()})' if not
                 c.model.checkpoint else f'checkpoint {path.resolve()}')
  else:
    texts = data_lib.tokenizer_texts(task, c.data)
    tokenizer = embedded_tokenizer(
        texts, c.model.tokenizer_vocab_size, c.model.tokenizer_cache,
        whole=[data_lib.plain_answer_prefix(c.data) + o
               for o in task.options])
    cfg = PRESETS[c.model.preset].replace(**execution)
    if len(tokenizer) > cfg.vocab_size:
      cfg = cfg.replace(vocab_size=len(tokenizer))
    base = init_params(cfg, jax.random.key(c.seed))
    described = (f'preset {c.model.preset!r} with random weights (seed '
                 f'{c.seed}); embedded BPE tokenizer, {len(tokenizer)} tokens')
  return Llama(cfg, lcfg), base, tokenizer, described


_PRETRAINED: dict = {}   # one pretrained model per process (suites)


def _load_pretrained(path: Path, execution: dict):
  """(config, base params, tokenizer) of a local checkpoint; the last one
  loaded is kept, so the points of a suite load it once."""
  key = (str(path.resolve()), tuple(sorted(execution.items())))
  if key not in _PRETRAINED:
    _PRETRAINED.clear()
    cfg, base = checkpoint_lib.load_pretrained(path, **execution)
    try:
      tokenizer = load_tokenizer(str(path))
    except (OSError, ValueError, TypeError) as e:
      if isinstance(e, UserError):
        raise
      raise DataError(f'{path}: no usable tokenizer files '
                      f'({str(e).splitlines()[0] if str(e) else type(e)})'
                      ) from e
    if len(tokenizer) > cfg.vocab_size:
      raise ConfigError(f'{path}: tokenizer has {len(tokenizer)} tokens but '
                        f'config.json vocab_size is {cfg.vocab_size}')
    _PRETRAINED[key] = (cfg, base, tokenizer)
  return _PRETRAINED[key]
