"""One module per federated method; ``config.method`` picks one by name.

Each module has ``NAME``, ``config()`` (its block, ``config.<name>``),
``validate(config)`` (raises naming the field) and ``build(setup) -> Method``
(:class:`fdlora_jax.fl.engine.Method`). To add a method, write such a module
and add it to ``METHODS``.
"""

from fdlora_jax.fl.methods import (fdlora, fedamp, fedavg, fedkd, fedlora_opt,
                                   fedrep, fedrod, k_shot, local, pfedlora,
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
}
