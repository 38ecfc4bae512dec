"""The fork's strategy: which nodes take part, in what ring order, with how many layers, optimal under the v1 cost model."""

import math

import numpy as np

from exo.errors import PlanError
from exo.models import DEFAULT_MODEL, model_spec
from exo.topology.cost_model import ClusterCosts, PlannerParams, cluster_costs, predict
from exo.topology.exact_search import exact_search
from exo.topology.heuristic_search import heuristic_search, ring_through
from exo.topology.layer_split import bottleneck_split
from exo.topology.model_spec import ModelSpec
from exo.topology.partitioning_strategy import Partition, PartitioningStrategy
from exo.topology.plan import Plan
from exo.topology.search_problem import OBJECTIVES, SearchProblem
from exo.topology.topology import Topology

EXACT_LIMIT = 10  # usable nodes up to which the search is exhaustive (Held-Karp plus subset enumeration)
DEFAULT_PROMPT_TOKENS = 128  # prompt length behind the reported TTFT


def check_params(objective: str, params: PlannerParams) -> None:
  if objective not in OBJECTIVES:
    raise PlanError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
  if not (isinstance(params.memory_headroom, (int, float)) and 0 <= params.memory_headroom < 1):
    raise PlanError(f"memory headroom must be a fraction in [0, 1), got {params.memory_headroom!r}")
  if not (isinstance(params.default_rtt_ms, (int, float)) and math.isfinite(params.default_rtt_ms) and params.default_rtt_ms >= 0):
    raise PlanError(f"default RTT must be a finite number of milliseconds >= 0, got {params.default_rtt_ms!r}")


def check_fits(costs: ClusterCosts) -> None:
  """Refuse a model that exceeds the cluster's usable memory, naming both sizes."""
  model, usable = costs.model, sum(max(0, c) for c in costs.capacity)
  if usable < model.n_layers:
    per_layer_mb = (model.layer_bytes + model.kv_bytes_per_layer) / 2**20
    raise PlanError(
      f"model {model.id!r} does not fit: it needs {model.n_layers} layers of {per_layer_mb:.1f} MB "
      f"({model.n_layers * per_layer_mb / 1024:.1f} GB) but the cluster's usable memory holds only {usable} layers "
      f"(memory headroom {costs.params.memory_headroom:g})"
    )


class FlopsLatencyPartitioningStrategy(PartitioningStrategy):
  """Minimise time per output token (`latency`) or maximise pipelined tokens/s (`throughput`) using device TFLOPS, memory
  bandwidth and memory, and measured link RTT and bandwidth. Exact up to EXACT_LIMIT usable nodes, heuristic beyond."""

  name = "flops-latency"

  def __init__(
    self,
    model: ModelSpec | None = None,
    objective: str = "latency",
    memory_headroom: float = 0.1,
    default_rtt_ms: float = 5.0,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    exact_limit: int = EXACT_LIMIT,
  ):
    self.model = model if model is not None else model_spec(DEFAULT_MODEL)
    self.objective = objective
    self.params = PlannerParams(memory_headroom, default_rtt_ms)
    self.prompt_tokens = prompt_tokens
    self.exact_limit = exact_limit
    check_params(objective, self.params)

  def partition(self, topology: Topology) -> list[Partition]:
    return self.plan(topology).partitions

  def plan(self, topology: Topology) -> Plan:
    costs = cluster_costs(topology, self.model, self.params)
    check_fits(costs)
    usable = [i for i, cap in enumerate(costs.capacity) if cap >= 1]
    if costs.layer_time is None:
      ring_idx, layers = self._memory_weighted(costs, usable)
    else:
      ring_idx, layers = self._search(costs, usable)
    ring = [(costs.node_ids[i], n) for i, n in zip(ring_idx, layers)]
    prediction = predict(costs, ring_idx, layers, self.prompt_tokens)
    return Plan.from_ring(self.name, self.objective, self.params, self.model, ring, prediction, costs.warnings())

  def _problem(self, costs: ClusterCosts, usable: list[int], times: list[float]) -> SearchProblem:
    hop = np.array([[math.inf if costs.hop[i][j] is None else costs.hop[i][j] for j in usable] for i in usable], dtype=float).reshape(
      len(usable), len(usable)
    )
    transfer = np.array([[costs.transfer[i][j] for j in usable] for i in usable], dtype=float).reshape(len(usable), len(usable))
    return SearchProblem(times, [costs.capacity[i] for i in usable], hop, transfer, self.model.n_layers)

  def _search(self, costs: ClusterCosts, usable: list[int]) -> tuple[list[int], list[int]]:
    problem = self._problem(costs, usable, [costs.layer_time[i] for i in usable])
    search = exact_search if len(usable) <= self.exact_limit else heuristic_search
    best = search(problem, self.objective)
    if best is None:
      raise _no_ring(costs)
    return [usable[i] for i in best.ring], list(best.layers)

  def _memory_weighted(self, costs: ClusterCosts, usable: list[int]) -> tuple[list[int], list[int]]:
    """With no speed known anywhere: shares proportional to memory (capped), on the cheapest ring of the largest nodes."""
    by_memory = sorted(usable, key=lambda i: (-costs.capacity[i], i))[: self.model.n_layers]
    problem = self._problem(costs, by_memory, [1.0 / costs.capacity[i] for i in by_memory])
    ring = ring_through(problem, list(range(len(by_memory))))
    if ring is None:
      raise _no_ring(costs)
    split = bottleneck_split([problem.times[i] for i in ring], [problem.caps[i] for i in ring], [0.0] * len(ring), self.model.n_layers)
    return [by_memory[i] for i in ring], split[1]


def _no_ring(costs: ClusterCosts) -> PlanError:
  return PlanError(
    f"no ring can hold model {costs.model.id!r}: the nodes with enough memory between them are not joined by edges "
    "(consecutive nodes in a ring, and the last and first, must share an edge)"
  )
