"""The fork's strategy: which nodes take part, in what ring order, with how many layers, optimal under cost model v2."""

import math
from dataclasses import replace

import numpy as np

from exo.base.errors import ClusterCannotServe
from exo.base.model_spec import ModelSpec
from exo.base.models import DEFAULT_MODEL, model_spec
from exo.base.topology import Topology
from exo.topology.cannot_serve import MIN_CONTEXT, cannot_serve
from exo.topology.cost_model import CostModel, PlannerParams, Prediction, cost_model
from exo.topology.feasibility import feasibility
from exo.topology.heuristic import ring_through
from exo.topology.holdings import prefer_holders
from exo.topology.layer_split import bottleneck_split
from exo.topology.partitioning_strategy import Partition, PartitioningStrategy
from exo.topology.plan import Plan
from exo.topology.plan_request import PlanRequest
from exo.topology.search import search
from exo.topology.search_problem import SearchProblem

__all__ = [
  "CONTEXT_STEP",
  "DEFAULT_PROMPT_TOKENS",
  "PROVEN_TOL",
  "FlopsLatencyPartitioningStrategy",
  "check_fits",
  "context_cap",
  "usable_nodes",
]

DEFAULT_PROMPT_TOKENS = 128  # prompt length behind the reported TTFT
PROVEN_TOL = 1e-9  # a plan within this (relative) of the bound on its objective is proven optimal
CONTEXT_STEP = 256  # a context planned below the cap is a multiple of this many tokens (docs/DESIGN.md v2.1)


def context_cap(model: ModelSpec, max_context: int | None) -> int:
  """The context a plan reserves KV for when the cluster can hold it: the model's default, capped by the user's --max-context."""
  return model.default_context() if max_context is None else min(model.default_context(), max_context)


def usable_nodes(costs: CostModel) -> list[int]:
  """Nodes that can hold at least one layer in the middle of a ring, and either are linked to another such node or hold the
  whole model alone (a node with no link can only be a ring of its own). O(n^2)."""
  holds = [i for i in range(costs.size) if costs.capacity(i) >= 1]
  linked = {i for i in holds for j in holds if i != j and not math.isnan(float(costs.rtt_s[i, j]))}
  alone = {i for i in holds if costs.capacity(i, first=True, last=True, ring_size=1) >= costs.model.n_layers}
  return [i for i in holds if i in linked or i in alone] or holds  # none: no plan exists, and the search says why


def check_fits(costs: CostModel) -> None:
  """Refuse a model that exceeds the cluster's usable memory, naming both sizes."""
  model, usable = costs.model, sum(max(0, costs.capacity(i)) for i in range(costs.size))
  if usable < model.n_layers:
    per_layer_mb = (model.layer_bytes + costs.resident_requests(1) * costs.kv_per_layer) / 2**20
    raise ClusterCannotServe(
      f"model {model.id!r} does not fit: it needs {model.n_layers} layers of {per_layer_mb:.1f} MB "
      f"({model.n_layers * per_layer_mb / 1024:.1f} GB, with KV for a context of {costs.context_tokens} tokens) but the cluster's "
      f"usable memory holds only {usable} layers (memory headroom {costs.params.memory_headroom:g})"
    )


def _equal(a: float, b: float) -> bool:
  return a == b or (math.isnan(a) and math.isnan(b))


class FlopsLatencyPartitioningStrategy(PartitioningStrategy):
  """Minimise time per output token (`latency`) or maximise pipelined tokens/s at a batch (`throughput`) using each node's
  measured layer times (or TFLOPS and memory bandwidth), memory, and measured link RTT and bandwidth. `method` picks the search
  (exo/topology/search.py): "auto" is exact up to EXACT_LIMIT usable nodes (16 for latency, 10 for throughput), "exact" and
  "heuristic" force one; a plan not proven optimal carries in its prediction a bound on what any plan can reach, and a warning
  when it falls short of it. Complete: whenever a feasible plan exists (decided exactly up to 16 usable nodes), a plan is
  returned. The context whose KV a plan reserves is the model's (at most 8,192 tokens, or `max_context`); when no plan holds
  that, the largest multiple of 256 tokens, at least 512, at which one exists (docs/DESIGN.md v2.1)."""

  name = "flops-latency"

  def __init__(
    self,
    model: ModelSpec | None = None,
    objective: str = "latency",
    memory_headroom: float = PlannerParams.memory_headroom,
    default_rtt_ms: float = PlannerParams.default_rtt_ms,
    batch: int = 1,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    method: str = "auto",
    max_context: int | None = None,
  ):
    self.model = model if model is not None else model_spec(DEFAULT_MODEL)  # upstream's partition(topology) names no model
    self.model_given = model is not None
    self.request = PlanRequest(self.name, objective, PlannerParams(memory_headroom, default_rtt_ms, batch), max_context, method)
    self.objective, self.params, self.method = objective, self.request.params, method
    self.prompt_tokens = prompt_tokens
    self.context = context_cap(self.model, max_context)

  @classmethod
  def for_request(cls, model: ModelSpec, request: PlanRequest, prompt_tokens: int = DEFAULT_PROMPT_TOKENS) -> "FlopsLatencyPartitioningStrategy":
    params = request.params
    return cls(
      model, request.objective, params.memory_headroom, params.default_rtt_ms, params.batch, prompt_tokens, request.method, request.max_context
    )

  def partition(self, topology: Topology) -> list[Partition]:
    return self.plan(topology).partitions

  def plan(self, topology: Topology) -> Plan:
    try:
      return self._plan_at(topology, self.context)
    except ClusterCannotServe:
      if self.model.kv_bytes_per_layer <= 0 or self.context <= MIN_CONTEXT:
        raise
    lo, hi = MIN_CONTEXT // CONTEXT_STEP, (self.context - 1) // CONTEXT_STEP  # the answer is a multiple of CONTEXT_STEP in [lo, hi]
    if not self._feasible_at(topology, lo * CONTEXT_STEP):
      return self._plan_at(topology, MIN_CONTEXT, smallest=True)  # raises: why even the least context cannot be served
    while lo < hi:
      mid = (lo + hi + 1) // 2
      lo, hi = (mid, hi) if self._feasible_at(topology, mid * CONTEXT_STEP) else (lo, mid - 1)
    context = lo * CONTEXT_STEP
    warning = (
      f"the cluster cannot hold model {self.model.id!r} with a context of {self.context} tokens: planned for {context} tokens, the most it holds"
    )
    return self._plan_at(topology, context, warning=warning)

  def _costs(self, topology: Topology, context: int) -> CostModel:
    return cost_model(topology, self.model, self.params, self.objective, self.prompt_tokens, context)

  def _feasible_at(self, topology: Topology, context: int) -> bool:
    costs = self._costs(topology, context)
    try:
      check_fits(costs)
    except ClusterCannotServe:
      return False
    return feasibility(costs.restrict(usable_nodes(costs))).ring is not None

  def _plan_at(self, topology: Topology, context: int, warning: str | None = None, smallest: bool = False) -> Plan:
    costs = self._costs(topology, context)
    check_fits(costs)
    usable = usable_nodes(costs)
    warnings = costs.warnings() + ([] if self.model_given else [f"no model was given: planned for {DEFAULT_MODEL}, upstream's default model"])
    warnings += [warning] if warning else []
    if costs.speed_known():
      problem = SearchProblem(costs.restrict(usable))
      found, bound = search(problem, self.method)
      if found is None:
        raise self._no_plan(problem.costs, context, smallest)
      ring, layers = [usable[i] for i in found.ring], list(found.layers)
      ring = self._prefer_holders(costs, topology, ring, layers)
      prediction = self._with_bound(costs.evaluate(ring, layers), bound, warnings)
    else:
      ring, layers = self._memory_weighted(costs.restrict(usable), context, smallest)
      ring = [usable[i] for i in ring]
      prediction = costs.evaluate(ring, layers)
    named = [(costs.node_ids[i], n) for i, n in zip(ring, layers)]
    return Plan(self.name, self.objective, self.params, self.model, named, prediction, warnings, context, costs)

  def _prefer_holders(self, costs: CostModel, topology: Topology, ring: list[int], layers: list[int]) -> list[int]:
    """Among rings as fast as `ring` by permuting interchangeable nodes, one whose nodes hold more of their layers."""
    held = [topology.nodes[node_id].held_layers(self.model.id) for node_id in costs.node_ids]
    if not any(held):
      return ring
    others = [[k for k in range(costs.size) if k not in (i, j)] for i in range(costs.size) for j in range(costs.size)]

    def same(i: int, j: int) -> bool:
      rest = others[i * costs.size + j]
      figures = costs.speed[i] == costs.speed[j] and costs.usable_bytes[i] == costs.usable_bytes[j]
      links = all(
        np.array_equal(m[i, rest], m[j, rest], equal_nan=True) and np.array_equal(m[rest, i], m[rest, j], equal_nan=True) and _equal(m[i, j], m[j, i])
        for m in (costs.rtt_s, costs.transfer, costs.hop)
      )
      return figures and links

    return prefer_holders(held, ring, layers, same)

  def _no_plan(self, costs: CostModel, context: int, smallest: bool) -> ClusterCannotServe:
    return cannot_serve(costs, feasibility(costs), context, smallest or context <= MIN_CONTEXT)

  def _with_bound(self, prediction: Prediction, bound: float | None, warnings: list[str]) -> Prediction:
    """The prediction with the objective's bound: the plan's own value when proven optimal, else the bound, with a warning."""
    if self.objective == "latency":
      value = prediction.tpot_s
      proven = bound is None or bound >= value * (1 - PROVEN_TOL)
      if not proven:
        warnings.append(f"plan not proven optimal: TPOT {value * 1000:.3f} ms, and no plan can be faster than {bound * 1000:.3f} ms")
      return replace(prediction, bound_tpot_s=value if proven else bound)
    value = prediction.throughput_tps
    most = value if bound is None else self.params.batch / bound if bound > 0 else math.inf
    proven = most <= value * (1 + PROVEN_TOL)
    if not proven:
      warnings.append(f"plan not proven optimal: {value:.3f} tokens/s, and no plan can exceed {most:.3f} tokens/s ({most / value - 1:.1%} more)")
    return replace(prediction, bound_throughput_tps=value if proven else most)

  def _memory_weighted(self, costs: CostModel, context: int, smallest: bool) -> tuple[list[int], list[int]]:
    """With no speed known anywhere: shares proportional to memory (capped), on the cheapest ring of the largest nodes, or on
    any feasible ring when those have none. Indices of `costs`, the usable nodes."""
    by_memory = sorted(range(costs.size), key=lambda i: (-costs.capacity(i), i))[: self.model.n_layers]
    found = ring_through(costs.hop[[[i] for i in by_memory], by_memory], list(range(len(by_memory))))
    rings = [] if found is None else [[by_memory[i] for i in found]]
    feasible = feasibility(costs).ring
    rings += [] if feasible is None else [feasible]
    for ring in rings:
      split = bottleneck_split([1.0 / costs.capacity(i) for i in ring], costs.ring_capacities(ring), [0.0] * len(ring), self.model.n_layers)
      if split is not None:
        return ring, split[1]
    raise self._no_plan(costs, context, smallest)
