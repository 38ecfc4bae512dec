"""The fork's strategy: which nodes take part, in what ring order, with how many layers, optimal under cost model v2."""

import math

from exo.errors import BadInput, ClusterCannotServe
from exo.topology.cost_model import OBJECTIVES, CostModel, PlannerParams, cost_model
from exo.topology.exact_search import exact_search
from exo.topology.heuristic_search import heuristic_search, ring_through
from exo.topology.layer_split import bottleneck_split
from exo.topology.model_spec import ModelSpec
from exo.topology.models import DEFAULT_MODEL, model_spec
from exo.topology.partitioning_strategy import Partition, PartitioningStrategy
from exo.topology.plan import Plan
from exo.topology.search_problem import SearchProblem
from exo.topology.topology import Topology

EXACT_LIMIT = 10  # usable nodes up to which the search is exhaustive (Held-Karp plus subset enumeration)
DEFAULT_PROMPT_TOKENS = 128  # prompt length behind the reported TTFT


def check_params(objective: str, params: PlannerParams) -> None:
  if objective not in OBJECTIVES:
    raise BadInput(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
  if not (isinstance(params.memory_headroom, (int, float)) and 0 <= params.memory_headroom < 1):
    raise BadInput(f"memory headroom must be a fraction in [0, 1), got {params.memory_headroom!r}")
  if not (isinstance(params.default_rtt_ms, (int, float)) and math.isfinite(params.default_rtt_ms) and params.default_rtt_ms >= 0):
    raise BadInput(f"default RTT must be a finite number of milliseconds >= 0, got {params.default_rtt_ms!r}")
  if isinstance(params.batch, bool) or not isinstance(params.batch, int) or params.batch < 1:
    raise BadInput(f"batch must be a whole number of requests >= 1, got {params.batch!r}")


def usable_nodes(costs: CostModel) -> list[int]:
  """Nodes that can hold at least one layer in the middle of a ring."""
  return [i for i in range(costs.size) if costs.capacity(i) >= 1]


def check_fits(costs: CostModel) -> None:
  """Refuse a model that exceeds the cluster's usable memory, naming both sizes."""
  model, usable = costs.model, sum(max(0, costs.capacity(i)) for i in range(costs.size))
  if usable < model.n_layers:
    per_layer_mb = (model.layer_bytes + costs.resident_requests(1) * model.kv_bytes_per_layer) / 2**20
    raise ClusterCannotServe(
      f"model {model.id!r} does not fit: it needs {model.n_layers} layers of {per_layer_mb:.1f} MB "
      f"({model.n_layers * per_layer_mb / 1024:.1f} GB) but the cluster's usable memory holds only {usable} layers "
      f"(memory headroom {costs.params.memory_headroom:g})"
    )


def no_ring(costs: CostModel) -> ClusterCannotServe:
  return ClusterCannotServe(
    f"no ring can hold model {costs.model.id!r}: the nodes with enough memory between them (with the embedding on the first "
    "stage and the head on the last) are not joined by edges (consecutive nodes in a ring, and the last and first, must share an edge)"
  )


class FlopsLatencyPartitioningStrategy(PartitioningStrategy):
  """Minimise time per output token (`latency`) or maximise pipelined tokens/s at a batch (`throughput`) using each node's
  measured layer times (or TFLOPS and memory bandwidth), memory, and measured link RTT and bandwidth. Exact up to EXACT_LIMIT
  usable nodes, heuristic beyond."""

  name = "flops-latency"

  def __init__(
    self,
    model: ModelSpec | None = None,
    objective: str = "latency",
    memory_headroom: float = PlannerParams.memory_headroom,
    default_rtt_ms: float = PlannerParams.default_rtt_ms,
    batch: int = 1,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    exact_limit: int = EXACT_LIMIT,
  ):
    self.model = model if model is not None else model_spec(DEFAULT_MODEL)  # upstream's partition(topology) names no model
    self.model_given = model is not None
    self.objective = objective
    self.params = PlannerParams(memory_headroom, default_rtt_ms, batch)
    self.prompt_tokens = prompt_tokens
    self.exact_limit = exact_limit
    check_params(objective, self.params)

  def partition(self, topology: Topology) -> list[Partition]:
    return self.plan(topology).partitions

  def plan(self, topology: Topology) -> Plan:
    costs = cost_model(topology, self.model, self.params, self.objective, self.prompt_tokens)
    check_fits(costs)
    usable = usable_nodes(costs)
    if costs.speed_known():
      ring, layers = self._search(costs, usable)
    else:
      ring, layers = self._memory_weighted(costs, usable)
    named = [(costs.node_ids[i], n) for i, n in zip(ring, layers)]
    warnings = costs.warnings() + ([] if self.model_given else [f"no model was given: planned for {DEFAULT_MODEL}, upstream's default model"])
    return Plan.from_ring(self.name, self.objective, self.params, self.model, named, costs.evaluate(ring, layers), warnings)

  def _search(self, costs: CostModel, usable: list[int]) -> tuple[list[int], list[int]]:
    problem = SearchProblem(costs.restrict(usable))
    best = exact_search(problem) if len(usable) <= self.exact_limit else heuristic_search(problem)
    if best is None:
      raise no_ring(costs)
    return [usable[i] for i in best.ring], list(best.layers)

  def _memory_weighted(self, costs: CostModel, usable: list[int]) -> tuple[list[int], list[int]]:
    """With no speed known anywhere: shares proportional to memory (capped), on the cheapest ring of the largest nodes."""
    by_memory = sorted(usable, key=lambda i: (-costs.capacity(i), i))[: self.model.n_layers]
    found = ring_through(costs.hop[[[i] for i in by_memory], by_memory], list(range(len(by_memory))))
    ring = None if found is None else [by_memory[i] for i in found]
    split = (
      None
      if ring is None
      else bottleneck_split([1.0 / costs.capacity(i) for i in ring], costs.ring_capacities(ring), [0.0] * len(ring), self.model.n_layers)
    )
    if split is None:
      raise no_ring(costs)
    return ring, split[1]
