"""Checkpoint I/O, one module per format; nothing is downloaded.

- ``hf``: Hugging Face safetensors in and out, a LLaMA's ``config.json`` and
  ``params``, and ``CheckpointError``;
- ``peft``: LoRA adapters to and from PEFT's format;
- ``gguf``: a llama.cpp GGUF file converted once into a cached Hugging Face
  directory (``gguf_to_hf``), which is then loaded like any other;
- ``pretrained``: models found by name or path, and ``load_pretrained``.

Each format's module names its tensors' mapping. The names below are this
package's interface: ``from fdlora_jax import checkpoint; checkpoint.X``.
"""

from fdlora_jax.checkpoint.gguf import (GGUF_CACHE_DIR, GGUF_FORMAT_VERSION,
                                        gguf_to_hf)
from fdlora_jax.checkpoint.hf import (CheckpointError, load_hf_config,
                                      load_hf_params, read_safetensors,
                                      write_safetensors)
from fdlora_jax.checkpoint.peft import (ADAPTER_CONFIG, ADAPTER_WEIGHTS,
                                        load_peft_adapter, save_peft_adapter)
from fdlora_jax.checkpoint.pretrained import (NAMED_MODELS, ModelNotInstalled,
                                              NamedModel, load_pretrained,
                                              resolve_checkpoint,
                                              resolve_model_name)
