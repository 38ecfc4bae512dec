"""One entry point for every strategy: `make_plan` returns the plan JSON object (docs/DESIGN.md section 3) as a dict."""

import math

from exo.base.errors import BadInput
from exo.base.model_spec import ModelSpec
from exo.base.models import model_spec
from exo.base.topology import Topology
from exo.topology.cost_model import PlannerParams, Prediction, cost_model
from exo.topology.flops_latency_partitioning_strategy import (
  DEFAULT_PROMPT_TOKENS,
  FlopsLatencyPartitioningStrategy,
  check_fits,
  check_max_context,
  check_params,
  context_cap,
)
from exo.topology.plan import Plan
from exo.topology.ring_memory_weighted_partitioning_strategy import RingMemoryWeightedPartitioningStrategy

__all__ = ["STRATEGIES", "as_model", "as_topology", "make_plan", "memory_weighted_plan", "plan_for", "predict_ring"]

STRATEGIES = ("flops-latency", "ring-memory-weighted")


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
  plan = Plan("ring-memory-weighted", objective, params, model, partitions, None, context_tokens=context)
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
  params: PlannerParams,
  ring: list[tuple[str, int]],
  objective: str = "latency",
  prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
  context_tokens: int | None = None,
) -> Prediction | None:
  """The cost model's prediction for an existing ring [(node id, layers)] on `topology`, with KV for `context_tokens` (default:
  the model's default context); None if a ring node has left it."""
  if any(node_id not in topology.nodes for node_id, _ in ring):
    return None
  costs = cost_model(topology, model, params, objective, prompt_tokens, context_tokens)
  return costs.evaluate([costs.index(node_id) for node_id, _ in ring], [n for _, n in ring])


def plan_for(
  topology: Topology | dict,
  model: ModelSpec | dict | str,
  strategy: str = "flops-latency",
  objective: str = "latency",
  prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
  max_context: int | None = None,
  **params,
) -> Plan:
  """The plan of `strategy`; `max_context` caps the context whose KV each request reserves (docs/DESIGN.md v2.1)."""
  unknown = sorted(set(params) - {"memory_headroom", "default_rtt_ms", "batch"})
  if unknown:
    raise BadInput(f"unknown planner parameter {unknown[0]!r}; expected memory_headroom, default_rtt_ms or batch")
  topology, model, planner_params = as_topology(topology), as_model(model), PlannerParams(**params)
  check_params(objective, planner_params)
  check_max_context(max_context)
  if strategy == "flops-latency":
    return FlopsLatencyPartitioningStrategy(model, objective, prompt_tokens=prompt_tokens, max_context=max_context, **params).plan(topology)
  if strategy == "ring-memory-weighted":
    return memory_weighted_plan(topology, model, objective, planner_params, prompt_tokens, context_cap(model, max_context))
  raise BadInput(f"unknown partitioning strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")


def make_plan(
  topology: Topology | dict, model: ModelSpec | dict | str, strategy: str = "flops-latency", objective: str = "latency", **params
) -> dict:
  """The plan JSON object for `model` on `topology`; raises BadInput (one sentence) when the request is impossible or malformed."""
  return plan_for(topology, model, strategy, objective, **params).to_dict()
