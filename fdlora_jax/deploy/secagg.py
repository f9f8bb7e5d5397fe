"""Secure aggregation of the uploads with Flower's SecAgg+.

With ``secagg=true`` in the run config, a client keeps its upload after a
repeat and replies only its metrics; the server then runs Flower's
``SecAggPlusWorkflow`` and each client's default ``train`` handler (wrapped
in ``secaggplus_mod``) hands the protocol its upload times the weight
``p_i = w_i / sum_j w_j`` the server sent it. The clients mask their
quantised vectors with pairwise and private masks; the server unmasks only
the sum, so it learns ``sum_i p_i u_i`` (the weighted mean the methods'
server functions take) and never an individual upload.

SecAggPlusWorkflow runs inside Flower's legacy strategy context: here a
strategy that hands out one ``FitIns`` per node (its weight) and keeps the
one aggregated vector the workflow passes to ``aggregate_fit``. Every
client reports ``num_examples=1`` with ``max_weight=1``, so the workflow's
own weighting is the plain mean over the k clients that survived; the
weighted sum is that mean times k, renormalised by the weights of the
survivors.

Precision: each value ``p_i u_i`` is clipped to ``[-clipping_range,
clipping_range]`` (a client whose weighted upload exceeds it stops with an
error naming ``secagg-clipping-range``) and quantised to
``quantization_range`` levels: a quantum of ``2 clipping_range /
quantization_range``. Flower rounds each value stochastically (under a
quantum) and adds no error after that, so the weighted sum is within k
quanta of the plain one, k clients (docs/deploy.md: what a server's
AdamW-trained next round can make of it).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
from flwr.app import (ArrayRecord, ConfigRecord, Context, Message,
                      MetricRecord, RecordDict)
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow


@dataclasses.dataclass(frozen=True)
class Settings:
  """The run config's ``secagg-*`` fields."""
  clipping_range: float = 8.0
  quantization_range: int = 2 ** 22
  threshold: int = 2               # shares needed to unmask a dropped client
  timeout: float = 600.0           # per stage (the protocol has four)

  @classmethod
  def from_run_config(cls, rc) -> 'Settings':
    return cls(clipping_range=float(rc.get('secagg-clipping-range', 8.0)),
               quantization_range=int(rc.get('secagg-quantization-range',
                                             2 ** 22)),
               threshold=int(rc.get('secagg-threshold', 2)),
               timeout=float(rc.get('round-timeout', 600)))


class _OneAggregate(Strategy):
  """configure_fit: one FitIns (the node's weight) per node; aggregate_fit:
  keeps the aggregated vector and which nodes are inside it."""

  def __init__(self, grid, weights: dict[int, float]):
    self.grid, self.weights = grid, weights
    self.result: Optional[list[np.ndarray]] = None
    self.nodes: list[int] = []
    self.num_examples: list[int] = []

  def initialize_parameters(self, client_manager):
    return None

  def configure_fit(self, server_round, parameters, client_manager):
    run_id = self.grid.run.run_id
    empty = Parameters(tensors=[], tensor_type='numpy.ndarray')
    return [(GridClientProxy(node, self.grid, run_id),
             FitIns(empty, {'weight': float(w)}))
            for node, w in self.weights.items()]

  def aggregate_fit(self, server_round, results, failures):
    # Every FitRes carries the same unmasked aggregate; num_examples are the
    # clients' plaintext (here always 1).
    self.nodes = [int(proxy.node_id) for proxy, _ in results]
    self.num_examples = [int(r.num_examples) for _, r in results]
    if results:
      self.result = parameters_to_ndarrays(results[0][1].parameters)
    return None, {}

  def configure_evaluate(self, server_round, parameters, client_manager):
    return []

  def aggregate_evaluate(self, server_round, results, failures):
    return None, {}

  def evaluate(self, server_round, parameters):
    return None


class RecordingGrid:
  """A Grid that counts the arrays in every reply the server gets (a plain
  upload is one packed array): with secure aggregation none should arrive,
  since the masked vectors are integer byte strings in a ConfigRecord and
  ``secaggplus_mod`` empties the reply's arrays."""

  def __init__(self, grid):
    self._grid = grid
    self.replies = 0
    self.arrays = 0

  def __getattr__(self, name):
    return getattr(self._grid, name)

  def send_and_receive(self, messages, *, timeout=None):
    replies = list(self._grid.send_and_receive(messages, timeout=timeout))
    for reply in replies:
      self.replies += 1
      if reply.has_error():
        continue
      self.arrays += sum(len(r) for r in
                         reply.content.array_records.values())
    return replies


def weighted_mean(grid, context: Context, weights: dict[int, float],
                  settings: Settings, round_id: int
                  ) -> tuple[Optional[list[np.ndarray]], list[int]]:
  """``sum_i p_i u_i / sum_{i in S} p_i`` over the nodes ``S`` that stayed
  to the end of the protocol (``weights``: node id -> ``p_i``, summing to
  one); returns ``(leaves, S)``, or ``(None, [])`` when too few clients
  stayed for the protocol to finish."""
  strategy = _OneAggregate(grid, weights)
  legacy = LegacyContext(context, strategy=strategy)
  # The workflow's own bookkeeping, away from the run's state.
  legacy.state = RecordDict({
      'config': ConfigRecord({'current_round': round_id}),
      'parameters': ArrayRecord()})
  SecAggPlusWorkflow(
      num_shares=1.0,                      # every client holds shares
      reconstruction_threshold=settings.threshold,
      max_weight=1.0,
      clipping_range=settings.clipping_range,
      quantization_range=settings.quantization_range,
      timeout=settings.timeout)(grid, legacy)
  if strategy.result is None:
    return None, []
  q = settings.quantization_range
  count = sum(round(n * q) for n in strategy.num_examples) / q   # = k
  mass = sum(weights[n] for n in strategy.nodes)
  scale = count / mass if mass > 0 else 0.0
  return ([np.asarray(a, np.float64) * scale for a in strategy.result],
          strategy.nodes)


def weighted(leaves: list[np.ndarray], weight: float,
             clipping_range: float) -> list[np.ndarray]:
  """A client's upload leaves times its weight, in float64 (quantising in
  float32 would lose levels); refuses values the protocol would clip."""
  scaled = [np.asarray(x, np.float64) * weight for x in leaves]
  peak = max((float(np.max(np.abs(x))) for x in scaled if x.size),
             default=0.0)
  if peak > clipping_range:
    raise ValueError(
        f'a weighted upload value {peak:.4g} exceeds secagg-clipping-range='
        f'{clipping_range:g}: raise it (each unit of range costs precision)')
  return scaled


def client_reply(msg: Message, leaves: list[np.ndarray],
                 clipping_range: float) -> Message:
  """A client's answer to the protocol's masked-vector stage (what
  ``secaggplus_mod`` masks): its upload leaves times its weight, in the
  legacy FitRes layout the workflow reads."""
  scaled = weighted(leaves, float(msg.content['fitins.config']['weight']),
                    clipping_range)
  return Message(content=RecordDict({
      'fitres.parameters': ArrayRecord(scaled),
      'fitres.num_examples': MetricRecord({'num_examples': 1}),
      'fitres.metrics': ConfigRecord({}),
      'fitres.status': ConfigRecord({'code': 0, 'message': 'ok'}),
  }), reply_to=msg)
