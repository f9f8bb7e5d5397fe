"""Shared fixtures: tiny random Hugging Face LLaMA checkpoints made on the fly."""

import os
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'


def noisy(lora, seed, std=0.2):
  """``lora`` with every leaf (``b`` too) replaced by N(0, std^2) noise, so
  the adapter changes the model's output."""
  import jax
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  return jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape) * std,
                      lora)


def make_hf_llama(directory, *, tie=False, rope=None, seed=0, **overrides):
  """Saves a random ``transformers.LlamaForCausalLM`` (GQA, untied, rope theta
  50000 by default) to ``directory`` and returns the PyTorch model."""
  import torch
  import transformers
  torch.manual_seed(seed)
  kw = dict(vocab_size=96, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-6, max_position_embeddings=128,
            tie_word_embeddings=tie,
            rope_parameters=rope or {'rope_type': 'default',
                                     'rope_theta': 50000.0})
  kw.update(overrides)
  config = transformers.LlamaConfig(**kw)
  model = transformers.LlamaForCausalLM(config).eval()
  # Norm weights start at 1: randomise them so a wrong mapping shows up.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.uniform_(0.5, 1.5)
  model.save_pretrained(directory)
  return model


@pytest.fixture(scope='module')
def hf_llama(tmp_path_factory):
  directory = tmp_path_factory.mktemp('hf_llama')
  return directory, make_hf_llama(directory)
