"""The planning problem the searches solve: the usable nodes' cost model, a candidate plan, and the objective's ordering.

A candidate's figures come from the cost model's one evaluation of a plan; the searches only choose rings and splits.
"""

import math
from dataclasses import dataclass

from exo.topology.cost_model import CostModel, head_layers
from exo.topology.layer_split import bottleneck_split, min_time_split

__all__ = ["Candidate", "SearchProblem", "better", "within_tolerance"]

_REL_TOL = 1e-9  # plans whose objective values differ by less than this are ties


@dataclass(frozen=True)
class Candidate:
  ring: tuple[int, ...]  # execution order: ring[0] embeds, ring[-1] runs the head
  layers: tuple[int, ...]
  tpot: float
  bottleneck: float  # seconds the busiest stage takes for one batch


class SearchProblem:
  """Nodes 0..n-1 of `costs` (sorted ids, so index order is id order), with the figures the searches read most, cached."""

  def __init__(self, costs: CostModel):
    self.costs = costs
    self.objective = costs.objective
    self.n_layers = costs.model.n_layers
    self.t1 = costs.times(1)
    self.tb = costs.times(costs.params.batch)
    self.eta = head_layers(costs.model)
    self.batch = costs.params.batch
    self.hop = costs.hop
    self.transfer = costs.transfer
    self.layouts: dict = {}  # Held-Karp index layouts by node count, shared by the ring searches of one plan
    self.plans: dict = {}  # the heuristic's plan for a subset (sorted node tuple), which its local moves revisit

  @property
  def size(self) -> int:
    return self.costs.size

  def middle_capacity(self, i: int, ring_size: int) -> int:
    """Node i's capacity neither first nor last: the most it holds in any ring of that size."""
    return self.costs.capacity(i, ring_size=ring_size)

  def split(self, ring: list[int]) -> list[int] | None:
    """The objective's best layer counts for a fixed ring (ring[0] first, ring[-1] last); None if the ring cannot hold the model."""
    caps, constants = self.costs.ring_capacities(ring), self.costs.stage_constants(ring)
    t1, tb = [self.t1[i] for i in ring], [self.tb[i] for i in ring]
    if self.objective == "latency":
      return min_time_split(t1, caps, constants, self.n_layers, stage_times=tb)
    best = bottleneck_split(tb, caps, constants, self.n_layers, tpot_times=t1)
    return None if best is None else best[1]

  def candidate(self, ring: list[int], layers: list[int]) -> Candidate:
    return Candidate(tuple(ring), tuple(layers), self.costs.tpot(ring, layers), self.costs.busiest_stage(ring, layers))

  def plan_ring(self, ring: list[int]) -> Candidate | None:
    layers = self.split(ring)
    return None if layers is None else self.candidate(ring, layers)

  def order_free(self, nodes: list[int]) -> bool:
    """True if every node's transfer time is the same to every neighbour among `nodes`, so no ring order changes a stage."""
    for i in nodes:
      if len({float(self.transfer[i, j]) for j in nodes if j != i and math.isfinite(self.hop[i, j])}) > 1:
        return False
    return True

  def ring_ok(self, ring: list[int]) -> bool:
    """Consecutive nodes (and the last and first) share an edge."""
    return len(ring) == 1 or all(math.isfinite(self.hop[i, j]) for i, j in zip(ring, ring[1:] + ring[:1]))


def _close(a: float, b: float) -> bool:
  return math.isclose(a, b, rel_tol=_REL_TOL, abs_tol=1e-15)


def within_tolerance(value: float, best: float) -> bool:
  """True if `value` (to be minimised) is no worse than `best` beyond the tie tolerance."""
  return value <= best or _close(value, best)


def better(a: Candidate | None, b: Candidate | None, objective: str) -> bool:
  """Is `a` strictly preferred to `b`? Primary objective, then the other one, then node ids in ring order, then layer counts."""
  if a is None:
    return False
  if b is None:
    return True
  pairs = [(a.tpot, b.tpot), (a.bottleneck, b.bottleneck)]
  if objective == "throughput":
    pairs.reverse()
  for x, y in pairs:
    if not _close(x, y):
      return x < y
  return (a.ring, a.layers) < (b.ring, b.layers)
