"""One entry point for every strategy: `make_plan` returns the plan JSON object (docs/DESIGN.md section 3) as a dict."""

import math

from exo.errors import BadInput
from exo.topology.cost_model import PlannerParams, Prediction, cost_model
from exo.topology.flops_latency_partitioning_strategy import DEFAULT_PROMPT_TOKENS, FlopsLatencyPartitioningStrategy, check_fits, check_params
from exo.topology.model_spec import ModelSpec
from exo.topology.models import model_spec
from exo.topology.plan import Plan
from exo.topology.ring_memory_weighted_partitioning_strategy import RingMemoryWeightedPartitioningStrategy
from exo.topology.topology import Topology

STRATEGIES = ("flops-latency", "ring-memory-weighted")


def as_topology(topology: Topology | dict) -> Topology:
  return topology if isinstance(topology, Topology) else Topology.from_dict(topology)


def as_model(model: ModelSpec | dict | str) -> ModelSpec:
  if isinstance(model, ModelSpec):
    return model
  if isinstance(model, str):
    return model_spec(model)
  return ModelSpec.from_dict(model)


def memory_weighted_plan(topology: Topology, model: ModelSpec, objective: str, params: PlannerParams, prompt_tokens: int) -> Plan:
  """Upstream's strategy, evaluated under the same cost model; its plan may overfill a node, which is reported, not hidden."""
  costs = cost_model(topology, model, params, objective, prompt_tokens)
  check_fits(costs)
  plan = Plan("ring-memory-weighted", objective, params, model, RingMemoryWeightedPartitioningStrategy().partition(topology), None)
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
) -> Prediction | None:
  """The cost model's prediction for an existing ring [(node id, layers)] on `topology`; None if a ring node has left it."""
  if any(node_id not in topology.nodes for node_id, _ in ring):
    return None
  costs = cost_model(topology, model, params, objective, prompt_tokens)
  return costs.evaluate([costs.index(node_id) for node_id, _ in ring], [n for _, n in ring])


def plan_for(
  topology: Topology | dict,
  model: ModelSpec | dict | str,
  strategy: str = "flops-latency",
  objective: str = "latency",
  prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
  **params,
) -> Plan:
  unknown = sorted(set(params) - {"memory_headroom", "default_rtt_ms", "batch"})
  if unknown:
    raise BadInput(f"unknown planner parameter {unknown[0]!r}; expected memory_headroom, default_rtt_ms or batch")
  topology, model, planner_params = as_topology(topology), as_model(model), PlannerParams(**params)
  check_params(objective, planner_params)
  if strategy == "flops-latency":
    return FlopsLatencyPartitioningStrategy(model, objective, prompt_tokens=prompt_tokens, **params).plan(topology)
  if strategy == "ring-memory-weighted":
    return memory_weighted_plan(topology, model, objective, planner_params, prompt_tokens)
  raise BadInput(f"unknown partitioning strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")


def make_plan(
  topology: Topology | dict, model: ModelSpec | dict | str, strategy: str = "flops-latency", objective: str = "latency", **params
) -> dict:
  """The plan JSON object for `model` on `topology`; raises BadInput (one sentence) when the request is impossible or malformed."""
  return plan_for(topology, model, strategy, objective, **params).to_dict()
