"""Federated algorithms: client update, server update, FDLoRA rounds."""

from fdlora_jax.fl.client import (make_client_update, make_clients_update,
                                  init_opt_states, token_nll)
from fdlora_jax.fl.fdlora import FDLoRA, inner_optimizer, NEVER
from fdlora_jax.fl.server import (make_server_update, outer_optimizer,
                                  pseudo_gradient)
