"""One module per federated method; ``config.method`` picks one by name.

Each module has ``NAME``, ``config()`` (its block, ``config.<name>``),
``validate(config)`` (raises naming the field) and ``build(setup) -> Method``
(:class:`fdlora_jax.fl.api.Method`). To add a method, write such a module
and add it to ``METHODS``. :func:`method_module` is the one place that reads
``config.method``.
"""

from types import ModuleType

from fdlora_jax.errors import need

from fdlora_jax.fl.methods import (fdlora, fedamp, fedavg, feddpa,
                                   fedex_lora, fedkd, fedlora_opt, fedrep,
                                   fedrod, fedsa_lora, ffa_lora, flexlora,
                                   flora, k_shot, local, pfedlora, rolora,
                                   zero_shot)

METHODS = {
    'fdlora': fdlora,
    'fedavg': fedavg,
    'local': local,
    'fedamp': fedamp,
    'fedkd': fedkd,
    'zero_shot': zero_shot,
    'k_shot': k_shot,
    'fedrep': fedrep,
    'fedrod': fedrod,
    'pfedlora': pfedlora,
    'fedlora_opt': fedlora_opt,
    'ffa_lora': ffa_lora,
    'fedsa_lora': fedsa_lora,
    'rolora': rolora,
    'fedex_lora': fedex_lora,
    'flora': flora,
    'flexlora': flexlora,
    'feddpa': feddpa,
}


def method_module(c) -> ModuleType:
  """The module of ``c.method``; a ConfigError naming the field if none."""
  need(c.method in METHODS, 'method', c.method,
       f'unknown method; choose from {sorted(METHODS)}')
  return METHODS[c.method]


def other_blocks(c) -> tuple[str, ...]:
  """The config blocks of every method but ``c.method`` (``'fedkd.'``, ...):
  no method reads another's block, so they never change what a run did."""
  return tuple(f'{name}.' for name in METHODS if name != c.method)
