"""Shared fixtures: the tiny model, a tiny tokenizer of the log task, and
tiny random Hugging Face LLaMA checkpoints made on the fly. Plain helpers
(constants, batch makers, runners) are in tests/helpers.py."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest

# helpers.py asserts too: let pytest explain its failures as in test files.
pytest.register_assert_rewrite('tests.helpers')

from tests.helpers import CFG, LCFG, logs_cfg, make_hf_llama  # noqa: E402


@pytest.fixture(scope='module')
def hf_llama(tmp_path_factory):
  directory = tmp_path_factory.mktemp('hf_llama')
  return directory, make_hf_llama(directory)


@pytest.fixture(scope='module')
def tiny():
  """The tiny LLaMA with helpers.LCFG's LoRA, and its random base weights."""
  import jax
  from fdlora_jax.model import Llama, init_params
  model = Llama(CFG, LCFG)
  base = init_params(CFG, jax.random.key(0))
  return model, base


@pytest.fixture(scope='session')
def tok(tmp_path_factory):
  """A small tokenizer trained on the synthetic log task's texts."""
  from fdlora_jax import data
  from fdlora_jax import tokenizer as tokenizer_lib
  task = data.load_task(logs_cfg(), seed=0)
  texts = data.tokenizer_texts(task, logs_cfg())
  return tokenizer_lib.embedded_tokenizer(
      texts, 512, str(tmp_path_factory.mktemp('tok')))
