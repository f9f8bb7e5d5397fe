"""Federated learning: one engine (:mod:`.engine`), one module per method
(:mod:`.methods`), shared server rules (:mod:`.server`) and losses
(:mod:`.losses`)."""

from fdlora_jax.fl.engine import (Engine, Forward, Method, Phase, Setup,
                                  StepMetrics, client_steps, init_opt_states,
                                  inner_optimizer, make_client_update,
                                  make_clients_update, sft_client_update,
                                  sft_clients_update)
from fdlora_jax.fl.server import (outer_optimizer, outer_step, pseudo_gradient,
                                  weighted_mean)
