"""Federated learning: what a method declares (:mod:`.api`), the compiled
client step (:mod:`.step`), the engine that runs them (:mod:`.engine`), one
module per method (:mod:`.methods`), shared server rules (:mod:`.server`)
and losses (:mod:`.losses`)."""

from fdlora_jax.fl.api import (EvalContext, Keys, Method, Phase, Setup,
                               client_steps)
from fdlora_jax.fl.engine import Engine
from fdlora_jax.fl.server import (outer_optimizer, outer_step, pseudo_gradient,
                                  weighted_mean)
from fdlora_jax.fl.step import (Forward, StepMetrics, init_opt_states,
                                inner_optimizer, make_client_update,
                                make_clients_update, sft_client_update,
                                sft_clients_update)
