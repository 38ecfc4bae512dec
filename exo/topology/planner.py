"""One entry point for every strategy: `make_plan` returns the plan JSON object (docs/DESIGN.md section 3) as a dict."""

import math

from exo.base.model_spec import ModelSpec
from exo.base.models import model_spec
from exo.base.topology import Topology
from exo.topology.cost_model import PlannerParams, Prediction, cost_model
from exo.topology.flops_latency_partitioning_strategy import DEFAULT_PROMPT_TOKENS, FlopsLatencyPartitioningStrategy, check_fits, context_cap
from exo.topology.partitioning_strategy import map_partitions_to_node_shards
from exo.topology.plan import Plan
from exo.topology.plan_request import STRATEGIES, PlanRequest
from exo.topology.ring_memory_weighted_partitioning_strategy import RingMemoryWeightedPartitioningStrategy

__all__ = ["STRATEGIES", "as_model", "as_topology", "make_plan", "memory_weighted_plan", "plan_for", "predict_ring"]


def as_topology(topology: Topology | dict) -> Topology:
  return topology if isinstance(topology, Topology) else Topology.from_dict(topology)


def as_model(model: ModelSpec | dict | str) -> ModelSpec:
  if isinstance(model, ModelSpec):
    return model
  if isinstance(model, str):
    return model_spec(model)
  return ModelSpec.from_dict(model)


def memory_weighted_plan(topology: Topology, model: ModelSpec, objective: str, params: PlannerParams, prompt_tokens: int, context: int) -> Plan:
  """Upstream's strategy, evaluated under the same cost model at the context cap; its plan may overfill a node, which is
  reported, not hidden."""
  costs = cost_model(topology, model, params, objective, prompt_tokens, context)
  check_fits(costs)
  partitions = RingMemoryWeightedPartitioningStrategy().partition(topology)
  stages = [(node_id, shard.get_layer_count()) for node_id, shard in map_partitions_to_node_shards(partitions, model.n_layers, model.id)]
  plan = Plan("ring-memory-weighted", objective, params, model, stages, None, context_tokens=context, costs=costs, given_partitions=partitions)
  ring = plan.ring()
  idx, layers = [costs.index(node_id) for node_id, _ in ring], [n for _, n in ring]
  plan.prediction = costs.evaluate(idx, layers)
  plan.warnings = costs.warnings()
  for i, n, cap in zip(idx, layers, costs.ring_capacities(idx)):
    if n > cap:
      plan.warnings.append(f"node {costs.node_ids[i]!r} is given {n} layers but its memory holds only {cap}")
  for k, i in enumerate(idx if len(idx) > 1 else []):
    j = idx[(k + 1) % len(idx)]
    if not math.isfinite(costs.hop[i, j]):
      plan.warnings.append(f"ring neighbours {costs.node_ids[i]!r} and {costs.node_ids[j]!r} share no edge (hop charged the default RTT)")
  return plan


def predict_ring(
  topology: Topology,
  model: ModelSpec,
  request: PlanRequest,
  ring: list[tuple[str, int]],
  prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
  context_tokens: int | None = None,
) -> Prediction | None:
  """The cost model's prediction for an existing ring [(node id, layers)] on `topology`, under `request`'s objective and
  parameters, with KV for `context_tokens` (default: the model's default context); None if a ring node has left it."""
  if any(node_id not in topology.nodes for node_id, _ in ring):
    return None
  costs = cost_model(topology, model, request.params, request.objective, prompt_tokens, context_tokens)
  return costs.evaluate([costs.index(node_id) for node_id, _ in ring], [n for _, n in ring])


def plan_for(
  topology: Topology | dict, model: ModelSpec | dict | str, request: PlanRequest | None = None, prompt_tokens: int = DEFAULT_PROMPT_TOKENS
) -> Plan:
  """The plan `request` asks for (default: PlanRequest()'s); its max_context caps the context whose KV each request reserves (docs/DESIGN.md v2.1)."""
  topology, model, request = as_topology(topology), as_model(model), request or PlanRequest()
  if request.strategy == "ring-memory-weighted":
    return memory_weighted_plan(topology, model, request.objective, request.params, prompt_tokens, context_cap(model, request.max_context))
  return FlopsLatencyPartitioningStrategy.for_request(model, request, prompt_tokens).plan(topology)


def make_plan(
  topology: Topology | dict, model: ModelSpec | dict | str, strategy: str = "flops-latency", objective: str = "latency", **params
) -> dict:
  """The plan JSON object for `model` on `topology`; raises BadInput (one sentence) when the request is impossible or malformed."""
  return plan_for(topology, model, PlanRequest.of(strategy, objective, **params)).to_dict()
