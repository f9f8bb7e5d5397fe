"""Shared fixtures: the tiny model, a tiny tokenizer of the log task, and
tiny random Hugging Face LLaMA checkpoints made on the fly. Plain helpers
(constants, batch makers, runners) are in tests/helpers.py."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache for the session, as main.py keeps one per
# user: the many tiny runs compile the same programs (in this process and in
# the main.py subprocesses, which inherit it). Fresh each session, so a test
# never meets a program compiled by older code.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(
      prefix='fdlora_jax_test_cache_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'],
                  ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

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
