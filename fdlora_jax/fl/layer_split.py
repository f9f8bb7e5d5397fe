"""An adapter split along its layer axis: the LoRA of the lower layers is a
shared *body*, the LoRA of the top ``head_layers`` layers a *head* (FedRep,
FedRoD). The split itself is :func:`fdlora_jax.lora.split_layers` /
:func:`~fdlora_jax.lora.join_layers`; here are the config rules of
``config.<method>.head_layers``."""

from __future__ import annotations

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import need


def validate_head_layers(c, name: str) -> None:
  """``config.<name>.head_layers`` must be >= 0 (0: the top quarter)."""
  value = c[name].head_layers
  need(value >= 0, f'{name}.head_layers', value,
       'must be >= 0 (0: the top quarter of the layers)')


def body_layers(s, name: str) -> int:
  """The number of body layers for the :class:`~fdlora_jax.fl.engine.Setup`
  ``s``: every layer below the ``head_layers`` top ones
  (:func:`fdlora_jax.lora.head_start`); at least one must be left."""
  value = s.config[name].head_layers
  num_layers = s.model.cfg.num_hidden_layers
  nb = lora_lib.head_start(value, num_layers)
  need(nb >= 1, f'{name}.head_layers', value,
       f'the model has {num_layers} layers and the body needs at least one')
  return nb
